"""Entropic optimal transport (Sinkhorn) and the debiased Sinkhorn divergence (chapter 16).

What is transported. Two weighted point clouds: ``x`` (``n`` points with weights ``a``) and
``y`` (``m`` points with weights ``b``), weights non-negative and summing to one. A *plan*
``P`` (``n x m``, non-negative) moves mass ``P_ij`` from ``x_i`` to ``y_j``; it must empty every
source (rows sum to ``a``) and fill every target (columns sum to ``b``). Moving mass costs
``C_ij`` per unit, e.g. ``|x_i - y_j|^2``. Optimal transport is the linear program

    OT(a, b; C) = min_P <P, C>   subject to   P 1 = a,  P^T 1 = b,  P >= 0.

Entropic regularisation (Cuturi 2013) adds ``eps * KL(P || a b^T)``:

    OT_eps(a, b; C) = min_P <P, C> + eps * KL(P || a b^T),

whose solution has the form ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` for two
*potentials* ``f`` (n,) and ``g`` (m,). Sinkhorn's algorithm alternates the two updates that
make one marginal exact (written in the log domain so that small ``eps`` does not underflow):

    f_i = -eps * log sum_j b_j exp((g_j - C_ij) / eps)       (rows now sum to a)
    g_j = -eps * log sum_i a_i exp((f_i - C_ij) / eps)       (columns now sum to b)

At convergence ``OT_eps = <a, f> + <b, g>`` (the dual value). The role of ``eps``: it blurs
the plan over about ``eps`` of cost; ``eps -> 0`` recovers the linear program's optimum
(``<P, C>`` is within about ``eps * log(n m)`` of it) but needs about ``1/eps`` times more
iterations; large ``eps`` pushes ``P`` towards the independent coupling ``a b^T``.

``OT_eps(x, x) > 0`` (the blur costs something even between identical clouds), so
:func:`sinkhorn_divergence` uses the debiased form of Feydy et al. (2019)

    S_eps(x, y) = OT_eps(x, y) - OT_eps(x, x) / 2 - OT_eps(y, y) / 2,

which is symmetric, exactly 0 for identical inputs, and (for the squared-Euclidean cost,
whose kernel ``exp(-C/eps)`` is positive definite) non-negative.

Gradients. The iterations run without autograd; the returned ``value`` is then recomputed
from the converged potentials with one differentiable half-step, which gives the exact
gradient of ``OT_eps`` at convergence (envelope theorem: ``d OT_eps / d C = P``), at the cost
of one pass instead of back-propagating through hundreds of iterations.

Shapes: a leading batch dimension ``B`` is optional everywhere (``(B, n, m)`` costs,
``(B, n)`` / ``(B, m)`` weights); a zero weight removes a point (padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["SinkhornResult", "COSTS", "cost_matrix", "window_mask", "sinkhorn", "sinkhorn_divergence",
           "expected_embeddings", "embedding_ot"]

COSTS = ("sqeuclidean", "cosine")


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn` (shapes without the batch dimension when none was given).

    Attributes:
        plan: ``(B, n, m)`` the entropic transport plan ``P`` (detached).
        cost: ``(B,)`` the transport cost ``<P, C>``; its gradient is ``P`` (plan held fixed),
            which is also the gradient of ``value`` with respect to ``C``.
        value: ``(B,)`` the regularised optimum ``OT_eps = <P, C> + eps KL(P || a b^T)``,
            differentiable (envelope gradient) in ``C``, ``a`` and ``b``.
        f: ``(B, n)`` and g: ``(B, m)`` the converged dual potentials (detached).
        n_iters: iterations run (the batch stops when its worst item has converged).
        marginal_error: ``(B,)`` L1 error of the row marginal, ``sum_i |sum_j P_ij - a_i|``
            (the column marginal is exact after each g-update); ``<= tol`` when converged.
    """

    plan: torch.Tensor
    cost: torch.Tensor
    value: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iters: int
    marginal_error: torch.Tensor


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def _check_weights(w: Optional[torch.Tensor], name: str, batch: int, size: int, dtype, device) -> torch.Tensor:
    if w is None:
        return torch.full((batch, size), 1.0 / size, dtype=dtype, device=device)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of weights, got {type(w).__name__}")
    w2 = w.unsqueeze(0) if w.dim() == 1 else w
    if w2.shape != (batch, size):
        raise ValueError(f"{name} must have shape ({size},) or ({batch}, {size}) to match the cost, "
                         f"got {tuple(w.shape)}")
    if not torch.isfinite(w2).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (w2 < 0).any():
        raise ValueError(f"{name} has negative weights (min {float(w2.min()):.3g}); weights are masses >= 0")
    sums = w2.sum(-1)
    tol = 1e-6 if w2.dtype == torch.float64 else 1e-4
    if ((sums - 1).abs() > tol).any():
        raise ValueError(f"{name} must sum to one over its last dimension (a probability vector), "
                         f"got sums in [{float(sums.min()):.6g}, {float(sums.max()):.6g}]")
    return w2.to(dtype)


