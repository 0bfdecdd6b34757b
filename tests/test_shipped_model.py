"""The shipped model matches its model card.

Fast tests re-measure the held-out accuracy reported in the card (same items, same seeds;
tolerance ``TOL`` absorbs float differences between CPUs that can flip a few sampled or argmax
tokens). The slow test re-runs ``python -m rlbook_code.pretrain`` and checks that it lands in
the card's band (about 5 minutes on one idle core): ``pytest -m slow tests/test_shipped_model.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rlbook_code.evaluation import evaluate
from rlbook_code.models import DEFAULT_MODEL, load_policy
from rlbook_code.rewards import DEFAULT_TASK, TaskMixture

torch.set_num_threads(1)  # a 0.8M-parameter model gains nothing from a 2nd thread; under load it loses a lot

TOL = 0.03
"""Allowed |re-measured - card| accuracy (500 items: 15 answers)."""

FOLDER = Path(DEFAULT_MODEL)
LOG = json.loads((FOLDER / "training_log.json").read_text())


@pytest.fixture(scope="module")
def policy():
    return load_policy(device="cpu")


def test_folder_is_small_and_safetensors_only():
    files = {p.name for p in FOLDER.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    total = sum(p.stat().st_size for p in FOLDER.iterdir())
    assert total < 5e6, f"model folder is {total / 1e6:.1f} MB"


def test_loads_as_hf_model(policy):
    model, tok = policy
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == LOG["num_parameters"]
    assert f"{LOG['num_parameters']:,}" in (FOLDER / "README.md").read_text()
    assert tok.is_fast and tok.padding_side == "left"
    assert tok.decode(tok("neon", add_special_tokens=False)["input_ids"]) == "neon"


def test_card_states_the_logged_numbers():
    card = (FOLDER / "README.md").read_text()
    rep = LOG["report"]
    for mode in ("greedy", "sampled"):
        assert f"{rep[mode]['accuracy']:.3f}" in card
    assert re.search(r"python -m rlbook_code\.pretrain --out \S+ --seed 0", card)
    lo, hi = LOG["config"]["band"]
    assert f"[{lo}, {hi}]" in card


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_heldout_accuracy_matches_card(policy, mode):
    model, tok = policy
    rep = LOG["report"]
    task = TaskMixture(DEFAULT_TASK, seed=LOG["config"]["seed"])
    items = task.eval_items(rep["n"], seed=rep["eval_seed"])
    res = evaluate(
        model, tok, task, items, LOG["config"]["max_new_tokens"], greedy=mode == "greedy",
        temperature=1.0, seed=rep["sample_seed"],
    )
    card = rep[mode]["accuracy"]
    assert abs(res["accuracy"] - card) <= TOL, f"{mode}: measured {res['accuracy']:.3f}, card {card:.3f}"
    # imperfect on purpose: RL needs room to improve it, and greedy beats sampling
    assert 0.2 <= rep["sampled"]["accuracy"] < rep["greedy"]["accuracy"] < 0.9


@pytest.mark.slow
def test_pretrain_rerun_lands_in_band(tmp_path):
    from rlbook_code.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(out=str(tmp_path / "model"), seed=LOG["config"]["seed"], report_n=200)
    summary = pretrain(cfg, log=lambda *a: None)
    lo, hi = LOG["config"]["band"]
    assert lo <= summary["selection_sampled_accuracy"] <= hi
    rep = summary["report"]
    assert lo - 0.1 <= rep["sampled"]["accuracy"] <= hi + 0.1  # 200 items: ~3.5 points of noise
    assert rep["greedy"]["accuracy"] > rep["sampled"]["accuracy"]
    model, tok = load_policy(cfg.out, device="cpu")
    assert sum(p.numel() for p in model.parameters()) == LOG["num_parameters"]
