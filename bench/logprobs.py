"""Benchmark: per-token log-probs at an LLM-sized vocabulary on CPU (chapter 02).

Compares, for float logits of shape (rows, V) and one token per row:

* ``naive``      torch.log_softmax(logits, -1).gather(...)       (materializes (rows, V) output)
* ``lse_gather`` logits.gather(...) - torch.logsumexp(logits, -1) (torch's logsumexp makes
                 full-size temporaries internally)
* ``package``    rlbook_code.logprobs.token_logprobs(chunk_size=None)  (one block = all rows)
* ``chunked``    rlbook_code.logprobs.token_logprobs(chunk_size=C)

and, as the time reference, ``one_pass``: ``logits.amax(-1)``, a single read of the logits.

Memory is measured as the peak *resident set size* increase of a fresh subprocess per method
(Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` after the logits are allocated and
touched, then ``VmHWM - VmRSS`` before the call). tracemalloc does not see torch's CPU
allocations and torch has no CPU allocator statistics, so RSS is the honest measure: it counts
pages actually touched, at page granularity, including allocator overheads. Times are the
median of ``--repeats`` forward calls without autograd, with ``torch.set_num_threads`` set.

Usage::

    python bench/logprobs.py                      # rows=4096, V=151936, float32, chunk 256
    python bench/logprobs.py --rows 512 --vocab 32000 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

METHODS = ("one_pass", "naive", "lse_gather", "package", "chunked")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(method: str, rows: int, vocab: int, chunk_size: int, dtype: str, repeats: int, threads: int) -> dict:
    import torch

    from rlbook_code.logprobs import token_logprobs

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(rows, vocab, dtype=getattr(torch, dtype))
    for s in range(0, rows, 256):  # fill in blocks so that no full float32 temporary is made
        logits[s : s + 256] = torch.randn(min(256, rows - s), vocab, generator=g) * 3
    tokens = torch.randint(0, vocab, (rows,), generator=g)

    def run(lg, tk):
        if method == "one_pass":
            return lg.amax(-1)
        if method == "naive":
            return torch.log_softmax(lg.float(), -1).gather(-1, tk[:, None]).squeeze(-1)
        if method == "lse_gather":
            x = lg.float()
            return x.gather(-1, tk[:, None]).squeeze(-1) - torch.logsumexp(x, -1)
        if method == "package":
            return token_logprobs(lg, tk)
        if method == "chunked":
            return token_logprobs(lg, tk, chunk_size=chunk_size)
        raise ValueError(f"unknown method {method!r}")

    with torch.no_grad():
        run(logits[:2], tokens[:2])  # warm-up: one-off allocations (thread pools, kernels) not counted
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter VmHWM to the current RSS
        base = _status_kib("VmRSS")
        out = run(logits, tokens)
        peak = _status_kib("VmHWM")
        result = out.clone()
        del out
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(logits, tokens)
            times.append(time.perf_counter() - t0)
    return {
        "method": method,
        "peak_extra_mib": (peak - base) / 1024,
        "time_s": statistics.median(times),
        "output_mib": result.numel() * result.element_size() / 2**20,
        "checksum": float(result.double().sum()),
    }


def measure(
    rows: int = 4096,
    vocab: int = 151_936,
    chunk_size: int = 256,
    dtype: str = "float32",
    repeats: int = 3,
    threads: int = 2,
    methods: tuple[str, ...] = METHODS,
) -> list[dict]:
    """Run every method in a fresh subprocess and return one dict per method."""
    results = []
    for m in methods:
        cmd = [
            sys.executable, __file__, "--worker", m, "--rows", str(rows), "--vocab", str(vocab),
            "--chunk-size", str(chunk_size), "--dtype", dtype, "--repeats", str(repeats),
            "--threads", str(threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def format_table(results: list[dict], rows: int, vocab: int, chunk_size: int, dtype: str) -> str:
    full_mib = rows * vocab * 4 / 2**20
    block_mib = chunk_size * vocab * 4 / 2**20
    one_pass = next((r["time_s"] for r in results if r["method"] == "one_pass"), float("nan"))
    naive = next((r["time_s"] for r in results if r["method"] == "naive"), float("nan"))
    lines = [
        f"rows (B*T) = {rows}, V = {vocab}, logits dtype = {dtype}, chunk_size = {chunk_size}",
        f"one float32 (rows, V) tensor = {full_mib:.1f} MiB; one chunk block = {block_mib:.1f} MiB",
        "memory: peak RSS increase of a fresh process per method (VmHWM after clear_refs)",
        f"{'method':<12}{'peak extra MiB':>16}{'x full tensor':>15}{'time s':>10}{'x one_pass':>12}{'x naive':>9}",
    ]
    for r in results:
        lines.append(
            f"{r['method']:<12}{r['peak_extra_mib']:>16.1f}{r['peak_extra_mib'] / full_mib:>15.3f}"
            f"{r['time_s']:>10.3f}{r['time_s'] / one_pass:>12.2f}{r['time_s'] / naive:>9.2f}"
        )
    ch = next((r for r in results if r["method"] == "chunked"), None)
    if ch is not None:
        bound = 1.1 * (ch["output_mib"] + block_mib)
        lines.append(
            f"chunked memory target: peak extra <= 1.1 x (output + one block) = {bound:.1f} MiB -> "
            f"{'met' if ch['peak_extra_mib'] <= bound else 'NOT met'}"
        )
        lines.append(
            f"chunked time: {ch['time_s'] / naive:.2f} x one fused log_softmax pass (naive), "
            f"{ch['time_s'] / one_pass:.2f} x a pure read of the logits (amax; any exact method "
            "needs V exponentials per row, so this ratio is bounded below by exp throughput)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096, help="B*T positions")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size V (Qwen: 151936)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.worker, a.rows, a.vocab, a.chunk_size, a.dtype, a.repeats, a.threads)))
        return
    res = measure(a.rows, a.vocab, a.chunk_size, a.dtype, a.repeats, a.threads, tuple(a.methods.split(",")))
    print(json.dumps(res) if a.json else format_table(res, a.rows, a.vocab, a.chunk_size, a.dtype))


if __name__ == "__main__":
    main()
