"""Tests of the sweep runner (rlbook_code/sweep.py) and of the trainer's command-line errors.

The sweep's runs are real trainer processes on the tiny random model of ``conftest.py``
(2 steps each), so a 2 x 2 grid takes a few tens of seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlbook_code import checkpoint, sweep
from rlbook_code import train as T

ROOT = Path(__file__).resolve().parents[1]
GRPO = str(ROOT / "configs" / "grpo.yaml")


def tiny_sets(model: str) -> list[str]:
    sets = {"model_name": model, "steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3,
            "eval_size": 2, "eval_every": 0, "eval_sampled": False, "save_every": 0, "tensorboard": False,
            "save_final_model": False}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


# ----------------------------------------------------------------------------- the grid
def test_grid_is_the_product_in_order_and_names_are_folder_safe():
    grid = sweep.parse_grid(["seed=0,1", "lr=2e-4,5e-4", "adam_betas=[0.9,0.95],[0.9,0.99]"])
    assert grid[2] == ("adam_betas", ["[0.9,0.95]", "[0.9,0.99]"])
    jobs = sweep.grid_jobs(GRPO, grid)
    assert len(jobs) == 8
    assert jobs[0].name == "seed0_lr2e-4_adam_betas0.9-0.95"
    # last key fastest; values parsed as YAML exactly like --set ("2e-4" stays a string: the
    # trainer reads it as the float field it names)
    assert jobs[1].sets == {"seed": 0, "lr": "2e-4", "adam_betas": [0.9, 0.99]}
    assert all("/" not in j.name and " " not in j.name for j in jobs)
    jobs = sweep.grid_jobs(None, sweep.parse_grid(["config=configs/grpo.yaml,configs/ppo.yaml", "seed=0"]))
    assert [(j.name, j.config, j.sets) for j in jobs] == [
        ("grpo_seed0", "configs/grpo.yaml", {"seed": 0}), ("ppo_seed0", "configs/ppo.yaml", {"seed": 0})]


@pytest.mark.parametrize("items, pattern", [
    (["seed"], "KEY=V1,V2"), (["seed=0,,1"], "empty"), (["seed=0", "seed=1"], "twice")])
def test_bad_grids_are_rejected(items, pattern):
    with pytest.raises(ValueError, match=pattern):
        sweep.parse_grid(items)


def test_grid_without_config_and_clashing_names_are_rejected():
    with pytest.raises(ValueError, match="--config"):
        sweep.grid_jobs(None, [("seed", ["0"])])
    with pytest.raises(ValueError, match="share a name"):
        sweep.grid_jobs(GRPO, [("lr", ["1e-3", "1e-3 "])])


def test_help_documents_the_grid_syntax(capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "--grid KEY=V1,V2" in out and "Cartesian product" in out and "reused" in out


# ----------------------------------------------------------------------------- running
def test_two_by_two_grid_runs_in_parallel_and_reuses_finished_runs(tiny_model, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--config", GRPO, "--grid", "seed=0,1", "--grid", "lr=2e-4,5e-4", "--parallel", "2",
            "--out", str(out), *tiny_sets(tiny_model)]
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    names = ["seed0_lr2e-4", "seed0_lr5e-4", "seed1_lr2e-4", "seed1_lr5e-4"]
    for name in names:
        recs = checkpoint.read_metrics(out / name)
        assert [r["step"] for r in recs] == [0, 1, 2], name
        rec = json.loads((out / f"{name}.json").read_text())
        assert rec["returncode"] == 0 and rec["wall_s"] > 0 and "rlbook_code.train" in rec["cmd"]
        assert name in first
    cfg = T.load_config(out / "seed1_lr5e-4" / "config.yaml")
    assert (cfg.seed, cfg.lr, cfg.num_threads) == (1, 5e-4, 1)
    stamps = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
    # the second call reuses all four; a changed command (one more step) is run again
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.count("reused") == 4
    assert {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in names} == stamps
    records = sweep.run_jobs(sweep.grid_jobs(GRPO, sweep.parse_grid(["seed=0"]), {
        **T.parse_overrides(tiny_sets(tiny_model)[1::2]), "lr": 2e-4, "steps": 3}), out, report=None)
    assert records["seed0"]["reused"] is False
    assert [r["step"] for r in checkpoint.read_metrics(out / "seed0")] == [0, 1, 2, 3]


def test_a_failing_run_is_named_with_its_log_and_the_others_finish(tiny_model, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--config", GRPO, "--grid", "lr=5e-4,-1", "--out", str(out), *tiny_sets(tiny_model)]
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed: lr-1" in err and "lr must be a positive finite number" in err
    assert [r["step"] for r in checkpoint.read_metrics(out / "lr5e-4")] == [0, 1, 2]
    assert not (out / "lr-1.json").exists()  # no record: a fixed command runs again next time


def test_dry_run_and_bad_command_lines(tmp_path, capsys):
    assert sweep.main(["--config", GRPO, "--grid", "seed=0,1", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "--set seed=1" in lines[1] and f"run_dir={tmp_path}/seed1" in lines[1]
    assert sweep.main(["--config", "nope.yaml", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sweep.main(["--config", GRPO, "--grid", "seed", "--out", str(tmp_path)]) == 2
    assert sweep.main(["--config", GRPO, "--out", str(tmp_path), "--parallel", "0"]) == 2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _children_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_runs_end_when_the_sweep_is_killed(tiny_model, tmp_path):
    out = tmp_path / "killed-sweep"
    script = textwrap.dedent(f"""
        from rlbook_code import sweep
        sweep.main(["--config", {GRPO!r}, "--grid", "seed=0,1", "--out", {str(out)!r},
                    "--set", "model_name={tiny_model}", "--set", "steps=100000", "--set", "eval_every=0",
                    "--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "tensorboard=false"])
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = f"run_dir={out}/seed"
    deadline = time.time() + 60
    while time.time() < deadline and len([p for p in _children_with(marker) if p != parent.pid]) < 2:
        time.sleep(0.2)
    kids = [p for p in _children_with(marker) if p != parent.pid]
    assert len(kids) == 2, "the sweep did not start its two runs"
    os.kill(parent.pid, signal.SIGKILL)  # no chance to clean up: the kernel must end the children
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in kids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in kids), "a run outlived its sweep"


# ----------------------------------------------------------------------------- the trainer's CLI
def test_cli_user_errors_print_one_line_and_exit_2(tiny_model, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as `make test` sets it; the constant is read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # the default run folder runs/<algo>-seed<seed> lands here
    assert T.main(["--config", GRPO, "--set", "model_name=Qwen/Qwen3-0.6B", "--set", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("model error:") and "'Qwen/Qwen3-0.6B'" in err and "hf download" in err
    run = tmp_path / "exists"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert T.main(["--config", GRPO, "--set", f"model_name={tiny_model}", "--set", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: run folder") and "--resume" in err
    assert T.main(["--resume", str(tmp_path / "nothing-here")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert T.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_failed_run_exits_1(tiny_model, tmp_path, capsys, monkeypatch):
    from rlbook_code import rewards

    def broken(self, *a, **k):
        raise RuntimeError("verifier crashed")

    monkeypatch.setattr(rewards.TaskMixture, "score", broken)
    assert T.main(["--config", GRPO, "--set", f"run_dir={tmp_path / 'r'}", "--set", f"model_name={tiny_model}",
                   "--set", "progress=false", "--set", "tensorboard=false", "--set", "eval_size=2"]) == 1
    assert "run failed: RuntimeError: verifier crashed" in capsys.readouterr().err


def test_train_reexports_the_config_and_checkpoint_names():
    from rlbook_code import config

    for name in ("TrainConfig", "ConfigError", "load_config", "apply_overrides", "validate_config",
                 "field_docs", "config_from_dict", "parse_overrides"):
        assert getattr(T, name) is getattr(config, name), name
    assert T.read_metrics is checkpoint.read_metrics
