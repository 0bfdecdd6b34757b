"""Tests of rlbook_code.preference: closed forms in float64 loops, finite differences, fixed
points found by optimisation, label smoothing as flipped labels, ragged masks, KTO's detached
reference point, and the input checks."""

from __future__ import annotations

import math

import pytest
import torch

from rlbook_code import preference as pref

torch.set_num_threads(1)
D = torch.float64


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _batch(seed=0, B=5):
    g = torch.Generator().manual_seed(seed)
    return [(-torch.rand(B, generator=g, dtype=D) * 6.0 - 0.1) for _ in range(4)]


# --------------------------------------------------------------------------- sequence log-probs
def test_sequence_logprobs_sum_and_mean_on_ragged_masks():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 6, generator=g, dtype=D)
    lengths = [6, 1, 3, 4]
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    logp_poisoned = logp.masked_fill(~mask, float("nan"))  # masked entries must be ignored
    s = pref.sequence_logprobs(logp_poisoned, mask)
    a = pref.sequence_logprobs(logp_poisoned, mask, average=True)
    for i, n in enumerate(lengths):
        want = sum(float(logp[i, t]) for t in range(n))
        assert float(s[i]) == pytest.approx(want, abs=1e-12)
        assert float(a[i]) == pytest.approx(want / n, abs=1e-12)


def test_sequence_logprobs_gradient_of_average_is_one_over_length():
    logp = torch.zeros(2, 4, dtype=D, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    (g,) = torch.autograd.grad(pref.sequence_logprobs(logp, mask, average=True).sum(), logp)
    want = torch.tensor([[0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25]], dtype=D)
    assert torch.equal(g, want)


def test_sequence_logprobs_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="no response token"):
        pref.sequence_logprobs(x, torch.tensor([[True, False, False], [False, False, False]]), average=True)
    with pytest.raises(ValueError, match="bool"):
        pref.sequence_logprobs(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        pref.sequence_logprobs(x, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        pref.sequence_logprobs(torch.tensor([[float("nan"), 0.0]]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        pref.sequence_logprobs(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        pref.sequence_logprobs(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    # an empty row is fine for the sum (it is 0)
    assert float(pref.sequence_logprobs(x, torch.zeros(2, 3, dtype=torch.bool)).abs().sum()) == 0.0


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.45)])
def test_dpo_closed_form_loop(beta, eps):
    c, r, rc, rr = _batch(0)
    out = pref.dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)
    for i in range(len(c)):
        h = (float(c[i]) - float(rc[i])) - (float(r[i]) - float(rr[i]))
        want = -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
        assert float(out.losses[i]) == pytest.approx(want, abs=1e-12)
        assert float(out.chosen_rewards[i]) == pytest.approx(beta * (float(c[i]) - float(rc[i])), abs=1e-12)
        assert float(out.rejected_rewards[i]) == pytest.approx(beta * (float(r[i]) - float(rr[i])), abs=1e-12)
    assert float(out.loss) == pytest.approx(float(out.losses.mean()), abs=1e-14)
    assert torch.allclose(out.margins, out.chosen_rewards - out.rejected_rewards)
    assert float(out.accuracy) == pytest.approx(float((out.margins > 0).double().mean()))
    m = out.metrics()
    assert set(m) == {"loss", "reward/chosen", "reward/rejected", "reward/margin", "reward/accuracy"}


def test_dpo_at_the_reference_is_log2_with_gradient_minus_beta_over_2():
    x = torch.tensor([-3.0, -1.0], dtype=D, requires_grad=True)
    y = torch.tensor([-2.0, -4.0], dtype=D, requires_grad=True)
    out = pref.dpo_loss(x, y, x.detach(), y.detach(), beta=0.3)
    assert torch.allclose(out.losses, torch.full((2,), math.log(2.0), dtype=D))
    gx, gy = torch.autograd.grad(out.losses.sum(), (x, y))
    assert torch.allclose(gx, torch.full((2,), -0.15, dtype=D)) and torch.allclose(gy, torch.full((2,), 0.15, dtype=D))


def test_label_smoothing_is_the_expected_loss_under_flipped_labels():
    c, r, rc, rr = _batch(3)
    eps = 0.3
    smooth = pref.dpo_loss(c, r, rc, rr, beta=0.7, label_smoothing=eps).losses
    kept = pref.dpo_loss(c, r, rc, rr, beta=0.7).losses
    flipped = pref.dpo_loss(r, c, rr, rc, beta=0.7).losses
    assert torch.allclose(smooth, (1 - eps) * kept + eps * flipped, atol=1e-13)


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_ipo_closed_form(tau):
    c, r, rc, rr = _batch(1)
    out = pref.ipo_loss(c, r, rc, rr, tau=tau)
    for i in range(len(c)):
        h = (float(c[i]) - float(rc[i])) - (float(r[i]) - float(rr[i]))
        assert float(out.losses[i]) == pytest.approx((h - 1 / (2 * tau)) ** 2, abs=1e-11)


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (0.5, 0.0), (2.5, 1.4)])
def test_simpo_closed_form(beta, gamma):
    c, r, _, _ = _batch(2)
    out = pref.simpo_loss(c, r, beta=beta, gamma=gamma)
    for i in range(len(c)):
        want = -_logsig(beta * (float(c[i]) - float(r[i])) - gamma)
        assert float(out.losses[i]) == pytest.approx(want, abs=1e-12)
    assert torch.allclose(out.chosen_rewards, beta * c)


