"""Importance ratios and clipped policy losses: PPO (with dual-clip, clip-higher), GSPO, CISPO.

Chapter 05 derives every function here. Shared conventions:

* ``logp`` ``(B, T)``: log-probabilities of the sampled tokens under the policy being trained,
  :math:`\\log\\pi_\\theta(y_t \\mid x, y_{<t})`, differentiable.
* ``old_logp`` ``(B, T)``: the same under the behaviour policy that sampled them,
  :math:`\\log\\pi_{\\text{old}}`; treated as a constant (detached inside).
* ``advantages``: ``(B,)`` (one per sequence, broadcast over tokens) or ``(B, T)``.
  Positive means "make this more likely".
* ``mask`` ``(B, T)`` bool, True on response tokens. Every output is 0 where it is False, and
  NaN/inf in ``logp``/``old_logp``/``advantages`` at masked positions is ignored (they are
  replaced by 0 *before* any arithmetic, so no NaN can leak into values or gradients).
* The token importance ratio is :math:`\\rho_t = \\exp(\\log\\pi_\\theta - \\log\\pi_{\\text{old}})`.
  The log-ratio is clamped to ``[-20, 20]`` before ``exp`` (as verl does) so a wildly
  off-policy token cannot overflow; beyond the clamp the gradient is 0.
* Each function returns ``(per_token_loss, metrics)``: ``per_token_loss`` is ``(B, T)``, the
  quantity to *minimise* (minus the surrogate objective), to be reduced by
  :func:`rlbook_code.aggregation.aggregate`; ``metrics`` is a dict of python floats.

Metrics (every one is a mean over the response tokens, i.e. the ``mask.sum()`` positions where
``mask`` is True, each token counted once; computed without gradient):

* ``"clip_frac_low"``: fraction of response tokens whose update is cut by the *lower* bound.
  PPO/GSPO: :math:`A_t < 0` and ratio :math:`< 1 - \\varepsilon_{low}` (the gradient of that token is 0).
  CISPO: ratio :math:`< 1 - \\varepsilon_{low}` (the IS weight is raised to the bound; 0 if no lower bound).
* ``"clip_frac_high"``: the same for the upper bound. PPO/GSPO: :math:`A_t > 0` and ratio
  :math:`> 1 + \\varepsilon_{high}`. CISPO: ratio :math:`> 1 + \\varepsilon_{high}` (weight capped).
* ``"ratio_mean"``: mean of the ratio the loss uses (token ratio :math:`\\rho_t` for PPO and
  CISPO, the sequence ratio :math:`s_i` repeated on each of its tokens for GSPO).
* ``"approx_kl_old"``: mean of :math:`k_3 = (\\rho_t - 1) - \\log\\rho_t \\ge 0` with the *token*
  ratio, an unbiased estimate of :math:`\\mathrm{KL}(\\pi_{\\text{old}}\\,\\|\\,\\pi_\\theta)` per token
  (tokens are sampled from :math:`\\pi_{\\text{old}}`; chapter 03).
* ``"ess"``: normalized effective sample size of the importance weights,
  :math:`(\\sum_t w_t)^2 / (n \\sum_t w_t^2) \\in (0, 1]` over the ``n`` response tokens, with
  :math:`w_t` the *unclipped* ratio the method uses (token :math:`\\rho_t`; GSPO: :math:`s_i`).
  It is 1 when all weights are equal (on-policy) and falls towards :math:`1/n` when one weight
  dominates.

``ppo_clip_loss`` adds ``"clip_frac_dual"``: the fraction of response tokens with
:math:`A_t < 0` and :math:`\\rho_t > c` (dual-clip active; 0 when ``dual_clip`` is None).
"""

from __future__ import annotations

import torch

from rlbook_code._validate import check_mask

__all__ = ["ppo_clip_loss", "gspo_loss", "cispo_loss", "LOG_RATIO_CLAMP"]

