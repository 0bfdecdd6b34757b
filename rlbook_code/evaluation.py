"""Held-out evaluation of a policy on a :class:`~rlbook_code.rewards.TaskMixture`."""

from __future__ import annotations

from typing import Any

import torch

from rlbook_code.rewards import TaskMixture
from rlbook_code.rollout import eos_token_ids, generate

__all__ = ["evaluate", "run_eval", "eval_line"]


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


def run_eval(state) -> dict[str, float]:
    """Greedy (and, with ``cfg.eval_sampled``, sampled) accuracy and length on a trainer's fixed
    held-out set: ``state`` has ``policy``, ``tokenizer``, ``task``, ``eval_items`` and ``cfg``
    (``train.TrainState``, ``align``'s state). Returns ``{"eval/greedy_accuracy", ...}``."""
    from rlbook_code.models import autocast

    cfg = state.cfg
    state.policy.eval()
    out = {}
    modes = [("greedy", True)] + ([("sampled", False)] if cfg.eval_sampled else [])
    for name, greedy in modes:
        with autocast(cfg.device, cfg.autocast_bf16):
            r = evaluate(state.policy, state.tokenizer, state.task, state.eval_items,
                         max_new_tokens=cfg.max_new_tokens, greedy=greedy, temperature=cfg.temperature,
                         batch_size=cfg.eval_batch_size, seed=cfg.eval_seed)
        out[f"eval/{name}_accuracy"] = float(r["accuracy"])
        out[f"eval/{name}_length"] = float(r["mean_length"])
    return out


def eval_line(step: int, rec: dict[str, float]) -> str:
    """``eval @ step 25: greedy 0.703, sampled 0.602``: the accuracies of a metrics record."""
    parts = [f"{k.split('/')[1]} {v:.3f}" for k, v in rec.items() if k.startswith("eval/") and k.endswith("accuracy")]
    return f"eval @ step {step}: " + ", ".join(parts)
