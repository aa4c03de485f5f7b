"""Wrap a base model with peft LoRA (single or mixture) and move adapter state in and out.

State travels as flat dicts of tensors with stable keys, independent of peft's
module prefixes:
  lora.<module>.A / lora.<module>.B      the own LoRA (= the own expert of a mixture)
  router.<module>                        the mixture's router weight (S, d_in)
  foreign.<module>.A / foreign.<module>.B  the other experts, stacked (M-1, r, d) / (M-1, d, r)
  personal.<module>.A / .B               a mixture's personal LoRA (`router.personal_expert`; kept locally)
  dual.<module>.A / .B / .reference / .count  FedDPA's local LoRA and reference representations
  head.weight / head.bias                the task head (kept local per client)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from fedlease.config import LoraConfig, RouterConfig
from fedlease.io import ArtifactError
from fedlease.models.base import head_linear_name
from fedlease.models.dual import DualLoraConfig, DualLoraLinear, install_instance_weighting
from fedlease.models.moe import MixtureLoraConfig, MixtureLoraLinear, RouterTelemetry

ADAPTER = "default"
_PREFIX = "base_model.model."


def wrap_lora(model: nn.Module, lora: LoraConfig, num_experts: int | None = None,
              router: RouterConfig | None = None, seed: int = 0, dual: bool = False,
              dual_options: dict[str, Any] | None = None) -> PeftModel:
    """Inject LoRA (num_experts=None), a FedLEASE mixture of `num_experts` experts, or FedDPA's
    dual (global + local) adapter.

    Seeded, so every client and the server build the same common initialisation.
    """
    torch.manual_seed(seed)
    dual_options = dual_options or {}
    common = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                  target_modules=list(lora.target_modules), bias="none")
    if dual and num_experts is not None:
        raise ValueError("a model is either a FedLEASE mixture or a FedDPA dual adapter, not both")
    if dual:
        config: PeftLoraConfig = DualLoraConfig(**common)
        config._register_custom_module({nn.Linear: DualLoraLinear})
    elif num_experts is None:
        config = PeftLoraConfig(**common)
    else:
        router = router or RouterConfig()
        config = MixtureLoraConfig(**common, num_experts=num_experts, renormalize=router.renormalize,
                                   top_k=router.top_k, router_init_std=router.init_std, own_prior=router.own_prior,
                                   personal=router.personal_expert)
        config._register_custom_module({nn.Linear: MixtureLoraLinear})
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules {lora.target_modules}: {exc}") from None
    if dual:
        install_instance_weighting(wrapped)
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Adapted modules by their name in the unwrapped model, in model order."""
    return {name.removeprefix(_PREFIX): mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}


def personal_weights(layer: LoraLayer) -> tuple[nn.Parameter, nn.Parameter] | None:
    """A mixture's personal LoRA (A, B) weights; None when the layer has none (`router.personal_expert` off)."""
    if not isinstance(layer, MixtureLoraLinear) or ADAPTER not in layer.lora_personal_A:
        return None
    return layer.lora_personal_A[ADAPTER].weight, layer.lora_personal_B[ADAPTER].weight


def get_state(model: nn.Module, head_module: str | None = None, groups: Iterable[str] = ("lora", "router", "head")
              ) -> dict[str, torch.Tensor]:
    """Copy the named groups of adapter state out of the model (detached, CPU)."""
    groups = set(groups)
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        if "lora" in groups or "lora_A" in groups:
            out[f"lora.{name}.A"] = layer.lora_A[ADAPTER].weight
        if "lora" in groups or "lora_B" in groups:
            out[f"lora.{name}.B"] = layer.lora_B[ADAPTER].weight
        if "router" in groups and isinstance(layer, MixtureLoraLinear):
            out[f"router.{name}"] = layer.lora_router[ADAPTER].weight
        if "foreign" in groups and isinstance(layer, MixtureLoraLinear):
            out[f"foreign.{name}.A"] = layer.moe_foreign_A
            out[f"foreign.{name}.B"] = foreign_b_view(layer)
        if "personal" in groups and (pair := personal_weights(layer)):
            out[f"personal.{name}.A"], out[f"personal.{name}.B"] = pair
        if "dual" in groups and isinstance(layer, DualLoraLinear):
            out[f"dual.{name}.A"] = layer.lora_local_A[ADAPTER].weight
            out[f"dual.{name}.B"] = layer.lora_local_B[ADAPTER].weight
            out[f"dual.{name}.reference"] = layer.dpa_reference
            out[f"dual.{name}.count"] = layer.dpa_count
    if "head" in groups and head_module is not None:
        head = _head(model, head_module)
        out["head.weight"] = head.weight
        if head.bias is not None:
            out["head.bias"] = head.bias
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def _head(model: nn.Module, head_module: str) -> nn.Linear:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    head = base.get_submodule(head_linear_name(base, head_module))
    assert isinstance(head, nn.Linear)
    return head


