"""Loading a policy: the shipped tiny model or any Hugging Face causal LM.

The shipped model (``DEFAULT_MODEL``) is a folder written by ``save_pretrained``
and loaded through the same ``AutoModelForCausalLM`` / ``AutoTokenizer`` path as
``Qwen/Qwen3-0.6B``, so changing the model name is the only change a chapter needs
to run on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "load_policy", "default_device", "default_dtype", "autocast",
           "enable_gradient_checkpointing"]

DEFAULT_MODEL: str = str(Path(__file__).resolve().parent / "assets" / "tiny-qwen3-spell")
"""Path of the shipped model folder (a 0.8M-parameter Qwen3 trained on ``spell_backward``)."""


class ModelLoadError(OSError):
    """A model id or folder could not be loaded (typically: not downloaded, and offline)."""


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on a CUDA GPU that supports it, float32 otherwise (CPU bf16 is slow and lossy)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device | str, enabled: bool):
    """``torch.autocast(bfloat16)`` on ``device``'s type when ``enabled`` (mixed precision: the
    parameters stay in their dtype, the matmuls run in bf16), else a no-op context."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass and switch the KV cache off (it cannot be
    used under checkpointing; ``rollout.completion_logprobs`` then scores full rows)."""
    # transformers 5 renamed it (the old name still works, with a FutureWarning)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
        return value
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, a name, or None; got {dtype!r}")
    return dtype


def load_policy(
    name_or_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Load a causal LM and its tokenizer, ready for sampling.

    Args:
        name_or_path: a local folder or a Hugging Face id (e.g. ``"Qwen/Qwen3-0.6B"``);
            ``None`` means :data:`DEFAULT_MODEL`.
        device: defaults to ``cuda`` if available, else ``cpu``.
        dtype: defaults to bfloat16 on a CUDA GPU, float32 on CPU.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer
        pads on the left and has a pad token (the EOS token if it had none).

    Raises:
        ModelLoadError: the id is neither a local folder nor in the local Hugging Face
            cache and cannot be downloaded (no network, or ``HF_HUB_OFFLINE=1``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    device = torch.device(device) if device is not None else default_device()
    dtype = _resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ModelLoadError(
            f"Could not load model {name!r}: it is not a local model folder"
            f"{' and HF_HUB_OFFLINE=1 forbids downloading it' if offline else ' and it could not be downloaded'}"
            ". Download it once on a machine with internet access "
            f"(`hf download {name}`), or pass the path of a folder written by "
            f"`save_pretrained`. (Underlying error: {type(err).__name__}: {first_line})"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
