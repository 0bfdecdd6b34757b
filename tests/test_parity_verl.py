"""Parity with verl 0.9.1: rlbook's estimators against verl's own functions (``make parity``).

Every comparison calls verl's function on the same tensors; none restates verl's formula. Where
verl differs by design, the difference is pinned by a test of its own (and stated in
``book/trl_verl.md``):

* its seq-mean aggregations drop fully masked rows and add 1e-8 to per-row token counts;
* its dual clip is always on (``clip_ratio_c = 3.0`` by default): rlbook's ``dual_clip=None``
  is verl with an unreachable ``clip_ratio_c``;
* it clamps log-ratios (PPO, CISPO at ±20; GSPO's sequence ratio at 10) and k3 at ±10 / ±20:
  test ratios are kept moderate so no clamp binds;
* its GAE returns whitened advantages: rlbook's ``gae`` returns raw ones; ``whiten`` of
  them equals verl's.

verl pins transformers<5.11; its ``core_algos`` and ``rollout_corr_helper`` import and run with the
book's transformers 5.23, so it is installed with ``--no-deps`` (``requirements-nodeps.txt``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.parity

core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is installed by `make setup` (parity)")
rch = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
from verl.workers.config import ActorConfig  # noqa: E402

from rlbook_code import advantages, aggregation, clipping, kl, offpolicy, value_head  # noqa: E402

B, T, G = 12, 7, 4


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 3, 5, 1, 7, 6, 2, 4, 7, 5, 3, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right-padded, every row >= 1 token
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = (logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = (torch.rand(B, generator=g) > 0.5).double() + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)
    return {"mask": mask, "logp": logp, "old": old, "adv": adv, "rewards": rewards, "lengths": lengths, "g": g}


def _actor(**kw) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=1, use_torch_compile=False, **kw)


def _outcome(rewards, mask):
    """Outcome reward on each row's last response token, as verl's advantage estimators read it."""
    tok = torch.zeros(mask.shape, dtype=rewards.dtype)
    last = mask.sum(1) - 1
    tok[torch.arange(mask.shape[0]), last] = rewards
    return tok


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)  # both sides may share a graph
    return g


# ----------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("scale, norm_by_std", [("group", True), ("none", False)])
def test_grpo_and_drgrpo_advantages(batch, scale, norm_by_std):
    mask, r = batch["mask"], batch["rewards"]
    index = np.repeat(np.arange(B // G), G)
    theirs, _ = core.compute_grpo_outcome_advantage(_outcome(r, mask), mask.double(), index, epsilon=1e-6,
                                                    norm_adv_by_std_in_grpo=norm_by_std)
    ours = advantages.group_advantages(r, G, scale=scale, eps=1e-6)
    torch.testing.assert_close(ours[:, None] * mask, theirs, rtol=1e-10, atol=1e-12)


def test_rloo_advantages(batch):
    mask, r = batch["mask"], batch["rewards"]
    index = np.repeat(np.arange(B // G), G)
    theirs, _ = core.compute_rloo_outcome_advantage(_outcome(r, mask), mask.double(), index)
    ours = advantages.rloo_advantages(r, G)
    torch.testing.assert_close(ours[:, None] * mask, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_gae_returns_and_whitened_advantages(batch, gamma, lam):
    mask = batch["mask"]
    g = batch["g"]
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    their_adv, their_ret = core.compute_gae_advantage_return(rewards, values, mask.double(), gamma, lam)
    adv, ret = advantages.gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(torch.where(mask, ret, 0.0), torch.where(mask, their_ret, 0.0), rtol=1e-10, atol=1e-12)
    # verl whitens its advantages over the response tokens; so does rlbook's whiten
    torch.testing.assert_close(advantages.whiten(adv, mask), torch.where(mask, their_adv, 0.0), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_modes_values_and_gradients(batch, mode):
    mask, x = batch["mask"], batch["logp"]
    per_token = torch.where(mask, x * batch["adv"], 0.0)
    ours = aggregation.aggregate(per_token, mask, mode, max_len=T)
    theirs = core.agg_loss(per_token, mask.double(), mode, loss_scale_factor=T)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)  # verl: +1e-8 in seq-mean-token-mean
    torch.testing.assert_close(_grad(ours, x), _grad(theirs, x), rtol=1e-7, atol=1e-9)


def test_pinned_difference_fully_masked_rows(batch):
    """verl's seq-mean modes drop a fully masked row from the mean; rlbook counts it (its loss is
    0), so the two differ by the factor (rows kept)/(rows): a documented design difference."""
    mask = batch["mask"].clone()
    mask[0] = False
    per_token = torch.where(mask, batch["logp"].detach(), 0.0)
    ours = aggregation.aggregate(per_token, mask, "seq-mean-token-sum")
    theirs = core.agg_loss(per_token, mask.double(), "seq-mean-token-sum")
    torch.testing.assert_close(ours * B / (B - 1), theirs, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- KL
@pytest.mark.parametrize("ours, name", [(kl.kl_k1, "k1"), (kl.kl_k2, "k2"), (kl.kl_k3, "k3")])
def test_kl_estimators(batch, ours, name):
    logp, ref = batch["logp"], batch["old"]
    a, b = ours(logp, ref), core.kl_penalty(logp, ref, name)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(a.sum(), logp), _grad(b.sum(), logp), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- policy losses
@pytest.mark.parametrize("eps_low, eps_high, dual", [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.28, 3.0)])
def test_ppo_clip_clip_higher_and_dual_clip(batch, eps_low, eps_high, dual):
    logp, old, adv, mask = batch["logp"], batch["old"], batch["adv"], batch["mask"]
    per_token, m = clipping.ppo_clip_loss(logp, old, adv, mask, eps_low, eps_high, dual_clip=dual)
    ours = aggregation.aggregate(per_token, mask, "token-mean")
    cfg = _actor(clip_ratio=eps_low, clip_ratio_low=eps_low, clip_ratio_high=eps_high,
                 clip_ratio_c=dual if dual is not None else 1e9)  # verl's dual clip is always on
    theirs, tm = core.compute_policy_loss_vanilla(old, logp, adv, mask.double(), "token-mean", cfg)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(ours, logp), _grad(theirs, logp), rtol=1e-10, atol=1e-12)
    assert m["clip_frac_low"] + m["clip_frac_high"] >= 0.0  # both report a clip fraction; definitions differ


def test_gspo(batch):
    logp, old, adv, mask = batch["logp"], batch["old"], batch["adv"], batch["mask"]
    seq_adv = adv[:, :1].expand_as(adv)  # GSPO: one advantage per sequence
    per_token, _ = clipping.gspo_loss(logp, old, seq_adv, mask, 3e-4, 4e-4)
    ours = aggregation.aggregate(per_token, mask, "seq-mean-token-mean")
    cfg = _actor(clip_ratio=3e-4, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    theirs, _ = core.compute_policy_loss_gspo(old, logp, seq_adv, mask.double(), "seq-mean-token-mean", cfg)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(_grad(ours, logp), _grad(theirs, logp), rtol=1e-7, atol=1e-9)


def test_cispo_with_verls_relative_caps(batch):
    """verl's CISPO clamps the weight to [1 - low, 1 + high], as rlbook does (TRL's cap is absolute)."""
    logp, old, adv, mask = batch["logp"], batch["old"], batch["adv"], batch["mask"]
    per_token, _ = clipping.cispo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    ours = aggregation.aggregate(per_token, mask, "token-mean")
    cfg = _actor(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    theirs, _ = core.compute_policy_loss_cispo(old, logp, adv, mask.double(), "token-mean", cfg)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(ours, logp), _grad(theirs, logp), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_clipped_value_loss(batch, clip):
    mask, g = batch["mask"], batch["g"]
    values = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_(True)
    old = values.detach() + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    ours, frac = value_head.value_loss(values, old, returns, mask, clip)
    theirs, their_frac = core.compute_value_loss(values, returns, old, mask.double(), clip, "token-mean")
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(ours, values), _grad(theirs, values), rtol=1e-10, atol=1e-12)
    assert frac == pytest.approx(float(their_frac))


# ----------------------------------------------------------------------------- rollout correction
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_importance_weights_tis(batch, level):
    logp, behav, mask = batch["logp"].detach(), batch["old"], batch["mask"]
    if level == "sequence":  # keep sequence ratios moderate: verl clamps the summed log-ratio
        behav = logp + 0.05 * torch.randn(B, T, generator=batch["g"], dtype=torch.float64)
    ours, _ = offpolicy.importance_weights(logp, behav, mask, level=level, mode="truncate", high=2.0)
    theirs, _ = rch.compute_rollout_correction_weights(logp - behav, mask.double(), rollout_is=level,
                                                       rollout_is_threshold=2.0)
    torch.testing.assert_close(torch.where(mask, ours, 0.0), torch.where(mask, theirs, 0.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_importance_weights_mis_icepop(batch, level):
    logp, behav, mask = batch["logp"].detach(), batch["old"], batch["mask"]
    if level == "sequence":
        behav = logp + 0.05 * torch.randn(B, T, generator=batch["g"], dtype=torch.float64)
    ours, _ = offpolicy.importance_weights(logp, behav, mask, level=level, mode="mask", low=0.8, high=1.2)
    theirs, _ = rch.compute_rollout_correction_weights(logp - behav, mask.double(), rollout_is=level,
                                                       rollout_is_threshold="0.8_1.2")
    torch.testing.assert_close(torch.where(mask, ours, 0.0), torch.where(mask, theirs, 0.0), rtol=1e-10, atol=1e-12)
