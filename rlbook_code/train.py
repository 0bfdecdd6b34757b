"""One training loop for every algorithm of the book (chapters 08–11).

The loop is written only with the estimators of chapters 01–07; each step names the module
that computes it::

    prompts  ~ task mixture                      (rewards.TaskMixture)
    rollouts = G completions per prompt          (rollout.generate)
    rewards  = verifier scores (+ shaping)       (rewards.TaskMixture.score, rewards.overlong_penalty)
    old/ref log-probs, values (no grad)          (rollout.completion_logprobs, value_head.ValueHead)
    advantages                                   (advantages.group_advantages / rloo_advantages / gae / whiten)
    for epoch in range(num_epochs):
        for minibatch in shuffled(batch):
            for micro_batch in minibatch:        (gradient accumulation)
                per-token loss                   (reinforce.reinforce_loss / clipping.*)
                + beta * KL(pi || pi_ref)        (kl.kl_k1 / kl_k2 / kl_k3)
                reduce                           (aggregation.aggregate, global normalizers)
                backward
            clip grad norm, AdamW step
    metrics, evaluation, checkpoint              (evaluation.evaluate, checkpoint.*)

Every algorithm is one :class:`~rlbook_code.config.TrainConfig` (module ``config``, re-exported
here; ``configs/*.yaml``); grids of runs are ``python -m rlbook_code.sweep``.

Command line::

    python -m rlbook_code.train --config configs/grpo.yaml [--set key=value ...] [--resume RUN_DIR]

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per step),
``checkpoint/`` (policy, optimizer, scheduler, value head, RNG states, step; module
``checkpoint``) and, at the end, ``final/`` (the policy in Hugging Face format, loadable with
``models.load_policy``). Exit codes: 0 done, 1 the run failed, 2 a user error (bad config,
a model that cannot be loaded, a run folder that exists), 3 a non-finite loss or gradient.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlbook_code import checkpoint as ckpt
from rlbook_code import distributed
from rlbook_code.config import (  # noqa: F401  (re-exported: ``train.load_config`` etc.)
    ALGORITHMS, DTYPES, ConfigError, TrainConfig, apply_overrides, config_from_dict, config_help,
    default_run_dir, field_docs, load_config, lr_lambda, parse_overrides, run_cli, save_config, validate_config)
from rlbook_code.checkpoint import load_train_state as load_checkpoint  # noqa: F401  (re-exported)
from rlbook_code.checkpoint import read_metrics  # noqa: F401  (re-exported)
from rlbook_code.checkpoint import save_train_state as save_checkpoint
from rlbook_code.evaluation import eval_line as _eval_line
from rlbook_code.evaluation import run_eval
from rlbook_code.models import autocast
from rlbook_code.rewards import overlong_penalty
from rlbook_code.rollout import concat_batches, pad_token_id
from rlbook_code.value_head import value_loss

__all__ = ["TrainConfig", "ConfigError", "NonFiniteError", "load_config", "apply_overrides", "validate_config",
           "field_docs", "read_metrics", "TrainState", "build_state", "train_step", "train", "main"]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; the message names the step and the metric."""


# ----------------------------------------------------------------------------------------
# Run state
# ----------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What the loop carries from step to step (all of it goes into a checkpoint)."""

    cfg: TrainConfig
    run_dir: Path
    policy: Any
    tokenizer: Any
    ref: Any  # frozen reference policy, or None when beta == 0
    value_head: Any  # ValueHead, or None unless advantage == "gae"
    optimizer: torch.optim.Optimizer
    scheduler: Any
    task: Any
    eval_items: list
    step: int = 0
    items_drawn: int = 0  # training items drawn from ``task`` so far (replayed on resume)
    ot_refs: dict = field(default_factory=dict)  # divergence=ot (chapter 16): reference completion per prompt
    reward_fn: Any = None  # chapter 13: reward_models.LearnedReward (a learned or shaped proxy reward)
    sampler: Any = None  # off-policy runs only (chapter 11): async_sampler.StaleSampler / AsyncSampler


def _seed_for(cfg: TrainConfig, step: int, round_: int = 0, salt: int = 0) -> int:
    """A fixed seed for each (step, sampling round): makes runs resumable bit for bit."""
    return (cfg.seed * 1_000_003 + step * 9_973 + round_ * 101 + salt) % (2**31 - 1)


