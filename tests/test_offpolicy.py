"""Tests of rlbook_code.offpolicy: importance weights against a float64 loop (both levels, both
modes, ragged masks), decoupled PPO = PPO when prox = behav, exact gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from rlbook_code.clipping import ppo_clip_loss
from rlbook_code.offpolicy import decoupled_ppo_loss, importance_weights

torch.set_num_threads(1)
D = torch.float64


def ragged(B=5, T=6, seed=0, dtype=torch.float32, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    behav = logp + scale * torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.tensor([T, 1, 3, T - 1, 2][:B])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    # garbage where the mask is False must not matter
    logp = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    behav = torch.where(mask, behav, torch.full_like(behav, float("inf")))
    return logp, behav, mask


def reference(logp, behav, mask, level, mode, low, high):
    """A float64 loop over sequences and tokens, written from the definitions."""
    B, T = mask.shape
    w = torch.zeros(B, T, dtype=D)
    units, changed, logs = [], 0, []
    k3, ntok = 0.0, 0
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        lr = [float(logp[b, t]) - float(behav[b, t]) for t in toks]
        for x in lr:
            k3 += math.exp(x) - 1 - x
            ntok += 1
        if level == "token":
            groups = [([t], x) for t, x in zip(toks, lr)]
        else:
            groups = [(toks, sum(lr))] if toks else []
        for ts, x in groups:
            rho = math.exp(x)
            lo = 0.0 if low is None else low
            hit = rho > high or rho < lo
            if mode == "truncate":
                val = min(max(rho, lo), high)
            else:
                val = 0.0 if hit else rho
            for t in ts:
                w[b, t] = val
            units.append(rho)
            logs.append(abs(x))
            changed += hit
    n = len(units)
    ess = sum(units) ** 2 / (n * sum(u * u for u in units))
    frac = changed / n
    return w, {"ess": ess, "truncated_frac": frac if mode == "truncate" else 0.0,
               "masked_frac": frac if mode == "mask" else 0.0, "max_abs_log_ratio": max(logs),
               "kl_behav": k3 / ntok, "weight_mean": float(w.sum()) / ntok}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("low, high", [(None, 2.0), (0.5, 2.0), (None, 1.0), (0.8, 1.25)])
def test_weights_match_float64_loop(level, mode, low, high):
    logp, behav, mask = ragged(dtype=D)
    w, diag = importance_weights(logp, behav, mask, level=level, mode=mode, low=low, high=high)
    w_ref, diag_ref = reference(logp, behav, mask, level, mode, low, high)
    assert w.dtype == D
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    assert diag.keys() == diag_ref.keys()
    for k in diag:
        assert diag[k] == pytest.approx(diag_ref[k], rel=1e-9, abs=1e-12), k


def test_float32_agrees_with_float64():
    logp, behav, mask = ragged(dtype=torch.float32)
    w32, d32 = importance_weights(logp, behav, mask, level="sequence", mode="truncate", high=3.0)
    w64, d64 = importance_weights(logp.double(), behav.double(), mask, level="sequence", mode="truncate", high=3.0)
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), w64, rtol=1e-5, atol=1e-6)
    assert d32["ess"] == pytest.approx(d64["ess"], rel=1e-5)


def test_sequence_weight_is_the_product_on_every_token():
    logp, behav, mask = ragged(dtype=D)
    w, _ = importance_weights(logp, behav, mask, level="sequence", mode="truncate", high=1e6)
    for b in range(mask.shape[0]):
        prod = math.prod(math.exp(float(logp[b, t] - behav[b, t])) for t in range(mask.shape[1]) if mask[b, t])
        assert torch.allclose(w[b][mask[b]], torch.full((int(mask[b].sum()),), prod, dtype=D))
        assert (w[b][~mask[b]] == 0).all()


def test_on_policy_weights_are_one():
    logp, _, mask = ragged()
    w, diag = importance_weights(logp, logp.clone(), mask, mode="mask", low=0.5, high=2.0)
    assert torch.equal(w, mask.float())
    assert diag["ess"] == 1.0 and diag["masked_frac"] == 0.0 and diag["max_abs_log_ratio"] == 0.0
    assert diag["kl_behav"] == 0.0


def test_weights_are_detached():
    logp, behav, mask = ragged(dtype=D)
    x = torch.where(mask, logp, 0.0).requires_grad_(True)
    w, _ = importance_weights(x, behav, mask)
    assert not w.requires_grad


def test_importance_weighting_is_unbiased_by_enumeration():
    # one token from a 4-way categorical: E_mu[rho f] = E_pi[f] exactly
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D)
    mu = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=D)
    f = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=D)
    mask = torch.ones(4, 1, dtype=torch.bool)
    w, diag = importance_weights(pi.log()[:, None], mu.log()[:, None], mask, high=1e9)
    assert float((mu * w[:, 0] * f).sum()) == pytest.approx(float((pi * f).sum()), rel=1e-12)
    # the population ESS is 1 / E_mu[rho^2]; the diagnostics' ESS is the sample version over the 4 tokens
    assert diag["kl_behav"] == pytest.approx(float(((pi / mu) - 1 - (pi / mu).log()).mean()), rel=1e-12)


@pytest.mark.parametrize("kw, match", [
    (dict(high=0.0), "high must be"),
    (dict(high=float("nan")), "high must be"),
    (dict(low=2.0, high=2.0), "low must be"),
    (dict(low=-0.1), "low must be"),
    (dict(level="seq"), "level must be"),
    (dict(mode="clip"), "mode must be"),
])
def test_bad_hyperparameters(kw, match):
    logp, behav, mask = ragged()
    with pytest.raises(ValueError, match=match):
        importance_weights(logp, behav, mask, **kw)


def test_bad_inputs():
    logp, behav, mask = ragged()
    with pytest.raises(ValueError, match="shape of logp"):
        importance_weights(logp, behav[:, :3], mask)
    with pytest.raises(ValueError, match="bool"):
        importance_weights(logp, behav, mask.long())
    with pytest.raises(ValueError, match="no response token"):
        importance_weights(logp, behav, torch.zeros_like(mask))
    bad = behav.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        importance_weights(logp, bad, mask)


# ----------------------------------------------------------------------------- decoupled PPO
def test_decoupled_equals_ppo_when_prox_is_behav():
    logp, behav, mask = ragged()
    logp = torch.where(mask, logp, 0.0)
    adv = torch.randn(mask.shape[0], generator=torch.Generator().manual_seed(1))
    cur = (logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    prox = torch.where(mask, behav, 0.0)
    l1, m1 = decoupled_ppo_loss(cur, prox, prox.clone(), adv, mask, eps_low=0.2, eps_high=0.28)
    (g1,) = torch.autograd.grad(l1.sum(), cur)
    l2, m2 = ppo_clip_loss(cur, prox, adv, mask, eps_low=0.2, eps_high=0.28)
    (g2,) = torch.autograd.grad(l2.sum(), cur)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert {k: m1[k] for k in m2} == m2
    assert m1["behav_weight_mean"] == 1.0 and m1["behav_dropped_frac"] == 0.0


def test_decoupled_hand_values_and_cap():
    # two tokens: w = prox/behav = 2 (kept) and 8 (dropped by the cap 5); r = pi/prox = 1.1 inside the clip
    logp = torch.tensor([[math.log(1.1 * 0.2), math.log(1.1 * 0.4)]], dtype=D, requires_grad=True)
    prox = torch.tensor([[math.log(0.2), math.log(0.4)]], dtype=D)
    behav = torch.tensor([[math.log(0.1), math.log(0.05)]], dtype=D)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = decoupled_ppo_loss(logp, prox, behav, torch.tensor([1.5], dtype=D), mask, max_behav_weight=5.0)
    assert loss[0, 0].item() == pytest.approx(-2.0 * 1.1 * 1.5, rel=1e-12)
    assert loss[0, 1].item() == 0.0
    (g,) = torch.autograd.grad(loss.sum(), logp)
    assert g[0, 0].item() == pytest.approx(-2.0 * 1.1 * 1.5, rel=1e-12)  # d(-w r A)/dlogp = -w r A
    assert g[0, 1].item() == 0.0
    assert m["behav_dropped_frac"] == 0.5 and m["behav_weight_mean"] == pytest.approx(1.0)
    loss2, m2 = decoupled_ppo_loss(logp, prox, behav, torch.tensor([1.5], dtype=D), mask, max_behav_weight=None)
    assert loss2[0, 1].item() == pytest.approx(-8.0 * 1.1 * 1.5, rel=1e-12) and m2["behav_dropped_frac"] == 0.0


def test_decoupled_bad_cap():
    logp, behav, mask = ragged()
    with pytest.raises(ValueError, match="max_behav_weight"):
        decoupled_ppo_loss(torch.where(mask, logp, 0.0), behav, behav, torch.zeros(5), mask, max_behav_weight=0.0)
