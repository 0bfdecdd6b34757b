"""Tests of rlbook_code.models.load_policy and the character tokenizer of rlbook_code.pretrain."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from rlbook_code.models import DEFAULT_MODEL, ModelLoadError, default_dtype, load_policy
from rlbook_code.pretrain import CHAT_TEMPLATE, build_model, build_tokenizer

torch.set_num_threads(1)  # tiny models gain nothing from a 2nd thread; under load it loses a lot


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)
    path = tmp_path_factory.mktemp("tiny") / "tiny-qwen3"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_char_tokenizer_roundtrip():
    tok = build_tokenizer()
    assert len(tok) == 100
    text = "Spell this word backward (example: sun -> nus): neon\n  x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text  # Fuse decoder: no spaces inserted
    # special tokens are single tokens; unknown characters map to <unk>
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "abc"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template == CHAT_TEMPLATE


def test_load_policy_local_folder(tiny_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading must be warning-free (notebooks show warnings)
        model, tok = load_policy(tiny_dir, device="cpu")
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_load_policy_dtype_and_pad_fallback(tiny_dir, tmp_path):
    model, _ = load_policy(tiny_dir, device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_policy(tiny_dir, device="cpu", dtype="float99")
    # a tokenizer without a pad token gets its EOS token as pad
    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    build_model(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64).save_pretrained(tmp_path)
    _, tok2 = load_policy(tmp_path, device="cpu")
    assert tok2.pad_token == tok2.eos_token == "<|im_end|>"


def test_default_dtype():
    assert default_dtype("cpu") == torch.float32


def test_default_model_path():
    assert DEFAULT_MODEL.endswith(os.path.join("assets", "tiny-qwen3-spell"))
    assert os.path.isabs(DEFAULT_MODEL)


def test_missing_model_offline_gives_clear_error(tmp_path):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: use a fresh interpreter
    code = (
        "from rlbook_code.models import load_policy, ModelLoadError\n"
        "try:\n    load_policy('no-such-org/no-such-model-xyz')\n"
        "except ModelLoadError as e:\n    print('OK', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.startswith("OK"), out.stderr[-2000:]
    assert "no-such-org/no-such-model-xyz" in out.stdout and "HF_HUB_OFFLINE=1" in out.stdout
    assert "Traceback" not in out.stdout


def test_missing_local_folder_error(tmp_path):
    with pytest.raises(ModelLoadError, match="Could not load model"):
        load_policy(str(tmp_path / "does-not-exist"), device="cpu")
