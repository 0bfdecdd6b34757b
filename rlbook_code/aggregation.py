"""Loss aggregation: from a per-token loss ``(B, T)`` to the scalar that is differentiated.

Chapter 06 derives the length bias of each mode and why the normalizer must not depend on how
a batch is split into micro-batches. Mode names are verl's (``loss_agg_mode``):

* ``"token-mean"``: :math:`\\frac{1}{N_{tok}}\\sum_i\\sum_t m_{i,t}\\ell_{i,t}`.
  DAPO; TRL ``loss_type="dapo"`` (global token count) and ``"bnpo"`` (local count).
* ``"seq-mean-token-mean"``: :math:`\\frac{1}{N_{seq}}\\sum_i \\frac{1}{|y_i|}\\sum_t m_{i,t}\\ell_{i,t}`.
  GRPO as published; TRL ``loss_type="grpo"``.
* ``"seq-mean-token-sum"``: :math:`\\frac{1}{N_{seq}}\\sum_i \\sum_t m_{i,t}\\ell_{i,t}`.
  The sequence-level REINFORCE loss (sum of token terms per sequence).
* ``"seq-mean-token-sum-norm"``: :math:`\\frac{1}{N_{seq}\\,L_{max}}\\sum_i \\sum_t m_{i,t}\\ell_{i,t}`.
  Dr. GRPO; TRL ``loss_type="dr_grpo"``.

Here :math:`|y_i| = \\sum_t m_{i,t}` is the response length, :math:`N_{tok}` the number of
response tokens, :math:`N_{seq}` the number of sequences (rows) and :math:`L_{max}` a constant
(the generation budget ``max_new_tokens``).

Per-token gradient weight (the factor in front of :math:`\\nabla\\ell_{i,t}`): ``1/N_tok`` for
token-mean (every token equal, so a long answer weighs more in total, but no token is
down-weighted for being in a long answer); ``1/(N_seq |y_i|)`` for seq-mean-token-mean (tokens
of long answers are down-weighted: with a negative advantage a long wrong answer is penalized
less per token -- the length bias Dr. GRPO points out); ``1/N_seq`` and
``1/(N_seq L_max)`` for the two sum modes (constant, so unbiased in length).

Gradient accumulation. A batch split into micro-batches must give the same gradient as the
full batch. Pass the **global** counts of the full accumulated batch: ``num_tokens`` (for
token-mean) and ``num_seqs`` (for the seq-* modes). Each micro-batch then returns its *sum*
divided by the global count, and **summing** (not averaging) the micro-batch losses gives the
full-batch loss exactly, in every mode. Without them the local counts are used, which is right
for a single batch; averaging local token-means over micro-batches with different token
counts is *not* the full-batch token-mean (TRL's ``bnpo`` has this problem, its ``dapo`` passes
the global token count). (verl's ``agg_loss``, in the version read for this book, divides
``seq-mean-token-sum-norm`` by the constant length only -- a factor :math:`N_{seq}` away from
Dr. GRPO's and TRL's form -- and takes that constant from the tensor's width ``T``; here
``max_len`` must be given, because the padded width of a micro-batch is not a constant.)

A row with no response token contributes 0 (its token-mean is defined as 0) and is still
counted in :math:`N_{seq}`. An all-masked micro-batch returns 0 (with a graph), never NaN.
Entries of ``per_token_loss`` where ``mask`` is False are ignored (even NaN).
"""

from __future__ import annotations

import torch

from rlbook_code._validate import check_mask

__all__ = ["aggregate", "MODES"]

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    max_len: int | None = None,
    num_tokens: int | float | None = None,
    num_seqs: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar; see the module docstring for the modes.

    Args:
        per_token_loss: ``(B, T)`` floating tensor (e.g. from :mod:`rlbook_code.clipping`).
        mask: ``(B, T)`` bool, True on response tokens.
        mode: one of :data:`MODES`.
        max_len: the constant :math:`L_{max}` of ``"seq-mean-token-sum-norm"`` (required
            there, ignored otherwise); must be >= every response length in the batch.
        num_tokens: global number of response tokens of the full accumulated batch
            (``"token-mean"``; default: ``mask.sum()`` of this call). Ignored by other modes.
        num_seqs: global number of sequences of the full accumulated batch (``seq-*`` modes;
            default ``B``). Ignored by ``"token-mean"``.

    Returns:
        0-dim tensor in ``per_token_loss``'s dtype, differentiable.

    Raises:
        ValueError: unknown mode, shape/dtype mismatch, missing or too small ``max_len``, or a
        global count smaller than this call's local count (it cannot be global then).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(per_token_loss, torch.Tensor) or per_token_loss.dim() != 2:
        got = tuple(per_token_loss.shape) if isinstance(per_token_loss, torch.Tensor) else type(per_token_loss).__name__
        raise ValueError(f"per_token_loss must have shape (B, T), got {got}")
    if not per_token_loss.is_floating_point():
        raise ValueError(f"per_token_loss must be floating point, got dtype {per_token_loss.dtype}")
    check_mask(per_token_loss, mask, "per_token_loss")
    B = per_token_loss.shape[0]
    loss = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))  # (B, T)
    lengths = mask.sum(dim=1)  # (B,)

    if mode == "token-mean":
        local = int(lengths.sum())
        if num_tokens is None:
            denom = float(max(local, 1))  # all-masked -> 0 / 1 = 0
        else:
            if not num_tokens > 0 or num_tokens < local:
                raise ValueError(
                    f"num_tokens must be the global token count (> 0 and >= this batch's {local}), "
                    f"got {num_tokens}"
                )
            denom = float(num_tokens)
        return loss.sum() / denom

    if num_seqs is None:
        n_seq = float(max(B, 1))
    else:
        if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < max(B, 1):
            raise ValueError(
                f"num_seqs must be the global sequence count (an int >= this batch's {B}), got {num_seqs}"
            )
        n_seq = float(num_seqs)

    seq_sum = loss.sum(dim=1)  # (B,)
    if mode == "seq-mean-token-mean":
        seq_mean = seq_sum / lengths.clamp(min=1).to(loss.dtype)  # empty row -> 0
        return seq_mean.sum() / n_seq
    if mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    # seq-mean-token-sum-norm
    if max_len is None:
        raise ValueError(
            "mode 'seq-mean-token-sum-norm' needs max_len (the generation budget, a constant): "
            "the padded width T of a (micro-)batch is not constant"
        )
    longest = int(lengths.max()) if B > 0 else 0
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < max(longest, 1):
        raise ValueError(f"max_len must be an int >= the longest response ({longest}), got {max_len}")
    return seq_sum.sum() / (n_seq * max_len)
