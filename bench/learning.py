"""Does GRPO learn on the shipped model? Three seeds, start and end held-out accuracy.

    python bench/learning.py                         # configs/grpo.yaml, seeds 0 1 2
    python bench/learning.py --seeds 0 --steps 50 --set lr=1e-3
    python bench/learning.py --config configs/ppo.yaml
    python bench/learning.py --seeds 1 & python bench/learning.py --seeds 2   # 2 cores, 2 seeds at once

Runs the book's trainer (``rlbook_code.train.train``) once per seed into
``<out>/<algo>-seed<seed>`` and prints, per seed, greedy and sampled exact-match accuracy on
the fixed held-out set at step 0 and at the last step, the gain, and the wall time; then the
mean over seeds. Not a test: the numbers go into the issue notes and chapter 08's prose checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    import torch

    from rlbook_code import train as T

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default=str(REPO / "configs" / "grpo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="override the config's steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for the shipped model)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-learning"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    t_all = time.perf_counter()
    for seed in args.seeds:
        overrides = [f"seed={seed}", f"num_threads={args.threads}", "progress=false", "overwrite=true",
                     "save_every=0", "save_final_model=false", "eval_every=0"] + args.set
        if args.steps is not None:
            overrides.append(f"steps={args.steps}")
        cfg = T.load_config(args.config, overrides)
        cfg = T.apply_overrides(cfg, run_dir=str(Path(args.out) / f"{cfg.algo}-seed{seed}"))
        t0 = time.perf_counter()
        run_dir = T.train(cfg)
        wall = time.perf_counter() - t0
        recs = T.read_metrics(run_dir)
        first, last = recs[0], recs[-1]
        train_recs = [r for r in recs if "update_s" in r]
        step_s = sum(r["rollout_s"] + r["update_s"] for r in train_recs) / max(len(train_recs), 1)
        rows.append((seed, first["eval/greedy_accuracy"], last["eval/greedy_accuracy"],
                     first["eval/sampled_accuracy"], last["eval/sampled_accuracy"], wall, step_s))
        print(f"seed {seed}: greedy {rows[-1][1]:.3f} -> {rows[-1][2]:.3f}, "
              f"sampled {rows[-1][3]:.3f} -> {rows[-1][4]:.3f}, {wall:.0f} s ({step_s:.2f} s/step)", flush=True)

    print()
    print(f"config {Path(args.config).name}, {cfg.steps} steps, {cfg.prompts_per_step} prompts x G={cfg.group_size}, "
          f"lr {cfg.lr:g}, {args.threads} threads, eval set {cfg.eval_size}")
    print(f"{'seed':>4} | {'greedy start':>12} {'greedy end':>10} | {'sampled start':>13} {'sampled end':>11} "
          f"{'gain':>6} | {'wall s':>7} {'s/step':>6}")
    for seed, g0, g1, s0, s1, wall, step_s in rows:
        print(f"{seed:>4} | {g0:>12.3f} {g1:>10.3f} | {s0:>13.3f} {s1:>11.3f} {s1 - s0:>+6.3f} | "
              f"{wall:>7.0f} {step_s:>6.2f}")
    n = len(rows)
    mean = [sum(r[i] for r in rows) / n for i in range(1, 7)]
    print(f"{'mean':>4} | {mean[0]:>12.3f} {mean[1]:>10.3f} | {mean[2]:>13.3f} {mean[3]:>11.3f} "
          f"{mean[3] - mean[2]:>+6.3f} | {mean[4]:>7.0f} {mean[5]:>6.2f}")
    print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
