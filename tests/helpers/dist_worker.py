"""A torchrun worker for tests/test_distributed.py: the book's trainer CLI with one test hook.

    torchrun --nproc_per_node 2 tests/helpers/dist_worker.py MODE [trainer arguments ...]

MODE ``plain``: the trainer as is. ``feed=PATH``: every step trains on the rollouts saved at
PATH (``torch.save((batch, items, scores, stats))``), so only the update half of a step runs.
``fail=RANK``: rank RANK raises at step 2.
"""

import os
import sys

import torch

from rlbook_code import train

mode, argv = sys.argv[1], sys.argv[2:]
if mode.startswith("feed="):
    fed = torch.load(mode.split("=", 1)[1], weights_only=False)
    train.collect_rollouts = lambda state, step: fed
elif mode.startswith("fail="):
    bad_rank, real_step = int(mode.split("=", 1)[1]), train.train_step

    def train_step(state, step):
        if step == 2 and int(os.environ.get("RANK", "0")) == bad_rank:
            raise RuntimeError(f"rank {bad_rank} failed on purpose at step 2")
        return real_step(state, step)

    train.train_step = train_step
sys.exit(train.main(argv))
