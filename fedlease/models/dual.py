"""FedDPA's dual adapter on unmodified peft: a global LoRA plus a local LoRA, mixed per input.

peft's ordinary LoRA adapter is the *global* LoRA (trained, uploaded, FedAvg'ed).
Through peft's custom-layer hook the target Linear becomes `DualLoraLinear`, whose
LoRA variant adds a second, *local* LoRA (trained, never shared) and the client's
representation centroid, a running mean of the module's sequence-mean input over
the client's own training data.

Instance-wise weight (our reading of FedDPA's dynamic weighting; the paper
compares the test instance with the client's local training instances):
    alpha(x) = clamp(cos(mean_t x_t, centroid), 0, 1)     (0.5 before any local data)
    y = W0 x + scaling * ((1 - alpha) B_g A_g x + alpha B_l A_l x)
The same rule is used in training and at inference, so the mixture a client trains
is the one it is evaluated with; an input unlike the client's data leans on the
global LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from fedlease.models.moe import InputDependentVariant

#: weight of the local LoRA while the client has no centroid yet
NO_CENTROID_WEIGHT = 0.5


@dataclass
class DualLoraConfig(PeftLoraConfig):
    """peft's LoraConfig for the global LoRA; the local LoRA has the same rank and scaling."""


def sequence_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (B, d): mean over real tokens (mask (B, T) of 0/1), over all tokens without one."""
    if mask is None or mask.shape != x.shape[:2]:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def instance_weight(reps: torch.Tensor, centroid: torch.Tensor, count: float) -> torch.Tensor:
    """Local-LoRA weight per instance, (B,), from representations (B, d) and the client's centroid (d,)."""
    if count <= 0:
        return torch.full(reps.shape[:1], NO_CENTROID_WEIGHT, dtype=reps.dtype, device=reps.device)
    cos = F.cosine_similarity(reps, centroid.to(reps.dtype).unsqueeze(0), dim=-1)
    return cos.clamp(0.0, 1.0)


def updated_centroid(centroid: torch.Tensor, count: float, reps: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Running mean of representations: the centroid of count + B instances."""
    n = reps.shape[0]
    total = count + n
    return centroid + (reps.sum(dim=0).to(centroid.dtype) - n * centroid) / total, total


def dual_delta(global_delta: torch.Tensor, local_delta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) * global + alpha * local, alpha per instance (B,) broadcast over tokens and features."""
    a = alpha.reshape(-1, *([1] * (global_delta.dim() - 1))).to(global_delta.dtype)
    return (1 - a) * global_delta + a * local_delta


class DualVariant(InputDependentVariant):
    """The LoRA variant that adds FedDPA's local LoRA and instance-wise weighting to peft's adapter."""

    unmergeable = "an instance-weighted dual adapter"

    @staticmethod
    def init(module: DualLoraLinear, adapter_name: str, config: DualLoraConfig, **kwargs: Any) -> None:
        r = module.r[adapter_name]
        weight = module.get_base_layer().weight
        for name in ("lora_local_A", "lora_local_B"):
            if not hasattr(module, name):
                setattr(module, name, nn.ModuleDict())
        local_a = nn.Linear(module.in_features, r, bias=False, device=weight.device)
        nn.init.kaiming_uniform_(local_a.weight, a=math.sqrt(5))  # peft's LoRA A init
        local_b = nn.Linear(r, module.out_features, bias=False, device=weight.device)
        nn.init.zeros_(local_b.weight)
        module.lora_local_A[adapter_name] = local_a
        module.lora_local_B[adapter_name] = local_b
        module.register_buffer("dpa_centroid", torch.zeros(module.in_features, device=weight.device))
        module.register_buffer("dpa_count", torch.zeros(1, device=weight.device))
        module.dpa_mask = None
        module.dpa_last_alpha = None

    @staticmethod
    def forward(module: DualLoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        x = x.to(module.lora_A[active_adapter].weight.dtype)
        alpha = _alpha(module, x)
        h = module.lora_dropout[active_adapter](x)
        glob = module.lora_B[active_adapter](module.lora_A[active_adapter](h))
        loc = module.lora_local_B[active_adapter](module.lora_local_A[active_adapter](h))
        return result + dual_delta(glob, loc, alpha) * module.scaling[active_adapter]

    def supports_lora_conversion(self) -> bool:
        return False


def _alpha(module: DualLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """Per-instance weight; the centroid learns from training inputs. During cached generation
    (one new token against a longer mask) the weight computed on the prompt is kept."""
    mask = module.dpa_mask
    last = module.dpa_last_alpha
    if x.dim() == 3 and mask is not None and mask.shape[1] != x.shape[1] and last is not None \
            and last.shape[0] == x.shape[0]:
        return last
    reps = sequence_mean(x, mask) if x.dim() == 3 else x
    with torch.no_grad():
        alpha = instance_weight(reps.float(), module.dpa_centroid, float(module.dpa_count))
        if module.training:
            centroid, count = updated_centroid(module.dpa_centroid, float(module.dpa_count), reps.float())
            module.dpa_centroid.copy_(centroid)
            module.dpa_count.fill_(count)
    module.dpa_last_alpha = alpha
    return alpha


class DualLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear whose variant is FedDPA's dual adapter (registered as a custom module)."""

    adapter_layer_names = PeftLoraLinear.adapter_layer_names + ("lora_local_A", "lora_local_B")

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> LoraVariant | None:
        return DualVariant()
