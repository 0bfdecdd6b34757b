"""Tests for rlbook_code.logprobs against torch.log_softmax + gather and float64 loops."""

import math

import pytest
import torch

from rlbook_code.logprobs import entropy_from_logits, masked_mean, masked_sum, token_logprobs

torch.set_num_threads(2)
F64 = torch.float64


def _naive(logits, tokens, temperature=1.0):
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def _data(B=3, T=5, V=11, dtype=F64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=F64) * scale).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return logits, tokens


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_matches_log_softmax_gather_float64(chunk_size, temperature):
    logits, tokens = _data()
    got = token_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk_size)
    assert got.dtype == F64 and got.shape == (3, 5)
    assert torch.allclose(got, _naive(logits, tokens, temperature), rtol=0, atol=1e-13)


def test_matches_python_loop_reference():
    logits, tokens = _data(B=2, T=3, V=6)
    ref = torch.empty(2, 3, dtype=F64)
    for b in range(2):
        for t in range(3):
            row = [x / 0.8 for x in logits[b, t].tolist()]
            m = max(row)
            ref[b, t] = row[tokens[b, t]] - (m + math.log(sum(math.exp(x - m) for x in row)))
    assert torch.allclose(token_logprobs(logits, tokens, 0.8, 2), ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_computed_in_float32(dtype):
    logits, tokens = _data(dtype=dtype)
    got = token_logprobs(logits, tokens, temperature=0.7, chunk_size=4)
    assert got.dtype == torch.float32
    ref = _naive(logits.double(), tokens, 0.7).float()  # same rounded inputs, exact math
    assert torch.allclose(got, ref, rtol=0, atol=2e-5)


def test_large_logits_no_overflow():
    logits = torch.tensor([[[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4 + 1]]])
    tokens = torch.tensor([[2, 0]])
    got = token_logprobs(logits, tokens)
    assert torch.isfinite(got).all()
    assert got[0, 0].item() == -2000.0
    assert got[0, 1].item() == pytest.approx(-1 - math.log(1 + 2 / math.e), abs=1e-6)
    ref = _naive(logits.double(), tokens).float()
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gradients_equal_naive(chunk_size, temperature):
    logits, tokens = _data()
    w = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(9))
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    (token_logprobs(a, tokens, temperature, chunk_size) * w).sum().backward()
    (_naive(b, tokens, temperature) * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-13)
    x = logits[:1, :2, :5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tokens[:1, :2] % 5, temperature, 1), (x,))


def test_gradients_bf16_float32():
    logits, tokens = _data(dtype=torch.float32)
    a = logits.to(torch.bfloat16).requires_grad_(True)
    token_logprobs(a, tokens, chunk_size=2).sum().backward()
    assert a.grad.dtype == torch.bfloat16
    b = logits.to(torch.bfloat16).float().requires_grad_(True)
    _naive(b, tokens).sum().backward()
    assert torch.allclose(a.grad.float(), b.grad, atol=1e-2)


def test_leading_dims_and_int32_tokens():
    logits, tokens = _data()
    got = token_logprobs(logits[0], tokens[0].int())  # (T, V), (T,)
    assert torch.allclose(got, _naive(logits[0], tokens[0]), atol=1e-13)
    empty = token_logprobs(torch.zeros(0, 4, 5), torch.zeros(0, 4, dtype=torch.long))
    assert empty.shape == (0, 4)


def test_bad_inputs():
    logits, tokens = _data()
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 4\)"):
        token_logprobs(logits, tokens[:, :4])
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, tokens.double())
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, tokens.bool())
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        token_logprobs(logits, tokens + 11)
    with pytest.raises(ValueError, match="dtype"):
        token_logprobs(logits.long(), tokens)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        token_logprobs(logits[0, 0], tokens[0, 0])
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, tokens, temperature=bad_t)
    for bad_c in (0, -2, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            token_logprobs(logits, tokens, chunk_size=bad_c)
    with pytest.raises(ValueError):
        entropy_from_logits(logits, temperature=0.0)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_entropy(chunk_size):
    logits, _ = _data()
    got = entropy_from_logits(logits, temperature=0.9, chunk_size=chunk_size)
    p = torch.softmax(logits / 0.9, -1)
    ref = -(p * torch.log(p)).sum(-1)
    assert got.shape == (3, 5) and torch.allclose(got, ref, atol=1e-13)
    uniform = entropy_from_logits(torch.zeros(2, 2, 7))
    assert torch.allclose(uniform, torch.full((2, 2), math.log(7)))
    one_hot = entropy_from_logits(torch.tensor([[[0.0, -math.inf, -math.inf]]]))
    assert one_hot.item() == 0.0
    assert entropy_from_logits(logits.to(torch.bfloat16)).dtype == torch.float32


def test_masked_sum_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[True, True, False], [True, False, True], [False, False, False]])
    assert torch.equal(masked_sum(x, m, dim=1), torch.tensor([3.0, 10.0, 0.0]))
    assert torch.equal(masked_mean(x, m, dim=1), torch.tensor([1.5, 5.0, 0.0]))  # all-masked row -> 0
    assert masked_sum(x, m).item() == 13.0
    assert masked_mean(x, m).item() == 13.0 / 4
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    assert torch.equal(masked_mean(x, m, dim=0), torch.tensor([2.5, 2.0, 6.0]))
    y = x.nan_to_num(0.0, 0.0).requires_grad_(True)
    masked_mean(y, m, dim=1).sum().backward()
    assert torch.equal(y.grad, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]))


def test_masked_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="bool"):
        masked_sum(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        masked_mean(x, torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shifted_strided_view(chunk_size, temperature):
    """logits[:, :-1] with input_ids[:, 1:] (the shift) is a strided view: same values, same grads."""
    logits, ids = _data(B=3, T=6, V=9)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = token_logprobs(a[:, :-1], ids[:, 1:], temperature, chunk_size)
    ref = _naive(b[:, :-1], ids[:, 1:], temperature)
    assert got.shape == (3, 5) and torch.allclose(got, ref, rtol=0, atol=1e-13)
    w = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    (got * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-13)
    assert (a.grad[:, -1] == 0).all()
    bf = logits.to(torch.bfloat16)
    assert torch.allclose(
        token_logprobs(bf[:, 1:], ids[:, :-1], temperature, chunk_size),
        _naive(bf[:, 1:].double(), ids[:, :-1], temperature).float(), atol=2e-5)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4, 7])
def test_entropy_strided_and_chunked(chunk_size):
    logits, _ = _data(B=3, T=6, V=9)
    p = torch.softmax(logits[:, :-1] / 0.8, -1)
    ref = -(p * p.log()).sum(-1)
    got = entropy_from_logits(logits[:, :-1], 0.8, chunk_size=chunk_size)
    assert got.shape == (3, 5) and torch.allclose(got, ref, atol=1e-13)
    assert torch.allclose(entropy_from_logits(logits, 0.8, chunk_size), -(torch.softmax(logits / 0.8, -1) * torch.log_softmax(logits / 0.8, -1)).sum(-1), atol=1e-13)
