"""Tests of the trainer (rlbook_code/train.py, config.py, checkpoint.py): configs, the loss pieces, gradient accumulation,
checkpoint/resume determinism, the NaN guard, DAPO's pieces, plotting.

A tiny random Qwen3 (hidden 32, 2 layers) with the shipped character tokenizer stands in for
the shipped model so the file runs in well under a minute on 2 CPU cores. Rewards come from a
deterministic fake verifier (length parity of the completion) because a random model never
answers correctly, and an all-zero reward gives no gradient to compare.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from rlbook_code import checkpoint
from rlbook_code import config as C
from rlbook_code import train as T

torch.set_num_threads(2)

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
TIMING = set(T.TIMING_KEYS)


@pytest.fixture
def fake_reward(monkeypatch):
    """Reward 1 when the completion's character codes sum to an odd number: deterministic, and
    it varies within groups."""
    from rlbook_code.rewards import TaskMixture

    def score(self, completions, items, mode="exact", format_weight=0.0):
        return [float(sum(map(ord, c)) % 2) for c in completions]

    monkeypatch.setattr(TaskMixture, "score", score)


def small(tiny_model: str, run_dir, config: str = "grpo", **changes) -> C.TrainConfig:
    base = C.load_config(Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml")
    kw = dict(model_name=tiny_model, steps=3, prompts_per_step=2, group_size=4, max_new_tokens=6,
              eval_size=4, eval_every=2, eval_sampled=False, eval_batch_size=4, save_every=0,
              progress=False, tensorboard=False, save_final_model=False, run_dir=str(run_dir),
              num_threads=1)  # a hidden-32 model gains nothing from a 2nd thread; under load it loses
    kw.update(changes)
    return C.apply_overrides(base, **kw)


# ----------------------------------------------------------------------------- configs
def test_every_field_has_a_docstring():
    docs = C.field_docs()
    missing = [f.name for f in dataclasses.fields(C.TrainConfig) if not docs.get(f.name)]
    assert missing == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_cite_a_paper(path):
    cfg = C.load_config(path)
    assert cfg.algo == path.stem
    head = path.read_text().split("\n", 1)[0]
    assert head.startswith("# ")
    assert "Paper" in path.read_text()[:600]


def test_all_algorithms_have_a_config():
    assert sorted(p.stem for p in CONFIGS) == sorted(C.ALGORITHMS)


def test_unknown_key_names_the_nearest_spelling(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("group_sise: 8\n")
    with pytest.raises(C.ConfigError, match="'group_sise'.*did you mean 'group_size'"):
        C.load_config(f)
    with pytest.raises(C.ConfigError, match="did you mean 'lr'"):
        C.config_from_dict({"learning_rate": 1e-3})
    with pytest.raises(C.ConfigError, match="did you mean 'beta'"):
        C.load_config(f.with_name("ok.yaml") if f.with_name("ok.yaml").write_text("{}") else f, ["kl_coef=0.1"])


@pytest.mark.parametrize("changes, pattern", [
    ({"lr": "fast"}, "expects float"),
    ({"group_size": 1}, "group_size >= 2"),
    ({"num_minibatches": 3}, "must divide"),
    ({"micro_batch_size": 5}, "must divide"),
    ({"aggregation": "token_mean"}, "did you mean 'token-mean'"),
    ({"loss": "ppo", "clip_eps_low": None}, "only meaningful for loss='cispo'"),
    ({"overlong_buffer": 100}, "overlong_buffer"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"dual_clip": 0.5}, "dual_clip"),
])
def test_bad_values_fail_before_any_model_loads(monkeypatch, changes, pattern):
    from rlbook_code import models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_policy", boom)
    with pytest.raises(C.ConfigError, match=pattern):
        T.train(C.config_from_dict(changes))


def test_overrides_parse_as_yaml():
    cfg = C.config_from_dict(C.parse_overrides(["lr=1e-3", "beta=0", "task=null", "adam_betas=[0.9, 0.95]"]))
    assert (cfg.lr, cfg.beta, cfg.task, cfg.adam_betas) == (1e-3, 0.0, None, [0.9, 0.95])
    assert isinstance(cfg.beta, float)
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_overrides(["lr"])


def test_cli_help_and_config_errors(capsys):
    with pytest.raises(SystemExit) as e:
        T.main(["--help"])
    assert e.value.code == 0
    assert "group_size" in capsys.readouterr().out
    assert T.main(["--config", str(CONFIGS[0]), "--set", "grop_size=4"]) == 2
    assert "did you mean 'group_size'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pieces
def test_overlong_penalty_matches_dapo_formula():
    L, cache = 16, 4
    lengths = torch.arange(0, 17)
    got = T.overlong_penalty(lengths, L, cache)
    want = [0.0 if n <= L - cache else ((L - cache) - n) / cache for n in range(17)]
    assert torch.allclose(got, torch.tensor(want))


def test_advantages_dispatch_to_the_package():
    from rlbook_code import advantages as A

    cfg = C.config_from_dict({"group_size": 4, "prompts_per_step": 2})
    scores = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0])
    mask = torch.ones(8, 3, dtype=torch.bool)
    adv, ret, r = T.compute_advantages(cfg, scores, mask, None, None)
    assert torch.equal(adv, A.group_advantages(scores, 4, scale="group")) and ret is None
    cfg2 = C.apply_overrides(cfg, advantage="rloo")
    assert torch.equal(T.compute_advantages(cfg2, scores, mask, None, None)[0], A.rloo_advantages(scores, 4))
    # KL in the reward: the sequence reward loses beta * sum_t kl_t
    cfg3 = C.apply_overrides(cfg, beta=0.5, kl_in="reward")
    kl = torch.full((8, 3), 0.1)
    _, _, r3 = T.compute_advantages(cfg3, scores, mask, kl, None)
    assert torch.allclose(r3, scores - 0.5 * 0.3)
    # GAE: outcome reward on the last response token
    cfg4 = C.apply_overrides(cfg, advantage="gae", gamma=1.0, lam=1.0)
    mask4 = torch.tensor([[True, True, False]] * 8)
    adv4, ret4, _ = T.compute_advantages(cfg4, scores, mask4, None, torch.zeros(8, 3))
    assert torch.allclose(ret4[:, 0], scores) and torch.allclose(ret4[:, 1], scores)
    assert torch.all(ret4[:, 2] == 0)


def _state_and_batch(tiny_model, tmp_path, fake, **changes):
    from rlbook_code import rollout

    cfg = small(tiny_model, tmp_path / "run", **changes)
    state = T.build_state(cfg, tmp_path / "run")
    batch, items, scores, _ = T.collect_rollouts(state, step=1)
    return cfg, state, batch, scores


@pytest.mark.parametrize("config, aggregation", [
    ("grpo", "token-mean"), ("grpo", "seq-mean-token-mean"), ("drgrpo", "seq-mean-token-sum-norm"),
    ("ppo", "token-mean"),
])
def test_gradient_accumulation_equals_one_big_batch(tiny_model, tmp_path, fake_reward, config, aggregation):
    cfg, state, batch, scores = _state_and_batch(tiny_model, tmp_path, True, config=config,
                                                 aggregation=aggregation, prompts_per_step=2, group_size=4,
                                                 beta=0.1 if config == "grpo" else 0.0,
                                                 kl_in="loss", num_epochs=2)  # 2: keeps the old pass
    sc = T.score_rollouts(state, batch)
    # perturb the policy so that ratios differ from 1 and clipping is active somewhere
    with torch.no_grad():
        for p in state.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mask = batch.completion_mask
    n = mask.shape[0]
    g = torch.Generator().manual_seed(0)
    returns = None
    if cfg.advantage == "gae":  # per-token advantages and returns
        adv = torch.randn(mask.shape, generator=g) * mask
        returns = torch.randn(mask.shape, generator=g) * mask
    else:
        adv = torch.randn(n, generator=g)
    params = [p for g in state.optimizer.param_groups for p in g["params"]]

    def grads(micro: int) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        for start in range(0, n, micro):
            sub = torch.arange(start, min(start + micro, n))
            loss, _ = T.micro_batch_loss(
                state, batch.select(sub.tolist()), sc["old_logp"][sub], adv[sub],
                sc["ref_logp"][sub] if sc["ref_logp"] is not None else None,
                sc["values"][sub] if sc["values"] is not None else None,
                returns[sub] if returns is not None else None, float(mask.sum()), n)
            loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    # one pass (prompts shared); micro-batches of 3, 3, 2 rows (not whole groups: full passes);
    # micro-batches of one group each (shared)
    big, accumulated, per_group = grads(n), grads(3), grads(4)
    assert all(g.abs().sum() > 0 for g in big[:1]) and sum(float(g.abs().sum()) for g in big) > 0
    for a, b, c in zip(big, accumulated, per_group):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
        assert torch.allclose(a, c, atol=1e-6, rtol=1e-4)


def test_one_update_per_batch_skips_the_old_pass(tiny_model, tmp_path, fake_reward):
    """num_epochs = num_minibatches = 1: the old log-probs are the update pass's own, detached.
    Loss, gradients and metrics equal those computed with a separate no-grad old pass."""
    cfg, state, batch, scores = _state_and_batch(tiny_model, tmp_path, True, config="grpo")
    assert not T.needs_old_pass(cfg)
    assert T.score_rollouts(state, batch)["old_logp"] is None
    assert T.needs_old_pass(C.apply_overrides(cfg, num_epochs=2))
    assert T.needs_old_pass(C.apply_overrides(cfg, beta=0.04))
    assert T.needs_old_pass(C.load_config(Path(__file__).resolve().parents[1] / "configs" / "ppo.yaml"))
    forced = T.score_rollouts(dataclasses.replace(state, cfg=C.apply_overrides(cfg, num_epochs=2)), batch)
    mask = batch.completion_mask
    n = mask.shape[0]
    adv = torch.randn(n, generator=torch.Generator().manual_seed(0))
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    res = []
    for old in (None, forced["old_logp"]):
        for p in params:
            p.grad = None
        loss, m = T.micro_batch_loss(state, batch, old, adv, None, None, None, float(mask.sum()), n)
        loss.backward()
        res.append((float(loss.detach()), m, [p.grad.clone() for p in params]))
    (l0, m0, g0), (l1, m1, g1) = res
    assert math.isclose(l0, l1, rel_tol=1e-5, abs_tol=1e-7)
    assert m0["clip_frac_low"] == m0["clip_frac_high"] == 0.0 and m0["ratio_mean"] == 1.0
    from rlbook_code.logprobs import masked_mean
    assert math.isclose(m0["entropy"], float(masked_mean(forced["entropy"], mask)), rel_tol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- runs
def _comparable(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_model, tmp_path, fake_reward):
    full = small(tiny_model, tmp_path / "full", config="ppo", steps=3, save_every=1, beta=0.05, eval_every=2)
    T.train(full)
    part = C.apply_overrides(full, run_dir=str(tmp_path / "part"), stop_after=2)
    T.train(part)
    assert [r["step"] for r in checkpoint.read_metrics(tmp_path / "part")] == [0, 1, 2]
    resumed = C.apply_overrides(part, stop_after=None)
    T.train(resumed, resume=tmp_path / "part")
    a, b = checkpoint.read_metrics(tmp_path / "full"), checkpoint.read_metrics(tmp_path / "part")
    assert _comparable(a) == _comparable(b)
    wa = torch.load(tmp_path / "full" / "checkpoint" / "state.pt", weights_only=False)
    wb = torch.load(tmp_path / "part" / "checkpoint" / "state.pt", weights_only=False)
    for k in wa["policy"]:
        assert torch.equal(wa["policy"][k], wb["policy"][k]), k
    for k in wa["value_head"]:
        assert torch.equal(wa["value_head"][k], wb["value_head"][k]), k
    # every metric of every step is finite, and the documented metrics are there
    for r in a:
        assert all(math.isfinite(v) for v in r.values())
    keys = set(a[1])
    for k in ("reward_mean", "reward_std", "accuracy", "adv_mean", "adv_std", "kl_ref", "approx_kl_old",
              "clip_frac_low", "clip_frac_high", "ess", "entropy", "response_length", "zero_var_frac",
              "grad_norm", "lr", "rollout_s", "update_s", "tokens_per_s", "value_loss", "explained_var"):
        assert k in keys, k
    assert "eval/greedy_accuracy" in a[0] and "eval/greedy_accuracy" in a[2] and "eval/greedy_accuracy" in a[3]


def test_existing_run_folder_is_not_overwritten_by_accident(tiny_model, tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(small(tiny_model, d))


def test_non_finite_loss_stops_with_step_and_metric(tiny_model, tmp_path, fake_reward, monkeypatch):
    from rlbook_code import aggregation

    real = aggregation.aggregate
    monkeypatch.setattr(aggregation, "aggregate", lambda *a, **k: real(*a, **k) * float("nan"))
    cfg = small(tiny_model, tmp_path / "nan", steps=2, eval_every=0, eval_size=1)
    with pytest.raises(T.NonFiniteError, match=r"step 1: loss is nan"):
        T.train(cfg)
    assert (tmp_path / "nan" / "checkpoint" / "state.pt").exists()


def test_dynamic_sampling_keeps_only_groups_with_signal(tiny_model, tmp_path, monkeypatch):
    from rlbook_code.rewards import TaskMixture

    calls = {"n": 0}

    def score(self, completions, items, mode="exact", format_weight=0.0):
        # first group of each round: all equal; second group: varied
        calls["n"] += 1
        G = 4
        return [0.0] * G + [float(i % 2) for i in range(G)]

    monkeypatch.setattr(TaskMixture, "score", score)
    cfg = small(tiny_model, tmp_path / "dapo", config="dapo", prompts_per_step=2, group_size=4,
                max_sampling_rounds=3, overlong_buffer=2)
    state = T.build_state(cfg, tmp_path / "dapo")
    batch, items, scores, stats = T.collect_rollouts(state, step=1)
    assert calls["n"] == 2 and stats["kept_groups"] == 2 and stats["zero_var_frac"] == 0.5
    assert len(batch) == 8 and len(items) == 8
    assert torch.equal(scores, torch.tensor([0.0, 1, 0, 1, 0, 1, 0, 1]))
    assert batch.prompt_ids.shape[0] == batch.completion_ids.shape[0] == 8


# ----------------------------------------------------------------------------- plotting
def test_plot_runs_with_seed_bands(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from rlbook_code import plotting

    runs = []
    for seed in range(3):
        d = tmp_path / f"grpo-seed{seed}"
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, "eval/sampled_accuracy": 0.3}) + "\n")
            for s in range(1, 6):
                f.write(json.dumps({"step": s, "reward_mean": 0.1 * s + 0.01 * seed, "kl_ref": 0.0,
                                    "response_length": 5.0}) + "\n")
        runs.append(d)
    steps, mean, lo, hi = plotting.seed_band(runs, "reward_mean")
    assert steps.tolist() == [1, 2, 3, 4, 5]
    assert mean[0] == pytest.approx(0.11) and lo[0] == pytest.approx(0.1) and hi[0] == pytest.approx(0.12)
    fig = plotting.plot_runs({"GRPO": runs}, keys=("reward_mean", "eval/sampled_accuracy"))
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "step"


def test_cli_runs_and_resumes(tiny_model, tmp_path, fake_reward, capsys):
    run = tmp_path / "cli"
    common = ["--set", f"model_name={tiny_model}", "--set", "prompts_per_step=2", "--set", "group_size=4",
              "--set", "max_new_tokens=4", "--set", "eval_size=2", "--set", "eval_sampled=false",
              "--set", "progress=false", "--set", "tensorboard=false", "--set", "num_threads=1",
              "--set", f"run_dir={run}"]
    assert T.main(["--config", str(CONFIGS[0].with_name("grpo.yaml")), "--set", "steps=1", *common]) == 0
    assert "run folder" in capsys.readouterr().out
    assert (run / "final" / "config.json").exists()
    assert T.main(["--resume", str(run), "--set", "steps=2"]) == 0
    assert [r["step"] for r in checkpoint.read_metrics(run)] == [0, 1, 2]
