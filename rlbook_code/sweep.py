"""Grids of trainer runs, each its own process, N at a time (chapters 10, 11, 13).

This is the seed projects' Hydra ``--multirun`` without Hydra: every run is the command-line
trainer ``python -m rlbook_code.train --config C --set k=v ...`` in a separate process with
one thread, so ``parallel`` runs fill ``parallel`` cores, and a run's result depends only on
its config, its seed and its thread count, never on what runs beside it.

Command line::

    python -m rlbook_code.sweep --config configs/grpo.yaml \\
        --grid seed=0,1,2 --grid lr=2e-4,5e-4 --parallel 2 --out runs/sweep [--set steps=50]

* ``--grid KEY=V1,V2,...`` (repeatable): the runs are the Cartesian product of all grids, in
  the order given (the last grid varies fastest). Values are parsed as YAML, like ``--set``;
  commas inside brackets do not split (``--grid adam_betas=[0.9,0.95],[0.9,0.99]``). The key
  ``config`` takes config files: ``--grid config=configs/grpo.yaml,configs/ppo.yaml``.
* ``--set KEY=VALUE`` (repeatable): applied to every run.
* Each run writes ``<out>/<name>/`` (its run folder: ``metrics.jsonl``, checkpoints),
  ``<out>/<name>.log`` (its stdout and stderr) and, once it has finished, ``<out>/<name>.json``
  (its command, wall time and exit code). ``<name>`` joins the grid values: ``seed0_lr2e-4``.
* A run whose record exists, finished with exit code 0, and whose command is unchanged is
  *reused*, not run again: re-running a sweep (or a notebook that calls it) only trains what is
  new or what changed. A run interrupted before it finished has no record and starts over.
* The sweep runs every run, then exits 1 naming each run that failed, with the last lines of
  its log; 2 for a bad command line. ``--dry-run`` prints the commands.

Child processes end with the sweep: on Linux each child asks the kernel for SIGTERM when its
parent dies (``PR_SET_PDEATHSIG``), and an exception or Ctrl-C in the sweep terminates them.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = ["Job", "SweepError", "parse_grid", "grid_jobs", "command", "run_jobs", "main"]

TRAIN_MODULE = "rlbook_code.train"


class SweepError(RuntimeError):
    """One or more runs of a sweep failed; ``failed`` maps their names to the tails of their logs."""

    def __init__(self, failed: dict[str, str]):
        self.failed = failed
        parts = [f"{len(failed)} run(s) failed: {', '.join(failed)}"]
        for name, tail in failed.items():
            parts.append(f"--- {name} (last lines of its log) ---\n{tail}")
        super().__init__("\n".join(parts))


@dataclass
class Job:
    """One run of a sweep: a config file and the ``--set`` overrides on top of it."""

    name: str
    """Folder-safe name, unique within the sweep (``<out>/<name>/`` is the run folder)."""
    config: str
    """Path of the YAML config."""
    sets: dict[str, Any] = field(default_factory=dict)
    """Overrides, as ``--set key=value`` (values written as YAML)."""
    module: str = TRAIN_MODULE
    """The trainer module run with ``python -m``: ``rlbook_code.train`` (policy gradients) or
    ``rlbook_code.align`` (the DPO family and rejection sampling, chapter 14); both take
    ``--config`` and ``--set``."""


def _split_values(raw: str) -> list[str]:
    """``"0,1,[0.9,0.95]"`` -> ``["0", "1", "[0.9,0.95]"]``: commas split, except inside brackets."""
    out, depth, cur = [], 0, ""
    for ch in raw:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["seed=0,1", "lr=2e-4,5e-4"]`` -> ``[("seed", ["0", "1"]), ("lr", ["2e-4", "5e-4"])]``.

    Values stay the strings typed (they are parsed as YAML by the trainer, and name the runs).
    Raises ValueError on a missing ``=``, an empty value, or a key given twice."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid expects KEY=V1,V2,..., received {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        values = _split_values(raw)
        if not key or any(v == "" for v in values):
            raise ValueError(f"--grid {item!r}: empty key or value")
        if key in dict(grid):
            raise ValueError(f"--grid key {key!r} given twice")
        grid.append((key, values))
    return grid


def _slug(key: str, value: str) -> str:
    """``("lr", "2e-4")`` -> ``lr2e-4``; ``("adam_betas", "[0.9,0.95]")`` -> ``adam_betas0.9-0.95``;
    ``("config", "configs/ppo.yaml")`` -> ``ppo``."""
    if key == "config":
        key, value = "", Path(value).stem
    value = re.sub(r"[\[\]{}()\s'\"]", "", value)
    return key + re.sub(r"[^A-Za-z0-9.+=-]+", "-", value)


def grid_jobs(config: str | os.PathLike | None, grid: list[tuple[str, list[str]]],
              sets: dict[str, Any] | None = None) -> list[Job]:
    """The Cartesian product of ``grid`` (last key fastest) as :class:`Job` objects.

    ``config`` is the config of every job, unless the grid has a ``config`` key."""
    keys = [k for k, _ in grid]
    if config is None and "config" not in keys:
        raise ValueError("a sweep needs --config or a --grid config=... entry")
    jobs = []
    for combo in itertools.product(*[vals for _, vals in grid]) if grid else [()]:
        chosen = dict(zip(keys, combo))
        cfg = str(chosen.pop("config", config))
        name = "_".join(_slug(k, v) for k, v in zip(keys, combo)) or Path(cfg).stem
        job_sets = dict(sets or {})
        job_sets.update({k: yaml.safe_load(v) for k, v in chosen.items()})
        jobs.append(Job(name=name, config=cfg, sets=job_sets))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two runs of the grid would share a name: {dup}")
    return jobs


def _yaml_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def command(job: Job, out: str | os.PathLike, threads: int = 1) -> list[str]:
    """The trainer command of ``job``: its own run folder under ``out``, ``threads`` torch
    threads, no progress bar; the job's ``sets`` come last and win."""
    sets: dict[str, Any] = {"run_dir": str(Path(out) / job.name), "overwrite": True, "num_threads": threads,
                            "progress": False}
    sets.update(job.sets)
    cmd = [sys.executable, "-m", job.module, "--config", str(job.config)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={_yaml_value(v)}"]
    return cmd


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not glibc Linux: the sweep's own cleanup still terminates children
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_jobs(jobs: list[Job], out: str | os.PathLike, *, parallel: int = 2, threads: int = 1,
             reuse: bool = True, env: dict[str, str] | None = None,
             report: Callable[[str], None] | None = print, poll_s: float = 0.2) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` (``parallel`` at a time) and return ``{name: record}``.

    A record is ``{"cmd", "wall_s", "returncode", "run_dir", "reused"}``; ``cmd`` omits the
    interpreter, so a record made by another Python still matches. With ``reuse``, a job whose
    record shows exit code 0 for the same command is not run again. ``report`` gets one line
    per finished run (None: silent).

    Raises:
        SweepError: after every job has run, if any failed (names and log tails).
        ValueError: ``parallel < 1``, ``threads < 1``, or two jobs with the same name.
    """
    if parallel < 1 or threads < 1:
        raise ValueError(f"parallel and threads must be >= 1, received {parallel}, {threads}")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, received {names}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    child_env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    say = report or (lambda line: None)
    width = max((len(n) for n in names), default=0)
    records: dict[str, dict[str, Any]] = {}
    pending = []
    for job in jobs:
        cmd = command(job, out, threads)
        rec_path = out / f"{job.name}.json"
        if reuse and rec_path.exists():
            rec = json.loads(rec_path.read_text())
            if rec.get("cmd") == cmd[1:] and rec.get("returncode") == 0 \
                    and (out / job.name / "metrics.jsonl").exists():
                records[job.name] = dict(rec, reused=True)
                say(f"{job.name:<{width}}  {rec['wall_s']:7.1f} s (reused from an earlier sweep)")
                continue
        rec_path.unlink(missing_ok=True)  # a stale record must not outlive a changed command
        pending.append((job, cmd))
    running: dict[str, tuple[subprocess.Popen, float, Any, list[str]]] = {}
    failed: dict[str, str] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job, cmd = pending.pop(0)
                log = open(out / f"{job.name}.log", "w")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                                        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
                running[job.name] = (proc, time.perf_counter(), log, cmd)
            time.sleep(poll_s)
            for name, (proc, t0, log, cmd) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                wall = time.perf_counter() - t0
                rec = {"cmd": cmd[1:], "wall_s": wall, "returncode": proc.returncode,
                       "run_dir": str(out / name)}
                if proc.returncode == 0:
                    (out / f"{name}.json").write_text(json.dumps(rec, indent=1))
                    say(f"{name:<{width}}  {wall:7.1f} s")
                else:
                    failed[name] = _tail(out / f"{name}.log")
                    say(f"{name:<{width}}  FAILED (exit code {proc.returncode}) after {wall:.1f} s; "
                        f"log: {out / f'{name}.log'}")
                records[name] = dict(rec, reused=False)
    finally:
        for proc, _t0, log, _cmd in running.values():  # an exception or Ctrl-C: no orphans
            proc.terminate()
        for proc, _t0, log, _cmd in running.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    if failed:
        raise SweepError(failed)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlbook_code.sweep",
        description="Run a grid of trainer runs as separate processes, N at a time.",
        epilog=__doc__.split("Command line::", 1)[1].split("Child processes", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config of every run (or use --grid config=...)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a grid axis; the runs are the product of all axes (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override applied to every run (value parsed as YAML; repeatable)")
    parser.add_argument("--out", required=True, help="sweep folder: one run folder, log and record per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--no-reuse", action="store_true", help="run every job again, even if recorded")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    try:
        from rlbook_code.config import parse_overrides

        grid = parse_grid(args.grid)
        jobs = grid_jobs(args.config, grid, parse_overrides(args.overrides))
        for job in jobs:
            if not Path(job.config).exists():
                raise ValueError(f"config file {job.config!r} does not exist")
        if args.parallel < 1 or args.threads < 1:
            raise ValueError("--parallel and --threads must be >= 1")
    except ValueError as e:  # ConfigError is a ValueError
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for job in jobs:
            print(" ".join(["python"] + command(job, args.out, args.threads)[1:]))
        return 0
    print(f"{len(jobs)} runs, {args.parallel} at a time, into {args.out}", flush=True)
    t0 = time.perf_counter()
    try:
        run_jobs(jobs, args.out, parallel=args.parallel, threads=args.threads, reuse=not args.no_reuse,
                 report=lambda line: print(line, flush=True))
    except SweepError as e:
        print(f"sweep failed: {e}", file=sys.stderr)
        return 1
    print(f"all {len(jobs)} runs done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
