"""Tests of rlbook_code.aggregation: hand sums per mode, micro-batch invariance of gradients."""

from __future__ import annotations

import pytest
import torch

from rlbook_code.aggregation import MODES, aggregate

torch.set_num_threads(2)
D = torch.float64

# Two sequences: lengths 1 and 3 (padded to T = 4).
L = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, float("nan")]], dtype=D)
M = torch.tensor([[True, False, False, False], [True, True, True, False]])


@pytest.mark.parametrize(
    "mode, kw, want",
    [
        ("token-mean", {}, (2 + 1 + 2 + 3) / 4),
        ("seq-mean-token-mean", {}, (2 / 1 + 6 / 3) / 2),
        ("seq-mean-token-sum", {}, (2 + 6) / 2),
        ("seq-mean-token-sum-norm", {"max_len": 8}, (2 + 6) / (2 * 8)),
        ("token-mean", {"num_tokens": 10}, 8 / 10),
        ("seq-mean-token-mean", {"num_seqs": 4}, 4 / 4),
        ("seq-mean-token-sum", {"num_seqs": 5}, 8 / 5),
        ("seq-mean-token-sum-norm", {"max_len": 4, "num_seqs": 4}, 8 / 16),
    ],
)
def test_hand_sums(mode, kw, want):
    got = aggregate(L, M, mode, **kw)
    assert got.dim() == 0 and got.dtype == D
    assert got.item() == pytest.approx(want, rel=1e-15)


def test_irrelevant_count_is_ignored():
    assert aggregate(L, M, "token-mean", num_seqs=7).item() == pytest.approx(2.0)
    assert aggregate(L, M, "seq-mean-token-sum", num_tokens=99).item() == pytest.approx(4.0)
    assert aggregate(L, M, "seq-mean-token-mean", max_len=3).item() == pytest.approx(2.0)


def test_per_token_gradient_weights():
    """d aggregate / d loss_{i,t} is the per-token weight stated in the docstring."""
    B, T = 3, 6
    lengths = torch.tensor([1, 3, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    x = torch.zeros(B, T, dtype=D, requires_grad=True)
    n_tok = int(lengths.sum())
    expected = {
        "token-mean": torch.full((B,), 1.0 / n_tok, dtype=D),
        "seq-mean-token-mean": 1.0 / (B * lengths.to(D)),
        "seq-mean-token-sum": torch.full((B,), 1.0 / B, dtype=D),
        "seq-mean-token-sum-norm": torch.full((B,), 1.0 / (B * 8), dtype=D),
    }
    for mode in MODES:
        (g,) = torch.autograd.grad(aggregate(x, mask, mode, max_len=8), x)
        want = torch.where(mask, expected[mode][:, None].expand(B, T), torch.zeros(B, T, dtype=D))
        torch.testing.assert_close(g, want, rtol=1e-15, atol=0)


def _toy_model_loss(w, feats, mask):
    """A differentiable per-token loss depending on parameters w: (B, T)."""
    return torch.tanh(feats @ w) * (1 + feats[..., 0])


@pytest.mark.parametrize("mode", MODES)
def test_gradient_accumulation_equals_full_batch(mode):
    """Micro-batches with different lengths and padded widths, global counts, summed losses."""
    gen = torch.Generator().manual_seed(0)
    B, T, F = 10, 9, 4
    feats = torch.randn(B, T, F, generator=gen, dtype=D)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    w = torch.randn(F, generator=gen, dtype=D, requires_grad=True)
    kw = {"max_len": T}

    full = aggregate(_toy_model_loss(w, feats, mask), mask, mode, **kw)
    (g_full,) = torch.autograd.grad(full, w)

    n_tok, n_seq = int(mask.sum()), B
    total = torch.zeros((), dtype=D)
    w.grad = None
    for idx in ([0, 1, 2], [3], [4, 5, 6, 7], [8, 9]):
        sub_mask = mask[idx]
        width = int(sub_mask.sum(1).max())  # each micro-batch padded to its own width
        sub_mask = sub_mask[:, :width]
        sub = _toy_model_loss(w, feats[idx, :width], sub_mask)
        part = aggregate(sub, sub_mask, mode, num_tokens=n_tok, num_seqs=n_seq, **kw)
        part.backward()
        total = total + part.detach()
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(w.grad, g_full, rtol=1e-12, atol=1e-14)


def test_averaging_local_token_means_is_wrong():
    """The pitfall the global count fixes: mean of micro-batch token-means != token-mean."""
    loss = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]], dtype=D)
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    full = aggregate(loss, mask, "token-mean").item()  # 13 / 5
    naive = 0.5 * (aggregate(loss[:1], mask[:1], "token-mean").item() + aggregate(loss[1:], mask[1:], "token-mean").item())
    fixed = sum(aggregate(loss[i : i + 1], mask[i : i + 1], "token-mean", num_tokens=5).item() for i in range(2))
    assert full == pytest.approx(13 / 5) and naive == pytest.approx(2.0) and fixed == pytest.approx(full)


def test_all_masked_is_zero_not_nan_and_keeps_graph():
    x = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for mode in MODES:
        out = aggregate(x, mask, mode, max_len=3)
        assert out.item() == 0.0 and out.requires_grad
        (g,) = torch.autograd.grad(out, x)
        assert (g == 0).all()
    assert aggregate(x, mask, "token-mean", num_tokens=5).item() == 0.0


def test_bad_input():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        aggregate(x, m, "mean")
    with pytest.raises(ValueError, match=r"expected \(2, 3\), got \(2, 4\)"):
        aggregate(x, torch.ones(2, 4, dtype=torch.bool), "token-mean")
    with pytest.raises(ValueError, match="bool"):
        aggregate(x, m.float(), "token-mean")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        aggregate(torch.zeros(3), torch.ones(3, dtype=torch.bool), "token-mean")
    with pytest.raises(ValueError, match="floating"):
        aggregate(torch.zeros(2, 3, dtype=torch.long), m, "token-mean")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, m, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"longest response \(3\)"):
        aggregate(x, m, "seq-mean-token-sum-norm", max_len=2)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(x, m, "token-mean", num_tokens=5)  # smaller than local 6
    with pytest.raises(ValueError, match="num_seqs"):
        aggregate(x, m, "seq-mean-token-mean", num_seqs=1)
