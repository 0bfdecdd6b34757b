"""Sampling groups of completions and re-scoring them.

Layout: ``N = num_prompts * G`` rows; the ``G`` samples of a prompt are contiguous.
Prompts are left-padded (so every completion starts at the same column ``P``), and
completions are right-padded after their first EOS.

* :func:`generate` samples with ``model.generate`` (KV cache) and records the
  sampler's per-token log-probs.
* :func:`completion_logprobs` runs one differentiable forward pass over prompt +
  completion with explicit ``position_ids`` and returns the log-prob of every
  completion token; on the sampler's own tokens it reproduces the sampler's
  log-probs (to ~1e-6 in float32) when ``top_p=1``.

Both take ``share_prompt``: the ``G`` rows of a group share one prompt, so the prompt
(all but its last token) can go through the model once per *group* and its key/value
cache be repeated ``G`` times (:func:`shared_prompt_cache`). The result is the same
function of the weights (same values to float rounding, same gradients: the backward
pass of the repeat sums the ``G`` rows' gradients into the one prompt computation);
only the cost changes, from ``N (P + T)`` token positions to ``N/G (P - 1) + N T``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = [
    "RolloutBatch",
    "CompletionScores",
    "chat_prompts",
    "generate",
    "completion_logprobs",
    "completion_mask_from_eos",
    "eos_token_ids",
    "truncated_rows",
    "position_ids_from_mask",
    "shared_prompt_cache",
    "concat_batches",
    "pad_token_id",
]

try:  # the package's own implementation (chapter 02)
    from rlbook_code.logprobs import entropy_from_logits as _entropy, token_logprobs as _token_logprobs
except ImportError:  # pragma: no cover - only while the package is being assembled

    def _token_logprobs(logits, tokens, temperature=1.0, chunk_size=None):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _entropy(logits, temperature=1.0, chunk_size=None):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1)


@dataclass
class RolloutBatch:
    """A batch of sampled completions; ``N`` rows, groups of ``group_size`` contiguous.

    Attributes:
        prompts: ``N`` user messages (each repeated ``group_size`` times).
        texts: ``N`` decoded completions, cut before the first EOS, special tokens skipped.
        prompt_ids: ``(N, P)`` long, left-padded chat-formatted prompts.
        prompt_mask: ``(N, P)`` bool, True on real prompt tokens.
        completion_ids: ``(N, T)`` long; positions after the first EOS hold the pad id.
        completion_mask: ``(N, T)`` bool, True on tokens up to *and including* the first
            EOS (the model is trained to emit EOS); all True for a row that hit
            ``max_new_tokens`` without EOS.
        logprobs: ``(N, T)`` float32, log-prob of each sampled token under the sampling
            distribution (after temperature / top-p), 0 where the mask is False.
        group_size: ``G``.
    """

    prompts: list[str]
    texts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    group_size: int

    @property
    def input_ids(self) -> torch.Tensor:
        """``(N, P + T)`` prompt then completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(N, P + T)`` bool: real prompt tokens and completion tokens up to the first EOS."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) // self.group_size

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: torch.Tensor | list[int]) -> "RolloutBatch":
        """Rows ``idx`` (e.g. a minibatch) as a new batch.

        ``group_size`` is kept when ``idx`` is a sequence of whole groups (each block of
        ``G`` indices is one complete group in order); otherwise it becomes 1.
        """
        idx_t = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        n = len(self)
        if idx_t.numel() and (idx_t.min() < -n or idx_t.max() >= n):
            raise ValueError(f"indices must lie in [0, {n}), got min {int(idx_t.min())} max {int(idx_t.max())}")
        idx_list = idx_t.tolist()
        g = self.group_size
        whole_groups = len(idx_list) % g == 0 and all(
            idx_list[k] % g == 0 and idx_list[k : k + g] == list(range(idx_list[k], idx_list[k] + g))
            for k in range(0, len(idx_list), g)
        )
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx_t.to(v.device)]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx_list]
        out["group_size"] = g if whole_groups else 1
        return RolloutBatch(**out)

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The same batch with its tensors on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        return RolloutBatch(**kw)


@dataclass
class CompletionScores:
    """Output of :func:`completion_logprobs` (``N`` rows, ``T`` completion tokens).

    Attributes:
        logprobs: ``(N, T)`` float32, differentiable; 0 where the completion mask is False.
        entropy: ``(N, T)`` float32 entropy of the next-token distribution, or ``None``.
        hidden: ``(N, T, H)`` final hidden state at the position that *predicts*
            completion token ``t`` (input to a value head), or ``None``.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def eos_token_ids(model, tokenizer) -> list[int]:
    """All ids that end a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids: list[int] = []
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if v is None:
            continue
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation_config names none")
    return ids


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Format user messages with the tokenizer's chat template (generation prompt added).

    ``enable_thinking=False`` is passed to the template: Qwen3 templates then skip the
    thinking block; templates that do not use the variable ignore it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; load a chat/instruct model or set one")
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for p in prompts
    ]


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """``(N, T)`` bool: True up to and including the first EOS of each row (all True if none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # number of EOS strictly before position t; keep positions with none before them
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0


def truncated_rows(batch: "RolloutBatch", eos_ids: list[int]) -> torch.Tensor:
    """``(N,)`` bool: True for a completion cut at ``max_new_tokens`` without an EOS.

    Such a completion never reached its final answer: ``rewards.extract_answer`` then takes
    its last line, which is a fragment (chapter 15). ``eos_ids`` as from :func:`eos_token_ids`.
    """
    mask = batch.completion_mask
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.bool)
    last = batch.completion_ids[:, -1]
    ends_eos = torch.isin(last, torch.as_tensor(eos_ids, dtype=last.dtype, device=last.device))
    return mask.all(dim=1) & ~ends_eos


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` positions counting only attended tokens (0 at the first real token).

    Matches what ``model.generate`` uses with left padding; padded positions get 0.
    """
    pos = attention_mask.long().cumsum(dim=1) - 1
    return pos.clamp(min=0)


