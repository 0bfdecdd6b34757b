"""LoRA adapters on a causal LM, and the reference policy they give for free (chapter 15).

LoRA (Hu et al., 2021) freezes every weight ``W`` of a target linear layer and learns a
low-rank update::

    h = W x + (alpha / r) * B A x,       A: (r, d_in), B: (d_out, r), B = 0 at the start,

so at step 0 the adapted model *is* the base model, and only ``r (d_in + d_out)`` numbers per
layer are trained (and need gradients and AdamW states). The adapters are peft's LoRA layers,
injected in place through transformers' own PEFT integration (``model.add_adapter``): the
model stays the same ``*ForCausalLM`` object, so ``rollout.generate``,
``rollout.completion_logprobs``, the value head and ``share_prompt`` work on it unchanged.

The reference policy of a KL penalty is the initial policy. With LoRA the initial policy is
the base model, which is still in memory: switching the adapters off gives it back, exactly
(a disabled LoRA layer returns ``W x`` alone). :class:`DisabledAdapters` is that view, so a
LoRA run with ``beta > 0`` holds one copy of the weights, not two (TRL does the same).

What a run folder holds: ``checkpoint/state.pt`` has the full state dict (frozen base weights
and adapters; a resumed run continues bit for bit), ``final/`` the *merged* model
(:func:`merged_model`, ``W + (alpha / r) B A``) in plain Hugging Face format, which
``models.load_policy`` loads like every other model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["add_lora", "has_lora", "lora_parameters", "adapters_disabled", "DisabledAdapters", "merged_model",
           "count_parameters"]


def add_lora(model, rank: int, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: list[str] | None = None) -> Any:
    """Add LoRA adapters of rank ``rank`` to ``model`` in place and freeze everything else.

    Args:
        model: a transformers causal LM (``PreTrainedModel``).
        rank: ``r >= 1``.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapters' input, in training mode.
        target_modules: names of the linear layers to adapt (default: every attention and
            MLP projection of Llama / Qwen, ``q_proj ... down_proj``).

    Returns:
        ``model`` (same object), with only the adapters' ``A`` and ``B`` requiring gradients.
        The adapters are float32 whatever the base's dtype: on a bfloat16 base (``dtype:
        bfloat16``) the frozen weights take 2 bytes each and are never updated, so the rounding
        pitfall of bfloat16 master weights (``book/gpu.md``) does not apply, while the trained
        ``A`` and ``B`` and their AdamW moments stay float32. peft casts each adapter's input to
        float32 and its output back to the base layer's dtype.

    Raises:
        ValueError: bad rank, alpha or dropout, a model that already has adapters, or no
            module of ``model`` matches ``target_modules``.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if has_lora(model):
        raise ValueError("model already has LoRA adapters")
    targets = list(target_modules) if target_modules is not None else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    present = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    if not set(targets) & present:
        raise ValueError(f"no linear layer of the model is named one of {targets}; its linear layers are "
                         f"named {sorted(present)}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    model.requires_grad_(False)
    model.add_adapter(config)
    for p in lora_parameters(model):
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()  # float32 adapters on a bfloat16/float16 base (peft's autocast_adapter_dtype)
        p.requires_grad_(True)
    return model


def has_lora(model) -> bool:
    """Whether ``model`` carries peft adapter layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_parameters(model) -> list[torch.nn.Parameter]:
    """The adapters' parameters (``lora_A`` / ``lora_B`` of every adapted layer)."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (tied weights counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[Any]:
    """Inside the block ``model`` computes its base model: every adapter switched off, and
    eval mode (no dropout). Both are restored on exit, also after an exception."""
    if not has_lora(model):
        raise ValueError("adapters_disabled needs a model with LoRA adapters (lora.add_lora)")
    was_training = model.training
    model.eval()
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()
        model.train(was_training)


class DisabledAdapters:
    """The frozen reference policy of a LoRA run: ``policy`` with its adapters disabled.

    Calls (``ref(...)``, ``ref.generate(...)``) run inside :func:`adapters_disabled`, so they
    return the base model's outputs exactly; attribute reads (``config``, ``parameters``,
    ``generation_config``, ``get_input_embeddings``, ...) are the policy's. No weights are
    copied. ``eval()`` and ``requires_grad_()`` leave the policy alone (its base weights are
    already frozen, and each call is made in eval mode)."""

    def __init__(self, policy) -> None:
        if not has_lora(policy):
            raise ValueError("DisabledAdapters needs a policy with LoRA adapters (lora.add_lora)")
        object.__setattr__(self, "policy", policy)

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self.policy.generate(*args, **kwargs)

    @property
    def training(self) -> bool:
        return False

    def eval(self) -> "DisabledAdapters":
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "DisabledAdapters":
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def __setattr__(self, name: str, value: Any) -> None:  # e.g. rollout.generate swaps generation_config
        setattr(self.policy, name, value)


@torch.no_grad()
def merged_model(model) -> Any:
    """A new plain model (no adapters) whose weights are ``W + (alpha / r) B A`` for every
    adapted layer, in ``model``'s dtype and device: what ``final/`` of a LoRA run saves.

    ``model`` is left unchanged (its adapters are not merged in place)."""
    from transformers import AutoModelForCausalLM

    if not has_lora(model):
        raise ValueError("merged_model needs a model with LoRA adapters (lora.add_lora)")
    from peft.tuners.lora import LoraLayer

    state = {}
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter)
                deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = value + deltas[key] if key in deltas else value
    config = model.config.__class__.from_dict(model.config.to_dict())
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(state, strict=True)
    plain.generation_config = model.generation_config
    plain.to(next(model.parameters()).device)
    return plain.eval()
