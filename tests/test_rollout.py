"""Tests of rlbook_code.rollout and rlbook_code.evaluation on a randomly initialised tiny Qwen3."""

from __future__ import annotations

import math

import pytest
import torch

from rlbook_code.evaluation import evaluate
from rlbook_code.pretrain import build_model, build_tokenizer
from rlbook_code.rewards import TaskMixture
from rlbook_code.rollout import (
    RolloutBatch,
    chat_prompts,
    completion_logprobs,
    completion_mask_from_eos,
    generate,
    position_ids_from_mask,
    shared_prompt_cache,
)

torch.set_num_threads(1)  # tiny models gain nothing from a 2nd thread; under load it loses a lot

PROMPTS = ["Spell this word backward (example: sun -> nus): neon", "hi", "reverse: abcde"]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def batch(tiny):
    model, tok = tiny
    return generate(model, tok, PROMPTS, group_size=16, max_new_tokens=12, temperature=1.0, seed=0)


def test_completion_mask_from_eos_reference():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0], [5, 2, 6, 2, 0]])
    expected = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(completion_mask_from_eos(ids, [eos]), expected)
    # a second EOS id (Qwen ends chats with <|im_end|> or <|endoftext|>)
    assert torch.equal(completion_mask_from_eos(torch.tensor([[5, 7, 2]]), [2, 7]), torch.tensor([[1, 1, 0]]).bool())


def test_position_ids_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_batch_layout(tiny, batch):
    model, tok = tiny
    G, N = 16, 16 * len(PROMPTS)
    assert len(batch) == N and batch.group_size == G and batch.num_prompts == len(PROMPTS)
    assert batch.prompts == [p for p in PROMPTS for _ in range(G)]  # groups contiguous
    P = batch.prompt_ids.shape[1]
    T = batch.completion_ids.shape[1]
    assert batch.prompt_mask.dtype == torch.bool and batch.completion_mask.dtype == torch.bool
    assert batch.logprobs.dtype == torch.float32 and batch.logprobs.shape == (N, T)
    assert batch.input_ids.shape == batch.attention_mask.shape == (N, P + T)
    assert T <= 12
    # left padding: every prompt ends at column P-1; the shortest prompt starts with pad
    assert batch.prompt_mask[:, -1].all()
    short = PROMPTS.index("hi") * G
    assert not batch.prompt_mask[short, 0] and (batch.prompt_ids[short][~batch.prompt_mask[short]] == tok.pad_token_id).all()
    # the prompt is the chat template's text
    assert tok.decode(batch.prompt_ids[0][batch.prompt_mask[0]]) == chat_prompts(tok, PROMPTS[:1])[0]


def test_completion_mask_up_to_and_including_first_eos(tiny, batch):
    model, tok = tiny
    eos = tok.eos_token_id
    ids, mask = batch.completion_ids, batch.completion_mask
    ended = 0
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # a prefix
        hits = (row == eos).nonzero().flatten().tolist()
        if hits:
            ended += 1
            assert hits[0] == n - 1  # the first EOS is the last masked token
        else:
            assert n == ids.shape[1]  # no EOS: the whole completion counts
        assert (row[n:] == tok.pad_token_id).all()
    assert ended >= 1, "seed 0 should produce at least one early EOS"
    assert (batch.logprobs[~mask] == 0).all() and (batch.logprobs[mask] < 0).all()
    # texts are the decoded tokens before EOS
    for row, m, text in zip(ids, mask, batch.texts):
        toks = [t for t in row[m].tolist() if t != eos]
        assert text == tok.decode(toks, skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rescoring_reproduces_sampler_logprobs(tiny, temperature):
    """One forward pass with explicit position_ids reproduces the KV-cache sampler (float32)."""
    model, tok = tiny
    b = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=10, temperature=temperature, seed=1)
    scores = completion_logprobs(model, b, temperature=temperature)
    m = b.completion_mask
    assert scores.logprobs.dtype == torch.float32
    assert (scores.logprobs[~m] == 0).all()
    err = (scores.logprobs - b.logprobs).abs().max().item()
    assert err <= 1e-5, err


def test_top_p_sampler_logprobs_are_renormalised(tiny):
    """With top_p < 1 the sampler's distribution is truncated, so its log-probs are >= the full ones."""
    model, tok = tiny
    b = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=6, temperature=1.0, top_p=0.5, seed=0)
    full = completion_logprobs(model, b).logprobs
    m = b.completion_mask
    assert (b.logprobs[m] >= full[m] - 1e-6).all()
    assert (b.logprobs[m] - full[m]).max() > 0.1