def sinkhorn(cost: torch.Tensor, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None, *,
             eps: float, max_iters: int = 1000, tol: float = 1e-9,
             init: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> SinkhornResult:
    """Entropic optimal transport between weights ``a`` and ``b`` for the cost ``C``, in the log domain.

    Args:
        cost: ``(n, m)`` or ``(B, n, m)`` cost matrix ``C``, finite or ``+inf`` (a forbidden move;
            see :func:`window_mask`); NaN and ``-inf`` are refused.
        a: ``(n,)`` or ``(B, n)`` source weights, ``>= 0``, summing to one; None: uniform.
        b: ``(m,)`` or ``(B, m)`` target weights, ``>= 0``, summing to one; None: uniform.
        eps: regularisation strength ``> 0``, in units of the cost (keyword only).
        max_iters: most Sinkhorn iterations (each is one f- and one g-update).
        tol: stop when the row-marginal L1 error of every item is ``<= tol``. It is floored
            at 100 machine epsilons of the cost's dtype (float32 cannot resolve 1e-9).
        init: starting potentials ``(f, g)`` (shapes of :attr:`SinkhornResult.f` / ``g``),
            e.g. the solution at a larger ``eps``: "eps-scaling", which saves most of the
            iterations at small ``eps``. None: zeros.

    Returns:
        A :class:`SinkhornResult`. If ``max_iters`` ran out first the result is returned
        anyway; check ``marginal_error``.

    Raises:
        ValueError: bad shapes or weights, NaN or ``-inf`` costs, ``eps <= 0``, or a problem
            with no feasible plan (a point with positive mass whose every move is forbidden).
    """
    if not isinstance(cost, torch.Tensor) or not cost.is_floating_point() or cost.dim() not in (2, 3):
        raise ValueError(f"cost must be a floating-point (n, m) or (B, n, m) tensor, got "
                         f"{tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__}")
    _check_eps(eps)
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    unbatched = cost.dim() == 2
    C = cost.unsqueeze(0) if unbatched else cost  # (B, n, m)
    B, n, m = C.shape
    if n == 0 or m == 0 or B == 0:
        raise ValueError(f"cost must have at least one row, column and batch item, got shape {tuple(cost.shape)}")
    if torch.isnan(C).any():
        raise ValueError("cost contains NaN")
    if (C == -math.inf).any():
        raise ValueError("cost contains -inf (an infinitely profitable move); only +inf (forbidden) is allowed")
    a2 = _check_weights(a, "a", B, n, C.dtype, C.device)  # (B, n)
    b2 = _check_weights(b, "b", B, m, C.dtype, C.device)  # (B, m)
    tol = max(float(tol), 100 * torch.finfo(C.dtype).eps)
    log_a, log_b = a2.log(), b2.log()  # -inf on zero weights
    pos_a, pos_b = a2 > 0, b2 > 0

    some_a_zero, some_b_zero = not bool(pos_a.all()), not bool(pos_b.all())

    def f_update(g: torch.Tensor, C_: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        z = (g[:, None, :] - C_) / eps + lb[:, None, :]  # (B, n, m)
        if not some_a_zero:
            return -eps * torch.logsumexp(z, dim=2)
        z = torch.where(pos_a[:, :, None], z, 0.0)  # rows without mass: any finite value
        return torch.where(pos_a, -eps * torch.logsumexp(z, dim=2), 0.0)

    def g_update(f: torch.Tensor, C_: torch.Tensor) -> torch.Tensor:
        z = (f[:, :, None] - C_) / eps + log_a[:, :, None]  # (B, n, m)
        if not some_b_zero:
            return -eps * torch.logsumexp(z, dim=1)
        z = torch.where(pos_b[:, None, :], z, 0.0)
        return torch.where(pos_b, -eps * torch.logsumexp(z, dim=1), 0.0)

    infeasible = ValueError("no feasible transport plan: a point with positive weight can move "
                            "nowhere (every entry of its cost row or column is +inf)")
    with torch.no_grad():
        Cd = C.detach()
        g = torch.zeros(B, m, dtype=C.dtype, device=C.device)
        if init is not None:
            f0, g0 = (t.detach().to(C.dtype).reshape(B, -1) for t in init)
            if f0.shape != (B, n) or g0.shape != (B, m) or not (torch.isfinite(f0).all() and torch.isfinite(g0).all()):
                raise ValueError(f"init must be finite potentials (f, g) of shapes {(B, n)} and {(B, m)}")
            g = torch.where(pos_b, g0, 0.0)
        f = f_update(g, Cd, log_b)
        for it in range(1, max_iters + 1):
            g = g_update(f, Cd)  # columns exact
            f_next = f_update(g, Cd, log_b)
            # rows of the plan (f, g) sum to a_i exp((f_i - f_next_i) / eps): their L1 error
            err = (a2 * torch.expm1((f - f_next) / eps)).abs().sum(1)  # (B,)
            worst = float(err.max())
            if not math.isfinite(worst):
                raise infeasible
            if worst <= tol or it == max_iters:
                break
            f = f_next
        if not (torch.isfinite(f).all() and torch.isfinite(g).all()):
            raise infeasible
        log_p = (f[:, :, None] + g[:, None, :] - Cd) / eps + log_a[:, :, None] + log_b[:, None, :]
        plan = log_p.exp()  # (B, n, m)
    # One differentiable half-step from the converged g: exact gradients at convergence.
    f_grad = f_update(g, C, b2.log())
    value = (a2 * f_grad).sum(1) + (b2 * g).sum(1)  # (B,)
    C_finite = C.masked_fill(torch.isinf(C), 0.0)
    cost_val = (plan * C_finite).sum((1, 2))  # (B,)
    if unbatched:
        return SinkhornResult(plan[0], cost_val[0], value[0], f[0], g[0], it, err[0])
    return SinkhornResult(plan, cost_val, value, f, g, it, err)


def cost_matrix(x: torch.Tensor, y: torch.Tensor, cost: str = "sqeuclidean") -> torch.Tensor:
    """Pairwise costs between the rows of ``x`` ``(B, n, d)`` and ``y`` ``(B, m, d)`` (or unbatched).

    ``sqeuclidean``: ``|x_i - y_j|^2`` (no 1/2, as POT's ``ot.dist``); ``cosine``:
    ``1 - cos(x_i, y_j)`` in ``[0, 2]``, blind to the vectors' norms.

    Returns:
        ``(B, n, m)`` (or ``(n, m)``), differentiable in both inputs.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != y.dim() \
            or x.dim() not in (2, 3) or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(f"x and y must be (n, d) and (m, d) tensors, or (B, n, d) and (B, m, d), "
                         f"got {tuple(getattr(x, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}")
    if not torch.isfinite(x).all() or not torch.isfinite(y).all():
        raise ValueError("x and y must be finite (NaN or inf in the points)")
    if cost == "sqeuclidean":
        d2 = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.transpose(-1, -2)
        return d2.clamp_min(0.0)
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - xn @ yn.transpose(-1, -2)


def window_mask(x_mask: torch.Tensor, y_mask: torch.Tensor, window: int) -> torch.Tensor:
    """Which moves a positional window allows, ``(B, n, m)`` bool (True: allowed).

    Each valid position ``i`` of a sequence of ``n`` valid tokens covers the span
    ``[i/n, (i+1)/n]`` of the unit interval, and position ``j`` of ``m`` covers
    ``[j/m, (j+1)/m]``; a move ``i -> j`` is allowed when the two spans overlap or lie less
    than ``window / max(n, m)`` apart. For equal lengths this is ``|i - j| <= window``
    (GRPO-mini's band); ``window = 0`` allows only the diagonal (a position-by-position
    comparison). The monotone plan always fits in the band, so a windowed problem is
    always feasible. Pairs involving a padding position are marked allowed (their weight is 0).

    Args:
        x_mask: ``(B, n)`` bool, True on valid positions (counted in order).
        y_mask: ``(B, m)`` bool.
        window: integer ``>= 0``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an integer >= 0 or None, got {window!r}")
    if x_mask.dtype != torch.bool or y_mask.dtype != torch.bool or x_mask.dim() != 2 or y_mask.dim() != 2 \
            or x_mask.shape[0] != y_mask.shape[0]:
        raise ValueError(f"x_mask and y_mask must be (B, n) and (B, m) bool tensors, got "
                         f"{tuple(x_mask.shape)} {x_mask.dtype} and {tuple(y_mask.shape)} {y_mask.dtype}")
    n = x_mask.sum(1).long()[:, None, None]  # (B, 1, 1)
    m = y_mask.sum(1).long()[:, None, None]
    i = (x_mask.long().cumsum(1) - 1)[:, :, None]  # (B, n, 1) rank among valid positions
    j = (y_mask.long().cumsum(1) - 1)[:, None, :]  # (B, 1, m)
    # gap between the spans, times n*m (integers): max(i m, j n) - min((i+1) m, (j+1) n)
    gap = torch.maximum(i * m, j * n) - torch.minimum((i + 1) * m, (j + 1) * n)
    allowed = gap * torch.maximum(n, m) < window * n * m
    valid = x_mask[:, :, None] & y_mask[:, None, :]
    return allowed | ~valid


def _masked_weights(mask: torch.Tensor, dtype) -> torch.Tensor:
    counts = mask.sum(1, keepdim=True)
    if (counts == 0).any():
        raise ValueError("every sequence needs at least one valid position (a mask row is all False)")
    return mask.to(dtype) / counts.to(dtype)


def _ot_value(x, y, a, b, x_mask, y_mask, *, eps, cost, window, max_iters, tol) -> torch.Tensor:
    C = cost_matrix(x, y, cost)  # (B, n, m)
    if window is not None:
        C = C.masked_fill(~window_mask(x_mask, y_mask, window), math.inf)
    return sinkhorn(C, a, b, eps=eps, max_iters=max_iters, tol=tol).value


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, *, eps: float, a: Optional[torch.Tensor] = None,
                        b: Optional[torch.Tensor] = None, cost: str = "sqeuclidean",
                        window: Optional[int] = None, max_iters: int = 1000, tol: float = 1e-9) -> torch.Tensor:
    """Debiased Sinkhorn divergence ``S_eps(x, y) = OT_eps(x, y) - OT_eps(x, x)/2 - OT_eps(y, y)/2``.

    Args:
        x: ``(n, d)`` or ``(B, n, d)`` points; y: ``(m, d)`` or ``(B, m, d)``.
        eps: regularisation ``> 0`` in units of the cost (keyword only).
        a, b: weights ``(n,)`` / ``(B, n)`` and ``(m,)`` / ``(B, m)`` (``>= 0``, sum one); None: uniform.
            A zero weight removes a point; ``window`` counts only the points with positive weight.
        cost: ``sqeuclidean`` or ``cosine`` (:func:`cost_matrix`).
        window: None (any point may go anywhere) or an integer ``>= 0`` restricting moves to a
            positional band (:func:`window_mask`), the same band in all three terms.

    Returns:
        ``(B,)`` or a scalar; exactly 0 when ``x`` equals ``y`` (and ``a`` equals ``b``), symmetric,
        differentiable in ``x``, ``y``, ``a``, ``b``. Non-negative for ``sqeuclidean`` without a
        window; with ``cosine`` or a window it is usually, but not provably, ``>= 0``.
    """
    unbatched = x.dim() == 2
    X = x.unsqueeze(0) if unbatched else x
    Y = y.unsqueeze(0) if unbatched and y.dim() == 2 else y
    if X.dim() != 3 or Y.dim() != 3:
        raise ValueError(f"x and y must both be (n, d) or both (B, n, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    Bn, n, m = X.shape[0], X.shape[1], Y.shape[1]
    A = _check_weights(a, "a", Bn, n, X.dtype, X.device)
    Bw = _check_weights(b, "b", Bn, m, X.dtype, X.device)
    xm, ym = A > 0, Bw > 0
    kw = dict(eps=eps, cost=cost, window=window, max_iters=max_iters, tol=tol)
    xy = _ot_value(X, Y, A, Bw, xm, ym, **kw)
    xx = _ot_value(X, X, A, A, xm, xm, **kw)
    yy = _ot_value(Y, Y, Bw, Bw, ym, ym, **kw)
    s = xy - 0.5 * (xx + yy)  # (B,)
    return s[0] if unbatched else s


def expected_embeddings(logits: torch.Tensor, embedding: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The policy's expected next-token embedding at each position, ``softmax(logits / T) @ E``.

    Args:
        logits: ``(B, T, V)`` next-token logits of the policy.
        embedding: ``(V, d)`` an embedding table (the frozen reference model's input embeddings).
        temperature: the sampling temperature ``> 0``.

    Returns:
        ``(B, T, d)``, differentiable in ``logits``: a point inside the convex hull of the
        token embeddings, at a token's own embedding only when the policy is certain.
    """
    if logits.dim() != 3 or embedding.dim() != 2 or logits.shape[-1] != embedding.shape[0]:
        raise ValueError(f"logits (B, T, V) and embedding (V, d) must share V, got {tuple(logits.shape)} "
                         f"and {tuple(embedding.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, T, V)
    return probs @ embedding.float()


def embedding_ot(policy_emb: torch.Tensor, ref_emb: torch.Tensor, policy_mask: torch.Tensor,
                 ref_mask: torch.Tensor, *, eps: float, window: Optional[int] = None, cost: str = "cosine",
                 max_iters: int = 1000, tol: float = 1e-9) -> torch.Tensor:
    """Per-sequence OT penalty between a completion and a reference completion, ``(B,)``.

    Each sequence is a uniform cloud over its valid tokens: position ``t`` of the completion
    carries weight ``1 / |completion|`` and sits at ``policy_emb[t]``; the reference
    completion likewise. The penalty is the debiased divergence :func:`sinkhorn_divergence`
    between the two clouds, optionally restricted to a positional ``window``.

    What it constrains: *which* embeddings a completion is made of, up to reordering (within
    the window). What it does not: the probabilities of the policy. Unlike KL(pi || pi_ref)
    it is not 0 when pi equals pi_ref (two completions of one policy differ), it does not
    grow when the policy puts mass on tokens the reference finds unlikely but that sit near
    the reference's tokens in embedding space, and it is blind to order without a window.

    Args:
        policy_emb: ``(B, n, d)`` embeddings of the completion (differentiable: the gradient
            flows to the policy side only if this tensor carries one).
        ref_emb: ``(B, m, d)`` embeddings of the reference completion.
        policy_mask: ``(B, n)`` bool, True on completion tokens; ref_mask: ``(B, m)`` bool.
        eps: Sinkhorn regularisation ``> 0`` (units of the cost; ``cosine`` costs lie in [0, 2]).
        window: None or an integer ``>= 0`` (:func:`window_mask`).
        cost: ``cosine`` (default: embedding norms vary with token frequency) or ``sqeuclidean``.
    """
    if policy_emb.dim() != 3 or ref_emb.dim() != 3 or policy_emb.shape[0] != ref_emb.shape[0]:
        raise ValueError(f"policy_emb and ref_emb must be (B, n, d) and (B, m, d), got "
                         f"{tuple(policy_emb.shape)} and {tuple(ref_emb.shape)}")
    for name, mk, emb in (("policy_mask", policy_mask, policy_emb), ("ref_mask", ref_mask, ref_emb)):
        if not isinstance(mk, torch.Tensor) or mk.dtype != torch.bool or mk.shape != emb.shape[:2]:
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(emb.shape[:2])}, got "
                             f"{getattr(mk, 'dtype', type(mk).__name__)} {tuple(getattr(mk, 'shape', ()))}")
    dtype = torch.promote_types(policy_emb.dtype, ref_emb.dtype)
    if not dtype.is_floating_point:
        raise ValueError("embeddings must be floating point")
    dtype = torch.promote_types(dtype, torch.float32)
    x = policy_emb.to(dtype).masked_fill(~policy_mask[..., None], 0.0)
    y = ref_emb.to(dtype).masked_fill(~ref_mask[..., None], 0.0)
    if cost == "cosine":  # padding rows at 0 would have an undefined direction: give them any unit vector
        x = torch.where(policy_mask[..., None], x, torch.ones_like(x))
        y = torch.where(ref_mask[..., None], y, torch.ones_like(y))
    a = _masked_weights(policy_mask, dtype)
    b = _masked_weights(ref_mask, dtype)
    return sinkhorn_divergence(x, y, eps=eps, a=a, b=b, cost=cost, window=window, max_iters=max_iters, tol=tol)
