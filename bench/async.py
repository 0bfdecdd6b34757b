"""Synchronous vs asynchronous sampling: tokens per second and held-out accuracy, three seeds.

    python bench/async.py                          # configs/grpo.yaml, 60 steps, seeds 0 1 2
    python bench/async.py --steps 30 --seeds 0
    python bench/async.py --set max_staleness=1 --set sync_every=1

For each seed, runs the book's trainer twice, one after the other (never side by side), for the
same number of updates: synchronously (one process, ``--threads`` torch threads) and with
``async_rollouts: true`` (a learner and a sampler process, ``--threads`` each; by default with
``is_correction: clip``, the correction that holds at small lags in chapter 11). Prints per run
the response tokens trained per second of training loop (rollouts, waits and updates, without
evaluations), the process wall time, the final held-out greedy and sampled accuracy (the same
number of trained samples in both), the mean policy age and the dropped batches; then the
means over seeds and the speed-up. Not a test: the numbers go into chapter 11's note.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent


def throughput(recs: list[dict]) -> float:
    """Response tokens per second of training loop: ``tokens_per_s`` of a step times its
    ``rollout_s + update_s`` is its token count. The first step is left out: in async mode it
    includes starting the sampler process (imports, model load), a one-off cost."""
    steps = [r for r in recs if "grad_norm" in r][1:]
    tokens = sum(r["tokens_per_s"] * (r["rollout_s"] + r["update_s"]) for r in steps)
    return tokens / sum(r["rollout_s"] + r["update_s"] for r in steps)


PROBE = ("import time, torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nt, n = time.perf_counter(), 0\n"
         "while time.perf_counter() - t < 3:\n    a = torch.tanh(a @ a * 0.01)\n    n += 1\nprint(n)")


def capacity() -> float:
    """Work of two single-threaded processes at once over the work of one: 2.0 on two idle
    cores, about 1.0 when other work holds the cores (then no two-process trainer can gain)."""
    import subprocess

    def work(k: int) -> int:
        procs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return sum(int(p.communicate()[0]) for p in procs)

    return work(2) / work(1)


def main(argv: list[str] | None = None) -> int:
    from rlbook_code import sweep

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default=str(REPO / "configs" / "grpo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-async"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
    ap.add_argument("--async-correction", default="clip",
                    help="is_correction of the async runs (default clip: chapter 11's grid; none collapses at lag 2)")
    args = ap.parse_args(argv)
    from rlbook_code.config import parse_overrides

    extra = parse_overrides(args.set)
    base = {"steps": args.steps, "eval_every": 0, "save_every": 0, "save_final_model": False, "tensorboard": False,
            **extra}
    print(f"machine: two single-threaded processes do {capacity():.2f}x the work of one", flush=True)
    rows: dict[str, list[dict]] = {"sync": [], "async": []}
    t_all = time.perf_counter()
    for seed in args.seeds:
        for mode in ("sync", "async"):
            sets = {**base, "seed": seed}
            if mode == "async":
                sets.update(async_rollouts=True, is_correction=args.async_correction)
            job = sweep.Job(name=f"{mode}-seed{seed}", config=args.config, sets=sets)
            rec = sweep.run_jobs([job], args.out, parallel=1, threads=args.threads, reuse=False, report=None)[job.name]
            recs = sweep_metrics(Path(args.out) / job.name)
            last = [r for r in recs if "eval/greedy_accuracy" in r][-1]
            steps = [r for r in recs if "grad_norm" in r]
            row = {"seed": seed, "tps": throughput(recs), "wall": rec["wall_s"], "greedy": last["eval/greedy_accuracy"],
                   "sampled": last.get("eval/sampled_accuracy", float("nan")),
                   "age": statistics.mean(r.get("policy_age", 0.0) for r in steps),
                   "dropped": steps[-1].get("dropped_total", 0.0)}
            rows[mode].append(row)
            print(f"{mode:>5} seed {seed}: {row['tps']:7.0f} tokens/s, wall {row['wall']:6.1f} s, "
                  f"greedy {row['greedy']:.3f}, sampled {row['sampled']:.3f}, mean policy age {row['age']:.2f}, "
                  f"dropped {row['dropped']:.0f}", flush=True)
    print()
    mean = {m: {k: statistics.mean(r[k] for r in rs) for k in ("tps", "wall", "greedy", "sampled", "age")}
            for m, rs in rows.items()}
    sd = {m: {k: statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0 for k in ("greedy", "sampled")}
          for m, rs in rows.items()}
    for m in ("sync", "async"):
        print(f"{m:>5} mean of {len(args.seeds)}: {mean[m]['tps']:7.0f} tokens/s, wall {mean[m]['wall']:6.1f} s, "
              f"greedy {mean[m]['greedy']:.3f} ± {sd[m]['greedy']:.3f}, sampled {mean[m]['sampled']:.3f} ± "
              f"{sd[m]['sampled']:.3f}, policy age {mean[m]['age']:.2f}")
    ratios = [a["tps"] / s["tps"] for a, s in zip(rows["async"], rows["sync"])]
    print(f"async / sync tokens per second: {statistics.mean(ratios):.2f}x "
          f"(per seed {', '.join(f'{x:.2f}' for x in ratios)}); {args.steps} steps, {args.threads} thread(s) per "
          f"process; all runs {time.perf_counter() - t_all:.0f} s; machine capacity now {capacity():.2f}x")
    return 0


def sweep_metrics(run_dir: Path) -> list[dict]:
    from rlbook_code.checkpoint import read_metrics

    return read_metrics(run_dir)


if __name__ == "__main__":
    sys.exit(main())
