"""Tests of rlbook_code.ot: Sinkhorn against exact optima, POT, finite differences and itself."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rlbook_code import ot

pot = pytest.importorskip("ot")  # the POT library (pinned in requirements.txt)


def _problem(n=5, m=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, m, generator=g, dtype=dtype)
    a = torch.rand(n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(m, generator=g, dtype=dtype) + 0.1
    return C, a / a.sum(), b / b.sum()


# ------------------------------------------------------------------------------------------
# sinkhorn
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.02])
def test_plan_satisfies_both_marginals(eps):
    C, a, b = _problem()
    r = ot.sinkhorn(C, a, b, eps=eps)
    assert r.marginal_error <= 1e-9
    assert torch.allclose(r.plan.sum(1), a, atol=1e-9)
    assert torch.allclose(r.plan.sum(0), b, atol=1e-12)
    assert (r.plan >= 0).all()


def test_value_is_cost_plus_entropic_term():
    C, a, b = _problem()
    eps = 0.3
    r = ot.sinkhorn(C, a, b, eps=eps)
    P = r.plan
    kl = (P * (P / (a[:, None] * b[None, :])).log()).sum() - P.sum() + 1.0
    assert torch.allclose(r.value, r.cost + eps * kl, atol=1e-9)
    assert torch.allclose(r.cost, (P * C).sum())


def test_exact_optimum_as_eps_goes_to_zero_permutation():
    """Uniform weights and n = m: the linear program's optimum is the best permutation."""
    n = 6
    C = torch.rand(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    best = min(sum(float(C[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n))) / n
    gaps, init = [], None
    for eps in (0.1, 0.05, 0.03, 0.02):
        r = ot.sinkhorn(C, None, None, eps=eps, max_iters=20000, init=init)  # eps-scaling
        init = (r.f, r.g)
        assert r.marginal_error <= 1e-8
        gap = float(r.cost) - best
        assert -1e-9 <= gap <= eps * math.log(n * n)
        gaps.append(gap)
    assert all(g1 > g2 for g1, g2 in zip(gaps, gaps[1:]))
    assert gaps[-1] < 3e-3


def test_exact_optimum_against_emd2():
    C, a, b = _problem(7, 5, seed=4)
    exact = pot.emd2(a.numpy(), b.numpy(), C.numpy())
    r = ot.sinkhorn(C, a, b, eps=0.005, max_iters=50000)
    assert r.marginal_error <= 1e-8
    assert 0 <= float(r.cost) - exact <= 0.005 * math.log(35)


@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_parity_with_pot(eps):
    C, a, b = _problem(6, 8, seed=1)
    P = pot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", numItermax=100000,
                     stopThr=1e-13)
    cost = pot.sinkhorn2(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", numItermax=100000,
                         stopThr=1e-13)
    r = ot.sinkhorn(C, a, b, eps=eps, max_iters=100000, tol=1e-12)
    np.testing.assert_allclose(r.plan.numpy(), P, atol=1e-9)
    np.testing.assert_allclose(float(r.cost), float(cost), atol=1e-9)


def test_batched_equals_per_item():
    probs = [_problem(5, 4, seed=s) for s in range(3)]
    C = torch.stack([p[0] for p in probs])
    a = torch.stack([p[1] for p in probs])
    b = torch.stack([p[2] for p in probs])
    rb = ot.sinkhorn(C, a, b, eps=0.1)
    for k, (Ck, ak, bk) in enumerate(probs):
        r = ot.sinkhorn(Ck, ak, bk, eps=0.1)
        assert torch.allclose(rb.plan[k], r.plan, atol=1e-9)
        assert torch.allclose(rb.value[k], r.value, atol=1e-9)
        assert torch.allclose(rb.cost[k], r.cost, atol=1e-9)


def test_zero_weights_remove_points():
    C, a, b = _problem(5, 4, seed=2)
    a0 = torch.cat([a, torch.zeros(2, dtype=a.dtype)])
    C0 = torch.cat([C, torch.full((2, 4), 7.0, dtype=C.dtype)])
    r, r0 = ot.sinkhorn(C, a, b, eps=0.1), ot.sinkhorn(C0, a0, b, eps=0.1)
    assert torch.allclose(r0.plan[:5], r.plan, atol=1e-10) and r0.plan[5:].abs().max() == 0
    assert torch.allclose(r0.value, r.value, atol=1e-10)


def test_value_gradient_matches_finite_differences():
    C, a, b = _problem(4, 3, seed=5)
    C = C.clone().requires_grad_(True)
    r = ot.sinkhorn(C, a, b, eps=0.2, tol=1e-13, max_iters=100000)
    (grad,) = torch.autograd.grad(r.value, C)
    assert torch.allclose(grad, r.plan, atol=1e-10)  # envelope theorem: d OT_eps / dC = P
    h = 1e-6
    for i, j in [(0, 0), (1, 2), (3, 1)]:
        Cp, Cm = C.detach().clone(), C.detach().clone()
        Cp[i, j] += h
        Cm[i, j] -= h
        fd = (ot.sinkhorn(Cp, a, b, eps=0.2, tol=1e-13, max_iters=100000).value
              - ot.sinkhorn(Cm, a, b, eps=0.2, tol=1e-13, max_iters=100000).value) / (2 * h)
        assert abs(float(fd) - float(grad[i, j])) < 1e-7


def test_forbidden_moves_and_infeasible_problems():
    C = torch.tensor([[0.0, math.inf], [math.inf, 0.0]], dtype=torch.float64)
    r = ot.sinkhorn(C, None, None, eps=0.1)
    assert torch.allclose(r.plan, torch.eye(2, dtype=torch.float64) / 2)
    assert torch.isfinite(r.cost)
    with pytest.raises(ValueError, match="no feasible"):
        ot.sinkhorn(torch.tensor([[0.0, math.inf], [0.0, math.inf]]), None, None, eps=0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(a=torch.tensor([1.5, -0.5])), "negative"),
    (dict(a=torch.tensor([0.5, 0.6])), "sum to one"),
    (dict(a=torch.tensor([0.5, 0.5, 0.0])), "shape"),
    (dict(a=torch.tensor([float("nan"), 0.5])), "NaN"),
    (dict(eps=0.0), "eps"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(max_iters=0), "max_iters"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    C = torch.rand(2, 3)
    args = dict(a=None, b=None, eps=0.1)
    args.update(kwargs)
    eps = args.pop("eps")
    with pytest.raises(ValueError, match=match):
        ot.sinkhorn(C, args.pop("a"), args.pop("b"), eps=eps, **args)


def test_nan_and_neg_inf_costs_are_refused():
    C = torch.rand(2, 2)
    with pytest.raises(ValueError, match="NaN"):
        ot.sinkhorn(C.masked_fill(torch.eye(2, dtype=torch.bool), float("nan")), None, None, eps=0.1)
    with pytest.raises(ValueError, match="-inf"):
        ot.sinkhorn(C.masked_fill(torch.eye(2, dtype=torch.bool), -math.inf), None, None, eps=0.1)
    with pytest.raises(ValueError, match="cost"):
        ot.sinkhorn(torch.rand(3), None, None, eps=0.1)


# ------------------------------------------------------------------------------------------
# sinkhorn_divergence, windows, embedding_ot
# ------------------------------------------------------------------------------------------
def _clouds(seed=0, B=None, n=4, m=6, d=3):
    g = torch.Generator().manual_seed(seed)
    shape = (B,) if B else ()
    return (torch.randn(*shape, n, d, generator=g, dtype=torch.float64),
            torch.randn(*shape, m, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("cost", ot.COSTS)
def test_divergence_symmetric_and_zero_on_itself(cost):
    x, y = _clouds(B=3)
    s_xy = ot.sinkhorn_divergence(x, y, eps=1.0, cost=cost)
    s_yx = ot.sinkhorn_divergence(y, x, eps=1.0, cost=cost)
    assert torch.allclose(s_xy, s_yx, atol=1e-9)
    assert (ot.sinkhorn_divergence(x, x, eps=1.0, cost=cost) == 0).all()
    assert (s_xy > 0).all()


def test_divergence_against_a_float64_reference():
    """S_eps from three independent plain (non-log-domain) Sinkhorn loops on the dual value."""
    x, y = _clouds(seed=1, n=5, m=3)
    eps = 0.7

    def ot_eps(u, v):
        C = torch.cdist(u, v) ** 2
        K = torch.exp(-C / eps)
        a = torch.full((len(u),), 1.0 / len(u), dtype=torch.float64)
        b = torch.full((len(v),), 1.0 / len(v), dtype=torch.float64)
        uu = torch.ones_like(a)
        for _ in range(5000):
            vv = b / (K.T @ uu)
            uu = a / (K @ vv)
        P = uu[:, None] * K * vv[None, :]
        return float((P * C).sum() + eps * (P * (P / (a[:, None] * b[None, :])).log()).sum())

    ref = ot_eps(x, y) - 0.5 * ot_eps(x, x) - 0.5 * ot_eps(y, y)
    assert abs(float(ot.sinkhorn_divergence(x, y, eps=eps)) - ref) < 1e-8


def test_divergence_gradient_matches_finite_differences():
    x, y = _clouds(seed=2, n=3, m=4, d=2)
    x = x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_: ot.sinkhorn_divergence(x_, y, eps=1.0, tol=1e-12),
                                    (x,), eps=1e-6, atol=1e-6)


def test_divergence_batched_equals_per_item():
    x, y = _clouds(seed=3, B=4)
    sb = ot.sinkhorn_divergence(x, y, eps=1.0, window=1)
    for k in range(4):
        assert torch.allclose(sb[k], ot.sinkhorn_divergence(x[k], y[k], eps=1.0, window=1), atol=1e-9)


def test_window_mask_band_and_feasibility():
    same = ot.window_mask(torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool), 1)[0]
    i = torch.arange(5)
    assert torch.equal(same, (i[:, None] - i[None, :]).abs() <= 1)
    diag = ot.window_mask(torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool), 0)[0]
    assert torch.equal(diag, torch.eye(4, dtype=torch.bool))
    # unequal lengths: every row and column keeps at least one allowed move (feasible)
    for n, m in [(2, 7), (7, 2), (3, 5)]:
        w = ot.window_mask(torch.ones(1, n, dtype=torch.bool), torch.ones(1, m, dtype=torch.bool), 0)[0]
        assert w.any(1).all() and w.any(0).all()
        C = torch.rand(n, m, dtype=torch.float64).masked_fill(~w, math.inf)
        assert ot.sinkhorn(C, None, None, eps=0.05).marginal_error <= 1e-8
    with pytest.raises(ValueError, match="window"):
        ot.window_mask(torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool), -1)


