"""Tests of rlbook_code.advantages against float64 loops, hand values and enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlbook_code.advantages import gae, group_advantages, rloo_advantages, whiten

torch.set_num_threads(2)


# --------------------------------------------------------------------------- references
def ref_group(rewards: list[float], G: int, scale: str, eps: float) -> list[float]:
    """Plain-python float64 loop: group mean, Bessel std, as written in the docstring."""
    out = []
    allr = list(rewards)
    mb = sum(allr) / len(allr)
    std_batch = math.sqrt(sum((x - mb) ** 2 for x in allr) / (len(allr) - 1))
    for k in range(0, len(rewards), G):
        g = rewards[k : k + G]
        mean = sum(g) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (G - 1))
        for x in g:
            if max(g) == min(g):
                out.append(0.0)
            elif scale == "group":
                out.append((x - mean) / (std + eps))
            elif scale == "batch":
                out.append((x - mean) / (std_batch + eps))
            else:
                out.append(x - mean)
    return out


def ref_rloo(rewards: list[float], G: int) -> list[float]:
    out = []
    for k in range(0, len(rewards), G):
        g = rewards[k : k + G]
        for i in range(G):
            others = [g[j] for j in range(G) if j != i]
            out.append(g[i] - sum(others) / len(others))
    return out


def ref_gae(rewards, values, mask, gamma, lam):
    """Naive reversed loop per row over the list of unmasked positions, float64."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(T) if mask[b][t]]
        a_next, v_next = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b][t] + gamma * v_next - values[b][t]
            a = delta + gamma * lam * a_next
            adv[b][t], ret[b][t] = a, a + values[b][t]
            a_next, v_next = a, values[b][t]
    return adv, ret


# --------------------------------------------------------------------------- group_advantages
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [2, 3, 8])
def test_group_matches_float64_loop(scale, G):
    gen = torch.Generator().manual_seed(G)
    r = torch.randn(5 * G, generator=gen, dtype=torch.float64)
    r[:G] = 0.7  # one constant group
    got = group_advantages(r, G, scale=scale, eps=1e-6)
    want = torch.tensor(ref_group(r.tolist(), G, scale, 1e-6), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_zero_mean_per_group(scale):
    gen = torch.Generator().manual_seed(1)
    r = (torch.rand(64, generator=gen) < 0.4).float()
    a = group_advantages(r, 8, scale=scale).double().view(-1, 8)
    assert torch.allclose(a.sum(1), torch.zeros(8, dtype=torch.float64), atol=1e-5)


def test_group_hand_values_binary():
    # G = 4, rewards 1,0,0,0: mean 1/4, Bessel std sqrt(((3/4)^2 + 3 (1/4)^2)/3) = 1/2
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    got = group_advantages(r, 4, eps=0.0)
    torch.testing.assert_close(got, torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64))
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), r - 0.25)


def test_zero_variance_group_is_exactly_zero_never_nan():
    for value in (0.0, 1.0, 0.1, 1e-30):
        r = torch.full((6,), value)
        for scale in ("group", "batch", "none"):
            a = group_advantages(r, 3, scale=scale, eps=0.0)
            assert torch.equal(a, torch.zeros(6)), (value, scale)
        assert torch.equal(rloo_advantages(r, 3), torch.zeros(6))


def test_group_matches_torch_std_formula_as_in_trl_verl():
    # TRL: (r - mean) / (std + 1e-4), verl: (r - mean) / (std + 1e-6), torch.std (Bessel)
    gen = torch.Generator().manual_seed(3)
    r = torch.rand(32, generator=gen)
    g = r.view(-1, 4)
    for eps in (1e-4, 1e-6):
        want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)
        torch.testing.assert_close(group_advantages(r, 4, eps=eps), want)


def test_group_dtype_and_no_grad():
    r = torch.rand(8, requires_grad=True)
    a = group_advantages(r, 4)
    assert a.dtype == torch.float32 and not a.requires_grad
    assert group_advantages(r.detach().half(), 4).dtype == torch.float16


@pytest.mark.parametrize(
    "rewards, G",
    [
        (torch.rand(10), 4),  # does not divide
        (torch.rand(8), 1),  # group of one
        (torch.rand(8), 0),
        (torch.rand(2, 4), 4),  # not 1-D
        (torch.arange(8), 4),  # integer dtype
        (torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2),
        (torch.rand(0), 2),
    ],
)
def test_group_bad_input(rewards, G):
    with pytest.raises(ValueError):
        group_advantages(rewards, G)
    with pytest.raises(ValueError):
        rloo_advantages(rewards, G)


def test_group_bad_scale_and_message():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.rand(8), 4, scale="std")
    with pytest.raises(ValueError, match=r"\(10,\).*groups of size 4"):
        group_advantages(torch.rand(10), 4)


# --------------------------------------------------------------------------- RLOO
@pytest.mark.parametrize("G", [2, 3, 5, 8])
def test_rloo_matches_explicit_loop(G):
    gen = torch.Generator().manual_seed(10 + G)
    r = torch.randn(4 * G, generator=gen, dtype=torch.float64)
    want = torch.tensor(ref_rloo(r.tolist(), G), dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(r, G), want, rtol=1e-12, atol=1e-12)


