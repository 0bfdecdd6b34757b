"""The trainer's optimal-transport penalty (``divergence: ot``, chapter 16).

With ``divergence: ot`` the KL term of the loss is replaced by ``beta`` times the mean over
the minibatch's sequences of an OT penalty (:func:`rlbook_code.ot.embedding_ot`) between

* the **completion**, as the sequence of the policy's *expected* next-token embeddings
  ``sum_v pi(v | prompt, y_<t) E_ref[v]`` at each of its positions (differentiable in the
  policy's logits: the penalty moves probabilities, not the sampled tokens); and
* the **reference completion**: the frozen reference policy's *greedy* completion of the
  same prompt, as the sequence of its tokens' embeddings ``E_ref[y_ref_s]``;

both clouds uniform over their tokens (up to and including EOS), costs ``ot_cost`` between
rows of the reference model's input-embedding table ``E_ref`` (frozen, so the policy cannot
lower the penalty by moving its own embedding table).

Why the reference's greedy completion. The anchor has to be a completion of ``pi_ref`` for the
same prompt: the greedy one is deterministic (one per prompt, cached: ``pi_ref`` is frozen),
costs one greedy decoding per new prompt, and is the reference's single most likely answer.
A sampled reference completion would add noise to the anchor; another member of the group
would anchor to the moving policy itself (a pull towards agreement inside the group, not
towards ``pi_ref``). The price of this choice, measured in chapter 16: the penalty is not 0 at
``pi = pi_ref`` and pulls every completion towards that one answer, sharpening the policy.
"""

from __future__ import annotations

from typing import Any

import torch

from rlbook_code.models import autocast
from rlbook_code.ot import embedding_ot, expected_embeddings

__all__ = ["reference_completions", "ot_penalty", "OT_TOL", "OT_MAX_ITERS"]

#: Sinkhorn's stopping rule in the trainer: row-marginal L1 error <= 1e-3, at most 500
#: iterations. The divergence converges much faster than the plan's marginals (at eps = 0.1
#: on the shipped model's embeddings, a 1e-3 marginal error leaves the value within about
#: 1e-5 of the 1e-8 solution, chapter 16), while tight tolerances cost thousands of iterations.
OT_TOL = 1e-3
OT_MAX_ITERS = 500


@torch.no_grad()
def reference_completions(state: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's greedy completion of each prompt, ``(N, m)`` ids and bool mask.

    Cached per prompt in ``state.ot_refs`` (the reference is frozen, so a prompt's greedy
    completion never changes); only prompts not seen before are decoded, in one call.
    The mask is True on completion tokens up to and including the first EOS."""
    from rlbook_code import rollout

    cfg, cache = state.cfg, state.ot_refs
    missing = list(dict.fromkeys(p for p in prompts if p not in cache))
    if missing:
        with autocast(cfg.device, cfg.autocast_bf16):
            out = rollout.generate(state.ref, state.tokenizer, missing, group_size=1,
                                   max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        for p, ids, m in zip(missing, out.completion_ids, out.completion_mask):
            cache[p] = ids[m].cpu()
    rows = [cache[p] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = r
        mask[k, : len(r)] = True
    return ids, mask


def ot_penalty(state: Any, mb: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OT penalty of each completion of a micro-batch against its reference completion.

    Args:
        state: the trainer's ``TrainState`` (policy, frozen ``ref``, tokenizer, config, cache).
        mb: the micro-batch (``RolloutBatch``).
        hidden: ``(b, T, H)`` the policy's final hidden states at the positions that predict
            completion tokens (``rollout.completion_logprobs(..., with_hidden=True).hidden``),
            with gradient; the policy's output head turns them into next-token logits.

    Returns:
        ``(penalty (b,), sampled (b,))``: the differentiable penalty of the expected
        embeddings, and (no gradient) the same divergence for the sampled tokens' embeddings,
        a measure of how far the actual completions are from the reference completion.
    """
    cfg = state.cfg
    device = hidden.device
    logits = state.policy.get_output_embeddings()(hidden)  # (b, T, V)
    table = state.ref.get_input_embeddings().weight.detach()  # (V, d), frozen
    soft = expected_embeddings(logits[..., : table.shape[0]], table, cfg.temperature)  # (b, T, d)
    ref_ids, ref_mask = reference_completions(state, mb.prompts)
    ref_ids, ref_mask = ref_ids.to(device), ref_mask.to(device)
    mask = mb.completion_mask.to(device)
    kw = dict(eps=cfg.ot_eps, window=cfg.ot_window, cost=cfg.ot_cost, tol=OT_TOL, max_iters=OT_MAX_ITERS)
    ref_emb = table[ref_ids].float()  # (b, m, d)
    penalty = embedding_ot(soft, ref_emb, mask, ref_mask, **kw)
    with torch.no_grad():
        sampled = embedding_ot(table[mb.completion_ids.to(device)].float(), ref_emb, mask, ref_mask, **kw)
    return penalty, sampled
