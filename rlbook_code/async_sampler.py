"""Off-policy sampling for the trainer (chapter 11): stale, mismatched and asynchronous samplers,
and the corrected policy loss.

Three things make a batch off-policy, and each is one config field of ``TrainConfig``:

* a **stale** sampler (``staleness = k``): the batch of update ``t`` is sampled by the weights
  of update ``t - k``; :class:`StaleSampler` keeps a ring buffer of ``k + 1`` weight snapshots
  (deterministic and reproducible on a CPU, resumable bit for bit);
* a **mismatched** sampler (``sampler_dtype``, ``sampler_temperature``): the same weights, but
  a sampler that computes other probabilities than the learner (a bfloat16 engine against a
  float32 trainer, or another temperature), the "inference policy" of TorchRL's GRPO;
* an **asynchronous** sampler (``async_rollouts``): :class:`AsyncSampler` generates batches in
  its own process (``torch.multiprocessing`` with ``spawn``) from the newest weights it has
  received, while the learner trains; the learner sends its weights every ``sync_every``
  updates; every batch carries the weight *version* that sampled it (the number of updates
  behind those weights), and a batch more than ``max_staleness`` versions old is dropped and
  counted (TRL's async GRPO semantics).

In every case the behaviour log-probs are the sampler's own, recorded at generation time
(``RolloutBatch.logprobs``, from the logits the sampler sampled from), never recomputed by the
learner. :func:`policy_loss` then applies the configured correction (``is_correction``) with
the estimators of :mod:`rlbook_code.offpolicy`.

Process hygiene (tested): the sampler process ends with the learner, whether the run ends, an
exception or Ctrl-C stops it (``AsyncSampler.close`` in the trainer's ``finally``), or the
learner is killed (``PR_SET_PDEATHSIG`` on Linux, and the sampler polls its parent's id).
Resuming from a checkpoint discards the batches that were in flight: the new sampler starts at
the first batch index the learner had not received, so nothing is trained on twice.

Weights and batches cross the process boundary as ``torch.save`` bytes, not shared-memory
tensors: a killed learner then leaves no shared-memory segments behind, and a learner that
keeps updating its parameters in place can never change a batch or a snapshot already sent.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import queue
import signal
import time
import traceback
from collections import deque
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["offpolicy_active", "make_sampler", "StaleSampler", "AsyncSampler", "policy_loss", "diagnostics"]


def offpolicy_active(cfg) -> bool:
    """Whether the run's batches may come from another policy than the learner's (any of the
    fields of the off-policy section set). False: the trainer runs exactly as before."""
    return bool(cfg.staleness > 0 or cfg.is_correction != "none" or cfg.async_rollouts
                or (cfg.sampler_dtype is not None and cfg.sampler_dtype != cfg.dtype)
                or (cfg.sampler_temperature is not None and cfg.sampler_temperature != cfg.temperature))


def make_sampler(cfg, policy) -> "StaleSampler | AsyncSampler | None":
    """The sampler of a run: None when :func:`offpolicy_active` is False (the learner samples,
    as in chapters 08-10), an :class:`AsyncSampler` (not started) for ``async_rollouts``, else
    a :class:`StaleSampler`."""
    if not offpolicy_active(cfg):
        return None
    return AsyncSampler(cfg) if cfg.async_rollouts else StaleSampler(cfg, policy)


def _clone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(b: bytes) -> Any:
    return torch.load(io.BytesIO(b), weights_only=False)


# ----------------------------------------------------------------------------------------
# Synchronous: stale or mismatched
# ----------------------------------------------------------------------------------------
class StaleSampler:
    """A synchronous sampler ``staleness`` updates behind the learner, optionally in another
    dtype (``sampler_dtype``) and at another temperature (``sampler_temperature``).

    The learner's weights after ``v`` updates are *version* ``v``. Before the batch of update
    ``t`` is sampled the learner is at version ``t - 1``; :meth:`model_for` stores that
    version's snapshot and samples with the oldest of the ``k + 1`` kept, version
    ``max(0, t - 1 - k)``, so the lag is ``k`` once ``t > k`` (the first ``k`` batches come from
    the initial weights). Memory: ``k + 1`` copies of the weights, plus one sampler model when
    ``k > 0`` or the dtype differs (with ``k = 0`` in the learner's dtype the learner samples)."""

    is_async = False

    def __init__(self, cfg, policy):
        from rlbook_code.config import DTYPES

        self.k = int(cfg.staleness)
        self.temperature = float(cfg.sampler_temperature or cfg.temperature)
        dtype = DTYPES[cfg.sampler_dtype] if cfg.sampler_dtype else None
        param_dtype = next(policy.parameters()).dtype
        self.model = None
        if self.k > 0 or (dtype is not None and dtype != param_dtype):
            self.model = copy.deepcopy(policy).to(dtype or param_dtype).eval()
            self.model.requires_grad_(False)
        self.snapshots: deque = deque(maxlen=self.k + 1)  # (version, state_dict)

    def model_for(self, policy, version: int) -> tuple[Any, float, dict[str, float]]:
        """``(model, temperature, stats)`` that sample the batch of update ``version + 1``;
        ``stats["policy_age"]`` is how many updates the sampling weights lag the learner."""
        if self.model is None:
            return policy, self.temperature, {"policy_age": 0.0}
        if self.k == 0:
            self.model.load_state_dict(policy.state_dict())
            return self.model, self.temperature, {"policy_age": 0.0}
        if not self.snapshots or self.snapshots[-1][0] != version:
            self.snapshots.append((version, _clone_state(policy)))
        v, sd = self.snapshots[0]
        self.model.load_state_dict(sd)
        return self.model, self.temperature, {"policy_age": float(version - v)}

    def start(self, state) -> None:  # the same interface as AsyncSampler
        pass

    def after_step(self, state) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The snapshots, for the checkpoint (a resumed stale run continues bit for bit)."""
        return {"stale_snapshots": list(self.snapshots)}

    def load_state_dict(self, extra: dict[str, Any]) -> None:
        self.snapshots = deque(extra.get("stale_snapshots", []), maxlen=self.k + 1)


# ----------------------------------------------------------------------------------------
# Asynchronous: a sampler process
# ----------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc Linux: the parent-id poll below still ends us
        pass


def _sampler_main(cfg_dict: dict, weights: bytes, version: int, start_index: int, batch_q, weights_q,
                  stop, parent_pid: int) -> None:
    """The sampler process: generate batch ``index`` (its items are the ``index``-th slice of
    the task stream, its sampling seeds those of update ``index + 1``), with the newest weights
    received, and put it on ``batch_q`` with its version; until ``stop`` is set or the parent
    is gone."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the learner's to handle; it stops us
    try:
        import transformers

        from rlbook_code import models, rewards, train
        from rlbook_code.config import DTYPES, config_from_dict

        transformers.utils.logging.disable_progress_bar()
        cfg = config_from_dict(cfg_dict)
        torch.set_num_threads(cfg.num_threads or 1)
        dtype = DTYPES[cfg.sampler_dtype or cfg.dtype]
        policy, tokenizer = models.load_policy(cfg.model_name, device=cfg.device, dtype=dtype)
        policy.load_state_dict(_from_bytes(weights))
        task = rewards.TaskMixture(cfg.task if cfg.task is not None else rewards.DEFAULT_TASK, seed=cfg.seed,
                                   answer_format=cfg.answer_format)
        if start_index:
            task.sample(start_index * cfg.prompts_per_step)  # replay the stream up to the first new batch
        gen_cfg = dataclasses.replace(cfg, temperature=cfg.sampler_temperature or cfg.temperature,
                                      dynamic_sampling=False)
        # a learner state with only what sampling reads; every other field at its default (no sampler)
        defaults = {f.name: f.default for f in dataclasses.fields(train.TrainState)
                    if f.default is not dataclasses.MISSING}
        local = SimpleNamespace(**{**defaults, "cfg": gen_cfg, "policy": policy, "tokenizer": tokenizer,
                                   "task": task, "items_drawn": 0, "sampler": None})
        index, wait_s = start_index, 0.0
        while not stop.is_set():
            while True:  # the newest weights sent so far
                try:
                    version, weights = weights_q.get_nowait()
                except queue.Empty:
                    break
                policy.load_state_dict(_from_bytes(weights))
            t0 = time.perf_counter()
            batch, items, scores, stats = train.collect_rollouts(local, index + 1)
            gen_s = time.perf_counter() - t0
            msg = _to_bytes({"index": index, "version": version, "batch": batch, "scores": scores,
                             "stats": stats, "gen_s": gen_s, "sampler_wait_s": wait_s})
            t1 = time.perf_counter()
            while True:
                if stop.is_set() or os.getppid() != parent_pid:
                    return
                try:
                    batch_q.put(msg, timeout=0.2)
                    break
                except queue.Full:
                    continue
            wait_s = time.perf_counter() - t1  # reported with the next batch
            index += 1
    except Exception:  # noqa: BLE001  (the learner re-raises it with this traceback)
        try:
            batch_q.put(_to_bytes({"error": traceback.format_exc()}), timeout=5)
        except Exception:  # noqa: BLE001
            pass


class AsyncSampler:
    """The learner's end of an asynchronous sampler process (see the module docstring).

    Life cycle: :meth:`start` (after the checkpoint, if any, is loaded), then per update
    :meth:`next_batch` (from ``train.collect_rollouts``) and :meth:`after_step` (sends the
    weights every ``sync_every`` updates), and :meth:`close` (always, in a ``finally``)."""

    is_async = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.next_index = 0  # first batch index the learner has not received
        self.dropped_total = 0
        self.proc = None
        self._last_sent = -1

    def start(self, state) -> None:
        """Spawn the sampler with the learner's current weights (version ``state.step``)."""
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.batch_q = ctx.Queue(maxsize=self.cfg.sampler_queue)
        self.weights_q = ctx.Queue()
        self.stop = ctx.Event()
        self.proc = ctx.Process(
            target=_sampler_main, name="rlbook-async-sampler", daemon=True,
            args=(dataclasses.asdict(self.cfg), _to_bytes(_clone_state(state.policy)), state.step, self.next_index,
                  self.batch_q, self.weights_q, self.stop, os.getpid()))
        self.proc.start()
        self._last_sent = state.step

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _get(self) -> dict[str, Any]:
        while True:
            try:
                msg = _from_bytes(self.batch_q.get(timeout=0.5))
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"the async sampler process exited (code {self.proc.exitcode}) "
                                       f"without sending a batch") from None
                continue
            if "error" in msg:
                raise RuntimeError("the async sampler failed:\n" + msg["error"])
            return msg

    def next_batch(self, state, step: int) -> tuple[Any, list, torch.Tensor, dict[str, float]]:
        """The next batch no more than ``max_staleness`` versions old, for update ``step``
        (the learner is at version ``step - 1``). Older ones are dropped and counted."""
        t0 = time.perf_counter()
        dropped = 0
        while True:
            msg = self._get()
            self.next_index = msg["index"] + 1
            age = (step - 1) - msg["version"]
            if age <= self.cfg.max_staleness:
                break
            dropped += 1
        self.dropped_total += dropped
        state.items_drawn = self.next_index * self.cfg.prompts_per_step
        stats = dict(msg["stats"])
        stats.update({"policy_age": float(age), "dropped_batches": float(dropped),
                      "dropped_total": float(self.dropped_total), "learner_wait_s": time.perf_counter() - t0,
                      "sampler_wait_s": float(msg["sampler_wait_s"]), "sampler_gen_s": float(msg["gen_s"]),
                      "sampler_batch": float(msg["index"]), "sampler_version": float(msg["version"])})
        return msg["batch"], [None] * len(msg["batch"]), msg["scores"], stats

    def after_step(self, state) -> None:
        """Send the weights (version ``state.step``) every ``sync_every`` updates."""
        if state.step % self.cfg.sync_every == 0 and state.step != self._last_sent:
            self.weights_q.put((state.step, _to_bytes(_clone_state(state.policy))))
            self._last_sent = state.step

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sampler process and wait for it (terminate, then kill, if it hangs)."""
        if self.proc is None:
            return
        self.stop.set()
        deadline = time.monotonic() + timeout
        while self.proc.is_alive() and time.monotonic() < deadline:
            try:  # unblock a sampler waiting to put
                self.batch_q.get_nowait()
            except (queue.Empty, OSError, ValueError):
                pass
            self.proc.join(timeout=0.1)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=2)
        for q in (self.batch_q, self.weights_q):
            q.cancel_join_thread()
            q.close()
        self.proc = None

    def state_dict(self) -> dict[str, Any]:
        return {"async_next_index": self.next_index, "async_dropped_total": self.dropped_total}

    def load_state_dict(self, extra: dict[str, Any]) -> None:
        """Resume: the batches in flight when the checkpoint was written are not restored; the
        new sampler starts at the first batch the learner had not received."""
        self.next_index = int(extra.get("async_next_index", 0))
        self.dropped_total = int(extra.get("async_dropped_total", 0))


# ----------------------------------------------------------------------------------------
# The corrected loss
# ----------------------------------------------------------------------------------------
def _base_loss(cfg, logp, old_logp, adv, mask):
    from rlbook_code import clipping
    from rlbook_code.kl import kl_k3
    from rlbook_code.logprobs import masked_mean
    from rlbook_code.reinforce import reinforce_loss

    if cfg.loss == "reinforce":
        return reinforce_loss(logp, adv, mask), {"approx_kl_old": float(masked_mean(kl_k3(old_logp, logp.detach()), mask))}
    if cfg.loss == "ppo":
        return clipping.ppo_clip_loss(logp, old_logp, adv, mask, eps_low=cfg.clip_eps_low,
                                      eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip)
    fn = clipping.gspo_loss if cfg.loss == "gspo" else clipping.cispo_loss
    return fn(logp, old_logp, adv, mask, eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high)


def diagnostics(cfg, prox_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``is_*`` metrics of the proximal policy (the learner when the batch arrived) against the
    sampler: ESS, max |log rho|, KL(mu || pi_prox) (k3), at ``cfg.is_level``."""
    from rlbook_code.offpolicy import importance_weights

    _, d = importance_weights(prox_logp, behav_logp, mask, level=cfg.is_level, mode="truncate",
                              low=cfg.is_low, high=cfg.is_high)
    return {"is_ess": d["ess"], "is_max_abs_log_ratio": d["max_abs_log_ratio"], "is_kl_behav": d["kl_behav"]}


