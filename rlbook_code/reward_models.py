"""Learned rewards (chapter 13): Bradley–Terry, outcome and process reward models, best-of-n,
over-optimization, and the hook that lets the policy trainer optimise a learned reward.

Conventions (every function):

* A reward is *higher is better*. A pair is ``(chosen, rejected)``: ``chosen`` is the preferred
  completion ``y+``, ``rejected`` the other, ``y-``; ``r_chosen - r_rejected > 0`` means the
  model agrees with the label.
* Bradley–Terry: ``P(y+ > y-) = sigmoid(r(y+) - r(y-))``. Only differences of ``r`` enter, so a
  reward model is identified up to a constant per prompt (chapter 13 shows the shift invariance).
* An **outcome** reward model (ORM) predicts ``P(correct)`` from the whole completion, read at its
  last real token; a **process** reward model (PRM) predicts, at the end of every *step*,
  ``P(every step so far is correct)``. For ``spell_backward`` a step is one output token (one
  letter; the end-of-sequence token is the last step: stopping at the right place). PRM labels
  follow Lightman et al. (2023): steps are supervised up to *and including* the first wrong one.
* Logits, not probabilities, go into the losses (``softplus`` / ``binary_cross_entropy_with_logits``:
  stable for any magnitude, never ``log(sigmoid(.))``).
* Shapes: ``(B,)`` one number per sequence or pair, ``(B, S)`` one per step, ``(B, L)`` token
  positions of a full input (prompt + completion). Masks are bool.
* Bad input raises ``ValueError``: a shape mismatch, an empty batch, a NaN or inf, a bad
  hyperparameter.

Training a reward model from the command line::

    python -m rlbook_code.reward_models --config configs/rm/rm.yaml [--set key=value ...]

writes ``<run_dir>/final`` (loadable with :meth:`RewardModel.from_pretrained`), ``metrics.jsonl``
and ``checkpoint/``. The policy trainer optimises such a model with ``reward: reward_model`` and
``reward_model_path`` (:class:`LearnedReward`), logging the verifier as the gold score.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from rlbook_code._validate import check_mask

__all__ = [
    "bradley_terry_loss",
    "pair_accuracy",
    "bradley_terry_coin",
    "orm_loss",
    "prm_labels",
    "prm_loss",
    "prm_solution_score",
    "letter_step_correct",
    "last_token_index",
    "RewardModel",
    "PairData",
    "verifier_pairs",
    "latent_pairs",
    "best_of_n",
    "pass_at_n",
    "bon_kl",
    "gao_rl",
    "gao_bon",
    "fit_gao",
    "RMConfig",
    "train_reward_model",
    "LearnedReward",
    "make_learned_reward",
    "main",
]

OBJECTIVES = ("bt", "orm", "prm")
PAIR_LABELS = ("verifier", "latent")
PRM_REDUCE = ("product", "min")


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------
def _check_finite(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (an empty batch has no loss)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {', '.join(f'{k} {s}' for k, s in shapes.items())}")


def _check_hparam(name: str, value: float, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# ----------------------------------------------------------------------------------------
# Bradley–Terry
# ----------------------------------------------------------------------------------------
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *,
                       margin: float | torch.Tensor = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """Negative log-likelihood of the Bradley–Terry model, mean over pairs (to *minimise*).

    ``loss = mean(-log sigmoid(r+ - r- - m)) + center_coef * mean((r+ + r-)^2)``

    computed as ``softplus(-(r+ - r- - m))``, exact and finite for any ``|r+ - r-|``
    (``log(sigmoid(x))`` underflows to ``-inf`` near ``x = -104`` in float32).

    Args:
        r_chosen: ``(B,)`` rewards of the preferred completions.
        r_rejected: ``(B,)`` rewards of the other completions.
        margin: ``m``, a float or ``(B,)`` per-pair margins (Llama 2's preference-strength margin):
            the loss keeps pushing until ``r+ - r- > m``. 0: the plain Bradley–Terry likelihood.
        center_coef: ``eta`` of the centering term of TRL's ``RewardTrainer``
            (``center_rewards_coefficient``): pulls ``r+ + r-`` towards 0, pinning the free
            constant of the reward (Eisenstein et al. 2023). 0: off.
    """
    _check_finite("r_chosen", r_chosen)
    _check_finite("r_rejected", r_rejected)
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    if r_chosen.dim() != 1:
        raise ValueError(f"r_chosen and r_rejected must be (B,), got shape {tuple(r_chosen.shape)}")
    _check_hparam("center_coef", center_coef)
    if isinstance(margin, torch.Tensor):
        _check_finite("margin", margin)
        _check_same_shape(r_chosen=r_chosen, margin=margin)
        margin = margin.to(r_chosen.dtype)
    else:
        _check_hparam("margin", float(margin))
    delta = r_chosen - r_rejected - margin  # (B,)
    loss = F.softplus(-delta).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs with ``r+ > r-`` (a tie counts one half)."""
    _check_finite("r_chosen", r_chosen)
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    d = (r_chosen - r_rejected).detach().float()
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())


