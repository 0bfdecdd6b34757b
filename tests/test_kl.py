"""Tests for rlbook_code.kl against closed forms, enumeration and Schulman's published table."""

import math

import pytest
import torch

from rlbook_code.kl import MAX_LOG_RATIO, kl_k1, kl_k2, kl_k3

torch.set_num_threads(2)
F64 = torch.float64


def test_k3_closed_form_exp_minus_one():
    # logp = 1, ref_logp = 0  ->  log r = -1, r = e^-1, k3 = e^-1 - 1 + 1 = e^-1
    for dtype in (torch.float32, F64):
        got = kl_k3(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
        assert got.item() == torch.tensor(math.exp(-1.0), dtype=dtype).item()


def test_closed_forms_elementwise():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=F64)
    ref = torch.tensor([-1.5, -1.0, -0.5, -0.25], dtype=F64)
    lr = ref - logp
    assert torch.equal(kl_k1(logp, ref), -lr)
    assert torch.allclose(kl_k2(logp, ref), 0.5 * lr**2, rtol=0, atol=1e-15)
    expected = torch.tensor([math.exp(x) - 1 - x for x in lr.tolist()], dtype=F64)
    assert torch.allclose(kl_k3(logp, ref), expected, rtol=1e-14, atol=1e-15)
    assert kl_k3(logp, ref)[2].item() == 0.0  # equal policies -> exactly 0


def test_k3_nonnegative_and_stable():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(10_000, generator=g) * 10
    ref = torch.randn(10_000, generator=g) * 10
    k3 = kl_k3(logp, ref)
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert (kl_k2(logp, ref) >= 0).all()
    # tiny log-ratios: expm1 form keeps ~ the right value, never negative
    tiny = torch.tensor([1e-4, -1e-4, 1e-7, 0.0])
    got = kl_k3(torch.zeros(4), tiny)
    assert (got >= 0).all()
    assert torch.allclose(got.double(), tiny.double() ** 2 / 2, rtol=5e-3, atol=1e-12)


def test_k3_clamp_bound_documented():
    big = torch.tensor([1000.0, -1000.0], dtype=F64)
    got = kl_k3(torch.zeros(2, dtype=F64), big)
    m = MAX_LOG_RATIO
    assert torch.allclose(got, torch.tensor([math.expm1(m) - m, math.expm1(-m) + m], dtype=F64))
    # gradient is zero outside the bound, finite inside
    x = torch.tensor([0.0, 0.0], dtype=F64, requires_grad=True)
    kl_k3(x, torch.tensor([1000.0, 0.5], dtype=F64)).sum().backward()
    assert x.grad[0].item() == 0.0 and math.isfinite(x.grad[1].item())
    assert kl_k3(torch.zeros(1), torch.tensor([3.0]), max_log_ratio=1.0).item() == pytest.approx(math.e - 2, rel=1e-6)


def _random_categoricals(seed, V, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(V, generator=g, dtype=dtype) * 1.5, -1)
    ref = torch.log_softmax(torch.randn(V, generator=g, dtype=dtype) * 1.5, -1)
    return logp, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_k3_unbiased_by_enumeration(seed):
    logp, ref = _random_categoricals(seed, V=7)
    p = logp.exp()
    true_kl = (p * (logp - ref)).sum()  # KL(pi || pi_ref), independent formula
    assert torch.allclose((p * kl_k1(logp, ref)).sum(), true_kl, atol=1e-12)
    assert torch.allclose((p * kl_k3(logp, ref)).sum(), true_kl, atol=1e-12)
    # k2 is biased in general
    assert abs((p * kl_k2(logp, ref)).sum() - true_kl) > 1e-6
    # the inverted ratio estimates chi^2(pi||pi_ref) - KL(pi||pi_ref), not a KL
    chi2 = ((p - ref.exp()) ** 2 / ref.exp()).sum()
    inverted = (p * kl_k3(ref, logp)).sum()
    assert torch.allclose(inverted, chi2 - true_kl, atol=1e-12)


def test_k1_k3_unbiased_by_sampling():
    logp, ref = _random_categoricals(3, V=5)
    g = torch.Generator().manual_seed(1)
    y = torch.multinomial(logp.exp(), 400_000, replacement=True, generator=g)
    true_kl = (logp.exp() * (logp - ref)).sum().item()
    for fn in (kl_k1, kl_k3):
        vals = fn(logp[y], ref[y])
        se = vals.std().item() / math.sqrt(len(y))
        assert abs(vals.mean().item() - true_kl) < 5 * se


