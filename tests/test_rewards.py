"""Tests of rlbook_code.rewards: answer extraction, scoring, and task mixtures."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from rlbook_code.rewards import DEFAULT_TASK, TaskMixture, extract_answer, format_ok


# ---------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text, expected",
    [
        ("", ""),  # empty completion
        ("   \n\t ", ""),  # only whitespace
        (None, ""),  # not a string
        ("noen", "noen"),  # no EOS (truncated or decoded without special tokens)
        ("noen<|im_end|>", "noen"),  # EOS kept in the text
        ("noen<|im_end|>garbage after eos", "noen"),
        ("noen<|endoftext|><|endoftext|>", "noen"),
        ("  noen \n", "noen"),  # extra whitespace
        ("\n\nnoen\n\n", "noen"),
        ("first line\nsecond line", "second line"),  # last non-empty line
        ("think...\n<answer> drib </answer>", "drib"),
        ("<answer>a</answer> then <answer>b</answer>", "b"),  # last tag wins
        ("<answer>\nmulti\nline\n</answer>", "multi\nline"),
        ("<think>the answer is x</think>\nnoen", "noen"),  # reasoning dropped
        ("so \\boxed{ssilb}.", "ssilb"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{unclosed", "\\boxed{unclosed"),
        ("ñoño", "ñoño"),  # unicode passes through
        ("n\u0303on\u0303o", "ñoño"),  # decomposed -> NFC composed
        ("日本語<|im_end|>", "日本語"),
        ("<answer></answer>", ""),
    ],
)
def test_extract_answer_edge_cases(text, expected):
    assert extract_answer(text) == expected


def test_format_ok():
    assert format_ok("noen")
    assert format_ok("noen<|im_end|>")
    assert not format_ok("")
    assert not format_ok(" noen")
    assert not format_ok("no\nen")
    assert not format_ok(None)
    assert format_ok("x <answer>noen</answer>", "tags")
    assert not format_ok("noen", "tags")
    assert not format_ok("<answer>a</answer><answer>b</answer>", "tags")
    with pytest.raises(ValueError, match="answer_format"):
        format_ok("x", "json")


# ---------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def task():
    return TaskMixture(DEFAULT_TASK, seed=0)


def test_default_task_items(task):
    items = task.sample(50)
    for it in items:
        assert it["metadata"]["source_dataset"] == "spell_backward"
        assert 3 <= len(it["answer"]) <= 5
        assert it["answer"] == it["metadata"]["word"][::-1]
        assert task.prompt(it) == it["question"]
        assert "backward" in task.prompt(it)


def test_score_exact_partial_and_garbage(task):
    item = {
        "question": "Spell this word backward (example: sun -> nus): neon",
        "answer": "noen",
        "metadata": {"source_dataset": "spell_backward", "word": "neon"},
    }
    completions = ["noen", " noen \n", "noen<|im_end|>", "noxx", "", "\x00\ufffd" * 50, "NOEN", "xoen"]
    items = [item] * len(completions)
    exact = task.score(completions, items, mode="exact")
    partial = task.score(completions, items, mode="partial")
    assert exact == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # the verifier is case-insensitive
    # partial credit: share of positions with the right letter (reasoning-gym's spell_backward rule)
    assert partial[:5] == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert partial[7] == 0.75
    assert all(0.0 <= r <= 1.0 and math.isfinite(r) for r in partial)


def test_score_never_raises_on_raising_verifier():
    # prime_factorization's verifier raises on some malformed strings
    mix = TaskMixture([{"name": "prime_factorization", "weight": 1.0, "config": {}}], seed=0)
    items = mix.sample(3)
    raising = ["nan", "abc", "{}}{"]  # the raw verifier raises ValueError on these
    with pytest.raises(ValueError):
        mix._scorer(items[0])("abc", items[0])
    for g in raising:
        assert mix.score([g] * 3, items, mode="partial") == [0.0, 0.0, 0.0]
    for g in ["", "× × ×", "2 × × 3", "\\boxed{", "1e999999"]:  # small format credit at most
        assert all(0.0 <= r < 0.5 for r in mix.score([g] * 3, items, mode="partial"))
    right = mix.score([it["answer"] for it in items], items)
    assert right == [1.0, 1.0, 1.0]


def test_score_format_reward(task):
    item = task.sample(1)[0]
    good, messy = item["answer"], item["answer"] + "\nmore"
    assert task.score([good], [item], format_weight=0.1) == [pytest.approx(1.1)]
    assert task.score([messy], [item], format_weight=0.1) == [0.0]  # last line "more" is wrong, bad format
    assert task.score(["zz"], [item], format_weight=0.1) == [pytest.approx(0.1)]


def test_score_rejects_bad_arguments(task):
    items = task.sample(2)
    with pytest.raises(ValueError, match="2 items"):
        task.score(["a"], items)
    with pytest.raises(ValueError, match="mode"):
        task.score(["a", "b"], items, mode="fuzzy")


def test_tags_format_prompt():
    mix = TaskMixture(DEFAULT_TASK, seed=0, answer_format="tags")
    item = mix.sample(1)[0]
    assert mix.prompt(item).endswith("<answer></answer> tags.")
    assert mix.score([f"Reversed: <answer>{item['answer']}</answer>"], [item]) == [1.0]


# ---------------------------------------------------------------- mixtures
def test_mixture_is_deterministic_and_seeded():
    a, b = TaskMixture(DEFAULT_TASK, seed=3), TaskMixture(DEFAULT_TASK, seed=3)
    assert a.sample(20) == b.sample(20)
    assert a.sample(5) == b.sample(5)  # streams stay in step
    c = TaskMixture(DEFAULT_TASK, seed=4)
    assert [x["question"] for x in c.sample(20)] != [x["question"] for x in TaskMixture(DEFAULT_TASK, seed=3).sample(20)]


def test_mixture_frequencies_follow_weights():
    specs = [
        {"name": "spell_backward", "weight": 3.0, "config": {"min_word_len": 3, "max_word_len": 5}},
        {"name": "basic_arithmetic", "weight": 1.0, "config": {}},
    ]
    mix = TaskMixture(specs, seed=0)
    n = 4000
    counts = Counter(it["metadata"]["source_dataset"] for it in mix.sample(n))
    p = 0.75
    # binomial: 4 standard deviations (sd = sqrt(n p (1-p)) ~ 27)
    assert abs(counts["spell_backward"] - p * n) < 4 * math.sqrt(n * p * (1 - p))
    assert counts["spell_backward"] + counts["basic_arithmetic"] == n
    # every item is scored by its own dataset's verifier
    items = mix.sample(40)
    assert mix.score([it["answer"] for it in items], items) == [1.0] * 40


def test_eval_items_fixed_heldout_and_disjoint(task):
    ev1 = task.eval_items(100, seed=0)
    ev2 = TaskMixture(DEFAULT_TASK, seed=0).eval_items(100, seed=0)
    assert ev1 == ev2  # fixed, independent of how much was sampled before
    assert len({it["question"] for it in ev1}) == 100  # distinct
    assert all(task.is_heldout(it) for it in ev1)
    assert task.eval_items(100, seed=1) != ev1
    train_words = {it["metadata"]["word"] for it in task.sample(2000)}
    assert train_words.isdisjoint({it["metadata"]["word"] for it in ev1})


@pytest.mark.parametrize(
    "specs, match",
    [
        ([], "non-empty"),
        ([{"name": "spell_backward", "weight": 0}], "positive"),
        ([{"name": "spell_backward", "wieght": 1}], "unknown spec keys"),
        ([{"name": "spell_backward", "config": {"seed": 1}}], "seed"),
    ],
)
def test_mixture_rejects_bad_specs(specs, match):
    with pytest.raises(ValueError, match=match):
        TaskMixture(specs, seed=0)
