"""Direct-alignment losses on sequence log-probs: DPO, cDPO, IPO, SimPO, ORPO, KTO (chapter 14).

Chapter 14 derives every function here from the KL-regularised objective of chapter 03,

.. math::

    \\max_\\pi\\ \\mathbb{E}_{y\\sim\\pi}[r(x, y)] - \\beta\\,\\mathrm{KL}(\\pi\\,\\|\\,\\pi_{\\text{ref}})
    \\quad\\Rightarrow\\quad
    \\pi^*(y\\mid x) = \\pi_{\\text{ref}}(y\\mid x)\\,e^{r(x, y)/\\beta} / Z(x),

so that ``r = beta * log(pi*/pi_ref) + beta * log Z``: a policy *is* a reward model up to a
per-prompt constant, and in a Bradley–Terry likelihood ``P(y_w > y_l) = sigma(r_w - r_l)`` the
constant cancels.

Conventions (every function):

* Inputs are **sequence** log-probs, one number per completion, shape ``(B,)``: the sum over
  the response tokens of :func:`rlbook_code.logprobs.token_logprobs` (DPO, IPO, KTO), or their
  mean (SimPO, ORPO); :func:`sequence_logprobs` computes both from a ``(B, T)`` tensor and its
  mask. ``chosen`` is the preferred completion ``y_w`` of a pair, ``rejected`` the other, ``y_l``.
* ``ref_*`` log-probs come from the frozen reference policy and are treated as constants
  (detached inside).
* The *log-ratio difference* is
  ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``; positive when the
  policy prefers the chosen completion more than the reference does.
* Each loss returns a :class:`PreferenceLoss`: the mean loss over the batch (differentiable,
  to *minimise*), the per-pair losses ``(B,)``, and the detached *implicit rewards* of the
  chosen and rejected completions (DPO/IPO/KTO: ``beta * log(pi/pi_ref)``; SimPO: ``beta`` times
  the average log-prob; ORPO: ``lam`` times the average log-prob, as TRL logs them).
* Bad input raises ``ValueError``: a shape mismatch, an empty batch, a NaN or inf, a
  non-positive ``beta``/``tau``, a label smoothing outside ``[0, 0.5)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from rlbook_code._validate import check_mask

__all__ = [
    "PreferenceLoss",
    "sequence_logprobs",
    "log_ratio_difference",
    "dpo_loss",
    "ipo_loss",
    "simpo_loss",
    "log1mexp",
    "orpo_loss",
    "kto_reference_point",
    "kto_loss",
]


@dataclass
class PreferenceLoss:
    """What every loss of this module returns.

    Attributes:
        loss: scalar, the mean of ``losses`` (differentiable).
        losses: ``(B,)`` per-pair (KTO: per-completion) losses (differentiable).
        chosen_rewards: ``(B,)`` detached implicit rewards of the chosen completions
            (KTO: of the desirable ones, ``(B_d,)``).
        rejected_rewards: ``(B,)`` the same for the rejected (KTO: undesirable) completions.
        paired: True when ``chosen_rewards[i]`` and ``rejected_rewards[i]`` belong to one pair
            (every loss but KTO); then ``margins`` and ``accuracy`` are defined per pair.
        kl: KTO's detached reference point ``z0`` (None for the other losses).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    paired: bool = True
    kl: Optional[torch.Tensor] = None

    @property
    def margins(self) -> torch.Tensor:
        """``(B,)`` chosen minus rejected implicit reward, per pair (paired losses only)."""
        if not self.paired:
            raise ValueError("margins are per pair; KTO's completions are not paired (use metrics())")
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Scalar: the fraction of pairs whose chosen implicit reward is strictly higher."""
        if not self.paired:
            raise ValueError("accuracy is per pair; KTO's completions are not paired (use metrics())")
        return (self.margins > 0).float().mean()

    def metrics(self) -> dict[str, float]:
        """Python floats: ``loss``, ``reward/chosen``, ``reward/rejected``, ``reward/margin``
        (difference of the means), and ``reward/accuracy`` (paired) or ``kto/kl`` (KTO). A side
        without completions (a KTO batch with no undesirable one, say) has no key: never NaN."""
        c, r = self.chosen_rewards.float(), self.rejected_rewards.float()
        out = {"loss": float(self.loss.detach())}
        if c.numel():
            out["reward/chosen"] = float(c.mean())
        if r.numel():
            out["reward/rejected"] = float(r.mean())
        if c.numel() and r.numel():
            out["reward/margin"] = out["reward/chosen"] - out["reward/rejected"]
        if self.paired:
            out["reward/accuracy"] = float(self.accuracy)
        if self.kl is not None:
            out["kto/kl"] = float(self.kl)
        return out


# --------------------------------------------------------------------------- checks
def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_seq(**tensors: torch.Tensor) -> None:
    """Each tensor is a non-empty, finite, floating-point ``(B,)`` tensor, all of one shape."""
    shape = None
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 1:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 1-D tensor of sequence log-probs (B,), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty: a preference loss needs at least one pair")
        if shape is None:
            shape, first = x.shape, name
        elif x.shape != shape:
            raise ValueError(f"{name} must have the shape of {first} {tuple(shape)}, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x.detach()).all()):
            raise ValueError(f"{name} contains NaN or inf")


# --------------------------------------------------------------------------- sequence log-probs
def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sequence log-prob of each completion from its per-token log-probs.

    Args:
        token_logp: ``(B, T)`` per-token log-probs (chapter 02's ``token_logprobs`` /
            ``rollout.completion_logprobs``), differentiable.
        mask: ``(B, T)`` bool, True on response tokens (rows may have different lengths).
        average: False: the sum over response tokens, ``log pi(y | x)`` (DPO, IPO, KTO).
            True: the mean, ``log pi(y | x) / |y|`` (SimPO's and ORPO's length normalisation).

    Returns:
        ``(B,)``. Masked positions are ignored even if they hold NaN or inf.

    Raises:
        ValueError: ``token_logp`` not ``(B, T)`` floating point, a bad mask, NaN/inf at a
            response token, or (``average=True``) a row without response tokens, whose
            mean is undefined.
    """
    if not isinstance(token_logp, torch.Tensor) or token_logp.dim() != 2 or not token_logp.is_floating_point():
        got = (tuple(token_logp.shape), token_logp.dtype) if isinstance(token_logp, torch.Tensor) \
            else type(token_logp).__name__
        raise ValueError(f"token_logp must be a floating-point (B, T) tensor, got {got}")
    check_mask(token_logp, mask, "token_logp")
    if token_logp.shape[0] == 0:
        raise ValueError("token_logp is empty (B == 0)")
    kept = torch.where(mask, token_logp, torch.zeros((), dtype=token_logp.dtype, device=token_logp.device))
    if not bool(torch.isfinite(kept.detach()).all()):
        raise ValueError("token_logp contains NaN or inf at a response token (mask True)")
    total = kept.sum(dim=1)  # (B,)
    if not average:
        return total
    counts = mask.sum(dim=1)  # (B,)
    if bool((counts == 0).any()):
        raise ValueError(f"average=True: rows {torch.nonzero(counts == 0).flatten().tolist()} have no "
                         "response token (mean undefined)")
    return total / counts.to(total.dtype)


