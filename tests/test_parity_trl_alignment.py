"""Parity with TRL 1.16's preference losses (``make parity``): ``DPOTrainer._compute_loss`` and
``RewardTrainer.compute_loss`` themselves, on trainers built with ``object.__new__`` and a stub
model that returns given log-probabilities (or rewards). No TRL formula is restated here.

Pinned differences (stated in chapter 14's notes and ``book/trl_verl.md``):

* TRL 1.16's ``sigmoid`` loss has no label smoothing: rlbook's conservative DPO
  (``dpo_loss(label_smoothing=eps)``) equals it only at ``eps = 0``; TRL's ``robust`` loss is a
  different, unbiased estimator (Chowdhury et al. 2024), not cDPO.
* TRL's ``ipo`` divides each completion's log-ratio by its token count before the square: it is
  rlbook's ``ipo_loss`` on *average* sequence log-probs (``sequence_logprobs(average=True)``).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

pytestmark = pytest.mark.parity

trl = pytest.importorskip("trl", reason="TRL is installed by `make setup` (parity)")
from trl import DPOTrainer, RewardTrainer  # noqa: E402

from rlbook_code import preference, reward_models  # noqa: E402

B, L = 6, 5


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _stub_trainer(cls, **attrs):
    tr = object.__new__(cls)
    tr.model = types.SimpleNamespace(training=False)
    tr.accelerator = _Accelerator()
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens = 0
    tr._tp_size = 1
    tr.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(tr, k, v)
    return tr


@pytest.fixture
def pairs():
    """Per-token log-probs of B chosen and B rejected completions (ragged), and references."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5, 4, 4, 2, 5, 1, 3])  # chosen rows, then rejected rows
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (2B, L)
    token_logp = torch.where(mask, -torch.rand(2 * B, L, generator=g, dtype=torch.float64) * 2, 0.0)
    token_logp.requires_grad_(True)
    ref_tok = torch.where(mask, token_logp.detach() + 0.3 * torch.randn(2 * B, L, generator=g, dtype=torch.float64), 0.0)
    return {"mask": mask, "tok": token_logp, "ref_tok": ref_tok}


def _trl_dpo(p, loss_type, beta):
    tr = _stub_trainer(DPOTrainer, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                       loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                       use_weighting=False)
    zeros = torch.zeros(2 * B, L, dtype=torch.float64)

    def model(**kw):  # TRL shifts by one position: it reads log_probs[:, -L:] against completion_mask[:, 1:]
        # as TRL's fused head: 0, and no gradient, where the label is -100 (outside the completion)
        return types.SimpleNamespace(log_probs=torch.where(p["mask"], p["tok"], 0.0), entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros(2 * B, L, dtype=torch.bool))

    full_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), p["mask"].long()], dim=1)  # (2B, L + 1)
    ref = p["ref_tok"].sum(1)
    inputs = {"input_ids": torch.zeros(2 * B, L + 1, dtype=torch.long), "attention_mask": torch.ones(2 * B, L + 1),
              "completion_mask": full_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    return tr._compute_loss(model, inputs, return_outputs=False)


def _grad_close(a, b, x):
    ga = torch.autograd.grad(a, x, retain_graph=True)[0]
    gb = torch.autograd.grad(b, x, retain_graph=True)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid(pairs, beta):
    seq = preference.sequence_logprobs(pairs["tok"], pairs["mask"])
    ref = preference.sequence_logprobs(pairs["ref_tok"], pairs["mask"])
    ours = preference.dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=beta).loss
    theirs = _trl_dpo(pairs, "sigmoid", beta)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    _grad_close(ours, theirs, pairs["tok"])


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_ipo_on_average_log_probs(pairs, tau):
    seq = preference.sequence_logprobs(pairs["tok"], pairs["mask"], average=True)
    ref = preference.sequence_logprobs(pairs["ref_tok"], pairs["mask"], average=True)
    ours = preference.ipo_loss(seq[:B], seq[B:], ref[:B], ref[B:], tau=tau).loss
    theirs = _trl_dpo(pairs, "ipo", tau)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    _grad_close(ours, theirs, pairs["tok"])


def test_pinned_difference_trls_sigmoid_has_no_label_smoothing(pairs):
    seq = preference.sequence_logprobs(pairs["tok"], pairs["mask"]).detach()
    ref = preference.sequence_logprobs(pairs["ref_tok"], pairs["mask"])
    cdpo = preference.dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=0.1, label_smoothing=0.1).loss
    robust = _trl_dpo(pairs, "sigmoid", 0.1)  # TRL's sigmoid has no label smoothing
    dpo = preference.dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=0.1).loss
    torch.testing.assert_close(robust.detach(), dpo, rtol=1e-10, atol=1e-12)
    assert not torch.isclose(cdpo, dpo)  # rlbook's cDPO has no TRL 1.16 counterpart


@pytest.mark.parametrize("margin, center", [(None, None), (0.5, None), (None, 0.01), (0.3, 0.05)])
def test_reward_trainer_bradley_terry(margin, center):
    g = torch.Generator().manual_seed(5)
    r = (torch.randn(2 * B, 1, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    tr = _stub_trainer(RewardTrainer, args=types.SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
    if margin is not None:
        inputs["margin"] = torch.full((B,), margin, dtype=torch.float64)
    theirs = tr.compute_loss(lambda **kw: types.SimpleNamespace(logits=r), inputs)
    ours = reward_models.bradley_terry_loss(r[:B, 0], r[B:, 0], margin=margin or 0.0, center_coef=center or 0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    _grad_close(ours, theirs, r)
