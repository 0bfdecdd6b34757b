"""Fixtures shared by the trainer, sweep and chapter-module tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random Qwen3 (hidden 32, 2 layers) with the shipped character tokenizer, saved with
    ``save_pretrained``: loads in well under a second, so trainer tests run in seconds."""
    from rlbook_code.pretrain import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                        intermediate_size=64, seed=0)
    path = tmp_path_factory.mktemp("tiny") / "tiny-qwen3"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
