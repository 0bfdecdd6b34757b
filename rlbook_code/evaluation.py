"""Held-out evaluation of a policy on a :class:`~rlbook_code.rewards.TaskMixture`."""

from __future__ import annotations

from typing import Any

import torch

from rlbook_code.rewards import TaskMixture
from rlbook_code.rollout import eos_token_ids, generate

__all__ = ["evaluate"]


def evaluate(
    model,
    tokenizer,
    task: TaskMixture,
    items: list[dict[str, Any]],
    max_new_tokens: int,
    greedy: bool,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of one completion per item.

    Args:
        items: e.g. ``task.eval_items(n, seed)``.
        greedy: greedy decoding if True, else sampling at ``temperature`` with
            ``top_p=1`` (chunk ``k`` uses sampling seed ``seed + k``, so results do
            not depend on anything but the arguments).

    Returns:
        ``{"accuracy": exact-match rate, "mean_reward": mean partial-credit reward,
        "mean_length": mean completion length in tokens incl. EOS, "eos_rate": share of
        completions that ended with EOS, "n": number of items}`` as python floats.
    """
    if len(items) == 0:
        raise ValueError("items is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    exact, partial, lengths, ended = [], [], [], []
    try:
        for k, start in enumerate(range(0, len(items), batch_size)):
            chunk = items[start : start + batch_size]
            batch = generate(
                model,
                tokenizer,
                [task.prompt(it) for it in chunk],
                group_size=1,
                max_new_tokens=max_new_tokens,
                temperature=0.0 if greedy else temperature,
                top_p=1.0,
                seed=seed + k,
            )
            exact += task.score(batch.texts, chunk, mode="exact")
            partial += task.score(batch.texts, chunk, mode="partial")
            n_tok = batch.completion_mask.sum(dim=1)  # (n,)
            lengths += n_tok.tolist()
            last = batch.completion_ids.gather(1, (n_tok - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
            eos = torch.tensor(eos_token_ids(model, tokenizer), device=last.device)
            ended += (torch.isin(last, eos) & (n_tok > 0)).tolist()
    finally:
        model.train(was_training)
    n = len(items)
    return {
        "accuracy": sum(exact) / n,
        "mean_reward": sum(partial) / n,
        "mean_length": float(sum(lengths)) / n,
        "eos_rate": sum(ended) / n,
        "n": float(n),
    }

