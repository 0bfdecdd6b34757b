"""Tests for rlbook_code.reinforce: exact gradient by enumerating every sequence, float64 sums."""

import itertools
import math

import pytest
import torch

from rlbook_code.reinforce import reinforce_loss

torch.set_num_threads(2)
F64 = torch.float64
V, T = 3, 3  # vocabulary and sequence length of the tiny autoregressive policy


def _policy_logprobs(theta, seqs):
    """theta (T, V+1, V): logits of token t given the previous token (index V = BOS).

    seqs (N, T) long -> per-token log-probs (N, T)."""
    prev = torch.cat([torch.full((seqs.shape[0], 1), V), seqs[:, :-1]], dim=1)  # (N, T)
    logits = theta[torch.arange(T)[None, :], prev]  # (N, T, V)
    return torch.log_softmax(logits, -1).gather(-1, seqs[..., None]).squeeze(-1)


def _reward(seqs):
    # number of tokens equal to 0, plus a bonus for the sequence (2, 1, 0)
    return (seqs == 0).sum(-1).to(F64) + 2.0 * (seqs == torch.tensor([2, 1, 0])).all(-1).to(F64)


def _setup():
    theta = (torch.randn(T, V + 1, V, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.7)
    all_seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (V^T, T)
    return theta, all_seqs


def _exact_gradient(theta, all_seqs):
    th = theta.clone().requires_grad_(True)
    probs = _policy_logprobs(th, all_seqs).sum(-1).exp()  # pi(y) for every y
    assert torch.allclose(probs.sum(), torch.tensor(1.0, dtype=F64))
    J = (probs * _reward(all_seqs)).sum()
    (grad,) = torch.autograd.grad(J, th)
    return J.item(), grad


def _sample(theta, n, gen):
    seqs = torch.empty(n, T, dtype=torch.long)
    prev = torch.full((n,), V)
    for t in range(T):
        p = torch.softmax(theta[t, prev], -1)
        seqs[:, t] = torch.multinomial(p, 1, generator=gen).squeeze(-1)
        prev = seqs[:, t]
    return seqs


@pytest.mark.parametrize("baseline", ["none", "constant", "mean"])
def test_mc_gradient_matches_enumeration(baseline):
    theta, all_seqs = _setup()
    J, exact = _exact_gradient(theta, all_seqs)
    n = 20_000
    seqs = _sample(theta, n, torch.Generator().manual_seed(1))
    R = _reward(seqs)
    b = {"none": 0.0, "constant": 1.0, "mean": J}[baseline]  # any y-independent baseline
    th = theta.clone().requires_grad_(True)
    logp = _policy_logprobs(th, seqs)
    mask = torch.ones(n, T, dtype=torch.bool)
    loss = reinforce_loss(logp, R - b, mask).sum() / n
    (grad,) = torch.autograd.grad(loss, th)
    est = -grad  # the loss is -J
    # per-sample gradients for the Monte-Carlo standard error
    per = torch.zeros(n, *theta.shape, dtype=F64)
    prev = torch.cat([torch.full((n, 1), V), seqs[:, :-1]], dim=1)
    for t in range(T):
        p = torch.softmax(theta[t, prev[:, t]], -1)  # (n, V)
        score = torch.nn.functional.one_hot(seqs[:, t], V).to(F64) - p
        per[torch.arange(n), t, prev[:, t]] += (R - b)[:, None] * score
    assert torch.allclose(per.mean(0), est, atol=1e-12)
    se = per.std(0) / math.sqrt(n)
    assert ((est - exact).abs() <= 5 * se + 1e-12).all()
    assert (est - exact).abs().max().item() < 0.05  # stated tolerance at this seed and N


def test_exact_equality_with_float64_hand_sum():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, dtype=F64, generator=g) * 3
    adv = torch.randn(4, dtype=F64, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    x = logp.clone().requires_grad_(True)
    loss = reinforce_loss(x, adv, mask)
    hand = torch.zeros(4, 6, dtype=F64)
    for i in range(4):
        for t in range(6):
            if mask[i, t]:
                hand[i, t] = -adv[i].item() * logp[i, t].item()
    assert torch.equal(loss.detach(), hand)
    loss.sum().backward()
    hand_grad = torch.tensor(
        [[-adv[i].item() if mask[i, t] else 0.0 for t in range(6)] for i in range(4)], dtype=F64
    )
    assert torch.equal(x.grad, hand_grad)


def test_per_token_advantages_and_detach():
    logp = -torch.rand(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = reinforce_loss(logp, adv, mask)
    assert torch.equal(loss.detach(), torch.where(mask, -adv.detach() * logp, torch.zeros((), dtype=F64)))
    assert not loss.requires_grad  # advantages are constants
    b = reinforce_loss(logp, torch.tensor([2.0, -1.0], dtype=F64), mask)
    assert torch.equal(b[0, :2], -2.0 * logp[0, :2]) and torch.equal(b[1], logp[1])


def test_masked_positions_exact_zero_even_if_nonfinite():
    logp = torch.tensor([[-1.0, -math.inf, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False, False]])
    loss = reinforce_loss(logp, torch.tensor([2.0]), mask)
    assert torch.equal(loss.detach(), torch.tensor([[2.0, 0.0, 0.0]]))
    loss.sum().backward()
    assert torch.equal(logp.grad, torch.tensor([[-2.0, 0.0, 0.0]]))


def test_bad_inputs():
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(2,\).*\(2, 3\).*\(3,\)"):
        reinforce_loss(logp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        reinforce_loss(logp, torch.zeros(2), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        reinforce_loss(logp, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="floating"):
        reinforce_loss(logp.long(), torch.zeros(2), mask)
    with pytest.raises(ValueError, match="floating"):
        reinforce_loss(logp, torch.zeros(2, dtype=torch.long), mask)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        reinforce_loss(torch.zeros(6), torch.zeros(6), torch.ones(6, dtype=torch.bool))
