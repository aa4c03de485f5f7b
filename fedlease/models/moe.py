"""Mixture of LoRA experts with FedLEASE's adaptive top-M router, on unmodified peft.

peft injects an ordinary LoRA adapter (rank r, scaling alpha/r) into every target
module: that adapter *is* the client's own (assigned) expert, so it is trained by
peft's usual machinery. Through peft's documented custom-layer hook
(`LoraConfig._register_custom_module`) the target Linear becomes
`MixtureLoraLinear`, whose LoRA variant adds the other M-1 experts as frozen
buffers and a per-module router `Linear(d_in, S, bias=False)`.

Routing, per token (paper, Stage 2): w = softmax(G x) over S = 2M-1 slots; keep
the top M; slots 0..M-1 map to the own expert, slots M..2M-2 one-to-one to the
foreign experts, so the own expert is always kept (pigeonhole). Weights of slots
that map to one expert add up. The experts are computed as one stacked LoRA of
rank M*r (two matmuls), never a loop over experts with masks:
    y = W0 x + (alpha/r) * B_stack (g(x) (x) 1_r  *  A_stack x)
The layer runs this in few kernels (GPU launch count, not FLOPs, is the mixture's cost there): the
router's logits come out of the experts' down-projection matmul, routing is one top-k threshold, one
masked softmax and one slot-to-expert matmul that also applies the LoRA scaling (`route_fused`, equal to
`route` within float rounding), the foreign experts' B is stored in the up-projection's layout and the
residual add is fused into the up-projection (addmm).

Local expert order is [own, foreign ascending by global id]; `expert_order`
maps it back to global expert ids. Beyond the paper, `personal` adds one more expert after them: the
client's personal LoRA (trained, never uploaded), on a slot of its own that is always kept (it takes no
place in the top M), so the router can lean on the client's own fit where the cluster's expert does not
suit it (label skew within a cluster).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn


@dataclass
class MixtureLoraConfig(PeftLoraConfig):
    """peft's LoraConfig plus the mixture's shape. `r`/`lora_alpha` are one expert's."""

    num_experts: int = field(default=1, metadata={"help": "M, the number of LoRA experts"})
    renormalize: bool = field(default=True, metadata={"help": "Renormalise kept slot weights to sum to 1"})
    top_k: int | None = field(
        default=None, metadata={"help": "Ablation: plain top-k over M slots, no 2M-1 trick"}
    )
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the router's normal init"})
    own_prior: float = field(default=0.0, metadata={"help": "Fixed logit added to the own expert's slot weights"})
    personal: bool = field(default=False, metadata={"help": "One more, always kept slot: a personal LoRA"})


