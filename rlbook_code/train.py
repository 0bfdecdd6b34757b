"""One training loop for every algorithm of the book (chapters 08–10).

The loop is written only with the estimators of chapters 01–07::

    prompts  ~ task mixture                      (rewards.TaskMixture)
    rollouts = G completions per prompt          (rollout.generate)
    rewards  = verifier scores (+ shaping)       (rewards.TaskMixture.score)
    old/ref log-probs, values (no grad)          (rollout.completion_logprobs)
    advantages                                   (advantages.group_advantages / rloo_advantages / gae / whiten)
    for epoch in range(num_epochs):
        for minibatch in shuffled(batch):
            for micro_batch in minibatch:        (gradient accumulation)
                per-token loss                   (reinforce.reinforce_loss / clipping.*)
                + beta * KL(pi || pi_ref)        (kl.kl_k1 / kl_k2 / kl_k3)
                reduce                           (aggregation.aggregate, global normalizers)
                backward
            clip grad norm, AdamW step

Every algorithm (REINFORCE, RLOO, PPO, GRPO, Dr. GRPO, DAPO, GSPO, CISPO) is one
:class:`TrainConfig`; the YAML files in ``configs/`` are those configs, each with the
paper it follows.

Command line::

    python -m rlbook_code.train --config configs/grpo.yaml [--set key=value ...] [--resume RUN_DIR]

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per step),
``checkpoint/`` (policy, optimizer, scheduler, value head, RNG states, step) and, at the
end, ``final/`` (the policy in Hugging Face format, loadable with ``models.load_policy``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import inspect
import json
import math
import os
import random
import shutil
import sys
import textwrap
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

__all__ = [
    "TrainConfig",
    "ConfigError",
    "NonFiniteError",
    "load_config",
    "apply_overrides",
    "validate_config",
    "field_docs",
    "train",
    "main",
]

ALGORITHMS = ("reinforce", "rloo", "ppo", "grpo", "drgrpo", "dapo", "gspo", "cispo")
ADVANTAGES = ("group", "rloo", "gae", "reward")
LOSSES = ("reinforce", "ppo", "gspo", "cispo")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A bad configuration: raised before any model is loaded."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; the message names the step and the metric."""


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run needs. Each field's docstring is printed by ``--help``."""

    # --- run -----------------------------------------------------------------------------
    algo: str = "grpo"
    """Label of the algorithm (one of reinforce, rloo, ppo, grpo, drgrpo, dapo, gspo, cispo).
    It only names the run; the fields below decide what is computed."""
    run_dir: Optional[str] = None
    """Run folder. None: ``runs/<algo>-seed<seed>``."""
    overwrite: bool = False
    """Delete an existing run folder instead of refusing to start (notebooks re-run with it)."""
    seed: int = 0
    """Seed of prompt sampling, generation, minibatch shuffling and the value-head init."""
    device: str = "cpu"
    """Torch device, e.g. ``cpu``, ``cuda``, ``cuda:0``."""
    dtype: str = "float32"
    """Parameter dtype of policy and reference: float32, bfloat16 or float16."""
    num_threads: Optional[int] = None
    """``torch.set_num_threads`` for CPU runs; None leaves torch's default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory on large models)."""
    autocast_bf16: bool = False
    """Run forward passes under ``torch.autocast(bfloat16)`` while parameters, gradients and
    AdamW states stay in ``dtype`` (use with dtype float32 on a GPU: mixed precision)."""

    # --- model and task ------------------------------------------------------------------
    model_name: Optional[str] = None
    """Hugging Face id or local folder; None: the shipped model ``models.DEFAULT_MODEL``."""
    task: Optional[list] = None
    """Task mixture: list of ``{name, weight, config}`` reasoning-gym specs; None: ``rewards.DEFAULT_TASK``."""
    reward_mode: str = "exact"
    """Verifier score: ``exact`` (1 if the extracted answer matches, else 0) or ``partial``."""
    answer_format: str = "plain"
    """``plain`` (the answer is the completion's last line; the shipped model) or ``tags``
    (the prompt asks for ``<answer>...</answer>``; chat models)."""

    # --- sampling ------------------------------------------------------------------------
    steps: int = 300
    """Number of policy-update steps (one rollout batch each)."""
    prompts_per_step: int = 16
    """Prompts per rollout batch; the batch holds ``prompts_per_step * group_size`` completions."""
    group_size: int = 8
    """Completions per prompt (G). Group and leave-one-out baselines need G >= 2."""
    max_new_tokens: int = 8
    """Longest completion sampled (tokens)."""
    temperature: float = 1.0
    """Sampling temperature; the same temperature scales the logits when scoring."""
    top_p: float = 1.0
    """Nucleus sampling threshold. Keep 1.0 for on-policy RL: the loss scores the full softmax."""
    generation_batch_size: Optional[int] = None
    """Prompts per ``generate`` call (bounds the KV cache on a GPU); None: all prompts at once."""
    share_prompt: bool = True
    """Run each prompt through the model once per group, not ``G`` times, when sampling and
    scoring (``rollout.shared_prompt_cache``): same log-probs and gradients to float rounding,
    much less compute when prompts are longer than completions. Minibatches are then drawn as
    whole groups. False: every row is a full forward pass (the plain reference)."""

    # --- optimisation --------------------------------------------------------------------
    lr: float = 5e-4
    """AdamW learning rate of the policy."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (to 10% of ``lr``), both after ``warmup_steps`` linear warm-up."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value; None: no clipping (the norm is still logged)."""
    num_epochs: int = 1
    """Passes over each rollout batch (PPO epochs); >1 makes the later minibatches off-policy."""
    num_minibatches: int = 1
    """Optimizer steps per epoch; the rollout batch is shuffled and split into this many."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward pass (gradient accumulation); None: the whole minibatch."""

    # --- advantages and loss -------------------------------------------------------------
    advantage: str = "group"
    """``group`` (GRPO, ``group_advantages``), ``rloo`` (leave-one-out), ``gae`` (PPO critic),
    ``reward`` (the raw reward, REINFORCE)."""
    adv_scale: str = "group"
    """Scale of ``group`` advantages: ``group`` std (GRPO), ``batch`` std, or ``none`` (Dr. GRPO)."""
    whiten_advantages: bool = False
    """Whiten advantages over the batch's response tokens (mean 0, std 1) before the loss."""
    loss: str = "ppo"
    """Per-token policy loss: ``reinforce`` (-A log pi), ``ppo`` (clipped ratio),
    ``gspo`` (sequence ratio), ``cispo`` (clipped, detached IS weight)."""
    clip_eps_low: Optional[float] = 0.2
    """Lower clip range (ratio >= 1 - eps_low). ``None`` for CISPO means no lower clip."""
    clip_eps_high: float = 0.2
    """Upper clip range (ratio <= 1 + eps_high); larger than ``clip_eps_low`` is DAPO's clip-higher."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for A < 0 (Ye et al. 2020); None: off. PPO loss only."""
    aggregation: str = "token-mean"
    """How the (B, T) loss becomes a scalar: token-mean, seq-mean-token-sum, seq-mean-token-mean,
    seq-mean-token-sum-norm (divides by ``max_new_tokens``: Dr. GRPO)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (subtracted from the loss); 0: entropy is only logged."""

    # --- reference model and KL ----------------------------------------------------------
    beta: float = 0.0
    """KL coefficient towards the frozen initial policy; 0 means no reference copy is loaded."""
    kl_estimator: str = "k3"
    """Per-token estimator of KL(pi || pi_ref) from samples of pi: k1, k2 or k3."""
    kl_in: str = "loss"
    """Where the KL penalty goes: ``loss`` (added per token, GRPO) or ``reward`` (subtracted from it, PPO/RLHF)."""

    # --- PPO critic ----------------------------------------------------------------------
    vf_coef: float = 0.5
    """Weight of the value loss in the total loss (advantage = gae only)."""
    value_clip: Optional[float] = 0.2
    """Value clipping range around the rollout-time values; None: plain squared error."""
    value_lr: Optional[float] = None
    """Learning rate of the value head; None: ``lr``."""
    value_hidden: int = 64
    """Width of the value head's hidden layer (an MLP on the policy's final hidden states)."""
    value_detach: bool = True
    """Stop value-loss gradients at the policy's hidden states (the critic does not move the policy)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """GAE lambda."""

    # --- DAPO ----------------------------------------------------------------------------
    dynamic_sampling: bool = False
    """Drop groups whose rewards all agree (no gradient) and sample more prompts to refill."""
    max_sampling_rounds: int = 4
    """Rollout rounds per step for dynamic sampling before training on what was kept."""
    overlong_buffer: Optional[int] = None
    """DAPO soft overlong punishment: the last this-many tokens before ``max_new_tokens`` get a
    linearly growing penalty up to ``overlong_penalty``; None: off."""
    overlong_penalty: float = 1.0
    """Largest overlong penalty (subtracted from the reward at ``max_new_tokens``)."""

    # --- evaluation, logging, checkpoints ------------------------------------------------
    eval_every: int = 25
    """Held-out evaluation every this many steps (and at step 0 and the last step); 0: only at both ends."""
    eval_size: int = 128
    """Size of the fixed held-out evaluation set."""
    eval_seed: int = 1234
    """Seed of the held-out set (a stream disjoint from the training prompts)."""
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


_LITERALS: dict[str, tuple] = {
    "algo": ALGORITHMS,
    "dtype": tuple(DTYPES),
    "reward_mode": ("exact", "partial"),
    "answer_format": ("plain", "tags"),
    "lr_schedule": ("constant", "cosine"),
    "advantage": ADVANTAGES,
    "adv_scale": ("group", "batch", "none"),
    "loss": LOSSES,
    "aggregation": AGGREGATIONS,
    "kl_estimator": KL_ESTIMATORS,
    "kl_in": ("loss", "reward"),
}


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """The docstring under each dataclass field (CleanRL style), read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Check (and gently coerce int -> float) one field value against its annotation."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(name, value, args[0])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "5e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    base = origin or tp
    if base is list and isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"config field {name!r} expects {getattr(tp, '__name__', tp)}, "
                          f"received {value!r} ({type(value).__name__})")
    return value


