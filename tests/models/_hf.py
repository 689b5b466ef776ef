"""Helpers for the transformers parity tests of ``tests/models``."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _norm_named(name: str, p) -> bool:
    return "norm" in name


def randomize_(model, seed: int, is_scale: Callable[[str, "torch.Tensor"], bool] = _norm_named):
    """Set every weight of a transformers model, in place, to N(0, 0.2), and the norm scales
    (``is_scale(name, tensor)``) to 1 + N(0, 0.2), drawn in ``named_parameters`` order from a
    generator seeded with ``seed``: biases, norms and every path then matter and the logits
    are O(1). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if is_scale(name, p) else noise)
    return model.eval()
