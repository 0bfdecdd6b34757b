"""Per-token estimators of KL(pi || pi_ref) (chapter 03; Schulman, "Approximating KL divergence").

Direction convention (all three functions):

* tokens ``y`` are sampled from the policy ``pi`` (the one being trained / that sampled);
* ``logp = log pi(y)`` and ``ref_logp = log pi_ref(y)`` are evaluated at those tokens;
* the ratio is ``r = pi_ref(y) / pi(y) = exp(ref_logp - logp)``;
* the target is the reverse KL ``KL(pi || pi_ref) = E_{y~pi}[log pi(y) - log pi_ref(y)]``.

Then ``k1 = -log r``, ``k2 = (log r)^2 / 2`` and ``k3 = (r - 1) - log r``; ``k1`` and ``k3`` are
unbiased for ``KL(pi || pi_ref)``, ``k2`` is biased (it is unbiased for a second-order
approximation). Swapping the arguments (``r = pi / pi_ref`` under samples from ``pi``) does not
give the other KL: ``E_pi[pi/pi_ref - 1 - log(pi/pi_ref)] = chi^2(pi || pi_ref) - KL(pi || pi_ref)``.

All functions are elementwise on tensors of identical shape, e.g. ``(B, T)``; mask and reduce
the result yourself (e.g. with :func:`rlbook_code.logprobs.masked_mean`).
"""

from __future__ import annotations

import torch

__all__ = ["kl_k1", "kl_k2", "kl_k3", "MAX_LOG_RATIO"]

#: Default bound on ``|log r|`` in :func:`kl_k3`. exp(20) ~ 4.9e8 is finite in bfloat16,
#: float32 and float64 (not in float16: pass a smaller bound, e.g. 10, for float16 inputs);
#: a token whose log-ratio is beyond it is an outlier whose k3 would otherwise dominate the mean.
#: It is the same log-ratio clamp as verl's ``low_var_kl`` (which also caps k3 itself at 10).
MAX_LOG_RATIO = 20.0


def _check_pair(logp: torch.Tensor, ref_logp: torch.Tensor) -> None:
    if not isinstance(logp, torch.Tensor) or not isinstance(ref_logp, torch.Tensor):
        raise ValueError(
            f"logp and ref_logp must be tensors, got {type(logp).__name__} and {type(ref_logp).__name__}"
        )
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}"
        )
    if not logp.is_floating_point() or not ref_logp.is_floating_point():
        raise ValueError(
            f"logp and ref_logp must be floating-point tensors, got dtypes {logp.dtype} and {ref_logp.dtype}"
        )


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = -log r = logp - ref_logp, elementwise; unbiased for KL(pi || pi_ref), tokens from pi.

    Args:
        logp: ``(B, T)`` (any shape) log pi(y) of tokens sampled from pi.
        ref_logp: same shape, log pi_ref(y) of the same tokens.

    Returns:
        Same shape as the inputs (promoted float dtype). Can be negative per token; its mean
        over y ~ pi is KL(pi || pi_ref) >= 0. High variance when the policies are close.
    """
    _check_pair(logp, ref_logp)
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (log r)^2 / 2 with log r = ref_logp - logp, elementwise; tokens from pi.

    Non-negative, low variance, but **biased** for KL(pi || pi_ref): its expectation is an
    f-divergence that agrees with the KL to second order in ``log r``. For two Gaussians of
    equal unit variance and means ``mu`` apart, bias / KL = mu^2 / 4.
    Used as a loss (samples held fixed), its expected gradient E_pi[log(pi/pi_ref) grad log pi]
    equals grad KL(pi || pi_ref); k1 and k3 used that way do not (chapter 03).

    Args:
        logp: ``(B, T)`` (any shape) log pi(y) of tokens sampled from pi.
        ref_logp: same shape, log pi_ref(y).

    Returns:
        Same shape, >= 0.
    """
    _check_pair(logp, ref_logp)
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, *, max_log_ratio: float = MAX_LOG_RATIO) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(y) / pi(y) = exp(ref_logp - logp), elementwise.

    Unbiased for KL(pi || pi_ref) when y ~ pi (because E_pi[r] = 1), and >= 0 for every
    token (since log r <= r - 1): Schulman's estimator, used by GRPO as the KL penalty.
    Example: ``kl_k3(logp=1., ref_logp=0.)`` has log r = -1 and equals e^-1.

    Stability: the log-ratio is clamped to ``[-max_log_ratio, max_log_ratio]`` (default
    :data:`MAX_LOG_RATIO` = 20; the gradient is 0 outside that range) and k3 is computed as
    ``expm1(log r) - log r``, which avoids the overflow of ``exp`` and keeps the absolute
    error at about machine epsilon times ``|log r|`` near r = 1. The result is clamped at 0
    so rounding can never make it negative.

    Args:
        logp: ``(B, T)`` (any shape) log pi(y) of tokens sampled from pi (the policy).
        ref_logp: same shape, log pi_ref(y) (the reference policy), same tokens.
        max_log_ratio: positive bound on ``|ref_logp - logp|`` (keyword only).

    Returns:
        Same shape, >= 0.

    Warning:
        Passing the arguments in the other order estimates
        ``E_pi[pi/pi_ref - 1 - log(pi/pi_ref)] = chi^2(pi || pi_ref) - KL(pi || pi_ref)``, not a KL.
    """
    _check_pair(logp, ref_logp)
    if not (isinstance(max_log_ratio, (int, float)) and max_log_ratio > 0):
        raise ValueError(f"max_log_ratio must be a positive float, got {max_log_ratio!r}")
    log_r = (ref_logp - logp).clamp(-max_log_ratio, max_log_ratio)
    return (torch.expm1(log_r) - log_r).clamp_min(0.0)
