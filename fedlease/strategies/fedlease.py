"""FedLEASE (paper Stage 2) and its warm-up (Stage 1, step 1).

Server state: expert{e}.lora.<module>.{A,B} for each of the M experts and
router{e}.router.<module> for each cluster. A client of cluster j downloads all
experts and router j, trains only expert j (its own LoRA slot), its router and
its local head, and uploads expert j and the router; the server averages each
within its cluster (`fedlease.aggregation.group_means`, group = expert). With
`fedlease.router.personal_expert` the client also trains a personal LoRA in its
mixture, continued from its warm-up LoRA and kept with its head (never uploaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlease.aggregation import group_means
from fedlease.allocation import assign_late_joiner
from fedlease.models.adapters import stack_foreign
from fedlease.paths import RunPaths
from fedlease.strategies.base import (Download, InitContext, ModelSpec, Phase, ServerState, Strategy, Tensors,
                                      Update, prefixed, select, unprefixed)
from fedlease.strategies.registry import register


@register
class Warmup(Strategy):
    """Every client trains one ordinary LoRA from the common init for `fedlease.warmup_epochs`; no
    averaging: the server keeps each client's adapter for the allocation stage."""

    name = "warmup"
    train_groups = ("lora", "head")
    upload_groups = ("lora",)
    local_groups = ("head",)
    federated = False

    def local_epochs(self, round_: int) -> int:
        return self.cfg.fedlease.warmup_epochs

    def local_phases(self, round_: int) -> list[Phase]:
        """One phase, or two with `fedlease.warmup_head_epochs`: the head alone first, then LoRA and head;
        with `fedlease.warmup_balanced_loss` the loss weighs every label of the client alike, so its B
        matrices carry its task more than its label mix (label skew)."""
        fl = self.cfg.fedlease
        balanced = fl.warmup_balanced_loss
        lora = Phase(self.train_groups, self.local_epochs(round_) - fl.warmup_head_epochs, class_balanced=balanced)
        if fl.warmup_head_epochs == 0:
            return [lora]
        return [Phase(("head",), fl.warmup_head_epochs, class_balanced=balanced), lora]

    def rounds(self) -> int:
        return 1

    def uploads_input_signature(self) -> bool:
        """With the `inputs` distance every client uploads its input signature beside its warm-up LoRA."""
        return self.cfg.fedlease.clustering.distance == "inputs"

    def samples_every_client(self) -> bool:
        return True  # every client needs an adapter to be clustered, sampled in later rounds or not

    def home(self, paths: RunPaths) -> Path:
        return paths.warmup

    def eval_download(self, state: ServerState, client_id: int) -> Download:
        """The client's own warm-up adapter: the warm-up is evaluated (the model FedLEASE's rounds start from);
        its LoRA only (the upload may also hold the client's input signature, which no model loads)."""
        return Download(select(unprefixed(state.tensors, f"client{client_id}."), "lora."))

    def init_state(self, ctx: InitContext) -> ServerState:
        return ServerState(select(ctx.common_init, "lora."))

    def download(self, state: ServerState, client_id: int) -> Download:
        return Download(select(state.tensors, "lora."))

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        tensors = dict(state.tensors)
        for u in updates:
            tensors.update(prefixed(u.tensors, f"client{u.client_id}."))
        return ServerState(tensors, state.meta)


@register
class FedLEASE(Strategy):
    name = "fedlease"
    upload_groups = ("lora", "router")
    needs_allocation = True
    inherits_warmup = True  # the warm-up's head continues into the mixture rounds
    primary = True

    # the personal expert (`router.personal_expert`) is trained and kept like the head, never uploaded; read
    # when a client trains or loads its state, not when the strategy is built (the evaluate stage builds it)
    @property  # type: ignore[misc]
    def train_groups(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("lora", "router", "head") + self._personal()

    @property  # type: ignore[misc]
    def local_groups(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("head",) + self._personal()

    def _personal(self) -> tuple[str, ...]:
        return ("personal",) if self.cfg.fedlease.router.personal_expert else ()

    @property
    def num_experts(self) -> int:
        assert self.allocation is not None  # checked in Strategy.__init__
        return self.allocation.num_experts

    def spec(self, client_id: int) -> ModelSpec:
        router = self.cfg.fedlease.router
        return ModelSpec(r=self.cfg.lora.r, num_experts=self.num_experts, top_k=router.top_k,
                         personal=router.personal_expert)

    def init_state(self, ctx: InitContext) -> ServerState:
        """The allocation's cluster-mean experts, and every cluster's router at the common init."""
        assert self.allocation is not None
        if ctx.experts is None or len(ctx.experts) != self.num_experts:
            raise ValueError(f"fedlease: the allocation has {self.num_experts} experts, the initial state "
                             f"{0 if ctx.experts is None else len(ctx.experts)}")
        router_init = select(ctx.common_init, "router.")
        tensors: Tensors = {}
        for e, expert in enumerate(ctx.experts):
            tensors.update(prefixed(expert, f"expert{e}."))
            tensors.update(prefixed(router_init, f"router{e}."))
        return ServerState(tensors, {"assignment": list(self.allocation.assignment)})

    def download(self, state: ServerState, client_id: int) -> Download:
        own = state.meta["assignment"][client_id]
        tensors = select(state.tensors, "expert")
        tensors.update(select(state.tensors, f"router{own}."))
        return Download(tensors, {"expert": own})

    def client_state(self, download: Download) -> Tensors:
        own = self.upload_group(download)
        experts = [unprefixed(download.tensors, f"expert{e}.") for e in range(self.num_experts)]
        state = dict(experts[own])
        state.update(stack_foreign(experts, own))
        state.update(unprefixed(download.tensors, f"router{own}."))
        return state

    def upload_group(self, download: Download) -> int:
        return int(download.meta["expert"])

    def assignment(self, state: ServerState) -> list[int] | None:
        return [int(e) for e in state.meta["assignment"][: self.num_clients]]

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        tensors = dict(state.tensors)
        for e, mean in group_means(updates, self.weights).items():  # a silent cluster keeps its expert
            tensors.update(prefixed(select(mean, "lora."), f"expert{e}."))
            tensors.update(prefixed(select(mean, "router."), f"router{e}."))
        return ServerState(tensors, state.meta)

    def admit(self, state: ServerState, client_id: int, adapter: Tensors, peers: list[Tensors]
              ) -> tuple[ServerState, dict[str, Any]]:
        """Beyond the paper: a client joining after allocation takes the expert of the cluster whose
        members' warm-up B matrices are nearest on average to its own (no re-clustering)."""
        assert self.allocation is not None
        expert, means = assign_late_joiner(adapter, peers, self.allocation,
                                           self.cfg.fedlease.clustering.distance)
        assignment = list(state.meta["assignment"])
        assignment += [-1] * (client_id + 1 - len(assignment))
        assignment[client_id] = expert
        return ServerState(state.tensors, {**state.meta, "assignment": assignment}), {
            "expert": expert, "mean_distances": means}
