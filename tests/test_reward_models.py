"""Tests of rlbook_code.reward_models against closed forms, enumeration and finite differences."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from rlbook_code import reward_models as rm_mod
from rlbook_code.reward_models import (
    RewardModel, bon_kl, best_of_n, bradley_terry_coin, bradley_terry_loss, fit_gao, gao_bon, gao_rl,
    last_token_index, latent_pairs, letter_step_correct, orm_loss, pass_at_n, prm_labels, prm_loss,
    prm_solution_score, verifier_pairs)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _sigmoid64(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------
# Bradley–Terry
# ----------------------------------------------------------------------------------------
def test_bt_loss_closed_form_margin_and_centering():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    m = torch.rand(7, generator=g, dtype=torch.float64)
    for margin in (0.0, 0.5, m):
        for eta in (0.0, 0.01):
            mm = [float(margin)] * 7 if not isinstance(margin, torch.Tensor) else margin.tolist()
            ref = sum(-math.log(_sigmoid64(a - b - k)) for a, b, k in zip(rc.tolist(), rr.tolist(), mm)) / 7
            ref += eta * sum((a + b) ** 2 for a, b in zip(rc.tolist(), rr.tolist())) / 7
            got = bradley_terry_loss(rc, rr, margin=margin, center_coef=eta)
            assert abs(float(got) - ref) < 1e-12


def test_bt_loss_gradient_closed_form_and_finite_differences():
    rc = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.1, 0.4, -3.0], dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(rc, rr, margin=0.2).backward()
    d = (rc - rr - 0.2).detach()
    expected = -(1 - torch.sigmoid(d)) / 3  # d/dr+ of -log sigma(d), mean over 3
    assert torch.allclose(rc.grad, expected, atol=1e-12)
    assert torch.allclose(rr.grad, -expected, atol=1e-12)
    f = lambda a, b: float(bradley_terry_loss(a, b, center_coef=0.1))  # noqa: E731
    a0, b0 = rc.detach().clone(), rr.detach().clone()
    a = a0.clone().requires_grad_(True)
    bradley_terry_loss(a, b0, center_coef=0.1).backward()
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = 1e-6
        fd = (f(a0 + e, b0) - f(a0 - e, b0)) / 2e-6
        assert abs(fd - float(a.grad[i])) < 1e-7


def test_bt_loss_shift_invariance_and_centering_breaks_it():
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(16, generator=g), torch.randn(16, generator=g)
    for c in (-5.0, 3.0, 100.0):
        assert torch.allclose(bradley_terry_loss(rc + c, rr + c), bradley_terry_loss(rc, rr), atol=1e-6)
    assert not torch.allclose(bradley_terry_loss(rc + 3, rr + 3, center_coef=0.1),
                              bradley_terry_loss(rc, rr, center_coef=0.1))


def test_bt_loss_stable_for_large_differences():
    rc = torch.tensor([200.0, -200.0, 0.0])
    rr = torch.tensor([-200.0, 200.0, 0.0])
    per = [float(bradley_terry_loss(rc[i:i + 1], rr[i:i + 1])) for i in range(3)]
    assert per[0] == 0.0 and abs(per[1] - 400.0) < 1e-3 and abs(per[2] - math.log(2)) < 1e-6
    x = rc.clone().requires_grad_(True)
    bradley_terry_loss(x, rr).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad", [
    lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(4)),
    lambda: bradley_terry_loss(torch.tensor([float("nan")]), torch.zeros(1)),
    lambda: bradley_terry_loss(torch.zeros(0), torch.zeros(0)),
    lambda: bradley_terry_loss(torch.zeros(2, 2), torch.zeros(2, 2)),
    lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin=-1.0),
    lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), center_coef=-0.1),
    lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2)),
    lambda: orm_loss(torch.zeros(3), torch.tensor([0.0, 1.0, 2.0])),
    lambda: orm_loss(torch.zeros(0), torch.zeros(0)),
    lambda: bradley_terry_coin(torch.zeros(3), torch.zeros(3), temperature=0.0),
])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError):
        bad()


def test_bt_coin_frequencies_and_bayes_rate():
    n = 200_000
    za, zb = torch.full((n,), 0.3), torch.zeros(n)
    wins, p = bradley_terry_coin(za, zb, temperature=0.5, generator=torch.Generator().manual_seed(0))
    expected = _sigmoid64(0.6)
    assert abs(float(p[0]) - expected) < 1e-7  # z in float32
    assert abs(float(wins.double().mean()) - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


# ----------------------------------------------------------------------------------------
# ORM and PRM
# ----------------------------------------------------------------------------------------
def test_orm_loss_closed_form():
    logits = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    ref = -(math.log(_sigmoid64(2.0)) + math.log(1 - _sigmoid64(-1.0)) + math.log(0.5)) / 3
    assert abs(float(orm_loss(logits, y)) - ref) < 1e-6


def test_prm_labels_up_to_first_wrong_step():
    correct = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    labels, sup = prm_labels(correct, mask)
    # float loop reference: supervise until (and including) the first wrong real step
    for i in range(4):
        seen_wrong = False
        for s in range(5):
            exp_sup = bool(mask[i, s]) and not seen_wrong
            assert bool(sup[i, s]) == exp_sup, (i, s)
            if exp_sup:
                assert float(labels[i, s]) == float(correct[i, s])
            if mask[i, s] and not correct[i, s]:
                seen_wrong = True
    assert sup.tolist()[0] == [True, True, True, False, False]
    assert sup.tolist()[1] == [True, True, True, True, False]  # all correct: every real step
    assert sup.tolist()[2] == [True, False, False, False, False]  # wrong at once: one label, 0


def test_orm_prm_on_all_correct_and_all_wrong_batches():
    mask = torch.ones(3, 4, dtype=torch.bool)
    lab_c, sup_c = prm_labels(torch.ones(3, 4, dtype=torch.bool), mask)
    lab_w, sup_w = prm_labels(torch.zeros(3, 4, dtype=torch.bool), mask)
    assert bool(sup_c.all()) and bool((lab_c == 1).all())
    assert sup_w[:, 0].all() and not sup_w[:, 1:].any() and bool((lab_w == 0).all())
    big = torch.full((3, 4), 30.0)
    assert float(prm_loss(big, lab_c, sup_c)) < 1e-10 and float(prm_loss(-big, lab_w, sup_w)) < 1e-10
    assert abs(float(prm_loss(big, lab_w, sup_w)) - 30.0) < 1e-5
    assert float(orm_loss(torch.full((3,), 30.0), torch.ones(3))) < 1e-10
    assert float(orm_loss(torch.full((3,), -30.0), torch.zeros(3))) < 1e-10
    assert abs(float(orm_loss(torch.zeros(3), torch.ones(3))) - math.log(2)) < 1e-6
    with pytest.raises(ValueError):
        prm_loss(big, lab_c, torch.zeros(3, 4, dtype=torch.bool))


def test_prm_solution_score_product_and_min():
    logits = torch.tensor([[2.0, 0.0, -1.0], [1.0, 3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    p = torch.sigmoid(logits)
    prod = prm_solution_score(logits, mask, "product")
    mn = prm_solution_score(logits, mask, "min")
    assert torch.allclose(prod, torch.stack([p[0].prod(), p[1, :2].prod()]).float(), atol=1e-6)
    assert torch.allclose(mn, torch.stack([p[0].min(), p[1, :2].min()]).float(), atol=1e-6)
    with pytest.raises(ValueError):
        prm_solution_score(logits, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        prm_solution_score(logits, mask, "mean")


def test_letter_step_correct():
    eos = 9
    ids = torch.tensor([[1, 2, 3, eos, 0], [1, 5, 3, eos, 0], [1, 2, eos, 0, 0], [1, 2, 3, 4, eos]])
    mask = ids != 0
    mask[:, 0] = True
    targets = [[1, 2, 3, eos]] * 4
    c = letter_step_correct(ids, mask, targets)
    assert c.tolist()[0] == [True, True, True, True, False]
    assert c.tolist()[1] == [True, False, True, True, False]
    assert c.tolist()[2] == [True, True, False, False, False]  # stopped early: EOS where a letter was due
    assert c.tolist()[3] == [True, True, True, False, False]  # ran on: a letter where EOS was due


# ----------------------------------------------------------------------------------------
# Last token and padding
# ----------------------------------------------------------------------------------------
def test_last_token_index_left_right_and_mixed_padding():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(m).tolist() == [4, 2, 2, 4]
    assert (m.sum(1) - 1).tolist() != [4, 2, 2, 4]  # the right-padding shortcut is wrong here
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[False, False]]))
    with pytest.raises(ValueError):
        last_token_index(torch.ones(2, 3))


def _rm(tiny_model):
    from rlbook_code.models import load_policy

    lm, tok = load_policy(tiny_model, device="cpu", dtype=torch.float32)
    rm = RewardModel(lm)
    with torch.no_grad():
        torch.manual_seed(0)
        rm.head.weight.normal_()  # a non-trivial head (a fresh one scores 0 everywhere)
        rm.head.bias.fill_(0.1)
    return rm.eval(), tok


def test_reward_model_same_text_any_padding(tiny_model):
    rm, tok = _rm(tiny_model)
    ids = torch.tensor(tok("hello world", add_special_tokens=False)["input_ids"])
    pad = tok.pad_token_id
    L = len(ids)
    rows, masks = [], []
    for left, right in ((0, 0), (3, 0), (0, 4), (2, 5)):
        rows.append(torch.cat([torch.full((left,), pad), ids, torch.full((right,), pad)]))
        masks.append(torch.cat([torch.zeros(left), torch.ones(L), torch.zeros(right)]).bool())
    width = max(len(r) for r in rows)
    ids_b = torch.stack([torch.cat([r, torch.full((width - len(r),), pad)]) for r in rows])
    mask_b = torch.stack([torch.cat([m, torch.zeros(width - len(m), dtype=torch.bool)]) for m in masks])
    with torch.no_grad():
        s = rm(ids_b, mask_b)
    assert torch.allclose(s, s[:1].expand_as(s), atol=1e-5), s
    with torch.no_grad():  # what an index of the *last column* would read instead: padding, scored 0
        assert float(rm.token_scores(ids_b, mask_b)[1, -1]) == 0.0


def _batch(tok, tiny_model, G=4, n=3, seed=0):
    from rlbook_code import rewards, rollout
    from rlbook_code.models import load_policy

    policy, _ = load_policy(tiny_model, device="cpu", dtype=torch.float32)
    task = rewards.TaskMixture(rewards.DEFAULT_TASK, seed=seed)
    items = task.sample(n)
    b = rollout.generate(policy, tok, [task.prompt(it) for it in items], group_size=G, max_new_tokens=6, seed=seed)
    return b, items


def test_rollout_scores_shared_prompt_equals_full_pass_and_forward(tiny_model):
    rm, tok = _rm(tiny_model)
    b, _ = _batch(tok, tiny_model)
    with torch.no_grad():
        shared = rm.score_batch(b, share_prompt=True)
        full = rm.score_batch(b, share_prompt=False)
        direct = rm(b.input_ids, b.attention_mask)  # generic path: last real token of the whole row
    assert torch.allclose(shared, full, atol=1e-5) and torch.allclose(full, direct, atol=1e-5)
    # gradients agree too
    grads = []
    for share in (True, False):
        rm.zero_grad()
        rm.score_batch(b, share_prompt=share).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in rm.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_save_and_load_roundtrip(tiny_model, tmp_path):
    rm, tok = _rm(tiny_model)
    rm.kind = "orm"
    b, _ = _batch(tok, tiny_model)
    rm.save_pretrained(tmp_path / "rm", tok)
    back = RewardModel.from_pretrained(tmp_path / "rm")
    assert back.kind == "orm"
    assert torch.allclose(rm.reward(b), back.reward(b), atol=1e-6)
    assert bool(((back.reward(b) > 0) & (back.reward(b) < 1)).all())  # orm: a probability
    with pytest.raises(ValueError, match="reward_model.json"):
        RewardModel.from_pretrained(tiny_model)


# ----------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------
def test_verifier_pairs_and_identical_texts_dropped(tiny_model):
    import dataclasses

    rm, tok = _rm(tiny_model)
    b, _ = _batch(tok, tiny_model, G=4, n=2)
    ids = b.completion_ids.clone()
    mask = b.completion_mask.clone()
    ids[1], mask[1] = ids[0], mask[0]  # rows 0 and 1 identical
    ids[2, :2], mask[2] = ids[0, :2], mask[0] | True  # row 2 differs from 0 only after 2 tokens
    b = dataclasses.replace(b, completion_ids=ids, completion_mask=mask)
    scores = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 1.0, 0.0])  # a labeller that disagrees with itself
    pairs = verifier_pairs(b, scores)
    assert pairs.num_identical == 1
    for c, r in zip(pairs.chosen.tolist(), pairs.rejected.tolist()):
        assert scores[c] > scores[r] and c // 4 == r // 4
    # group 0: (0,2) (0,3) (1,2) (2,3) and (0,1) dropped; group 1: 2 x 2 = 4
    assert len(pairs) == 4 + 4 and pairs.num_candidates == 9
    trunc = verifier_pairs(b, scores, max_length=2)  # after truncation rows 0, 1 and 2 are one text
    ref = sum(1 for g in range(2) for i in range(4) for j in range(i + 1, 4)
              if scores[g * 4 + i] != scores[g * 4 + j]
              and torch.equal(trunc.batch.completion_ids[g * 4 + i][trunc.batch.completion_mask[g * 4 + i]],
                              trunc.batch.completion_ids[g * 4 + j][trunc.batch.completion_mask[g * 4 + j]]))
    assert trunc.num_identical == ref >= 3
    assert bool((pairs.p_chosen == 1).all())


def test_latent_pairs_follow_the_coin(tiny_model):
    _, tok = _rm(tiny_model)
    b, _ = _batch(tok, tiny_model, G=4, n=3)
    z = torch.linspace(0, 1, len(b))
    lp = latent_pairs(b, z, temperature=0.2, seed=0)
    assert len(lp) + lp.num_identical == lp.num_candidates == 3 * 6
    p_true = torch.sigmoid((z[lp.chosen] - z[lp.rejected]).double() / 0.2)
    assert torch.allclose(lp.p_chosen, p_true)
    again = latent_pairs(b, z, temperature=0.2, seed=0)
    assert torch.equal(lp.chosen, again.chosen)


# ----------------------------------------------------------------------------------------
# Best-of-n and Gao's forms
# ----------------------------------------------------------------------------------------
def test_best_of_n_equals_enumeration_of_subsets():
    g = torch.Generator().manual_seed(3)
    P, N = 3, 7
    scores = torch.randn(P, N, generator=g)
    correct = (torch.rand(P, N, generator=g) < 0.4).float()
    for n in range(1, N + 1):
        ref = 0.0
        for p in range(P):
            subs = list(itertools.combinations(range(N), n))
            ref += sum(float(correct[p, max(s, key=lambda k: float(scores[p, k]))]) for s in subs) / len(subs)
        ref /= P
        assert abs(float(best_of_n(scores, correct, [n])[0]) - ref) < 1e-12
        oracle = sum(any(correct[p, k] > 0 for k in s) for p in range(P)
                     for s in itertools.combinations(range(N), n)) / (P * math.comb(N, n))
        assert abs(float(pass_at_n(correct, [n])[0]) - oracle) < 1e-12
    assert abs(float(best_of_n(scores, correct, [1])[0]) - float(correct.double().mean())) < 1e-12  # n=1: random
    with pytest.raises(ValueError):
        best_of_n(scores, correct, [N + 1])


def test_bon_kl_and_gao_fits():
    assert float(bon_kl(1)) == 0.0
    assert abs(float(bon_kl(4)) - (math.log(4) - 0.75)) < 1e-12
    d = torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    a, b = fit_gao(d, gao_rl(d, 0.7, 0.3), "rl")
    assert abs(a - 0.7) < 1e-9 and abs(b - 0.3) < 1e-9
    a, b = fit_gao(torch.cat([torch.zeros(1, dtype=torch.float64), d]),
                   torch.cat([torch.zeros(1, dtype=torch.float64), gao_bon(d, 0.5, 0.2)]), "bon")
    assert abs(a - 0.5) < 1e-9 and abs(b - 0.2) < 1e-9
    with pytest.raises(ValueError):
        fit_gao(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]), "rl")


# ----------------------------------------------------------------------------------------
# Config, training loop, the trainer's hook
# ----------------------------------------------------------------------------------------
def test_rmconfig_loading_rejects_unknown_keys_and_bad_values(tmp_path):
    from rlbook_code.config import ConfigError, load_config

    cfg = load_config("configs/rm/rm.yaml", ["steps=3"], cls=rm_mod.RMConfig)
    assert cfg.steps == 3 and cfg.objective == "bt"
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config("configs/rm/rm.yaml", ["stepz=3"], cls=rm_mod.RMConfig)
    for bad in ("objective=dpo", "batch_size=0", "lr=-1", "latent_temperature=0", "group_size=1"):
        with pytest.raises(ConfigError):
            load_config("configs/rm/rm.yaml", [bad], cls=rm_mod.RMConfig)
    with pytest.raises(ConfigError, match="Bradley-Terry"):
        load_config("configs/rm/rm.yaml", ["objective=orm", "margin=0.5"], cls=rm_mod.RMConfig)


@pytest.mark.parametrize("objective", ["bt", "orm", "prm"])
def test_train_reward_model_runs_and_resumes(tiny_model, tmp_path, objective):
    from rlbook_code.checkpoint import read_metrics
    from rlbook_code.config import config_from_dict

    base = dict(model_name=tiny_model, objective=objective, num_prompts=6, group_size=4, eval_prompts=4,
                steps=4, batch_size=2, eval_every=2, save_every=2, max_new_tokens=6, num_threads=1)
    cfg = config_from_dict({**base, "run_dir": str(tmp_path / "a")}, cls=rm_mod.RMConfig)
    try:
        run = rm_mod.train_reward_model(cfg)
    except ValueError as e:  # a random tiny model may give no pair with different scores
        assert objective == "bt" and "no preference pair" in str(e)
        return
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert abs(recs[0]["eval/loss"] - math.log(2)) < 1e-6  # a zero head: every score is 0
    assert all(math.isfinite(v) for r in recs for v in r.values())
    back = RewardModel.from_pretrained(run / "final")
    assert back.kind == objective
    # stop after 2 steps, resume: the same final weights as the uninterrupted run
    cfg2 = config_from_dict({**base, "run_dir": str(tmp_path / "b"), "steps": 2}, cls=rm_mod.RMConfig)
    rm_mod.train_reward_model(cfg2)
    cfg3 = config_from_dict({**base, "run_dir": str(tmp_path / "b")}, cls=rm_mod.RMConfig)
    rm_mod.train_reward_model(cfg3, resume=tmp_path / "b")
    resumed = RewardModel.from_pretrained(tmp_path / "b" / "final")
    for p, q in zip(back.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [0, 1, 2, 3, 4]


def test_cli_bad_config_exits_2(capsys):
    assert rm_mod.main(["--config", "configs/rm/rm.yaml", "--set", "objective=nope"]) == 2
    assert "config error" in capsys.readouterr().err


def test_trainer_learned_reward_hook(tiny_model, tmp_path):
    from rlbook_code import train
    from rlbook_code.checkpoint import read_metrics
    from rlbook_code.config import ConfigError

    rm, tok = _rm(tiny_model)
    rm.save_pretrained(tmp_path / "rm", tok)
    common = dict(model_name=tiny_model, steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6,
                  eval_every=0, eval_size=4, save_every=0, save_final_model=False, progress=False,
                  tensorboard=False, num_threads=1)
    cfg = train.config_from_dict({**common, "reward": "reward_model", "reward_model_path": str(tmp_path / "rm"),
                                  "run_dir": str(tmp_path / "run")})
    recs = read_metrics(train.train(cfg))
    step_recs = [r for r in recs if "proxy_reward" in r]
    assert len(step_recs) == 2
    for r in step_recs:
        assert 0 <= r["gold_accuracy"] <= 1 and math.isfinite(r["proxy_reward"])
        assert r["reward_mean"] == pytest.approx(r["proxy_reward"], abs=1e-5)  # the policy sees the proxy
    assert abs(step_recs[0]["kl_init"]) < 1e-4  # step 1 samples from the initial policy
    # the verifier alone: no proxy metrics (runs unchanged)
    plain = read_metrics(train.train(train.config_from_dict({**common, "run_dir": str(tmp_path / "plain")})))
    assert not any("proxy_reward" in r for r in plain)
    # a length bonus on the verifier: proxy = verifier + bonus * length
    shaped = read_metrics(train.train(train.config_from_dict(
        {**common, "reward_length_bonus": 0.5, "run_dir": str(tmp_path / "shaped")})))
    r = [x for x in shaped if "proxy_reward" in x][0]
    assert r["proxy_reward"] >= 0.5 * r["response_length"] - 1e-5
    with pytest.raises(ConfigError, match="reward_model_path"):
        train.config_from_dict({**common, "reward": "reward_model"})
    with pytest.raises(ConfigError):
        train.config_from_dict({**common, "reward": "rm"})