def test_window_zero_is_position_by_position():
    """window = 0, equal lengths: the plan is the diagonal, the cross term the mean per-position cost."""
    x, y = _clouds(seed=4, n=5, m=5)
    eps = 0.05
    C = ot.cost_matrix(x, y).masked_fill(~torch.eye(5, dtype=torch.bool), math.inf)
    r = ot.sinkhorn(C, None, None, eps=eps)
    assert torch.allclose(r.plan, torch.eye(5, dtype=torch.float64) / 5)
    assert torch.allclose(r.cost, ((x - y) ** 2).sum(-1).mean())
    # each self term is then exactly 0 (the diagonal of C(x, x) is 0), so S = OT_eps = mean cost
    s = ot.sinkhorn_divergence(x, y, eps=eps, window=0)
    assert torch.allclose(s, ((x - y) ** 2).sum(-1).mean(), atol=1e-9)


def test_embedding_ot_masks_equal_cropping_and_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    xm = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ym = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pen = ot.embedding_ot(x, y, xm, ym, eps=0.1, window=1)
    assert pen.shape == (2,)
    crop = ot.sinkhorn_divergence(x[0, :4], y[0, :3], eps=0.1, cost="cosine", window=1)
    assert torch.allclose(pen[0], crop, atol=1e-9)
    (grad,) = torch.autograd.grad(pen.sum(), x)
    assert grad[0, 4:].abs().max() == 0  # padding gets no gradient
    assert grad[0, :4].abs().max() > 0
    assert torch.allclose(ot.embedding_ot(y, y, ym, ym, eps=0.1), torch.zeros(2, dtype=torch.float64))


