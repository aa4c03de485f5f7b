"""FFA-LoRA: A stays frozen at the seeded common init on every client; only B is trained and averaged."""

from __future__ import annotations

from fedlease.strategies.fedit import FedIT
from fedlease.strategies.registry import register


@register
class FFALoRA(FedIT):
    name = "ffa_lora"
    train_groups = ("lora_B", "head")
    upload_groups = ("lora_B",)
    local_groups = ("head",)
    shared_suffix = ".B"
