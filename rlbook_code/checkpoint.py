"""Checkpoints and metrics files of a run folder.

A run folder (chapter 08) holds::

    config.yaml      the run's TrainConfig (config.save_config)
    metrics.jsonl    one JSON object per step, appended as the run goes (append_metrics)
    checkpoint/      state.pt + config.yaml, written atomically (save_checkpoint)
    final/           the policy in Hugging Face format, at the end

``checkpoint/state.pt`` holds everything a resumed run needs to continue *bit for bit* on a
CPU: the step, the policy, optimizer, scheduler and value-head states, the states of the
torch, Python and NumPy generators (and CUDA's where present), and how many task items were
drawn (the item stream is replayed on resume, not stored). ``extra`` carries whatever else a
trainer needs (an asynchronous sampler's queue position, say) under its own key.

Resuming truncates ``metrics.jsonl`` to the checkpoint's step, so a run interrupted after a
checkpoint and resumed writes every step exactly once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "read_metrics",
    "append_metrics",
    "truncate_metrics",
    "tensorboard_writer",
    "prepare_run_dir",
    "save_final",
    "save_train_state",
    "load_train_state",
]


def rng_state() -> dict[str, Any]:
    """The states of torch's CPU generator, Python's ``random``, NumPy's global generator and,
    when CUDA is available, every CUDA device's generator."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and NumPy's global generators (a run's start)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA's only where CUDA is available)."""
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, *, step: int, policy: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, value_head: torch.nn.Module | None = None,
                    items_drawn: int = 0, config: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<run_dir>/checkpoint`` atomically: a temporary folder, then a rename, so an
    interrupted save never leaves a half-written checkpoint in place of the last good one.

    ``config``: a dataclass config also written as ``checkpoint/config.yaml`` (what
    ``--resume`` reads). Returns the checkpoint folder."""
    from rlbook_code.config import save_config

    run_dir = Path(run_dir)
    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({
        "step": int(step),
        "policy": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "value_head": value_head.state_dict() if value_head is not None else None,
        "rng": rng_state(),
        "items_drawn": int(items_drawn),
        "extra": extra or {},
    }, tmp / "state.pt")
    if config is not None:
        save_config(config, tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_checkpoint(ckpt_dir: str | os.PathLike, *, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, value_head: torch.nn.Module | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the states saved by :func:`save_checkpoint` into the given objects (in place).

    The generators are *not* restored here: the caller first replays whatever consumes
    randomness to rebuild its state (the task's item stream), then calls
    :func:`set_rng_state` with the returned ``"rng"``.

    Returns ``{"step", "items_drawn", "rng", "extra"}``.

    Raises:
        FileNotFoundError: no ``state.pt`` in ``ckpt_dir``.
        ValueError: the checkpoint has a value head and none was given, or the reverse.
    """
    path = Path(ckpt_dir) / "state.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    blob = torch.load(path, map_location=map_location, weights_only=False)
    if (blob["value_head"] is None) != (value_head is None):
        raise ValueError(f"{path}: the checkpoint {'has no' if blob['value_head'] is None else 'has a'} value head "
                         f"but the run {'has one' if value_head is not None else 'has none'} (advantage changed?)")
    policy.load_state_dict(blob["policy"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if value_head is not None:
        value_head.load_state_dict(blob["value_head"])
    return {"step": int(blob["step"]), "items_drawn": int(blob["items_drawn"]), "rng": blob["rng"],
            "extra": blob.get("extra", {})}


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The records of ``<run_dir>/metrics.jsonl`` (one dict per line)."""
    path = Path(run_dir) / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_metrics(run_dir: str | os.PathLike, record: dict[str, float]) -> None:
    """Append one record (one step) to ``<run_dir>/metrics.jsonl``."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drop the records after ``step`` (those written after the checkpoint a run resumes from)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r["step"] <= step]
    with open(path, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")


def tensorboard_writer(run_dir: str | os.PathLike, enabled: bool = True):
    """A TensorBoard ``SummaryWriter`` on ``<run_dir>/tensorboard``, or None when disabled or
    when the optional ``tensorboard`` package is not installed."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))


def prepare_run_dir(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``run_dir`` ready for a run and return it.

    ``resume``: the folder must hold ``checkpoint/state.pt`` (FileNotFoundError otherwise).
    Else a non-empty folder is refused (FileExistsError, naming ``--resume``) unless
    ``overwrite``, which deletes it first: a finished run is never overwritten by accident."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "checkpoint" / "state.pt").exists():
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoint/state.pt in that folder")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run folder {run_dir} exists; pass --resume {run_dir}, "
                                  f"choose another run_dir, or set overwrite=true")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_final(path: str | os.PathLike, policy, tokenizer, value_head: torch.nn.Module | None = None) -> Path:
    """Write the trained policy and its tokenizer with ``save_pretrained`` (loadable with
    ``models.load_policy``), and the value head's state dict as ``value_head.pt`` if any."""
    path = Path(path)
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if value_head is not None:
        torch.save(value_head.state_dict(), path / "value_head.pt")
    return path


def save_train_state(state) -> Path:
    """``save_checkpoint`` of a trainer's loop state (``train.TrainState`` or any object with its
    fields: ``run_dir``, ``step``, ``policy``, ``optimizer``, ``scheduler``, ``value_head``,
    ``items_drawn``, ``cfg`` and an optional ``sampler`` whose ``state_dict()`` goes in ``extra``)."""
    sampler = getattr(state, "sampler", None)
    return save_checkpoint(state.run_dir, step=state.step, policy=state.policy, optimizer=state.optimizer,
                           scheduler=state.scheduler, value_head=state.value_head, items_drawn=state.items_drawn,
                           config=state.cfg, extra=sampler.state_dict() if sampler is not None else None)


def load_train_state(state, ckpt_dir: str | os.PathLike) -> None:
    """Restore a loop state saved by :func:`save_train_state`: weights and optimizer, the sampler's
    own state, then the task's item stream (replayed by drawing as many items as before; an
    asynchronous sampler regenerates its own), then the generators, so the run continues bit for bit."""
    blob = load_checkpoint(ckpt_dir, policy=state.policy, optimizer=state.optimizer, scheduler=state.scheduler,
                           value_head=state.value_head, map_location=state.cfg.device)
    state.items_drawn = blob["items_drawn"]
    sampler = getattr(state, "sampler", None)
    if sampler is not None:
        sampler.load_state_dict(blob["extra"])
    if state.items_drawn and not (sampler is not None and sampler.is_async):
        state.task.sample(state.items_drawn)
    set_rng_state(blob["rng"])
    state.step = blob["step"]
