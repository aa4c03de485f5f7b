"""FedDPA (Yang et al., NeurIPS 2024), as its released code trains it (FedDPA-T): a global LoRA,
FedAvg'ed like FedIT, and a local LoRA that never leaves the client, trained in turn; at inference they
mix per instance by the input's similarity to the client's own training data (`fedlease.models.dual`).

Round 1 trains the global LoRA alone (the code's round 0). From round 2 a client first trains its local
LoRA with the global one frozen, mixed at a fixed local weight (`baselines.feddpa_train_local_weight`),
then the global LoRA alone, and uploads the global LoRA. Its head (a classifier here, absent in the
paper's generative setup) trains in both phases. The round's batches are split between the two phases,
so FedDPA trains exactly the local steps of the other methods. After training it stores the
representations of `baselines.feddpa_reference_instances` of its training examples for the
instance-wise weight.
"""

from __future__ import annotations

import torch
from torch import nn

from fedlease.models.dual import fixed_weight, store_reference
from fedlease.strategies.base import ModelSpec, Phase
from fedlease.strategies.fedit import FedIT
from fedlease.strategies.registry import register


@register
class FedDPA(FedIT):
    name = "feddpa"
    train_groups = ("lora", "dual", "head")
    upload_groups = ("lora",)
    local_groups = ("head", "dual")

    def spec(self, client_id: int) -> ModelSpec:
        return ModelSpec(r=self.cfg.lora.r, dual=True)

    def local_phases(self, round_: int) -> list[Phase]:
        """Round 1: the global LoRA alone. Later rounds: the local LoRA (global frozen, fixed mix), then the
        global LoRA alone, each on half of the round's batches, so FedDPA trains the same local steps as
        every other method (the paper gives each phase the full local epochs)."""
        epochs = self.local_epochs(round_)
        global_only = lambda model: fixed_weight(model, 0.0)  # noqa: E731
        if round_ == 1:
            return [Phase(("lora", "head"), epochs, global_only)]
        mix = self.cfg.baselines.feddpa_train_local_weight
        return [Phase(("dual", "head"), epochs, lambda model: fixed_weight(model, mix), part=(0, 2)),
                Phase(("lora", "head"), epochs, global_only, part=(1, 2))]

    def reference_examples(self) -> int:
        return self.cfg.baselines.feddpa_reference_instances

    def after_training(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        store_reference(model, inputs)
