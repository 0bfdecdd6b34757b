"""The trainer's OT divergence (``divergence: ot``; rlbook_code/ot_regularizer.py, chapter 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlbook_code import config as C
from rlbook_code import ot, rollout
from rlbook_code import train as T

torch.set_num_threads(2)


def small(tiny_model: str, run_dir, **changes) -> C.TrainConfig:
    base = C.load_config(Path(__file__).resolve().parents[1] / "configs" / "grpo.yaml")
    kw = dict(model_name=tiny_model, steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6,
              eval_size=4, eval_every=0, eval_sampled=False, eval_batch_size=4, save_every=0,
              progress=False, tensorboard=False, save_final_model=False, run_dir=str(run_dir),
              num_threads=1, divergence="ot", beta=0.1)
    kw.update(changes)
    return C.apply_overrides(base, **kw)


@pytest.mark.parametrize("changes, pattern", [
    ({"divergence": "wasserstein"}, "divergence='wasserstein' is not one of"),
    ({"divergence": "ot", "beta": 0.0}, "needs beta > 0"),
    ({"divergence": "ot", "beta": 0.1, "kl_in": "reward"}, "kl_in must be 'loss'"),
    ({"ot_eps": 0.0}, "ot_eps must be a positive"),
    ({"ot_eps": -1.0}, "ot_eps must be a positive"),
    ({"ot_window": -1}, "ot_window must be"),
    ({"ot_cost": "euclidean"}, "did you mean 'sqeuclidean'"),
])
def test_bad_ot_values_fail_before_any_model_loads(monkeypatch, changes, pattern):
    from rlbook_code import models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_policy", boom)
    with pytest.raises(C.ConfigError, match=pattern):
        T.train(C.config_from_dict(changes))


def test_penalty_pieces(tiny_model, tmp_path):
    """The output head on the returned hidden states gives the scored log-probs; the reference
    completion is the reference's greedy completion; the penalty equals embedding_ot."""
    from rlbook_code.ot_regularizer import OT_MAX_ITERS, OT_TOL, ot_penalty, reference_completions

    cfg = small(tiny_model, tmp_path / "run", temperature=0.7)
    state = T.build_state(cfg, tmp_path / "run")
    batch, _, _, _ = T.collect_rollouts(state, step=1)
    out = rollout.completion_logprobs(state.policy, batch, temperature=0.7, with_hidden=True, share_prompt=True)
    logits = state.policy.get_output_embeddings()(out.hidden)
    logp = torch.log_softmax(logits / 0.7, -1).gather(-1, batch.completion_ids[..., None])[..., 0]
    mask = batch.completion_mask
    assert torch.allclose(logp[mask], out.logprobs[mask], atol=1e-5)

    ids, ref_mask = reference_completions(state, batch.prompts)
    greedy = rollout.generate(state.ref, state.tokenizer, batch.prompts[::4], group_size=1,
                              max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    for k in range(len(batch)):
        want = greedy.completion_ids[k // 4][greedy.completion_mask[k // 4]]
        assert torch.equal(ids[k][ref_mask[k]], want)
    assert len(state.ot_refs) == 2  # one entry per prompt, reused across the group

    penalty, sampled = ot_penalty(state, batch, out.hidden)
    E = state.ref.get_input_embeddings().weight.detach()
    soft = ot.expected_embeddings(logits, E, 0.7)
    want = ot.embedding_ot(soft, E[ids], mask, ref_mask, eps=cfg.ot_eps, window=cfg.ot_window, cost=cfg.ot_cost,
                            tol=OT_TOL, max_iters=OT_MAX_ITERS)
    assert torch.allclose(penalty, want, atol=1e-6)
    assert sampled.shape == (len(batch),) and torch.isfinite(sampled).all()
    (grad,) = torch.autograd.grad(penalty.sum(), out.hidden)
    assert grad.abs().sum() > 0


def test_ot_run_logs_and_moves_the_policy_differently_from_kl(tiny_model, tmp_path):
    def run(name, **changes):
        cfg = small(tiny_model, tmp_path / name, **changes)
        state = T.build_state(cfg, tmp_path / name)
        rec = T.train_step(state, 1)
        return rec, [p.detach().clone() for p in state.policy.parameters()]

    rec_ot, p_ot = run("ot", ot_window=1)
    rec_kl, p_kl = run("kl", divergence="kl")
    for key in ("ot_penalty", "ot_sampled", "kl_ref", "loss"):
        assert key in rec_ot and torch.isfinite(torch.tensor(rec_ot[key]))
    assert "ot_penalty" not in rec_kl
    assert rec_ot["ot_penalty"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(p_ot, p_kl))