def bradley_terry_coin(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference labels from a known latent reward ``z`` through a Bradley–Terry coin.

    ``P(a > b) = sigmoid((z_a - z_b) / temperature)``: a small temperature is an annotator who
    almost always prefers the higher latent reward, a large one is a noisy annotator.

    Returns ``(a_wins (B,) bool, p_a (B,) float)``; the Bayes rate of any reward model on these
    labels is ``mean(max(p_a, 1 - p_a))``.
    """
    _check_finite("z_a", z_a)
    _check_same_shape(z_a=z_a, z_b=z_b)
    _check_hparam("temperature", temperature, positive=True)
    p = torch.sigmoid((z_a.double() - z_b.double()) / temperature)
    u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
    return u < p, p


# ----------------------------------------------------------------------------------------
# Outcome and process reward models
# ----------------------------------------------------------------------------------------
def orm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of an outcome reward model, mean over sequences.

    Args:
        logits: ``(B,)`` the model's logit of ``P(correct)`` at each sequence's last real token.
        labels: ``(B,)`` 1 for a correct completion, 0 for a wrong one (soft labels in ``[0, 1]``
            are accepted).
    """
    _check_finite("logits", logits)
    _check_finite("labels", labels)
    _check_same_shape(logits=logits, labels=labels)
    if bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError("labels must lie in [0, 1]")
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def prm_labels(correct: torch.Tensor, step_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Process labels with Lightman et al.'s rule: supervise steps up to and including the first
    wrong one; later steps carry no label (a step after an error is neither right nor wrong).

    Args:
        correct: ``(B, S)`` bool, whether step ``s`` is correct on its own.
        step_mask: ``(B, S)`` bool, True on real steps.

    Returns:
        ``(labels (B, S) float, supervised (B, S) bool)``: label 1 on the correct steps before the
        first error, 0 on the first error; ``supervised`` is False after it and on padding.
    """
    check_mask(correct, step_mask, "correct")
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor, got {correct.dtype}")
    wrong = step_mask & ~correct
    wrong_before = torch.cumsum(wrong.long(), dim=1) - wrong.long()  # errors strictly before s
    supervised = step_mask & (wrong_before == 0)
    labels = (correct & supervised).float()
    return labels, supervised


def prm_loss(step_logits: torch.Tensor, labels: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a process reward model, mean over the supervised steps of the batch.

    Args:
        step_logits: ``(B, S)`` logits of ``P(all steps up to s correct)``, one per step.
        labels, supervised: from :func:`prm_labels`.
    """
    check_mask(step_logits, supervised, "step_logits")
    _check_same_shape(step_logits=step_logits, labels=labels)
    if not bool(supervised.any()):
        raise ValueError("no supervised step in the batch (an empty batch has no loss)")
    _check_finite("step_logits", step_logits[supervised])
    _check_finite("labels", labels[supervised])
    per_step = F.binary_cross_entropy_with_logits(step_logits.float(), labels.float(), reduction="none")
    return per_step[supervised].mean()


def prm_solution_score(step_logits: torch.Tensor, step_mask: torch.Tensor, reduce: str = "product") -> torch.Tensor:
    """A solution's PRM score from its step probabilities ``p_s = sigmoid(logit_s)``, ``(B,)``.

    * ``"product"``: ``prod_s p_s`` (Lightman et al.: the probability that every step is
      correct, if the steps' errors were independent), computed as ``exp(sum log sigmoid)``.
    * ``"min"``: ``min_s p_s`` (the weakest step; Wang et al. 2024's choice): does not shrink
      with the number of steps, so it does not penalise long solutions.

    A row without any step raises ``ValueError``.
    """
    check_mask(step_logits, step_mask, "step_logits")
    if reduce not in PRM_REDUCE:
        raise ValueError(f"reduce must be one of {PRM_REDUCE}, got {reduce!r}")
    if step_logits.dim() != 2:
        raise ValueError(f"step_logits must be (B, S), got shape {tuple(step_logits.shape)}")
    if step_logits.shape[0] == 0 or not bool(step_mask.any(dim=1).all()):
        raise ValueError("every row needs at least one step (and the batch at least one row)")
    _check_finite("step_logits", step_logits[step_mask])
    logp = F.logsigmoid(step_logits.float())
    if reduce == "product":
        return torch.where(step_mask, logp, 0.0).sum(dim=1).exp()
    return torch.where(step_mask, logp, float("inf")).amin(dim=1).exp()


def letter_step_correct(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        target_ids: list[list[int]]) -> torch.Tensor:
    """Per-step correctness for a task whose answer is a fixed token sequence (``spell_backward``
    with a character tokenizer: one step per output letter, then end-of-sequence).

    Step ``t`` (completion token ``t``) is correct when ``t < len(target)`` and the token equals
    ``target[t]``. Pass ``target = tokens(answer) + [eos]``: the end-of-sequence token is the last
    step, so a completion that stops early or runs on has a wrong step even if every letter it
    wrote was right. A completion cut at ``max_new_tokens`` without EOS has no final step.

    Returns ``(B, T)`` bool, False where ``completion_mask`` is False.
    """
    check_mask(completion_ids, completion_mask, "completion_ids")
    if len(target_ids) != completion_ids.shape[0]:
        raise ValueError(f"got {len(target_ids)} targets for {completion_ids.shape[0]} completions")
    B, T = completion_ids.shape
    tgt = torch.full((B, T), -1, dtype=torch.long)
    for i, t in enumerate(target_ids):
        t = list(t)[:T]
        if t:
            tgt[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return (completion_ids.cpu() == tgt) & completion_mask.cpu()


# ----------------------------------------------------------------------------------------
# The reward model
# ----------------------------------------------------------------------------------------
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool -> ``(B,)`` long: the position of each row's last real token.

    Correct under any padding: left (the book's prompts), right, or both (a rollout row: a
    left-padded prompt, then a completion right-padded after its EOS). A row with no real token
    raises ``ValueError``. (``mask.sum(1) - 1``, a common shortcut, is right only under right
    padding.)
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a (B, L) bool tensor")
    if attention_mask.shape[0] == 0:
        raise ValueError("attention_mask has no rows (an empty batch)")
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("a row of attention_mask has no real token")
    L = attention_mask.shape[1]
    return L - 1 - attention_mask.flip(1).long().argmax(dim=1)


class RewardModel(torch.nn.Module):
    """A scalar head on a causal-LM backbone: ``r = w . h_last + b``.

    ``h`` is the backbone's final hidden state (its base model, without the LM head); the reward
    of a sequence is read at its last real token (:func:`last_token_index`), per-token scores
    (for a PRM) at every position. Positions are counted from the first real token (as
    ``rollout.generate`` does), so left padding does not change a score. The head starts at
    zero: every reward is 0 before training (the Bradley–Terry loss starts at ``log 2``).

    Args:
        backbone: a Hugging Face causal LM (e.g. from ``models.load_policy``); it is trained too.
        kind: what the head was trained for, ``"bt"``, ``"orm"`` or ``"prm"`` (saved with it; it
            decides :meth:`reward`).
    """

    def __init__(self, backbone, kind: str = "bt"):
        super().__init__()
        if kind not in OBJECTIVES:
            raise ValueError(f"kind must be one of {OBJECTIVES}, got {kind!r}")
        self.backbone = backbone
        self.kind = kind
        hidden = backbone.config.hidden_size
        p = next(backbone.parameters())
        self.head = torch.nn.Linear(hidden, 1, device=p.device, dtype=p.dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, name_or_path: str | os.PathLike | None = None, kind: str = "bt",
                    device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32):
        """A fresh reward model whose backbone is a copy of a policy (None: the shipped model).
        Returns ``(reward_model, tokenizer)``."""
        from rlbook_code.models import load_policy

        lm, tok = load_policy(name_or_path, device=device, dtype=dtype)
        return cls(lm, kind=kind), tok

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` scores at every position (0 on padding)."""
        from rlbook_code.rollout import position_ids_from_mask

        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must have one shape")
        attention_mask = attention_mask.bool()
        base = self.backbone.base_model
        out = base(input_ids=input_ids, attention_mask=attention_mask.long(),
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        h = out.last_hidden_state  # (B, L, H)
        s = self.head(h).squeeze(-1).float()  # (B, L)
        return s.masked_fill(~attention_mask, 0.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the score at each sequence's last real token."""
        s = self.token_scores(input_ids, attention_mask)
        idx = last_token_index(attention_mask.bool())
        return s[torch.arange(s.shape[0], device=s.device), idx]

    def completion_scores(self, batch, share_prompt: bool = True) -> torch.Tensor:
        """``(N, T)`` the score after each completion token of a
        :class:`~rlbook_code.rollout.RolloutBatch` (0 where its completion mask is False): a
        PRM's step logits, and at the last real token an ORM's or a Bradley–Terry model's score.

        ``share_prompt``: when the rows come in groups of identical prompts (``batch.group_size``),
        each prompt goes through the backbone once per group (``rollout.shared_prompt_cache``, the
        trainer's trick of chapter 08): the same scores and gradients, to float rounding, for
        ``1/G`` of the prompt's cost."""
        from rlbook_code.rollout import _can_share_prompt, position_ids_from_mask, shared_prompt_cache

        dev = self.head.weight.device
        ids, attn = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        mask = batch.completion_mask.to(dev)
        P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
        pos = position_ids_from_mask(attn)
        pids, pmask = batch.prompt_ids.to(dev), batch.prompt_mask.to(dev)
        if share_prompt and _can_share_prompt(pids, pmask, batch.group_size):
            cache = shared_prompt_cache(self.backbone, pids, pmask, batch.group_size)
            out = self.backbone.base_model(input_ids=ids[:, P - 1:], attention_mask=attn.long(),
                                           position_ids=pos[:, P - 1:], past_key_values=cache, use_cache=True)
            h = out.last_hidden_state[:, 1:]  # (N, T, H): after completion tokens 0 .. T-1
        else:
            out = self.backbone.base_model(input_ids=ids, attention_mask=attn.long(), position_ids=pos,
                                           use_cache=False)
            h = out.last_hidden_state[:, P:]  # (N, T, H)
        return self.head(h).squeeze(-1).float().masked_fill(~mask, 0.0)

    def score_batch(self, batch, share_prompt: bool = True) -> torch.Tensor:
        """``(N,)`` the score at the last real token of each row of a rollout batch (its EOS, or
        its last token when it was cut at ``max_new_tokens``)."""
        s = self.completion_scores(batch, share_prompt)
        idx = last_token_index(batch.completion_mask.to(s.device))
        return s[torch.arange(s.shape[0], device=s.device), idx]

    @torch.no_grad()
    def reward(self, batch, chunk: int = 256) -> torch.Tensor:
        """The reward a policy is trained on, ``(N,)``, no gradient, in chunks of rows:
        ``bt``: the raw score; ``orm``: ``sigmoid`` of the score (``P(correct)``); ``prm``: the
        product of the step probabilities (:func:`prm_solution_score`)."""
        was = self.training
        self.eval()
        out = []
        G = batch.group_size
        chunk = max(1, chunk // G) * G  # whole groups: each prompt once per group
        try:
            for i in range(0, len(batch), chunk):
                mb = batch.select(list(range(i, min(i + chunk, len(batch)))))
                if self.kind == "prm":
                    out.append(prm_solution_score(self.completion_scores(mb),
                                                  mb.completion_mask.to(self.head.weight.device)))
                elif self.kind == "orm":
                    out.append(torch.sigmoid(self.score_batch(mb)))
                else:
                    out.append(self.score_batch(mb))
        finally:
            self.train(was)
        return torch.cat(out).float().cpu()

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> Path:
        """Write the backbone (``save_pretrained``), the head (``reward_head.safetensors``) and
        ``reward_model.json``; with ``tokenizer``, the tokenizer too."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(path / "reward_head.safetensors"))
        (path / "reward_model.json").write_text(json.dumps(
            {"format": "rlbook-reward-model", "kind": self.kind, "hidden_size": self.head.in_features}, indent=1))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32) -> "RewardModel":
        """Load what :meth:`save_pretrained` wrote (a ``ValueError`` names a folder that is not one)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        path = Path(path)
        meta_path = path / "reward_model.json"
        if not meta_path.exists():
            raise ValueError(f"{path} is not a reward-model folder (no reward_model.json); train one with "
                             f"python -m rlbook_code.reward_models")
        meta = json.loads(meta_path.read_text())
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        rm = cls(lm, kind=meta["kind"])
        rm.head.load_state_dict({k: v.to(device=device, dtype=dtype)
                                 for k, v in load_file(str(path / "reward_head.safetensors")).items()})
        rm.eval()
        return rm


# ----------------------------------------------------------------------------------------
# Preference pairs from the model's own samples
# ----------------------------------------------------------------------------------------
@dataclass
class PairData:
    """Pairs of rows of one rollout batch (both members of a pair answer the same prompt).

    Attributes:
        batch: the :class:`~rlbook_code.rollout.RolloutBatch` the rows come from (completions
            truncated to ``max_length`` tokens if one was given).
        chosen, rejected: ``(M,)`` long row indices into ``batch``.
        p_chosen: ``(M,)`` the probability the labeller picked ``chosen`` (1 for verifier
            pairs; the Bradley–Terry coin's probability of the outcome for latent pairs).
        num_identical: candidate pairs dropped because the two texts were identical (after
            truncation): with a coin they are pure label noise, and with any labeller the loss
            of an identical pair is ``log 2`` whatever the model does.
        num_candidates: pairs considered before dropping.
    """

    batch: Any
    chosen: torch.Tensor
    rejected: torch.Tensor
    p_chosen: torch.Tensor
    num_identical: int
    num_candidates: int

    def __len__(self) -> int:
        return int(self.chosen.numel())


def _truncate(batch, max_length: int | None):
    """The batch with completions cut to ``max_length`` tokens (None: unchanged)."""
    if max_length is None or batch.completion_ids.shape[1] <= max_length:
        return batch
    import dataclasses

    return dataclasses.replace(batch, completion_ids=batch.completion_ids[:, :max_length],
                               completion_mask=batch.completion_mask[:, :max_length],
                               logprobs=batch.logprobs[:, :max_length])


def _same_completion(batch, i: int, j: int) -> bool:
    mi, mj = batch.completion_mask[i], batch.completion_mask[j]
    return bool(torch.equal(mi, mj) and torch.equal(batch.completion_ids[i][mi], batch.completion_ids[j][mj])
                and torch.equal(batch.prompt_ids[i][batch.prompt_mask[i]], batch.prompt_ids[j][batch.prompt_mask[j]]))


def _group_pairs(G: int, per_group: int | None, rng: random.Random) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(G) for b in range(a + 1, G)]
    rng.shuffle(pairs)
    return pairs if per_group is None else pairs[:per_group]


def verifier_pairs(batch, scores: torch.Tensor, *, pairs_per_group: int | None = None, seed: int = 0,
                   max_length: int | None = None) -> PairData:
    """Pairs within each group whose verifier scores differ; the higher score is ``chosen``.

    Args:
        batch: a rollout batch of ``P`` groups of ``G`` completions.
        scores: ``(N,)`` verifier scores of its rows.
        pairs_per_group: at most this many pairs per group, drawn at random (seeded) among the
            pairs with different scores; None: all of them.
        max_length: truncate completions to this many tokens before comparing (what the reward
            model will see).
    """
    _check_finite("scores", scores)
    if scores.shape != (len(batch),):
        raise ValueError(f"scores must be (N,) = ({len(batch)},), got {tuple(scores.shape)}")
    batch = _truncate(batch, max_length)
    G, rng = batch.group_size, random.Random(seed)
    chosen, rejected, n_same, n_cand = [], [], 0, 0
    for g in range(len(batch) // G):
        cand = [(g * G + a, g * G + b) for a, b in _group_pairs(G, None, rng)
                if scores[g * G + a] != scores[g * G + b]]
        kept = 0
        for i, j in cand:
            if pairs_per_group is not None and kept >= pairs_per_group:
                break
            n_cand += 1
            if _same_completion(batch, i, j):
                n_same += 1
                continue
            hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
            chosen.append(hi)
            rejected.append(lo)
            kept += 1
    return PairData(batch, torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long),
                    torch.ones(len(chosen), dtype=torch.float64), n_same, n_cand)


def latent_pairs(batch, latent: torch.Tensor, *, temperature: float, pairs_per_group: int | None = None,
                 seed: int = 0, max_length: int | None = None) -> PairData:
    """Random pairs within each group, labelled by a Bradley–Terry coin on a known latent reward
    (:func:`bradley_terry_coin`): the recovery experiment of chapter 13.

    Args:
        latent: ``(N,)`` the latent reward ``z`` of each row (e.g. the verifier's partial credit).
        temperature: the coin's temperature ``tau``: ``P(a > b) = sigmoid((z_a - z_b) / tau)``.
        pairs_per_group, seed, max_length: as in :func:`verifier_pairs` (pairs drawn among all
            pairs of the group; identical texts dropped and counted).
    """
    _check_finite("latent", latent)
    if latent.shape != (len(batch),):
        raise ValueError(f"latent must be (N,) = ({len(batch)},), got {tuple(latent.shape)}")
    _check_hparam("temperature", temperature, positive=True)
    batch = _truncate(batch, max_length)
    G, rng = batch.group_size, random.Random(seed)
    a_idx, b_idx, n_same, n_cand = [], [], 0, 0
    for g in range(len(batch) // G):
        kept = 0
        for a, b in _group_pairs(G, None, rng):
            if pairs_per_group is not None and kept >= pairs_per_group:
                break
            n_cand += 1
            if _same_completion(batch, g * G + a, g * G + b):
                n_same += 1
                continue
            a_idx.append(g * G + a)
            b_idx.append(g * G + b)
            kept += 1
    a_t, b_t = torch.tensor(a_idx, dtype=torch.long), torch.tensor(b_idx, dtype=torch.long)
    if len(a_idx) == 0:
        return PairData(batch, a_t, b_t, torch.ones(0, dtype=torch.float64), n_same, n_cand)
    gen = torch.Generator().manual_seed(seed)
    a_wins, p = bradley_terry_coin(latent[a_t], latent[b_t], temperature, generator=gen)
    chosen = torch.where(a_wins, a_t, b_t)
    rejected = torch.where(a_wins, b_t, a_t)
    return PairData(batch, chosen, rejected, torch.where(a_wins, p, 1 - p), n_same, n_cand)


# ----------------------------------------------------------------------------------------
# Best-of-n and over-optimization
# ----------------------------------------------------------------------------------------
def best_of_n(scores: torch.Tensor, correct: torch.Tensor, ns: list[int], seed: int = 0) -> torch.Tensor:
    """Exact expected accuracy of best-of-``n`` selection, ``(len(ns),)`` float64.

    For each prompt (row) ``N`` completions were sampled and scored. Best-of-``n`` draws ``n`` of
    them without replacement and returns the highest-scoring one; the expectation over all
    ``C(N, n)`` draws is computed exactly: the completion of rank ``k`` (``k`` completions score
    lower) is picked with probability ``C(k, n-1) / C(N, n)``. Ties in score are broken by a
    seeded random order (identical texts score identically and are equally correct).

    Args:
        scores: ``(P, N)`` the selector's scores (a reward model, a PRM score, ...).
        correct: ``(P, N)`` the gold score of each completion (0/1, or any number: the result is
            then the expected gold score of the selection).
        ns: the ``n`` to evaluate, each in ``[1, N]``.
    """
    _check_finite("scores", scores)
    _check_finite("correct", correct.float())
    _check_same_shape(scores=scores, correct=correct)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (P, N), got shape {tuple(scores.shape)}")
    P, N = scores.shape
    if not ns or any(not 1 <= int(n) <= N for n in ns):
        raise ValueError(f"every n must lie in [1, N={N}], got {list(ns)}")
    g = torch.Generator().manual_seed(seed)
    tie = torch.rand(P, N, generator=g, dtype=torch.float64)
    # lexicographic (score, tie): sort by tie first, then stably by score
    o1 = tie.argsort(dim=1)
    s1 = scores.double().gather(1, o1)
    o2 = s1.argsort(dim=1, stable=True)
    order = o1.gather(1, o2)  # ascending
    c_sorted = correct.double().gather(1, order)  # (P, N): rank k = position k
    out = []
    for n in ns:
        n = int(n)
        w = torch.tensor([math.comb(k, n - 1) for k in range(N)], dtype=torch.float64) / math.comb(N, n)
        out.append(float((c_sorted * w).sum(dim=1).mean()))
    return torch.tensor(out, dtype=torch.float64)


def pass_at_n(correct: torch.Tensor, ns: list[int]) -> torch.Tensor:
    """The oracle's best-of-``n``: ``P(at least one of n correct) = 1 - C(N - c, n) / C(N, n)`` per
    row, mean over rows (the unbiased pass@k of Chen et al. 2021), ``(len(ns),)`` float64."""
    _check_finite("correct", correct.float())
    if correct.dim() != 2:
        raise ValueError(f"correct must be (P, N), got shape {tuple(correct.shape)}")
    N = correct.shape[1]
    if not ns or any(not 1 <= int(n) <= N for n in ns):
        raise ValueError(f"every n must lie in [1, N={N}], got {list(ns)}")
    c = (correct > 0).sum(dim=1).tolist()
    return torch.tensor([sum(1 - math.comb(N - ci, int(n)) / math.comb(N, int(n)) for ci in c) / len(c)
                         for n in ns], dtype=torch.float64)


def bon_kl(n: int | torch.Tensor) -> torch.Tensor:
    """KL(best-of-n || base) = ``log n - (n - 1) / n`` nats (Stiennon et al. 2020; an upper bound
    that is exact for continuous scores without ties)."""
    n = torch.as_tensor(n, dtype=torch.float64)
    if bool((n < 1).any()):
        raise ValueError("n must be >= 1")
    return torch.log(n) - (n - 1) / n


def gao_rl(d: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Gao et al. (2022)'s form for RL: gold reward gain ``R(d) = d (alpha - beta log d)``,
    ``d = sqrt(KL(pi || pi_init))`` (``R(0) = 0``)."""
    d = torch.as_tensor(d, dtype=torch.float64)
    return torch.where(d > 0, d * (alpha - beta * torch.log(d.clamp(min=1e-300))), torch.zeros_like(d))


def gao_bon(d: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Gao et al. (2022)'s form for best-of-n: ``R(d) = d (alpha - beta d)``."""
    d = torch.as_tensor(d, dtype=torch.float64)
    return d * (alpha - beta * d)


def fit_gao(d: torch.Tensor, gain: torch.Tensor, form: str) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` of :func:`gao_rl` (``form="rl"``) or :func:`gao_bon`
    (``"bon"``) to measured points ``(d, gain)``, ``gain = R(d) - R(0)``. Both forms are linear in
    ``(alpha, beta)``, so the fit is one linear least-squares solve (no optimiser, no start
    values). Points with ``d = 0`` carry no information (both forms vanish there)."""
    d = torch.as_tensor(d, dtype=torch.float64).flatten()
    y = torch.as_tensor(gain, dtype=torch.float64).flatten()
    if form not in ("rl", "bon"):
        raise ValueError(f"form must be 'rl' or 'bon', got {form!r}")
    _check_finite("d", d)
    _check_finite("gain", y)
    _check_same_shape(d=d, gain=y)
    if bool((d < 0).any()):
        raise ValueError("d = sqrt(KL) must be >= 0")
    keep = d > 0
    if int(keep.sum()) < 2:
        raise ValueError("need at least two points with d > 0 to fit two parameters")
    d, y = d[keep], y[keep]
    second = -d * torch.log(d) if form == "rl" else -d * d
    A = torch.stack([d, second], dim=1)
    sol = torch.linalg.lstsq(A, y[:, None]).solution.flatten()
    return float(sol[0]), float(sol[1])


# ----------------------------------------------------------------------------------------
# Training a reward model
# ----------------------------------------------------------------------------------------
@dataclass
class RMConfig:
    """A reward-model run (``python -m rlbook_code.reward_models``). Each field's docstring is
    printed by ``--help``."""

    # --- run -----------------------------------------------------------------------------
    run_dir: Optional[str] = None
    """Run folder. None: ``runs/rm-<objective>-seed<seed>``."""
    overwrite: bool = False
    """Delete an existing run folder instead of refusing to start."""
    seed: int = 0
    """Seed of the data (prompts, samples, pairs, coin) and of the minibatch order."""
    device: str = "cpu"
    """Torch device."""
    num_threads: Optional[int] = None
    """``torch.set_num_threads`` for CPU runs; None leaves torch's default."""
    progress: bool = False
    """Print one line per evaluation (on stderr)."""

    # --- model and data ------------------------------------------------------------------
    model_name: Optional[str] = None
    """The policy whose samples are labelled (Hugging Face id or folder); None: the shipped model."""
    backbone: Optional[str] = None
    """The reward model's initial backbone (any causal LM); None: ``model_name``."""
    task: Optional[list] = None
    """Task mixture (as in TrainConfig); None: ``rewards.DEFAULT_TASK``."""
    objective: str = "bt"
    """``bt`` (Bradley–Terry on pairs), ``orm`` (correctness of each completion at its last token)
    or ``prm`` (correctness of each step, supervised up to the first wrong step; spell_backward)."""
    labels: str = "verifier"
    """Pairs for ``bt``: ``verifier`` (the completion with the higher verifier score is chosen) or
    ``latent`` (a Bradley–Terry coin on the verifier's partial credit, at ``latent_temperature``)."""
    latent_temperature: float = 0.1
    """Temperature of the Bradley–Terry coin of ``labels=latent``."""
    num_prompts: int = 256
    """Training prompts; each gets ``group_size`` samples of ``model_name``."""
    group_size: int = 8
    """Samples per prompt (pairs are formed within a prompt's samples)."""
    pairs_per_group: Optional[int] = 4
    """At most this many pairs per prompt (``bt``); None: every eligible pair."""
    max_new_tokens: int = 8
    """Longest sampled completion."""
    max_length: Optional[int] = None
    """Completions are truncated to this many tokens for the reward model (identical pairs after
    truncation are dropped and counted); None: no truncation."""
    temperature: float = 1.0
    """Sampling temperature of the data."""
    eval_prompts: int = 64
    """Held-out prompts (words never seen in training: ``TaskMixture.eval_items``) for the
    held-out pair accuracy / loss. Pairs never mix the two splits."""
    eval_seed: int = 1234
    """Seed of the held-out prompts."""

    # --- optimisation --------------------------------------------------------------------
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Prompts per step; the loss takes all their pairs (``bt``), completions (``orm``) or
    supervised steps (``prm``). Each prompt goes through the backbone once for its samples."""
    lr: float = 1e-3
    """AdamW learning rate of the backbone."""
    head_lr: Optional[float] = None
    """AdamW learning rate of the scalar head (it starts at zero); None: ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the gradient norm; None: no clipping."""
    margin: float = 0.0
    """Bradley–Terry margin ``m`` (``bt`` only)."""
    center_coef: float = 0.0
    """Centering coefficient (TRL's ``center_rewards_coefficient``; ``bt`` only)."""

    # --- evaluation, checkpoints ---------------------------------------------------------
    eval_every: int = 50
    """Held-out evaluation every this many steps (and at the end); 0: only at the end."""
    save_every: int = 0
    """Checkpoint every this many steps (and at the end); 0: only at the end."""

    def validate(self) -> None:
        """Fail fast, before any model loads (called by ``config.config_from_dict``)."""
        from rlbook_code.config import ConfigError

        for name, allowed in (("objective", OBJECTIVES), ("labels", PAIR_LABELS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        for name in ("num_prompts", "group_size", "max_new_tokens", "eval_prompts", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, received {getattr(self, name)}")
        if self.group_size < 2 and self.objective == "bt":
            raise ConfigError("objective='bt' forms pairs within a prompt's samples: group_size must be >= 2")
        for name in ("eval_every", "save_every", "weight_decay", "margin", "center_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, received {getattr(self, name)}")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a positive finite number, received {v}")
        if not self.latent_temperature > 0:
            raise ConfigError(f"latent_temperature must be > 0, received {self.latent_temperature}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, received {self.temperature}")
        if self.pairs_per_group is not None and self.pairs_per_group < 1:
            raise ConfigError(f"pairs_per_group must be >= 1 or None, received {self.pairs_per_group}")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1 or None, received {self.max_length}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None, received {self.max_grad_norm}")
        if self.objective != "bt" and (self.margin or self.center_coef):
            raise ConfigError("margin and center_coef belong to the Bradley-Terry loss (objective='bt')")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} but torch.cuda.is_available() is False")


@dataclass
class RMData:
    """The labelled data of a reward-model run, for one split."""

    batch: Any  # RolloutBatch of every sample
    verifier: torch.Tensor  # (N,) exact scores
    partial: torch.Tensor  # (N,) partial credit
    pairs: PairData | None  # bt
    step_labels: torch.Tensor | None  # (N, T) prm labels
    step_supervised: torch.Tensor | None  # (N, T)


def sample_data(cfg: RMConfig, policy, tokenizer, task, items: list, seed: int) -> RMData:
    """Sample ``group_size`` completions per item with ``policy`` and label them for ``cfg.objective``."""
    from rlbook_code import rollout

    batch = rollout.generate(policy, tokenizer, [task.prompt(it) for it in items], group_size=cfg.group_size,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                             share_prompt=True)
    batch = _truncate(batch, cfg.max_length)
    rep = [it for it in items for _ in range(cfg.group_size)]
    verifier = torch.tensor(task.score(batch.texts, rep, mode="exact"), dtype=torch.float32)
    partial = torch.tensor(task.score(batch.texts, rep, mode="partial"), dtype=torch.float32)
    pairs = labels = sup = None
    if cfg.objective == "bt":
        if cfg.labels == "verifier":
            pairs = verifier_pairs(batch, verifier, pairs_per_group=cfg.pairs_per_group, seed=seed)
        else:
            pairs = latent_pairs(batch, partial, temperature=cfg.latent_temperature,
                                 pairs_per_group=cfg.pairs_per_group, seed=seed)
        if len(pairs) == 0:
            raise ValueError("no preference pair could be formed (every group's scores agree); sample more "
                             "prompts or a larger group_size")
    elif cfg.objective == "prm":
        correct = letter_step_correct(batch.completion_ids, batch.completion_mask,
                                      spell_targets(tokenizer, [it["answer"] for it in rep]))
        labels, sup = prm_labels(correct, batch.completion_mask.cpu())
    return RMData(batch, verifier, partial, pairs, labels, sup)


def spell_targets(tokenizer, answers: list[str]) -> list[list[int]]:
    """Token targets ``tokens(answer) + [eos]`` for :func:`letter_step_correct`."""
    eos = tokenizer.eos_token_id
    return [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]


def _num_groups(data: RMData) -> int:
    return len(data.batch) // data.batch.group_size


def rm_loss(cfg: RMConfig, rm: RewardModel, data: RMData, groups: torch.Tensor
            ) -> tuple[torch.Tensor, dict[str, float], float]:
    """The loss of one minibatch of *prompts* (``groups``: indices of groups of ``G`` samples),
    its metrics, and its weight (pairs, completions or supervised steps).

    Each prompt goes through the backbone once for its ``G`` samples; ``bt`` then takes every
    pair of those groups, ``orm`` every completion, ``prm`` every supervised step."""
    G = data.batch.group_size
    groups = groups.sort().values
    rows = (groups[:, None] * G + torch.arange(G)).flatten()
    mb = data.batch.select(rows.tolist())  # whole groups, in order: group_size stays G
    s = rm.completion_scores(mb)  # (n, T)
    dev = s.device
    if cfg.objective == "bt":
        pairs = data.pairs
        local = torch.full((_num_groups(data),), -1, dtype=torch.long)
        local[groups] = torch.arange(len(groups))
        keep = local[pairs.chosen // G] >= 0
        if not bool(keep.any()):
            raise ValueError("no pair in this minibatch of prompts")
        c, r = pairs.chosen[keep], pairs.rejected[keep]
        c_loc, r_loc = local[c // G] * G + c % G, local[r // G] * G + r % G
        last = last_token_index(mb.completion_mask.to(dev))
        r_all = s[torch.arange(s.shape[0], device=dev), last]  # (n,)
        rc, rr = r_all[c_loc.to(dev)], r_all[r_loc.to(dev)]
        loss = bradley_terry_loss(rc, rr, margin=cfg.margin, center_coef=cfg.center_coef)
        m = {"loss": float(loss.detach()), "accuracy": pair_accuracy(rc, rr),
             "reward_mean": float(r_all.detach().mean()), "margin_mean": float((rc - rr).detach().mean())}
        return loss, m, float(len(c))
    if cfg.objective == "orm":
        last = last_token_index(mb.completion_mask.to(dev))
        logits = s[torch.arange(s.shape[0], device=dev), last]
        y = data.verifier[rows].to(dev)
        loss = orm_loss(logits, y)
        acc = float(((logits.detach() > 0).float() == y).float().mean())
        return loss, {"loss": float(loss.detach()), "accuracy": acc}, float(len(rows))
    lab, sup = data.step_labels[rows].to(dev), data.step_supervised[rows].to(dev)
    loss = prm_loss(s, lab, sup)
    acc = float(((s.detach() > 0).float() == lab)[sup].float().mean())
    return loss, {"loss": float(loss.detach()), "accuracy": acc}, float(sup.sum())


def _groups_with_signal(cfg: RMConfig, data: RMData) -> torch.Tensor:
    """The prompts a minibatch can draw: for ``bt``, those with at least one pair."""
    if cfg.objective == "bt":
        return torch.unique(data.pairs.chosen // data.batch.group_size)
    return torch.arange(_num_groups(data))


@torch.no_grad()
def evaluate_rm(cfg: RMConfig, rm: RewardModel, data: RMData, chunk: int = 32) -> dict[str, float]:
    """Held-out loss and accuracy over a whole split, weighted by pairs (``bt``), completions
    (``orm``) or supervised steps (``prm``); ``bt`` on latent pairs also reports the Bayes rate of
    the coin, ``mean(max(p, 1 - p))``: no model can beat it on average."""
    was = rm.training
    rm.eval()
    try:
        groups = _groups_with_signal(cfg, data)
        tot = {"loss": 0.0, "accuracy": 0.0}
        weight = 0.0
        for i in range(0, len(groups), chunk):
            _, m, w = rm_loss(cfg, rm, data, groups[i:i + chunk])
            for k in tot:
                tot[k] += m[k] * w
            weight += w
        out = {f"eval/{k}": v / weight for k, v in tot.items()}
        if cfg.objective == "bt" and cfg.labels == "latent":
            p = data.pairs.p_chosen
            out["eval/bayes_rate"] = float(torch.maximum(p, 1 - p).mean())
    finally:
        rm.train(was)
    return out


def _seed_for(cfg: RMConfig, step: int, salt: int = 0) -> int:
    return (cfg.seed * 1_000_003 + step * 9_973 + salt) % (2**31 - 1)


def build_data(cfg: RMConfig):
    """Load the sampling policy and the task, sample and label the train and held-out splits.
    Returns ``(tokenizer, train RMData, held-out RMData)``; the policy is freed."""
    from rlbook_code import models, rewards

    policy, tokenizer = models.load_policy(cfg.model_name, device=cfg.device, dtype=torch.float32)
    task = rewards.TaskMixture(cfg.task if cfg.task is not None else rewards.DEFAULT_TASK, seed=cfg.seed)
    train_items = task.sample(cfg.num_prompts)
    eval_items = task.eval_items(cfg.eval_prompts, seed=cfg.eval_seed)
    train_data = sample_data(cfg, policy, tokenizer, task, train_items, seed=_seed_for(cfg, 0, salt=1))
    eval_data = sample_data(cfg, policy, tokenizer, task, eval_items, seed=_seed_for(cfg, 0, salt=2))
    del policy
    return tokenizer, train_data, eval_data


def train_reward_model(cfg: RMConfig, resume: str | os.PathLike | None = None,
                       data: tuple | None = None) -> Path:
    """Sample and label data with ``cfg.model_name``, train a :class:`RewardModel` from
    ``cfg.backbone``, evaluate it on held-out prompts, and save it to ``<run_dir>/final``.

    ``data``: ``(tokenizer, train, held_out)`` from :func:`build_data`, to train several reward
    models on the same samples without sampling again. ``resume``: a run folder with a
    checkpoint; training continues from its step bit for bit (the data is re-sampled from
    the same seeds). Returns the run folder."""
    from rlbook_code import checkpoint as ckpt
    from rlbook_code.config import save_config

    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"rm-{cfg.objective}-seed{cfg.seed}"
    run_dir = ckpt.prepare_run_dir(run_dir if resume is None else resume, resume=resume is not None,
                                   overwrite=cfg.overwrite)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer, train_data, eval_data = data if data is not None else build_data(cfg)
    torch.manual_seed(cfg.seed)
    rm, _ = RewardModel.from_policy(cfg.backbone or cfg.model_name, kind=cfg.objective, device=cfg.device)
    params = [p for p in rm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in rm.backbone.parameters() if p.requires_grad], "lr": cfg.lr},
                             {"params": list(rm.head.parameters()), "lr": cfg.head_lr or cfg.lr}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = 0
    if resume is not None:
        blob = ckpt.load_checkpoint(run_dir / "checkpoint", policy=rm, optimizer=opt, scheduler=sched,
                                    map_location=cfg.device)
        step = blob["step"]
        ckpt.set_rng_state(blob["rng"])
        ckpt.truncate_metrics(run_dir, step)
    pool = _groups_with_signal(cfg, train_data)
    if step == 0:
        n = len(train_data.pairs) if cfg.objective == "bt" else len(train_data.batch)
        rec = {"step": 0, "train_pairs" if cfg.objective == "bt" else "train_rows": float(n),
               "train_prompts": float(len(pool)), **evaluate_rm(cfg, rm, eval_data)}
        if cfg.objective == "bt":
            rec["identical_dropped"] = float(train_data.pairs.num_identical + eval_data.pairs.num_identical)
        ckpt.append_metrics(run_dir, rec)
    rm.train()
    t0 = time.perf_counter()
    while step < cfg.steps:
        step += 1
        g = torch.Generator().manual_seed(_seed_for(cfg, step, salt=3))
        groups = pool[torch.randperm(len(pool), generator=g)[: cfg.batch_size]]
        opt.zero_grad(set_to_none=True)
        loss, m, _ = rm_loss(cfg, rm, train_data, groups)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"step {step}: reward-model loss is {float(loss)}")
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
        opt.step()
        sched.step()
        rec = {"step": step, **m, "grad_norm": gn, "step_s": (time.perf_counter() - t0) / step}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            rec.update(evaluate_rm(cfg, rm, eval_data))
            if cfg.progress:
                print(f"rm @ step {step}: held-out loss {rec['eval/loss']:.3f}, "
                      f"accuracy {rec['eval/accuracy']:.3f}", file=sys.stderr)
        ckpt.append_metrics(run_dir, rec)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            ckpt.save_checkpoint(run_dir, step=step, policy=rm, optimizer=opt, scheduler=sched, config=cfg)
    rm.save_pretrained(run_dir / "final", tokenizer)
    return run_dir


# ----------------------------------------------------------------------------------------
# The policy trainer's hook: a learned (or shaped) reward
# ----------------------------------------------------------------------------------------
class LearnedReward:
    """What ``train.collect_rollouts`` calls instead of trusting the verifier
    (``reward: reward_model``, or a ``reward_length_bonus``): the *proxy* the policy optimises.

    ``proxy = RewardModel.reward(batch)`` (or the verifier's score, for ``reward: verifier``)
    ``+ reward_length_bonus * response length in tokens``. The verifier keeps being measured on
    the same completions and logged as the gold score, with the distance from the initial policy:

    * ``gold_accuracy``: share of the batch the verifier scores exact;
    * ``proxy_reward``: mean proxy reward of the batch;
    * ``kl_init``: sequence-level KL(pi || pi_init) in nats, ``mean_i sum_t (log pi - log pi_init)``
      on the batch sampled from pi (k1, unbiased), from the sampler's log-probs and one no-grad
      pass of a frozen copy of the initial policy (the reference model when ``beta > 0``).
    """

    def __init__(self, cfg, policy, ref=None):
        self.cfg = cfg
        self.rm = None
        if cfg.reward == "reward_model":
            self.rm = RewardModel.from_pretrained(cfg.reward_model_path, device=cfg.device)
            self.rm.requires_grad_(False)
        self.init = ref if ref is not None else copy.deepcopy(policy).eval()
        self.init.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, state, batch, items: list, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        from rlbook_code import rollout

        cfg = self.cfg
        gold = scores if cfg.reward_mode == "exact" else torch.tensor(
            state.task.score(batch.texts, items, mode="exact"), dtype=torch.float32)
        proxy = self.rm.reward(batch) if self.rm is not None else scores.clone()
        lengths = batch.completion_mask.sum(1).float().cpu()
        if cfg.reward_length_bonus:
            proxy = proxy + cfg.reward_length_bonus * lengths
        init_logp = rollout.completion_logprobs(self.init, batch, temperature=cfg.temperature,
                                                share_prompt=cfg.share_prompt).logprobs.float()
        mask = batch.completion_mask.to(init_logp.device)
        kl = torch.where(mask, batch.logprobs.to(init_logp.device) - init_logp, 0.0).sum(1)  # (N,)
        stats = {"gold_accuracy": float((gold >= 1.0).float().mean()), "proxy_reward": float(proxy.mean()),
                 "kl_init": float(kl.mean())}
        return proxy.float(), stats


def make_learned_reward(cfg, policy, ref=None) -> LearnedReward | None:
    """A :class:`LearnedReward` when the config asks for a proxy reward, else None (the
    verifier alone: the trainer's runs are then unchanged)."""
    if getattr(cfg, "reward", "verifier") == "verifier" and not getattr(cfg, "reward_length_bonus", 0.0):
        return None
    return LearnedReward(cfg, policy, ref)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Train a reward model (``config.run_cli``): a bad config prints one line and returns 2; a failed run returns 1."""
    from rlbook_code.config import run_cli

    return run_cli(argv, prog="python -m rlbook_code.reward_models", description="Train a reward model (chapter 13).",
                   cls=RMConfig, train_fn=train_reward_model, config_hint="configs/rm/*.yaml")


if __name__ == "__main__":
    sys.exit(main())
