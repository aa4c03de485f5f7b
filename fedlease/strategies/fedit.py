"""FedIT: every client trains A and B; the server averages both (FedAvg of LoRA)."""

from __future__ import annotations

from fedlease.aggregation import weighted_mean
from fedlease.strategies.base import Download, InitContext, ServerState, Strategy, Update, select
from fedlease.strategies.registry import register


@register
class FedIT(Strategy):
    name = "fedit"
    train_groups = ("lora", "head")
    upload_groups = ("lora",)
    local_groups = ("head",)
    shared_suffix = ""  # which LoRA matrices cross the wire ("" = both)

    def init_state(self, ctx: InitContext) -> ServerState:
        return ServerState(select(ctx.common_init, "lora.", self.shared_suffix))

    def download(self, state: ServerState, client_id: int) -> Download:
        return Download(state.tensors)

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        shared = [select(u.tensors, "lora.", self.shared_suffix) for u in updates]
        return ServerState(weighted_mean(shared, self.weights(updates)), state.meta)
