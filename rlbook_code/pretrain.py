"""Train the shipped tiny model from scratch (supervised fine-tuning on task items).

    python -m rlbook_code.pretrain --out rlbook_code/assets/tiny-qwen3-spell --seed 0

Builds a character-level tokenizer with a Qwen-style chat template and a small
Qwen3-architecture causal LM, trains it on prompts of :data:`rlbook_code.rewards.DEFAULT_TASK`
with the loss on the answer tokens only, and evaluates sampled held-out accuracy every
``--eval-every`` steps. Learning on this task jumps sharply (a few % to >80% within about
100 steps), so every evaluated step is kept as a checkpoint and the one whose sampled
accuracy is closest to ``--target`` (default 0.35, i.e. imperfect, so RL has room to improve
it) is saved with ``save_pretrained`` together with a model card (``README.md``) and
``training_log.json``. CPU, float32, constant learning rate after warm-up: a run is
reproducible for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlbook_code.evaluation import evaluate
from rlbook_code.rewards import DEFAULT_TASK, TaskMixture
from rlbook_code.rollout import chat_prompts

__all__ = [
    "PretrainConfig",
    "build_tokenizer",
    "build_model",
    "sft_batch",
    "pretrain",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "main",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
"""pad, begin-of-turn (also used as BOS), end-of-turn (EOS), unknown character."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen's ChatML layout (without Qwen3's thinking block)."""


