"""Direct alignment: the DPO family, rejection sampling, offline and online (chapter 14).

One loop for every method of chapter 14; the losses are :mod:`rlbook_code.preference`'s::

    offline:  once, before training
        prompts  ~ task mixture; G completions each from the initial policy   (rollout.generate)
        labels   = verifier scores                                            (rewards.TaskMixture.score)
        units    = pairs (y_w, y_l) with score(y_w) > score(y_l) in a group (DPO, IPO, SimPO, ORPO),
                   every completion with desirable = verified (KTO),
                   the verified completions (rejection-sampling SFT)
        ref log-probs of every completion, computed once                     (rollout.completion_logprobs)
    online:   the same, every step, from the *current* policy (fresh pairs; a frozen reference copy)
    each step: a minibatch of units -> sequence log-probs -> loss -> AdamW   (preference.*)
    metrics, held-out evaluation, checkpoints                                (train.run_eval, checkpoint.*)

Labels come from the task's verifier (chapter 07), not from a learned reward model: chapter 13's
reward model would slot in where ``score`` is called. With 0/1 rewards a prompt yields pairs
only when its group has both a right and a wrong answer.

The methods are :class:`AlignConfig` files in ``configs/align/``: ``dpo``, ``cdpo`` (DPO with
label smoothing), ``ipo``, ``simpo``, ``orpo``, ``kto``, ``rft`` (rejection-sampling
fine-tuning, i.e. expert iteration: sample, keep what the verifier accepts, SFT, repeat) and
``online_dpo``. Command line::

    python -m rlbook_code.align --config configs/align/dpo.yaml [--set key=value ...] [--resume RUN_DIR]

A run folder is the policy trainer's (chapter 08): ``config.yaml``, ``metrics.jsonl``,
``checkpoint/`` (module ``checkpoint``), ``final/``; ``python -m rlbook_code.sweep`` runs
grids of it with ``sweep.Job(..., module="rlbook_code.align")``. Exit codes as the policy
trainer's: 0 done, 1 failed, 2 a user error, 3 a non-finite loss or gradient.

Resuming is bit-identical on a CPU: the offline dataset is rebuilt from the initial weights
with the same seeds (not stored), then the checkpoint is loaded and the item stream replayed.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rlbook_code import checkpoint as ckpt
from rlbook_code import preference
from rlbook_code.config import (DTYPES, ConfigError, lr_lambda, run_cli,
                                save_config)
from rlbook_code.models import autocast
from rlbook_code.rollout import RolloutBatch, concat_batches, pad_token_id

__all__ = ["AlignConfig", "AlignData", "AlignState", "ALIGN_ALGOS", "ALIGN_LOSSES", "build_state", "make_data",
           "align_step", "train", "main"]

ALIGN_ALGOS = ("dpo", "cdpo", "ipo", "simpo", "orpo", "kto", "rft", "online_dpo")
ALIGN_LOSSES = ("dpo", "ipo", "simpo", "orpo", "kto", "sft")
#: losses that need the reference policy's log-probs
REF_LOSSES = ("dpo", "ipo", "kto")


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------
@dataclass
class AlignConfig:
    """Everything a direct-alignment run needs. Each field's docstring is printed by ``--help``."""

    # --- run -----------------------------------------------------------------------------
    algo: str = "dpo"
    """Label of the method (dpo, cdpo, ipo, simpo, orpo, kto, rft, online_dpo); it only names
    the run: ``loss`` and ``sampling`` decide what is computed."""
    run_dir: Optional[str] = None
    """Run folder. None: ``runs/<algo>-seed<seed>``."""
    overwrite: bool = False
    """Delete an existing run folder instead of refusing to start."""
    seed: int = 0
    """Seed of prompt sampling, generation, pair selection and minibatch order."""
    device: str = "cpu"
    """Torch device, e.g. ``cpu``, ``cuda``."""
    dtype: str = "float32"
    """Parameter dtype of policy and reference: float32, bfloat16 or float16."""
    num_threads: Optional[int] = None
    """``torch.set_num_threads`` for CPU runs; None leaves torch's default."""
    autocast_bf16: bool = False
    """Forward passes under ``torch.autocast(bfloat16)`` with float32 parameters (GPU)."""

    # --- model and task ------------------------------------------------------------------
    model_name: Optional[str] = None
    """Hugging Face id or local folder; None: the shipped model ``models.DEFAULT_MODEL``."""
    task: Optional[list] = None
    """Task mixture: list of ``{name, weight, config}`` reasoning-gym specs; None: ``rewards.DEFAULT_TASK``."""
    reward_mode: str = "exact"
    """Verifier score that labels completions: ``exact`` (0/1) or ``partial``."""
    answer_format: str = "plain"
    """``plain`` (the answer is the completion's last line) or ``tags`` (``<answer>...</answer>``)."""

    # --- data ----------------------------------------------------------------------------
    sampling: str = "offline"
    """``offline``: one dataset sampled from the initial policy before training (its reference
    log-probs computed once); ``online``: fresh completions from the current policy every step."""
    dataset_prompts: int = 480
    """Offline: prompts in the dataset (each with ``group_size`` completions)."""
    prompts_per_step: int = 16
    """Online: prompts sampled per step (each with ``group_size`` completions)."""
    group_size: int = 8
    """Completions per prompt; pairs are formed inside a prompt's group."""
    max_pairs_per_prompt: Optional[int] = 4
    """At most this many (chosen, rejected) pairs per prompt, drawn at random from the pairs
    whose scores differ; None: all of them."""
    pairs_per_step: int = 64
    """Offline: units per optimizer step (pairs; completions for KTO and SFT), drawn in
    shuffled passes over the dataset. Online: every unit of the step's samples is used."""
    max_new_tokens: int = 8
    """Longest completion sampled (tokens)."""
    temperature: float = 1.0
    """Sampling temperature; the same temperature scales the logits when scoring."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off)."""
    generation_batch_size: Optional[int] = None
    """Prompts per ``generate`` call; None: all prompts of a step (offline: 64) at once."""

    # --- loss ----------------------------------------------------------------------------
    loss: str = "dpo"
    """``dpo`` (with ``label_smoothing``: cDPO), ``ipo``, ``simpo``, ``orpo``, ``kto`` or
    ``sft`` (negative log-likelihood of the verified completions: rejection sampling)."""
    beta: float = 0.1
    """DPO/KTO KL coefficient; SimPO's reward scale."""
    label_smoothing: float = 0.0
    """cDPO's label-flip probability eps in [0, 0.5); 0 is DPO."""
    tau: float = 0.1
    """IPO's regularisation: the fixed point is h = 1/(2 tau)."""
    gamma: float = 0.5
    """SimPO's target margin."""
    lam: float = 0.1
    """ORPO's weight of the odds-ratio term."""
    kto_w_desirable: float = 1.0
    """KTO's weight of desirable completions."""
    kto_w_undesirable: float = 1.0
    """KTO's weight of undesirable completions."""
    average_logprobs: Optional[bool] = None
    """Sequence log-prob as the mean over tokens (True) or the sum (False); None: the loss's
    own (mean for simpo, orpo and sft; sum for dpo, ipo and kto)."""

    # --- optimisation --------------------------------------------------------------------
    steps: int = 30
    """Optimizer steps."""
    lr: float = 1e-4
    """AdamW learning rate (a fifth of the policy trainer's default: chapter 14)."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (to 10% of ``lr``), after ``warmup_steps`` linear warm-up."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm; None: no clipping (the norm is still logged)."""
    micro_batch_size: Optional[int] = None
    """Units per forward/backward pass (gradient accumulation); None: all units of the step."""

    # --- evaluation, logging, checkpoints ------------------------------------------------
    eval_every: int = 10
    """Held-out evaluation every this many steps (and at step 0 and the last step); 0: only at both ends."""
    eval_size: int = 128
    """Size of the fixed held-out evaluation set."""
    eval_seed: int = 1234
    """Seed of the held-out set."""
    eval_sampled: bool = True
    """Also evaluate with temperature sampling (greedy is always evaluated)."""
    eval_batch_size: int = 64
    """Prompts per generation call during evaluation."""
    save_every: int = 50
    """Checkpoint every this many steps (and at the end); 0: only at the end."""
    save_final_model: bool = True
    """Write the final policy with ``save_pretrained`` to ``<run_dir>/final``."""
    progress: bool = True
    """Show a tqdm progress bar (on stderr)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars when the ``tensorboard`` package is installed."""
    stop_after: Optional[int] = None
    """Stop (after saving a checkpoint) once this many steps ran in this process; resume later."""

    @property
    def average(self) -> bool:
        """Whether sequence log-probs are per-token means (see ``average_logprobs``)."""
        if self.average_logprobs is not None:
            return self.average_logprobs
        return self.loss in ("simpo", "orpo", "sft")

    @property
    def needs_ref(self) -> bool:
        """Whether the loss uses reference log-probs."""
        return self.loss in REF_LOSSES

    def validate(self) -> None:
        """Fail fast, before any model is loaded, on values that cannot work together
        (called by ``config.config_from_dict``)."""
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        import difflib

        literals = {"algo": ALIGN_ALGOS, "loss": ALIGN_LOSSES, "sampling": ("offline", "online"),
                    "dtype": tuple(DTYPES), "reward_mode": ("exact", "partial"),
                    "answer_format": ("plain", "tags"), "lr_schedule": ("constant", "cosine")}
        for name, allowed in literals.items():
            value = getattr(self, name)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.4)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                bad(f"{name}={value!r} is not one of {list(allowed)}{hint}")
        for name in ("steps", "dataset_prompts", "prompts_per_step", "group_size", "pairs_per_step",
                     "max_new_tokens", "eval_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, received {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "gamma", "lam"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, received {getattr(self, name)}")
        for name in ("beta", "tau", "kto_w_desirable", "kto_w_undesirable", "temperature"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                bad(f"{name} must be a positive finite number, received {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be a positive finite number, received {self.lr}")
        if not 0 <= self.label_smoothing < 0.5:
            bad(f"label_smoothing must be in [0, 0.5), received {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss != "dpo":
            bad(f"label_smoothing (cDPO) applies to loss='dpo' only, not {self.loss!r}")
        if self.loss != "sft" and self.loss != "kto" and self.group_size < 2:
            bad(f"loss={self.loss!r} forms pairs inside a prompt's group: group_size must be >= 2")
        if self.max_pairs_per_prompt is not None and self.max_pairs_per_prompt < 1:
            bad(f"max_pairs_per_prompt must be >= 1 or None, received {self.max_pairs_per_prompt}")
        if self.loss == "kto" and self.sampling == "offline" and self.dataset_prompts < 2:
            bad("loss='kto' needs dataset_prompts >= 2 (its reference point pairs completions with other prompts)")
        if self.loss == "kto" and self.sampling == "online" and self.prompts_per_step < 2:
            bad("loss='kto' needs prompts_per_step >= 2 (its reference point pairs completions with other prompts)")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], received {self.top_p}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            bad(f"adam_betas must be two numbers in [0, 1), received {self.adam_betas}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad(f"max_grad_norm must be > 0 or None, received {self.max_grad_norm}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            bad(f"micro_batch_size must be >= 1 or None, received {self.micro_batch_size}")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            bad(f"generation_batch_size must be >= 1 or None, received {self.generation_batch_size}")
        if self.autocast_bf16 and self.dtype != "float32":
            bad(f"autocast_bf16 is mixed precision for float32 parameters; received dtype={self.dtype!r}")
        if self.stop_after is not None and self.stop_after < 1:
            bad(f"stop_after must be >= 1 or None, received {self.stop_after}")
        if self.task is not None and (not self.task or not all(isinstance(s, dict) and "name" in s for s in self.task)):
            bad("task must be a non-empty list of {name, weight, config} mappings")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            bad(f"device={self.device!r} but torch.cuda.is_available() is False")


def default_run_dir(cfg: AlignConfig) -> Path:
    """``cfg.run_dir``, or ``runs/<algo>-seed<seed>``."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{cfg.algo}-seed{cfg.seed}"


def _seed_for(cfg: AlignConfig, step: int, salt: int = 0) -> int:
    """A fixed seed for each (step, purpose): makes runs resumable bit for bit."""
    return (cfg.seed * 1_000_003 + step * 9_973 + salt) % (2**31 - 1)


# ----------------------------------------------------------------------------------------
# Data: completions, labels, pairs, reference log-probs
# ----------------------------------------------------------------------------------------
@dataclass
class AlignData:
    """One batch of labelled completions and the training units built from it.

    Attributes:
        batch: ``N`` completions (groups of ``group_size`` per prompt).
        scores: ``(N,)`` verifier scores.
        units: ``(U, 2)`` long: (chosen row, rejected row) pairs for the pairwise losses;
            ``(U, 1)``: the rows themselves for KTO (every completion) and SFT (verified ones).
        desirable: ``(N,)`` bool, score >= 1 (KTO's label; the rows SFT keeps).
        ref_logp: ``(N,)`` sequence log-probs under the reference (None without a reference).
        kl_batch: KTO only: the mismatched batch (row ``i``'s completion under the prompt of
            row ``i + group_size``, cyclically), and ``kl_ref_logp`` ``(N,)`` its reference log-probs.
        prompts_with_pairs: prompts whose group gave at least one unit.
    """

    batch: RolloutBatch
    scores: torch.Tensor
    units: torch.Tensor
    desirable: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None
    kl_batch: Optional[RolloutBatch] = None
    kl_ref_logp: Optional[torch.Tensor] = None
    prompts_with_pairs: int = 0

    @property
    def num_units(self) -> int:
        return int(self.units.shape[0])


def _mismatched(batch: RolloutBatch, shift: int) -> RolloutBatch:
    """Row ``i``'s completion under row ``(i + shift) % N``'s prompt (KTO's KL pairs). With
    ``shift`` a multiple of the group size, each group gets the next group's prompt, so the
    rows stay in groups of one prompt."""
    n = len(batch)
    src = [(i + shift) % n for i in range(n)]
    return RolloutBatch(prompts=[batch.prompts[j] for j in src], texts=list(batch.texts),
                        prompt_ids=batch.prompt_ids[src], prompt_mask=batch.prompt_mask[src],
                        completion_ids=batch.completion_ids, completion_mask=batch.completion_mask,
                        logprobs=batch.logprobs,
                        group_size=batch.group_size if shift % batch.group_size == 0 else 1)


def _micro_slices(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _trim_prompt_padding(batch: RolloutBatch) -> RolloutBatch:
    """Drop the left prompt columns that are padding in every row (rows selected from a larger
    batch keep its width); positions come from the mask, so the log-probs are unchanged."""
    real = batch.prompt_mask.any(0)  # (P,)
    first = int(torch.nonzero(real).min()) if bool(real.any()) else 0
    if first == 0:
        return batch
    return replace(batch, prompt_ids=batch.prompt_ids[:, first:], prompt_mask=batch.prompt_mask[:, first:])


def _rows(batch: RolloutBatch, rows: list[int], group_size: int = 1) -> RolloutBatch:
    """``batch.select(rows)`` declaring ``group_size`` consecutive rows to share one prompt
    (pairs of one prompt: 2), so the prompt goes through the model once per group."""
    out = batch.select(rows)
    return replace(out, group_size=group_size) if group_size > 1 and len(rows) % group_size == 0 else out


def sequence_logp(cfg: AlignConfig, model, batch: RolloutBatch, *, average: bool | None = None) -> torch.Tensor:
    """``(N,)`` sequence log-probs of the batch's completions under ``model`` (differentiable
    when gradients are enabled): sums, or per-token means with ``average``."""
    from rlbook_code import rollout

    batch = _trim_prompt_padding(batch)
    with autocast(cfg.device, cfg.autocast_bf16):
        tok = rollout.completion_logprobs(model, batch, temperature=cfg.temperature,
                                          share_prompt=batch.group_size > 1).logprobs.float()
    mask = batch.completion_mask.to(tok.device)
    return preference.sequence_logprobs(tok, mask, average=cfg.average if average is None else average)


@torch.no_grad()
def _sequence_logp_nograd(cfg: AlignConfig, model, batch: RolloutBatch, chunk: int = 512) -> torch.Tensor:
    """``(N,)`` sequence log-probs in eval mode without gradients, ``chunk`` rows at a time
    (a multiple of the group size, so groups keep sharing their prompt)."""
    was = model.training
    model.eval()
    G = batch.group_size
    chunk = max(G, chunk - chunk % G)
    try:
        out = [sequence_logp(cfg, model, _rows(batch, list(range(s.start, s.stop)), G))
               for s in _micro_slices(len(batch), chunk)]
    finally:
        model.train(was)
    return torch.cat(out)


def sample_completions(cfg: AlignConfig, model, tokenizer, task, items: list, seed: int,
                       chunk: int | None = None) -> tuple[RolloutBatch, torch.Tensor]:
    """``group_size`` completions per item from ``model``, and their verifier scores ``(N,)``."""
    from rlbook_code import rollout

    prompts = [task.prompt(it) for it in items]
    chunk = cfg.generation_batch_size or chunk or len(prompts)
    model.eval()
    with autocast(cfg.device, cfg.autocast_bf16):
        parts = [rollout.generate(model, tokenizer, prompts[i:i + chunk], group_size=cfg.group_size,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=seed + i, share_prompt=True)
                 for i in range(0, len(prompts), chunk)]
    batch = concat_batches(parts, pad_token_id(tokenizer))
    rep = [it for it in items for _ in range(cfg.group_size)]
    scores = torch.tensor(task.score(batch.texts, rep, mode=cfg.reward_mode), dtype=torch.float32)
    return batch, scores


def select_pairs(scores: torch.Tensor, group_size: int, max_pairs: int | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Pairs ``(chosen, rejected)`` of row indices inside each group with
    ``scores[chosen] > scores[rejected]``; at most ``max_pairs`` per group, drawn uniformly
    without replacement. Returns ``((U, 2) long, number of groups with a pair)``."""
    pairs, groups = [], 0
    G = group_size
    for g in range(scores.numel() // G):
        s = scores[g * G:(g + 1) * G]
        cand = [(g * G + i, g * G + j) for i in range(G) for j in range(G) if s[i] > s[j]]
        if not cand:
            continue
        groups += 1
        if max_pairs is not None and len(cand) > max_pairs:
            keep = torch.randperm(len(cand), generator=generator)[:max_pairs].sort().values
            cand = [cand[k] for k in keep.tolist()]
        pairs += cand
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), groups


def make_data(cfg: AlignConfig, batch: RolloutBatch, scores: torch.Tensor, ref_model, seed: int) -> AlignData:
    """Units of the configured loss from a scored batch, with the reference log-probs of every
    completion (computed here, once, without gradients; ``ref_model=None``: none)."""
    desirable = scores >= 1.0
    G = cfg.group_size
    if cfg.loss == "kto":
        units = torch.arange(len(batch))[:, None]
        groups = batch.num_prompts
    elif cfg.loss == "sft":
        units = torch.nonzero(desirable).reshape(-1, 1)
        groups = int(desirable.view(-1, G).any(1).sum())
    else:
        units, groups = select_pairs(scores, G, cfg.max_pairs_per_prompt, torch.Generator().manual_seed(seed))
    data = AlignData(batch=batch, scores=scores, units=units, desirable=desirable, prompts_with_pairs=groups)
    if ref_model is not None:
        data.ref_logp = _sequence_logp_nograd(cfg, ref_model, batch)
        if cfg.loss == "kto":
            data.kl_batch = _mismatched(batch, G)
            data.kl_ref_logp = _sequence_logp_nograd(cfg, ref_model, data.kl_batch)
    return data


# ----------------------------------------------------------------------------------------
# Run state
# ----------------------------------------------------------------------------------------
@dataclass
class AlignState:
    """What the loop carries from step to step (the duck type ``train.run_eval`` reads)."""

    cfg: AlignConfig
    run_dir: Path
    policy: Any
    tokenizer: Any
    ref: Any  # frozen reference copy (online sampling with a reference loss), else None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    task: Any
    eval_items: list
    data: Optional[AlignData] = None  # the offline dataset
    step: int = 0
    items_drawn: int = 0
    build_s: float = 0.0  # seconds spent sampling and scoring the offline dataset
    value_head: Any = None  # none: the checkpoint format is the policy trainer's


def build_state(cfg: AlignConfig, run_dir: Path | None = None) -> AlignState:
    """Load the policy, the optimizer, the task and the held-out set; for offline sampling,
    sample and label the dataset from the initial policy and compute its reference log-probs
    (once); for online sampling with DPO/IPO/KTO, keep a frozen reference copy."""
    from rlbook_code import models, rewards

    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    policy, tokenizer = models.load_policy(cfg.model_name, device=cfg.device, dtype=DTYPES[cfg.dtype])
    task = rewards.TaskMixture(cfg.task if cfg.task is not None else rewards.DEFAULT_TASK, seed=cfg.seed,
                               answer_format=cfg.answer_format)
    eval_items = task.eval_items(cfg.eval_size, seed=cfg.eval_seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = AlignState(cfg=cfg, run_dir=Path(run_dir or default_run_dir(cfg)), policy=policy, tokenizer=tokenizer,
                       ref=None, optimizer=optimizer, scheduler=scheduler, task=task, eval_items=eval_items)
    if cfg.sampling == "offline":
        t0 = time.perf_counter()
        items = task.sample(cfg.dataset_prompts)
        state.items_drawn += len(items)
        batch, scores = sample_completions(cfg, policy, tokenizer, task, items, _seed_for(cfg, 0, salt=1), chunk=64)
        # the policy *is* the reference before its first update: reference log-probs, once
        state.data = make_data(cfg, batch, scores, policy, _seed_for(cfg, 0, salt=2))
        state.build_s = time.perf_counter() - t0
    elif cfg.needs_ref:
        state.ref = copy.deepcopy(policy).eval()
        state.ref.requires_grad_(False)
    return state


def _offline_indices(cfg: AlignConfig, n_units: int, step: int) -> torch.Tensor:
    """Unit indices of ``step`` (1-based): the next ``pairs_per_step`` of an endless stream of
    shuffled passes over the dataset (pass ``e`` shuffled with its own seed)."""
    start = (step - 1) * cfg.pairs_per_step
    out, perms = [], {}
    for k in range(start, start + cfg.pairs_per_step):
        e = k // n_units
        if e not in perms:
            perms[e] = torch.randperm(n_units, generator=torch.Generator().manual_seed(_seed_for(cfg, e, salt=5)))
        out.append(int(perms[e][k % n_units]))
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------------------------------
# The loss of a set of units
# ----------------------------------------------------------------------------------------
def units_loss(state: AlignState, data: AlignData, units: torch.Tensor, kl_ref: torch.Tensor | None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The differentiable mean loss over ``units`` (rows of ``data.units``) and its metrics.

    Metrics: the loss's own (``preference.PreferenceLoss.metrics``) and, without gradient,
    ``logp/chosen`` and ``logp/rejected`` (mean sequence log-prob under the policy: KTO's
    desirable / undesirable) and, where reference log-probs exist, ``logratio/chosen`` and
    ``logratio/rejected`` (mean ``log pi - log pi_ref``: chapter 14's "both fall")."""
    cfg = state.cfg
    policy = state.policy
    if units.shape[1] == 2:
        c_idx, r_idx = units[:, 0], units[:, 1]
        rows = units.reshape(-1).tolist()  # c0, r0, c1, r1, ...: each pair shares its prompt
        pair_batch = _rows(data.batch, rows, 2)
        logp = sequence_logp(cfg, policy, pair_batch).view(-1, 2)  # (n, 2)
        n = len(c_idx)
        c, r = logp[:, 0], logp[:, 1]
        ref_c = data.ref_logp[c_idx] if data.ref_logp is not None else None
        ref_r = data.ref_logp[r_idx] if data.ref_logp is not None else None
        if cfg.loss == "dpo":
            out = preference.dpo_loss(c, r, ref_c, ref_r, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
        elif cfg.loss == "ipo":
            out = preference.ipo_loss(c, r, ref_c, ref_r, tau=cfg.tau)
        elif cfg.loss == "simpo":
            out = preference.simpo_loss(c, r, beta=cfg.beta, gamma=cfg.gamma)
        else:  # orpo: the SFT term is the chosen completions' per-token mean NLL
            avg_c = c if cfg.average else None
            if avg_c is None:  # the odds need per-token means whatever the configured averaging
                both = sequence_logp(cfg, policy, pair_batch, average=True).view(-1, 2)
                avg_c, avg_r = both[:, 0], both[:, 1]
            else:
                avg_r = r
            out = preference.orpo_loss(avg_c, avg_r, -avg_c, lam=cfg.lam)
        chosen_rows, rejected_rows, lc, lr_ = c_idx, r_idx, c, r
    else:
        rows_t = units[:, 0]
        logp = sequence_logp(cfg, policy, data.batch.select(rows_t.tolist()))
        d = data.desirable[rows_t].to(logp.device)
        if cfg.loss == "kto":
            out = preference.kto_loss(logp, data.ref_logp[rows_t], d, kl_ref, beta=cfg.beta,
                                      w_desirable=cfg.kto_w_desirable, w_undesirable=cfg.kto_w_undesirable)
        else:  # sft on verified completions (rejection sampling): mean NLL per sequence
            losses = -logp
            out = preference.PreferenceLoss(loss=losses.mean(), losses=losses, chosen_rewards=logp.detach(),
                                            rejected_rewards=logp.detach()[:0], paired=False)
        chosen_rows, rejected_rows = rows_t[d.cpu()], rows_t[~d.cpu()]
        lc, lr_ = logp[d], logp[~d]
    m = out.metrics()
    if cfg.loss == "sft":
        m = {"loss": m["loss"]}
    with torch.no_grad():
        for name, rows_, vals in (("chosen", chosen_rows, lc), ("rejected", rejected_rows, lr_)):
            if vals.numel():
                m[f"logp/{name}"] = float(vals.mean())
                if data.ref_logp is not None:
                    m[f"logratio/{name}"] = float((vals - data.ref_logp[rows_]).mean())
    return out.loss, m


# ----------------------------------------------------------------------------------------
# One step, the loop
# ----------------------------------------------------------------------------------------
class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; the message names the step and the metric."""


def save_checkpoint(state: AlignState) -> Path:
    """Write ``<run_dir>/checkpoint`` (:func:`checkpoint.save_checkpoint`)."""
    return ckpt.save_checkpoint(state.run_dir, step=state.step, policy=state.policy, optimizer=state.optimizer,
                                scheduler=state.scheduler, items_drawn=state.items_drawn, config=state.cfg)


def load_checkpoint(state: AlignState, ckpt_dir: Path) -> None:
    """Restore weights and optimizer, replay the task's item stream past what building the
    state drew already (the offline dataset), then restore the generators."""
    blob = ckpt.load_checkpoint(ckpt_dir, policy=state.policy, optimizer=state.optimizer,
                                scheduler=state.scheduler, map_location=state.cfg.device)
    extra = blob["items_drawn"] - state.items_drawn
    if extra > 0:
        state.task.sample(extra)
    state.items_drawn = blob["items_drawn"]
    ckpt.set_rng_state(blob["rng"])
    state.step = blob["step"]


def _check_finite(state: AlignState, step: int, name: str, value: float) -> None:
    if not math.isfinite(value):
        path = save_checkpoint(state)
        raise NonFiniteError(f"step {step}: {name} is {value} (non-finite); stopped before the "
                             f"optimizer step, checkpoint saved to {path}")


def align_step(state: AlignState, step: int) -> dict[str, float]:
    """One optimizer step: the step's units (offline: the next minibatch of the dataset;
    online: fresh samples of the current policy, labelled and paired), then the loss in
    micro-batches, gradient clipping and AdamW."""
    cfg = state.cfg
    t0 = time.perf_counter()
    rec: dict[str, float] = {"step": step}
    if cfg.sampling == "offline":
        data = state.data
        if data.num_units == 0:
            raise ValueError("the offline dataset has no training unit (no group with both a right and a wrong "
                             "answer, or no verified answer): sample more prompts or change the task")
        idx = _offline_indices(cfg, data.num_units, step)
        rec["epoch"] = (step * cfg.pairs_per_step) / data.num_units
    else:
        items = state.task.sample(cfg.prompts_per_step)
        state.items_drawn += len(items)
        batch, scores = sample_completions(cfg, state.policy, state.tokenizer, state.task, items,
                                           _seed_for(cfg, step, salt=1))
        data = make_data(cfg, batch, scores, state.ref, _seed_for(cfg, step, salt=2))
        idx = torch.arange(data.num_units)
        rec["accuracy"] = float(data.desirable.float().mean())
        rec["reward_mean"] = float(scores.mean())
        rec["response_length"] = float(batch.completion_mask.sum(1).float().mean())
        rec["prompts_with_pairs"] = float(data.prompts_with_pairs)
    rec["units"] = float(len(idx))
    units = data.units[idx]  # (n, 2) or (n, 1)
    kl_ref = None
    if cfg.loss == "kto" and len(idx):
        rows = units[:, 0]
        with torch.no_grad():
            state.policy.eval()
            kl_logp = _sequence_logp_nograd(cfg, state.policy, data.kl_batch.select(rows.tolist()))
        kl_ref = preference.kto_reference_point(kl_logp, data.kl_ref_logp[rows])
    t1 = time.perf_counter()
    lr_now = state.scheduler.get_last_lr()[0]
    if len(idx):
        state.policy.train()
        state.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for sl in _micro_slices(len(idx), cfg.micro_batch_size):
            part = units[sl]
            w = part.shape[0] / len(idx)
            loss, m = units_loss(state, data, part, kl_ref)
            _check_finite(state, step, "loss", float(loss.detach()))
            (loss * w).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + w * v
                weights[k] = weights.get(k, 0.0) + w
        params = [p for grp in state.optimizer.param_groups for p in grp["params"]]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        gn = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        _check_finite(state, step, "grad_norm", gn)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        rec.update({k: v / weights[k] for k, v in sums.items()})
        rec["grad_norm"] = gn
    state.scheduler.step()
    t2 = time.perf_counter()
    rec["lr"] = float(lr_now)
    rec["rollout_s"] = t1 - t0
    rec["update_s"] = t2 - t1
    return rec


TIMING_KEYS = ("rollout_s", "update_s", "build_s")


def train(cfg: AlignConfig, resume: str | os.PathLike | None = None) -> Path:
    """Run (or resume) a direct-alignment run; returns the run folder."""
    from tqdm import tqdm

    from rlbook_code.evaluation import eval_line as _eval_line, run_eval

    cfg.validate()
    run_dir = ckpt.prepare_run_dir(default_run_dir(cfg) if resume is None else resume,
                                   resume=resume is not None, overwrite=cfg.overwrite)
    state = build_state(cfg, run_dir)
    if resume is not None:
        load_checkpoint(state, run_dir / "checkpoint")
        ckpt.truncate_metrics(run_dir, state.step)
    save_config(cfg, run_dir / "config.yaml")
    writer = ckpt.tensorboard_writer(run_dir, cfg.tensorboard)

    def log(rec: dict[str, float]) -> None:
        ckpt.append_metrics(run_dir, rec)
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(k, v, rec["step"])

    if state.step == 0:
        rec0: dict[str, float] = {"step": 0, **run_eval(state)}
        if state.data is not None:
            d = state.data
            rec0.update({"data/completions": float(len(d.batch)), "data/accuracy": float(d.desirable.float().mean()),
                         "data/units": float(d.num_units), "data/prompts_with_pairs": float(d.prompts_with_pairs),
                         "build_s": state.build_s})
        log(rec0)
        if cfg.progress:
            tqdm.write(_eval_line(0, rec0), file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not cfg.progress, file=sys.stderr,
               desc=cfg.algo, mininterval=1.0 if sys.stderr.isatty() else 10.0)
    ran = 0
    try:
        while state.step < cfg.steps:
            step = state.step + 1
            rec = align_step(state, step)
            state.step = step
            ran += 1
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                rec.update(run_eval(state))
                if cfg.progress:
                    tqdm.write(_eval_line(step, rec), file=sys.stderr)
            log(rec)
            bar.update(1)
            if "loss" in rec:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", units=int(rec["units"]), refresh=False)
            stopping = cfg.stop_after is not None and ran >= cfg.stop_after
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping:
                save_checkpoint(state)
            if stopping:
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if state.step >= cfg.steps and cfg.save_final_model:
        ckpt.save_final(run_dir / "final", state.policy, state.tokenizer)
    return run_dir


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """The command line (the policy trainer's, ``config.run_cli``: 0, 1 failed, 2 user error, 3 non-finite)."""
    return run_cli(argv, prog="python -m rlbook_code.align",
                   description="Direct alignment (DPO, cDPO, IPO, SimPO, ORPO, KTO, rejection sampling; offline or online).",
                   cls=AlignConfig, train_fn=train, config_hint="configs/align/*.yaml", stop_errors=(NonFiniteError,))


if __name__ == "__main__":
    sys.exit(main())
