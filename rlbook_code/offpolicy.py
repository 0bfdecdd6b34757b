"""Importance-sampling corrections for off-policy batches: TIS, MIS (IcePop), decoupled PPO.

Chapter 11 derives every function here. Three policies appear, all evaluated at the *same*
tokens, which were sampled from the behaviour policy :math:`\\mu`:

* ``logp`` ``(B, T)``: :math:`\\log\\pi_\\theta(y_t \\mid x, y_{<t})`, the policy being trained
  (differentiable where a loss uses it);
* ``behav_logp`` ``(B, T)``: :math:`\\log\\mu(y_t \\mid \\dots)`, the weights *or the engine* that
  sampled the tokens (a stale copy of the learner, a bfloat16 sampler, another temperature),
  recorded by the sampler at generation time (``RolloutBatch.logprobs``), never recomputed by
  the learner: recomputing them would hide exactly the mismatch they measure;
* ``prox_logp`` ``(B, T)``: :math:`\\log\\pi_{\\text{prox}}`, the proximal policy the trust
  region is centred on; in the trainer, the learner's weights when the batch arrives (the
  "old" pass of PPO), i.e. the policy that *would* have sampled the batch on-policy.

``mask`` ``(B, T)`` is bool, True on response tokens. Every ratio is written *target over
behaviour*: :math:`\\rho_t = \\pi(y_t)/\\mu(y_t) = \\exp(\\log\\pi - \\log\\mu)`, so that
:math:`\\mathbb{E}_{y\\sim\\mu}[\\rho\\, f(y)] = \\mathbb{E}_{y\\sim\\pi}[f(y)]`. Log-ratios are
clamped to ``[-20, 20]`` before ``exp`` (``clipping.LOG_RATIO_CLAMP``), as in chapter 05.

Diagnostics (python floats, computed without gradient) returned by :func:`importance_weights`:

* ``"ess"``: normalized effective sample size :math:`(\\sum w)^2 / (n \\sum w^2)` of the raw
  ratios :math:`\\rho` over the ``n`` units (response tokens at ``level="token"``, sequences at
  ``level="sequence"``); 1 on-policy, towards :math:`1/n` when one weight dominates.
* ``"truncated_frac"`` / ``"masked_frac"``: fraction of units whose weight the mode changed
  (capped by ``truncate``, zeroed by ``mask``); the other key is 0.
* ``"max_abs_log_ratio"``: :math:`\\max |\\log\\rho|` over the units (before the clamp).
* ``"kl_behav"``: mean over response tokens of :math:`k_3 = (\\rho_t - 1) - \\log\\rho_t \\ge 0`
  with the *token* ratio, an unbiased estimate of the per-token
  :math:`\\mathrm{KL}(\\mu\\,\\|\\,\\pi)` (tokens come from :math:`\\mu`; chapter 03's direction rule).
* ``"weight_mean"``: mean of the returned weights over the response tokens.
"""

from __future__ import annotations

import math

import torch

from rlbook_code._validate import check_mask
from rlbook_code.clipping import LOG_RATIO_CLAMP, ppo_clip_loss

__all__ = ["importance_weights", "decoupled_ppo_loss", "LEVELS", "MODES"]

LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")