def build_state(cfg: TrainConfig, run_dir: Path | None = None) -> TrainState:
    """Load the policy (and the reference copy if ``beta > 0``), the value head (PPO), the
    optimizer, the task and the fixed evaluation set."""
    from rlbook_code import models, rewards
    from rlbook_code.async_sampler import make_sampler
    from rlbook_code.reward_models import make_learned_reward
    from rlbook_code.value_head import seeded_value_head

    validate_config(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ckpt.seed_everything(cfg.seed)
    policy, tokenizer = models.load_policy(cfg.model_name, device=cfg.device, dtype=DTYPES[cfg.dtype])
    if cfg.lora_rank:  # chapter 15: only the adapters train
        from rlbook_code import lora

        lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.gradient_checkpointing:
        models.enable_gradient_checkpointing(policy)
    ref = None
    if cfg.beta > 0 and cfg.lora_rank:  # the base model is the reference: adapters off, no copy
        ref = lora.DisabledAdapters(policy)
    elif cfg.beta > 0:
        ref = copy.deepcopy(policy).eval()
        ref.requires_grad_(False)
    value_head = None
    params = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr}]
    if cfg.advantage == "gae":
        value_head = seeded_value_head(policy.config.hidden_size, cfg.value_hidden, _seed_for(cfg, 0, salt=7), cfg.device)
        params.append({"params": list(value_head.parameters()), "lr": cfg.value_lr or cfg.lr})
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    task = rewards.TaskMixture(cfg.task if cfg.task is not None else rewards.DEFAULT_TASK, seed=cfg.seed,
                               answer_format=cfg.answer_format)
    eval_items = task.eval_items(cfg.eval_size, seed=cfg.eval_seed)
    state = TrainState(cfg=cfg, run_dir=Path(run_dir or default_run_dir(cfg)), policy=policy,
                      tokenizer=tokenizer, ref=ref, value_head=value_head, optimizer=optimizer,
                      scheduler=scheduler, task=task, eval_items=eval_items, sampler=make_sampler(cfg, policy))
    state.reward_fn = make_learned_reward(cfg, policy, ref)  # None: the verifier alone
    return state


# ----------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------
def collect_rollouts(state: TrainState, step: int) -> tuple[Any, list, torch.Tensor, dict[str, float]]:
    """Sample prompts, generate ``G`` completions each and score them.

    With ``dynamic_sampling`` (DAPO), groups whose scores all agree are dropped and more
    prompts are drawn, up to ``max_sampling_rounds`` rounds; the step then trains on the first
    ``prompts_per_step`` kept groups (or on fewer, if the rounds ran out; or on the last
    round's batch if nothing varied at all).

    Off-policy runs (chapter 11) sample with ``state.sampler``'s model and temperature, or take
    the batch from the asynchronous sampler process.

    Returns ``(batch, items, scores (N,), stats)`` with one item per completion."""
    from rlbook_code import rollout

    cfg, G = state.cfg, state.cfg.group_size
    if state.sampler is not None and state.sampler.is_async:
        return state.sampler.next_batch(state, step)
    state.policy.eval()
    model, temperature, sampler_stats = (state.sampler.model_for(state.policy, step - 1) if state.sampler is not None
                                         else (state.policy, cfg.temperature, {}))
    kept, kept_items, kept_scores = [], [], []
    n_kept = n_groups = n_zero_var = 0
    last = None
    for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        items = state.task.sample(cfg.prompts_per_step)
        state.items_drawn += len(items)
        prompts = [state.task.prompt(it) for it in items]
        chunk = cfg.generation_batch_size or len(prompts) // distributed.world_size()
        with autocast(cfg.device, cfg.autocast_bf16):  # each rank samples its chunks (all of them on one process)
            parts = [rollout.generate(model, state.tokenizer, prompts[i:i + chunk], group_size=G,
                                      max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                                      top_p=cfg.top_p, seed=_seed_for(cfg, step, round_, salt=i),
                                      share_prompt=cfg.share_prompt)
                     for i in distributed.chunk_starts(len(prompts), chunk)]
        parts = [p for rank_parts in distributed.gather_objects(parts) for p in rank_parts]
        batch = concat_batches(parts, pad_token_id(state.tokenizer))
        rep_items = [it for it in items for _ in range(G)]
        scores = torch.tensor(state.task.score(batch.texts, rep_items, mode=cfg.reward_mode),
                              dtype=torch.float32)
        reward_stats = {}
        if state.reward_fn is not None:  # chapter 13: train on a proxy, log the verifier as gold
            scores, reward_stats = state.reward_fn(state, batch, rep_items, scores)
        grouped = scores.view(-1, G)
        varied = grouped.amax(1) != grouped.amin(1)  # (P,)
        n_groups += len(items)
        n_zero_var += int((~varied).sum())
        last = (batch, rep_items, scores)
        if not cfg.dynamic_sampling:
            break
        need = cfg.prompts_per_step - n_kept
        groups = [int(i) for i in torch.nonzero(varied).flatten()][:need]
        if groups:
            idx = [g * G + j for g in groups for j in range(G)]
            kept.append(batch.select(idx))
            kept_items += [rep_items[i] for i in idx]
            kept_scores.append(scores[idx])
            n_kept += len(groups)
        if n_kept >= cfg.prompts_per_step:
            break
    stats = {"zero_var_frac": n_zero_var / n_groups, "sampling_rounds": float(round_ + 1), **sampler_stats, **reward_stats}
    if cfg.dynamic_sampling and kept:
        batch = concat_batches(kept, pad_token_id(state.tokenizer))
        stats["kept_groups"] = float(n_kept)
        return batch, kept_items, torch.cat(kept_scores), stats
    batch, rep_items, scores = last
    if cfg.dynamic_sampling:
        stats["kept_groups"] = 0.0
    return batch, rep_items, scores, stats


