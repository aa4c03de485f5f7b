"""Local-only training, the floor: no federation; each client keeps its own LoRA.

It gets the same total local epochs as FedLEASE including FedLEASE's warm-up
(the extra epochs come in round 1), so a FedLEASE win is not a compute win.
"""

from __future__ import annotations

from fedlease.strategies.base import Download, ServerState, Strategy, Tensors, Update


class LocalOnly(Strategy):
    name = "local"
    train_groups = ("lora", "head")
    upload_groups = ()
    local_groups = ("lora", "head")

    def init_state(self, common_init: Tensors) -> ServerState:
        return ServerState({})

    def local_epochs(self, round_: int) -> int:
        extra = self.cfg.fedlease.warmup_epochs if round_ == 1 else 0
        return self.cfg.training.local_epochs + extra

    def download(self, state: ServerState, client_id: int) -> Download:
        return Download({})

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        return state
