"""Advantages: group normalization (GRPO, Dr. GRPO), leave-one-out (RLOO), whitening, GAE.

Chapter 04 derives every function here. Conventions used throughout:

* ``rewards`` of an outcome-reward method are one scalar per sampled response, shape ``(B,)``,
  laid out in **contiguous groups** of size ``G = group_size``: rows ``[k*G, (k+1)*G)`` are the
  ``G`` responses to prompt ``k`` (``B = num_prompts * G``).
* An advantage is "how much better than the baseline": positive means *make this response more
  likely*. A policy-gradient loss is ``-A * log pi`` (see :mod:`rlbook_code.reinforce`).
* Advantages are constants for the policy gradient. Every function here returns a tensor with
  no autograd history (computed under ``torch.no_grad``), in the dtype of its input; the
  arithmetic itself is done in float64.
* Bad input raises ``ValueError`` naming what was expected and what was received.

Choices, and what TRL and verl do
---------------------------------
* **Which standard deviation.** :func:`group_advantages` divides by the *Bessel-corrected*
  sample standard deviation ``sqrt(sum (r - mean)^2 / (G - 1))`` -- ``torch.std``'s default.
  TRL's ``GRPOTrainer`` (``rewards.view(-1, G).std(dim=1)``) and verl's
  ``compute_grpo_outcome_advantage`` (``torch.std`` per group) both use it, so our numbers match
  theirs. (The population std, dividing by ``G``, would give advantages larger by the constant
  ``sqrt(G / (G - 1))``; for binary rewards neither choice changes the sign or the ranking.)
* **Which epsilon.** ``A = (r - mean) / (std + eps)`` with ``eps`` *added to the std*, default
  ``1e-6`` (verl's default). TRL adds ``1e-4``. The epsilon only matters when the std is tiny
  but not zero; it is **not** what makes a zero-variance group safe here: a group whose
  rewards are all exactly equal gets advantage exactly ``0`` by an explicit test
  (``max == min``), never ``0 / eps`` rounding noise and never NaN.
* **Groups of one.** ``group_size < 2`` raises ``ValueError``: one sample has no within-group
  baseline and no std. (verl silently falls back to mean 0, std 1, i.e. the raw reward; TRL
  returns 0.)
* **Whitening** (:func:`whiten`) uses the Bessel-corrected variance and
  ``eps = 1e-8`` *inside* the square root, ``(x - mean) / sqrt(var + 1e-8)``, as TRL's
  ``masked_whiten`` and verl's ``masked_whiten`` do.
* **GAE** (:func:`gae`) returns raw advantages; verl's ``compute_gae_advantage_return`` whitens
  them inside, here that is a separate explicit call to :func:`whiten`.
"""

from __future__ import annotations

import torch

from rlbook_code._validate import check_mask

__all__ = ["group_advantages", "rloo_advantages", "gae", "whiten"]

_SCALES = ("group", "batch", "none")


