"""Data parallel on ``torch.distributed``: the plumbing the trainer needs, and nothing else (chapter 12).

Run the trainer on N processes with torchrun (gloo on CPU, NCCL on GPUs, chosen from
``device``)::

    torchrun --nproc_per_node 2 -m rlbook_code.train --config configs/grpo.yaml --set num_threads=1
    # several machines: torchrun's own --nnodes / --node-rank / --rdzv-endpoint, unchanged

What is sharded and what is reduced, step by step:

1. **Rollouts.** The step's prompts are cut into generation chunks of ``generation_batch_size``
   prompts (default: ``prompts_per_step / N``); chunk ``k`` is sampled by rank
   ``k // (chunks / N)``, i.e. each rank samples a contiguous share, with the seed of the chunk's
   *global* start index. The ranks then exchange their chunks (:func:`gather_objects`), so every
   rank holds the whole batch, exactly the batch a single process with the same
   ``generation_batch_size`` samples. Verifier scores, advantages and metrics are computed from
   it, identically on every rank.
2. **No-grad passes** (old / reference log-probs, values): each rank scores its contiguous share
   of the rows (:func:`local_rows`), and the results are exchanged.
3. **Updates.** Each minibatch is a set of *global* row indices, shuffled identically on every
   rank; a rank computes the loss of the rows it owns, normalised by the minibatch's *global*
   token and sequence counts (chapter 06), so the per-rank losses *sum* to the single-process
   loss. After the backward passes the gradients are summed over ranks
   (:func:`all_reduce_grads`, an explicit all-reduce rather than DDP, whose averaging would divide
   by N and whose forward wrapper the book's shared-prompt pass does not go through), then
   clipped and stepped identically everywhere, so the replicas never drift apart.
4. **Files.** Rank 0 alone writes ``metrics.jsonl``, checkpoints, evaluations and ``final/``.

A rank that raises ends the run: its ``main`` prints the traceback and exits non-zero, torchrun
sees the failed worker, stops the others (which would otherwise wait in their next collective)
and reports which rank failed with which exit code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["DistInfo", "init", "info", "is_main", "world_size", "rank", "chunk_starts", "local_rows",
           "gather_objects", "all_reduce_grads", "all_reduce_sums", "barrier", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None


_INFO = DistInfo()


def info() -> DistInfo:
    return _INFO


def world_size() -> int:
    return _INFO.world_size


def rank() -> int:
    return _INFO.rank


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints."""
    return _INFO.rank == 0


def init(device: str) -> tuple[DistInfo, str]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without it, a single process.

    Returns ``(info, device)``: on CUDA the device becomes ``cuda:<local_rank>``.

    Raises:
        ValueError: ``device`` is CUDA but this node has fewer GPUs than local ranks.
    """
    global _INFO
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _INFO = DistInfo()
        return _INFO, device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} needs a GPU, but this node has {torch.cuda.device_count()}")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    _INFO = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, backend=backend)
    return _INFO, device


def shutdown() -> None:
    """Leave the process group (a no-op for a single process)."""
    global _INFO
    if _INFO.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _INFO = DistInfo()


def barrier() -> None:
    if _INFO.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def chunk_starts(n: int, chunk: int, *, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Start indices of the generation chunks a rank samples (this process's by default): the
    chunks of ``range(0, n, chunk)``, dealt out in contiguous blocks. Raises ValueError unless
    the chunks divide evenly among the ranks (so every rank samples as many and the union is
    the whole batch)."""
    starts = list(range(0, n, chunk))
    w = _INFO.world_size if world_size is None else world_size
    r = _INFO.rank if rank is None else rank
    if len(starts) % w:
        raise ValueError(f"{len(starts)} generation chunks of {chunk} prompts cannot be shared by {w} ranks: "
                         f"choose generation_batch_size so that prompts_per_step / generation_batch_size is "
                         f"a multiple of {w}")
    per = len(starts) // w
    return starts[r * per:(r + 1) * per]


def local_rows(n: int, *, rank: int | None = None, world_size: int | None = None) -> range:
    """A rank's contiguous share of ``n`` rows (this process's by default; the last ranks get
    one row fewer when ``n`` does not divide evenly)."""
    w = _INFO.world_size if world_size is None else world_size
    r = _INFO.rank if rank is None else rank
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    if _INFO.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _INFO.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks, in place (one flat all-reduce). A parameter
    without a gradient on this rank (it owned no row of the minibatch) contributes zeros."""
    if _INFO.world_size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over ranks (keys may differ between ranks: a missing key counts 0)."""
    if _INFO.world_size == 1:
        return dict(values)
    out: dict[str, float] = {}
    for d in gather_objects(dict(values)):
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out