def policy_loss(cfg, logp: torch.Tensor, prox_logp: torch.Tensor, behav_logp: torch.Tensor,
                adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-token policy loss ``(b, T)`` of an off-policy run, and its metrics.

    ``logp``: the learner now (differentiable); ``prox_logp``: the learner when the batch
    arrived (the old pass; with one update per batch, this pass's own log-probs, detached);
    ``behav_logp``: the sampler's recorded log-probs. By correction:

    * ``none``: the configured loss against ``prox_logp``, as if the batch were on-policy;
    * ``clip``: the configured loss against ``behav_logp`` (its ratio is pi_theta/mu: the
      clip is the only correction, and the trust region is centred on the stale sampler);
    * ``tis`` / ``mis``: the configured loss against ``prox_logp``, times the detached weight
      ``importance_weights(prox_logp, behav_logp)`` (truncated / masked at
      ``is_low``/``is_high``, level ``is_level``);
    * ``decoupled``: :func:`offpolicy.decoupled_ppo_loss` (clip around ``prox_logp``, weight
      pi_prox/mu capped at ``max_behav_weight``).

    The ``is_*`` diagnostics of :func:`diagnostics` are added in every case."""
    from rlbook_code.offpolicy import decoupled_ppo_loss, importance_weights

    corr = cfg.is_correction
    if corr == "decoupled":
        pg, metrics = decoupled_ppo_loss(logp, prox_logp, behav_logp, adv, mask, eps_low=cfg.clip_eps_low,
                                         eps_high=cfg.clip_eps_high, max_behav_weight=cfg.max_behav_weight)
    else:
        pg, metrics = _base_loss(cfg, logp, behav_logp if corr == "clip" else prox_logp, adv, mask)
        if corr in ("tis", "mis"):
            w, d = importance_weights(prox_logp, behav_logp, mask, level=cfg.is_level,
                                      mode="truncate" if corr == "tis" else "mask", low=cfg.is_low, high=cfg.is_high)
            pg = w.to(pg.dtype) * pg
            metrics = dict(metrics)
            metrics["is_weight_mean"] = d["weight_mean"]
            metrics["is_truncated_frac" if corr == "tis" else "is_masked_frac"] = (
                d["truncated_frac"] if corr == "tis" else d["masked_frac"])
    metrics = dict(metrics)
    metrics.update(diagnostics(cfg, prox_logp, behav_logp, mask))
    return pg, metrics
