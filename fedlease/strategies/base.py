"""The strategy interface every federated method implements (after Flower's `Strategy`).

A strategy declares, in one place, everything the pipeline needs to know about a method:
what the client model looks like (`spec`), which tensor groups a client trains, uploads
and keeps (`train_groups`, `upload_groups`, `local_groups`), what it needs from the
earlier stages (`needs_allocation`, `inherits_warmup`), what the server sends each client
(`download`, `eval_download`), how a client turns that into model state (`client_state`,
`candidates`, `upload_group`) and how the server aggregates (`aggregate`). Every hook has a
docstring and, where one makes sense, a default; callers never test a method's name or
probe for an attribute. The round loop lives in `fedlease.server`; the tensor maths in
`fedlease.aggregation`.

Server state is a flat dict of tensors plus a small JSON-able `meta` dict, so it
checkpoints as one safetensors file and one JSON file.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from fedlease.allocation import Allocation
    from fedlease.config import Config
    from fedlease.paths import RunPaths

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """Structure of the client model: a single LoRA (num_experts None), a mixture (with a personal LoRA on an
    always-kept router slot when `personal`), or FedDPA's dual adapter."""

    r: int
    num_experts: int | None = None
    top_k: int | None = None
    personal: bool = False
    dual: bool = False


@dataclass
class ServerState:
    tensors: Tensors
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update:
    """What one client sent back in one round; `group` says which model it updates (FedLEASE: its
    expert; IFCA: the cluster it chose; 0 for single-model methods)."""

    client_id: int
    tensors: Tensors
    num_examples: int
    group: int = 0


@dataclass
class Download:
    tensors: Tensors
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    """One stretch of a client's local training: the groups it trains, for how many epochs, and the
    model setting it runs under (a context manager around the training, or None)."""

    train_groups: tuple[str, ...]
    epochs: int
    setting: Callable[[nn.Module], AbstractContextManager[Any]] | None = None
    class_balanced: bool = False  # classification: weight the loss by the client's inverse label frequencies
    #: (i, n): this phase trains the i-th of n consecutive parts of the epochs' batches (phases that share
    #: one budget of local steps); (0, 1): all of them
    part: tuple[int, int] = (0, 1)


@dataclass(frozen=True)
class InitContext:
    """What a strategy may build its first server state from."""

    common_init: Tensors  # the seeded common init of the strategy's client model (same on every client)
    experts: list[Tensors] | None = None  # the allocation stage's cluster-mean experts, when `needs_allocation`


