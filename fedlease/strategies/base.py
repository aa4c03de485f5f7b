"""The small strategy interface every method implements (after Flower's `Strategy`).

A strategy says what the client model looks like, what a client trains, keeps
locally and uploads, what the server sends each client, and how the server
aggregates. The round loop lives in `fedlease.server`; the tensor maths in pure
functions (`fedlease.allocation.weighted_mean`, ...).

Server state is a flat dict of tensors plus a small JSON-able `meta` dict, so it
checkpoints as one safetensors file and one JSON file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlease.config import Config

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """Structure of the client model: a single LoRA (num_experts None), a mixture, or FedDPA's dual adapter."""

    r: int
    num_experts: int | None = None
    top_k: int | None = None
    dual: bool = False


@dataclass
class ServerState:
    tensors: Tensors
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update:
    """What one client sent back in one round."""

    client_id: int
    tensors: Tensors
    num_examples: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Download:
    tensors: Tensors
    meta: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    name: str = "base"
    #: groups the client trains (see fedlease.models.adapters.set_trainable)
    train_groups: tuple[str, ...] = ("lora", "head")
    #: groups the client uploads
    upload_groups: tuple[str, ...] = ("lora",)
    #: groups the client keeps on its own disk between rounds (never uploaded)
    local_groups: tuple[str, ...] = ("head",)

    def __init__(self, cfg: Config, num_clients: int) -> None:
        self.cfg = cfg
        self.num_clients = num_clients

    def spec(self, client_id: int) -> ModelSpec:
        return ModelSpec(r=self.cfg.lora.r)

    def local_epochs(self, round_: int) -> int:
        return self.cfg.training.local_epochs

    @abstractmethod
    def init_state(self, common_init: Tensors) -> ServerState:
        """Server state before round 1, from the seeded common LoRA init."""

    @abstractmethod
    def download(self, state: ServerState, client_id: int) -> Download:
        """Exactly what the server sends this client (counted as download bytes)."""

    @abstractmethod
    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        """New server state from the round's surviving updates."""

    def eval_download(self, state: ServerState, client_id: int) -> Download:
        """What a client evaluates (after aggregation) and `fedlease predict` loads; the round's download
        unless the method narrows it (IFCA: the cluster the client joined)."""
        return self.download(state, client_id)

    def client_state(self, download: Download) -> Tensors:
        """Turn a download into model state to load (identity for most methods)."""
        return download.tensors

    def upload_meta(self, download: Download) -> dict[str, Any]:
        return {}

    def weights(self, updates: list[Update]) -> list[float]:
        if self.cfg.fedlease.weighting == "uniform":
            return [1.0] * len(updates)
        return [float(u.num_examples) for u in updates]


def select(tensors: Tensors, prefix: str, suffix: str = "") -> Tensors:
    return {k: v for k, v in tensors.items() if k.startswith(prefix) and k.endswith(suffix)}


def prefixed(tensors: Tensors, prefix: str) -> Tensors:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def unprefixed(tensors: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