def test_embedding_ot_bad_input():
    x = torch.randn(2, 3, 4)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool"):
        ot.embedding_ot(x, x, m.long(), m, eps=0.1)
    with pytest.raises(ValueError, match="at least one valid"):
        ot.embedding_ot(x, x, torch.zeros(2, 3, dtype=torch.bool), m, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        ot.embedding_ot(x, x, m, m, eps=0.0)
    with pytest.raises(ValueError, match="cost"):
        ot.embedding_ot(x, x, m, m, eps=0.1, cost="l1")
    with pytest.raises(ValueError, match="finite"):
        ot.embedding_ot(x.masked_fill(m[..., None], float("nan")), x, m, m, eps=0.1)


def test_expected_embeddings():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    E = torch.randn(7, 4, generator=g)
    out = ot.expected_embeddings(logits, E, temperature=0.5)
    ref = torch.einsum("btv,vd->btd", torch.softmax(logits / 0.5, -1), E)
    assert torch.allclose(out, ref, atol=1e-6)
    hard = ot.expected_embeddings(torch.full((1, 1, 7), -1e4).index_fill(2, torch.tensor([3]), 0.0), E)
    assert torch.allclose(hard[0, 0], E[3])


def test_embedding_ot_gradient_matches_finite_differences_with_window_and_padding():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    xm = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ym = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda x_: ot.embedding_ot(x_, y, xm, ym, eps=0.5, window=1, tol=1e-12, max_iters=100000),
        (x,), eps=1e-6, atol=1e-6)