class Strategy(ABC):
    #: the name params.yaml's `strategies` list, tables and MLflow use
    name: ClassVar[str] = "base"
    #: groups the client trains (see fedlease.models.adapters.set_trainable)
    train_groups: ClassVar[tuple[str, ...]] = ("lora", "head")
    #: groups the client uploads
    upload_groups: ClassVar[tuple[str, ...]] = ("lora",)
    #: groups the client keeps on its own disk between rounds (never uploaded)
    local_groups: ClassVar[tuple[str, ...]] = ("head",)
    #: a federated method users compare (selectable in `strategies`, DP and crash faults apply to its
    #: rounds); False only for FedLEASE's warm-up, a stage of its own
    federated: ClassVar[bool] = True
    #: needs the allocation stage's cluster map and experts (the stage runs when a chosen method does)
    needs_allocation: ClassVar[bool] = False
    #: round 1 continues from each client's warm-up state (its head; its adapter if it keeps LoRA locally);
    #: the warm-up stage runs when a chosen method does
    inherits_warmup: ClassVar[bool] = False
    #: the pipeline's own method: its final model is registered, its margin reported
    primary: ClassVar[bool] = False
    #: a floor tables show in a column of its own (no collaboration: `local`); margins are taken over it too
    floor: ClassVar[bool] = False

    def __init__(self, cfg: Config, num_clients: int, allocation: Allocation | None = None) -> None:
        if self.needs_allocation and allocation is None:
            raise ValueError(f"{self.name} needs the allocation stage's cluster map first")
        self.cfg = cfg
        self.num_clients = num_clients
        self.allocation = allocation

    def spec(self, client_id: int) -> ModelSpec:
        """The structure of this client's model (every client of a round shares the base model)."""
        return ModelSpec(r=self.cfg.lora.r)

    def local_epochs(self, round_: int) -> int:
        """Epochs over its training data a client runs in this round (an extra round of the equal-compute
        protocol runs what is left of the warm-up's epochs)."""
        epochs = self.cfg.training.local_epochs
        extra = round_ - self.cfg.federation.rounds
        if extra > 0:
            return min(epochs, self.cfg.fedlease.warmup_epochs - (extra - 1) * epochs)
        return epochs

    def local_phases(self, round_: int) -> list[Phase]:
        """A client's local training in this round, phase by phase (one phase of `train_groups` by default;
        FedDPA trains its local and its global LoRA in turn)."""
        return [Phase(self.train_groups, self.local_epochs(round_))]

    def uploads_input_signature(self) -> bool:
        """Whether a client adds its input signature to this round's upload (`client.input_signature`)."""
        return False

    def reference_examples(self) -> int:
        """How many of its own training examples a client shows `after_training` (0: the hook is not called)."""
        return 0

    def after_training(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        """After a client's local training, with a seeded sample of its training inputs (prompts only for
        generation), before its local state is saved; FedDPA stores its reference representations."""

    def extra_rounds(self) -> int:
        """Rounds added under `federation.protocol: equal_compute` to a federated method that does not
        continue from FedLEASE's warm-up: its epochs, run as federated rounds (more communication, which
        favours the method). 0 under the paper's protocol."""
        if not self.federated or self.inherits_warmup or self.cfg.federation.protocol != "equal_compute":
            return 0
        return math.ceil(self.cfg.fedlease.warmup_epochs / self.cfg.training.local_epochs)

    def rounds(self) -> int:
        """How many rounds the method runs."""
        return self.cfg.federation.rounds + self.extra_rounds()

    def warmup_epochs(self) -> int:
        """Local epochs each client trains before round 1 (FedLEASE's warm-up, for those that continue from it)."""
        return self.cfg.fedlease.warmup_epochs if self.inherits_warmup else 0

    def assignment(self, state: ServerState) -> list[int] | None:
        """The cluster of each client, for a method that groups clients (its ARI against the tasks is
        reported); None for the others."""
        return None

    def samples_every_client(self) -> bool:
        """Whether every client takes part in every round, whatever `federation.clients_per_round` says."""
        return False

    def evaluates(self) -> bool:
        """Whether the round loop evaluates the clients (every `federation.eval_every` rounds and the last)."""
        return True

    def home(self, paths: RunPaths) -> Path:
        """The method's stage output: run folder, checkpoints and clients' local state live under it."""
        return paths.strategy_dir(self.name)

    @abstractmethod
    def init_state(self, ctx: InitContext) -> ServerState:
        """Server state before round 1."""

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

    def candidates(self, download: Download) -> dict[int, Tensors]:
        """Models the client chooses among by its training loss, by group (IFCA); none by default."""
        return {}

    def settle(self, state: ServerState, client_id: int, group: int) -> ServerState:
        """Record the candidate a client chose outside training (its evaluation), so the exported model is
        the evaluated one; only a method with `candidates` has anything to record."""
        raise NotImplementedError(f"{self.name} has no candidates to choose among")

    def upload_group(self, download: Download) -> int:
        """The group the client's upload belongs to when it has no candidates to choose from."""
        return 0

    def admit(self, state: ServerState, client_id: int, adapter: Tensors, peers: list[Tensors]
              ) -> tuple[ServerState, dict[str, Any]]:
        """A client joining after the run started (`fedlease join`), given its warm-up adapter and the
        original clients': the server state that serves it, and facts about its placement. Methods
        without per-client server state serve it as they are."""
        return state, {}

    def weights(self, updates: list[Update]) -> list[float]:
        """Aggregation weights: by training examples (FedAvg) or uniform (`fedlease.weighting`)."""
        if self.cfg.fedlease.weighting == "uniform":
            return [1.0] * len(updates)
        return [float(u.num_examples) for u in updates]


def select(tensors: Tensors, prefix: str, suffix: str = "") -> Tensors:
    return {k: v for k, v in tensors.items() if k.startswith(prefix) and k.endswith(suffix)}


def prefixed(tensors: Tensors, prefix: str) -> Tensors:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def unprefixed(tensors: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