def _can_share_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int) -> bool:
    """True when rows come in groups of ``group_size`` identical prompts with >= 2 columns and
    at least one real token before the last column (else the plain forward pass is used)."""
    N, P = prompt_ids.shape
    if group_size < 2 or P < 2 or N % group_size:
        return False
    ids = prompt_ids.view(-1, group_size, P)
    if not bool((ids == ids[:, :1]).all()):
        return False
    return bool(prompt_mask[::group_size, : P - 1].any(dim=1).all())


def shared_prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
    """Key/value cache of every prompt's first ``P - 1`` columns, computed once per group.

    Args:
        prompt_ids: ``(N, P)`` left-padded prompts, ``group_size`` identical rows in a row.
        prompt_mask: ``(N, P)`` bool.
        group_size: ``G``.

    Returns:
        A transformers ``DynamicCache`` holding ``N`` rows (each group's row repeated ``G``
        times) of length ``P - 1``. Differentiable when called with gradients enabled: the
        cached keys and values are ordinary tensors of the autograd graph.
    """
    first = prompt_ids[::group_size, : prompt_ids.shape[1] - 1]  # (N/G, P-1)
    first_mask = prompt_mask[::group_size, : prompt_ids.shape[1] - 1]
    out = model(input_ids=first, attention_mask=first_mask.long(),
                position_ids=position_ids_from_mask(first_mask), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(group_size)
    return cache


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    share_prompt: bool = False,
) -> RolloutBatch:
    """Sample ``group_size`` completions for each prompt.

    Args:
        prompts: user messages; the tokenizer's chat template is applied here.
        group_size: ``G`` samples per prompt, laid out contiguously.
        max_new_tokens: completion length cap ``T_max``.
        temperature: 0 means greedy decoding; otherwise sampling at this temperature.
        top_p: nucleus threshold (1.0 = off). ``top_k=0`` is always passed, and the
            model's own ``generation_config`` (Qwen3 ships top_k=20, top_p=0.95,
            temperature=0.6; others a repetition penalty) is ignored during the call, so
            nothing silently changes the sampling distribution.
        seed: seeds the sampler (the global torch RNG state is restored afterwards).
        share_prompt: prefill each prompt once and repeat its cache ``group_size`` times
            (:func:`shared_prompt_cache`) instead of prefilling all ``N`` identical copies.
            Same distribution and the same random draws; the logits may differ from the
            unshared call by float rounding, so a sample that sits on a rounding boundary
            can differ.

    Returns:
        A :class:`RolloutBatch` with ``N = len(prompts) * group_size`` rows.
    """
    from transformers import GenerationConfig

    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not (0.0 < top_p <= 1.0):
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]

    texts_in = chat_prompts(tokenizer, prompts)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts_in, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0).to(device)  # (N, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0).to(device).bool()  # (N, P)

    greedy = temperature == 0
    gen_config = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else float(temperature),
        top_p=None if greedy else float(top_p),
        top_k=None if greedy else 0,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
        use_cache=True,
    )
    # transformers fills every field left unset (None) from model.generation_config, e.g. a
    # repetition_penalty or min_p shipped with a checkpoint. Swap in a neutral one for the call
    # so that the sampling distribution is exactly softmax(logits / temperature) (+ top_p).
    saved_config = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved_config.bos_token_id, eos_token_id=eos_ids, pad_token_id=pad_id
    )
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            extra = {}
            if share_prompt and _can_share_prompt(prompt_ids, prompt_mask, group_size):
                extra["past_key_values"] = shared_prompt_cache(model, prompt_ids, prompt_mask, group_size)
            out = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask.long(), generation_config=gen_config, **extra
            )
    finally:
        model.generation_config = saved_config
    P = prompt_ids.shape[1]
    completion_ids = out.sequences[:, P:]  # (N, T)
    completion_mask = completion_mask_from_eos(completion_ids, eos_ids)  # (N, T)
    completion_ids = completion_ids.masked_fill(~completion_mask, pad_id)
    # processed scores: logits after the sampler's warpers (temperature, top-p)
    scores = torch.stack(out.scores, dim=1)  # (N, T, V)
    logprobs = torch.log_softmax(scores.float(), dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    logprobs = logprobs.masked_fill(~completion_mask, 0.0)  # (N, T)

    texts = []
    for row, m in zip(completion_ids, completion_mask):
        toks = row[m].tolist()
        if toks and toks[-1] in eos_ids:
            toks = toks[:-1]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True))
    return RolloutBatch(
        prompts=[p for p in prompts for _ in range(group_size)],
        texts=texts,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logprobs,
        group_size=group_size,
    )


