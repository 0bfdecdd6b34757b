"""Tests of the trainer's off-policy modes (rlbook_code/async_sampler.py and its hooks in
train.py / config.py): staleness 0 is today's run, a stale run is off-policy with finite
metrics, corrections change the loss, bad configs fail before any model loads, and the
asynchronous sampler respects max_staleness, dies with the learner (end, exception, Ctrl-C,
SIGKILL) and resumes without training on a batch twice.

The tiny random Qwen3 of conftest.py stands in for the shipped model; rewards come from a
deterministic fake verifier (see tests/test_train.py) where a gradient is needed."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlbook_code import async_sampler as A
from rlbook_code import config as C
from rlbook_code import train as T

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
OFF_KEYS = ("is_", "policy_age", "dropped", "sampler_", "learner_wait", "behav_")


@pytest.fixture
def fake_reward(monkeypatch):
    from rlbook_code.rewards import TaskMixture

    def score(self, completions, items, mode="exact", format_weight=0.0):
        return [float(sum(map(ord, c)) % 2) for c in completions]

    monkeypatch.setattr(TaskMixture, "score", score)


def small(tiny_model, run_dir, config="grpo", **changes) -> C.TrainConfig:
    base = C.load_config(ROOT / "configs" / f"{config}.yaml")
    kw = dict(model_name=tiny_model, steps=4, prompts_per_step=2, group_size=4, max_new_tokens=6,
              eval_size=4, eval_every=2, eval_sampled=False, eval_batch_size=4, save_every=0,
              progress=False, tensorboard=False, save_final_model=False, run_dir=str(run_dir), num_threads=1)
    kw.update(changes)
    return C.apply_overrides(base, **kw)


def finite(recs):
    return all(math.isfinite(v) for r in recs for v in r.values())


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("changes, match", [
    (dict(staleness=-1), "staleness must be >= 0"),
    (dict(is_high=0.0), "is_high must be"),
    (dict(is_low=2.0, is_high=2.0), "is_low must be"),
    (dict(is_correction="tiss"), "is_correction='tiss' is not one of.*did you mean 'tis'"),
    (dict(is_level="seq"), "is_level"),
    (dict(is_correction="decoupled", loss="cispo", clip_eps_low=None), "needs loss='ppo'"),
    (dict(is_correction="clip", loss="reinforce"), "ratio loss"),
    (dict(sampler_temperature=0.0), "sampler_temperature must be > 0"),
    (dict(sampler_dtype="fp8"), "sampler_dtype"),
    (dict(max_behav_weight=0.0), "max_behav_weight"),
    (dict(async_rollouts=True, staleness=2), "staleness must be 0"),
    (dict(async_rollouts=True, dynamic_sampling=True), "dynamic_sampling"),
    (dict(async_rollouts=True, device="mps"), "cannot be shared"),
    (dict(async_rollouts=True, sync_every=4, max_staleness=1), "drop batches forever"),
    (dict(sync_every=0), "sync_every must be >= 1"),
])
def test_bad_offpolicy_configs_fail_before_loading(changes, match):
    with pytest.raises(C.ConfigError, match=match):
        C.config_from_dict({"model_name": "/nonexistent/model", **changes})


def test_defaults_are_on_policy():
    cfg = C.TrainConfig()
    assert not A.offpolicy_active(cfg)
    assert not A.offpolicy_active(C.apply_overrides(cfg, sampler_dtype="float32", sampler_temperature=1.0))
    assert A.offpolicy_active(C.apply_overrides(cfg, staleness=1))
    assert A.offpolicy_active(C.apply_overrides(cfg, sampler_dtype="bfloat16"))


# ----------------------------------------------------------------------------- staleness 0 = today
# The first four steps of the tiny-model runs below, recorded with the trainer before the
# off-policy hooks existed (commit 28498a0); the same code after them gave identical metrics and
# weight bytes on this machine. Rounded to 1e-5 so another CPU's float rounding cannot fail it.
GOLDEN = {
    "grpo": {"grad_norm": [1.0524050, 1.1007754, 0.7546277, 1.1030385],
             "entropy": [4.5959730, 4.5961933, 4.5958619, 4.5957680]},
    "ppo": {"grad_norm": [1.7930121, 1.8247767, 1.7291131, 1.7804767],
            "entropy": [4.5959730, 4.5961928, 4.5958862, 4.5957885]},
}


@pytest.mark.parametrize("config", ["grpo", "ppo"])
def test_staleness_zero_reproduces_the_on_policy_trainer(tiny_model, tmp_path, fake_reward, config):
    cfg = small(tiny_model, tmp_path / "a", config, eval_sampled=True)
    recs = T.read_metrics(T.train(cfg))
    steps = [r for r in recs if "grad_norm" in r]
    for key, want in GOLDEN[config].items():
        assert [round(r[key], 5) for r in steps] == pytest.approx(want, abs=2e-5), key
    assert not [k for r in recs for k in r if k.startswith(OFF_KEYS)]  # no new metric in on-policy runs
    explicit = small(tiny_model, tmp_path / "b", config, eval_sampled=True, staleness=0, is_correction="none",
                     sampler_dtype="float32", sampler_temperature=1.0, async_rollouts=False)
    again = T.read_metrics(T.train(explicit))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in T.TIMING_KEYS} for r in rs]  # noqa: E731
    assert strip(again) == strip(recs)


# ----------------------------------------------------------------------------- stale runs
def test_stale_run_is_off_policy_with_finite_metrics(tiny_model, tmp_path, fake_reward):
    cfg = small(tiny_model, tmp_path / "r", staleness=2, num_minibatches=2)
    recs = T.read_metrics(T.train(cfg))
    steps = [r for r in recs if "grad_norm" in r]
    assert [r["policy_age"] for r in steps] == [0.0, 1.0, 2.0, 2.0]
    assert finite(recs)
    assert steps[0]["is_max_abs_log_ratio"] < 1e-4  # lag 0: the sampler's log-probs are the learner's
    assert all(r["is_max_abs_log_ratio"] > 1e-4 for r in steps[1:])
    assert all(r["ratio_mean"] != 1.0 for r in steps)  # the second minibatch moves away from pi_prox
    assert all(0 < r["is_ess"] <= 1 for r in steps)


@pytest.mark.parametrize("corr", ["clip", "tis", "mis", "decoupled"])
def test_corrections_run_and_differ_from_none(tiny_model, tmp_path, fake_reward, corr):
    none = T.read_metrics(T.train(small(tiny_model, tmp_path / "none", staleness=2, is_high=1.001, is_low=0.999)))
    cfg = small(tiny_model, tmp_path / corr, staleness=2, is_correction=corr, is_high=1.001, is_low=0.999,
                max_behav_weight=1.001)
    recs = T.read_metrics(T.train(cfg))
    assert finite(recs)
    last = [r for r in recs if "grad_norm" in r][-1]
    assert last["grad_norm"] != [r for r in none if "grad_norm" in r][-1]["grad_norm"]
    if corr == "tis":
        assert last["is_truncated_frac"] > 0
    if corr == "mis":
        assert last["is_masked_frac"] > 0
    if corr == "decoupled":
        assert last["behav_dropped_frac"] > 0
    if corr == "clip":  # the ratio is against the sampler: pi_theta / mu != 1 on the first update
        assert last["ratio_mean"] != 1.0


def test_stale_snapshots_come_from_the_right_step(tiny_model):
    from rlbook_code.models import load_policy

    policy, _ = load_policy(tiny_model, device="cpu")
    cfg = C.apply_overrides(C.TrainConfig(), staleness=2)
    s = A.StaleSampler(cfg, policy)
    first = {k: v.clone() for k, v in policy.state_dict().items()}
    for version in range(5):
        model, temp, stats = s.model_for(policy, version)
        assert stats["policy_age"] == min(version, 2) and temp == 1.0
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(1.0)  # one "update": every weight + 1
        w = next(iter(model.state_dict().values()))
        assert torch.allclose(w, first[next(iter(first))] + max(0, version - 2), atol=1e-5)


def test_stale_resume_is_bit_for_bit(tiny_model, tmp_path, fake_reward):
    full = T.read_metrics(T.train(small(tiny_model, tmp_path / "full", staleness=2, steps=5)))
    cfg = small(tiny_model, tmp_path / "part", staleness=2, steps=5, stop_after=3)
    T.train(cfg)
    T.train(cfg, resume=tmp_path / "part")
    part = T.read_metrics(tmp_path / "part")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in T.TIMING_KEYS} for r in rs]  # noqa: E731
    assert strip(part) == strip(full)


def test_sampler_dtype_mismatch_at_lag_zero(tiny_model, tmp_path, fake_reward):
    recs = T.read_metrics(T.train(small(tiny_model, tmp_path / "bf16", sampler_dtype="bfloat16", steps=2)))
    steps = [r for r in recs if "grad_norm" in r]
    assert all(r["policy_age"] == 0.0 for r in steps)
    assert all(r["is_max_abs_log_ratio"] > 1e-4 for r in steps)  # bf16 logits differ from float32 ones


def test_sampler_temperature_mismatch(tiny_model, tmp_path, fake_reward):
    recs = T.read_metrics(T.train(small(tiny_model, tmp_path / "temp", sampler_temperature=2.0, steps=2,
                                        is_correction="tis")))
    steps = [r for r in recs if "grad_norm" in r]
    assert all(r["policy_age"] == 0.0 for r in steps)
    assert all(r["is_max_abs_log_ratio"] > 0.05 and r["is_ess"] < 1.0 for r in steps)  # mu = softmax(z / 2)
    assert finite(recs)


# ----------------------------------------------------------------------------- async
@pytest.fixture
def sampler_pids(monkeypatch):
    pids = []
    orig = A.AsyncSampler.start

    def start(self, state):
        orig(self, state)
        pids.append(self.pid)

    monkeypatch.setattr(A.AsyncSampler, "start", start)
    return pids


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (exited, or a zombie waiting to be reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith(("Z", "X")):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_async_respects_max_staleness_and_stops_with_the_run(tiny_model, tmp_path, fake_reward, sampler_pids):
    cfg = small(tiny_model, tmp_path / "a", async_rollouts=True, max_staleness=1, sync_every=1, steps=6)
    recs = T.read_metrics(T.train(cfg))
    steps = [r for r in recs if "grad_norm" in r]
    assert [r["step"] for r in recs] == list(range(7))
    assert all(0 <= r["policy_age"] <= 1 for r in steps)
    assert all(r["sampler_version"] == r["step"] - 1 - r["policy_age"] for r in steps)
    batches = [r["sampler_batch"] for r in steps]
    assert batches == sorted(set(batches))  # each batch trained on once, in order
    assert steps[-1]["dropped_total"] == sum(r["dropped_batches"] for r in steps)
    assert batches[-1] == len(steps) - 1 + steps[-1]["dropped_total"]  # every batch either trained or dropped
    assert finite(recs)
    assert len(sampler_pids) == 1 and gone(sampler_pids[0], timeout=2.0)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_async_sampler_stops_on_exception_and_ctrl_c(tiny_model, tmp_path, monkeypatch, sampler_pids, exc):
    orig = T.train_step

    def failing(state, step):
        if step == 2:
            raise exc
        return orig(state, step)

    monkeypatch.setattr(T, "train_step", failing)
    with pytest.raises(type(exc)):
        T.train(small(tiny_model, tmp_path / "x", async_rollouts=True))
    assert len(sampler_pids) == 1 and gone(sampler_pids[0], timeout=2.0)


def test_async_sampler_dies_with_a_killed_learner(tiny_model, tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rlbook_code.train", "--config", str(ROOT / "configs" / "grpo.yaml")]
    for k, v in dict(model_name=tiny_model, steps=100000, prompts_per_step=2, group_size=4, max_new_tokens=4,
                     eval_size=4, eval_every=0, eval_sampled=False, save_every=0, progress=False, tensorboard=False,
                     save_final_model=False, run_dir=str(run), num_threads=1, async_rollouts=True).items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    learner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import psutil

        deadline = time.monotonic() + 60
        metrics = run / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert learner.poll() is None, "the learner exited early"
            time.sleep(0.2)
        kids = [p for p in psutil.Process(learner.pid).children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
        assert kids, "no sampler process found"
        learner.send_signal(signal.SIGKILL)
        learner.wait(timeout=10)
        assert all(gone(p.pid) for p in kids)
    finally:
        if learner.poll() is None:
            learner.kill()


def test_async_resume_discards_in_flight_batches(tiny_model, tmp_path, fake_reward):
    cfg = small(tiny_model, tmp_path / "r", async_rollouts=True, steps=6, stop_after=3)
    T.train(cfg)
    first = T.read_metrics(tmp_path / "r")
    T.train(cfg, resume=tmp_path / "r")
    recs = T.read_metrics(tmp_path / "r")
    assert [r["step"] for r in recs] == list(range(7))  # every step once, continuing from the checkpoint
    assert recs[:4] == first[:4]
    batches = [r["sampler_batch"] for r in recs if "sampler_batch" in r]
    assert batches == sorted(set(batches))  # nothing trained on twice
    assert recs[4]["sampler_version"] == 3  # the resumed sampler starts from the checkpoint's weights
    assert recs[4]["sampler_batch"] > recs[3]["sampler_batch"]
    assert finite(recs)
