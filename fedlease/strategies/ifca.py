"""IFCA + LoRA: K cluster LoRAs; each round a client picks the one with the lowest loss on its
training data, trains it and uploads it; the server averages within clusters.

The server remembers each client's latest pick; evaluation (and `fedlease predict`) uses the
aggregated LoRA of that cluster, the model the client joined, rather than choosing again. A client
that was never sampled still chooses by loss; the final model records that choice (`settle`).
"""

from __future__ import annotations

import math

import torch

from fedlease.aggregation import group_means
from fedlease.strategies.base import (Download, InitContext, ServerState, Strategy, Tensors, Update, prefixed,
                                      select, unprefixed)
from fedlease.strategies.registry import register


def independent_lora(like: Tensors, gen: torch.Generator, b_std: float) -> Tensors:
    """A LoRA of the same shapes drawn afresh: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (peft's kaiming-uniform
    init), B ~ N(0, b_std^2)."""
    out = {}
    for key in sorted(like):
        shape = like[key].shape
        if key.endswith(".A"):
            bound = 1.0 / math.sqrt(shape[1])
            out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            out[key] = torch.randn(shape, generator=gen) * b_std
        out[key] = out[key].to(like[key].dtype)
    return out


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
        """K independently drawn cluster models, as the paper's: each its own seeded LoRA (A as peft
        draws it, B ~ N(0, ifca_init_std^2), not peft's zeros, so the models differ as functions and a
        client's first choice means something)."""
        tensors: Tensors = {}
        for c in range(self.k):
            gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + c)
            lora = independent_lora(select(ctx.common_init, "lora."), gen, self.cfg.baselines.ifca_init_std)
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

    def assignment(self, state: ServerState) -> list[int] | None:
        """Each client's latest cluster (-1 for a client never sampled)."""
        chosen = state.meta.get("assignment", {})
        return [int(chosen.get(str(c), -1)) for c in range(self.num_clients)]

    def settle(self, state: ServerState, client_id: int, group: int) -> ServerState:
        """A client never sampled: the cluster its evaluation chose by loss becomes the one it joined (for the
        exported model and `fedlease predict`; training never saw it)."""
        assignment = {**state.meta.get("assignment", {}), str(client_id): group}
        return ServerState(state.tensors, {**state.meta, "assignment": assignment})

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        assignment = dict(state.meta.get("assignment", {}))
        assignment.update({str(u.client_id): u.group for u in updates})
        tensors = dict(state.tensors)
        for c, mean in group_means(updates, self.weights).items():
            tensors.update(prefixed(mean, f"cluster{c}."))
        return ServerState(tensors, {**state.meta, "assignment": assignment})
