"""Tests of the direct-alignment trainer (rlbook_code/align.py): configs and their errors, pair
selection against brute force, KTO's mismatched pairs, reference log-probs computed once per
offline dataset, the first step at the reference, gradient accumulation, resume bit for bit,
the command line and the sweep hook."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch

from rlbook_code import align as A
from rlbook_code import checkpoint, preference, sweep
from rlbook_code import config as C

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "align").glob("*.yaml"))
TIMING = set(A.TIMING_KEYS)


@pytest.fixture
def fake_reward(monkeypatch):
    """Reward 1 when the completion's character codes sum to an odd number: deterministic, and
    it varies within groups (the tiny random model never answers right)."""
    from rlbook_code.rewards import TaskMixture

    def score(self, completions, items, mode="exact", format_weight=0.0):
        return [float(sum(map(ord, c)) % 2) for c in completions]

    monkeypatch.setattr(TaskMixture, "score", score)


def small(tiny_model: str, run_dir, config: str = "dpo", **changes) -> A.AlignConfig:
    base = C.load_config(ROOT / "configs" / "align" / f"{config}.yaml", cls=A.AlignConfig)
    sizes = dict(model_name=tiny_model, run_dir=str(run_dir), overwrite=True, steps=3, dataset_prompts=4,
                 prompts_per_step=3, group_size=4, pairs_per_step=6, eval_size=4, eval_every=2, save_every=0,
                 save_final_model=False, progress=False, tensorboard=False, num_threads=1, max_new_tokens=4)
    sizes.update(changes)
    return C.apply_overrides(base, **sizes)


# ----------------------------------------------------------------------------- configs
def test_every_field_has_a_docstring():
    docs = C.field_docs(A.AlignConfig)
    assert [f.name for f in dataclasses.fields(A.AlignConfig) if not docs.get(f.name)] == []
    assert "label_smoothing" in C.config_help(A.AlignConfig)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_cite_a_paper(path):
    cfg = C.load_config(path, cls=A.AlignConfig)
    assert cfg.algo == path.stem
    head = path.read_text()[:700]
    assert head.startswith("# ") and "Paper" in head


def test_every_method_has_a_config():
    assert sorted(p.stem for p in CONFIGS) == sorted(A.ALIGN_ALGOS)
    cfgs = {p.stem: C.load_config(p, cls=A.AlignConfig) for p in CONFIGS}
    assert cfgs["cdpo"].label_smoothing > 0 and cfgs["dpo"].label_smoothing == 0
    assert (cfgs["rft"].loss, cfgs["rft"].sampling) == ("sft", "online")
    assert (cfgs["online_dpo"].loss, cfgs["online_dpo"].sampling) == ("dpo", "online")
    assert cfgs["simpo"].average and cfgs["orpo"].average and not cfgs["dpo"].average


def test_unknown_key_and_wrong_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("label_smothing: 0.1\n")
    with pytest.raises(C.ConfigError, match="'label_smothing'.*did you mean 'label_smoothing'"):
        C.load_config(f, cls=A.AlignConfig)
    with pytest.raises(C.ConfigError, match="'beta' expects float"):
        C.config_from_dict({"beta": "big"}, cls=A.AlignConfig)
    # a TrainConfig-only key is unknown here
    with pytest.raises(C.ConfigError, match="unknown config key 'clip_eps_low'"):
        C.config_from_dict({"clip_eps_low": 0.2}, cls=A.AlignConfig)


@pytest.mark.parametrize("changes, pattern", [
    ({"loss": "dpoo"}, "did you mean 'dpo'"),
    ({"sampling": "async"}, "sampling"),
    ({"beta": 0.0}, "beta must be a positive"),
    ({"tau": -1.0}, "tau must be a positive"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"label_smoothing": 0.1, "loss": "ipo"}, "loss='dpo' only"),
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"max_pairs_per_prompt": 0}, "max_pairs_per_prompt"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"lr": -1e-3}, "lr must be"),
    ({"adam_betas": [0.9]}, "adam_betas"),
    ({"loss": "kto", "dataset_prompts": 1}, "dataset_prompts >= 2"),
])
def test_bad_values_fail_before_any_model_loads(monkeypatch, changes, pattern):
    import rlbook_code.models as M

    monkeypatch.setattr(M, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(C.ConfigError, match=pattern):
        C.config_from_dict(changes, cls=A.AlignConfig)


def test_cli_help_and_config_errors(capsys):
    with pytest.raises(SystemExit):
        A.main(["--help"])
    assert "kto_w_desirable" in capsys.readouterr().out
    assert A.main(["--set", "bta=0.1"]) == 2
    assert "did you mean 'beta'" in capsys.readouterr().err
    assert A.main(["--config", "no/such.yaml"]) == 2


# ----------------------------------------------------------------------------- data
def test_select_pairs_matches_brute_force():
    scores = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0.5, 1, 0, 0], dtype=torch.float32)
    G = 4
    pairs, groups = A.select_pairs(scores, G, None, torch.Generator().manual_seed(0))
    want = [(i, j) for g in range(4) for i, j in itertools.product(range(g * G, g * G + G), repeat=2)
            if scores[i] > scores[j]]
    assert sorted(map(tuple, pairs.tolist())) == sorted(want) and groups == 2
    capped, _ = A.select_pairs(scores, G, 3, torch.Generator().manual_seed(0))
    assert len(capped) == 3 + 3  # group 0 has 4 pairs -> 3; group 3 has 5 -> 3
    assert set(map(tuple, capped.tolist())) <= set(want)
    assert all(scores[c] > scores[r] for c, r in capped.tolist())
    assert torch.equal(capped, A.select_pairs(scores, G, 3, torch.Generator().manual_seed(0))[0])  # seeded
    empty, g0 = A.select_pairs(torch.zeros(8), 4, None, torch.Generator())
    assert empty.shape == (0, 2) and g0 == 0


def test_mismatched_batch_pairs_each_group_with_the_next_prompt(tiny_model, tmp_path, fake_reward):
    cfg = small(tiny_model, tmp_path / "run", config="kto")
    state = A.build_state(cfg, tmp_path / "run")
    d = state.data
    N, G = len(d.batch), cfg.group_size
    assert d.units.shape == (N, 1) and d.kl_batch is not None and d.kl_ref_logp.shape == (N,)
    for i in range(N):
        assert d.kl_batch.prompts[i] == d.batch.prompts[(i + G) % N] != d.batch.prompts[i]
        assert torch.equal(d.kl_batch.completion_ids[i], d.batch.completion_ids[i])
    assert d.kl_batch.group_size == G
    # the reference log-probs of the mismatched rows are those of a plain, unshared pass
    single = A._rows(d.kl_batch, list(range(N)), 1)
    single = dataclasses.replace(single, group_size=1)
    with torch.no_grad():
        direct = A.sequence_logp(cfg, state.policy, single)
    assert torch.allclose(direct, d.kl_ref_logp, atol=1e-5)


def test_pair_batches_share_the_prompt_without_changing_log_probs(tiny_model, tmp_path, fake_reward):
    cfg = small(tiny_model, tmp_path / "run", dataset_prompts=6)
    state = A.build_state(cfg, tmp_path / "run")
    d = state.data
    assert d.num_units > 0
    rows = d.units.reshape(-1).tolist()
    shared = A._rows(d.batch, rows, 2)
    plain = dataclasses.replace(d.batch.select(rows), group_size=1)
    with torch.no_grad():
        a, b = A.sequence_logp(cfg, state.policy, shared), A.sequence_logp(cfg, state.policy, plain)
    assert shared.group_size == 2 and torch.allclose(a, b, atol=1e-5)
    # and the stored reference log-probs are the policy's before training
    assert torch.allclose(d.ref_logp[torch.tensor(rows)], b, atol=1e-5)


def test_reference_logprobs_are_computed_once_per_offline_dataset(tiny_model, tmp_path, fake_reward, monkeypatch):
    calls = []
    real = A._sequence_logp_nograd

    def counting(cfg, model, batch, *a, **k):
        calls.append(len(batch))
        return real(cfg, model, batch, *a, **k)

    monkeypatch.setattr(A, "_sequence_logp_nograd", counting)
    cfg = small(tiny_model, tmp_path / "run", steps=6, pairs_per_step=8, eval_every=0)
    A.train(cfg)
    recs = checkpoint.read_metrics(tmp_path / "run")
    assert recs[-1]["epoch"] > 1.5  # several passes over the dataset ...
    assert calls == [cfg.dataset_prompts * cfg.group_size]  # ... and one reference pass


def test_first_dpo_step_is_at_the_reference(tiny_model, tmp_path, fake_reward):
    for config in ("dpo", "online_dpo", "ipo", "kto"):
        cfg = small(tiny_model, tmp_path / config, config=config, steps=1)
        A.train(cfg)
        r = checkpoint.read_metrics(tmp_path / config)[1]
        assert abs(r["logratio/chosen"]) < 1e-5 and abs(r["logratio/rejected"]) < 1e-5, (config, r)
        if config in ("dpo", "online_dpo"):
            assert r["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
        if config == "ipo":
            assert r["loss"] == pytest.approx((1 / (2 * cfg.tau)) ** 2, rel=1e-6)
        if config == "kto":
            assert r["kto/kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("config", ["dpo", "orpo", "kto", "rft"])
def test_gradient_accumulation_equals_one_big_batch(tiny_model, tmp_path, fake_reward, config):
    cfg = small(tiny_model, tmp_path / "run", config=config, dataset_prompts=6, prompts_per_step=6)
    state = A.build_state(cfg, tmp_path / "run")
    if state.data is None:  # online: one batch of the current policy
        items = state.task.sample(cfg.prompts_per_step)
        batch, scores = A.sample_completions(cfg, state.policy, state.tokenizer, state.task, items, 0)
        data = A.make_data(cfg, batch, scores, state.ref, 0)
    else:
        data = state.data
    units = data.units[: min(6, data.num_units)]
    assert len(units) >= 2
    kl = torch.tensor(0.01) if config == "kto" else None
    with torch.no_grad():  # move away from the reference so the log-ratios are not all 0
        for p in state.policy.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=None))
    params = [p for p in state.policy.parameters() if p.requires_grad]

    def grads(parts):
        state.policy.zero_grad(set_to_none=True)
        for part in parts:
            loss, _ = A.units_loss(state, data, part, kl)
            (loss * len(part) / len(units)).backward()
        return [p.grad.clone() for p in params]

    g_all = grads([units])
    g_acc = grads([units[:1], units[1:3], units[3:]])
    for a, b in zip(g_all, g_acc):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_units_loss_is_the_package_loss(tiny_model, tmp_path, fake_reward):
    cfg = small(tiny_model, tmp_path / "run", dataset_prompts=6, beta=0.3)
    state = A.build_state(cfg, tmp_path / "run")
    d = state.data
    with torch.no_grad():
        for p in state.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        loss, m = A.units_loss(state, d, d.units, None)
        plain = dataclasses.replace(d.batch, group_size=1)
        logp = A.sequence_logp(cfg, state.policy, plain)
    c, r = d.units[:, 0], d.units[:, 1]
    want = preference.dpo_loss(logp[c], logp[r], d.ref_logp[c], d.ref_logp[r], beta=0.3)
    assert float(loss) == pytest.approx(float(want.loss), abs=1e-5)
    assert m["reward/accuracy"] == pytest.approx(float(want.accuracy))


# ----------------------------------------------------------------------------- runs
def _comparable(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


@pytest.mark.parametrize("config", ["dpo", "online_dpo", "kto"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_model, tmp_path, fake_reward, config):
    full = small(tiny_model, tmp_path / "full", config=config, steps=4, save_every=1)
    A.train(full)
    part = C.apply_overrides(full, run_dir=str(tmp_path / "part"), stop_after=2)
    A.train(part)
    assert [r["step"] for r in checkpoint.read_metrics(tmp_path / "part")] == [0, 1, 2]
    A.train(C.apply_overrides(part, stop_after=None), resume=tmp_path / "part")
    a, b = checkpoint.read_metrics(tmp_path / "full"), checkpoint.read_metrics(tmp_path / "part")
    assert _comparable(a) == _comparable(b)
    wa = torch.load(tmp_path / "full" / "checkpoint" / "state.pt", weights_only=False)
    wb = torch.load(tmp_path / "part" / "checkpoint" / "state.pt", weights_only=False)
    for k in wa["policy"]:
        assert torch.equal(wa["policy"][k], wb["policy"][k]), k
    for r in a:
        assert all(math.isfinite(v) for v in r.values()), r
    assert "eval/greedy_accuracy" in a[0] and "eval/sampled_accuracy" in a[-1]
    assert "loss" in a[1] and "reward/margin" in a[1] and "grad_norm" in a[1]


def test_cli_runs_resumes_and_refuses_an_existing_folder(tiny_model, tmp_path, fake_reward, capsys):
    run = tmp_path / "cli"
    args = ["--config", str(ROOT / "configs" / "align" / "rft.yaml"), "--set", f"model_name={tiny_model}",
            "--set", f"run_dir={run}", "--set", "steps=1", "--set", "prompts_per_step=2", "--set", "group_size=4",
            "--set", "eval_size=4", "--set", "max_new_tokens=4", "--set", "progress=false",
            "--set", "tensorboard=false", "--set", "num_threads=1"]
    assert A.main(args) == 0
    assert (run / "final" / "config.json").exists()
    assert A.main(args) == 2  # the folder exists
    assert "--resume" in capsys.readouterr().err
    assert A.main(["--resume", str(run), "--set", "steps=2"]) == 0
    assert [r["step"] for r in checkpoint.read_metrics(run)] == [0, 1, 2]


def test_sweep_runs_the_align_module():
    job = sweep.Job(name="dpo-seed0", config="configs/align/dpo.yaml", sets={"seed": 0}, module="rlbook_code.align")
    cmd = sweep.command(job, "out")
    assert cmd[1:4] == ["-m", "rlbook_code.align", "--config"]
    assert sweep.command(sweep.Job(name="g", config="configs/grpo.yaml"), "out")[2] == "rlbook_code.train"
