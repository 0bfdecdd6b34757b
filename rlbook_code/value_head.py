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

__all__ = ["ValueHead"]


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