def completion_logprobs(
    model,
    batch: RolloutBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_hidden: bool = False,
    share_prompt: bool = False,
    entropy_grad: bool = True,
) -> CompletionScores:
    """Log-probs of the batch's completion tokens under ``model`` (differentiable).

    One forward pass over ``batch.input_ids`` with ``position_ids`` computed from the
    attention mask (as ``generate`` does with left padding). Logits at position
    ``P - 1 + t`` score completion token ``t``. Log-probs (and entropy) are
    computed from ``logits / temperature`` in float32; no top-p truncation, so they
    equal the sampler's log-probs only for ``top_p=1``.

    With ``share_prompt`` (and a batch of whole groups, ``batch.group_size > 1``) the first
    ``P - 1`` prompt columns go through the model once per group (:func:`shared_prompt_cache`)
    and a second pass runs the last prompt token and the completion on top of the repeated
    cache: the same log-probs and gradients, for about ``1/G`` of the prompt's cost.

    ``entropy_grad=False`` computes the entropy from detached logits: a metric only, and no
    ``(N, T, V)`` log-softmax is kept for a backward pass that will never use it.

    Returns:
        :class:`CompletionScores` with ``logprobs (N, T)``, optionally ``entropy (N, T)``
        and ``hidden (N, T, H)``; values are 0 where ``batch.completion_mask`` is False.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for scoring, got {temperature}")
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)  # (N, P+T)
    attn = batch.attention_mask.to(device)  # (N, P+T)
    mask = batch.completion_mask.to(device)  # (N, T)
    P = batch.prompt_ids.shape[1]
    T = batch.completion_ids.shape[1]
    if T == 0:
        raise ValueError("batch has no completion tokens (T == 0)")
    pos = position_ids_from_mask(attn)  # (N, P+T)
    prompt_ids = batch.prompt_ids.to(device)
    prompt_mask = batch.prompt_mask.to(device)
    # Under gradient checkpointing in training mode transformers drops the cache (a recomputed
    # layer would write it twice), so the shared pass would silently lose the prompt: full pass.
    name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    checkpointing = model.training and bool(getattr(model, name, False))
    if share_prompt and not checkpointing and _can_share_prompt(prompt_ids, prompt_mask, batch.group_size):
        cache = shared_prompt_cache(model, prompt_ids, prompt_mask, batch.group_size)
        out = model(  # positions P-1 .. P+T-2 on top of the cached 0 .. P-2
            input_ids=input_ids[:, P - 1 : P + T - 1],
            attention_mask=attn[:, : P + T - 1].long(),
            position_ids=pos[:, P - 1 : P + T - 1],
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=with_hidden,
        )
        last_hidden = out.hidden_states[-1] if with_hidden else None  # (N, T, H)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attn.long(),
            position_ids=pos,
            use_cache=False,
            output_hidden_states=with_hidden,
            logits_to_keep=T + 1,
        )
        last_hidden = out.hidden_states[-1][:, P - 1 : P + T - 1] if with_hidden else None  # (N, T, H)
    logits = out.logits[:, :T]  # (N, T, V): positions P-1 .. P+T-2 predict completion tokens 0 .. T-1
    tokens = batch.completion_ids.to(device)
    logp = _token_logprobs(logits, tokens, temperature=temperature).masked_fill(~mask, 0.0)
    ent = None
    if with_entropy:
        ent = _entropy(logits if entropy_grad else logits.detach(), temperature=temperature).masked_fill(~mask, 0.0)
    hidden = None
    if with_hidden:
        hidden = last_hidden.masked_fill(~mask.unsqueeze(-1), 0.0)
    return CompletionScores(logprobs=logp, entropy=ent, hidden=hidden)


def _pad_to(x: torch.Tensor, width: int, value: Any, left: bool) -> torch.Tensor:
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = x.new_full((x.shape[0], extra) + tuple(x.shape[2:]), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)



def concat_batches(batches: list, pad_token_id: int):
    """Concatenate :class:`RolloutBatch` objects from several ``generate`` calls
    (prompts re-padded on the left, completions on the right)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    out = {}
    for f in fields(first):
        vals = [getattr(b, f.name) for b in batches]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor) and v0.dim() >= 2:
            width = max(v.shape[1] for v in vals)
            left = f.name.startswith("prompt")
            fill = False if v0.dtype == torch.bool else (pad_token_id if not v0.is_floating_point() else 0.0)
            out[f.name] = torch.cat([_pad_to(v, width, fill, left) for v in vals], dim=0)
        elif isinstance(v0, torch.Tensor):
            out[f.name] = torch.cat(vals, dim=0)
        elif isinstance(v0, list):
            out[f.name] = [x for v in vals for x in v]
        else:
            out[f.name] = v0
    return type(first)(**out)


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, or 0 where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
