"""Local-only training, the floor: no federation; each client keeps its own LoRA.

It continues from the client's own warm-up adapter and head (the same warm-up FedLEASE
clusters), then trains the same rounds x local epochs as every method, so it gets exactly
FedLEASE's compute: a FedLEASE win over it is a collaboration win, not a compute win.
"""

from __future__ import annotations

from fedlease.strategies.base import Download, InitContext, ServerState, Strategy, Update
from fedlease.strategies.registry import register


@register
class LocalOnly(Strategy):
    name = "local"
    train_groups = ("lora", "head")
    upload_groups = ()
    local_groups = ("lora", "head")
    inherits_warmup = True  # round 1 starts from the warm-up's adapter and head
    floor = True

    def init_state(self, ctx: InitContext) -> ServerState:
        return ServerState({})

    def download(self, state: ServerState, client_id: int) -> Download:
        return Download({})

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        return state
