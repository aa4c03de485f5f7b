"""Server-side averaging, used by every method: FedAvg and its per-group form.

Pure functions over state dicts; every strategy's `aggregate` is a few lines on top:
  FedAvg:        theta = sum_i w_i theta_i / sum_i w_i            (per key)
  per group g:   theta_g = FedAvg over the updates of group g   (FedLEASE's experts, IFCA's clusters)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch

Tensors = dict[str, torch.Tensor]


class Grouped(Protocol):
    """What `group_means` needs of an update: its group and its tensors."""

    group: int
    tensors: Tensors


U = TypeVar("U", bound=Grouped)


def weighted_mean(tensors: list[Tensors], weights: list[float] | None = None) -> Tensors:
    """Per-key weighted mean of state dicts (FedAvg), computed in float64. Weights need not sum to 1."""
    if not tensors:
        raise ValueError("cannot average zero updates")
    w = torch.tensor(weights if weights is not None else [1.0] * len(tensors), dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("aggregation weights must be non-negative with a positive sum")
    w = w / w.sum()
    return {key: sum(wi * t[key].double() for wi, t in zip(w, tensors, strict=True)).to(tensors[0][key].dtype)
            for key in tensors[0]}


def group_means(updates: Sequence[U], weights: Callable[[list[U]], list[float]]) -> dict[int, Tensors]:
    """FedAvg within each group that reported this round; a group with no update is absent (its
    model stays as it was)."""
    groups: dict[int, list[U]] = {}
    for u in updates:
        groups.setdefault(u.group, []).append(u)
    return {g: weighted_mean([u.tensors for u in members], weights(members))
            for g, members in sorted(groups.items())}
