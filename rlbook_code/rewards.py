"""Verifiable rewards from reasoning-gym tasks.

A :class:`TaskMixture` turns one or more reasoning-gym datasets into a seeded,
deterministic stream of training items, a fixed held-out evaluation set, chat
prompts, and rewards. Rewards are computed by the dataset's own ``score_answer``
verifier, wrapped so that a malformed completion scores 0 instead of raising.

Specs look like ``{"name": "spell_backward", "weight": 1.0, "config": {...}}``;
``config`` is passed to ``reasoning_gym.create_dataset``.

Train/held-out split: an item is *held out* when a stable hash of its question
falls in one bucket out of ``holdout_mod`` (default 10). :meth:`TaskMixture.sample`
never returns a held-out item and :meth:`TaskMixture.eval_items` only returns
held-out ones, so for ``spell_backward`` the evaluation words are never seen in
training.

Reward convention: higher is better; correctness rewards lie in ``[0, 1]``
(``mode="exact"`` gives 0 or 1, ``mode="partial"`` the verifier's partial credit),
plus ``format_weight`` times a 0/1 format check.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import unicodedata
from typing import Any

import torch

__all__ = [
    "DEFAULT_TASK",
    "LONG_ANSWER_TASK",
    "TaskMixture",
    "extract_answer",
    "format_ok",
    "ANSWER_TAG_INSTRUCTION",
    "overlong_penalty",
]

DEFAULT_TASK: list[dict[str, Any]] = [
    {"name": "spell_backward", "weight": 1.0, "config": {"min_word_len": 3, "max_word_len": 5}},
]
"""The task the shipped model was trained on: reverse a 3-5 letter word."""

LONG_ANSWER_TASK: list[dict[str, Any]] = [
    {"name": "countdown", "weight": 1.0, "config": {"min_numbers": 3, "max_numbers": 4}},
    {"name": "gsm_symbolic", "weight": 1.0, "config": {}},
]
"""Chapter 15: a mixture with longer answers, as in the GRPO-mini seed (Countdown and GSM8K):
an arithmetic expression that reaches a target, and a worded grade-school problem. For chat
models, with ``answer_format="tags"``."""

ANSWER_TAG_INSTRUCTION = "\nGive your final answer inside <answer></answer> tags."
"""Appended to every prompt when ``answer_format="tags"`` (useful for chat models)."""

# Markers after which a completion is over (special tokens of Qwen-style and other templates).
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_SPEC_KEYS = {"name", "weight", "config"}


def _cut_at_end_marker(text: str) -> str:
    """Drop everything from the first end-of-sequence marker on."""
    cut = len(text)
    for marker in _END_MARKERS:
        pos = text.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def _last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` with balanced braces, or ``None``."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str:
    r"""Extract the final answer from a completion.

    Rules, in order:

    1. ``None`` or a non-string gives ``""``; text is NFC-normalised (so a composed
       and a decomposed "é" compare equal).
    2. Everything from the first end-of-sequence marker (``<|im_end|>``,
       ``<|endoftext|>``, ``</s>``, ``<|eot_id|>``) on is dropped; a completion
       without one (truncated, or decoded with ``skip_special_tokens``) is kept whole.
    3. Everything up to the last ``</think>`` is dropped (reasoning models).
    4. If there are ``<answer>...</answer>`` tags, the content of the last pair.
    5. Else if there is a ``\boxed{...}``, the content of the last one.
    6. Else the last non-empty line.

    The result is stripped of surrounding whitespace; ``""`` when nothing is left.
    """
    if not isinstance(text, str):
        return ""
    text = unicodedata.normalize("NFC", text)
    text = _cut_at_end_marker(text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def format_ok(text: str, answer_format: str = "plain") -> bool:
    """Whether a completion has the expected shape (the optional format reward).

    ``"plain"``: after cutting at the end marker, a single non-empty line with no
    leading or trailing whitespace. ``"tags"``: exactly one ``<answer>...</answer>``
    pair with non-empty content.
    """
    if not isinstance(text, str):
        return False
    body = _cut_at_end_marker(unicodedata.normalize("NFC", text))
    if answer_format == "plain":
        return bool(body) and body == body.strip() and "\n" not in body
    if answer_format == "tags":
        tagged = _ANSWER_TAG.findall(body)
        return len(tagged) == 1 and bool(tagged[0].strip())
    raise ValueError(f"answer_format must be 'plain' or 'tags', got {answer_format!r}")


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def _derived_seed(*parts: object) -> int:
    """A reproducible 31-bit seed from any parts (``random.Random`` hashes strings with SHA-512)."""
    return random.Random("/".join(map(str, parts))).randrange(2**31)


def _validate_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(specs, dict):
        specs = [specs]
    if not isinstance(specs, (list, tuple)) or len(specs) == 0:
        raise ValueError(f"specs must be a non-empty list of {{name, weight, config}} dicts, got {specs!r}")
    out = []
    for spec in specs:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"each spec must be a dict with a 'name', got {spec!r}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"unknown spec keys {sorted(unknown)} in {spec!r}; allowed: {sorted(_SPEC_KEYS)}")
        weight = float(spec.get("weight", 1.0))
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"spec weight must be a positive finite number, got {weight!r} in {spec!r}")
        config = dict(spec.get("config") or {})
        if "seed" in config or "size" in config:
            raise ValueError(f"'seed' and 'size' are set by TaskMixture; remove them from config {config!r}")
        out.append({"name": str(spec["name"]), "weight": weight, "config": config})
    return out


class TaskMixture:
    """A seeded, weighted mixture of reasoning-gym datasets.

    Args:
        specs: ``[{"name": str, "weight": float, "config": dict}, ...]`` (one or many);
            weights need not sum to 1.
        seed: seeds both the choice of dataset and the datasets' own item streams.
        answer_format: ``"plain"`` (prompt is the task's question; the answer is the
            completion's last line) or ``"tags"`` (adds :data:`ANSWER_TAG_INSTRUCTION`).
        holdout_mod: one item in ``holdout_mod`` (by a hash of its question) is
            reserved for evaluation.

    Two mixtures with the same arguments produce the same items in the same order.
    """

    def __init__(
        self,
        specs: list[dict[str, Any]] | None = None,
        seed: int = 0,
        *,
        answer_format: str = "plain",
        holdout_mod: int = 10,
    ) -> None:
        import reasoning_gym

        self.specs = _validate_specs(DEFAULT_TASK if specs is None else specs)
        if answer_format not in ("plain", "tags"):
            raise ValueError(f"answer_format must be 'plain' or 'tags', got {answer_format!r}")
        if int(holdout_mod) < 2:
            raise ValueError(f"holdout_mod must be >= 2, got {holdout_mod!r}")
        self.seed = int(seed)
        self.answer_format = answer_format
        self.holdout_mod = int(holdout_mod)
        total = sum(s["weight"] for s in self.specs)
        self.weights = [s["weight"] / total for s in self.specs]
        self._rg = reasoning_gym
        self._rng = random.Random(_derived_seed("mixture", self.seed))
        self._datasets = [self._make_dataset(i, "train", self.seed) for i in range(len(self.specs))]
        self._cursors = [0] * len(self.specs)
        self._scorers: dict[str, Any] = {}
        for spec, ds in zip(self.specs, self._datasets):
            self._scorers.setdefault(spec["name"], ds.score_answer)

    _DATASET_SIZE = 1_000_000

    def _make_dataset(self, i: int, stream: str, seed: int):
        spec = self.specs[i]
        return self._rg.create_dataset(
            spec["name"], seed=_derived_seed(stream, seed, i, spec["name"]), size=self._DATASET_SIZE, **spec["config"]
        )

    def is_heldout(self, item: dict[str, Any]) -> bool:
        """Whether ``item`` belongs to the held-out split (a hash of its question)."""
        return _stable_hash(str(item["question"])) % self.holdout_mod == 0

    @staticmethod
    def _next(ds, cursors: list[int], i: int) -> dict[str, Any]:
        item = ds[cursors[i] % len(ds)]
        cursors[i] += 1
        return item

    def sample(self, n: int) -> list[dict[str, Any]]:
        """Draw ``n`` training items (never held-out ones); advances the mixture's stream."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        items = []
        idx = range(len(self.specs))
        for _ in range(n):
            i = self._rng.choices(idx, weights=self.weights)[0]
            for _attempt in range(1000):
                item = self._next(self._datasets[i], self._cursors, i)
                if not self.is_heldout(item):
                    break
            else:
                raise ValueError(f"dataset {self.specs[i]['name']!r} gave 1000 held-out items in a row")
            items.append(item)
        return items

    def eval_items(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """A fixed held-out set of ``n`` distinct items (same ``n, seed`` -> same list).

        Uses its own seed stream (independent of the training stream and of how many
        items were sampled), keeps only held-out items, and drops duplicate questions.
        Raises ``ValueError`` if the held-out split has fewer than ``n`` distinct items.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(_derived_seed("eval-mixture", self.seed, seed))
        datasets = [self._make_dataset(i, "eval", seed) for i in range(len(self.specs))]
        cursors = [0] * len(self.specs)
        seen: set[str] = set()
        items: list[dict[str, Any]] = []
        idx = range(len(self.specs))
        budget = 200 * self.holdout_mod * max(n, 1)
        while len(items) < n:
            i = rng.choices(idx, weights=self.weights)[0]
            item = self._next(datasets[i], cursors, i)
            budget -= 1
            if budget < 0:
                raise ValueError(f"could not find {n} distinct held-out items (found {len(items)})")
            if self.is_heldout(item) and item["question"] not in seen:
                seen.add(item["question"])
                items.append(item)
        return items

    def prompt(self, item: dict[str, Any]) -> str:
        """The user message for ``item``: the task's question (which carries its instructions)."""
        text = str(item["question"])
        if self.answer_format == "tags":
            text += ANSWER_TAG_INSTRUCTION
        return text

    def _scorer(self, item: dict[str, Any]):
        name = item.get("metadata", {}).get("source_dataset")
        if name not in self._scorers:
            self._scorers[name] = self._rg.get_score_answer_fn(name)
        return self._scorers[name]

    def score(
        self,
        completions: list[str],
        items: list[dict[str, Any]],
        mode: str = "exact",
        format_weight: float = 0.0,
    ) -> list[float]:
        """Rewards for ``completions[i]`` answering ``items[i]``.

        ``mode="exact"``: 1.0 if the verifier gives full credit (score >= 1), else 0.0.
        ``mode="partial"``: the verifier's score clipped to ``[0, 1]`` (e.g. the share of
        leading letters right for ``spell_backward``). A verifier that raises, or returns
        NaN, scores 0.0. ``format_weight * format_ok(completion)`` is added when non-zero.
        """
        if mode not in ("exact", "partial"):
            raise ValueError(f"mode must be 'exact' or 'partial', got {mode!r}")
        if len(completions) != len(items):
            raise ValueError(f"got {len(completions)} completions for {len(items)} items; expected equal lengths")
        rewards = []
        for text, item in zip(completions, items):
            answer = extract_answer(text)
            try:
                s = float(self._scorer(item)(answer, item))
            except Exception:  # noqa: BLE001 - some verifiers raise on malformed answers
                s = 0.0
            if not math.isfinite(s):
                s = 0.0
            r = (1.0 if s >= 1.0 - 1e-9 else 0.0) if mode == "exact" else min(max(s, 0.0), 1.0)
            if format_weight:
                r += float(format_weight) * float(format_ok(text, self.answer_format))
            rewards.append(r)
        return rewards

    def __repr__(self) -> str:
        return f"TaskMixture(specs={self.specs!r}, seed={self.seed}, answer_format={self.answer_format!r})"


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), ``(B,)`` -> ``(B,)`` (<= 0).

    0 up to ``max_len - buffer`` tokens, then linear down to ``-penalty`` at ``max_len``."""
    start = max_len - buffer
    frac = ((lengths.float() - start) / buffer).clamp(min=0.0, max=1.0)
    return -penalty * frac
