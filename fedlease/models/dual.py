"""FedDPA's dual adapter on unmodified peft: a global LoRA plus a local LoRA, mixed per instance.

peft's ordinary LoRA adapter is the *global* LoRA (trained, uploaded, FedAvg'ed). Through peft's
custom-layer hook the target Linear becomes `DualLoraLinear`, whose LoRA variant adds a second,
*local* LoRA (trained, never shared) and the client's reference representations. Every adapted
module adds
    y = W0 x + scaling * ((1 - a) B_g A_g x + a B_l A_l x)
with one local weight `a` per instance, the same in every module (FedDPA, Yang et al., NeurIPS 2024;
its released code, FedDPA-T):
- in training, `a` is fixed: the local phase trains the local LoRA with the global one frozen at
  a = `baselines.feddpa_train_local_weight` (0.5), the global phase trains the global LoRA alone (a = 0);
- at inference, `a` is instance-wise: a(x) = w * clamp(mean_k cos(e(x), e_k), 0, 1), where e is the
  model's last hidden state, mean-pooled over real tokens, computed with the local LoRA alone (a = 1),
  e_k are the same representations of k of the client's training instances (stored after its local
  training), and w = `baselines.feddpa_max_weight` (0.5). An input like the client's own data leans on its
  local LoRA; an unfamiliar one on the global LoRA.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from fedlease.models.moe import InputDependentVariant


@dataclass
class DualLoraConfig(PeftLoraConfig):
    """peft's LoraConfig for the global LoRA; the local LoRA has the same rank and scaling."""

    reference_instances: int = 5
    max_weight: float = 0.5


def sequence_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (B, d): mean over real tokens (mask (B, T) of 0/1), over all tokens without one."""
    if mask is None or mask.shape != x.shape[:2]:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


#: the tokenizer's outputs a transformers model takes (a tokenizer may add others, e.g. offsets)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def mean_last_hidden(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, d): the last layer's hidden state, mean-pooled over real tokens, from the model's body alone (the
    transformer under its head, e.g. `model.model` of a causal LM): a full forward would also compute the
    head's logits, (B, T, vocabulary), which at a large vocabulary dwarf the hidden states. The body's last
    hidden state is the full model's `hidden_states[-1]` (tested); the caller sets adapters and dropout."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), base)
    call = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
    # one forward, no cache to keep (a decoder's body would build one for a generation that never follows)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(body.forward).parameters else {}
    return sequence_mean(body(**call, **extra).last_hidden_state.float(), call.get("attention_mask"))


def instance_weight(reps: torch.Tensor, reference: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Local-LoRA weight per instance, (B,): max_weight * clamp(mean over the k references of the cosine
    between the instance's representation (B, d) and each reference (k, d), 0, 1)."""
    cos = F.cosine_similarity(reps.unsqueeze(1), reference.to(reps.dtype).unsqueeze(0), dim=-1)  # (B, k)
    return max_weight * cos.mean(dim=1).clamp(0.0, 1.0)


