"""Tests of rlbook_code.clipping: hand-computed float64 values, exact gradients, limits."""

from __future__ import annotations

import math

import pytest
import torch

from rlbook_code.aggregation import aggregate
from rlbook_code.clipping import cispo_loss, gspo_loss, ppo_clip_loss

torch.set_num_threads(2)
D = torch.float64


def leaf(values, dtype=D):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def grad_of_sum(loss_fn, logp, *args, **kw):
    loss, metrics = loss_fn(logp, *args, **kw)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    return loss, metrics, g


# --------------------------------------------------------------------------- PPO: hand values
# Each case: (rho, A, expected loss, expected d loss / d logp) with eps_low = 0.2, eps_high = 0.28.
PPO_CASES = [
    (1.0, 2.0, -2.0, -2.0),  # on-policy: -A rho, grad -A rho
    (1.2, 2.0, -2.4, -2.4),  # A > 0, inside: unclipped
    (1.5, 2.0, -2.56, 0.0),  # A > 0, above 1 + eps_high: clipped, flat
    (0.5, 2.0, -1.0, -1.0),  # A > 0, below 1 - eps_low: NOT clipped (min keeps rho A)
    (0.5, -2.0, 1.6, 0.0),  # A < 0, below 1 - eps_low: clipped, flat
    (0.9, -2.0, 1.8, 1.8),  # A < 0, inside
    (1.5, -2.0, 3.0, 3.0),  # A < 0, above: NOT clipped (without dual-clip)
    (4.0, -2.0, 8.0, 8.0),  # A < 0, far above, no dual clip: unbounded
    (1.7, 0.0, 0.0, 0.0),  # A = 0
]