# ----------------------------------------------------------------------------------------
# Scoring, advantages and the loss
# ----------------------------------------------------------------------------------------
def _micro_slices(n: int, size: int | None) -> list[slice]:
    if n == 0:  # a rank that owns no row of a minibatch (data parallel) has nothing to differentiate
        return []
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def needs_old_pass(cfg: TrainConfig) -> bool:
    """Whether a step needs the separate no-grad pass for the old log-probs. With one update per
    rollout batch the policy differentiated *is* the policy that sampled, so the old log-probs are
    the update pass's own, detached (ratio exactly 1; TRL does the same); a value head or a
    reference model still need the pass. Off-policy runs (chapter 11) need no more: their proximal
    policy is these same log-probs, and the behaviour log-probs are the sampler's."""
    return cfg.num_epochs * cfg.num_minibatches > 1 or cfg.advantage == "gae" or cfg.beta > 0


@torch.no_grad()
def score_rollouts(state: TrainState, batch) -> dict[str, torch.Tensor | None]:
    """Log-probs of the rollout tokens under the current (= old) policy, the reference policy,
    and the value head, without gradients, in micro-batches. Entropy comes with the old pass.

    When :func:`needs_old_pass` is False, nothing is computed here: ``old_logp`` and
    ``entropy`` are None and the update pass supplies both."""
    from rlbook_code import rollout

    cfg = state.cfg
    if not needs_old_pass(cfg):
        return {"old_logp": None, "entropy": None, "ref_logp": None, "values": None}
    critic = state.value_head is not None
    old, ent, ref, val = [], [], [], []
    state.policy.eval()
    rows = distributed.local_rows(batch.completion_ids.shape[0])  # this rank's share (all rows on one process)
    for sl in _micro_slices(len(rows), cfg.micro_batch_size):
        mb = batch.select(list(rows[sl]))
        with autocast(cfg.device, cfg.autocast_bf16):
            out = rollout.completion_logprobs(state.policy, mb, temperature=cfg.temperature,
                                              with_entropy=True, with_hidden=critic,
                                              share_prompt=cfg.share_prompt)
        old.append(out.logprobs.float())
        ent.append(out.entropy.float())
        if critic:
            val.append(state.value_head(out.hidden))
        if state.ref is not None:
            with autocast(cfg.device, cfg.autocast_bf16):
                ref.append(rollout.completion_logprobs(state.ref, mb, temperature=cfg.temperature,
                                                       share_prompt=cfg.share_prompt).logprobs.float())
    parts = distributed.gather_objects((old, ent, ref, val))  # every rank gets every row, in order
    old, ent, ref, val = ([t for p in parts for t in p[k]] for k in range(4))
    return {"old_logp": torch.cat(old), "entropy": torch.cat(ent),
            "ref_logp": torch.cat(ref) if ref else None, "values": torch.cat(val) if val else None}


