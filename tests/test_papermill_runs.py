"""Headless runs of the training chapters with small parameters (``make papermill``).

Each notebook named in ``tests/papermill_ci.yaml`` is executed with papermill into a temporary
folder. papermill only *warns* about a parameter the notebook does not declare, so the names
are checked against ``papermill.inspect_notebook`` first and an unknown one fails the test.
After the run, every metric of every step in the run's ``metrics.jsonl`` must be finite.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CI = yaml.safe_load((ROOT / "tests" / "papermill_ci.yaml").read_text())

pytestmark = pytest.mark.papermill


def test_parameter_file_names_existing_notebooks():
    assert CI, "tests/papermill_ci.yaml lists no notebook"
    for name in CI:
        assert (ROOT / name).exists(), f"{name} in papermill_ci.yaml does not exist"


@pytest.mark.parametrize("name", sorted(CI), ids=lambda n: Path(n).stem)
def test_training_chapter_runs_headless(name, tmp_path):
    papermill = pytest.importorskip("papermill")
    path = ROOT / name
    declared = papermill.inspect_notebook(str(path))
    params = dict(CI[name] or {})
    unknown = sorted(set(params) - set(declared))
    assert not unknown, f"{name}: unknown parameter(s) {unknown}; the notebook declares {sorted(declared)}"
    assert "run_dir" in declared, f"{name} must declare a run_dir parameter"
    run_dir = tmp_path / "run"
    params["run_dir"] = str(run_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters=params,
                               cwd=str(path.parent), kernel_name="python3", progress_bar=False)
    # one run writes run_dir/metrics.jsonl; the algorithm zoo writes one folder per run
    files = sorted(run_dir.rglob("metrics.jsonl"))
    assert files, f"{name} wrote no metrics.jsonl under its run_dir"
    for file in files:
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        assert records, f"{file} is empty"
        steps = [r["step"] for r in records]
        assert steps[-1] == params.get("steps", steps[-1]), f"{file}: the run stopped at step {steps[-1]}"
        bad = [(r["step"], k, v) for r in records for k, v in r.items() if not math.isfinite(v)]
        assert not bad, f"{file}: non-finite metrics (step, name, value): {bad[:10]}"
