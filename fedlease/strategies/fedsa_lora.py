"""FedSA-LoRA: clients train A and B; only A is shared and averaged, B stays local (personalised)."""

from __future__ import annotations

from fedlease.strategies.fedit import FedIT
from fedlease.strategies.registry import register


@register
class FedSALoRA(FedIT):
    name = "fedsa_lora"
    train_groups = ("lora", "head")
    upload_groups = ("lora_A",)
    local_groups = ("head", "lora_B")
    shared_suffix = ".A"