def _target(model: nn.Module, layers: dict[str, LoraLayer], key: str, head_module: str | None) -> torch.Tensor:
    kind, _, rest = key.partition(".")
    if kind == "head":
        if head_module is None:
            raise ArtifactError(f"state key {key}: this model has no task head")
        return getattr(_head(model, head_module), rest)
    name, _, part = rest.rpartition(".") if kind in ("lora", "foreign", "dual", "personal") else (rest, "", "")
    layer = layers.get(name)
    if layer is None:
        raise ArtifactError(f"state key {key}: no adapted module {name!r} in the model")
    if kind == "lora":
        return (layer.lora_A if part == "A" else layer.lora_B)[ADAPTER].weight
    if kind == "dual":
        if not isinstance(layer, DualLoraLinear):
            raise ArtifactError(f"state key {key}: the model has no dual adapter at {name!r}")
        return {"A": layer.lora_local_A[ADAPTER].weight, "B": layer.lora_local_B[ADAPTER].weight,
                "reference": layer.dpa_reference, "count": layer.dpa_count}[part]
    if not isinstance(layer, MixtureLoraLinear):
        raise ArtifactError(f"state key {key}: the model has no mixture at {name!r}")
    if kind == "router":
        return layer.lora_router[ADAPTER].weight
    if kind == "personal":
        pair = personal_weights(layer)
        if pair is None:
            raise ArtifactError(f"state key {key}: the mixture at {name!r} has no personal expert "
                                "(fedlease.router.personal_expert is off)")
        return pair[0] if part == "A" else pair[1]
    return layer.moe_foreign_A if part == "A" else foreign_b_view(layer)


def set_state(model: nn.Module, state: dict[str, torch.Tensor], head_module: str | None = None) -> None:
    """Copy tensors into the model in place, checking every shape and dtype first."""
    layers = lora_layers(model)  # one walk over the modules, not one per key (a 30-layer LM has ~600)
    targets = {key: _target(model, layers, key, head_module) for key in state}
    for key, value in state.items():
        t = targets[key]
        if tuple(value.shape) != tuple(t.shape):
            raise ArtifactError(f"state key {key}: shape {tuple(value.shape)} does not match the model's "
                                f"{tuple(t.shape)}")
        if not value.dtype.is_floating_point:
            raise ArtifactError(f"state key {key}: dtype {value.dtype} is not a float type")
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value.to(targets[key].dtype))


def set_trainable(model: nn.Module, groups: Iterable[str], head_module: str | None = None) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze exactly the named groups; return the trainable parameters."""
    groups = set(groups)
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        if groups & {"lora", "lora_A"}:
            params.append(layer.lora_A[ADAPTER].weight)
        if groups & {"lora", "lora_B"}:
            params.append(layer.lora_B[ADAPTER].weight)
        if "router" in groups and isinstance(layer, MixtureLoraLinear):
            params.append(layer.lora_router[ADAPTER].weight)
        if "personal" in groups and (pair := personal_weights(layer)):
            params += list(pair)
        if "dual" in groups and isinstance(layer, DualLoraLinear):
            params += [layer.lora_local_A[ADAPTER].weight, layer.lora_local_B[ADAPTER].weight]
    if "head" in groups and head_module is not None:
        params += list(_head(model, head_module).parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def foreign_b_view(layer: MixtureLoraLinear) -> torch.Tensor:
    """The foreign experts' B, stored (d_out, (M-1) r), as the (M-1, d_out, r) stack the state uses (a view:
    copying into it writes the buffer)."""
    b = layer.moe_foreign_B
    return b.view(b.shape[0], -1, layer.moe_foreign_A.shape[1]).permute(1, 0, 2)


def stack_foreign(experts: list[dict[str, torch.Tensor]], own: int) -> dict[str, torch.Tensor]:
    """foreign.* state for a client whose own expert is `own`, from global experts (lora.* dicts)."""
    others = [e for i, e in enumerate(experts) if i != own]
    if not others:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key in others[0]:
        _, _, rest = key.partition(".")
        out[f"foreign.{rest}"] = torch.stack([e[key] for e in others])
    return out


def attach_telemetry(model: nn.Module) -> dict[str, RouterTelemetry]:
    """Start counting router use per module; padding tokens are left out via the attention mask."""
    tele: dict[str, RouterTelemetry] = {}
    for name, layer in lora_layers(model).items():
        if isinstance(layer, MixtureLoraLinear):  # one column per expert, the personal one last
            layer.moe_telemetry = tele[name] = RouterTelemetry(layer.moe_slot_gates.shape[1])

    def capture_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for t in tele.values():
            t.mask = kwargs.get("attention_mask")

    if tele:
        model._fedlease_telemetry_hook = model.register_forward_pre_hook(capture_mask, with_kwargs=True)
    return tele


def detach_telemetry(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        if isinstance(layer, MixtureLoraLinear):
            layer.moe_telemetry = None
    hook = getattr(model, "_fedlease_telemetry_hook", None)
    if hook is not None:
        hook.remove()
        del model._fedlease_telemetry_hook