def test_log1mexp_is_stable_and_exact():
    x = torch.tensor([-1e-20, -1e-10, -1e-3, -0.5, -math.log(2.0), -1.0, -30.0, -700.0], dtype=D)
    got = pref.log1mexp(x)
    for xi, gi in zip(x.tolist(), got.tolist()):
        want = math.log(-math.expm1(xi)) if xi > -math.log(2) else math.log1p(-math.exp(xi))
        assert gi == pytest.approx(want, rel=1e-12)
    assert torch.isfinite(pref.log1mexp(torch.tensor([0.0]))).all()  # p rounded to 1: finite


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_closed_form(lam):
    c, r, _, _ = _batch(4)
    c, r = c / 3, r / 3  # average log-probs
    nll = -c
    out = pref.orpo_loss(c, r, nll, lam=lam)
    for i in range(len(c)):
        pw, pl = math.exp(float(c[i])), math.exp(float(r[i]))
        lor = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        want = -float(c[i]) - lam * _logsig(lor)
        assert float(out.losses[i]) == pytest.approx(want, abs=1e-11)


def test_kto_closed_form_and_mean_over_all_completions():
    logp, ref, _, _ = _batch(5, B=6)
    desirable = torch.tensor([True, False, True, True, False, False])
    z0 = torch.tensor(0.3, dtype=D)
    out = pref.kto_loss(logp, ref, desirable, z0, beta=0.5, w_desirable=1.3, w_undesirable=0.8)
    want = []
    for i in range(6):
        rr = float(logp[i]) - float(ref[i])
        want.append(1.3 * (1 - _sig(0.5 * (rr - 0.3))) if desirable[i] else 0.8 * (1 - _sig(0.5 * (0.3 - rr))))
    assert torch.allclose(out.losses, torch.tensor(want, dtype=D), atol=1e-13)
    assert float(out.loss) == pytest.approx(sum(want) / 6, abs=1e-13)
    assert out.chosen_rewards.shape == (3,) and out.rejected_rewards.shape == (3,)
    assert not out.paired and "kto/kl" in out.metrics()
    with pytest.raises(ValueError, match="not paired"):
        _ = out.accuracy


def test_metrics_never_nan_when_one_side_is_empty():
    logp = torch.tensor([-1.0, -2.0], dtype=D)
    m = pref.kto_loss(logp, logp - 0.5, torch.tensor([True, True]), 0.0).metrics()
    assert all(math.isfinite(v) for v in m.values()) and "reward/rejected" not in m and "reward/margin" not in m
    assert "reward/chosen" in m


def test_kto_reference_point_is_clamped_and_detached():
    a = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    assert float(pref.kto_reference_point(a, a.detach() + 1.0)) == 0.0  # mean log-ratio -1 -> clamped to 0
    z = pref.kto_reference_point(a, a.detach() - torch.tensor([0.5, 1.5], dtype=D))
    assert float(z) == pytest.approx(1.0) and not z.requires_grad
    # kto_loss detaches kl_ref itself too: no gradient reaches it
    logp = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    kl = torch.tensor(0.4, dtype=D, requires_grad=True)
    out = pref.kto_loss(logp, torch.tensor([-1.5, -1.5], dtype=D), torch.tensor([True, False]), kl)
    gl, gk = torch.autograd.grad(out.loss, (logp, kl), allow_unused=True)
    assert gk is None and torch.isfinite(gl).all()
    # negative kl_ref acts as 0
    o1 = pref.kto_loss(logp, logp.detach(), torch.tensor([True, False]), -3.0).losses
    o2 = pref.kto_loss(logp, logp.detach(), torch.tensor([True, False]), 0.0).losses
    assert torch.equal(o1, o2)


# --------------------------------------------------------------------------- finite differences
def _fd_check(fn, *inputs):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_gradients_match_finite_differences():
    c, r, rc, rr = _batch(7)
    _fd_check(lambda a, b: pref.dpo_loss(a, b, rc, rr, beta=0.4, label_smoothing=0.1).losses, c, r)
    _fd_check(lambda a, b: pref.ipo_loss(a, b, rc, rr, tau=0.3).losses, c, r)
    _fd_check(lambda a, b: pref.simpo_loss(a / 3, b / 3, beta=2.0, gamma=0.5).losses, c, r)
    _fd_check(lambda a, b: pref.orpo_loss(a / 3, b / 3, -a / 3, lam=0.5).losses, c, r)
    d = torch.tensor([True, False, True, False, True])
    _fd_check(lambda a: pref.kto_loss(a, rc, d, 0.2, beta=0.5).losses, c)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    _fd_check(lambda t: pref.sequence_logprobs(t, mask, average=True), -torch.rand(2, 3, dtype=D))