def log_ratio_difference(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor,
                         ref_chosen_logp: torch.Tensor, ref_rejected_logp: torch.Tensor) -> torch.Tensor:
    """``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``, ``(B,)``,
    with the reference terms detached (DPO's and IPO's argument)."""
    _check_seq(chosen_logp=chosen_logp, rejected_logp=rejected_logp, ref_chosen_logp=ref_chosen_logp,
               ref_rejected_logp=ref_rejected_logp)
    return (chosen_logp - ref_chosen_logp.detach()) - (rejected_logp - ref_rejected_logp.detach())


# --------------------------------------------------------------------------- DPO, cDPO, IPO
def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023) and conservative DPO (label smoothing).

    Per pair, with ``h`` from :func:`log_ratio_difference` and ``eps = label_smoothing``::

        loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    ``eps = 0`` is DPO: the negative Bradley–Terry log-likelihood of the label "chosen wins"
    under the implicit reward ``beta * log(pi/pi_ref)``. ``eps > 0`` is cDPO: the label is
    trusted only with probability ``1 - eps`` (it is the expected DPO loss of a label flipped
    with probability ``eps``; TRL 1.16's ``sigmoid`` loss has no such term, and its ``robust``
    loss is a different estimator: ``tests/test_parity_trl_alignment.py`` pins both).

    Fixed points, in ``h`` for one pair type: labels drawn with ``P(chosen wins) = p`` give
    ``sigma(beta * h*) = p``, i.e. ``beta * h* = logit(p)`` (with ``p = sigma(r_w - r_l)`` the
    policy becomes ``pi_ref * exp(r / beta) / Z``); deterministic labels (``p = 1``) give
    **no finite fixed point**: the gradient ``-beta * sigma(-beta h)`` never vanishes and
    ``h -> +inf``; cDPO turns that into ``sigma(beta * h*) = 1 - eps``.

    Args:
        chosen_logp, rejected_logp: ``(B,)`` sequence log-probs (sums) under the policy.
        ref_chosen_logp, ref_rejected_logp: ``(B,)`` the same under the reference (detached).
        beta: KL coefficient ``beta > 0`` (default 0.1, the paper's and TRL's).
        label_smoothing: ``eps`` in ``[0, 0.5)``; 0 is DPO.
    """
    _check_positive("beta", beta)
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    h = log_ratio_difference(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return PreferenceLoss(
        loss=losses.mean(), losses=losses,
        chosen_rewards=beta * (chosen_logp - ref_chosen_logp).detach(),
        rejected_rewards=beta * (rejected_logp - ref_rejected_logp).detach())


def ipo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, *, tau: float = 0.1) -> PreferenceLoss:
    """IPO (Azar et al. 2023, eq. 17): ``loss = (h - 1/(2 tau))^2`` per pair.

    A squared loss regresses ``h`` onto a finite target, so even deterministic labels have a
    finite fixed point: ``h* = 1/(2 tau)`` (with labels ``P(chosen wins) = p`` drawn for both
    orders, ``h* = (2p - 1)/(2 tau)``). Smaller ``tau`` is a larger target: ``tau`` plays the
    role of DPO's ``beta`` (TRL passes its ``beta`` as ``tau``). The paper's ``h`` uses sums of
    log-probs; TRL's ``loss_type="ipo"`` uses per-token *averages*: pass those to match it.
    Rewards reported: ``tau * log(pi/pi_ref)``.

    Args:
        chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp: ``(B,)``, as in :func:`dpo_loss`.
        tau: regularisation ``tau > 0`` (default 0.1).
    """
    _check_positive("tau", tau)
    h = log_ratio_difference(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    losses = (h - 1.0 / (2.0 * tau)) ** 2
    return PreferenceLoss(
        loss=losses.mean(), losses=losses,
        chosen_rewards=tau * (chosen_logp - ref_chosen_logp).detach(),
        rejected_rewards=tau * (rejected_logp - ref_rejected_logp).detach())


# --------------------------------------------------------------------------- SimPO
def simpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5) -> PreferenceLoss:
    """SimPO (Meng et al. 2024): ``loss = -log sigma(beta * (avg_w - avg_l) - gamma)`` per pair.

    No reference model: the implicit reward is ``beta`` times the *average* log-prob
    ``log pi(y|x) / |y|`` (so longer completions are not favoured by summing more negative
    terms), and ``gamma >= 0`` is a target margin. Rewards reported: ``beta * avg``.

    Fixed points: with ``gamma = 0`` and labels ``P(chosen wins) = sigma(r_w - r_l)`` for both
    orders, ``beta * avg = r + const``, i.e., for completions of one length ``|y|``,
    ``pi(y) ∝ exp(|y| r(y) / beta)``: DPO's optimum with the reference replaced by the uniform
    distribution and ``beta`` by ``beta/|y|``.
    Deterministic labels (and any ``gamma``): no finite fixed point; the rejected
    completions' probability is driven to 0, as with DPO.

    Args:
        chosen_avg_logp, rejected_avg_logp: ``(B,)`` average per-token log-probs
            (:func:`sequence_logprobs` with ``average=True``).
        beta: reward scale ``> 0`` (default 2.0; the paper tunes it around 2).
        gamma: target reward margin ``>= 0`` (default 0.5; TRL's ``simpo_gamma``).
    """
    _check_positive("beta", beta)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    _check_seq(chosen_avg_logp=chosen_avg_logp, rejected_avg_logp=rejected_avg_logp)
    losses = -F.logsigmoid(beta * (chosen_avg_logp - rejected_avg_logp) - gamma)
    return PreferenceLoss(loss=losses.mean(), losses=losses, chosen_rewards=beta * chosen_avg_logp.detach(),
                          rejected_rewards=beta * rejected_avg_logp.detach())


# --------------------------------------------------------------------------- ORPO
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Mächler 2012):
    ``log(-expm1(x))`` for ``x > -log 2`` and ``log1p(-exp(x))`` below. ``x`` is clamped to at
    most ``-tiny`` (the smallest positive normal of its dtype), so ``x = 0`` (a probability
    that rounded to 1) gives a large finite negative number instead of ``-inf``."""
    tiny = torch.finfo(x.dtype).tiny
    x = x.clamp(max=-tiny)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, chosen_nll: torch.Tensor, *,
              lam: float = 0.1) -> PreferenceLoss:
    """ORPO (Hong et al. 2024): SFT on the chosen completion plus an odds-ratio preference term.

    With ``p = exp(avg log-prob)`` (the geometric-mean token probability) and
    ``odds = p / (1 - p)``, per pair::

        log_odds_ratio = (avg_w - log(1 - e^avg_w)) - (avg_l - log(1 - e^avg_l))
        loss = chosen_nll - lam * log sigma(log_odds_ratio)

    with the ``log(1 - e^x)`` of :func:`log1mexp`. No reference model. Rewards reported:
    ``lam * avg`` (TRL's ``chosen_rewards``).

    Fixed point (deterministic labels): the odds-ratio term vanishes only as the rejected
    completions' probability goes to 0, and then what remains is SFT: the policy converges to
    the distribution of the chosen completions in the data (for pairs sampled from ``pi_ref``
    and labelled by a 0/1 verifier, ``pi_ref`` conditioned on being correct, rejection
    sampling's fixed point).

    Args:
        chosen_avg_logp, rejected_avg_logp: ``(B,)`` average per-token log-probs (``<= 0``).
        chosen_nll: ``(B,)`` the SFT loss of each chosen completion (e.g. ``-chosen_avg_logp``,
            the per-token mean; differentiable).
        lam: weight of the odds-ratio term, ``>= 0`` (default 0.1; TRL's ``beta``).
    """
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    _check_seq(chosen_avg_logp=chosen_avg_logp, rejected_avg_logp=rejected_avg_logp, chosen_nll=chosen_nll)
    for name, x in (("chosen_avg_logp", chosen_avg_logp), ("rejected_avg_logp", rejected_avg_logp)):
        if bool((x.detach() > 0).any()):
            raise ValueError(f"{name} must be <= 0 (an average log-probability), got max {float(x.max()):.4g}")
    log_odds = (chosen_avg_logp - log1mexp(chosen_avg_logp)) - (rejected_avg_logp - log1mexp(rejected_avg_logp))
    losses = chosen_nll - lam * F.logsigmoid(log_odds)
    return PreferenceLoss(loss=losses.mean(), losses=losses, chosen_rewards=lam * chosen_avg_logp.detach(),
                          rejected_rewards=lam * rejected_avg_logp.detach())