def test_greedy_and_seeding(tiny):
    model, tok = tiny
    g = generate(model, tok, PROMPTS, group_size=3, max_new_tokens=6, temperature=0.0, seed=0)
    for k in range(len(PROMPTS)):
        rows = g.completion_ids[3 * k : 3 * k + 3]
        assert (rows == rows[0]).all()  # greedy: a group is one completion repeated
    logits = model(
        input_ids=g.input_ids, attention_mask=g.attention_mask.long(), position_ids=position_ids_from_mask(g.attention_mask)
    ).logits
    P = g.prompt_ids.shape[1]
    pred = logits[:, P - 1 : -1].argmax(-1)
    assert torch.equal(pred[g.completion_mask], g.completion_ids[g.completion_mask])

    before = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, group_size=2, max_new_tokens=6, seed=5)
    b = generate(model, tok, PROMPTS, group_size=2, max_new_tokens=6, seed=5)
    c = generate(model, tok, PROMPTS, group_size=2, max_new_tokens=6, seed=6)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_scores_entropy_hidden_and_gradient(tiny, batch):
    model, tok = tiny
    sub = batch.select(list(range(8)))
    s = completion_logprobs(model, sub, with_entropy=True, with_hidden=True)
    N, T = sub.completion_ids.shape
    assert s.entropy.shape == (N, T) and s.hidden.shape == (N, T, model.config.hidden_size)
    m = sub.completion_mask
    assert (s.entropy[m] > 0).all() and (s.entropy[m] <= math.log(len(tok)) + 1e-4).all()
    # hidden[:, t] is the state that predicts completion token t
    logp_from_hidden = torch.log_softmax(model.lm_head(s.hidden).float(), -1)
    logp_from_hidden = logp_from_hidden.gather(-1, sub.completion_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logp_from_hidden[m], s.logprobs[m], atol=1e-5)
    assert s.entropy.requires_grad
    metric = completion_logprobs(model, sub, with_entropy=True, entropy_grad=False)
    assert not metric.entropy.requires_grad and metric.logprobs.requires_grad
    assert torch.equal(metric.entropy, s.entropy.detach())
    (s.logprobs.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_shared_prompt_equals_full_forward(tiny, batch):
    """Prompt computed once per group + repeated cache == one full pass per row: log-probs,
    entropy, hidden states and every parameter gradient (the repeat's backward sums the G
    rows' contributions into the one prompt computation)."""
    model, tok = tiny
    sub = batch.select(list(range(2 * batch.group_size)))  # two whole groups
    assert sub.group_size == batch.group_size
    out, grads = {}, {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        s = completion_logprobs(model, sub, with_entropy=True, with_hidden=True, share_prompt=share)
        (s.logprobs.sum() + 0.1 * s.hidden.pow(2).sum()).backward()
        out[share] = s
        grads[share] = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    a, b = out[False], out[True]
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert torch.allclose(a.hidden, b.hidden, atol=1e-5)
    for ga, gb in zip(grads[False], grads[True]):  # float32 rounding, relative to the largest entry
        assert float((ga - gb).abs().max()) <= 1e-5 * float(ga.abs().max())
    # and both reproduce the sampler's own log-probs
    assert torch.allclose(b.logprobs, sub.logprobs, atol=1e-4)


def test_shared_prompt_cache_layout(tiny):
    model, tok = tiny
    b = generate(model, tok, PROMPTS, group_size=3, max_new_tokens=4, seed=0)
    cache = shared_prompt_cache(model, b.prompt_ids, b.prompt_mask, 3)
    assert cache.get_seq_length() == b.prompt_ids.shape[1] - 1
    k = cache.layers[0].keys  # (N, kv_heads, P-1, head_dim)
    assert k.shape[0] == len(b) and torch.equal(k[0], k[1]) and torch.equal(k[0], k[2])


def test_shared_prompt_falls_back_on_mixed_rows(tiny, batch):
    """Rows that are not whole groups (a shuffled minibatch) take the plain full pass."""
    model, tok = tiny
    mixed = batch.select([0, batch.group_size, 1])
    a = completion_logprobs(model, mixed, share_prompt=False).logprobs
    b = completion_logprobs(model, mixed, share_prompt=True).logprobs
    assert torch.equal(a, b)


def test_shared_prompt_with_gradient_checkpointing_takes_the_full_pass(tiny, batch):
    """transformers drops the cache inside checkpointed layers in training mode; the shared pass
    must not run there (it would score the completion without its prompt)."""
    model, tok = tiny
    sub = batch.select(list(range(batch.group_size)))
    ref = completion_logprobs(model, sub).logprobs
    new_api = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.x's name
    (model.activation_checkpointing_enable if new_api else model.gradient_checkpointing_enable)()
    model.train()
    try:
        got = completion_logprobs(model, sub, share_prompt=True).logprobs
    finally:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
        model.eval()
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_with_shared_prompt_draws_the_same_samples(tiny, seed):
    model, tok = tiny
    a = generate(model, tok, PROMPTS, group_size=8, max_new_tokens=10, seed=seed)
    b = generate(model, tok, PROMPTS, group_size=8, max_new_tokens=10, seed=seed, share_prompt=True)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)


def test_select(batch):
    G = batch.group_size
    whole = batch.select(torch.arange(G, 3 * G))
    assert whole.group_size == G and whole.prompts == batch.prompts[G : 3 * G]
    assert torch.equal(whole.completion_ids, batch.completion_ids[G : 3 * G])
    mixed = batch.select([0, 5, G + 1])
    assert mixed.group_size == 1 and len(mixed) == 3
    assert mixed.texts == [batch.texts[i] for i in (0, 5, G + 1)]
    assert torch.equal(mixed.logprobs, batch.logprobs[[0, 5, G + 1]])
    assert isinstance(mixed, RolloutBatch)
    with pytest.raises(ValueError, match="indices"):
        batch.select([len(batch)])


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="group_size"):
        generate(model, tok, PROMPTS, group_size=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, PROMPTS, group_size=1, max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [], group_size=1, max_new_tokens=4)