def _check_pair(name: str, x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape (B, T), got {got}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of logp, expected {tuple(ref.shape)}, got {tuple(x.shape)}")
    check_mask(x, mask, name)
    x = torch.where(mask, x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf at a response token (mask True)")
    return x


def _check_bounds(low: float | None, high: float) -> None:
    if not (isinstance(high, (int, float)) and math.isfinite(high) and high > 0):
        raise ValueError(f"high must be a finite number > 0, got {high}")
    if low is not None and not (0 <= low < high):
        raise ValueError(f"low must be None or satisfy 0 <= low < high={high}, got {low}")


@torch.no_grad()
def importance_weights(
    logp: torch.Tensor,
    behav_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    low: float | None = None,
    high: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""Detached importance weights of target ``logp`` against behaviour ``behav_logp``.

    ``level="token"``: :math:`\rho_t = \pi(y_t)/\mu(y_t)`, one weight per token.
    ``level="sequence"``: :math:`\rho = \prod_t \pi(y_t)/\mu(y_t) = \exp\sum_t \log\rho_t`
    (the masked sum over the response, **not** GSPO's length-normalised mean), the same
    weight broadcast to every token of the sequence: the unbiased weight of a whole response,
    with a variance that grows exponentially with its length.

    ``mode="truncate"`` (TIS, Yao et al. 2025): :math:`w = \min(\rho, \text{high})`, and
    :math:`w = \max(w, \text{low})` when ``low`` is given. Biased (towards the behaviour
    policy) where it binds, with bounded variance.
    ``mode="mask"`` (MIS; IcePop): :math:`w = \rho` where ``low <= rho <= high``, else 0 (the
    token, or the whole sequence, is dropped from the gradient). ``low=None``: no lower bound.

    In the trainer ``logp`` is the proximal policy's (the learner's weights when the batch
    arrived), so ``w`` corrects the sampler's lag or engine mismatch and is multiplied into the
    per-token policy loss: :math:`\mathbb{E}_\mu[w\,\ell] \approx \mathbb{E}_{\pi}[\ell]`.

    Args:
        logp: ``(B, T)`` target log-probs (detached here).
        behav_logp: ``(B, T)`` behaviour log-probs of the same tokens.
        mask: ``(B, T)`` bool, True on response tokens (at least one).
        level: ``"token"`` or ``"sequence"``.
        mode: ``"truncate"`` or ``"mask"``.
        low: lower bound (``0 <= low < high``) or None.
        high: upper bound, ``> 0``.

    Returns:
        ``(weights (B, T), diagnostics)``: weights in ``logp``'s dtype, 0 where ``mask`` is
        False; diagnostics as in the module docstring.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_bounds(low, high)
    if not isinstance(logp, torch.Tensor):
        raise ValueError(f"logp must be a tensor of shape (B, T), got {type(logp).__name__}")
    logp = _check_pair("logp", logp, logp, mask)
    behav_logp = _check_pair("behav_logp", behav_logp, logp, mask)
    if not bool(mask.any()):
        raise ValueError("mask selects no response token: the weights and their diagnostics are undefined")
    tok_lr = logp - behav_logp  # (B, T), 0 where masked
    if level == "token":
        unit_lr = tok_lr  # (B, T)
        units = mask
    else:
        unit_lr = tok_lr.sum(dim=1, keepdim=True)  # (B, 1): log of the product of token ratios
        units = mask.any(dim=1, keepdim=True)  # (B, 1): sequences with a response
    rho = torch.exp(unit_lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo = 0.0 if low is None else float(low)
    if mode == "truncate":
        w = rho.clamp(min=lo, max=float(high))
        changed = (rho > high) | (rho < lo)
    else:
        changed = (rho > high) | (rho < lo)
        w = torch.where(changed, torch.zeros_like(rho), rho)
    w_tok = torch.where(mask, w.expand_as(mask), torch.zeros((), dtype=w.dtype))  # (B, T)

    m = units.to(torch.float64)
    n = m.sum()
    r64 = rho.to(torch.float64) * m
    frac = float((changed & units).sum() / n)
    t64 = tok_lr.to(torch.float64)
    k3 = (torch.exp(t64.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - 1.0 - t64) * mask
    diag = {
        "ess": float(r64.sum() ** 2 / (n * (r64**2).sum())),
        "truncated_frac": frac if mode == "truncate" else 0.0,
        "masked_frac": frac if mode == "mask" else 0.0,
        "max_abs_log_ratio": float(unit_lr[units].abs().max()),
        "kl_behav": float(k3.sum() / mask.sum()),
        "weight_mean": float(w_tok.to(torch.float64).sum() / mask.sum()),
    }
    return w_tok.to(logp.dtype), diag


def decoupled_ppo_loss(
    logp: torch.Tensor,
    prox_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    max_behav_weight: float | None = 5.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""Decoupled PPO (AReaL; Fu et al. 2025, after Hilton et al. 2022), per token.

    .. math::
        \ell_t = -\,\frac{\pi_{\text{prox}}(y_t)}{\mu(y_t)}\,
        \min\big(r_t A_t,\; \mathrm{clip}(r_t, 1-\varepsilon_{low}, 1+\varepsilon_{high})\,A_t\big),
        \qquad r_t = \frac{\pi_\theta(y_t)}{\pi_{\text{prox}}(y_t)}

    Tokens come from the behaviour policy :math:`\mu`. The behaviour weight
    :math:`w_t = \pi_{\text{prox}}/\mu` (detached) moves the expectation from :math:`\mu` to
    :math:`\pi_{\text{prox}}`; the clip keeps :math:`\pi_\theta` near :math:`\pi_{\text{prox}}`,
    not near the stale sampler, so the trust region does not shrink as the lag grows. Tokens
    with :math:`w_t >` ``max_behav_weight`` are dropped (weight 0), as AReaL does
    (``behav_imp_weight_cap``); None: no cap.

    When ``prox_logp == behav_logp`` every :math:`w_t = \exp(0) = 1` exactly and the result is
    :func:`rlbook_code.clipping.ppo_clip_loss` of ``(logp, prox_logp)`` bit for bit.

    Args:
        logp: ``(B, T)`` current log-probs (differentiable).
        prox_logp: ``(B, T)`` proximal log-probs (detached inside).
        behav_logp: ``(B, T)`` behaviour (sampler) log-probs.
        advantages: ``(B,)`` or ``(B, T)``.
        mask: ``(B, T)`` bool, True on response tokens (at least one).
        eps_low, eps_high: clip range of :math:`r_t`.
        max_behav_weight: cap on :math:`w_t` (``> 0``), or None.

    Returns:
        ``(per_token_loss (B, T), metrics)``: ``ppo_clip_loss``'s metrics (of :math:`r_t`), plus
        ``"behav_weight_mean"`` (mean kept :math:`w_t` over response tokens, dropped ones as 0)
        and ``"behav_dropped_frac"`` (fraction of response tokens dropped by the cap).
    """
    if max_behav_weight is not None and not (math.isfinite(max_behav_weight) and max_behav_weight > 0):
        raise ValueError(f"max_behav_weight must be a finite number > 0 or None, got {max_behav_weight}")
    loss, metrics = ppo_clip_loss(logp, prox_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high)
    prox = _check_pair("prox_logp", prox_logp, logp, mask)
    behav = _check_pair("behav_logp", behav_logp, logp, mask)
    w = torch.exp((prox - behav).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).to(loss.dtype)  # (B, T), detached
    dropped = mask & (w > max_behav_weight) if max_behav_weight is not None else torch.zeros_like(mask)
    w = torch.where(dropped | ~mask, torch.zeros_like(w), w)
    loss = w * loss
    with torch.no_grad():
        n = mask.sum()
        metrics["behav_weight_mean"] = float(w.to(torch.float64).sum() / n)
        metrics["behav_dropped_frac"] = float(dropped.sum() / n)
    return loss, metrics