# --------------------------------------------------------------------------- fixed points
def _minimise(loss_of_h, h0=0.0, steps=3000, lr=0.05):
    h = torch.tensor(h0, dtype=D, requires_grad=True)
    opt = torch.optim.Adam([h], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_of_h(h).backward()
        opt.step()
    return float(h.detach())


def _pair(h):
    """Sequence log-probs whose log-ratio difference is h (reference at 0)."""
    zero = torch.zeros(1, dtype=D)
    return h.reshape(1), zero, zero, zero


def test_fixed_points_in_h():
    beta = 0.5
    # soft labels p: beta h* = logit p, as a label-weighted DPO loss
    p = 0.8
    def soft(h):
        c, r, rc, rr = _pair(h)
        return p * pref.dpo_loss(c, r, rc, rr, beta=beta).loss + (1 - p) * pref.dpo_loss(r, c, rr, rc, beta=beta).loss
    assert _minimise(soft) == pytest.approx(math.log(p / (1 - p)) / beta, abs=1e-4)
    # cDPO with deterministic labels: sigma(beta h*) = 1 - eps
    eps = 0.1
    h_c = _minimise(lambda h: pref.dpo_loss(*_pair(h), beta=beta, label_smoothing=eps).loss)
    assert _sig(beta * h_c) == pytest.approx(1 - eps, abs=1e-5)
    # IPO with deterministic labels: h* = 1 / (2 tau); soft labels: (2p - 1) / (2 tau)
    tau = 0.25
    assert _minimise(lambda h: pref.ipo_loss(*_pair(h), tau=tau).loss) == pytest.approx(1 / (2 * tau), abs=1e-5)
    def ipo_soft(h):
        c, r, rc, rr = _pair(h)
        return p * pref.ipo_loss(c, r, rc, rr, tau=tau).loss + (1 - p) * pref.ipo_loss(r, c, rr, rc, tau=tau).loss
    assert _minimise(ipo_soft) == pytest.approx((2 * p - 1) / (2 * tau), abs=1e-5)


def test_dpo_with_deterministic_labels_has_no_fixed_point():
    beta = 0.5
    hs = []
    h = torch.tensor(0.0, dtype=D, requires_grad=True)
    opt = torch.optim.SGD([h], lr=1.0)
    for step in range(1, 20001):
        opt.zero_grad()
        loss = pref.dpo_loss(*_pair(h), beta=beta).loss
        loss.backward()
        assert float(h.grad) < 0  # always pushes h up
        opt.step()
        if step in (100, 1000, 10000, 20000):
            hs.append(float(h.detach()))
    assert hs == sorted(hs) and hs[-1] - hs[-2] > 0.5  # still growing (like log t / beta)


# --------------------------------------------------------------------------- input checks
def test_errors():
    c, r, rc, rr = _batch(0)
    with pytest.raises(ValueError, match="beta"):
        pref.dpo_loss(c, r, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        pref.dpo_loss(c, r, rc, rr, beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        pref.dpo_loss(c, r, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="shape"):
        pref.dpo_loss(c, r[:3], rc, rr)
    with pytest.raises(ValueError, match="empty"):
        e = torch.zeros(0, dtype=D)
        pref.dpo_loss(e, e, e, e)
    with pytest.raises(ValueError, match="NaN"):
        pref.dpo_loss(c, r, rc, torch.full_like(rr, float("nan")))
    with pytest.raises(ValueError, match="1-D"):
        pref.dpo_loss(c[:, None], r, rc, rr)
    with pytest.raises(ValueError, match="tau"):
        pref.ipo_loss(c, r, rc, rr, tau=0.0)
    with pytest.raises(ValueError, match="gamma"):
        pref.simpo_loss(c, r, gamma=-0.1)
    with pytest.raises(ValueError, match="<= 0"):
        pref.orpo_loss(c, -r, -c)
    with pytest.raises(ValueError, match="lam"):
        pref.orpo_loss(c, r, -c, lam=-1.0)
    with pytest.raises(ValueError, match="bool"):
        pref.kto_loss(c, rc, torch.ones(5), 0.0)
    with pytest.raises(ValueError, match="w_desirable"):
        pref.kto_loss(c, rc, torch.ones(5, dtype=torch.bool), 0.0, w_desirable=0.0)
    with pytest.raises(ValueError, match="kl_ref"):
        pref.kto_loss(c, rc, torch.ones(5, dtype=torch.bool), float("nan"))