# --------------------------------------------------------------------------- KTO
def kto_reference_point(mismatched_logp: torch.Tensor, mismatched_ref_logp: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: an estimate of ``KL(pi || pi_ref)`` from *mismatched* pairs
    (completion ``y'`` of another prompt scored under prompt ``x``), ``mean(log pi - log pi_ref)``
    clamped at 0 and **detached** (Ethayarajh et al. 2024; TRL shifts the completions of a
    batch by one). Returns a scalar tensor.

    Args:
        mismatched_logp, mismatched_ref_logp: ``(B,)`` sequence log-probs of the mismatched
            pairs under the policy and the reference.
    """
    _check_seq(mismatched_logp=mismatched_logp, mismatched_ref_logp=mismatched_ref_logp)
    return (mismatched_logp - mismatched_ref_logp).mean().clamp(min=0).detach()


def kto_loss(logp: torch.Tensor, ref_logp: torch.Tensor, desirable: torch.Tensor, kl_ref: torch.Tensor | float, *,
             beta: float = 0.1, w_desirable: float = 1.0, w_undesirable: float = 1.0) -> PreferenceLoss:
    """KTO (Ethayarajh et al. 2024): unpaired completions, each desirable or not.

    With the log-ratio ``r = log pi(y) - log pi_ref(y)`` and the reference point
    ``z0 = max(kl_ref, 0)`` (detached: no gradient flows through it), per completion::

        desirable:    w_desirable   * (1 - sigma(beta * (r - z0)))
        undesirable:  w_undesirable * (1 - sigma(beta * (z0 - r)))

    and ``loss`` is the mean over all ``B`` completions (TRL's). A completion is pushed above
    (desirable) or below (undesirable) the policy's own KL to the reference. The loss is
    bounded and has no finite minimiser: desirable log-ratios grow and undesirable ones fall
    until ``sigma`` saturates, where the gradient ``beta * sigma * (1 - sigma)`` dies away (it
    slows down rather than diverging like DPO's). The paper suggests weights with
    ``w_desirable * n_desirable / (w_undesirable * n_undesirable)`` in ``[1, 4/3]``.
    Rewards reported: ``beta * r`` of the desirable (chosen) and undesirable (rejected) ones.

    Args:
        logp, ref_logp: ``(B,)`` sequence log-probs (sums) under the policy and the reference.
        desirable: ``(B,)`` bool, True for desirable completions.
        kl_ref: the reference point (a scalar tensor, e.g. from :func:`kto_reference_point`, or
            a float); clamped at 0 and detached here.
        beta: ``> 0`` (default 0.1). w_desirable, w_undesirable: ``> 0`` (default 1).
    """
    _check_positive("beta", beta)
    _check_positive("w_desirable", w_desirable)
    _check_positive("w_undesirable", w_undesirable)
    _check_seq(logp=logp, ref_logp=ref_logp)
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool or desirable.shape != logp.shape:
        got = (desirable.dtype, tuple(desirable.shape)) if isinstance(desirable, torch.Tensor) \
            else type(desirable).__name__
        raise ValueError(f"desirable must be a bool tensor of shape {tuple(logp.shape)}, got {got}")
    z0 = torch.as_tensor(kl_ref, dtype=logp.dtype, device=logp.device).detach()
    if z0.numel() != 1 or not bool(torch.isfinite(z0).all()):
        raise ValueError(f"kl_ref must be one finite number, got {kl_ref!r}")
    z0 = z0.reshape(()).clamp(min=0)
    r = logp - ref_logp.detach()  # (B,)
    losses = torch.where(desirable, w_desirable * (1.0 - torch.sigmoid(beta * (r - z0))),
                         w_undesirable * (1.0 - torch.sigmoid(beta * (z0 - r))))
    rewards = beta * r.detach()
    return PreferenceLoss(loss=losses.mean(), losses=losses, chosen_rewards=rewards[desirable],
                          rejected_rewards=rewards[~desirable], paired=False, kl=z0)