# Names other trainers use for the same fields: suggested when difflib finds nothing close.
_ALIASES = {"learning_rate": "lr", "kl_coef": "beta", "init_kl_coef": "beta", "num_generations": "group_size",
            "n_samples": "group_size", "epsilon": "clip_eps_low", "epsilon_high": "clip_eps_high",
            "cliprange": "clip_eps_low", "cliprange_value": "value_clip", "loss_agg_mode": "aggregation",
            "ppo_epochs": "num_epochs", "total_steps": "steps", "max_steps": "steps",
            "max_completion_length": "max_new_tokens", "response_length": "max_new_tokens",
            "scale_rewards": "adv_scale", "model": "model_name", "batch_size": "prompts_per_step"}


def _unknown_key_error(key: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, names, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a dict, rejecting unknown keys (naming the nearest
    valid one) and values of the wrong type, then :func:`validate_config`."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of field names to values, received {type(d).__name__}")
    types = _field_types()
    kwargs = {}
    for key, value in d.items():
        if key not in types:
            raise _unknown_key_error(key)
        kwargs[key] = _check_type(key, value, types[key])
    cfg = TrainConfig(**kwargs)
    validate_config(cfg)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides (values parsed as YAML), validate."""
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    d.update(parse_overrides(overrides or []))
    return config_from_dict(d)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "beta=0"]`` -> ``{"lr": 0.001, "beta": 0}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, received {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def apply_overrides(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``cfg`` with fields changed (same checks as loading)."""
    d = dataclasses.asdict(cfg)
    d.update(changes)
    return config_from_dict(d)


