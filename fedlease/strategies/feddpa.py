"""FedDPA (Yang et al., NeurIPS 2024), as its released code trains it (FedDPA-T): a global LoRA,
FedAvg'ed like FedIT, and a local LoRA that never leaves the client, trained in turn; at inference they
mix per instance by the input's similarity to the client's own training data (`fedlease.models.dual`).

Round 1 trains the global LoRA alone (the code's round 0). From round 2 a client first trains its local
LoRA with the global one frozen, mixed at a fixed local weight (`baselines.feddpa_train_local_weight`),
then the global LoRA alone, and uploads the global LoRA. Its head (a classifier here, absent in the
paper's generative setup) trains in both phases. The round's local epochs are split between the two
phases (at least one each), so FedDPA trains as many steps as the other methods whenever
`training.local_epochs` >= 2 (the table's steps column shows it). After training it stores the
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
        epochs = self.local_epochs(round_)
        global_only = Phase(("lora", "head"), epochs, lambda model: fixed_weight(model, 0.0))
        if round_ == 1:
            return [global_only]
        local_epochs = max(1, epochs // 2)
        mix = self.cfg.baselines.feddpa_train_local_weight
        return [Phase(("dual", "head"), local_epochs, lambda model: fixed_weight(model, mix)),
                Phase(("lora", "head"), max(1, epochs - local_epochs), lambda model: fixed_weight(model, 0.0))]

    def reference_examples(self) -> int:
        return self.cfg.baselines.feddpa_reference_instances

    def after_training(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        store_reference(model, inputs)
