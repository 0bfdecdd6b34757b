"""One GRPO step of the book's trainer on a Qwen3-0.6B-shaped model, on a CUDA GPU.

    python bench/gpu.py                       # the book's defaults for Qwen3-0.6B (book/gpu.md)
    python bench/gpu.py --prompts-per-step 16 --group-size 8 --max-new-tokens 512
    python bench/gpu.py --smoke               # CPU: a shrunken model, only checks the script runs

No download: the model is ``Qwen3ForCausalLM(Qwen3Config(...))`` with the real 0.6B
dimensions (28 layers, hidden 1024, 16 query / 8 KV heads of dim 128, MLP 3072, vocabulary
151,936, tied embeddings) and random weights, saved with a character tokenizer whose
vocabulary is padded to the same 151,936 ids, so that ``rlbook_code.train`` loads it through
its ordinary ``model_name`` path. Random weights are fine for speed and memory, with two
consequences: a random model almost never samples EOS, so every completion runs to
``max_new_tokens`` (the worst case for memory and time); and every reward is 0, so the
advantages are 0 (the loss, backward pass and optimizer step still run in full).

The step is ``rlbook_code.train.train_step``, the same function the chapters and the CLI run:
rollouts (``rollout.generate``), old log-probs and entropy, group advantages, the clipped
loss, backward, AdamW. ``--steps`` steps are run and the last one is reported (the first
pays CUDA and kernel warm-up): peak GPU memory (``torch.cuda.max_memory_allocated`` over that
step), rollout tokens/s (completion tokens / generation seconds), update seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent

# Qwen/Qwen3-0.6B's config.json (the dimensions that matter for memory and speed).
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)
SMOKE = dict(QWEN3_0_6B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=4096)

# The book's settings for Qwen3-0.6B on one 24 GB GPU (book/gpu.md; keep the two in step).
DEFAULTS = dict(prompts_per_step=16, group_size=8, max_new_tokens=256, micro_batch_size=8,
                generation_batch_size=2, gradient_checkpointing=True, dtype="float32",
                autocast_bf16=True, answer_format="tags", lr=1e-6, beta=0.0)


def build_model_folder(folder: Path, dims: dict, seed: int = 0) -> int:
    """Save a random-weight Qwen3 model and a tokenizer with ``dims['vocab_size']`` ids."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from rlbook_code.pretrain import CHAT_TEMPLATE, SPECIAL_TOKENS

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    for i in range(len(vocab), dims["vocab_size"]):  # filler ids: never produced by the char pre-split
        vocab[f"<|x{i}|>"] = i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<unk>", padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(**dims, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return n_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default=str(REPO / "configs" / "grpo.yaml"))
    ap.add_argument("--prompts-per-step", type=int, default=DEFAULTS["prompts_per_step"])
    ap.add_argument("--group-size", type=int, default=DEFAULTS["group_size"])
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    ap.add_argument("--micro-batch-size", type=int, default=DEFAULTS["micro_batch_size"])
    ap.add_argument("--generation-batch-size", type=int, default=DEFAULTS["generation_batch_size"],
                    help="prompts per generate call")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--dtype", default=DEFAULTS["dtype"], choices=["bfloat16", "float32", "float16"],
                    help="parameter dtype (default float32, with bf16 autocast for the forward passes)")
    ap.add_argument("--no-autocast", action="store_true", help="no bf16 autocast")
    ap.add_argument("--steps", type=int, default=2, help="steps to run; the last is reported (default 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
    ap.add_argument("--smoke", action="store_true", help="run on CPU with a shrunken model (checks the script)")
    args = ap.parse_args(argv)

    import torch

    if args.smoke:
        device, dims = "cpu", SMOKE
        torch.set_num_threads(2)
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False), so nothing was measured.\n"
              "Run it on a machine with one:  python bench/gpu.py\n"
              "(python bench/gpu.py --smoke runs a shrunken model on the CPU to check the script itself.)",
              file=sys.stderr)
        return 2
    else:
        device, dims = "cuda", QWEN3_0_6B

    from rlbook_code import train as T

    with tempfile.TemporaryDirectory(prefix="rlbook_gpu_") as tmp:
        folder = Path(tmp) / "qwen3-0.6b-shaped"
        t0 = time.perf_counter()
        n_params = build_model_folder(folder, dims)
        build_s = time.perf_counter() - t0
        overrides = [
            f"model_name={folder}", f"device={device}", f"dtype={args.dtype if not args.smoke else 'float32'}",
            f"autocast_bf16={str(not (args.no_autocast or args.smoke or args.dtype != 'float32')).lower()}",
            f"answer_format={DEFAULTS['answer_format']}", f"beta={DEFAULTS['beta']}",
            f"prompts_per_step={args.prompts_per_step}", f"group_size={args.group_size}",
            f"max_new_tokens={args.max_new_tokens}", f"micro_batch_size={args.micro_batch_size}",
            f"generation_batch_size={args.generation_batch_size}",
            f"gradient_checkpointing={str(not args.no_gradient_checkpointing).lower()}",
            f"lr={DEFAULTS['lr']}", f"steps={args.steps}", "eval_size=1", "eval_sampled=false",
            "progress=false", "tensorboard=false", f"run_dir={Path(tmp) / 'run'}", "overwrite=true",
        ] + list(args.set)
        cfg = T.load_config(args.config, overrides)
        state = T.build_state(cfg, Path(tmp) / "run")

        gen_time = [0.0]
        original_collect = T.collect_rollouts

        def timed_collect(st, step):  # time generation + reward alone (train_step calls it by name)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = original_collect(st, step)
            if device == "cuda":
                torch.cuda.synchronize()
            gen_time[0] = time.perf_counter() - t
            return out

        T.collect_rollouts = timed_collect
        rec = {}
        try:
            for step in range(1, args.steps + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                rec = T.train_step(state, step)
                if device == "cuda":
                    torch.cuda.synchronize()
                rec["step_s"] = time.perf_counter() - t
                rec["gen_s"] = gen_time[0]
                print(f"step {step}: {rec['step_s']:.2f} s (generation {rec['gen_s']:.2f} s, "
                      f"update {rec['update_s']:.2f} s)", file=sys.stderr)
        finally:
            T.collect_rollouts = original_collect
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        n_seq = cfg.prompts_per_step * cfg.group_size
        gen_tokens = rec["response_length"] * n_seq
        gpu_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke test, shrunken model)"

    rows = [
        ("device", gpu_name),
        ("model", f"Qwen3-0.6B-shaped, random weights, {n_params / 1e6:.1f}M parameters"
                  + (" (SHRUNKEN: --smoke)" if args.smoke else "")),
        ("dtype / bf16 autocast / gradient checkpointing",
         f"{cfg.dtype} / {cfg.autocast_bf16} / {cfg.gradient_checkpointing}"),
        ("batch", f"{cfg.prompts_per_step} prompts x G={cfg.group_size} = {n_seq} completions, "
                  f"max_new_tokens {cfg.max_new_tokens}, micro-batch {cfg.micro_batch_size}, "
                  f"generation batch {cfg.generation_batch_size} prompts"),
        ("mean completion length (tokens)", f"{rec['response_length']:.1f}"),
        ("peak GPU memory (GiB)", f"{peak:.2f}"),
        ("generation + reward (s)", f"{rec['gen_s']:.2f}"),
        ("rollout tokens/s (generation)", f"{gen_tokens / rec['gen_s']:.0f}"),
        ("old log-probs + advantages (s)", f"{rec['rollout_s'] - rec['gen_s']:.2f}"),
        ("update: forward + backward + AdamW (s)", f"{rec['update_s']:.2f}"),
        ("whole step (s)", f"{rec['step_s']:.2f}"),
        ("model build + save (s, not part of the step)", f"{build_s:.1f}"),
    ]
    print(f"GRPO step {args.steps} of {args.steps} (rlbook_code.train.train_step)\n")
    print("| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
