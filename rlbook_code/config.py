"""The trainer's configuration: :class:`TrainConfig`, its YAML loading and its checks.

Every algorithm of the book is one :class:`TrainConfig`; the files in ``configs/`` are such
configs. A config is a dataclass whose fields carry their own docstrings (printed by
``python -m rlbook_code.train --help``). Loading is strict:

* an unknown key fails, naming the nearest valid key (or the book's name for another
  trainer's key: ``learning_rate`` -> ``lr``, ``num_generations`` -> ``group_size``);
* a value of the wrong type fails, naming the field and the expected type;
* :func:`validate_config` rejects values that cannot work together, before any model loads.

Command-line overrides are ``key=value`` strings whose values are parsed as YAML
(``--set lr=1e-3 --set task=null``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import textwrap
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import yaml

__all__ = [
    "TrainConfig",
    "ConfigError",
    "field_docs",
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "apply_overrides",
    "validate_config",
    "save_config",
    "config_help",
    "run_cli",
    "lr_lambda",
    "default_run_dir",
    "ALGORITHMS",
    "ADVANTAGES",
    "LOSSES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "DTYPES",
    "IS_CORRECTIONS",
]

ALGORITHMS = ("reinforce", "rloo", "ppo", "grpo", "drgrpo", "dapo", "gspo", "cispo")
ADVANTAGES = ("group", "rloo", "gae", "reward")
LOSSES = ("reinforce", "ppo", "gspo", "cispo")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IS_CORRECTIONS = ("none", "clip", "tis", "mis", "decoupled")


class ConfigError(ValueError):
    """A bad configuration: raised before any model is loaded."""


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
    """Parameter dtype of policy and reference: float32, bfloat16 or float16. With LoRA
    (``lora_rank > 0``) it is the frozen base's dtype only: the adapters stay float32, so
    ``bfloat16`` halves the weights' memory without the rounding pitfall of bfloat16 master weights."""
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

    # --- off-policy (chapter 11; module async_sampler) -----------------------------------
    staleness: int = 0
    """Lag k of a synchronous stale sampler: the batch of update t is sampled by the weights of
    update t - k (a ring buffer of k + 1 weight snapshots; the first k updates use the initial
    weights). 0: on-policy, today's runs bit for bit."""
    is_correction: str = "none"
    """Off-policy correction: ``none`` (train the batch as if on-policy), ``clip`` (the loss's
    ratio is taken against the sampler's log-probs: the clip is the only correction), ``tis``
    (truncated IS weight pi_prox/mu times the loss), ``mis`` (masked IS weight, IcePop) or
    ``decoupled`` (AReaL's decoupled PPO; needs loss=ppo). mu is the sampler's own log-probs."""
    is_level: str = "token"
    """Level of the tis/mis weight: ``token`` (one ratio per token) or ``sequence`` (product over the response)."""
    is_low: Optional[float] = None
    """Lower bound of the tis/mis weight (tis: raised to it; mis: dropped below it); None: none."""
    is_high: float = 2.0
    """Upper bound of the tis/mis weight (tis: capped at it; mis: dropped above it)."""
    max_behav_weight: Optional[float] = 5.0
    """``decoupled``: tokens whose behaviour weight pi_prox/mu exceeds this are dropped; None: no cap."""
    sampler_dtype: Optional[str] = None
    """Parameter dtype of the sampler's copy of the policy (e.g. bfloat16, against a float32
    learner: the engine mismatch of vLLM vs the trainer); None: the sampler is the learner's dtype."""
    sampler_temperature: Optional[float] = None
    """Temperature the sampler samples at (the learner scores at ``temperature``); None: the same."""
    async_rollouts: bool = False
    """Sample in a separate process (torch.multiprocessing, spawn) from the newest weights it
    received, while the learner trains; batches carry the weight version that sampled them."""
    sync_every: int = 1
    """Async: the learner sends its weights to the sampler every this many updates."""
    max_staleness: int = 4
    """Async: a batch sampled more than this many weight versions ago is dropped (and counted)."""
    sampler_queue: int = 1
    """Async: finished batches the sampler may hold ready ahead of the learner."""

    # --- divergence to the reference: KL or optimal transport (chapter 16; module ot) ----
    divergence: str = "kl"
    """What ``beta`` weighs: ``kl`` (the ``kl_estimator`` of KL(pi || pi_ref), per token) or ``ot``
    (``ot_regularizer.ot_penalty``: a Sinkhorn divergence between the policy's expected token
    embeddings along each completion and the embeddings of the reference policy's greedy
    completion of the same prompt, per sequence; the KL is then only logged)."""
    ot_eps: float = 0.1
    """Entropic regularisation of the OT penalty, in units of ``ot_cost`` (cosine costs lie in [0, 2])."""
    ot_window: Optional[int] = None
    """Positional band of the OT penalty: position i may only move to positions within this many
    (relative) positions, ``ot.window_mask``; 0: position by position; None: anywhere."""
    ot_cost: str = "cosine"
    """Cost between two token embeddings: ``cosine`` (1 - cos) or ``sqeuclidean``."""

    # --- LoRA (chapter 15; module lora) -------------------------------------------------
    lora_rank: int = 0
    """Rank r of the LoRA adapters (``lora.add_lora``: W x + (alpha / r) B A x on each target
    module, base weights frozen); 0: full fine-tuning. With LoRA and ``beta > 0`` the
    reference policy is the same model with its adapters disabled (no second copy)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is multiplied by ``lora_alpha / lora_rank``."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (training mode only). Keep 0 for RL: with dropout the
    update pass scores tokens with a different network than the sampler, so ratio != 1."""
    lora_target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get adapters (Llama / Qwen names: every projection)."""

    # --- learned reward (chapter 13; module reward_models) --------------------------------
    reward: str = "verifier"
    """What the policy is trained on: ``verifier`` (the task's verifier) or ``reward_model`` (a
    learned reward, ``reward_models.RewardModel`` from ``reward_model_path``: a proxy; the verifier
    is then logged as the gold score, metrics ``gold_accuracy``, ``proxy_reward``, ``kl_init``).
    With a learned reward, ``accuracy`` counts proxy rewards >= 1; read ``gold_accuracy``."""
    reward_model_path: Optional[str] = None
    """Folder written by ``python -m rlbook_code.reward_models`` (``<run_dir>/final``); needed
    with ``reward: reward_model``."""
    reward_length_bonus: float = 0.0
    """Adds this times the response length (tokens) to the reward: a deliberately exploitable
    shaping (chapter 13's reward-hacking run); 0: off. Any value > 0 logs the gold metrics."""

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
    "divergence": ("kl", "ot"),
    "ot_cost": ("cosine", "sqeuclidean"),
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


def _field_types(cls: type = TrainConfig) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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


def _unknown_key_error(key: str, cls: type = TrainConfig) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    alias = _ALIASES.get(key) if cls is TrainConfig else None
    close = [alias] if alias else difflib.get_close_matches(key, names, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def config_from_dict(d: dict[str, Any], cls: type = TrainConfig) -> Any:
    """Build a :class:`TrainConfig` (or another config dataclass ``cls``) from a dict, rejecting
    unknown keys (naming the nearest valid one) and values of the wrong type, then validating:
    :func:`validate_config` for a TrainConfig, the class's own ``validate()`` method for others
    (e.g. ``align.AlignConfig``), so every trainer of the book loads configs the same way."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of field names to values, received {type(d).__name__}")
    types = _field_types(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in types:
            raise _unknown_key_error(key, cls)
        kwargs[key] = _check_type(key, value, types[key])
    cfg = cls(**kwargs)
    if cls is TrainConfig:
        validate_config(cfg)
    elif hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, cls: type = TrainConfig) -> Any:
    """Read a YAML config, apply ``key=value`` overrides (values parsed as YAML), validate
    (``cls``: the config dataclass, TrainConfig by default)."""
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    d.update(parse_overrides(overrides or []))
    return config_from_dict(d, cls)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "beta=0"]`` -> ``{"lr": 0.001, "beta": 0}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, received {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def apply_overrides(cfg: Any, **changes: Any) -> Any:
    """A copy of ``cfg`` (any config dataclass) with fields changed (same checks as loading)."""
    d = dataclasses.asdict(cfg)
    d.update(changes)
    return config_from_dict(d, type(cfg))


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
    # --- off-policy (chapter 11) ---
    for name, allowed in (("is_correction", IS_CORRECTIONS), ("is_level", ("token", "sequence"))):
        if getattr(cfg, name) not in allowed:
            close = difflib.get_close_matches(str(getattr(cfg, name)), allowed, n=1, cutoff=0.4)
            bad(f"{name}={getattr(cfg, name)!r} is not one of {list(allowed)}"
                + (f"; did you mean {close[0]!r}?" if close else ""))
    for name in ("staleness", "max_staleness"):
        if getattr(cfg, name) < 0:
            bad(f"{name} must be >= 0, received {getattr(cfg, name)}")
    for name in ("sync_every", "sampler_queue"):
        if getattr(cfg, name) < 1:
            bad(f"{name} must be >= 1, received {getattr(cfg, name)}")
    if not (math.isfinite(cfg.is_high) and cfg.is_high > 0):
        bad(f"is_high must be a finite number > 0, received {cfg.is_high}")
    if cfg.is_low is not None and not 0 <= cfg.is_low < cfg.is_high:
        bad(f"is_low must be None or satisfy 0 <= is_low < is_high={cfg.is_high}, received {cfg.is_low}")
    if cfg.max_behav_weight is not None and not cfg.max_behav_weight > 0:
        bad(f"max_behav_weight must be > 0 or None, received {cfg.max_behav_weight}")
    if cfg.sampler_dtype is not None and cfg.sampler_dtype not in DTYPES:
        bad(f"sampler_dtype={cfg.sampler_dtype!r} is not one of {list(DTYPES)} or None")
    if cfg.sampler_temperature is not None and not cfg.sampler_temperature > 0:
        bad(f"sampler_temperature must be > 0 or None, received {cfg.sampler_temperature}: a greedy "
            f"sampler has no behaviour probabilities to correct against")
    if cfg.is_correction == "decoupled" and cfg.loss != "ppo":
        bad(f"is_correction='decoupled' is PPO's clipped objective; it needs loss='ppo', received {cfg.loss!r}")
    if cfg.is_correction == "clip" and cfg.loss == "reinforce":
        bad("is_correction='clip' needs a ratio loss (ppo, gspo or cispo); loss='reinforce' has no ratio to clip")
    if cfg.async_rollouts:
        if cfg.staleness:
            bad(f"async_rollouts has its own lag (max_staleness); staleness must be 0, received {cfg.staleness}")
        if cfg.dynamic_sampling:
            bad("async_rollouts does not support dynamic_sampling (the sampler sends fixed-size batches)")
        if cfg.max_staleness < cfg.sync_every - 1:
            bad(f"max_staleness={cfg.max_staleness} < sync_every - 1 = {cfg.sync_every - 1}: between two weight "
                f"pushes every batch would be too old and the learner would drop batches forever")
        if not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
            bad(f"async_rollouts needs device 'cpu' or 'cuda[:n]' (weights go to the sampler process "
                f"through CPU memory); device={cfg.device!r} cannot be shared with a second process")
    # --- divergence to the reference (chapter 16) ---
    if isinstance(cfg.ot_eps, bool) or not (math.isfinite(cfg.ot_eps) and cfg.ot_eps > 0):
        bad(f"ot_eps must be a positive finite number, received {cfg.ot_eps}")
    if cfg.ot_window is not None and cfg.ot_window < 0:
        bad(f"ot_window must be an integer >= 0 or None, received {cfg.ot_window}")
    if cfg.divergence == "ot":
        if not cfg.beta > 0:
            bad("divergence='ot' needs beta > 0 (beta weighs the OT penalty; it also loads the reference "
                "policy whose greedy completions are the anchor)")
        if cfg.kl_in != "loss":
            bad(f"divergence='ot' puts its penalty in the loss; kl_in must be 'loss', received {cfg.kl_in!r}")
    # --- LoRA (chapter 15) ---
    if isinstance(cfg.lora_rank, bool) or cfg.lora_rank < 0:
        bad(f"lora_rank must be an integer >= 0 (0: full fine-tuning), received {cfg.lora_rank}")
    if not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        bad(f"lora_alpha must be a positive finite number, received {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        bad(f"lora_dropout must be in [0, 1), received {cfg.lora_dropout}")
    if cfg.lora_rank and (not cfg.lora_target_modules
                          or not all(isinstance(m, str) and m for m in cfg.lora_target_modules)):
        bad(f"lora_target_modules must be a non-empty list of module names, received {cfg.lora_target_modules!r}")

    # --- learned reward (chapter 13) ---
    if cfg.reward not in ("verifier", "reward_model"):
        close = difflib.get_close_matches(str(cfg.reward), ["verifier", "reward_model"], n=1, cutoff=0.4)
        bad(f"reward={cfg.reward!r} is not one of ['verifier', 'reward_model']"
            + (f"; did you mean {close[0]!r}?" if close else ""))
    if cfg.reward == "reward_model":
        if not cfg.reward_model_path:
            bad("reward='reward_model' needs reward_model_path (a folder from python -m rlbook_code.reward_models)")
        elif not (Path(cfg.reward_model_path) / "reward_model.json").exists():
            bad(f"reward_model_path={cfg.reward_model_path!r} holds no reward_model.json (not a reward-model folder)")
    if not (math.isfinite(cfg.reward_length_bonus) and cfg.reward_length_bonus >= 0):
        bad(f"reward_length_bonus must be a finite number >= 0, received {cfg.reward_length_bonus}")
    if (cfg.reward != "verifier" or cfg.reward_length_bonus) and cfg.async_rollouts:
        bad("a learned or shaped reward is applied in the synchronous sampler; async_rollouts does not support it")

def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (every field, in declaration order): :func:`load_config` reads it back."""
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


def config_help(cls: type = TrainConfig) -> str:
    """Every field of ``cls`` with its default and docstring (the ``--help`` epilog)."""
    docs = field_docs(cls)
    lines = ["config fields (YAML keys, also --set key=value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} (default {default!r})")
        lines += textwrap.wrap(docs.get(f.name, ""), 88, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def lr_lambda(cfg: TrainConfig):
    """The learning-rate multiplier of each step (for ``torch.optim.lr_scheduler.LambdaLR``):
    linear warm-up over ``warmup_steps``, then constant or cosine down to 10% of ``lr``."""

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
    """``cfg.run_dir``, or ``runs/<algo>-seed<seed>`` when it is None."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{cfg.algo}-seed{cfg.seed}"


def run_cli(argv: list[str] | None, *, prog: str, description: str, cls: type, train_fn, config_hint: str,
            stop_errors: tuple = ()) -> int:
    """The command line every trainer of the book shares (``rlbook_code.train``, ``align``,
    ``reward_models``): ``--config FILE``, ``--set KEY=VALUE`` (repeatable), ``--resume RUN_DIR``,
    and ``--help`` listing every field of ``cls``. Runs ``train_fn(cfg, resume=...)``.

    Exit codes: 0 done (rank 0 prints the run folder); 2 and one line for a user error (a config
    error, a model that cannot be loaded, a run folder that exists, a missing config file or
    resume folder); 3 for an exception of ``stop_errors`` (the trainers' non-finite stop);
    1 and the traceback for any other failure."""
    import argparse
    import sys

    from rlbook_code.models import ModelLoadError

    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=config_help(cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config ({config_hint})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (value parsed as YAML); repeatable")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.resume:
            saved = Path(args.resume) / "checkpoint" / "config.yaml"
            if not saved.exists():
                raise FileNotFoundError(f"--resume {args.resume}: no checkpoint/config.yaml in that folder")
            cfg = load_config(saved, args.overrides, cls=cls)
        elif args.config:
            if not Path(args.config).exists():
                raise FileNotFoundError(f"--config {args.config}: no such file")
            cfg = load_config(args.config, args.overrides, cls=cls)
        else:
            cfg = config_from_dict(parse_overrides(args.overrides), cls=cls)
        run_dir = train_fn(cfg, resume=args.resume)
    except (ConfigError, ModelLoadError, FileExistsError, FileNotFoundError) as e:
        kind = {ConfigError: "config error", ModelLoadError: "model error"}.get(type(e), "error")
        print(f"{kind}: {e}", file=sys.stderr)
        return 2
    except stop_errors as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # a failed run: the traceback is what a user needs to report it
        __import__("traceback").print_exc()
        print(f"run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
        print(f"run folder: {run_dir}")
    return 0