# Schulman, "Approximating KL Divergence" (2020): q = N(0,1) samples, p = N(mu,1) reference.
# In our notation pi = q (sampling policy), pi_ref = p; true KL[q, p] = mu^2 / 2.
PUBLISHED = {
    0.1: {"true": 0.005, "k1": (0.0, 20.0), "k2": (0.002, 1.42), "k3": (0.0, 1.42)},
    1.0: {"true": 0.5, "k1": (0.0, 2.0), "k2": (0.25, 1.73), "k3": (0.0, 1.7)},
}


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_schulman_table(mu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000_000, generator=g, dtype=F64)
    logq = -0.5 * x**2  # common constant cancels in the ratio
    logp = -0.5 * (x - mu) ** 2
    true_kl = mu**2 / 2
    assert PUBLISHED[mu]["true"] == pytest.approx(true_kl)
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        vals = fn(logq, logp)
        bias = (vals.mean().item() - true_kl) / true_kl
        std = vals.std().item() / true_kl
        pub_bias, pub_std = PUBLISHED[mu][name]
        assert abs(bias - pub_bias) < 0.02, (mu, name, bias)
        assert abs(std - pub_std) <= 0.02 * max(1.0, pub_std), (mu, name, std)
    # exact closed form of the k2 bias: E[k2]/KL - 1 = mu^2 / 4
    k2_bias = kl_k2(logq, logp).mean().item() / true_kl - 1
    assert k2_bias == pytest.approx(mu**2 / 4, abs=0.01)


def test_bad_inputs():
    a = torch.zeros(2, 3)
    for fn in (kl_k1, kl_k2, kl_k3):
        with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
            fn(a, torch.zeros(3, 2))
        with pytest.raises(ValueError, match="floating"):
            fn(a.long(), a.long())
        with pytest.raises(ValueError):
            fn(a, [[0.0] * 3] * 2)
    with pytest.raises(ValueError):
        kl_k3(a, a, max_log_ratio=-1.0)


def test_gradients_as_losses_by_enumeration():
    """E_pi[grad k2] = grad KL(pi||ref); E_pi[grad k3] = grad KL(ref||pi); E_pi[grad k1] = 0."""
    theta = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(5)), -1)
    logp = torch.log_softmax(theta, -1)
    p = logp.exp().detach()

    def expected_grad(fn):
        (gr,) = torch.autograd.grad((p * fn(logp, ref)).sum(), theta, retain_graph=True)
        return gr

    (g_rev,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta, retain_graph=True)
    (g_fwd,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta, retain_graph=True)
    assert torch.allclose(expected_grad(kl_k1), torch.zeros(6, dtype=F64), atol=1e-12)
    assert torch.allclose(expected_grad(kl_k2), g_rev, atol=1e-12)
    assert torch.allclose(expected_grad(kl_k3), g_fwd, atol=1e-12)


def test_parity_with_trl_and_verl_formulas():
    """Same direction and value as the field's reference implementations (formulas written out).

    TRL GRPOTrainer: per_token_kl = exp(ref - logp) - (ref - logp) - 1.
    verl core_algos.kl_penalty "low_var_kl"/"k3": kl = clamp(ref - logp, -20, 20);
    kld = clamp(exp(kl) - kl - 1, -10, 10); "kl"/"k1": logp - ref; "mse"/"k2": 0.5 (logp - ref)^2.
    """
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(64, 16, dtype=F64, generator=g) * 6
    ref = -torch.rand(64, 16, dtype=F64, generator=g) * 6
    trl_k3 = torch.exp(ref - logp) - (ref - logp) - 1
    kl = torch.clamp(ref - logp, -20, 20)
    verl_k3 = torch.clamp(torch.exp(kl) - kl - 1, -10, 10)
    ours = kl_k3(logp, ref)
    assert torch.allclose(ours, trl_k3, rtol=1e-12, atol=1e-12)
    small = verl_k3 < 10  # verl additionally caps the value at 10
    assert torch.allclose(ours[small], verl_k3[small], rtol=1e-12, atol=1e-12)
    assert torch.equal(kl_k1(logp, ref), logp - ref)
    assert torch.allclose(kl_k2(logp, ref), 0.5 * (logp - ref).square(), rtol=0, atol=1e-15)
    assert MAX_LOG_RATIO == 20.0  # the same log-ratio clamp as verl
