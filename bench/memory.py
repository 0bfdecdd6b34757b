"""Peak memory of one GRPO step of a Qwen3-0.6B-shaped model, measured on the CPU, against the
worked estimate of book/gpu.md: full fine-tuning vs LoRA, with and without activation checkpointing.

    python bench/memory.py                  # the six runs, one process each (hours on 2 cores)
    python bench/memory.py --only lora-gc   # full, full-gc, lora, lora-gc, lora-bf16, lora-bf16-gc
    python bench/memory.py --smoke          # a shrunken model: checks the script in seconds
    python bench/memory.py --model smollm2-135m-instruct --only full --only lora \
        --set prompts_per_step=2 --set group_size=4 --set max_new_tokens=32 --json out.json
                                            # any model (chapter 15: SmolLM2), any batch

The model is bench/gpu.py's: ``Qwen3ForCausalLM(Qwen3Config(...))`` with the published 0.6B sizes
and random weights (nothing is downloaded), loaded by ``rlbook_code.train.build_state`` like any
model. The step is ``rlbook_code.train.train_step`` with book/gpu.md's settings (float32
parameters and AdamW, bfloat16 autocast, ``max_new_tokens`` 256, ``generation_batch_size`` 2
prompts = 16 sequences per ``generate`` call, ``micro_batch_size`` 8, beta 0). A random model
never samples EOS, so every completion is 256 tokens long: the worst case.

What is measured: the process's resident set (``/proc/self/statm``, sampled every 2 ms by a
thread) during the step, minus its resident set before the model was built (Python, torch,
transformers); each configuration runs in a fresh process. AdamW's moments are created before
the step (one zero-gradient step, which leaves the weights unchanged) so the step sees the
steady state of a long run. The step's peak is reported per phase: rollouts (``generate``, the
rewards), and the update (forward, backward, AdamW).

Batch: ``--prompts-per-step`` defaults to 2, one ``generate`` call and two micro-batches. The
peak of a phase is set by one ``generate`` call and one micro-batch; book/gpu.md's 16 prompts
repeat each eight times (the rollout batch they add, token ids and log-probs, is under 1 MB).
``--prompts-per-step 16`` runs the whole batch (eight times longer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
GiB = 2**30
RUNS = {"full": (0, False, "float32"), "full-gc": (0, True, "float32"), "lora": (16, False, "float32"),
        "lora-gc": (16, True, "float32"), "lora-bf16": (16, False, "bfloat16"),
        "lora-bf16-gc": (16, True, "bfloat16")}
"""name: (LoRA rank, activation checkpointing, parameter dtype). ``lora-bf16*`` keep the frozen
base in bfloat16 (2 bytes a weight, forward passes in bfloat16 without autocast) and the adapters in
float32 (``lora.add_lora``)."""


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """A thread that records the largest resident set seen while each named phase runs."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s, self.phase, self.peaks = every_s, None, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.phase is not None:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss_bytes())
            time.sleep(self.every_s)

    def set_phase(self, name: str | None) -> None:
        if self.phase is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss_bytes())
        self.phase = name

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.set_phase(None)
        self._stop.set()
        self._thread.join()


