"""The PPO critic: a small value head on the policy's final hidden states.

Choice (documented in chapter 09): the critic is **not** a separate language model. It is a
two-layer MLP that reads the policy's last hidden state at the position that predicts
completion token ``t`` (``rollout.completion_logprobs(..., with_hidden=True)``), i.e. the state
:math:`s_t` *before* token ``t`` is emitted, and returns :math:`V(s_t)`.

* Cost: one extra ``H x hidden + hidden`` matmul per token, no second transformer forward.
  A separate critic of the policy's size (as in InstructGPT) doubles memory and compute; at the
  book's scale the shared trunk is the only affordable choice and is what many RLHF codebases
  call a "value head" (TRL's ``AutoModelForCausalLMWithValueHead``).
* Interference: by default (``value_detach=True`` in :class:`~rlbook_code.train.TrainConfig`)
  the value loss does not flow into the trunk, so the policy's features are shaped only by the
  policy loss and the critic is a learned probe on them. With ``value_detach=False`` the value
  loss also trains the trunk (weighted by ``vf_coef``).
* Initialisation: the output layer starts at zero, so :math:`V \\equiv 0` at step 0 and the first
  GAE advantages are the (discounted) rewards themselves.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ValueHead", "seeded_value_head", "value_loss"]


class ValueHead(nn.Module):
    """``V(s_t) = w_2^T tanh(W_1 h_t + b_1) + b_2`` on hidden states ``h`` of shape ``(B, T, H)``.

    Computed in float32 whatever the trunk's dtype. Returns ``(B, T)``.
    """

    def __init__(self, hidden_size: int, width: int = 64) -> None:
        super().__init__()
        if hidden_size < 1 or width < 1:
            raise ValueError(f"hidden_size and width must be >= 1, got {hidden_size}, {width}")
        self.fc = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.fc.in_features:
            raise ValueError(f"hidden must have shape (B, T, {self.fc.in_features}), got {tuple(hidden.shape)}")
        return self.out(torch.tanh(self.fc(hidden.float()))).squeeze(-1)  # (B, T)


def seeded_value_head(hidden_size: int, width: int, seed: int, device: str | torch.device = "cpu") -> ValueHead:
    """A :class:`ValueHead` whose initial weights depend on ``seed`` alone: drawn under a forked
    generator, so creating it neither reads nor advances the global torch RNG of the run."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        head = ValueHead(hidden_size, width)
    return head.to(device)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, *, num_tokens: float | None = None) -> tuple[torch.Tensor, float]:
    r"""PPO's (clipped) value loss, a token mean over the response (chapter 09).

    .. math::
        \ell_t = \tfrac12 \max\big((V_t - R_t)^2,\ (V^{old}_t + \mathrm{clip}(V_t - V^{old}_t, -c, c) - R_t)^2\big)

    with :math:`V` the values being trained, :math:`V^{old}` those of the rollout pass and
    :math:`R` the GAE returns; ``clip=None`` is the plain :math:`\tfrac12 (V_t - R_t)^2`. The max
    makes the clip pessimistic, as in PPO's policy loss: a value that moved more than :math:`c`
    away from :math:`V^{old}` gets no gradient *towards* the return from the clipped branch.

    Args:
        values, old_values, returns: ``(B, T)`` floats (``old_values`` and ``returns`` carry no
            gradient).
        mask: ``(B, T)`` bool, True on response tokens.
        clip: the clip range :math:`c > 0`, or None.
        num_tokens: the token count to divide by (the whole minibatch's, under gradient
            accumulation); None: ``mask.sum()``.

    Returns:
        ``(loss (scalar), clip_frac)``: the fraction of response tokens where the clipped branch
        is the larger (0.0 without clipping).
    """
    from rlbook_code import aggregation
    from rlbook_code.logprobs import masked_mean

    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(f"values, old_values, returns and mask must share a shape, received "
                         f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, received {clip}")
    err = (values - returns) ** 2
    clip_frac = 0.0
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_c = (clipped - returns) ** 2
        clip_frac = float(masked_mean((err_c > err).float(), mask))
        err = torch.maximum(err, err_c)
    loss = aggregation.aggregate(torch.where(mask, 0.5 * err, 0.0), mask, "token-mean", num_tokens=num_tokens)
    return loss, clip_frac