def dual_delta(global_delta: torch.Tensor, local_delta: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """(1 - a) * global + a * local; a a number or one per instance (B,), broadcast over tokens and features."""
    if not isinstance(alpha, torch.Tensor):
        return (1 - alpha) * global_delta + alpha * local_delta
    a = alpha.reshape(-1, *([1] * (global_delta.dim() - 1))).to(global_delta.dtype)
    return (1 - a) * global_delta + a * local_delta


class DualVariant(InputDependentVariant):
    """The LoRA variant that adds FedDPA's local LoRA and its per-instance weight to peft's adapter."""

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
        # the client's reference representations (of the model's hidden size: q/k/v inputs have it)
        module.register_buffer("dpa_reference", torch.zeros(config.reference_instances, module.in_features,
                                                             device=weight.device))
        module.register_buffer("dpa_count", torch.zeros(1, device=weight.device))  # references stored
        module.dpa_weight = None  # None: the instance-wise weight; a number: fixed (training phases)
        module.dpa_alpha = None  # the current batch's instance-wise weights, set by the model's pre-hook
        module.dpa_max_weight = config.max_weight

    @staticmethod
    def forward(module: DualLoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        x = x.to(module.lora_A[active_adapter].weight.dtype)
        alpha = module.dpa_weight if module.dpa_weight is not None else module.dpa_alpha
        if alpha is None:
            alpha = 0.0  # no reference yet (no local training): the global LoRA alone
        h = module.lora_dropout[active_adapter](x)
        glob = module.lora_B[active_adapter](module.lora_A[active_adapter](h))
        loc = module.lora_local_B[active_adapter](module.lora_local_A[active_adapter](h))
        return result + dual_delta(glob, loc, alpha) * module.scaling[active_adapter]

    def supports_lora_conversion(self) -> bool:
        return False


class DualLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear whose variant is FedDPA's dual adapter (registered as a custom module)."""

    adapter_layer_names = PeftLoraLinear.adapter_layer_names + ("lora_local_A", "lora_local_B")

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> LoraVariant | None:
        return DualVariant()


def dual_layers(model: nn.Module) -> list[DualLoraLinear]:
    return [m for m in model.modules() if isinstance(m, DualLoraLinear)]


@contextlib.contextmanager
def fixed_weight(model: nn.Module, weight: float) -> Iterator[None]:
    """Every dual module mixes at local weight `weight` inside the block (a training phase, or 1.0 for
    the local LoRA's own representations)."""
    layers = dual_layers(model)
    before = [layer.dpa_weight for layer in layers]
    for layer in layers:
        layer.dpa_weight = weight
    try:
        yield
    finally:
        for layer, w in zip(layers, before, strict=True):
            layer.dpa_weight = w


def representations(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """e(x): the last hidden state, mean-pooled over real tokens, with the local LoRA alone (B, d)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # _bypass: the instance-weighting hook sits on the base model; calling its body does not fire it, but a base
    # model that is its own body (no head, no `base_model_prefix` attribute) would, and must not recurse
    with torch.no_grad(), fixed_weight(model, 1.0), _bypass(base):
        return mean_last_hidden(model, inputs)


def store_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """After local training: the representations of (up to k of) the client's training instances."""
    layers = dual_layers(model)
    reps = representations(model, inputs)
    k = layers[0].dpa_reference.shape[0]
    if reps.shape[1] != layers[0].dpa_reference.shape[1]:
        raise ValueError(f"FedDPA: the model's hidden size {reps.shape[1]} differs from the adapted modules' "
                         f"input size {layers[0].dpa_reference.shape[1]}; adapt q/k/v projections")
    ref = torch.zeros_like(layers[0].dpa_reference)
    ref[: min(k, reps.shape[0])] = reps[:k]
    for layer in layers:
        layer.dpa_reference.copy_(ref)
        layer.dpa_count.fill_(min(k, reps.shape[0]))


_BYPASS = "_fedlease_dpa_bypass"


@contextlib.contextmanager
def _bypass(model: nn.Module) -> Iterator[None]:
    setattr(model, _BYPASS, True)
    try:
        yield
    finally:
        setattr(model, _BYPASS, False)


@contextlib.contextmanager
def recorded_weights(model: nn.Module) -> Iterator[list[float]]:
    """The instance-wise local weights of every input the model sees inside the block (empty for a
    model without a dual adapter), so a reader can see how the mixture actually leans."""
    layers = dual_layers(model)
    record: list[float] = []
    if layers:
        layers[0].dpa_record = record
    try:
        yield record
    finally:
        if layers:
            layers[0].dpa_record = None


def install_instance_weighting(model: nn.Module) -> None:
    """A forward pre-hook on the base transformers model (which both peft's forward and `generate` call):
    in evaluation, before each new input (a generation's prompt, not its cached next-token steps), compute
    a(x) from the local-only representation and set it on every dual module."""
    layers = dual_layers(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training or getattr(module, _BYPASS, False) or layers[0].dpa_weight is not None:
            return
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return  # a cached generation step: keep the prompt's weights
        count = int(layers[0].dpa_count.item())
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        if count == 0:
            alpha = None
        else:
            reps = representations(module, inputs)
            alpha = instance_weight(reps, layers[0].dpa_reference[:count], layers[0].dpa_max_weight)
        for layer in layers:
            layer.dpa_alpha = alpha
        record = getattr(layers[0], "dpa_record", None)
        if record is not None:
            ids = inputs.get("input_ids")
            record += alpha.tolist() if alpha is not None else [0.0] * (len(ids) if ids is not None else 0)

    base.register_forward_pre_hook(hook, with_kwargs=True)