def estimate(dims: dict, n_params: int, n_trainable: int, n_gen: int, prompt_len: int, T: int,
             micro: int, checkpointing: bool, base_bytes: int = 4) -> dict[str, float]:
    """book/gpu.md's worked estimate (bytes), term by term, for these sizes.

    ``n_gen``: sequences per generate call; ``prompt_len``: prompt tokens; ``T``: new tokens.
    Weights float32 (4 B), AdamW moments 8 B per trainable parameter; gradients (4 B per
    trainable parameter) exist only in the update (the trainer frees them with
    ``zero_grad(set_to_none=True)``); autocast keeps a bfloat16 copy (2 B) of each weight that
    requires grad while a forward runs (frozen LoRA base weights are cast op by op, not kept).
    ``base_bytes=2``: a LoRA run whose frozen base is bfloat16 (no autocast, no copies)."""
    L, V, H = dims["num_hidden_layers"], dims["vocab_size"], dims["hidden_size"]
    kv = dims["num_key_value_heads"] * dims["head_dim"]
    seq = prompt_len + T
    weights = base_bytes * (n_params - n_trainable) + 4 * n_trainable
    adam, grads = 8 * n_trainable, 4 * n_trainable
    bf16_copy = 2 * (n_params if n_trainable == n_params else n_trainable) if base_bytes == 4 else 0
    kv_cache = 2 * L * kv * 2 * n_gen * seq
    scores = 4 * V * n_gen * T  # float32 processed logits of every step, one copy
    logits = 2 * micro * (T + 1) * V  # bfloat16 logits of the completion positions
    per_token_layer = 80 * 1024  # book/gpu.md: roughly 80 KiB per token per layer of activations
    acts = (2 * micro * seq * H * L + 0.5 * GiB) if checkpointing else per_token_layer * micro * seq * L
    return {
        "static": weights + adam,
        "rollout": weights + adam + bf16_copy + kv_cache + 2 * scores,
        "update": weights + adam + grads + bf16_copy + logits + 2 * logits + logits + acts,
    }