@pytest.mark.parametrize("rho, A, want_loss, want_grad", PPO_CASES)
def test_ppo_hand_values(rho, A, want_loss, want_grad):
    logp = leaf([[math.log(rho)]])
    old = torch.zeros(1, 1, dtype=D)
    m = torch.ones(1, 1, dtype=torch.bool)
    loss, _, g = grad_of_sum(ppo_clip_loss, logp, old, torch.tensor([A], dtype=D), m, eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    # d/dlogp (-A rho) = -A rho
    assert g.item() == pytest.approx(want_grad, abs=1e-12)


@pytest.mark.parametrize(
    "rho, A, want_loss, want_grad",
    [
        (4.0, -2.0, 6.0, 0.0),  # capped at -c A = 6, flat
        (2.0, -2.0, 4.0, 4.0),  # below c: unchanged
        (4.0, 2.0, -1.28 * 2.0, 0.0),  # A > 0: dual clip does nothing
        (0.5, -2.0, 1.6, 0.0),
    ],
)
def test_ppo_dual_clip_hand_values(rho, A, want_loss, want_grad):
    logp = leaf([[math.log(rho)]])
    loss, metrics, g = grad_of_sum(
        ppo_clip_loss, logp, torch.zeros(1, 1, dtype=D), torch.tensor([A], dtype=D),
        torch.ones(1, 1, dtype=torch.bool), eps_low=0.2, eps_high=0.28, dual_clip=3.0,
    )
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert g.item() == pytest.approx(want_grad, abs=1e-12)
    assert metrics["clip_frac_dual"] == (1.0 if (A < 0 and rho > 3.0) else 0.0)


def test_ppo_grad_zero_exactly_where_clipped_and_metrics():
    gen = torch.Generator().manual_seed(0)
    B, T = 16, 12
    logp = (-torch.rand(B, T, generator=gen, dtype=D) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(B, T, generator=gen, dtype=D)
    adv = torch.randn(B, T, generator=gen, dtype=D)
    mask = torch.rand(B, T, generator=gen) < 0.8
    el, eh, c = 0.2, 0.28, 3.0
    loss, metrics, g = grad_of_sum(ppo_clip_loss, logp, old, adv, mask, eps_low=el, eps_high=eh, dual_clip=c)
    rho = torch.exp(logp.detach() - old)
    low = (adv < 0) & (rho < 1 - el) & mask
    high = (adv > 0) & (rho > 1 + eh) & mask
    dual = (adv < 0) & (rho > c) & mask
    clipped = low | high | dual
    assert clipped.any() and (~clipped & mask).any()
    assert (g[clipped] == 0).all()
    assert (g[~mask] == 0).all() and (loss.detach()[~mask] == 0).all()
    active = mask & ~clipped
    torch.testing.assert_close(g[active], (-adv * rho)[active], rtol=1e-12, atol=1e-12)
    n = mask.sum().item()
    assert metrics["clip_frac_low"] == pytest.approx(low.sum().item() / n)
    assert metrics["clip_frac_high"] == pytest.approx(high.sum().item() / n)
    assert metrics["clip_frac_dual"] == pytest.approx(dual.sum().item() / n)
    assert metrics["ratio_mean"] == pytest.approx(rho[mask].mean().item(), rel=1e-12)
    k3 = (rho - 1 - torch.log(rho))[mask]
    assert metrics["approx_kl_old"] == pytest.approx(k3.mean().item(), rel=1e-12)
    w = rho[mask]
    assert metrics["ess"] == pytest.approx((w.sum() ** 2 / (n * (w**2).sum())).item(), rel=1e-12)
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("fn", [ppo_clip_loss, gspo_loss, cispo_loss])
def test_on_policy_gradient_is_reinforce(fn):
    """rho = 1 everywhere: d loss/d logp = -A (REINFORCE), for all three losses."""
    gen = torch.Generator().manual_seed(1)
    B, T = 5, 7
    logp = (-torch.rand(B, T, generator=gen, dtype=D)).requires_grad_()
    adv = torch.randn(B, T, generator=gen, dtype=D)
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[:, 0] = True
    loss, metrics = fn(logp, logp.detach().clone(), adv, mask)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, torch.where(mask, -adv, torch.zeros_like(adv)), rtol=1e-12, atol=1e-12)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["ess"] == pytest.approx(1.0)
    assert metrics["approx_kl_old"] == pytest.approx(0.0, abs=1e-15)
    assert metrics["clip_frac_low"] == 0.0 and metrics["clip_frac_high"] == 0.0


def test_ppo_matches_trl_verl_formula():
    """max(-A rho, -A clip(rho)) as written in TRL / verl, with (B,) advantages broadcast."""
    gen = torch.Generator().manual_seed(2)
    logp = torch.randn(4, 6, generator=gen, dtype=D) * 0.3 - 1
    old = logp + 0.3 * torch.randn(4, 6, generator=gen, dtype=D)
    adv = torch.randn(4, generator=gen, dtype=D)
    mask = torch.ones(4, 6, dtype=torch.bool)
    ratio = torch.exp(logp - old)
    want = -torch.min(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.28) * adv[:, None])
    got, _ = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float32_and_masked_nan_do_not_leak():
    logp = torch.tensor([[-1.0, float("nan")], [-0.5, -0.2]], requires_grad=True)
    old = torch.tensor([[-1.1, float("inf")], [-0.4, -0.3]])
    adv = torch.tensor([[1.0, float("nan")], [-1.0, 2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    for fn in (ppo_clip_loss, gspo_loss, cispo_loss):
        loss, metrics = fn(logp, old, adv, mask)
        (g,) = torch.autograd.grad(loss.sum(), logp)
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        assert loss[0, 1] == 0 and g[0, 1] == 0
        assert all(math.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------- GSPO
def test_gspo_equals_ppo_for_one_token_sequences():
    gen = torch.Generator().manual_seed(3)
    B = 12
    logp = (-torch.rand(B, 1, generator=gen, dtype=D) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, 1, generator=gen, dtype=D)
    adv = torch.randn(B, generator=gen, dtype=D)
    mask = torch.ones(B, 1, dtype=torch.bool)
    lp, mp = ppo_clip_loss(logp, old, adv, mask, eps_low=0.1, eps_high=0.15)
    lg, mg = gspo_loss(logp, old, adv, mask, eps_low=0.1, eps_high=0.15)
    torch.testing.assert_close(lg, lp, rtol=1e-12, atol=1e-12)
    (gp,) = torch.autograd.grad(lp.sum(), logp)
    (gg,) = torch.autograd.grad(lg.sum(), logp)
    torch.testing.assert_close(gg, gp, rtol=1e-12, atol=1e-12)
    for k in ("clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl_old", "ess"):
        assert mg[k] == pytest.approx(mp[k], rel=1e-12, abs=1e-15)


def test_gspo_hand_values_and_sequence_gradient():
    # sequence 0: log-ratios 0.1, -0.3 -> s = exp(-0.1); sequence 1: 3 tokens, 0, 0, 3e-4*3/... below
    logp = leaf([[0.1, -0.3, 0.0], [0.0002, 0.0002, 0.0002], [0.05, 0.0, 0.0]])
    old = torch.zeros(3, 3, dtype=D)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    adv = torch.tensor([-1.0, 2.0, 1.0], dtype=D)
    loss, metrics = gspo_loss(logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4)
    s0, s1, s2 = math.exp(-0.1), math.exp(0.0002), math.exp(0.05)
    # seq 0: A < 0, s0 < 1 - 3e-4 -> clipped: loss = -A (1 - 3e-4) = 0.9997 on both tokens
    # seq 1: A > 0, s1 = 1.0002 inside -> loss = -2 s1
    # seq 2: A > 0, s2 > 1 + 4e-4 -> clipped: loss = -(1 + 4e-4)
    want = torch.tensor([[0.9997, 0.9997, 0.0], [-2 * s1] * 3, [-1.0004, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    # GSPO objective with seq-mean-token-mean: gradient -A_i s_i / (|y_i| B) for unclipped i
    agg = aggregate(loss, mask, "seq-mean-token-mean")
    (g,) = torch.autograd.grad(agg, logp)
    want_g = torch.zeros(3, 3, dtype=D)
    want_g[1] = -2.0 * s1 / (3 * 3)
    torch.testing.assert_close(g, want_g, rtol=1e-12, atol=1e-12)
    assert metrics["clip_frac_low"] == pytest.approx(2 / 6)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 6)
    assert metrics["ratio_mean"] == pytest.approx((2 * s0 + 3 * s1 + s2) / 6, rel=1e-12)


def test_gspo_gradient_equals_direct_sequence_objective():
    """Autograd through s_i = exp(mean log-ratio) directly (TRL's form) gives the same gradient."""
    gen = torch.Generator().manual_seed(4)
    B, T = 6, 5
    logp = (-torch.rand(B, T, generator=gen, dtype=D)).requires_grad_()
    old = logp.detach() + 1e-4 * torch.randn(B, T, generator=gen, dtype=D)
    adv = torch.randn(B, generator=gen, dtype=D)
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, 1 + b % (T - 1) :] = False
    el, eh = 3e-4, 4e-4
    loss, _ = gspo_loss(logp, old, adv, mask, eps_low=el, eps_high=eh)
    (g,) = torch.autograd.grad(aggregate(loss, mask, "seq-mean-token-mean"), logp)
    lengths = mask.sum(1).to(D)
    s = torch.exp(((logp - old) * mask).sum(1) / lengths)
    direct = -torch.min(s * adv, torch.clamp(s, 1 - el, 1 + eh) * adv).mean()
    (g_direct,) = torch.autograd.grad(direct, logp)
    torch.testing.assert_close(g, g_direct, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- CISPO
@pytest.mark.parametrize(
    "rho, A, eps_low, want_w",
    [
        (1.0, 2.0, None, 1.0),
        (2.0, 2.0, None, 1.28),  # capped, gradient still flows
        (2.0, -2.0, None, 1.28),  # capped whatever the sign
        (0.1, -2.0, None, 0.1),  # no lower bound by default
        (0.1, -2.0, 0.2, 0.8),  # with a lower bound
        (1.1, 1.0, None, 1.1),
    ],
)
def test_cispo_hand_values(rho, A, eps_low, want_w):
    lp = math.log(rho) - 1.0  # logp = -1 + log rho, old = -1
    logp = leaf([[lp]])
    old = torch.full((1, 1), -1.0, dtype=D)
    loss, metrics, g = grad_of_sum(
        cispo_loss, logp, old, torch.tensor([A], dtype=D), torch.ones(1, 1, dtype=torch.bool),
        eps_low=eps_low, eps_high=0.28,
    )
    assert loss.item() == pytest.approx(-want_w * A * lp, abs=1e-12)
    assert g.item() == pytest.approx(-want_w * A, abs=1e-12)  # never zeroed
    assert metrics["clip_frac_high"] == (1.0 if rho > 1.28 else 0.0)
    assert metrics["clip_frac_low"] == (1.0 if (eps_low is not None and rho < 1 - eps_low) else 0.0)


def test_cispo_matches_trl_formula_absolute_cap():
    gen = torch.Generator().manual_seed(5)
    logp = torch.randn(3, 4, generator=gen, dtype=D) - 1
    old = logp + 0.5 * torch.randn(3, 4, generator=gen, dtype=D)
    adv = torch.randn(3, 1, generator=gen, dtype=D).expand(3, 4)
    # TRL: -clamp(coef, max=epsilon_high).detach() * A * logp with epsilon_high = 5 (absolute)
    want = -torch.clamp(torch.exp(logp - old), max=5.0) * adv * logp
    got, _ = cispo_loss(logp, old, adv, torch.ones(3, 4, dtype=torch.bool), eps_high=4.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fn", [ppo_clip_loss, gspo_loss, cispo_loss])
def test_bad_shapes_and_dtypes(fn):
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    a = torch.zeros(2)
    with pytest.raises(ValueError, match=r"expected \(2, 3\), got \(2, 4\)"):
        fn(lp, torch.zeros(2, 4), a, m)
    with pytest.raises(ValueError, match=r"\(2,\) or \(2, 3\), got \(3,\)"):
        fn(lp, lp, torch.zeros(3), m)
    with pytest.raises(ValueError, match="bool"):
        fn(lp, lp, a, m.float())
    with pytest.raises(ValueError, match=r"mask must have the shape of logp, expected \(2, 3\), got \(3, 2\)"):
        fn(lp, lp, a, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        fn(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="floating"):
        fn(torch.zeros(2, 3, dtype=torch.long), lp, a, m)
    with pytest.raises(ValueError, match="no response token"):
        fn(lp, lp, a, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.full((2, 3), float("nan")), lp, a, m)


def test_bad_clip_parameters():
    lp = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    a = torch.ones(1)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(lp, lp, a, m, dual_clip=1.0)
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip_loss(lp, lp, a, m, eps_low=1.0)
    with pytest.raises(ValueError, match="eps_high"):
        gspo_loss(lp, lp, a, m, eps_high=-0.1)
    with pytest.raises(ValueError, match="eps_low"):
        cispo_loss(lp, lp, a, m, eps_low=-0.5)