def slot_map(num_experts: int, top_k: int | None = None, personal: bool = False
             ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(S, E) one-hot map from router slots to local experts, how many slots to keep, and which slots are
    always kept (None: none).

    Adaptive top-M: S = 2M-1, slots 0..M-1 -> expert 0 (own), slot M-1+k -> expert k.
    Ablation top-k: S = M, slot k -> expert k, keep k.
    `personal`: one more slot and expert (E = M + 1), always kept on top of the `keep` chosen ones.
    """
    m = num_experts
    if top_k is None:
        targets = [0] * m + list(range(1, m))
        keep = m
    else:
        if not 1 <= top_k <= m:
            raise ValueError(f"fedlease.router.top_k: {top_k} is outside 1..{m}")
        targets = list(range(m))
        keep = top_k
    if not personal:
        return F.one_hot(torch.tensor(targets), m).float(), keep, None
    always = torch.zeros(len(targets) + 1, dtype=torch.bool)
    always[-1] = True
    return F.one_hot(torch.tensor([*targets, m]), m + 1).float(), keep + 1, always


def choice_logits(logits: torch.Tensor, always: torch.Tensor | None) -> torch.Tensor:
    """The logits the kept slots are chosen on (no gradient): an always-kept slot at +inf, so it is among
    the top whatever the router says and the others compete for the remaining places."""
    choice = logits.detach()
    return choice if always is None else choice.masked_fill(always, float("inf"))


def route(logits: torch.Tensor, slots: torch.Tensor, keep: int, renormalize: bool,
          prior: torch.Tensor | None = None, always: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token expert weights (..., E) and which experts were selected (..., E bool), from
    router logits (..., S); E = M, or M + 1 with a personal expert. Pure function. Selection is by slot
    index, so an expert whose weight underflows to 0 in float32 still counts as selected. A `prior` (S,) is
    added to the logits the weights come from, not to those that choose the kept slots: it moves weight towards the own
    expert without keeping the foreign slots out of the top M (where they would get no gradient). Slots in
    `always` (S,) bool are kept whatever their logit (`keep` counts them)."""
    mask = torch.ones_like(logits)
    if keep < logits.shape[-1]:
        top = torch.topk(choice_logits(logits, always), keep, dim=-1).indices
        mask = torch.zeros_like(logits).scatter_(-1, top, 1.0)
    w = torch.softmax(logits if prior is None else logits + prior, dim=-1) * mask
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    slots = slots.to(w.dtype)
    return w @ slots, (mask @ slots) > 0


def route_fused(logits: torch.Tensor, slot_gates: torch.Tensor, keep: int, renormalize: bool,
                want_selected: bool = False, prior: torch.Tensor | None = None,
                always: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`route` in fewer kernels (what the layer runs). The kept slots are those at or above the
    `keep`-th largest logit (softmax is monotone; a tie at the threshold keeps every tied slot, where
    `route` keeps an arbitrary one of them); the dropped ones are pushed to the bottom of the dtype before the
    softmax (= softmax, mask, renormalise; their weight is exactly 0, and the add has no backward kernel) and
    one matmul with `slot_gates` (S, M) maps slots to experts. The layer folds the
    LoRA scaling into `slot_gates`, so the gates come out scaled at no extra kernel. No gradient flows
    through the threshold. A `prior` enters the weights, not the choice of slots, and `always` slots are
    kept (as in `route`). Equal to `route` within float rounding (tested)."""
    dropped = None
    weighted = logits if prior is None else logits + prior
    if keep < logits.shape[-1]:
        choice = choice_logits(logits, always)
        threshold = choice.topk(keep, dim=-1).values[..., -1:]
        dropped = choice < threshold
        if renormalize:  # a dropped slot's logit pushed to the dtype's bottom: exp gives exactly 0, one add
            w = torch.softmax(torch.add(weighted, dropped, alpha=-torch.finfo(logits.dtype).max), dim=-1)
        else:
            w = torch.softmax(weighted, dim=-1) * ~dropped
    else:
        w = torch.softmax(weighted, dim=-1)
    gates = w @ slot_gates.to(w.dtype)
    selected = None
    if want_selected:
        kept = torch.ones_like(w) if dropped is None else (~dropped).to(w.dtype)
        selected = (kept @ (slot_gates != 0).to(w.dtype)) > 0
    return gates, selected


def mixture_delta(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, gates: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """sum_e gates_e * scaling * B_e A_e x as two matmuls. a_stack (M,r,din), b_stack (M,dout,r)."""
    m, r, d_in = a_stack.shape
    h = F.linear(x, a_stack.reshape(m * r, d_in))
    h = h * gates.repeat_interleave(r, dim=-1)
    b_flat = b_stack.permute(1, 0, 2).reshape(b_stack.shape[1], m * r)
    return F.linear(h, b_flat) * scaling


class InputDependentVariant(LoraVariant):
    """A LoRA variant whose delta depends on the input, so it has no weight to merge."""

    unmergeable: str = "an input-dependent adapter"

    @classmethod
    def merge_safe(cls, module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{cls.unmergeable} depends on the input and cannot be merged")

    @classmethod
    def merge_unsafe(cls, module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        raise NotImplementedError(f"{cls.unmergeable} depends on the input and cannot be merged")

    @classmethod
    def unmerge(cls, module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{cls.unmergeable} depends on the input and cannot be merged")


class MixtureVariant(InputDependentVariant):
    """The LoRA variant that turns peft's adapter into the own expert of a mixture."""

    unmergeable = "a routed mixture"

    @staticmethod
    def init(module: MixtureLoraLinear, adapter_name: str, config: MixtureLoraConfig, **kwargs: Any) -> None:
        m = config.num_experts
        r = module.r[adapter_name]
        slots, keep, always = slot_map(m, config.top_k, config.personal)
        weight = module.get_base_layer().weight
        # slot -> expert map times the LoRA scaling: the routing matmul gives scaled gates (no extra kernel)
        module.moe_scaling = float(module.scaling[adapter_name])  # fixed here: peft's set_scale does not reach it
        module.register_buffer("moe_slot_gates", (slots * module.moe_scaling).to(weight.device), persistent=False)
        # the own-expert prior: a fixed logit on the weights of expert 0's slots (None when 0: no extra kernel)
        prior = (slots[:, 0] * config.own_prior).to(weight.device) if config.own_prior else None
        module.register_buffer("moe_prior", prior, persistent=False)  # a None buffer: moved with the model when set
        module.register_buffer("moe_always", None if always is None else always.to(weight.device), persistent=False)
        module.moe_keep = keep
        module.moe_renormalize = config.renormalize
        module.register_buffer("moe_foreign_A", torch.zeros(m - 1, r, module.in_features, device=weight.device))
        # stored as the up-projection reads it, (d_out, (M-1) r); `foreign_b_view` shows it as (M-1, d_out, r)
        module.register_buffer("moe_foreign_B", torch.zeros(module.out_features, (m - 1) * r, device=weight.device))
        if not hasattr(module, "lora_router"):
            module.lora_router = nn.ModuleDict()
        router = nn.Linear(module.in_features, slots.shape[0], bias=False, device=weight.device)
        nn.init.normal_(router.weight, std=config.router_init_std)
        module.lora_router[adapter_name] = router
        # the personal LoRA (trained, kept by the client; set from its warm-up LoRA before round 1); the
        # dicts exist either way: peft walks every name in `adapter_layer_names`
        for name, (d_out, d_in) in (("lora_personal_A", (r, module.in_features)),
                                    ("lora_personal_B", (module.out_features, r))):
            if not hasattr(module, name):
                setattr(module, name, nn.ModuleDict())
            if config.personal:  # zeros, no random draw: its values come from the warm-up LoRA
                linear = torch.nn.utils.skip_init(nn.Linear, d_in, d_out, bias=False, device=weight.device)
                nn.init.zeros_(linear.weight)
                getattr(module, name)[adapter_name] = linear
        module.moe_telemetry = None

    @staticmethod
    def forward(module: MixtureLoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        own_a = module.lora_A[active_adapter].weight
        own_b = module.lora_B[active_adapter].weight
        router = module.lora_router[active_adapter].weight
        dtype = own_a.dtype  # frozen experts are buffers: they follow the trainable expert (bf16 under DeepSpeed)
        foreign_a, foreign_b = module.moe_foreign_A, module.moe_foreign_B
        if foreign_a.dtype != dtype:
            foreign_a, foreign_b = foreign_a.to(dtype), foreign_b.to(dtype)
        if x.dtype != dtype:
            x = x.to(dtype)
        personal = module.moe_always is not None
        m, r = foreign_a.shape[0] + 1 + personal, own_a.shape[0]
        extra_a = [module.lora_personal_A[active_adapter].weight] if personal else []
        # one matmul gives every expert's down-projection and the router's logits (same input x); the
        # router sees x before dropout, the experts after it (with dropout on, two matmuls)
        down = torch.cat([own_a, foreign_a.reshape(-1, own_a.shape[1]), *extra_a, router])
        dropout = module.lora_dropout[active_adapter]
        if isinstance(dropout, nn.Identity):
            h, logits = F.linear(x, down).split([m * r, router.shape[0]], dim=-1)
        else:
            logits = F.linear(x, router)
            h = F.linear(dropout(x), down[: m * r])
        prior = None if module.moe_prior is None else module.moe_prior.to(logits.dtype)
        telemetry = module.moe_telemetry
        gates, selected = route_fused(logits, module.moe_slot_gates, module.moe_keep, module.moe_renormalize,
                                      want_selected=telemetry is not None, prior=prior,
                                      always=module.moe_always)  # scaled by alpha / r
        if telemetry is not None:
            telemetry.update(gates.detach() / module.moe_scaling, selected)
        h = (h.unflatten(-1, (m, r)) * gates.unsqueeze(-1)).flatten(-2)
        # result + h B^T as one addmm (the add fused into the matmul)
        extra_b = [module.lora_personal_B[active_adapter].weight] if personal else []
        up = torch.cat([own_b, foreign_b, *extra_b], dim=1)
        base = result.reshape(-1, result.shape[-1])
        if base.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
            base = base.to(h.dtype)  # e.g. a 4-bit base computing in bf16 under fp32 adapters (peft casts back)
        return torch.addmm(base, h.reshape(-1, h.shape[-1]), up.t()).view(*result.shape[:-1], -1)

    def supports_lora_conversion(self) -> bool:
        return False


class MixtureLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear whose variant is the routed mixture (registered as a custom module)."""

    adapter_layer_names = PeftLoraLinear.adapter_layer_names + ("lora_router", "lora_personal_A", "lora_personal_B")

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> LoraVariant | None:
        return MixtureVariant()


class RouterTelemetry:
    """Counts, per module, tokens by number of distinct experts used and weight per expert."""

    def __init__(self, num_experts: int) -> None:
        self.distinct = torch.zeros(num_experts, dtype=torch.float64)
        self.weight = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0
        self.mask: torch.Tensor | None = None

    def update(self, gates: torch.Tensor, selected: torch.Tensor) -> None:
        g = gates.reshape(-1, gates.shape[-1])
        sel = selected.reshape(-1, selected.shape[-1])
        if self.mask is not None and self.mask.numel() == g.shape[0]:
            keep = self.mask.reshape(-1).bool()
            g, sel = g[keep], sel[keep]
        used = sel.sum(-1)
        self.distinct += torch.bincount(used - 1, minlength=g.shape[-1]).double()[: g.shape[-1]]
        self.weight += g.double().sum(0)
        self.tokens += g.shape[0]
