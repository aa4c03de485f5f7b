"""Exact byte accounting of what crosses the wire, from the tensors themselves (dtype aware)."""

from __future__ import annotations

import torch


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())