def kl_per_token(cfg: TrainConfig, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The configured estimator (chapter 03) of KL(pi || pi_ref), per token ``(B, T)``."""
    from rlbook_code import kl

    return {"k1": kl.kl_k1, "k2": kl.kl_k2, "k3": kl.kl_k3}[cfg.kl_estimator](logp, ref_logp)


def compute_advantages(cfg: TrainConfig, scores: torch.Tensor, mask: torch.Tensor,
                       kl_tokens: torch.Tensor | None, values: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Advantages (chapter 04) for the configured estimator.

    Args:
        scores: ``(B,)`` sequence rewards (verifier score plus shaping).
        mask: ``(B, T)`` response mask.
        kl_tokens: ``(B, T)`` per-token KL to the reference when ``kl_in == "reward"``, else None.
        values: ``(B, T)`` rollout-time values (``advantage == "gae"`` only).

    Returns ``(advantages (B,) or (B, T), returns (B, T) or None, rewards used (B,))``."""
    from rlbook_code import advantages as adv_mod
    from rlbook_code.logprobs import masked_sum

    seq_rewards = scores
    if kl_tokens is not None:
        seq_rewards = scores - cfg.beta * masked_sum(kl_tokens, mask, dim=1)
    returns = None
    if cfg.advantage == "group":
        adv = adv_mod.group_advantages(seq_rewards, cfg.group_size, scale=cfg.adv_scale)
    elif cfg.advantage == "rloo":
        adv = adv_mod.rloo_advantages(seq_rewards, cfg.group_size)
    elif cfg.advantage == "reward":
        adv = seq_rewards.clone()
    else:  # gae: outcome reward on the last response token, KL penalty on every token
        lengths = mask.sum(1)
        token_rewards = torch.zeros(mask.shape, dtype=torch.float32)
        last = (lengths - 1).clamp(min=0)
        token_rewards[torch.arange(mask.shape[0]), last] = scores.float()
        if kl_tokens is not None:
            token_rewards = token_rewards - cfg.beta * torch.where(mask, kl_tokens, 0.0)
        adv, returns = adv_mod.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        if adv.dim() == 1:
            adv = adv_mod.whiten(adv, torch.ones_like(adv, dtype=torch.bool))
        else:
            adv = adv_mod.whiten(adv, mask)
    return adv, returns, seq_rewards


def micro_batch_loss(state: TrainState, mb, old_logp: torch.Tensor | None, adv: torch.Tensor,
                     ref_logp: torch.Tensor | None, old_values: torch.Tensor | None,
                     returns: torch.Tensor | None, num_tokens: float, num_seqs: int
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The differentiable loss of one micro-batch, normalised by the *minibatch's* token and
    sequence counts so that summing the micro-batch losses gives the minibatch loss.

    ``old_logp=None`` (one update per batch, :func:`needs_old_pass`): the old log-probs are
    this pass's own, detached, and the entropy metric is measured here."""
    from rlbook_code import aggregation, clipping, rollout
    from rlbook_code.kl import kl_k3
    from rlbook_code.logprobs import masked_mean
    from rlbook_code.reinforce import reinforce_loss

    cfg = state.cfg
    critic = state.value_head is not None
    with autocast(cfg.device, cfg.autocast_bf16):
        out = rollout.completion_logprobs(state.policy, mb, temperature=cfg.temperature,
                                          with_entropy=cfg.entropy_coef > 0 or old_logp is None,
                                          entropy_grad=cfg.entropy_coef > 0,  # else a metric only
                                          with_hidden=critic or cfg.divergence == "ot",
                                          share_prompt=cfg.share_prompt)
    logp = out.logprobs.float()  # (b, T)
    mask = mb.completion_mask  # (b, T)
    entropy_metric = None
    if old_logp is None:
        old_logp = logp.detach()
        entropy_metric = float(masked_mean(out.entropy.detach().float(), mask))  # detach: entropy_coef > 0
    metrics: dict[str, float] = {}
    if state.sampler is not None:  # off-policy (chapter 11): mb.logprobs are the sampler's own
        from rlbook_code.async_sampler import policy_loss

        pg, metrics = policy_loss(cfg, logp, old_logp, mb.logprobs, adv, mask)
    elif cfg.loss == "reinforce":
        pg = reinforce_loss(logp, adv, mask)
        metrics["approx_kl_old"] = float(masked_mean(kl_k3(old_logp, logp.detach()), mask))
    elif cfg.loss == "ppo":
        pg, metrics = clipping.ppo_clip_loss(logp, old_logp, adv, mask, eps_low=cfg.clip_eps_low,
                                             eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip)
    elif cfg.loss == "gspo":
        pg, metrics = clipping.gspo_loss(logp, old_logp, adv, mask, eps_low=cfg.clip_eps_low,
                                         eps_high=cfg.clip_eps_high)
    else:
        pg, metrics = clipping.cispo_loss(logp, old_logp, adv, mask, eps_low=cfg.clip_eps_low,
                                          eps_high=cfg.clip_eps_high)
    metrics = {k: float(v) for k, v in metrics.items()}
    if entropy_metric is not None:
        metrics["entropy"] = entropy_metric
    per_token = pg
    if ref_logp is not None and cfg.kl_in == "loss" and cfg.divergence == "kl":
        per_token = per_token + cfg.beta * torch.where(mask, kl_per_token(cfg, logp, ref_logp), 0.0)
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * torch.where(mask, out.entropy, 0.0)
    pg_loss = aggregation.aggregate(per_token, mask, cfg.aggregation, max_len=cfg.max_new_tokens,
                                    num_tokens=num_tokens, num_seqs=num_seqs)
    metrics["pg_loss"] = float(pg_loss.detach())
    loss = pg_loss
    if cfg.divergence == "ot":  # chapter 16: beta * the mean over the minibatch's sequences
        from rlbook_code.ot_regularizer import ot_penalty

        penalty, sampled = ot_penalty(state, mb, out.hidden)  # (b,), (b,)
        loss = loss + cfg.beta * penalty.sum() / num_seqs
        metrics["ot_penalty"] = float(penalty.detach().mean())
        metrics["ot_sampled"] = float(sampled.mean())
    if critic:
        hidden = out.hidden.detach() if cfg.value_detach else out.hidden
        values = state.value_head(hidden)  # (b, T)
        v_loss, clip_frac = value_loss(values, old_values, returns, mask, cfg.value_clip, num_tokens=num_tokens)
        if cfg.value_clip is not None:
            metrics["value_clip_frac"] = clip_frac
        metrics["value_loss"] = float(v_loss.detach())
        loss = loss + cfg.vf_coef * v_loss
    metrics["loss"] = float(loss.detach())
    return loss, metrics


# ----------------------------------------------------------------------------------------
# One step, the loop (evaluation: module ``evaluation``; checkpoints: module ``checkpoint``)
# ----------------------------------------------------------------------------------------
def _check_finite(state: TrainState, step: int, name: str, value: float) -> None:
    if not math.isfinite(value):
        path = save_checkpoint(state) if distributed.is_main() else state.run_dir / "checkpoint"
        raise NonFiniteError(f"step {step}: {name} is {value} (non-finite); stopped before the "
                             f"optimizer step, checkpoint saved to {path}")


def train_step(state: TrainState, step: int) -> dict[str, float]:
    """One step: rollouts -> rewards -> advantages -> ``num_epochs`` x minibatch updates."""
    from rlbook_code.logprobs import masked_mean

    cfg = state.cfg
    t0 = time.perf_counter()
    # 1. rollouts and rewards
    batch, items, scores, stats = collect_rollouts(state, step)
    mask = batch.completion_mask  # (N, T) bool
    lengths = mask.sum(1)
    rewards_ = scores.clone()
    if cfg.overlong_buffer is not None:
        rewards_ = rewards_ + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                               cfg.overlong_penalty)
    # 2. old / reference log-probs and values (no grad)
    sc = score_rollouts(state, batch)
    kl_tok = kl_per_token(cfg, sc["old_logp"], sc["ref_logp"]) if sc["ref_logp"] is not None else None
    # 3. advantages
    adv, returns, seq_rewards = compute_advantages(
        cfg, rewards_, mask, kl_tok if cfg.kl_in == "reward" else None, sc["values"])
    t1 = time.perf_counter()
    # 4. updates
    state.policy.train()
    n = mask.shape[0]
    mb_size = n // cfg.num_minibatches if n >= cfg.num_minibatches else n
    g = torch.Generator().manual_seed(_seed_for(cfg, step, salt=3))
    sums: dict[str, float] = {}
    grad_norms = []
    n_updates = 0
    params = [p for grp in state.optimizer.param_groups for p in grp["params"]]
    G = batch.group_size
    rows = distributed.local_rows(n)  # the rows this rank differentiates (all of them on one process)
    for _epoch in range(cfg.num_epochs):
        if cfg.num_minibatches == 1:
            perm = torch.arange(n)
        elif cfg.share_prompt and G > 1:  # shuffle whole groups, so minibatches can share prompts
            perm = (torch.randperm(n // G, generator=g)[:, None] * G + torch.arange(G)).flatten()
        else:
            perm = torch.randperm(n, generator=g)
        for start in range(0, n, mb_size):
            idx = perm[start:start + mb_size]
            num_tokens = float(mask[idx].sum())
            num_seqs = len(idx)
            state.optimizer.zero_grad(set_to_none=True)
            mine = idx[(idx >= rows.start) & (idx < rows.stop)]
            for sl in _micro_slices(len(mine), cfg.micro_batch_size):
                sub = mine[sl]
                mb = batch.select(sub.tolist())
                loss, m = micro_batch_loss(
                    state, mb, sc["old_logp"][sub] if sc["old_logp"] is not None else None, adv[sub],
                    sc["ref_logp"][sub] if sc["ref_logp"] is not None else None,
                    sc["values"][sub] if sc["values"] is not None else None,
                    returns[sub] if returns is not None else None, num_tokens, num_seqs)
                w = float(mask[sub].sum()) / max(num_tokens, 1.0)
                for k, v in m.items():
                    if k in ("loss", "pg_loss", "value_loss"):
                        sums[k] = sums.get(k, 0.0) + v  # already normalised: sums to the minibatch value
                    else:
                        sums[k] = sums.get(k, 0.0) + w * v
                _check_finite(state, step, "loss", float(loss.detach()))
                loss.backward()
            distributed.all_reduce_grads(params)  # sum over ranks: the losses were global-normalised
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
            gn = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            _check_finite(state, step, "grad_norm", gn)
            grad_norms.append(gn)
            state.optimizer.step()
            n_updates += 1
    state.optimizer.zero_grad(set_to_none=True)
    lr_now = state.scheduler.get_last_lr()[0]
    state.scheduler.step()
    t2 = time.perf_counter()
    # 5. metrics
    rec: dict[str, float] = {"step": step}
    rec["reward_mean"] = float(seq_rewards.mean())
    rec["reward_std"] = float(seq_rewards.std()) if seq_rewards.numel() > 1 else 0.0
    rec["accuracy"] = float((scores >= 1.0).float().mean())
    adv_tok = adv if adv.dim() == 2 else adv[:, None].expand_as(mask)
    rec["adv_mean"] = float(masked_mean(adv_tok, mask))
    rec["adv_std"] = float(adv_tok[mask].std()) if int(mask.sum()) > 1 else 0.0
    rec["adv_abs_mean"] = float(masked_mean(adv_tok.abs(), mask))
    if kl_tok is not None:
        rec["kl_ref"] = float(masked_mean(kl_tok, mask))
    if sc["entropy"] is not None:
        rec["entropy"] = float(masked_mean(sc["entropy"], mask))
    rec["response_length"] = float(lengths.float().mean())
    for k, v in distributed.all_reduce_sums(sums).items():
        rec[k] = v / n_updates
    rec.update(stats)
    if sc["values"] is not None:
        v, r = sc["values"][mask], returns[mask]
        rec["value_mean"] = float(v.mean())
        var_r = float(r.var()) if r.numel() > 1 else 0.0
        rec["explained_var"] = 1.0 - float((r - v).var()) / var_r if var_r > 0 else 0.0
    rec["grad_norm"] = float(np.mean(grad_norms))
    rec["lr"] = float(lr_now)
    rec["rollout_s"] = t1 - t0
    rec["update_s"] = t2 - t1
    rec["tokens_per_s"] = float(mask.sum()) / max(t2 - t0, 1e-9)
    return rec


TIMING_KEYS = ("rollout_s", "update_s", "tokens_per_s")


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> Path:
    """Run (or resume) training; returns the run folder.

    ``resume``: a run folder with a ``checkpoint/``; the run continues from its step with the
    config ``cfg`` (pass the one saved in the folder, optionally with more ``steps``)."""
    from tqdm import tqdm

    validate_config(cfg)
    world, device = distributed.init(cfg.device)  # under torchrun: join the ranks (module distributed)
    if device != cfg.device:
        cfg = apply_overrides(cfg, device=device)
    if world.world_size > 1 and getattr(cfg, "async_rollouts", False):
        raise ConfigError("async_rollouts=true runs one learner process; it cannot be combined with torchrun")
    main_rank = distributed.is_main()  # rank 0 alone writes files, evaluates and prints
    run_dir = Path(default_run_dir(cfg) if resume is None else resume)
    if main_rank or resume is not None:
        ckpt.prepare_run_dir(run_dir, resume=resume is not None, overwrite=cfg.overwrite)
    distributed.barrier()
    state = build_state(cfg, run_dir)
    if resume is not None:
        load_checkpoint(state, run_dir / "checkpoint")
        if main_rank:
            ckpt.truncate_metrics(run_dir, state.step)
    if main_rank:
        save_config(cfg, run_dir / "config.yaml")
    writer = ckpt.tensorboard_writer(run_dir, cfg.tensorboard and main_rank)

    def log(rec: dict[str, float]) -> None:
        if not main_rank:
            return
        ckpt.append_metrics(run_dir, rec)
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(k, v, rec["step"])

    if state.step == 0 and main_rank:
        ev = run_eval(state)
        log({"step": 0, **ev})
        if cfg.progress:
            tqdm.write(_eval_line(0, ev), file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (cfg.progress and main_rank), file=sys.stderr,
               desc=cfg.algo, mininterval=1.0 if sys.stderr.isatty() else 10.0)  # few lines in notebooks
    ran = 0
    try:
        if state.sampler is not None:
            state.sampler.start(state)  # async: spawns the sampler process (closed below)
        while state.step < cfg.steps:
            step = state.step + 1
            rec = train_step(state, step)
            state.step = step
            ran += 1
            if state.sampler is not None:
                state.sampler.after_step(state)  # async: sends the weights every sync_every steps
            if main_rank and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                rec.update(run_eval(state))
                if cfg.progress:
                    tqdm.write(_eval_line(step, rec), file=sys.stderr)
            log(rec)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", acc=f"{rec['accuracy']:.2f}",
                            len=f"{rec['response_length']:.1f}", refresh=False)
            stopping = cfg.stop_after is not None and ran >= cfg.stop_after
            if main_rank and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping):
                save_checkpoint(state)
            if stopping:
                break
    finally:
        if state.sampler is not None:
            state.sampler.close()
        bar.close()
        if writer is not None:
            writer.close()
    if state.step >= cfg.steps and cfg.save_final_model and main_rank:
        from rlbook_code.lora import has_lora, merged_model

        final_policy = merged_model(state.policy) if has_lora(state.policy) else state.policy  # LoRA: merged
        ckpt.save_final(run_dir / "final", final_policy, state.tokenizer, state.value_head)
    distributed.barrier()  # no rank leaves before rank 0 has written the run's last files
    distributed.shutdown()
    return run_dir


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """The command line (``config.run_cli``): 2 and one line for a user error (config, model, run
    folder, resume folder), 1 and the traceback for a failed run, 3 for a non-finite loss."""
    return run_cli(argv, prog="python -m rlbook_code.train", description="Train a policy with one of the book's algorithms.",
                   cls=TrainConfig, train_fn=train, config_hint="configs/*.yaml", stop_errors=(NonFiniteError,))


if __name__ == "__main__":
    sys.exit(main())
