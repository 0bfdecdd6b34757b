"""The score-function (REINFORCE) policy-gradient loss (chapter 01).

For a sequence policy ``pi(y | x) = prod_t pi(y_t | x, y_<t)`` the gradient of the
expected reward is

    grad J = E_{y ~ pi}[ A(y) * sum_t grad log pi(y_t | x, y_<t) ],

where ``A`` is the reward minus any baseline that does not depend on ``y``.
:func:`reinforce_loss` returns the per-token surrogate whose gradient, averaged
over samples, is ``-grad J`` (a loss to *minimise*).
"""

from __future__ import annotations

import torch

from rlbook_code._validate import check_mask

__all__ = ["reinforce_loss"]


def _check_logp_mask(logp: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(logp, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"logp and mask must be tensors, got {type(logp).__name__} and {type(mask).__name__}"
        )
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (B, T), got shape {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"logp must be a floating-point tensor, got dtype {logp.dtype}")
    check_mask(logp, mask, "logp")


def reinforce_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token REINFORCE loss ``-A * log pi(y_t | x, y_<t)``, zero where ``mask`` is False.

    Args:
        logp: ``(B, T)`` float. Log-probabilities of the sampled tokens under the policy
            being trained, ``log pi_theta(y_t | x, y_<t)``; differentiable.
        advantages: ``(B,)`` (one value per sequence, broadcast over its tokens) or
            ``(B, T)`` (one per token), float. Treated as constants: they are detached,
            so no gradient flows into them (the estimator requires this).
        mask: ``(B, T)`` bool, True on response tokens that count. Masked positions give
            exactly 0 loss and 0 gradient, even if ``logp`` is ``-inf`` or NaN there.

    Returns:
        ``(B, T)`` per-token loss in ``logp``'s dtype, ``-A * logp`` on the mask and 0 elsewhere.
        Sign convention: *minimising* the reduced loss *ascends* the expected reward,
        since ``grad(-A log pi) = -A grad log pi``. Reduce it with
        :func:`rlbook_code.aggregation.aggregate`; summing over tokens and averaging over
        sequences gives an unbiased estimate of ``-grad J``.

    Raises:
        ValueError: on non-tensor input, wrong ranks, shape mismatches, a non-bool mask or
            non-floating ``logp``/``advantages``.
    """
    _check_logp_mask(logp, mask)
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a tensor, got {type(advantages).__name__}")
    if not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating-point tensor, got dtype {advantages.dtype}")
    B, T = logp.shape
    if advantages.shape == (B,):
        adv = advantages.detach()[:, None]
    elif advantages.shape == (B, T):
        adv = advantages.detach()
    else:
        raise ValueError(
            f"advantages must have shape (B,) = ({B},) or (B, T) = ({B}, {T}), "
            f"got {tuple(advantages.shape)}"
        )
    adv = adv.to(logp.dtype)
    return torch.where(mask, -adv * logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