def test_rloo_is_scaled_mean_baseline():
    gen = torch.Generator().manual_seed(0)
    G = 6
    r = torch.rand(3 * G, generator=gen, dtype=torch.float64)
    scaled = G / (G - 1) * group_advantages(r, G, scale="none")
    torch.testing.assert_close(rloo_advantages(r, G), scaled, rtol=1e-12, atol=1e-12)


def test_rloo_unbiased_mean_baseline_biased_by_enumeration():
    """Bernoulli 'policy' with reward = sample: exact expectation over all 2^G outcomes.

    Score function of the Bernoulli(p) log-likelihood w.r.t. its logit: y - p. The true
    gradient of E[r] = p w.r.t. the logit is p(1 - p). The leave-one-out estimator is unbiased;
    the mean-including one has expectation (G - 1)/G times the truth.
    """
    p, G = 0.3, 4
    true = p * (1 - p)
    e_loo = e_mean = 0.0
    for ys in itertools.product([0.0, 1.0], repeat=G):
        prob = math.prod(p if y else 1 - p for y in ys)
        r = torch.tensor(ys, dtype=torch.float64)
        score = r - p
        e_loo += prob * float((rloo_advantages(r, G) * score).mean())
        e_mean += prob * float((group_advantages(r, G, scale="none") * score).mean())
    assert e_loo == pytest.approx(true, rel=1e-12)
    assert e_mean == pytest.approx(true * (G - 1) / G, rel=1e-12)


# --------------------------------------------------------------------------- whiten
def test_whiten_matches_loop_and_bessel():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    m = torch.rand(5, 7, generator=gen) < 0.6
    vals = x[m].tolist()
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    want = torch.where(m, (x - mean) / math.sqrt(var + 1e-8), torch.zeros_like(x))
    torch.testing.assert_close(whiten(x, m), want, rtol=1e-12, atol=1e-12)
    want_keep = torch.where(m, want + mean, torch.zeros_like(x))
    torch.testing.assert_close(whiten(x, m, shift_mean=False), want_keep, rtol=1e-12, atol=1e-12)
    w = whiten(x, m)[m]
    assert abs(float(w.mean())) < 1e-12 and float(w.std()) == pytest.approx(1.0, abs=1e-6)


def test_whiten_ignores_masked_nan_and_constant_is_finite():
    x = torch.tensor([1.0, 2.0, float("nan"), 3.0])
    m = torch.tensor([True, True, False, True])
    out = whiten(x, m)
    assert torch.isfinite(out).all() and out[2] == 0
    c = whiten(torch.full((4,), 2.5), torch.ones(4, dtype=torch.bool))
    assert torch.isfinite(c).all() and c.abs().max() < 1e-3


def test_whiten_bad_input():
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match="bool"):
        whiten(x, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"expected \(3, 4\), got \(3, 5\)"):
        whiten(x, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.zeros(3, 4, dtype=torch.bool))


# --------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_naive_loop_random_masks(gamma, lam):
    gen = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    B, T = 6, 9
    r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, generator=gen, dtype=torch.float64)
    # random lengths with a prompt-like masked prefix, right padding, and holes in the middle
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, 3, (1,), generator=gen))
        length = int(torch.randint(1, T - start + 1, (1,), generator=gen))
        mask[b, start : start + length] = True
    mask[0, 4] = False
    mask[1] = False  # an all-masked row
    adv, ret = gae(r, v, mask, gamma, lam)
    want_a, want_r = ref_gae(r.tolist(), v.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(want_a, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(want_r, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_special_cases_hand_values():
    # outcome reward 1 on the last of 3 tokens
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.2, 0.4, 0.6]])
    m = torch.ones(1, 3, dtype=torch.bool)
    # lam = 1, gamma = 1: A_t = R - V_t (Monte Carlo), returns = 1 everywhere
    a, ret = gae(r, v, m, 1.0, 1.0)
    torch.testing.assert_close(a, torch.tensor([[0.8, 0.6, 0.4]]))
    torch.testing.assert_close(ret, torch.ones(1, 3))
    # lam = 0: one-step TD errors r_t + V_{t+1} - V_t
    a0, _ = gae(r, v, m, 1.0, 0.0)
    torch.testing.assert_close(a0, torch.tensor([[0.2, 0.2, 0.4]]))


def test_gae_ignores_nan_in_masked_positions():
    r = torch.tensor([[0.0, 1.0, float("nan")]])
    v = torch.tensor([[0.5, 0.5, float("inf")]])
    m = torch.tensor([[True, True, False]])
    a, ret = gae(r, v, m, 1.0, 1.0)
    assert torch.isfinite(a).all() and torch.isfinite(ret).all()
    torch.testing.assert_close(a, torch.tensor([[0.5, 0.5, 0.0]]))


def test_gae_bad_input():
    r = torch.rand(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(2, 3\), got \(2, 4\)"):
        gae(r, torch.rand(2, 4), m, 1.0, 1.0)
    with pytest.raises(ValueError, match="bool"):
        gae(r, r, m.float(), 1.0, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, m, 1.5, 1.0)
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, m, 1.0, -0.1)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(torch.rand(3), torch.rand(3), torch.ones(3, dtype=torch.bool), 1.0, 1.0)
