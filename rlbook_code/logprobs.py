"""Per-token log-probabilities, entropies and masked reductions (chapter 02).

Conventions:

* ``logits[..., t, :]`` scores ``tokens[..., t]``. The caller does the *shift by one*:
  for a causal LM whose output at position ``i`` predicts the token at ``i + 1``,
  pass ``logits[:, :-1]`` with ``input_ids[:, 1:]``.
* ``temperature`` divides the logits before scoring, exactly as a sampler that drew
  tokens from ``softmax(logits / temperature)`` did.
* Arithmetic is float32 for float16/bfloat16/float32 logits and float64 for float64
  logits; the result has that dtype.
* Neither :func:`token_logprobs` nor :func:`entropy_from_logits` materializes a full
  ``(B, T, V)`` log-softmax: they compute ``logit[token] - logsumexp(logits)`` over
  blocks of ``chunk_size`` rows (all rows at once when ``chunk_size`` is None), and the
  backward pass of :func:`token_logprobs` recomputes the softmax block by block instead
  of saving it.
"""

from __future__ import annotations

import math

import torch

from rlbook_code._validate import check_mask

__all__ = ["token_logprobs", "entropy_from_logits", "masked_sum", "masked_mean"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_logits(logits: torch.Tensor, temperature: float, chunk_size: int | None) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (B, T, V) (at least 2 dims), got {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be float16/bfloat16/float32/float64, got dtype {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension V, got {tuple(logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if not (math.isfinite(float(temperature)) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def _row_blocks(n_rows: int, chunk_size: int | None):
    step = n_rows if chunk_size is None else chunk_size
    step = max(step, 1)
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _block_shifted_exp(
    x: torch.Tensor, shift: torch.Tensor, temperature: float, buf: torch.Tensor
) -> torch.Tensor:
    """exp(x / temperature - shift[..., None]) for a (..., V) block, computed in place in ``buf``.

    ``buf`` has the block's shape, in the compute dtype (a view of one buffer reused by every
    block, so its pages are touched once rather than once per block).
    """
    if temperature != 1.0 and x.dtype == buf.dtype:
        torch.div(x, temperature, out=buf)
    else:
        buf.copy_(x)  # casts bf16/fp16 to float32
        if temperature != 1.0:
            buf.div_(temperature)
    buf.sub_(shift[..., None])
    return buf.exp_()


def _block_rows(x3: torch.Tensor, chunk_size: int | None) -> int:
    G, R, _ = x3.shape
    return G * R if chunk_size is None else min(chunk_size, G * R)


def _block_buffer(x3: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """One flat buffer for the largest block, in the compute dtype."""
    n = _block_rows(x3, chunk_size)
    return torch.empty(n * x3.shape[2], dtype=_compute_dtype(x3.dtype), device=x3.device)


def _blocks(x3: torch.Tensor, chunk_size: int | None):
    """Blocks ``(g0, g1, s, e)`` of a (G, R, V) tensor, i.e. slices ``x3[g0:g1, s:e]``.

    Each block holds at most ``chunk_size`` rows: whole sequences ``g0:g1`` when a block
    can hold at least one sequence (``s, e = 0, R``), else part of one sequence.
    """
    G, R, _ = x3.shape
    n = _block_rows(x3, chunk_size)
    if n >= R:
        k = n // R
        for g0 in range(0, G, k):
            yield g0, min(g0 + k, G), 0, R
    else:
        for g in range(G):
            for s, e in _row_blocks(R, n):
                yield g, g + 1, s, e


def _view(buffer: torch.Tensor, k: int, n: int, V: int) -> torch.Tensor:
    return buffer[: k * n * V].view(k, n, V)


def _fused_path(dtype: torch.dtype, temperature: float) -> bool:
    """True when a block can go straight into torch's fused (log_)softmax kernel.

    That is when the logits are already in the compute dtype and the temperature is 1: the
    kernel then allocates exactly one (n, V) output block. Otherwise (bf16/fp16 logits or a
    temperature) a cast/scaled copy is needed, and the block is processed in place in that
    copy, again one (n, V) allocation.
    """
    return dtype == _compute_dtype(dtype) and temperature == 1.0


def _forward_blocks(x3: torch.Tensor, tok: torch.Tensor, temperature: float, chunk_size: int | None):
    """(G, R, V) logits, (G, R) tokens -> (logp, shift, logsum), each (G, R) in the compute dtype.

    Off the fused path, ``logsumexp(x / tau) = shift + logsum`` with ``shift`` the row max of
    ``x / tau``; the log-prob is formed as ``(x_tok / tau - shift) - logsum`` so that large
    logits (e.g. 1e4 in float32) do not lose precision to cancellation. On the fused path
    ``shift`` and ``logsum`` are not needed and are returned empty. No autograd.
    """
    cdtype = _compute_dtype(x3.dtype)
    G, R, V = x3.shape
    fused = _fused_path(x3.dtype, temperature)
    out = torch.empty(G, R, dtype=cdtype, device=x3.device)
    shift = torch.empty((0, 0) if fused else (G, R), dtype=cdtype, device=x3.device)
    logsum = torch.empty((0, 0) if fused else (G, R), dtype=cdtype, device=x3.device)
    with torch.no_grad():
        buffer = _block_buffer(x3, chunk_size)  # the only big allocation: one block
        for g0, g1, s, e in _blocks(x3, chunk_size):
            x = x3[g0:g1, s:e]  # (k, n, V), a view of the logits
            idx = tok[g0:g1, s:e, None]  # (k, n, 1)
            buf = _view(buffer, g1 - g0, e - s, V)
            if fused:
                torch.log_softmax(x, dim=-1, out=buf)
                out[g0:g1, s:e] = buf.gather(-1, idx).squeeze(-1)
                continue
            m = x.amax(dim=-1).to(cdtype) / temperature  # (k, n) max of the scaled logits
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            ls = _block_shifted_exp(x, m, temperature, buf).sum(dim=-1).log_()
            picked = x.gather(-1, idx).squeeze(-1).to(cdtype) / temperature
            shift[g0:g1, s:e] = m
            logsum[g0:g1, s:e] = ls
            out[g0:g1, s:e] = (picked - m) - ls
    return out, shift, logsum


class _TokenLogprobsFn(torch.autograd.Function):
    """gather - logsumexp with a block-recomputing backward (saves only (G, R) statistics)."""

    @staticmethod
    def forward(ctx, x3, tok, temperature, chunk_size):  # type: ignore[override]
        out, shift, logsum = _forward_blocks(x3, tok, temperature, chunk_size)
        ctx.save_for_backward(x3, tok, shift, logsum)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x3, tok, shift, logsum = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        cdtype = _compute_dtype(x3.dtype)
        fused = _fused_path(x3.dtype, temperature)
        V = x3.shape[2]
        grad = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)  # contiguous (G, R, V)
        g_scaled = grad_out.to(cdtype) / temperature  # (G, R)
        buffer = None if grad.dtype == cdtype else _block_buffer(x3, chunk_size)
        for g0, g1, s, e in _blocks(x3, chunk_size):
            # d/dx_v [x_tok/tau - lse(x/tau)] = (1[v == tok] - softmax(x/tau)_v) / tau
            p = grad[g0:g1, s:e] if buffer is None else _view(buffer, g1 - g0, e - s, V)
            if fused:
                torch.softmax(x3[g0:g1, s:e], dim=-1, out=p)
            else:
                _block_shifted_exp(x3[g0:g1, s:e], shift[g0:g1, s:e], temperature, p)  # exp(x/tau - m)
                p.mul_(torch.exp(-logsum[g0:g1, s:e])[..., None])  # softmax(x / tau)
            p.neg_().scatter_add_(-1, tok[g0:g1, s:e, None], torch.ones_like(p[..., :1]))
            p.mul_(g_scaled[g0:g1, s:e, None])
            if buffer is not None:
                grad[g0:g1, s:e] = p
        return grad, None, None, None


def _as_3d(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View (..., V) logits as (G, R, V) without copying when possible.

    Contiguous logits become (1, N, V). A strided view such as ``logits[:, :-1]`` cannot be
    flattened without a full copy; it is kept as (B, T, V) and blocks are groups of whole
    sequences (or parts of one sequence when ``chunk_size < T``).
    """
    V = logits.shape[-1]
    try:
        return logits.view(1, -1, V), tokens.reshape(1, -1)
    except RuntimeError:
        if logits.dim() == 2:
            return logits[None], tokens.reshape(1, -1)
        x3 = logits.reshape(-1, logits.shape[-2], V)  # a copy only for exotic >3-d layouts
        return x3, tokens.reshape(-1, tokens.shape[-1])


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probability of each token: ``log softmax(logits / temperature)[..., token]``.

    Computed as ``logits[token] / temperature - logsumexp(logits / temperature)`` block by
    block, never materializing the ``(B, T, V)`` log-softmax.

    Args:
        logits: ``(B, T, V)`` (any leading dims ``(...)``, last dim V), float16, bfloat16,
            float32 or float64. ``logits[b, t]`` scores ``tokens[b, t]``: **no shift is done
            here** (for a causal LM pass ``logits[:, :-1]`` and ``input_ids[:, 1:]``).
        tokens: ``(B, T)`` (= ``logits.shape[:-1]``), integer dtype, values in ``[0, V)``.
        temperature: positive float; logits are divided by it before the softmax, as the
            sampler did.
        chunk_size: number of rows (positions, after flattening ``B*T``) per block; None
            processes all rows in one block. Peak extra memory is about one float32
            ``(chunk_size, V)`` block plus the output, in the forward and the backward (plus
            the ``(B, T, V)`` gradient itself). A strided view such as ``logits[:, :-1]`` is
            not copied: its blocks are then whole sequences, or parts of one sequence.

    Returns:
        ``(B, T)`` log-probabilities, float32 (float64 for float64 logits), ``<= 0``.
        Differentiable with respect to ``logits`` (first-order only); the gradient has the
        dtype of ``logits``.

    Raises:
        ValueError: wrong ranks or shapes (expected vs received), non-float logits,
            non-integer or out-of-range tokens, non-positive temperature, bad chunk_size.
    """
    _check_logits(logits, temperature, chunk_size)
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a tensor, got {type(tokens).__name__}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer (long) tensor, got dtype {tokens.dtype}")
    V = logits.shape[-1]
    if tokens.numel() > 0 and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise ValueError(
            f"token ids must lie in [0, V) = [0, {V}), got range [{int(tokens.min())}, {int(tokens.max())}]"
        )
    lead = logits.shape[:-1]
    if tokens.numel() == 0:
        return torch.zeros(lead, dtype=_compute_dtype(logits.dtype), device=logits.device)
    x3, tok3 = _as_3d(logits, tokens.long())  # (G, R, V), (G, R): no copy of the logits
    out = _TokenLogprobsFn.apply(x3, tok3, float(temperature), chunk_size)
    return out.reshape(lead)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of ``p = softmax(logits / temperature)`` per position.

    Args:
        logits: ``(B, T, V)`` (any leading dims), float16/bfloat16/float32/float64.
        temperature: positive float, as in :func:`token_logprobs`.
        chunk_size: rows per block (None: all rows at once). Without autograd the peak
            extra memory is a few ``(chunk_size, V)`` blocks; with autograd each block's
            log-softmax is kept for the backward pass.

    Returns:
        ``(B, T)`` entropies in nats, float32 (float64 for float64 logits), in ``[0, log V]``.
        Differentiable through ordinary torch ops.

    Raises:
        ValueError: as for :func:`token_logprobs`.
    """
    _check_logits(logits, temperature, chunk_size)
    lead = logits.shape[:-1]
    cdtype = _compute_dtype(logits.dtype)
    if logits.numel() == 0:
        return torch.zeros(lead, dtype=cdtype, device=logits.device)
    x3, _ = _as_3d(logits, torch.empty(lead, dtype=torch.long, device=logits.device))
    out = []
    for g0, g1, s, e in _blocks(x3, chunk_size):
        z = x3[g0:g1, s:e].to(cdtype) / temperature  # (k, n, V)
        logp = torch.log_softmax(z, dim=-1)
        # p * logp with p = 0 and logp = -inf (a -inf logit) contributes 0, not NaN
        plogp = torch.where(logp > -math.inf, logp.exp() * logp, torch.zeros((), dtype=cdtype, device=z.device))
        out.append(-plogp.sum(dim=-1))  # (k, n)
    G, R, _ = x3.shape
    if len(out) == 1:
        return out[0].reshape(lead)
    if out[0].shape[1] == R:  # blocks of whole sequences
        return torch.cat(out, dim=0).reshape(lead)
    return torch.cat([o.reshape(-1) for o in out]).reshape(lead)  # blocks within sequences, in order


def _check_masked(x: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise ValueError(f"x and mask must be tensors, got {type(x).__name__} and {type(mask).__name__}")
    check_mask(x, mask)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``x`` over entries where ``mask`` is True.

    Args:
        x: float tensor, e.g. ``(B, T)``. Values at masked-out positions are ignored even
            if they are inf or NaN (they are replaced, not multiplied by 0).
        mask: bool tensor of the same shape as ``x``.
        dim: dimension(s) to reduce; None reduces everything to a scalar.

    Returns:
        The masked sum (0 for an all-masked row or tensor).
    """
    _check_masked(x, mask)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is True.

    Args:
        x: float tensor, e.g. ``(B, T)``; masked-out values are ignored (even inf/NaN).
        mask: bool tensor of the same shape as ``x``.
        dim: dimension(s) to reduce; None reduces everything to a scalar.

    Returns:
        ``masked_sum / count``. **Where the count is 0 (an all-masked row) the result is 0**,
        never NaN, and its gradient is 0.
    """
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)
