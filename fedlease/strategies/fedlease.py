"""FedLEASE (paper Stage 2) and its warm-up (Stage 1, step 1).

Server state: expert{e}.lora.<module>.{A,B} for each of the M experts and
router{e}.router.<module> for each cluster. A client of cluster j downloads all
experts and router j, trains only expert j (its own LoRA slot), its router and
its local head, and uploads expert j and the router; the server averages each
within its cluster.
"""

from __future__ import annotations

from fedlease.allocation import Allocation, weighted_mean
from fedlease.models.adapters import stack_foreign
from fedlease.strategies.base import (Download, ModelSpec, ServerState, Strategy, Tensors, Update, prefixed,
                                      select, unprefixed)


class Warmup(Strategy):
    """Every client trains one ordinary LoRA from the common init; no averaging."""

    name = "warmup"
    train_groups = ("lora", "head")
    upload_groups = ("lora",)
    local_groups = ("head",)

    def local_epochs(self, round_: int) -> int:
        return self.cfg.fedlease.warmup_epochs

    def init_state(self, common_init: Tensors) -> ServerState:
        return ServerState(select(common_init, "lora."))

    def download(self, state: ServerState, client_id: int) -> Download:
        return Download(select(state.tensors, "lora."))

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        tensors = dict(state.tensors)
        for u in updates:
            tensors.update(prefixed(u.tensors, f"client{u.client_id}."))
        return ServerState(tensors, state.meta)


class FedLEASE(Strategy):
    name = "fedlease"
    train_groups = ("lora", "router", "head")
    upload_groups = ("lora", "router")
    local_groups = ("head",)
    inherit_local_from = "warmup"  # the warm-up's head continues into the mixture rounds

    def __init__(self, cfg, num_clients: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg, num_clients)
        self.allocation: Allocation | None = None

    def with_allocation(self, allocation: Allocation) -> FedLEASE:
        self.allocation = allocation
        return self

    @property
    def num_experts(self) -> int:
        if self.allocation is None:
            raise RuntimeError("FedLEASE needs the allocation stage's cluster map first")
        return self.allocation.num_experts

    def spec(self, client_id: int) -> ModelSpec:
        return ModelSpec(r=self.cfg.lora.r, num_experts=self.num_experts, top_k=self.cfg.fedlease.router.top_k)

    def init_state(self, common_init: Tensors) -> ServerState:
        raise RuntimeError("FedLEASE starts from the allocation stage (initial_state), not the common init")

    def initial_state(self, experts: list[Tensors], router_init: Tensors) -> ServerState:
        assert self.allocation is not None
        tensors: Tensors = {}
        for e, expert in enumerate(experts):
            tensors.update(prefixed(expert, f"expert{e}."))
            tensors.update(prefixed(router_init, f"router{e}."))
        return ServerState(tensors, {"assignment": self.allocation.assignment})

    def download(self, state: ServerState, client_id: int) -> Download:
        own = state.meta["assignment"][client_id]
        tensors = select(state.tensors, "expert")
        tensors.update(select(state.tensors, f"router{own}."))
        return Download(tensors, {"expert": own})

    def client_state(self, download: Download) -> Tensors:
        own = int(download.meta["expert"])
        experts = [unprefixed(download.tensors, f"expert{e}.") for e in range(self.num_experts)]
        state = dict(experts[own])
        state.update(stack_foreign(experts, own))
        state.update(unprefixed(download.tensors, f"router{own}."))
        return state

    def upload_meta(self, download: Download) -> dict[str, int]:
        return {"expert": int(download.meta["expert"])}

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        tensors = dict(state.tensors)
        for e in range(self.num_experts):
            members = [u for u in updates if u.meta.get("expert") == e]
            if not members:
                continue  # nobody of this cluster reported: keep the expert as it was
            w = self.weights(members)
            tensors.update(prefixed(weighted_mean([select(u.tensors, "lora.") for u in members], w), f"expert{e}."))
            tensors.update(prefixed(weighted_mean([select(u.tensors, "router.") for u in members], w), f"router{e}."))
        return ServerState(tensors, state.meta)