def test_evaluate_on_random_model(tiny):
    model, tok = tiny
    task = TaskMixture(seed=0)
    items = task.eval_items(10, seed=0)
    res = evaluate(model, tok, task, items, max_new_tokens=6, greedy=False, batch_size=4, seed=0)
    assert set(res) == {"accuracy", "mean_reward", "mean_length", "eos_rate", "n"}
    assert res["n"] == 10 and 0 <= res["accuracy"] <= res["mean_reward"] + 1e-9 <= 1 + 1e-9
    assert 1 <= res["mean_length"] <= 6
    assert res == evaluate(model, tok, task, items, max_new_tokens=6, greedy=False, batch_size=4, seed=0)
    assert not model.training


def test_model_generation_defaults_do_not_leak(tiny, tmp_path):
    """Qwen3 ships generation defaults (do_sample, temperature 0.6, top_k 20, top_p 0.95); the
    sampler must use the arguments it is given, or rescoring would not match the sampler."""
    import warnings

    model, tok = tiny
    saved = model.generation_config.to_dict()
    model.generation_config.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=8, temperature=1.0, seed=2)
            g = generate(model, tok, PROMPTS, group_size=1, max_new_tokens=8, temperature=0.0, seed=2)
        assert (completion_logprobs(model, b).logprobs - b.logprobs).abs().max() <= 1e-5
        # greedy ignores the model's sampling defaults (and its repetition penalty would change argmax)
        logits = model(
            input_ids=g.input_ids, attention_mask=g.attention_mask.long(),
            position_ids=position_ids_from_mask(g.attention_mask),
        ).logits
        P = g.prompt_ids.shape[1]
        pred = logits[:, P - 1 : -1].argmax(-1)
        assert torch.equal(pred[g.completion_mask], g.completion_ids[g.completion_mask])
    finally:
        model.generation_config = type(model.generation_config).from_dict(saved)


def test_truncated_rows_are_the_completions_cut_at_the_cap():
    from rlbook_code.rollout import RolloutBatch, truncated_rows

    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, 2, 0], [5, 6, 7, 8], [5, 6, 7, 2], [2, 0, 0, 0]])  # ends, cut, EOS last, empty
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    b = RolloutBatch(prompts=["p"] * 4, texts=[""] * 4, prompt_ids=torch.ones(4, 1, dtype=torch.long),
                     prompt_mask=torch.ones(4, 1, dtype=torch.bool), completion_ids=ids, completion_mask=mask,
                     logprobs=torch.zeros(4, 4), group_size=1)
    assert truncated_rows(b, [eos]).tolist() == [False, True, False, False]
    assert truncated_rows(b, [eos, 8]).tolist() == [False, False, False, False]
