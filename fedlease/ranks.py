"""One client's local training on several devices (`training.deepspeed.ranks_per_client`).

A client with more than one GPU trains its local round as a data-parallel DeepSpeed group: one spawned
process per device, each building the same model from the same download and seed, each taking its
share of every batch's rows (`rank_share`); DeepSpeed averages the gradients (and with ZeRO-1/2 shards
the optimizer state across the ranks). The batch of `training.batch_size` examples and the number of
optimizer steps stay the params', so a client's round is the same optimisation on one device or N
(exactly, up to float rounding, for a per-example mean loss and no dropout; dropout draws other masks
per share). Rank 0 writes the upload and the local state; the others only train.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from fedlease.isolation import await_processes, start_process

#: set in every rank process of a client's group (so the call inside does not spawn again)
RANK_GROUP_ENV = "FEDLEASE_RANK_GROUP"


def in_rank_group() -> bool:
    return os.environ.get(RANK_GROUP_ENV) == "1"


def rank_and_world() -> tuple[int, int]:
    """This process's rank and its group's size; (0, 1) outside a rank group."""
    if not in_rank_group():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def rank_share(tensors: dict[str, torch.Tensor], rank: int, world: int, row_weights: torch.Tensor | None = None
               ) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's contiguous share of a batch's rows and the factor its mean loss is scaled by, so that
    DeepSpeed's average over the ranks equals the whole batch's mean gradient: the share's part of the
    loss's denominator x world. `row_weights`: each row's part of that denominator (its number of scored
    tokens for a token-mean loss, its class weight for a class-weighted mean; None: 1 per row). A batch
    with fewer rows than ranks (an epoch's last) goes whole to every rank (factor 1). Pure."""
    rows = next(iter(tensors.values())).shape[0]
    if rows < world:
        return tensors, 1.0
    index = torch.arange(rows).tensor_split(world)[rank]
    start, stop = int(index[0]), int(index[-1]) + 1
    weights = torch.ones(rows) if row_weights is None else row_weights.double().cpu()
    total = float(weights.sum())
    factor = float(weights[start:stop].sum()) * world / total if total > 0 else 1.0
    return {k: v[start:stop] for k, v in tensors.items()}, factor


def claim_device() -> None:
    """A rank process takes its own GPU before anything touches CUDA (else every rank starts on GPU 0)."""
    if in_rank_group() and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def free_port() -> int:
    """A TCP port free on this host now (a rendezvous port for a DeepSpeed group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_on_ranks(fn: Callable[..., Any], call: dict[str, Any], world: int, timeout_s: float, who: str) -> Any:
    """`fn(**call)` in `world` spawned processes forming one DeepSpeed group on this host; rank 0's
    result. A failing rank fails the call (naming the rank) and the others are killed."""
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise ValueError(f"training.deepspeed.ranks_per_client: {world} ranks for {who}, but this host has "
                         f"{torch.cuda.device_count()} GPU(s)")
    port = str(free_port())
    started = []
    for rank in range(world):
        env = {RANK_GROUP_ENV: "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        started.append(start_process(fn, call, f"{who} rank {rank}", env))
    return await_processes(started, timeout_s)[0]
