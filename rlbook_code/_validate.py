"""Input checks shared by the estimator modules (one wording for one mistake)."""

from __future__ import annotations

import torch


def check_mask(x: torch.Tensor, mask: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``mask`` is a bool tensor of ``x``'s shape.

    ``mask`` is True on response tokens. An integer or float 0/1 mask is refused rather than
    cast: ``x[mask]`` with a long tensor indexes rows instead of selecting entries.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True on response tokens), got {got}")
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of {name}, expected {tuple(x.shape)}, got {tuple(mask.shape)}")
