"""Data parallel (rlbook_code/distributed.py): two gloo ranks under torchrun are one process.

The heart of it: a 2-rank run of 3 steps (interrupted after 2 and resumed) equals a 1-process
run of the same config, metric for metric (1e-5) and parameter for parameter (1e-5 relative).
The two halves of that equality are also tested apart: identical rollouts (the sampled tokens)
and an identical update given identical rollouts, so a failure says which half broke. Each
test starts real torchrun processes on the shipped model (about 20 s each on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlbook_code import checkpoint, config, distributed
from rlbook_code import train as T

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
WORKER = str(ROOT / "tests" / "helpers" / "dist_worker.py")
TIMING = set(T.TIMING_KEYS)
# GRPO with the paths that need the ranks to agree: a reference model (beta > 0, so an old-logprob
# pass), two shuffled minibatches (a rank may own no row of one), chunks of 2 prompts.
SETS = {"steps": 3, "prompts_per_step": 4, "group_size": 4, "generation_batch_size": 2, "max_new_tokens": 6,
        "eval_size": 8, "eval_every": 0, "eval_sampled": False, "num_threads": 1, "progress": False,
        "tensorboard": False, "save_every": 1, "num_minibatches": 2, "beta": 0.04, "save_final_model": False}


def _args(run_dir, **extra) -> list[str]:
    sets = {**SETS, "run_dir": str(run_dir), **extra}
    out = ["--config", str(ROOT / "configs" / "grpo.yaml")]
    for k, v in sets.items():
        out += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


def _torchrun(mode: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", WORKER, mode, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _one_process(run_dir, **extra):
    cfg = config.load_config(ROOT / "configs" / "grpo.yaml", [f"{k}={v}" for k, v in {**SETS, **extra}.items()])
    return T.train(config.apply_overrides(cfg, run_dir=str(run_dir)))


def _weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint" / "state.pt", weights_only=False)["policy"]


def _assert_same_run(a_dir, b_dir, tol=1e-5):
    a, b = checkpoint.read_metrics(a_dir), checkpoint.read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = set(ra) - TIMING
        assert keys == set(rb) - TIMING, ra["step"]
        bad = {k: (ra[k], rb[k]) for k in keys if not math.isclose(ra[k], rb[k], rel_tol=tol, abs_tol=tol)}
        assert not bad, f"step {ra['step']}: {bad}"
    wa, wb = _weights(a_dir), _weights(b_dir)
    for k in wa:
        scale = float(wa[k].abs().max()) or 1.0
        assert float((wa[k] - wb[k]).abs().max()) / scale <= tol, k


def test_shares_of_chunks_and_rows():
    assert distributed.chunk_starts(8, 2) == [0, 2, 4, 6]  # one process: every chunk
    assert list(distributed.local_rows(16)) == list(range(16))
    assert distributed.gather_objects("x") == ["x"] and distributed.all_reduce_sums({"a": 1.0}) == {"a": 1.0}


def test_two_ranks_equal_one_process_through_an_interruption(tmp_path):
    one = _one_process(tmp_path / "one")
    r = _torchrun("plain", _args(tmp_path / "two", stop_after=2))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [x["step"] for x in checkpoint.read_metrics(tmp_path / "two")] == [0, 1, 2]
    r = _torchrun("plain", ["--resume", str(tmp_path / "two"), "--set", "stop_after=null"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("run folder:") == 1, "rank 0 alone reports"
    _assert_same_run(one, tmp_path / "two")
    recs = checkpoint.read_metrics(one)
    assert recs[-1]["kl_ref"] > 0 and all(math.isfinite(v) for rec in recs for v in rec.values())


def test_update_half_given_identical_rollouts(tmp_path):
    """The rollouts fed in, both runs train one step on them: any difference is the update's."""
    cfg = config.apply_overrides(config.load_config(ROOT / "configs" / "grpo.yaml",
                                                    [f"{k}={v}" for k, v in SETS.items()]),
                                 run_dir=str(tmp_path / "probe"), steps=1)
    state = T.build_state(cfg, tmp_path / "probe")
    fed = T.collect_rollouts(state, 1)
    path = tmp_path / "rollouts.pt"
    torch.save(fed, path)
    real = T.collect_rollouts
    try:
        T.collect_rollouts = lambda state, step: fed
        one = _one_process(tmp_path / "one", steps=1)
    finally:
        T.collect_rollouts = real
    r = _torchrun(f"feed={path}", _args(tmp_path / "two", steps=1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _assert_same_run(one, tmp_path / "two")


def test_rollouts_half_samples_the_same_tokens(tmp_path):
    """Rank r samples chunks r*k .. with the chunks' global seeds: the gathered batch is the
    single process's batch, token for token."""
    cfg = config.apply_overrides(config.load_config(ROOT / "configs" / "grpo.yaml",
                                                    [f"{k}={v}" for k, v in SETS.items()]),
                                 run_dir=str(tmp_path / "probe"))
    batch, _, scores, _ = T.collect_rollouts(T.build_state(cfg, tmp_path / "probe"), 1)
    r = _torchrun("plain", _args(tmp_path / "two", steps=1, save_every=0))
    assert r.returncode == 0, r.stderr[-3000:]
    one = _one_process(tmp_path / "one", steps=1, save_every=0)
    a, b = checkpoint.read_metrics(one), checkpoint.read_metrics(tmp_path / "two")
    assert a[1]["reward_mean"] == b[1]["reward_mean"] == float(scores.mean())
    assert a[1]["response_length"] == b[1]["response_length"] == float(batch.completion_mask.sum(1).float().mean())


def test_a_rank_that_raises_ends_every_rank_with_its_message(tmp_path):
    r = _torchrun("fail=1", _args(tmp_path / "fail"), timeout=180)  # a hang would hit the timeout
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "rank 1 failed on purpose at step 2" in out
    assert "local_rank: 1" in out  # torchrun names the worker that failed
    steps = [x["step"] for x in checkpoint.read_metrics(tmp_path / "fail")]
    assert steps == [0, 1], "rank 0 stopped instead of training on alone"