#: log-ratios are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exp (e^20 ~ 4.9e8).
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------- helpers
def _prepare(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate inputs; return (logp, old_logp, advantages (B, T)) zeroed where mask is False."""
    for name, x in (("logp", logp), ("old_logp", old_logp)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a tensor of shape (B, T), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if old_logp.shape != logp.shape:
        raise ValueError(
            f"old_logp must have the shape of logp, expected {tuple(logp.shape)}, got {tuple(old_logp.shape)}"
        )
    check_mask(logp, mask, "logp")
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise ValueError("advantages must be a floating-point tensor of shape (B,) or (B, T)")
    B, T = logp.shape
    if advantages.shape == (B,):
        advantages = advantages[:, None].expand(B, T)
    elif advantages.shape != (B, T):
        raise ValueError(
            f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}"
        )
    if not bool(mask.any()):
        raise ValueError("mask selects no response token: the loss and its metrics are undefined")
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)
    old_logp = torch.where(mask, old_logp.detach(), zero)
    advantages = torch.where(mask, advantages.detach().to(logp.dtype), zero)
    for name, x in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        if not torch.isfinite(x.detach()).all():
            raise ValueError(f"{name} contains NaN or inf at a response token (mask True)")
    return logp, old_logp, advantages


def _token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    return torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@torch.no_grad()
def _metrics(
    mask: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    ratio_used: torch.Tensor,
    token_log_ratio: torch.Tensor,
) -> dict[str, float]:
    m = mask.to(torch.float64)
    n = m.sum()
    w = ratio_used.detach().to(torch.float64) * m
    lr = token_log_ratio.detach().to(torch.float64)
    k3 = (torch.exp(lr) - 1.0 - lr) * m
    return {
        "clip_frac_low": float((low & mask).sum() / n),
        "clip_frac_high": float((high & mask).sum() / n),
        "ratio_mean": float(w.sum() / n),
        "approx_kl_old": float(k3.sum() / n),
        "ess": float(w.sum() ** 2 / (n * (w**2).sum())),
    }


def _check_eps(name: str, value: float, upper: float | None = None) -> None:
    if not (value >= 0.0) or (upper is not None and not value < upper):
        bound = f" and < {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be >= 0{bound}, got {value}")


# --------------------------------------------------------------------------- PPO
def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""PPO's clipped surrogate, per token, with clip-higher and optional dual-clip.

    .. math::
        \ell_t = -\min\big(\rho_t A_t,\; \mathrm{clip}(\rho_t, 1-\varepsilon_{low}, 1+\varepsilon_{high})\,A_t\big)

    Case analysis (why the ``min``): for :math:`A_t > 0` the objective grows with
    :math:`\rho_t` until :math:`1+\varepsilon_{high}` and is flat (zero gradient) beyond; for
    :math:`A_t < 0` it is flat below :math:`1-\varepsilon_{low}`. In the other direction the
    unclipped term is kept, so a step that made things *worse* is always corrected.
    ``eps_high > eps_low`` is DAPO's clip-higher (e.g. 0.2 / 0.28): it lets low-probability
    tokens with :math:`A>0` grow further. TRL calls these ``epsilon`` / ``epsilon_high``, verl
    ``clip_ratio_low`` / ``clip_ratio_high``.

    Dual-clip (Ye et al. 2020), ``dual_clip = c > 1``: for :math:`A_t < 0` the loss
    :math:`-\rho_t A_t = |A_t|\rho_t` is unbounded in :math:`\rho_t`; it is capped at
    :math:`c\,|A_t|`, i.e. :math:`\ell_t = \min(\ell_t, -c A_t)` when :math:`A_t < 0` (gradient 0
    for :math:`\rho_t > c`). verl: ``clip_ratio_c`` (default 3.0); TRL: ``delta`` (which clamps
    :math:`\rho` at ``delta`` inside the min; the same thing for :math:`A<0` when
    ``delta > 1 + eps_high``).

    At :math:`\rho = 1` (first step on fresh samples) the gradient is exactly
    :math:`-A_t \nabla\log\pi_\theta(y_t)`, the REINFORCE gradient.

    Args:
        logp: ``(B, T)`` current log-probs (differentiable).
        old_logp: ``(B, T)`` behaviour log-probs (detached inside).
        advantages: ``(B,)`` or ``(B, T)``.
        mask: ``(B, T)`` bool, True on response tokens (at least one).
        eps_low: lower clip range, ``0 <= eps_low < 1``.
        eps_high: upper clip range, ``>= 0``.
        dual_clip: ``c > 1`` or None (off).

    Returns:
        ``(per_token_loss (B, T), metrics)``; see the module docstring for the metric keys
        (plus ``"clip_frac_dual"``).
    """
    _check_eps("eps_low", eps_low, upper=1.0)
    _check_eps("eps_high", eps_high)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    logp, old_logp, adv = _prepare(logp, old_logp, advantages, mask)
    log_ratio = _token_log_ratio(logp, old_logp)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)  # = -min(rho A, clip(rho) A)
    neg = adv < 0
    if dual_clip is not None:
        loss = torch.where(neg, torch.minimum(loss, -dual_clip * adv), loss)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    with torch.no_grad():
        r = ratio.detach()
        low = neg & (r < 1.0 - eps_low)
        high = (adv > 0) & (r > 1.0 + eps_high)
        metrics = _metrics(mask, low, high, r, log_ratio)
        dual = neg & (r > dual_clip) if dual_clip is not None else torch.zeros_like(mask)
        metrics["clip_frac_dual"] = float((dual & mask).sum() / mask.sum())
    return loss, metrics


