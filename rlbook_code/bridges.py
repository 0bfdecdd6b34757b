"""From a :class:`~rlbook_code.config.TrainConfig` to TRL and verl (chapter 12, ``book/trl_verl.md``).

* :func:`trl_grpo_kwargs` / :func:`to_trl_grpo_config`: the ``trl.GRPOConfig`` (TRL 1.16) of a
  config, and :func:`trl_reward_function`, a TRL reward function from a
  :class:`~rlbook_code.rewards.TaskMixture`, so ``GRPOTrainer`` can train on the book's tasks.
* :func:`to_verl_overrides`: the Hydra overrides of verl's ``main_ppo`` (verl 0.9.1,
  ``verl/trainer/config/ppo_trainer.yaml``) for a config.
* :data:`FIELDS`: which TrainConfig field each bridge sets and to which key; the tables of
  ``book/trl_verl.md`` are rendered from it (``{bridge-table}``), so the page cannot drift from
  the code, and the tests check that every key named here exists in TRL's and verl's configs.

A setting a peer cannot express raises :class:`BridgeError` naming it, instead of a run that
silently computes something else. The conventions behind the mapping (tested against TRL's and
verl's own functions in ``tests/test_parity_*.py``):

* TRL counts its generation batch in completions and splits it into ``steps_per_generation``
  optimizer steps of ``per_device_train_batch_size * gradient_accumulation_steps`` completions;
  verl counts ``data.train_batch_size`` and ``ppo_mini_batch_size`` in *prompts*.
* TRL's CISPO cap ``epsilon_high`` is absolute (rlbook's ``1 + clip_eps_high``); TRL's ``delta``
  is rlbook's ``dual_clip``; verl's dual clip is always on (``clip_ratio_c``), so rlbook's
  ``dual_clip=None`` becomes an unreachable ``clip_ratio_c``.
* TRL's KL is k3 in the loss only; its ``use_bias_correction_kl`` (on by default in 1.16) is
  turned off, because rlbook's KL term has no such factor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from rlbook_code.config import TrainConfig, validate_config

__all__ = ["BridgeError", "FIELDS", "trl_grpo_kwargs", "to_trl_grpo_config", "trl_reward_function",
           "train_with_trl", "to_verl_overrides", "NO_DUAL_CLIP", "main"]

NO_DUAL_CLIP = 1e9
"""verl's ``clip_ratio_c`` standing for rlbook's ``dual_clip=None`` (verl's dual clip is always on)."""

A = "actor_rollout_ref.actor."
R = "actor_rollout_ref.rollout."


class BridgeError(ValueError):
    """A TrainConfig setting the target trainer has no counterpart for."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One row of the mapping: a TrainConfig field, the TRL ``GRPOConfig`` field(s) and the verl
    Hydra key(s) it becomes (empty: no counterpart), and a note on the conversion."""

    rlbook: str
    trl: tuple[str, ...]
    verl: tuple[str, ...]
    section: str
    note: str = ""


FIELDS: tuple[Field, ...] = (
    Field("model_name", (), ("actor_rollout_ref.model.path",), "Sampling and batch",
          "TRL: the `model` argument of `GRPOTrainer`"),
    Field("seed", ("seed",), ("data.seed",), "Sampling and batch"),
    Field("group_size", ("num_generations",), (R + "n",), "Sampling and batch"),
    Field("prompts_per_step", ("steps_per_generation", "per_device_train_batch_size", "gradient_accumulation_steps"),
          ("data.train_batch_size",), "Sampling and batch",
          "TRL: completions per step = steps_per_generation x per_device_train_batch_size x "
          "gradient_accumulation_steps; verl counts prompts"),
    Field("max_new_tokens", ("max_completion_length",), ("data.max_response_length",), "Sampling and batch"),
    Field("temperature", ("temperature",), (R + "temperature",), "Sampling and batch"),
    Field("top_p", ("top_p", "top_k"), (R + "top_p", R + "top_k"), "Sampling and batch",
          "top-k off: TRL top_k=0, verl top_k=-1"),
    Field("steps", ("max_steps",), ("trainer.total_training_steps",), "Sampling and batch"),
    Field("lr", ("learning_rate",), (A + "optim.lr",), "Optimisation"),
    Field("lr_schedule", ("lr_scheduler_type", "lr_scheduler_kwargs"), (A + "optim.warmup_style",), "Optimisation",
          "cosine to 10% of lr: TRL cosine_with_min_lr (min_lr_rate 0.1); verl's cosine decays to 0"),
    Field("warmup_steps", ("warmup_steps",), (A + "optim.lr_warmup_steps",), "Optimisation"),
    Field("weight_decay", ("weight_decay",), (A + "optim.weight_decay",), "Optimisation"),
    Field("adam_betas", ("adam_beta1", "adam_beta2"), (A + "optim.betas",), "Optimisation"),
    Field("max_grad_norm", ("max_grad_norm",), (A + "grad_clip",), "Optimisation"),
    Field("num_epochs", ("num_iterations",), (A + "ppo_epochs",), "Optimisation"),
    Field("num_minibatches", ("steps_per_generation",), (A + "ppo_mini_batch_size",), "Optimisation",
          "verl: prompts per minibatch = prompts_per_step / num_minibatches"),
    Field("micro_batch_size", ("per_device_train_batch_size", "gradient_accumulation_steps"),
          (A + "ppo_micro_batch_size_per_gpu",), "Optimisation"),
    Field("gradient_checkpointing", ("gradient_checkpointing",), ("actor_rollout_ref.model.enable_gradient_checkpointing",),
          "Optimisation"),
    Field("autocast_bf16", ("bf16",), (), "Optimisation", "verl: FSDP mixed precision is its default"),
    Field("advantage", ("scale_rewards",), ("algorithm.adv_estimator",), "Advantages",
          "TRL: group advantages only (GRPOTrainer)"),
    Field("adv_scale", ("scale_rewards",), ("algorithm.norm_adv_by_std_in_grpo",), "Advantages",
          "verl has no batch scale"),
    Field("gamma", (), ("algorithm.gamma",), "Advantages"),
    Field("lam", (), ("algorithm.lam",), "Advantages"),
    Field("value_clip", (), ("critic.cliprange_value",), "Advantages"),
    Field("value_lr", (), ("critic.optim.lr",), "Advantages"),
    Field("loss", ("loss_type", "importance_sampling_level"), (A + "policy_loss.loss_mode",), "Policy loss",
          "gspo: TRL importance_sampling_level=sequence"),
    Field("clip_eps_low", ("epsilon",), (A + "clip_ratio_low",), "Policy loss"),
    Field("clip_eps_high", ("epsilon_high",), (A + "clip_ratio_high",), "Policy loss",
          "TRL CISPO: epsilon_high = 1 + clip_eps_high (an absolute cap)"),
    Field("dual_clip", ("delta",), (A + "clip_ratio_c",), "Policy loss",
          f"verl's dual clip is always on: None becomes clip_ratio_c={NO_DUAL_CLIP:g}"),
    Field("entropy_coef", ("entropy_coef",), (A + "entropy_coeff",), "Policy loss",
          "TRL adds a token-mean entropy bonus whatever the aggregation"),
    Field("aggregation", ("loss_type",), (A + "loss_agg_mode", A + "loss_scale_factor"), "Loss aggregation",
          "token-mean = TRL dapo, seq-mean-token-mean = grpo, seq-mean-token-sum-norm = dr_grpo"),
    Field("beta", ("beta", "use_bias_correction_kl"), (A + "use_kl_loss", A + "kl_loss_coef", "algorithm.use_kl_in_reward",
                                                       "algorithm.kl_ctrl.kl_coef"), "KL",
          "kl_in=loss: verl actor KL loss; kl_in=reward: verl KL in the reward"),
    Field("kl_estimator", (), (A + "kl_loss_type", "algorithm.kl_penalty"), "KL",
          "k1 = kl, k2 = mse, k3 = low_var_kl; TRL: k3 only"),
    Field("dynamic_sampling", (), ("algorithm.filter_groups.enable", "algorithm.filter_groups.max_num_gen_batches"),
          "DAPO", "TRL: none"),
)


_TRL_LOSS = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
_VERL_KL = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
_VERL_ADV = {"group": "grpo", "rloo": "rloo", "gae": "gae"}


def _sizes(cfg: TrainConfig) -> tuple[int, int, int]:
    """(completions per minibatch, per-device micro-batch, accumulation steps)."""
    batch = cfg.prompts_per_step * cfg.group_size
    mini = batch // cfg.num_minibatches
    micro = cfg.micro_batch_size or mini
    return mini, micro, mini // micro


def trl_grpo_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The ``trl.GRPOConfig`` keyword arguments (TRL 1.16) that reproduce ``cfg``'s estimator.

    Raises:
        BridgeError: a setting GRPOTrainer cannot express (a critic, leave-one-out or raw-reward
            advantages, KL in the reward or not k3, a sequence-sum aggregation, CISPO with a
            lower clip or a non-token-mean aggregation, dynamic sampling, DAPO's length penalty).
    """
    validate_config(cfg)

    def no(field: str, why: str) -> BridgeError:
        return BridgeError(f"TRL's GRPOTrainer has no counterpart for {field}: {why}")

    if cfg.advantage != "group":
        raise no(f"advantage={cfg.advantage!r}", "it computes group advantages only (RLOOTrainer is a separate trainer)")
    if cfg.whiten_advantages:
        raise no("whiten_advantages=true", "it does not whiten advantages")
    if cfg.loss == "reinforce":
        raise no("loss='reinforce'", "its losses are clipped ratios (use loss='ppo'; equal on-policy, chapter 10)")
    if cfg.beta > 0 and (cfg.kl_in != "loss" or cfg.kl_estimator != "k3"):
        raise no(f"kl_in={cfg.kl_in!r}, kl_estimator={cfg.kl_estimator!r}", "its KL term is k3, in the loss")
    if cfg.aggregation not in _TRL_LOSS:
        raise no(f"aggregation={cfg.aggregation!r}", f"its loss types aggregate as {sorted(_TRL_LOSS)}")
    if cfg.loss == "cispo" and (cfg.clip_eps_low is not None or cfg.aggregation != "token-mean"):
        raise no("loss='cispo' with a lower clip or a non-token-mean aggregation",
                 "its CISPO clamps from above only and normalizes by tokens")
    if cfg.dynamic_sampling:
        raise no("dynamic_sampling=true", "it trains on every sampled group")
    if cfg.overlong_buffer is not None:
        raise no("overlong_buffer", "it has no soft length penalty (mask_truncated_completions drops them instead)")
    mini, micro, accum = _sizes(cfg)
    kw: dict[str, Any] = {
        "seed": cfg.seed, "num_generations": cfg.group_size, "max_completion_length": cfg.max_new_tokens,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0, "max_steps": cfg.steps,
        "learning_rate": cfg.lr, "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay,
        "adam_beta1": cfg.adam_betas[0], "adam_beta2": cfg.adam_betas[1],
        "max_grad_norm": cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0,  # 0: no clipping
        "num_iterations": cfg.num_epochs, "steps_per_generation": cfg.num_minibatches,
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
        "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.autocast_bf16,
        "scale_rewards": cfg.adv_scale, "epsilon": cfg.clip_eps_low if cfg.clip_eps_low is not None else 0.2,
        "epsilon_high": cfg.clip_eps_high, "delta": cfg.dual_clip, "entropy_coef": cfg.entropy_coef,
        "beta": cfg.beta, "use_bias_correction_kl": False, "importance_sampling_level": "token",
        "loss_type": _TRL_LOSS[cfg.aggregation], "mask_truncated_completions": False,
    }
    if cfg.lr_schedule == "cosine":
        kw.update(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})
    else:
        kw["lr_scheduler_type"] = "constant_with_warmup" if cfg.warmup_steps else "constant"
    if cfg.loss == "gspo":
        kw["importance_sampling_level"] = "sequence"
    elif cfg.loss == "cispo":
        kw.update(loss_type="cispo", epsilon_high=1.0 + cfg.clip_eps_high)
    return kw


def to_trl_grpo_config(cfg: TrainConfig, output_dir: str, **extra: Any):
    """``trl.GRPOConfig(output_dir, **trl_grpo_kwargs(cfg), **extra)``; ``extra`` adds TRL's own
    run settings (``logging_steps``, ``report_to``, ``save_strategy``, ``use_cpu``, ...)."""
    from trl import GRPOConfig

    kw = trl_grpo_kwargs(cfg)
    clash = sorted(set(kw) & set(extra))
    if clash:
        raise BridgeError(f"extra TRL arguments {clash} would override fields set from the TrainConfig")
    return GRPOConfig(output_dir=output_dir, **kw, **extra)


def trl_reward_function(task, mode: str = "exact") -> Callable[..., list[float]]:
    """A TRL reward function (``reward_funcs=[...]`` of ``GRPOTrainer``) scoring completions with a
    :class:`~rlbook_code.rewards.TaskMixture`'s verifiers. The dataset must carry each prompt's
    item in a column ``item`` (TRL passes dataset columns to reward functions by name)."""

    def reward(prompts, completions, item, **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [float(s) for s in task.score(texts, list(item), mode=mode)]

    reward.__name__ = f"rlbook_{mode}_verifier"
    return reward


def train_with_trl(cfg: TrainConfig, run_dir: str | None = None) -> Path:
    """The run of ``cfg`` through TRL's ``GRPOTrainer`` (TRL 1.16), in a run folder laid out like
    the book trainer's, so the same plotting reads both.

    Same model and weights, same task mixture and prompt stream (``TaskMixture(seed)`` drawing
    ``prompts_per_step`` items per step, in order, without shuffling), the same sampling settings
    and the estimator of :func:`trl_grpo_kwargs`. ``metrics.jsonl`` gets one record per step
    (``reward_mean``, ``reward_std``, ``accuracy`` of the step's completions, TRL's ``kl``,
    ``entropy``, ``clip_ratio/*`` where it logs them, and ``step_s``), plus held-out greedy (and
    sampled) accuracy, measured with :func:`rlbook_code.evaluation.evaluate` on the trainer's own
    held-out items, at step 0 and at the last step. What differs from rlbook by design: TRL's
    group-std epsilon (1e-4), its sampling RNG, and its batching of generation.
    """
    import time

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from rlbook_code import checkpoint, evaluation, models, rewards
    from rlbook_code.config import default_run_dir, save_config

    out = checkpoint.prepare_run_dir(run_dir or default_run_dir(cfg), overwrite=cfg.overwrite)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    save_config(cfg, out / "config.yaml")
    args = to_trl_grpo_config(cfg, str(out / "trl"), use_cpu=cfg.device == "cpu", report_to="none",
                              logging_steps=1, save_strategy="no", disable_tqdm=not cfg.progress,
                              data_seed=cfg.seed, shuffle_dataset=False, dataloader_num_workers=0)
    model, tok = models.load_policy(cfg.model_name, device=cfg.device)
    task = rewards.TaskMixture(cfg.task if cfg.task is not None else rewards.DEFAULT_TASK, seed=cfg.seed,
                               answer_format=cfg.answer_format)
    eval_items = task.eval_items(cfg.eval_size, seed=cfg.eval_seed)
    items = [it for _ in range(cfg.steps) for it in task.sample(cfg.prompts_per_step)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": task.prompt(it)}], "item": i}
                            for i, it in enumerate(items)])
    score = trl_reward_function(task, cfg.reward_mode)

    def reward(prompts, completions, item, **kw):
        return score(prompts, completions, [items[i] for i in item])

    reward.__name__ = score.__name__

    def held_out(policy, step: int) -> dict:
        policy.eval()
        rec = {"step": step}
        for name, greedy in [("greedy", True)] + ([("sampled", False)] if cfg.eval_sampled else []):
            r = evaluation.evaluate(policy, tok, task, eval_items, max_new_tokens=cfg.max_new_tokens, greedy=greedy,
                                    temperature=cfg.temperature, batch_size=cfg.eval_batch_size, seed=cfg.eval_seed)
            rec[f"eval/{name}_accuracy"] = float(r["accuracy"])
        return rec

    class Log(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "reward" in logs:
                rec = {"step": int(state.global_step), "reward_mean": float(logs["reward"]),
                       "reward_std": float(logs.get("reward_std", 0.0)),
                       "accuracy": float(logs.get(f"rewards/{score.__name__}/mean", logs["reward"])),
                       "step_s": time.perf_counter() - self.t0}
                for k_, v in logs.items():
                    if k_ in ("kl", "entropy") or k_.startswith("clip_ratio/"):
                        rec[k_] = float(v)
                checkpoint.append_metrics(out, rec)

    checkpoint.append_metrics(out, held_out(model, 0))
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Log()])
    trainer.train()
    final = held_out(trainer.model, cfg.steps)
    records = checkpoint.read_metrics(out)
    (out / "metrics.jsonl").unlink()
    for r in records:  # one record per step, as the book's trainer writes them
        checkpoint.append_metrics(out, {**r, **final} if r["step"] == cfg.steps else r)
    if not records or records[-1]["step"] != cfg.steps:
        checkpoint.append_metrics(out, final)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m rlbook_code.bridges --config C [--set k=v ...] [--verl]``: run the config through
    TRL's GRPOTrainer into its ``run_dir`` (as ``rlbook_code.train`` would), or, with ``--verl``,
    print the ``python -m verl.trainer.main_ppo`` command line. Exit code 2 names what cannot be
    mapped; the same arguments as the book's trainer, so ``rlbook_code.sweep`` runs it too."""
    import argparse
    import sys

    from rlbook_code.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m rlbook_code.bridges", description=main.__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--verl", action="store_true", help="print verl's command line instead of training with TRL")
    a = parser.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        if a.verl:
            print(" \\\n    ".join(["python -m verl.trainer.main_ppo"] + to_verl_overrides(cfg)))
            return 0
        print(f"run folder: {train_with_trl(cfg, cfg.run_dir)}")
    except (ConfigError, BridgeError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def to_verl_overrides(cfg: TrainConfig, model_path: str | None = None) -> list[str]:
    """Hydra overrides of verl's ``main_ppo`` (``ppo_trainer.yaml``, verl 0.9.1) for ``cfg``.

    ``model_path``: the model verl loads (default ``cfg.model_name``, or the shipped model's
    folder). Raises BridgeError for a setting verl's trainer cannot express (a batch-scaled or
    raw-reward advantage, the plain REINFORCE loss, DAPO's soft length penalty, which lives in
    verl's DAPO recipe rather than its trainer config)."""
    from rlbook_code import models

    validate_config(cfg)
    if cfg.advantage not in _VERL_ADV:
        raise BridgeError(f"verl has no counterpart for advantage={cfg.advantage!r} (REINFORCE on raw rewards)")
    if cfg.advantage == "group" and cfg.adv_scale == "batch":
        raise BridgeError("verl has no counterpart for adv_scale='batch' (its GRPO scales by the group std or not at all)")
    if cfg.loss == "reinforce":
        raise BridgeError("verl has no counterpart for loss='reinforce' (use loss='ppo': equal on-policy, chapter 10)")
    if cfg.overlong_buffer is not None:
        raise BridgeError("DAPO's overlong buffer is in verl's DAPO recipe (recipe/dapo), not main_ppo's config")
    if cfg.prompts_per_step % cfg.num_minibatches:
        raise BridgeError(f"verl counts minibatches in prompts: num_minibatches={cfg.num_minibatches} must divide "
                          f"prompts_per_step={cfg.prompts_per_step}")
    mini, micro, _ = _sizes(cfg)
    path = model_path or cfg.model_name or models.DEFAULT_MODEL
    o = {
        "actor_rollout_ref.model.path": path,
        "data.seed": cfg.seed,
        R + "n": cfg.group_size,
        "data.train_batch_size": cfg.prompts_per_step,
        "data.max_response_length": cfg.max_new_tokens,
        R + "temperature": cfg.temperature, R + "top_p": cfg.top_p, R + "top_k": -1,
        "trainer.total_training_steps": cfg.steps,
        A + "optim.lr": cfg.lr,
        A + "optim.warmup_style": "cosine" if cfg.lr_schedule == "cosine" else "constant",
        A + "optim.lr_warmup_steps": cfg.warmup_steps,
        A + "optim.weight_decay": cfg.weight_decay,
        A + "optim.betas": list(cfg.adam_betas),
        A + "grad_clip": cfg.max_grad_norm if cfg.max_grad_norm is not None else NO_DUAL_CLIP,
        A + "ppo_epochs": cfg.num_epochs,
        A + "ppo_mini_batch_size": cfg.prompts_per_step // cfg.num_minibatches,
        A + "ppo_micro_batch_size_per_gpu": micro,
        "actor_rollout_ref.model.enable_gradient_checkpointing": cfg.gradient_checkpointing,
        "algorithm.adv_estimator": _VERL_ADV[cfg.advantage],
        "algorithm.norm_adv_by_std_in_grpo": cfg.adv_scale != "none",
        A + "policy_loss.loss_mode": {"ppo": "vanilla", "gspo": "gspo", "cispo": "cispo"}[cfg.loss],
        # no lower clip (CISPO's default) is verl's clip_ratio_low=1: the bound 1 - 1 = 0 never binds
        A + "clip_ratio_low": cfg.clip_eps_low if cfg.clip_eps_low is not None else 1.0,
        A + "clip_ratio_high": cfg.clip_eps_high,
        A + "clip_ratio_c": cfg.dual_clip if cfg.dual_clip is not None else NO_DUAL_CLIP,
        A + "entropy_coeff": cfg.entropy_coef,
        A + "loss_agg_mode": cfg.aggregation,
        A + "use_kl_loss": cfg.beta > 0 and cfg.kl_in == "loss",
        A + "kl_loss_coef": cfg.beta if cfg.kl_in == "loss" else 0.0,
        A + "kl_loss_type": _VERL_KL[cfg.kl_estimator],
        "algorithm.use_kl_in_reward": cfg.beta > 0 and cfg.kl_in == "reward",
        "algorithm.kl_ctrl.kl_coef": cfg.beta if cfg.kl_in == "reward" else 0.0,
        "algorithm.kl_penalty": _VERL_KL[cfg.kl_estimator],
        "algorithm.filter_groups.enable": cfg.dynamic_sampling,
        "algorithm.filter_groups.max_num_gen_batches": cfg.max_sampling_rounds,
    }
    if cfg.aggregation == "seq-mean-token-sum-norm":
        o[A + "loss_scale_factor"] = cfg.max_new_tokens
    if cfg.advantage == "gae":
        o.update({"algorithm.gamma": cfg.gamma, "algorithm.lam": cfg.lam,
                  "critic.cliprange_value": cfg.value_clip if cfg.value_clip is not None else NO_DUAL_CLIP,
                  "critic.optim.lr": cfg.value_lr or cfg.lr, "critic.model.path": path})
    return [f"{k}={_hydra(v)}" for k, v in o.items()]


def _hydra(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(_hydra(x) for x in v) + "]"
    return str(v)


if __name__ == "__main__":
    import sys

    sys.exit(main())