# --------------------------------------------------------------------------- validation
def _check_rewards(rewards: torch.Tensor, group_size: int) -> None:
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape (B,), got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (a group of one has no baseline and no std), got {group_size}"
        )
    n = rewards.shape[0]
    if n == 0 or n % group_size != 0:
        raise ValueError(
            f"rewards of shape ({n},) cannot be split into groups of size {group_size}: "
            f"expected B = num_prompts * {group_size} with num_prompts >= 1"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")


# --------------------------------------------------------------------------- group methods
@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    r"""Group-relative advantages of GRPO and its variants.

    For response ``i`` in group ``g`` (contiguous rows of size ``G``):

    * ``scale="group"`` (GRPO, DeepSeekMath):
      :math:`A_i = (r_i - \bar r_g) / (s_g + \varepsilon)` with :math:`\bar r_g` the group mean
      and :math:`s_g` the **Bessel-corrected** group std (divide by ``G - 1``).
    * ``scale="batch"`` (TRL's ``scale_rewards="batch"``): the group mean is still subtracted,
      but the divisor is the Bessel-corrected std of *all* ``B`` rewards of the batch,
      :math:`A_i = (r_i - \bar r_g) / (s_{\text{batch}} + \varepsilon)`. This keeps one scale for
      every prompt and so removes the difficulty weighting of ``"group"``.
    * ``scale="none"`` (Dr. GRPO): :math:`A_i = r_i - \bar r_g`.

    A group whose rewards are all exactly equal gets :math:`A_i = 0` exactly in every mode (it
    carries no learning signal; dividing its zero deviations by ``eps`` would give 0 up to
    rounding, this makes it exact). In ``"batch"`` mode a batch with all rewards equal gives 0.

    Args:
        rewards: ``(B,)`` floating tensor, one scalar reward per response, groups contiguous.
        group_size: ``G >= 2``; must divide ``B`` (else ``ValueError``).
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        eps: added to the std (not the variance); ``1e-6`` as verl (TRL uses ``1e-4``).

    Returns:
        ``(B,)`` advantages, same dtype as ``rewards``, no autograd history. Each group's
        advantages sum to zero (up to rounding) in every mode.
    """
    _check_rewards(rewards, group_size)
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if not (eps >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = rewards.detach().to(torch.float64).view(-1, group_size)  # (P, G)
    centered = r - r.mean(dim=1, keepdim=True)  # (P, G)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (P, 1)
    if scale == "group":
        std = r.std(dim=1, keepdim=True)  # Bessel: / (G - 1)
        adv = centered / (std + eps)
    elif scale == "batch":
        flat = r.reshape(-1)
        std = flat.std() if flat.amax() != flat.amin() else flat.new_zeros(())
        adv = centered / (std + eps) if (std + eps) > 0 else torch.zeros_like(centered)
    else:
        adv = centered
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(rewards.dtype)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024).

    :math:`A_i = r_i - \frac{1}{G-1}\sum_{j \ne i} r_j = \frac{G}{G-1}\,(r_i - \bar r_g)`.

    The baseline of sample ``i`` does not depend on ``r_i``, so ``E[A_i \nabla \log \pi(y_i)]``
    is exactly the policy gradient (no bias), unlike the mean-including baseline ``r_i - \bar r``
    whose expected gradient is ``(G-1)/G`` times the true one. verl's ``rloo`` estimator uses the
    same ``G/(G-1)`` form. Computed here from the explicit leave-one-out sum
    ``(sum_g - r_i) / (G - 1)``. A group with all rewards equal gives exactly 0.

    Args:
        rewards: ``(B,)`` floating tensor, groups of size ``G`` contiguous.
        group_size: ``G >= 2``; must divide ``B``.

    Returns:
        ``(B,)`` advantages in the dtype of ``rewards``, no autograd history.
    """
    _check_rewards(rewards, group_size)
    r = rewards.detach().to(torch.float64).view(-1, group_size)  # (P, G)
    loo_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # (P, G)
    adv = r - loo_mean
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(rewards.dtype)


# --------------------------------------------------------------------------- whitening
@torch.no_grad()
def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    r"""Masked whitening: ``(x - mean) / sqrt(var + 1e-8)`` over the entries where ``mask``.

    ``mean`` and the **Bessel-corrected** ``var`` (divide by ``n - 1``) are computed over the
    ``n = mask.sum()`` selected entries of the whole tensor (batch whitening; REINFORCE++ and
    PPO's advantage normalization). With ``shift_mean=False`` the mean is added back, so only
    the scale changes (TRL and verl use that for rewards). Entries where ``mask`` is False are
    returned as 0. A constant selection gives ``(x - mean) / 1e-4``, i.e. 0 up to rounding,
    never NaN.

    Args:
        x: floating tensor of any shape, e.g. ``(B,)`` or ``(B, T)``.
        mask: bool tensor of the same shape, True on the entries to use.
        shift_mean: subtract the mean (default) or keep it.

    Returns:
        Tensor of ``x``'s shape and dtype, no autograd history.

    Raises:
        ValueError: shape or dtype mismatch, fewer than 2 selected entries (the variance is
        undefined), or NaN/inf among the selected entries.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor")
    check_mask(x, mask)
    n = int(mask.sum())
    if n < 2:
        raise ValueError(f"whiten needs at least 2 entries where mask is True, got {n}")
    xd = x.detach().to(torch.float64)
    if not torch.isfinite(xd[mask]).all():
        raise ValueError("x contains NaN or inf where mask is True")
    xd = torch.where(mask, xd, torch.zeros_like(xd))
    mean = xd.sum() / n
    var = ((xd - mean) ** 2 * mask).sum() / (n - 1)
    out = (xd - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    out = torch.where(mask, out, torch.zeros_like(out))
    return out.to(x.dtype)


# --------------------------------------------------------------------------- GAE
@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalized advantage estimation (Schulman et al. 2016) over response tokens.

    Token ``t`` of row ``b`` is an action; ``values[b, t]`` is :math:`V(s_t)`, the value of the
    state *before* token ``t`` is emitted, and ``rewards[b, t]`` is the reward received after
    it (for an outcome reward: the score on the last response token, usually minus a per-token
    KL penalty). Only positions where ``mask`` is True take part: they are the steps of the
    episode, in order, and masked positions are skipped as if absent (so a prompt prefix, right
    padding, or masked tool-output tokens in the middle are all handled). After the last
    response token the episode ends: :math:`V = 0`. With :math:`t'` the next *unmasked*
    position,

    .. math::
        \delta_t = r_t + \gamma V(s_{t'}) - V(s_t), \qquad
        A_t = \delta_t + \gamma\lambda A_{t'}, \qquad R_t = A_t + V(s_t).

    ``lam = 1`` gives Monte-Carlo returns minus the value (high variance, no bias from V);
    ``lam = 0`` gives the one-step TD error. No whitening is done here: call :func:`whiten`.

    Args:
        rewards: ``(B, T)`` floating per-token rewards.
        values: ``(B, T)`` floating value predictions (detached from the critic).
        mask: ``(B, T)`` bool, True on response tokens.
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` in ``rewards``' dtype, 0 where mask is False.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or not rewards.is_floating_point():
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a floating tensor of shape (B, T), got {got}")
    if not isinstance(values, torch.Tensor) or values.shape != rewards.shape or not values.is_floating_point():
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"values must be a floating tensor of shape {tuple(rewards.shape)}, got {got}")
    check_mask(rewards, mask, "rewards")
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    r = torch.where(mask, rewards.detach().to(torch.float64), 0.0)
    v = torch.where(mask, values.detach().to(torch.float64), 0.0)
    if not (torch.isfinite(r).all() and torch.isfinite(v).all()):
        raise ValueError("rewards or values contain NaN or inf where mask is True")
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_value = r.new_zeros(B)  # V of the next unmasked state; 0 after the end
    next_adv = r.new_zeros(B)  # A at the next unmasked position
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a_t, 0.0)
        next_value = torch.where(m, v[:, t], next_value)
        next_adv = torch.where(m, a_t, next_adv)
    returns = torch.where(mask, adv + v, 0.0)
    return adv.to(rewards.dtype), returns.to(rewards.dtype)
