"""Training curves from ``metrics.jsonl`` files (written by :mod:`rlbook_code.train`).

Several runs of one configuration (different seeds) are drawn as their mean with a band from
the lowest to the highest seed at each step; several configurations are overlaid.

    fig = plot_runs({"GRPO": ["runs/grpo-seed0", "runs/grpo-seed1"], "PPO": ["runs/ppo-seed0"]})
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["LABELS", "DEFAULT_KEYS", "load_metrics", "series", "seed_band", "smooth", "plot_runs"]

PathLike = str | os.PathLike

LABELS: dict[str, str] = {
    "reward_mean": "mean reward (training batch)",
    "accuracy": "exact-match accuracy (training batch)",
    "eval/greedy_accuracy": "held-out accuracy, greedy",
    "eval/sampled_accuracy": "held-out accuracy, sampled",
    "kl_ref": "KL(pi || pi_ref) per token",
    "approx_kl_old": "approx. KL to the rollout policy",
    "response_length": "response length (tokens)",
    "entropy": "entropy per token (nats)",
    "clip_frac_low": "clip fraction (low)",
    "clip_frac_high": "clip fraction (high)",
    "zero_var_frac": "fraction of zero-variance groups",
    "grad_norm": "gradient norm",
    "value_loss": "value loss",
    "explained_var": "explained variance of V",
    "ess": "IS-weight ESS / n",
}
"""Axis titles of the common metrics."""

DEFAULT_KEYS = ("reward_mean", "eval/sampled_accuracy", "kl_ref", "response_length")


def load_metrics(run_dir: PathLike) -> list[dict[str, float]]:
    """The records of ``<run_dir>/metrics.jsonl``, one dict per line (``step`` in each)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the records that contain ``key`` (evaluations are periodic)."""
    pairs = [(r["step"], r[key]) for r in records if key in r]
    if not pairs:
        return np.zeros(0, dtype=int), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=int), np.asarray(values, dtype=float)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (the first points average what exists)."""
    if window <= 1 or len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def seed_band(run_dirs: Iterable[PathLike], key: str, window: int = 1
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Across runs (seeds): ``(steps, mean, min, max)`` of ``key`` on the steps all runs share."""
    curves = [series(load_metrics(d), key) for d in run_dirs]
    curves = [(s, smooth(v, window)) for s, v in curves if len(s)]
    if not curves:
        return np.zeros(0, dtype=int), np.zeros(0), np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    stack = np.stack([v[np.searchsorted(s, common)] for s, v in curves])  # (runs, steps)
    return np.asarray(common, dtype=int), stack.mean(0), stack.min(0), stack.max(0)


def plot_runs(runs: Mapping[str, Sequence[PathLike]] | Sequence[PathLike],
              keys: Sequence[str] = DEFAULT_KEYS, window: int = 1, ncols: int | None = None,
              title: str | None = None):
    """One panel per metric; one line (mean over seeds) and band (min..max) per label.

    Args:
        runs: ``{label: [run_dir, ...]}``, or a list of run folders (one label each).
        keys: metrics to plot (``LABELS`` gives their titles).
        window: trailing moving-average window applied to each run before averaging.
    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if not isinstance(runs, Mapping):
        runs = {Path(d).name: [d] for d in runs}
    ncols = ncols or min(len(keys), 2)
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, dirs in runs.items():
            steps, mean, lo, hi = seed_band(dirs, key, window=1 if key.startswith("eval/") else window)
            if len(steps) == 0:
                continue
            n = len(dirs)
            (line,) = ax.plot(steps, mean, marker="o" if key.startswith("eval/") else None,
                              markersize=3, label=f"{label}" + (f" ({n} seeds)" if n > 1 else ""))
            if n > 1:
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(LABELS.get(key, key), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(key.split("/")[-1])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