def run_one(name: str, args) -> dict:
    """One configuration in this process; returns the measurements (bytes)."""
    import gc

    import torch

    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (imported before the baseline is read)
    from gpu import QWEN3_0_6B, SMOKE

    from rlbook_code import lora
    from rlbook_code import train as T
    from rlbook_code.rollout import chat_prompts

    gc.collect()
    base_rss = rss_bytes()
    dims = SMOKE if args.smoke else QWEN3_0_6B
    rank, checkpointing, dtype = RUNS[name]
    autocast = not args.no_autocast and dtype == "float32"  # autocast is for float32 parameters
    folder = args.folder
    with tempfile.TemporaryDirectory(prefix="rlbook_mem_") as tmp:
        overrides = [
            f"model_name={folder}", "device=cpu", f"dtype={dtype}", "answer_format=tags",
            "beta=0.0", f"prompts_per_step={args.prompts_per_step}", "group_size=8",
            f"max_new_tokens={args.max_new_tokens}", "micro_batch_size=8", "generation_batch_size=2",
            f"gradient_checkpointing={str(checkpointing).lower()}", "lr=1e-6", "steps=1", "eval_size=1",
            f"autocast_bf16={str(autocast).lower()}",
            "eval_sampled=false", "progress=false", "tensorboard=false", f"num_threads={args.threads}",
            f"lora_rank={rank}", "lora_alpha=32.0", f"run_dir={Path(tmp) / 'run'}", "overwrite=true",
        ] + list(args.set)
        cfg = T.load_config(REPO / "configs" / "grpo.yaml", overrides)
        state = T.build_state(cfg, Path(tmp) / "run")
        n_trainable, n_total = lora.count_parameters(state.policy)
        params = [p for g in state.optimizer.param_groups for p in g["params"]]
        for p in params:  # AdamW's moments, as after the first step of a long run
            p.grad = torch.zeros_like(p)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        static_rss = rss_bytes()
        original_collect = T.collect_rollouts
        times = {}
        with PeakSampler() as sampler:
            def collect(st, step):
                sampler.set_phase("rollout")
                t = time.perf_counter()
                out = original_collect(st, step)
                times["rollout_s"] = time.perf_counter() - t
                sampler.set_phase("update")
                return out

            original_score = T.score_rollouts

            def score(st, batch):
                t = time.perf_counter()
                out = original_score(st, batch)
                times["score_s"] = time.perf_counter() - t
                return out

            T.collect_rollouts, T.score_rollouts = collect, score
            try:
                t0 = time.perf_counter()
                rec = T.train_step(state, 1)
                times["step_s"] = time.perf_counter() - t0
            finally:
                T.collect_rollouts, T.score_rollouts = original_collect, original_score
        items = state.task.sample(1)
        prompt = state.task.prompt(items[0])
        batch_prompt_len = len(state.tokenizer(chat_prompts(state.tokenizer, [prompt])[0],
                                               add_special_tokens=False).input_ids)
    n_gen = min(cfg.prompts_per_step, cfg.generation_batch_size or cfg.prompts_per_step) * cfg.group_size
    est = estimate(dims, n_total, n_trainable, n_gen=n_gen, prompt_len=batch_prompt_len, T=args.max_new_tokens,
                   micro=min(cfg.micro_batch_size or n_gen, cfg.prompts_per_step * cfg.group_size),
                   checkpointing=checkpointing, base_bytes=2 if dtype == "bfloat16" else 4) if not args.model else None
    times["update_s"] = rec["update_s"]
    return {"name": name, "n_params": n_total, "n_trainable": n_trainable, "base_rss": base_rss,
            "static": static_rss - base_rss, "rollout": sampler.peaks.get("rollout", 0) - base_rss,
            "update": sampler.peaks.get("update", 0) - base_rss, "response_length": rec["response_length"],
            "prompt_len": batch_prompt_len, "estimate": est, **times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", choices=list(RUNS), action="append", help="run only these configurations")
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a shrunken model (checks the script)")
    ap.add_argument("--model", help="measure this model (a name or folder for models.load_policy) instead of "
                                    "the Qwen3-0.6B shape; no estimate is printed")
    ap.add_argument("--no-autocast", action="store_true", help="float32 forward passes (no bf16 autocast)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the measurements to this file")
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)))
        return 0
    from gpu import QWEN3_0_6B, SMOKE, build_model_folder

    results = []
    tmp = tempfile.TemporaryDirectory(prefix="rlbook_mem_")
    folder = args.model or str(Path(tmp.name) / "qwen3-0.6b-shaped")
    if not args.model:
        build_model_folder(Path(folder), SMOKE if args.smoke else QWEN3_0_6B)  # once, shared by the runs
    for name in args.only or list(RUNS):
        cmd = [sys.executable, __file__, "--child", name, "--folder", folder,
               "--prompts-per-step", str(args.prompts_per_step),
               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)] + \
              (["--smoke"] if args.smoke else []) + (["--model", args.model] if args.model else []) + \
              (["--no-autocast"] if args.no_autocast else []) + [a for kv in args.set for a in ("--set", kv)]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{name}: failed (exit {out.returncode})\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[0][len("RESULT "):]))
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    tmp.cleanup()
    if args.model:
        print(json.dumps(results, indent=1))
        return 0
    r0 = results[0]
    print(f"Qwen3-0.6B-shaped ({r0['n_params'] / 1e6:.1f}M parameters{', SHRUNKEN: --smoke' if args.smoke else ''}), "
          f"one GRPO step on the CPU: {args.prompts_per_step} prompts x 8, {args.max_new_tokens} new tokens "
          f"(mean length {r0['response_length']:.0f}), prompt {r0['prompt_len']} tokens, "
          f"{min(args.prompts_per_step, 2) * 8} sequences per generate call, micro-batch 8, bf16 autocast. Resident memory above the process's "
          f"{r0['base_rss'] / GiB:.2f} GiB before the model (GiB); estimate: book/gpu.md's terms.\n")
    print("| run | trainable params | static (measured / est.) | rollout peak (measured / est.) "
          "| update peak (measured / est.) | step peak | rollout s | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        e = r["estimate"]
        print(f"| {r['name']} | {r['n_trainable'] / 1e6:.2f}M | {r['static'] / GiB:.2f} / {e['static'] / GiB:.2f} "
              f"| {r['rollout'] / GiB:.2f} / {e['rollout'] / GiB:.2f} | {r['update'] / GiB:.2f} / "
              f"{e['update'] / GiB:.2f} | {max(r['rollout'], r['update']) / GiB:.2f} | {r['rollout_s']:.0f} "
              f"| {r['step_s']:.0f} |")
    by = {r["name"]: max(r["rollout"], r["update"]) for r in results}
    for a, b in (("lora-gc", "full-gc"), ("lora-bf16-gc", "full-gc"), ("lora", "full")):
        if a in by and b in by:
            print(f"\n{a} / {b} step peak: {by[a] / by[b]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
