"""FedDPA: a global LoRA (FedAvg'ed like FedIT) plus a local LoRA that never leaves the client,
mixed per input by an instance-wise weight (`fedlease.models.dual`).

Each round the client trains both LoRAs and its head together under the same
instance-wise mixture it is evaluated with, and uploads only the global LoRA.
"""

from __future__ import annotations

from fedlease.strategies.base import ModelSpec
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