def validate_config(cfg: TrainConfig) -> None:
    """Fail fast, before any model is loaded, on values that cannot work together."""
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    for name, allowed in _LITERALS.items():
        value = getattr(cfg, name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            bad(f"{name}={value!r} is not one of {list(allowed)}{hint}")
    if cfg.generation_batch_size is not None and cfg.generation_batch_size < 1:
        bad(f"generation_batch_size must be >= 1 or None, received {cfg.generation_batch_size}")
    if cfg.autocast_bf16 and cfg.dtype != "float32":
        bad(f"autocast_bf16 is mixed precision for float32 parameters; received dtype={cfg.dtype!r}")
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "num_epochs",
                 "num_minibatches", "max_sampling_rounds", "eval_size", "eval_batch_size",
                 "value_hidden"):
        if getattr(cfg, name) < 1:
            bad(f"{name} must be >= 1, received {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "beta",
                 "entropy_coef", "vf_coef", "overlong_penalty"):
        if getattr(cfg, name) < 0:
            bad(f"{name} must be >= 0, received {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad(f"lr must be a positive finite number, received {cfg.lr}")
    if cfg.value_lr is not None and not cfg.value_lr > 0:
        bad(f"value_lr must be > 0 or None, received {cfg.value_lr}")
    if not cfg.temperature > 0:
        bad(f"temperature must be > 0, received {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        bad(f"top_p must be in (0, 1], received {cfg.top_p}")
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        bad(f"adam_betas must be two numbers in [0, 1), received {cfg.adam_betas}")
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        bad(f"max_grad_norm must be > 0 or None, received {cfg.max_grad_norm}")
    if cfg.advantage in ("group", "rloo") and cfg.group_size < 2:
        bad(f"advantage={cfg.advantage!r} needs group_size >= 2, received {cfg.group_size}")
    if cfg.dynamic_sampling and cfg.group_size < 2:
        bad("dynamic_sampling needs group_size >= 2 (a group of one never varies)")
    if cfg.loss != "cispo" and cfg.clip_eps_low is None:
        bad(f"clip_eps_low=None (no lower clip) is only meaningful for loss='cispo', not {cfg.loss!r}")
    if cfg.clip_eps_low is not None and not 0 <= cfg.clip_eps_low < 1:
        bad(f"clip_eps_low must be in [0, 1), received {cfg.clip_eps_low}")
    if not cfg.clip_eps_high >= 0:
        bad(f"clip_eps_high must be >= 0, received {cfg.clip_eps_high}")
    if cfg.dual_clip is not None and (cfg.loss != "ppo" or not cfg.dual_clip > 1):
        bad(f"dual_clip needs loss='ppo' and a value > 1, received loss={cfg.loss!r}, dual_clip={cfg.dual_clip}")
    batch = cfg.prompts_per_step * cfg.group_size
    if batch % cfg.num_minibatches:
        bad(f"num_minibatches={cfg.num_minibatches} must divide the batch of "
            f"prompts_per_step*group_size={batch} completions")
    mb = batch // cfg.num_minibatches
    if cfg.micro_batch_size is not None and (cfg.micro_batch_size < 1 or mb % cfg.micro_batch_size):
        bad(f"micro_batch_size={cfg.micro_batch_size} must divide the minibatch of {mb} completions")
    if cfg.overlong_buffer is not None and not 0 < cfg.overlong_buffer <= cfg.max_new_tokens:
        bad(f"overlong_buffer must be in [1, max_new_tokens={cfg.max_new_tokens}], received {cfg.overlong_buffer}")
    if cfg.value_clip is not None and not cfg.value_clip > 0:
        bad(f"value_clip must be > 0 or None, received {cfg.value_clip}")
    if not 0 <= cfg.gamma <= 1 or not 0 <= cfg.lam <= 1:
        bad(f"gamma and lam must be in [0, 1], received gamma={cfg.gamma}, lam={cfg.lam}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        bad(f"stop_after must be >= 1 or None, received {cfg.stop_after}")
    if cfg.task is not None:
        if not cfg.task or not all(isinstance(s, dict) and "name" in s for s in cfg.task):
            bad("task must be a non-empty list of {name, weight, config} mappings")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        bad(f"device={cfg.device!r} but torch.cuda.is_available() is False")


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


def _seed_for(cfg: TrainConfig, step: int, round_: int = 0, salt: int = 0) -> int:
    """A fixed seed for each (step, sampling round): makes runs resumable bit for bit."""
    return (cfg.seed * 1_000_003 + step * 9_973 + round_ * 101 + salt) % (2**31 - 1)


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return f


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{cfg.algo}-seed{cfg.seed}"


def build_state(cfg: TrainConfig, run_dir: Path | None = None) -> TrainState:
    """Load the policy (and the reference copy if ``beta > 0``), the value head (PPO), the
    optimizer, the task and the fixed evaluation set."""
    from rlbook_code import models, rewards
    from rlbook_code.value_head import ValueHead

    validate_config(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    policy, tokenizer = models.load_policy(cfg.model_name, device=cfg.device, dtype=dtype)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it (the old name still works, with a FutureWarning)
        (getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable)()
        if hasattr(policy.config, "use_cache"):
            policy.config.use_cache = False
    ref = None
    if cfg.beta > 0:
        ref = copy.deepcopy(policy).eval()
        ref.requires_grad_(False)
    value_head = None
    params = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr}]
    if cfg.advantage == "gae":
        g = torch.Generator().manual_seed(_seed_for(cfg, 0, salt=7))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            value_head = ValueHead(policy.config.hidden_size, cfg.value_hidden)
        value_head.to(cfg.device)
        params.append({"params": list(value_head.parameters()), "lr": cfg.value_lr or cfg.lr})
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    task = rewards.TaskMixture(cfg.task if cfg.task is not None else rewards.DEFAULT_TASK, seed=cfg.seed,
                               answer_format=cfg.answer_format)
    eval_items = task.eval_items(cfg.eval_size, seed=cfg.eval_seed)
    return TrainState(cfg=cfg, run_dir=Path(run_dir or default_run_dir(cfg)), policy=policy,
                      tokenizer=tokenizer, ref=ref, value_head=value_head, optimizer=optimizer,
                      scheduler=scheduler, task=task, eval_items=eval_items)


# ----------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------
def _pad_to(x: torch.Tensor, width: int, value: Any, left: bool) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = x.new_full((x.shape[0], extra) + tuple(x.shape[2:]), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _autocast(cfg: TrainConfig):
    """bf16 autocast for the forward passes when ``autocast_bf16`` (else a no-op context)."""
    import contextlib

    if not cfg.autocast_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)


def concat_batches(batches: list, pad_token_id: int):
    """Concatenate :class:`rollout.RolloutBatch` objects from several ``generate`` calls
    (prompts re-padded on the left, completions on the right)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    out = {}
    for f in dataclasses.fields(first):
        vals = [getattr(b, f.name) for b in batches]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor) and v0.dim() >= 2:
            width = max(v.shape[1] for v in vals)
            left = f.name.startswith("prompt")
            fill = False if v0.dtype == torch.bool else (pad_token_id if not v0.is_floating_point() else 0.0)
            out[f.name] = torch.cat([_pad_to(v, width, fill, left) for v in vals], dim=0)
        elif isinstance(v0, torch.Tensor):
            out[f.name] = torch.cat(vals, dim=0)
        elif isinstance(v0, list):
            out[f.name] = [x for v in vals for x in v]
        else:
            out[f.name] = v0
    return type(first)(**out)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), ``(B,)`` -> ``(B,)`` (<= 0).

    0 up to ``max_len - buffer`` tokens, then linear down to ``-penalty`` at ``max_len``."""
    start = max_len - buffer
    frac = ((lengths.float() - start) / buffer).clamp(min=0.0, max=1.0)
    return -penalty * frac


def collect_rollouts(state: TrainState, step: int) -> tuple[Any, list, torch.Tensor, dict[str, float]]:
    """Sample prompts, generate ``G`` completions each and score them.

    With ``dynamic_sampling`` (DAPO), groups whose scores all agree are dropped and more
    prompts are drawn, up to ``max_sampling_rounds`` rounds; the step then trains on the first
    ``prompts_per_step`` kept groups (or on fewer, if the rounds ran out; or on the last
    round's batch if nothing varied at all).

    Returns ``(batch, items, scores (N,), stats)`` with one item per completion."""
    from rlbook_code import rollout

    cfg, G = state.cfg, state.cfg.group_size
    state.policy.eval()
    kept, kept_items, kept_scores = [], [], []
    n_kept = n_groups = n_zero_var = 0
    last = None
    for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        items = state.task.sample(cfg.prompts_per_step)
        state.items_drawn += len(items)
        prompts = [state.task.prompt(it) for it in items]
        chunk = cfg.generation_batch_size or len(prompts)
        with _autocast(cfg):
            parts = [rollout.generate(state.policy, state.tokenizer, prompts[i:i + chunk], group_size=G,
                                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seed=_seed_for(cfg, step, round_, salt=i),
                                      share_prompt=cfg.share_prompt)
                     for i in range(0, len(prompts), chunk)]
        batch = concat_batches(parts, _pad_id(state.tokenizer))
        rep_items = [it for it in items for _ in range(G)]
        scores = torch.tensor(state.task.score(batch.texts, rep_items, mode=cfg.reward_mode),
                              dtype=torch.float32)
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
    stats = {"zero_var_frac": n_zero_var / n_groups, "sampling_rounds": float(round_ + 1)}
    if cfg.dynamic_sampling and kept:
        batch = concat_batches(kept, _pad_id(state.tokenizer))
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
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def needs_old_pass(cfg: TrainConfig) -> bool:
    """Whether a step needs the separate no-grad pass for the old log-probs.

    With one update per rollout batch (``num_epochs == num_minibatches == 1``) the policy
    being differentiated *is* the policy that sampled, so ``pi_old`` equals ``pi`` and the old
    log-probs are the new ones, detached (the ratio is exactly 1; TRL skips the pass the same
    way). The pass is still run when a value head or a reference model needs its outputs."""
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
    n = batch.completion_ids.shape[0]
    for sl in _micro_slices(n, cfg.micro_batch_size):
        mb = batch.select(list(range(sl.start, sl.stop)))
        with _autocast(cfg):
            out = rollout.completion_logprobs(state.policy, mb, temperature=cfg.temperature,
                                              with_entropy=True, with_hidden=critic,
                                              share_prompt=cfg.share_prompt)
        old.append(out.logprobs.float())
        ent.append(out.entropy.float())
        if critic:
            val.append(state.value_head(out.hidden))
        if state.ref is not None:
            with _autocast(cfg):
                ref.append(rollout.completion_logprobs(state.ref, mb, temperature=cfg.temperature,
                                                       share_prompt=cfg.share_prompt).logprobs.float())
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
    with _autocast(cfg):
        out = rollout.completion_logprobs(state.policy, mb, temperature=cfg.temperature,
                                          with_entropy=cfg.entropy_coef > 0 or old_logp is None,
                                          entropy_grad=cfg.entropy_coef > 0,  # else a metric only
                                          with_hidden=critic, share_prompt=cfg.share_prompt)
    logp = out.logprobs.float()  # (b, T)
    mask = mb.completion_mask  # (b, T)
    entropy_metric = None
    if old_logp is None:
        old_logp = logp.detach()
        entropy_metric = float(masked_mean(out.entropy.detach().float(), mask))  # detach: entropy_coef > 0
    metrics: dict[str, float] = {}
    if cfg.loss == "reinforce":
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
    if ref_logp is not None and cfg.kl_in == "loss":
        per_token = per_token + cfg.beta * torch.where(mask, kl_per_token(cfg, logp, ref_logp), 0.0)
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * torch.where(mask, out.entropy, 0.0)
    pg_loss = aggregation.aggregate(per_token, mask, cfg.aggregation, max_len=cfg.max_new_tokens,
                                    num_tokens=num_tokens, num_seqs=num_seqs)
    metrics["pg_loss"] = float(pg_loss.detach())
    loss = pg_loss
    if critic:
        hidden = out.hidden.detach() if cfg.value_detach else out.hidden
        values = state.value_head(hidden)  # (b, T)
        err = (values - returns) ** 2
        if cfg.value_clip is not None:
            clipped = old_values + (values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
            err_c = (clipped - returns) ** 2
            metrics["value_clip_frac"] = float(masked_mean((err_c > err).float(), mask))
            err = torch.maximum(err, err_c)
        v_loss = aggregation.aggregate(torch.where(mask, 0.5 * err, 0.0), mask, "token-mean",
                                       num_tokens=num_tokens)
        metrics["value_loss"] = float(v_loss.detach())
        loss = loss + cfg.vf_coef * v_loss
    metrics["loss"] = float(loss.detach())
    return loss, metrics


# ----------------------------------------------------------------------------------------
# Checkpoints and metrics
# ----------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_config(cfg: TrainConfig, path: Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


def save_checkpoint(state: TrainState) -> Path:
    """Write ``<run_dir>/checkpoint`` atomically (a temporary folder, then a rename)."""
    final = state.run_dir / "checkpoint"
    tmp = state.run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({
        "step": state.step,
        "policy": state.policy.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "value_head": state.value_head.state_dict() if state.value_head is not None else None,
        "rng": _rng_state(),
        "items_drawn": state.items_drawn,
    }, tmp / "state.pt")
    save_config(state.cfg, tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_checkpoint(state: TrainState, ckpt_dir: Path) -> None:
    blob = torch.load(ckpt_dir / "state.pt", map_location=state.cfg.device, weights_only=False)
    state.policy.load_state_dict(blob["policy"])
    state.optimizer.load_state_dict(blob["optimizer"])
    state.scheduler.load_state_dict(blob["scheduler"])
    if state.value_head is not None:
        state.value_head.load_state_dict(blob["value_head"])
    # the task's item stream is restored by drawing (and discarding) as many items as before
    state.items_drawn = int(blob["items_drawn"])
    if state.items_drawn:
        state.task.sample(state.items_drawn)
    _set_rng_state(blob["rng"])
    state.step = int(blob["step"])


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The records of ``<run_dir>/metrics.jsonl`` (one dict per line)."""
    path = Path(run_dir) / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append_metrics(run_dir: Path, record: dict[str, float]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, step: int) -> None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r["step"] <= step]
    with open(path, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")


def _tensorboard_writer(cfg: TrainConfig, run_dir: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


# ----------------------------------------------------------------------------------------
# Evaluation, one step, the loop
# ----------------------------------------------------------------------------------------
def run_eval(state: TrainState) -> dict[str, float]:
    """Greedy (and sampled) accuracy on the fixed held-out set."""
    from rlbook_code.evaluation import evaluate

    cfg = state.cfg
    state.policy.eval()
    out = {}
    modes = [("greedy", True)] + ([("sampled", False)] if cfg.eval_sampled else [])
    for name, greedy in modes:
        with _autocast(cfg):
            r = evaluate(state.policy, state.tokenizer, state.task, state.eval_items,
                         max_new_tokens=cfg.max_new_tokens, greedy=greedy, temperature=cfg.temperature,
                         batch_size=cfg.eval_batch_size, seed=cfg.eval_seed)
        out[f"eval/{name}_accuracy"] = float(r["accuracy"])
        out[f"eval/{name}_length"] = float(r["mean_length"])
    return out


def _check_finite(state: TrainState, step: int, name: str, value: float) -> None:
    if not math.isfinite(value):
        path = save_checkpoint(state)
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
            for sl in _micro_slices(len(idx), cfg.micro_batch_size):
                sub = idx[sl]
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
    for k, v in sums.items():
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
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "checkpoint" / "state.pt").exists():
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoint/state.pt in that folder")
    else:
        run_dir = default_run_dir(cfg)
        if run_dir.exists() and any(run_dir.iterdir()):
            if not cfg.overwrite:
                raise FileExistsError(f"run folder {run_dir} exists; pass --resume {run_dir}, "
                                      f"choose another run_dir, or set overwrite=true")
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = build_state(cfg, run_dir)
    if resume is not None:
        load_checkpoint(state, run_dir / "checkpoint")
        _truncate_metrics(run_dir, state.step)
    save_config(cfg, run_dir / "config.yaml")
    writer = _tensorboard_writer(cfg, run_dir)

    def log(rec: dict[str, float]) -> None:
        _append_metrics(run_dir, rec)
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(k, v, rec["step"])

    if state.step == 0:
        ev = run_eval(state)
        log({"step": 0, **ev})
        if cfg.progress:
            tqdm.write(_eval_line(0, ev), file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not cfg.progress, file=sys.stderr,
               desc=cfg.algo, mininterval=1.0 if sys.stderr.isatty() else 10.0)  # few lines in notebooks
    ran = 0
    try:
        while state.step < cfg.steps:
            step = state.step + 1
            rec = train_step(state, step)
            state.step = step
            ran += 1
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                rec.update(run_eval(state))
                if cfg.progress:
                    tqdm.write(_eval_line(step, rec), file=sys.stderr)
            log(rec)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", acc=f"{rec['accuracy']:.2f}",
                            len=f"{rec['response_length']:.1f}", refresh=False)
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
        final = run_dir / "final"
        state.policy.save_pretrained(final)
        state.tokenizer.save_pretrained(final)
        if state.value_head is not None:
            torch.save(state.value_head.state_dict(), final / "value_head.pt")
    return run_dir


def _eval_line(step: int, rec: dict[str, float]) -> str:
    parts = [f"{k.split('/')[1]} {v:.3f}" for k, v in rec.items() if k.startswith("eval/") and k.endswith("accuracy")]
    return f"eval @ step {step}: " + ", ".join(parts)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def _help_epilog() -> str:
    docs = field_docs()
    lines = ["config fields (YAML keys, also --set key=value):"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} (default {default!r})")
        lines += textwrap.wrap(docs.get(f.name, ""), 88, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlbook_code.train",
        description="Train a policy with one of the book's algorithms.",
        epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (value parsed as YAML); repeatable")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.resume:
            saved = Path(args.resume) / "checkpoint" / "config.yaml"
            if not saved.exists():
                parser.error(f"--resume {args.resume}: no checkpoint/config.yaml in that folder")
            cfg = load_config(saved, args.overrides)
        elif args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = config_from_dict(parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run_dir = train(cfg, resume=args.resume)
    except NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
