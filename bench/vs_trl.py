"""The same GRPO run through TRL's ``GRPOTrainer`` and through ``rlbook_code.train``.

    python bench/vs_trl.py                      # 3 seeds x {rlbook, TRL}, 30 steps each
    python bench/vs_trl.py --steps 150 --seeds 0 1 2 3
    python bench/vs_trl.py --only rlbook        # without TRL

Each run is its own process (``--worker``), and the two frameworks alternate
(seed 0: rlbook then TRL, seed 1: TRL then rlbook, ...), so that a slow spell of a
shared machine does not land on one framework only. Both use the same Python, torch
and transformers, the same shipped model and weights, the same prompts in the same
order, and the settings of ``configs/grpo.yaml`` mapped onto TRL's names:

    rlbook (TrainConfig)        TRL (GRPOConfig)
    prompts_per_step * G        per_device_train_batch_size (completions), gradient_accumulation_steps=1
    group_size                  num_generations
    max_new_tokens              max_completion_length
    temperature, top_p          temperature, top_p, top_k=0
    lr (constant, AdamW)        learning_rate, lr_scheduler_type="constant", weight_decay=0
    clip_eps_low / _high        epsilon / epsilon_high
    beta                        beta
    adv_scale                   scale_rewards ("group", "batch", "none")
    aggregation                 loss_type: seq-mean-token-mean -> "grpo", token-mean -> "bnpo",
                                seq-mean-token-sum-norm -> "dr_grpo"
    max_grad_norm               max_grad_norm
    num_epochs=1, 1 minibatch   num_iterations=1, steps_per_generation=1

Reported per run: seconds per training step (mean over steps 2..N: step 1 pays one-off
warm-up), the whole ``train`` call, and held-out exact-match accuracy (greedy and
sampled) after N steps, both measured afterwards with ``rlbook_code.evaluation.evaluate``
on the same fixed held-out items. Per step, rlbook's time is ``rollout_s + update_s`` from
its ``metrics.jsonl``; TRL's is the wall time between its ``on_step_begin`` and
``on_step_end`` callbacks (generation, reward, loss, backward, optimizer step).

TRL 1.16 is part of the book's environment (``requirements-parity.txt``, installed by
``make setup`` for chapter 12 and the parity tests), so ``.venv/bin/python bench/vs_trl.py``
runs as is; ``rlbook_code.bridges`` holds the same mapping as a library (``trl_grpo_kwargs``,
``train_with_trl``), tested against TRL's own ``GRPOConfig``. ``--python`` runs the workers with
another interpreter (an environment with a different TRL, say).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "VS_TRL_RESULT "
AGG_TO_TRL = {"seq-mean-token-mean": "grpo", "token-mean": "bnpo", "seq-mean-token-sum-norm": "dr_grpo"}
INSTALL_HINT = (
    "TRL is not installed for {python}.\n"
    "`make setup` installs it into the book's .venv (requirements-parity.txt): run .venv/bin/python bench/vs_trl.py."
)


# ----------------------------------------------------------------------------------------
# Shared settings
# ----------------------------------------------------------------------------------------
def load_cfg(args, seed: int, run_dir: str):
    """The rlbook config both frameworks follow."""
    from rlbook_code.train import load_config

    overrides = [
        f"steps={args.steps}", f"seed={seed}", f"num_threads={args.threads}", f"run_dir={run_dir}",
        "overwrite=true", "eval_every=0", "eval_size=1", "eval_sampled=false", "save_every=0",
        "save_final_model=true", "progress=false", "tensorboard=false", "device=cpu",
    ]
    if args.model:
        overrides.append(f"model_name={args.model}")
    cfg = load_config(args.config, overrides + list(args.set))
    unsupported = []
    if cfg.loss != "ppo" or cfg.advantage != "group":
        unsupported.append(f"loss={cfg.loss!r}, advantage={cfg.advantage!r} (need ppo + group)")
    if cfg.num_epochs != 1 or cfg.num_minibatches != 1 or cfg.micro_batch_size is not None:
        unsupported.append("num_epochs/num_minibatches/micro_batch_size other than 1/1/None")
    if cfg.aggregation not in AGG_TO_TRL:
        unsupported.append(f"aggregation={cfg.aggregation!r}")
    if cfg.dynamic_sampling or cfg.overlong_buffer is not None or cfg.whiten_advantages or cfg.dual_clip:
        unsupported.append("DAPO extras / whitening / dual clip")
    if cfg.beta > 0 and (cfg.kl_estimator != "k3" or cfg.kl_in != "loss"):
        unsupported.append("a KL other than k3 in the loss (TRL's only one)")
    if cfg.lr_schedule != "constant" or cfg.warmup_steps:
        unsupported.append("a learning-rate schedule other than constant")
    if unsupported:
        raise SystemExit("this benchmark maps plain GRPO-style configs only; unsupported: " + "; ".join(unsupported))
    return cfg


def eval_task_and_items(cfg, eval_size: int):
    """One fixed held-out set for every run (independent of the training seed)."""
    from rlbook_code import rewards

    task = rewards.TaskMixture(cfg.task if cfg.task is not None else rewards.DEFAULT_TASK, seed=0)
    return task, task.eval_items(eval_size, seed=cfg.eval_seed)


def held_out_accuracy(model, tokenizer, cfg, eval_size: int) -> dict[str, float]:
    from rlbook_code.evaluation import evaluate

    task, items = eval_task_and_items(cfg, eval_size)
    out = {}
    for name, greedy in (("greedy", True), ("sampled", False)):
        r = evaluate(model, tokenizer, task, items, max_new_tokens=cfg.max_new_tokens, greedy=greedy,
                     temperature=cfg.temperature, batch_size=cfg.eval_batch_size, seed=cfg.eval_seed)
        out[f"{name}_accuracy"] = float(r["accuracy"])
    return out


# ----------------------------------------------------------------------------------------
# Workers (one process each)
# ----------------------------------------------------------------------------------------
def worker_rlbook(args, seed: int, tmp: str) -> dict:
    import torch

    from rlbook_code import models
    from rlbook_code.train import read_metrics, train

    torch.set_num_threads(args.threads)
    cfg = load_cfg(args, seed, os.path.join(tmp, "run"))
    t0 = time.perf_counter()
    run_dir = train(cfg)
    train_s = time.perf_counter() - t0
    recs = [r for r in read_metrics(run_dir) if r["step"] >= 1 and "rollout_s" in r]
    step_s = [r["rollout_s"] + r["update_s"] for r in recs]
    model, tok = models.load_policy(str(run_dir / "final"), device="cpu", dtype=torch.float32)
    acc = held_out_accuracy(model, tok, cfg, args.eval_size)
    return {"step_s": step_s, "train_s": train_s,
            "train_reward": [r["reward_mean"] for r in recs], **acc}


def worker_trl(args, seed: int, tmp: str) -> dict:
    import torch

    try:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit(INSTALL_HINT.format(python=sys.executable)) from None

    from rlbook_code import models, rewards

    torch.set_num_threads(args.threads)
    cfg = load_cfg(args, seed, os.path.join(tmp, "unused"))
    model, tok = models.load_policy(cfg.model_name, device="cpu", dtype=torch.float32)
    # The same prompt stream as rlbook_code.train: TaskMixture(seed).sample(P) at every step.
    task = rewards.TaskMixture(cfg.task if cfg.task is not None else rewards.DEFAULT_TASK, seed=seed)
    items = []
    for _ in range(cfg.steps):
        items += task.sample(cfg.prompts_per_step)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": task.prompt(it)}], "idx": i}
                            for i, it in enumerate(items)])

    def reward_exact(completions, idx, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return task.score(texts, [items[i] for i in idx], mode=cfg.reward_mode)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)

    G = cfg.group_size
    targs = GRPOConfig(
        output_dir=os.path.join(tmp, "trl"),
        per_device_train_batch_size=cfg.prompts_per_step * G,
        gradient_accumulation_steps=1,
        num_generations=G,
        num_iterations=1,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_betas[0],
        adam_beta2=cfg.adam_betas[1],
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm is not None else 1e30,
        epsilon=cfg.clip_eps_low,
        epsilon_high=cfg.clip_eps_high,
        beta=cfg.beta,
        loss_type=AGG_TO_TRL[cfg.aggregation],
        scale_rewards=cfg.adv_scale,
        max_steps=cfg.steps,
        seed=seed,
        data_seed=seed,
        shuffle_dataset=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        chat_template_kwargs={"enable_thinking": False},
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward_exact, args=targs, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    rewards_logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    policy = trainer.model
    policy.eval()
    acc = held_out_accuracy(policy, tok, cfg, args.eval_size)
    return {"step_s": timer.times, "train_s": train_s, "train_reward": rewards_logged,
            "trl_version": trl.__version__, **acc}


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------
def trl_available(python: str) -> bool:
    r = subprocess.run([python, "-c", "import trl, datasets"], capture_output=True)
    return r.returncode == 0


def find_python(requested: str | None) -> str:
    if requested:
        return requested
    if trl_available(sys.executable):
        return sys.executable
    for cand in (REPO / ".venv-trl" / "bin" / "python",):
        if cand.exists() and trl_available(str(cand)):
            return str(cand)
    return sys.executable


def run_worker(python: str, framework: str, seed: int, args) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", framework, "--seed", str(seed),
           "--steps", str(args.steps), "--config", args.config, "--eval-size", str(args.eval_size),
           "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    for s in args.set:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{framework} worker (seed {seed}) failed with exit code {proc.returncode}")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res.update(framework=framework, seed=seed, process_s=wall)
    return res


def mean_step(res: dict) -> float:
    """Mean seconds per step over steps 2..N (step 1 pays one-off warm-up)."""
    t = res["step_s"][1:] or res["step_s"]
    return sum(t) / len(t)


def fmt_ms(xs: list[float], scale: float = 1.0, digits: int = 3) -> str:
    xs = [x * scale for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def report(results: list[dict], args) -> str:
    lines = [f"GRPO, {args.steps} steps, config {args.config}, held-out set of {args.eval_size} items", ""]
    lines.append("| framework | seed | s/step | train call (s) | greedy acc | sampled acc |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        lines.append(f"| {r['framework']} | {r['seed']} | {mean_step(r):.3f} | {r['train_s']:.1f} | "
                     f"{r['greedy_accuracy']:.3f} | {r['sampled_accuracy']:.3f} |")
    lines.append("")
    lines.append("| framework | runs | s/step (mean ± sd) | greedy acc | sampled acc |")
    lines.append("|---|---|---|---|---|")
    by = {}
    for r in results:
        by.setdefault(r["framework"], []).append(r)
    for fw, rs in by.items():
        lines.append(f"| {fw} | {len(rs)} | {fmt_ms([mean_step(r) for r in rs])} | "
                     f"{fmt_ms([r['greedy_accuracy'] for r in rs])} | {fmt_ms([r['sampled_accuracy'] for r in rs])} |")
    if "rlbook" in by and "trl" in by:
        ratio = statistics.mean(mean_step(r) for r in by["rlbook"]) / statistics.mean(mean_step(r) for r in by["trl"])
        lines.append("")
        lines.append(f"step-time ratio rlbook / TRL: {ratio:.2f}  (goal <= 0.5); TRL {by['trl'][0].get('trl_version', '?')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="configs/grpo.yaml", help="rlbook config both frameworks follow")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--eval-size", type=int, default=128, help="held-out items for the final accuracy")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each worker (default 1: fastest for the shipped model)")
    ap.add_argument("--only", choices=["rlbook", "trl"], default=None, help="run one framework only")
    ap.add_argument("--python", default=None,
                    help="interpreter for the workers (default: this one if it has TRL, else .venv-trl/bin/python)")
    ap.add_argument("--out", default=None, help="also write all results as JSON here")
    ap.add_argument("--worker", choices=["rlbook", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
            fn = worker_rlbook if args.worker == "rlbook" else worker_trl
            res = fn(args, args.seed, tmp)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    load_cfg(args, args.seeds[0], "unused")  # fail early on a config this script cannot map
    python = find_python(args.python)
    frameworks = ["rlbook", "trl"] if args.only is None else [args.only]
    if "trl" in frameworks and not trl_available(python):
        print(INSTALL_HINT.format(python=python), file=sys.stderr)
        if args.only == "trl":
            return 1
        print("running rlbook only.\n", file=sys.stderr)
        frameworks = ["rlbook"]
    print(f"workers: {python}", file=sys.stderr)
    results = []
    for k, seed in enumerate(args.seeds):
        order = frameworks if k % 2 == 0 else frameworks[::-1]
        for fw in order:
            print(f"  {fw} seed {seed} ...", file=sys.stderr, flush=True)
            r = run_worker(python, fw, seed, args)
            print(f"    {mean_step(r):.3f} s/step, sampled acc {r['sampled_accuracy']:.3f}", file=sys.stderr)
            results.append(r)
    text = report(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
