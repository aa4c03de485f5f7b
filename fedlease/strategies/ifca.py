"""IFCA + LoRA: K cluster LoRAs; each round a client picks the one with the lowest loss on its
training data, trains it and uploads it; the server averages within clusters.

The server remembers each client's latest pick; evaluation (and `fedlease predict`) uses the
aggregated LoRA of that cluster, the model the client joined, rather than choosing again. A client
that was never sampled still chooses by loss.
"""

from __future__ import annotations

import torch

from fedlease.aggregation import group_means
from fedlease.strategies.base import (Download, InitContext, ServerState, Strategy, Tensors, Update, prefixed,
                                      select, unprefixed)
from fedlease.strategies.registry import register


@register
class IFCA(Strategy):
    name = "ifca"
    train_groups = ("lora", "head")
    upload_groups = ("lora",)
    local_groups = ("head",)

    @property
    def k(self) -> int:
        return self.cfg.baselines.ifca_clusters

    def init_state(self, ctx: InitContext) -> ServerState:
        # Distinct cluster models are needed for the first choice to mean anything:
        # B gets a small seeded perturbation per cluster (A keeps the common init).
        tensors: Tensors = {}
        for c in range(self.k):
            gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + c)
            lora = select(ctx.common_init, "lora.")
            lora = {key: (v + torch.randn(v.shape, generator=gen) * self.cfg.baselines.ifca_init_std
                          if key.endswith(".B") else v) for key, v in lora.items()}
            tensors.update(prefixed(lora, f"cluster{c}."))
        return ServerState(tensors)

    def download(self, state: ServerState, client_id: int) -> Download:
        return Download(state.tensors, {"clusters": self.k})

    def eval_download(self, state: ServerState, client_id: int) -> Download:
        chosen = state.meta.get("assignment", {}).get(str(client_id))
        if chosen is None:
            return self.download(state, client_id)
        return Download(select(state.tensors, f"cluster{chosen}."), {"clusters": self.k, "chosen": chosen})

    def client_state(self, download: Download) -> Tensors:
        if "chosen" in download.meta:
            return unprefixed(download.tensors, f"cluster{download.meta['chosen']}.")
        return {}  # the client loads the candidate it picks (fedlease.client.adopt_lowest_loss)

    def candidates(self, download: Download) -> dict[int, Tensors]:
        """The cluster LoRAs the client chooses among (none once its cluster is known)."""
        if "chosen" in download.meta:
            return {}
        return {c: unprefixed(download.tensors, f"cluster{c}.") for c in range(self.k)}

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        assignment = dict(state.meta.get("assignment", {}))
        assignment.update({str(u.client_id): u.group for u in updates})
        tensors = dict(state.tensors)
        for c, mean in group_means(updates, self.weights).items():
            tensors.update(prefixed(mean, f"cluster{c}."))
        return ServerState(tensors, {**state.meta, "assignment": assignment})
