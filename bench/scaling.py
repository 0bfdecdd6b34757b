"""Data parallel on this machine: the same GRPO run on 1 process and on N processes (torchrun, gloo).

    python bench/scaling.py                  # 1 vs 2 processes, 12 steps, one thread each
    python bench/scaling.py --steps 30 --procs 1 2

Each run is ``python -m rlbook_code.train`` (or ``torchrun --nproc_per_node N -m
rlbook_code.train``) with ``num_threads=1`` per process and ``generation_batch_size =
prompts_per_step / max(procs)``, so every run samples the same chunks with the same seeds and the
runs are the same run (the table checks it: held-out accuracy and the last step's mean reward must
agree). Reported: seconds per step (rollout + update, mean over steps 2..N: step 1 pays one-off
warm-up), response tokens per second of step time, and the speed-up over 1 process, all measured
side by side in one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(procs: int, args, out: Path) -> dict:
    sets = {"steps": args.steps, "prompts_per_step": args.prompts, "group_size": args.group,
            "generation_batch_size": args.prompts // max(args.procs), "num_threads": 1, "eval_every": 0,
            "eval_size": args.eval_size, "progress": "false", "tensorboard": "false", "save_every": 0,
            "save_final_model": "false", "run_dir": str(out), "overwrite": "true"}
    train = ["-m", "rlbook_code.train", "--config", str(REPO / "configs" / "grpo.yaml")]
    for k, v in sets.items():
        train += ["--set", f"{k}={v}"]
    cmd = ([sys.executable] + train if procs == 1 else
           [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(procs)] + train)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{procs} process(es) failed:\n{r.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "rollout_s" in x][1:]
    step_s = statistics.mean(x["rollout_s"] + x["update_s"] for x in steps)
    tokens = statistics.mean(x["tokens_per_s"] * (x["rollout_s"] + x["update_s"]) for x in steps)
    return {"procs": procs, "step_s": step_s, "tokens_per_s": tokens / step_s, "wall_s": wall,
            "final_reward": recs[-1]["reward_mean"], "greedy": recs[-1].get("eval/greedy_accuracy", float("nan"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=32)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.procs:
            rows.append(run(p, args, Path(tmp) / f"p{p}"))
    base = rows[0]["tokens_per_s"]
    print(f"GRPO, {args.prompts} prompts x G={args.group}, {args.steps} steps, one thread per process "
          f"({os.cpu_count()} cores)\n")
    print("| processes | s / step | tokens / s | speed-up | wall s | last reward | greedy acc. |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['wall_s']:.0f} | {r['final_reward']:.4f} | {r['greedy']:.3f} |")
    same = all(abs(r["final_reward"] - rows[0]["final_reward"]) < 1e-6 and r["greedy"] == rows[0]["greedy"] for r in rows)
    print(f"\nsame run on every process count (last reward and held-out accuracy): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