# --------------------------------------------------------------------------- GSPO
def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""GSPO: PPO clipping on the length-normalized *sequence* ratio (Zheng et al. 2025).

    The sequence ratio is the geometric mean of the token ratios over the response,

    .. math::
        s_i = \Big(\frac{\pi_\theta(y_i\mid x)}{\pi_{\text{old}}(y_i\mid x)}\Big)^{1/|y_i|}
            = \exp\Big(\frac{1}{|y_i|}\sum_{t} \log\rho_{i,t}\Big),

    and the objective is :math:`\min(s_i A_i, \mathrm{clip}(s_i, 1-\varepsilon_{low}, 1+\varepsilon_{high})A_i)`.
    Its gradient, unclipped, is :math:`s_i A_i \cdot \frac{1}{|y_i|}\sum_t \nabla\log\pi_\theta(y_{i,t})`:
    every token of a sequence gets the same weight :math:`s_i`, and a clipped sequence
    contributes nothing. The ranges are tiny (defaults ``3e-4`` / ``4e-4``, the paper's) because
    :math:`\log s_i` is an *average* of token log-ratios.

    Per-token form (the paper's "GSPO-token", also verl's implementation): token ``t`` gets
    :math:`s_{i,t} = \mathrm{sg}[s_i]\cdot \pi_\theta(y_{i,t}) / \mathrm{sg}[\pi_\theta(y_{i,t})]`,
    whose value is :math:`s_i` and whose gradient is :math:`s_i \nabla\log\pi_\theta(y_{i,t})`,
    and the per-token loss is :math:`-\min(s_{i,t}A_{i,t}, \mathrm{clip}(s_{i,t})A_{i,t})`. With
    ``(B,)`` advantages and ``aggregate(..., "seq-mean-token-mean")`` (as published) this is
    exactly GSPO's objective and gradient; with ``(B, T)`` advantages it is GSPO-token. TRL:
    ``importance_sampling_level="sequence"`` (which differentiates through :math:`s_i` directly;
    same gradient under seq-mean-token-mean). With one token per sequence, GSPO is PPO.

    Args:
        logp, old_logp, advantages, mask: as in :func:`ppo_clip_loss`.
        eps_low, eps_high: clip range of :math:`s_i`.

    Returns:
        ``(per_token_loss (B, T), metrics)``; clip fractions count the tokens of clipped
        sequences, ``ratio_mean`` and ``ess`` use :math:`s_i` on every response token.
        ``approx_kl_old`` uses token ratios.
    """
    _check_eps("eps_low", eps_low, upper=1.0)
    _check_eps("eps_high", eps_high)
    logp, old_logp, adv = _prepare(logp, old_logp, advantages, mask)
    token_log_ratio = logp - old_logp  # (B, T), 0 where masked
    lengths = mask.sum(dim=1).clamp(min=1).to(logp.dtype)  # (B,)
    log_s = token_log_ratio.sum(dim=1) / lengths  # (B,) mean token log-ratio
    log_s = torch.clamp(log_s, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # value s_i, gradient s_i * grad log pi_t (stop-gradient trick)
    log_s_tok = log_s.detach()[:, None] + logp - logp.detach()  # (B, T)
    s_tok = torch.exp(log_s_tok)
    unclipped = -adv * s_tok
    clipped = -adv * torch.clamp(s_tok, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    with torch.no_grad():
        s = torch.exp(log_s.detach())[:, None].expand_as(logp)  # (B, T)
        low = (adv < 0) & (s < 1.0 - eps_low)
        high = (adv > 0) & (s > 1.0 + eps_high)
        metrics = _metrics(mask, low, high, s, _token_log_ratio(logp, old_logp))
    return loss, metrics


# --------------------------------------------------------------------------- CISPO
def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float | None = None,
    eps_high: float = 0.28,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""CISPO: a clipped, stop-gradient importance weight times :math:`\log\pi` (MiniMax-M1).

    .. math::
        \ell_t = -\,\mathrm{sg}\big[\mathrm{clip}(\rho_t, 1-\varepsilon_{low}, 1+\varepsilon_{high})\big]\,A_t\,\log\pi_\theta(y_t)

    The gradient is :math:`-\hat\rho_t A_t \nabla\log\pi_\theta(y_t)` with the clipped weight
    :math:`\hat\rho_t`: unlike PPO, **no token's gradient is ever zeroed**; clipping only
    bounds the variance of the weight. At :math:`\rho = 1` it is the REINFORCE gradient. The
    *value* of :math:`\ell_t` is not a surrogate of the return (it contains
    :math:`\log\pi`); only its gradient matters.

    Defaults: no lower bound (``eps_low=None``: the weight is only clipped from above; the paper
    "did not impose a lower bound" and tuned only the upper one) and ``eps_high=0.28``, the
    clip-higher value of DAPO, so the weight lies in :math:`[0, 1.28]`. Note that TRL's
    ``loss_type="cispo"`` reads its ``epsilon_high`` as the *absolute* cap of the weight
    (``clamp(rho, max=epsilon_high)``), i.e. our ``1 + eps_high``.

    Args:
        logp, old_logp, advantages, mask: as in :func:`ppo_clip_loss`.
        eps_low: None (no lower bound) or ``0 <= eps_low < 1``.
        eps_high: weight cap is ``1 + eps_high``.

    Returns:
        ``(per_token_loss (B, T), metrics)``; clip fractions count tokens whose *weight* was
        clipped, whatever the sign of the advantage.
    """
    if eps_low is not None:
        _check_eps("eps_low", eps_low, upper=1.0)
    _check_eps("eps_high", eps_high)
    logp, old_logp, adv = _prepare(logp, old_logp, advantages, mask)
    log_ratio = _token_log_ratio(logp, old_logp)
    ratio = torch.exp(log_ratio).detach()
    lo = 0.0 if eps_low is None else 1.0 - eps_low
    weight = torch.clamp(ratio, lo, 1.0 + eps_high)  # detached
    loss = -weight * adv * logp
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    with torch.no_grad():
        low = ratio < lo if eps_low is not None else torch.zeros_like(mask)
        high = ratio > 1.0 + eps_high
        metrics = _metrics(mask, low, high, ratio, log_ratio)
    return loss, metrics
