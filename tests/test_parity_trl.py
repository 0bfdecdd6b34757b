"""Parity with TRL 1.16.0: rlbook's losses against ``GRPOTrainer._compute_loss`` itself (``make parity``).

TRL computes its GRPO losses inline in a trainer method, so the method is called on a trainer
built with ``object.__new__(GRPOTrainer)`` plus the attributes it reads (TRL's own tests do the
same); the log-probabilities it would compute from a model are handed to it by replacing
``_get_per_token_logps_and_entropies`` on that instance. No formula of TRL's is restated here.

Design differences pinned here and stated in ``book/trl_verl.md``:

* ``loss_type="cispo"``: TRL's ``epsilon_high`` is the *absolute* cap of the weight; rlbook's
  ``cispo_loss(eps_high=...)`` caps at ``1 + eps_high``.
* TRL's ``delta`` (two-sided clipping) equals rlbook's ``dual_clip``: both cap the weight of a
  negative-advantage token at the constant.
* ``use_bias_correction_kl`` (default True in 1.16) multiplies the KL term by the ratio; it is
  turned off to compare the KL terms, and rlbook has no such factor.
* The trainer is called in eval mode (no gradient-accumulation rescaling).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

pytestmark = pytest.mark.parity

trl = pytest.importorskip("trl", reason="TRL is installed by `make setup` (parity)")
from trl import GRPOTrainer  # noqa: E402

from rlbook_code import aggregation, clipping, kl  # noqa: E402

B, T = 8, 6


class _Accelerator:
    """What ``_compute_loss`` asks of accelerate, for one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logp, inputs, *, loss_type, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, level="token",
              delta=None):
    tr = object.__new__(GRPOTrainer)
    tr.model = types.SimpleNamespace(training=False)
    tr.accelerator = _Accelerator()
    tr.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1)
    tr.loss_type, tr.epsilon_low, tr.epsilon_high, tr.beta = loss_type, epsilon_low, epsilon_high, beta
    tr.importance_sampling_level = level
    tr.top_entropy_quantile = 1.0
    tr.off_policy_mask_threshold = None
    tr.use_vllm = False
    tr.vllm_importance_sampling_correction = False
    tr.aux_loss_enabled = False
    tr._entropy_bonus_enabled = False
    tr.current_gradient_accumulation_steps = 1
    tr.max_completion_length = T
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    return tr._compute_loss(None, inputs)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 2, 4, 1, 5, 6, 3, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = (logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0)
    ref = (logp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return {"logp": logp, "old": old, "ref": ref, "adv": adv, "mask": mask, "inputs": inputs}


def _both(ours, theirs, logp):
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    g1, g2 = torch.autograd.grad(ours, logp, retain_graph=True)[0], torch.autograd.grad(theirs, logp)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type, mode", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                             ("dr_grpo", "seq-mean-token-sum-norm"), ("dapo", "token-mean")])
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_clipped_losses_and_their_aggregations(data, loss_type, mode, eps_high):
    d = data
    adv_tok = d["adv"][:, None].expand(B, T)
    per_token, _ = clipping.ppo_clip_loss(d["logp"], d["old"], adv_tok, d["mask"], 0.2, eps_high)
    ours = aggregation.aggregate(per_token, d["mask"], mode, max_len=T, num_tokens=float(d["mask"].sum()))
    theirs = _trl_loss(d["logp"], d["inputs"], loss_type=loss_type, epsilon_high=eps_high)
    _both(ours, theirs, d["logp"])


def test_kl_term_is_k3_in_the_loss(data):
    d = data
    adv_tok = d["adv"][:, None].expand(B, T)
    per_token, _ = clipping.ppo_clip_loss(d["logp"], d["old"], adv_tok, d["mask"], 0.2, 0.2)
    per_token = per_token + 0.04 * kl.kl_k3(d["logp"], d["ref"])
    ours = aggregation.aggregate(per_token, d["mask"], "seq-mean-token-mean")
    theirs = _trl_loss(d["logp"], d["inputs"], loss_type="grpo", beta=0.04)
    _both(ours, theirs, d["logp"])


def test_delta_is_rlbooks_dual_clip(data):
    d = data
    adv_tok = d["adv"][:, None].expand(B, T)
    per_token, _ = clipping.ppo_clip_loss(d["logp"], d["old"], adv_tok, d["mask"], 0.2, 0.2, dual_clip=1.3)
    ours = aggregation.aggregate(per_token, d["mask"], "token-mean")
    theirs = _trl_loss(d["logp"], d["inputs"], loss_type="bnpo", delta=1.3)
    _both(ours, theirs, d["logp"])


def test_sequence_level_importance_sampling_is_gspo(data):
    d = data
    adv_tok = d["adv"][:, None].expand(B, T)
    per_token, _ = clipping.gspo_loss(d["logp"], d["old"], adv_tok, d["mask"], 0.2, 0.2)
    ours = aggregation.aggregate(per_token, d["mask"], "seq-mean-token-mean")
    theirs = _trl_loss(d["logp"], d["inputs"], loss_type="grpo", level="sequence")
    _both(ours, theirs, d["logp"])


@pytest.mark.parametrize("cap", [5.0, 1.28])
def test_cispo_absolute_cap_is_one_plus_eps_high(data, cap):
    d = data
    adv_tok = d["adv"][:, None].expand(B, T)
    per_token, _ = clipping.cispo_loss(d["logp"], d["old"], adv_tok, d["mask"], eps_low=None, eps_high=cap - 1.0)
    ours = aggregation.aggregate(per_token, d["mask"], "token-mean", num_tokens=float(d["mask"].sum()))
    theirs = _trl_loss(d["logp"], d["inputs"], loss_type="cispo", epsilon_high=cap)
    _both(ours, theirs, d["logp"])