def build_tokenizer():
    """A character-level fast tokenizer: 4 special tokens + newline + printable ASCII (100 ids).

    Any other character maps to ``<unk>``. ``decoders.Fuse()`` joins characters back
    without inserting spaces.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 256,
    seed: int = 0,
):
    """A randomly initialised ``Qwen3ForCausalLM`` (tied embeddings) for ``tokenizer``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def sft_batch(tokenizer, task: TaskMixture, items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (B, L) for SFT.

    Sequence: chat-formatted prompt + answer + EOS; labels are -100 except on the
    answer and EOS tokens.
    """
    prompts = chat_prompts(tokenizer, [task.prompt(it) for it in items])
    rows, labels = [], []
    for p, it in zip(prompts, items):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(str(it["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    L = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    label_t = torch.tensor([lab + [-100] * (L - len(lab)) for lab in labels])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}


@dataclass
class PretrainConfig:
    """Settings of a pre-training run (defaults: the shipped model)."""

    out: str
    """Folder for the selected model (``save_pretrained``), its card and training log."""
    seed: int = 0
    """Seeds the initial weights, the data stream and the evaluation samples."""
    max_steps: int = 400
    """Upper bound on optimizer steps (training usually stops earlier, see ``stop_above``)."""
    batch_size: int = 64
    lr: float = 3e-3
    """Peak (= constant after warm-up) AdamW learning rate."""
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_new_tokens: int = 8
    """Completion cap used for every evaluation (answers are <= 5 letters + EOS)."""
    eval_every: int = 10
    select_n: int = 128
    """Held-out items (``eval_items(select_n, seed=1)``) used to pick the checkpoint."""
    target: float = 0.35
    """Sampled accuracy the selected checkpoint should be closest to."""
    band: tuple[float, float] = (0.2, 0.5)
    """Acceptable sampled accuracy of the selected checkpoint; a run outside it fails loudly."""
    stop_above: float = 0.7
    """Stop once sampled selection accuracy exceeds this (the band has been passed)."""
    report_n: int = 500
    """Size of the fixed held-out report set ``eval_items(report_n, seed=0)``."""
    threads: int = 1
    """torch threads; 1 makes runs independent of the core count (and is faster on a busy machine)."""
    task: list = field(default_factory=lambda: copy.deepcopy(DEFAULT_TASK))


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    return cfg.lr * min(1.0, step / max(cfg.warmup_steps, 1))


def pretrain(cfg: PretrainConfig, log=None) -> dict:
    """Run SFT, select a checkpoint, save it to ``cfg.out``; returns the summary dict."""
    if log is None:
        log = functools.partial(print, flush=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(
        tokenizer,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        seed=cfg.seed,
    )
    task = TaskMixture(cfg.task, seed=cfg.seed)
    select_items = task.eval_items(cfg.select_n, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    history: list[dict] = []
    checkpoints: dict[int, dict] = {}
    torch.manual_seed(cfg.seed)
    for step in range(1, cfg.max_steps + 1):
        model.train()
        batch = sft_batch(tokenizer, task, task.sample(cfg.batch_size))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_value = loss.item()
        rec = {"step": step, "loss": round(loss_value, 5)}
        if step % cfg.eval_every == 0:
            res = evaluate(model, tokenizer, task, select_items, cfg.max_new_tokens, greedy=False, seed=cfg.seed)
            rec["sampled_accuracy"] = res["accuracy"]
            checkpoints[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            log(f"step {step:4d} loss {loss_value:.4f} sampled acc {res['accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)")
        history.append(rec)
        if rec.get("sampled_accuracy", 0.0) > cfg.stop_above:
            break
    evals = [r for r in history if "sampled_accuracy" in r]
    if not evals:
        raise RuntimeError(f"no evaluation happened: max_steps={cfg.max_steps} < eval_every={cfg.eval_every}")
    best = min(evals, key=lambda r: (abs(r["sampled_accuracy"] - cfg.target), r["step"]))
    lo, hi = cfg.band
    if not lo <= best["sampled_accuracy"] <= hi:
        raise RuntimeError(
            f"no checkpoint in the band {cfg.band}: closest to {cfg.target} is step {best['step']} "
            f"with {best['sampled_accuracy']:.3f}; try a smaller --eval-every or more --max-steps"
        )
    model.load_state_dict(checkpoints[best["step"]])
    model.eval()
    train_seconds = time.perf_counter() - t0
    report_items = task.eval_items(cfg.report_n, seed=0)
    greedy = evaluate(model, tokenizer, task, report_items, cfg.max_new_tokens, greedy=True, seed=0)
    sampled = evaluate(model, tokenizer, task, report_items, cfg.max_new_tokens, greedy=False, temperature=1.0, seed=0)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "out"},
        "selected_step": best["step"],
        "selection_sampled_accuracy": best["sampled_accuracy"],
        "report": {"n": cfg.report_n, "eval_seed": 0, "sample_seed": 0, "greedy": greedy, "sampled": sampled},
        "num_parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(model_card(summary, out))
    log(
        f"selected step {best['step']}: report greedy {greedy['accuracy']:.3f} sampled {sampled['accuracy']:.3f} "
        f"(n={cfg.report_n}); {train_seconds:.0f}s"
    )
    return summary


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def model_card(summary: dict, folder: Path) -> str:
    """The model card (``README.md``) for a run summary."""
    c = summary["config"]
    r = summary["report"]
    g, s = r["greedy"], r["sampled"]
    lo, hi = c["band"]
    args = (
        f"--seed {c['seed']}"
        if c["seed"] != 0
        else "--seed 0"
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
license: mit
---

# tiny-qwen3-spell

A {summary['num_parameters'] / 1e6:.2f}M-parameter Qwen3-architecture causal LM with a
character-level tokenizer, trained from scratch to spell 3-5 letter words backward
(reasoning-gym `spell_backward`). It is the default policy of the rlbook: small enough to
sample and train with RL on a laptop CPU, and deliberately **stopped while imperfect** so
that RL has room to improve it.

Load it like any Hugging Face model (offline, no `trust_remote_code`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
```

or `rlbook_code.models.load_policy()` (left padding, eval mode).

## Architecture

| | |
|---|---|
| class | `Qwen3ForCausalLM` (transformers) |
| hidden size / layers | {c['hidden_size']} / {c['num_layers']} |
| attention heads / KV heads | {c['num_heads']} / {c['num_kv_heads']} (head dim {c['hidden_size'] // c['num_heads']}) |
| MLP size | {c['intermediate_size']} |
| embeddings | tied input/output |
| parameters | {summary['num_parameters']:,} |
| vocabulary | 100: `<\\|endoftext\\|>` (pad), `<\\|im_start\\|>` (bos), `<\\|im_end\\|>` (eos), `<unk>`, newline, printable ASCII |
| weights | float32 safetensors, {_size_mb(folder):.1f} MB |

The tokenizer is one token per character (`tokenizers` BPE with no merges and a `Fuse`
decoder); the chat template is Qwen's ChatML layout:
`<|im_start|>user\\n{{question}}<|im_end|>\\n<|im_start|>assistant\\n`, and the model answers
with the reversed word followed by `<|im_end|>`.

## Data

Prompts of `rlbook_code.rewards.TaskMixture(DEFAULT_TASK, seed={c['seed']})`: reasoning-gym
`spell_backward` with `min_word_len=3, max_word_len=5`, e.g. *"Spell this word backward
(example: sun -> nus): neon"* -> `noen`. One word in ten (a hash of the question) is held out
and never used in training; all accuracies below are on held-out words.

## Training

```
python -m rlbook_code.pretrain --out rlbook_code/assets/tiny-qwen3-spell {args}
```

Supervised fine-tuning from random initialisation, loss on the answer and EOS tokens only;
AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}), batch {c['batch_size']}, learning rate
{c['lr']} constant after {c['warmup_steps']} linear warm-up steps, gradient clipping {c['grad_clip']},
float32 on CPU, {c['threads']} torch thread(s). Every {c['eval_every']} steps the sampled accuracy on
{c['select_n']} held-out items (`eval_items({c['select_n']}, seed=1)`) was measured; training
stopped once it passed {c['stop_above']}, and the checkpoint closest to {c['target']} was kept:
step **{summary['selected_step']}** (selection accuracy {summary['selection_sampled_accuracy']:.3f}).
Wall time: {summary['train_seconds']:.0f} s on a shared 2-core machine. The full loss/accuracy
log is in `training_log.json`.

## Evaluation

Fixed held-out report set: `TaskMixture(DEFAULT_TASK, seed={c['seed']}).eval_items({r['n']}, seed={r['eval_seed']})`,
one completion per item, at most {c['max_new_tokens']} new tokens, exact match of the extracted answer
(`rlbook_code.evaluation.evaluate`, sampling seed {r['sample_seed']}, `top_p=1`, `top_k=0`).

| decoding | exact-match accuracy | mean partial credit | mean length (tokens) |
|---|---|---|---|
| greedy | {g['accuracy']:.3f} | {g['mean_reward']:.3f} | {g['mean_length']:.2f} |
| sampled, temperature 1 | {s['accuracy']:.3f} | {s['mean_reward']:.3f} | {s['mean_length']:.2f} |

`tests/test_shipped_model.py` re-measures both numbers (tolerance 0.03); re-running the
training command must land the selected checkpoint's sampled accuracy in [{lo}, {hi}]
(a slow test checks it).

## Limitations

It knows one task. Characters outside printable ASCII map to `<unk>`. It is a teaching
model, not a language model.
"""


def main(argv: list[str] | None = None) -> None:
    d = PretrainConfig(out="")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder for the selected model")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--select-n", type=int, default=d.select_n)
    ap.add_argument("--target", type=float, default=d.target)
    ap.add_argument("--band", type=float, nargs=2, default=list(d.band))
    ap.add_argument("--stop-above", type=float, default=d.stop_above)
    ap.add_argument("--report-n", type=int, default=d.report_n)
    ap.add_argument("--threads", type=int, default=d.threads)
    a = ap.parse_args(argv)
    cfg = PretrainConfig(
        out=a.out,
        seed=a.seed,
        max_steps=a.max_steps,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        eval_every=a.eval_every,
        select_n=a.select_n,
        target=a.target,
        band=(a.band[0], a.band[1]),
        stop_above=a.stop_above,
        report_n=a.report_n,
        threads=a.threads,
    )
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise SystemExit(f"--lr must be positive, got {cfg.lr}")
    pretrain(cfg)


if __name__ == "__main__":
    main()
