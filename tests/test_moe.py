"""The mixture layer and router against the paper's equations, on hand-checkable tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedlease.config import LoraConfig, RouterConfig
from fedlease.models.adapters import get_state, lora_layers, set_state, set_trainable, stack_foreign, wrap_lora
from fedlease.models.moe import mixture_delta, route, slot_map


def test_slot_map_adaptive_top_m():
    slots, keep, _ = slot_map(3)
    # 2M-1 = 5 slots: three map to the own expert (0), then one each to experts 1 and 2.
    assert keep == 3
    assert slots.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_route_hand_checked():
    slots, keep, _ = slot_map(2)  # 3 slots: [own, own, foreign]
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))  # softmax = [0.5, 0.2, 0.3]
    # keep top 2 -> slots 0 (0.5) and 2 (0.3); own = 0.5, foreign = 0.3
    g, sel = route(logits, slots, keep, renormalize=False)
    assert torch.allclose(g, torch.tensor([[0.5, 0.3]]))
    assert sel.tolist() == [[True, True]]
    g, _ = route(logits, slots, keep, renormalize=True)
    assert torch.allclose(g, torch.tensor([[0.625, 0.375]]))
    # own slots add up when both are kept; the foreign expert is then not selected
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    g, sel = route(logits, slots, keep, renormalize=False)
    assert torch.allclose(g, torch.tensor([[0.75, 0.0]]))
    assert sel.tolist() == [[True, False]]


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 12), tokens=st.integers(1, 6), seed=st.integers(0, 10_000), scale=st.floats(0.01, 50))
def test_assigned_expert_always_selected(m: int, tokens: int, seed: int, scale: float):
    slots, keep, _ = slot_map(m)
    logits = torch.randn(tokens, 2 * m - 1, generator=torch.Generator().manual_seed(seed)) * scale
    g, sel = route(logits, slots, keep, renormalize=True)
    assert sel[:, 0].all(), "the own expert must be in every token's top M"
    used = sel.sum(-1)
    assert ((used >= 1) & (used <= m)).all()
    assert torch.allclose(g.sum(-1), torch.ones(tokens, dtype=g.dtype), atol=1e-5)
    assert ((g > 0) <= sel).all(), "no weight on an unselected expert"


def test_topk_ablation_can_drop_own_expert():
    slots, keep, _ = slot_map(3, top_k=1)
    g, sel = route(torch.tensor([[0.0, 5.0, 0.0]]), slots, keep, renormalize=True)
    assert g.tolist() == [[0.0, 1.0, 0.0]] and sel.tolist() == [[False, True, False]]


def test_mixture_delta_equals_sum_of_weighted_loras():
    gen = torch.Generator().manual_seed(0)
    m, r, d_in, d_out = 3, 2, 5, 4
    a = torch.randn(m, r, d_in, generator=gen)
    b = torch.randn(m, d_out, r, generator=gen)
    x = torch.randn(7, d_in, generator=gen)
    gates = torch.rand(7, m, generator=gen)
    expected = sum(gates[:, e : e + 1] * 2.0 * (x @ a[e].T @ b[e].T) for e in range(m))
    assert torch.allclose(mixture_delta(x, a, b, gates, 2.0), expected, atol=1e-5)


def _tiny_base(hidden: int = 8) -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.value(torch.relu(self.query(x))))

    torch.manual_seed(0)
    return Block()


def test_single_expert_is_exactly_plain_lora():
    lora = LoraConfig(r=2, alpha=4, target_modules=["query", "value"])
    plain = wrap_lora(_tiny_base(), lora, None, seed=3)
    mix = wrap_lora(_tiny_base(), lora, 1, RouterConfig(), seed=3)
    state = get_state(plain, "classifier")
    for key in state:
        if key.endswith(".B"):
            state[key] = torch.randn_like(state[key])
    set_state(plain, state, "classifier")
    set_state(mix, state, "classifier")
    x = torch.randn(4, 6, 8)
    assert torch.equal(plain(x), mix(x))


def test_gradients_reach_only_own_expert_router_and_head():
    lora = LoraConfig(r=2, alpha=4, target_modules=["query", "value"])
    model = wrap_lora(_tiny_base(), lora, 3, RouterConfig(), seed=0)
    state = get_state(model, "classifier", ("lora", "foreign"))
    set_state(model, {k: torch.randn_like(v) for k, v in state.items()}, "classifier")
    params = set_trainable(model, ("lora", "router", "head"), "classifier")
    model(torch.randn(2, 5, 8)).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_A" in n or "lora_B" in n or "lora_router" in n or "classifier" in n) for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    for layer in lora_layers(model).values():
        assert not layer.moe_foreign_A.requires_grad and layer.moe_foreign_A.grad is None
        assert layer.get_base_layer().weight.grad is None


def test_foreign_experts_are_used_and_stacked_in_order():
    experts = [{"lora.m.A": torch.full((2, 3), float(e)), "lora.m.B": torch.full((4, 2), float(e))} for e in range(4)]
    foreign = stack_foreign(experts, own=2)
    assert foreign["foreign.m.A"][:, 0, 0].tolist() == [0.0, 1.0, 3.0]
    assert foreign["foreign.m.B"].shape == (3, 4, 2)


def test_state_shape_mismatch_is_rejected():
    model = wrap_lora(_tiny_base(), LoraConfig(r=2, alpha=4, target_modules=["query"]), None, seed=0)
    from fedlease.io import ArtifactError

    with pytest.raises(ArtifactError, match="shape"):
        set_state(model, {"lora.query.A": torch.zeros(3, 8)})
    with pytest.raises(ArtifactError, match="no adapted module"):
        set_state(model, {"lora.nowhere.A": torch.zeros(2, 8)})


def test_save_load_round_trip_rebuilds_the_same_model(tmp_path):
    from fedlease.io import load_tensors, save_tensors

    lora = LoraConfig(r=2, alpha=4, target_modules=["query", "value"])
    model = wrap_lora(_tiny_base(), lora, 3, RouterConfig(), seed=0)
    state = get_state(model, "classifier", ("lora", "router", "foreign", "head"))
    state = {k: torch.randn_like(v) for k, v in state.items()}
    set_state(model, state, "classifier")
    save_tensors(tmp_path / "client.safetensors", state)
    again = wrap_lora(_tiny_base(), lora, 3, RouterConfig(), seed=99)  # other init: everything must come from the file
    set_state(again, load_tensors(tmp_path / "client.safetensors"), "classifier")
    x = torch.randn(3, 5, 8)
    assert torch.equal(model(x), again(x))
    (tmp_path / "adapter.bin").write_bytes(b"pickle")
    from fedlease.io import ArtifactError

    with pytest.raises(ArtifactError, match="safetensors"):
        load_tensors(tmp_path / "adapter.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        load_tensors(tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match="dtype"):
        set_state(again, {"lora.query.A": torch.zeros(2, 8, dtype=torch.int64)})


def test_fused_routing_equals_the_reference_routing():
    """`route_fused` (what the layer runs) = `route` (the paper's steps, written out) within 1e-6, for
    the adaptive top-M and the top-k ablation, with and without renormalisation."""
    from fedlease.models.moe import route_fused

    torch.manual_seed(0)
    for m in (2, 3, 4, 8):
        for top_k in (None, 1, m):
            slots, keep, _ = slot_map(m, top_k)
            logits = torch.randn(5, 7, slots.shape[0]) * 3
            prior = slots[:, 0] * 1.5  # the own-expert prior on the own slots
            for renormalize in (True, False):
                ref, ref_sel = route(logits, slots, keep, renormalize)
                got, sel = route_fused(logits, slots, keep, renormalize, want_selected=True)
                assert torch.allclose(got, ref, atol=1e-6), (m, top_k, renormalize)
                assert torch.equal(sel, ref_sel)
                ref_p, ref_p_sel = route(logits, slots, keep, renormalize, prior=prior)
                got_p, sel_p = route_fused(logits, slots, keep, renormalize, want_selected=True, prior=prior)
                assert torch.allclose(got_p, ref_p, atol=1e-6), (m, top_k, renormalize, "prior")
                assert torch.equal(sel_p, ref_sel) and torch.equal(ref_p_sel, ref_sel), "the prior changes no selection"
                scaled, _ = route_fused(logits, slots * 2.5, keep, renormalize)
                assert torch.allclose(scaled, 2.5 * ref, atol=1e-6), "the slot map carries the LoRA scaling"


def test_fused_routing_keeps_every_slot_tied_at_the_threshold():
    """M = 2, slots [own, own, foreign], keep 2: logits [2, 1, 1] tie at the threshold (the second largest,
    1), so all three slots stay in the softmax: own gets (e^2 + e) / (e^2 + 2e), foreign e / (e^2 + 2e)."""
    from fedlease.models.moe import route_fused

    slots, keep, _ = slot_map(2)
    logits = torch.tensor([2.0, 1.0, 1.0], requires_grad=True)
    gates, sel = route_fused(logits, slots, keep, True, want_selected=True)
    e = torch.e
    z = e**2 + 2 * e
    assert torch.allclose(gates, torch.tensor([(e**2 + e) / z, e / z]), atol=1e-6)
    assert sel.tolist() == [True, True]
    gates[1].backward()
    assert torch.isfinite(logits.grad).all()


def test_layer_keeps_the_reference_maths_with_dropout_on():
    """With LoRA dropout the router reads x and the experts read dropout(x): the two-matmul path."""
    lora = LoraConfig(r=2, alpha=4, dropout=0.5, target_modules=["query"])
    model = wrap_lora(_tiny_base(), lora, 3, RouterConfig(renormalize=True), seed=0)
    state = get_state(model, "classifier", ("lora", "router", "foreign"))
    set_state(model, {k: torch.randn_like(v) for k, v in state.items()}, "classifier")
    layer = lora_layers(model)["query"]
    model.eval()  # dropout off in eval: the output must match the formula exactly
    x = torch.randn(2, 3, 8)
    st = get_state(model, None, ("lora", "router", "foreign"))
    slots, keep, _ = slot_map(3)
    gates, _ = route(x @ st["router.query"].T, slots, keep, True)
    a = torch.cat([st["lora.query.A"].unsqueeze(0), st["foreign.query.A"]])
    b = torch.cat([st["lora.query.B"].unsqueeze(0), st["foreign.query.B"]])
    expected = layer.get_base_layer()(x) + mixture_delta(x, a, b, gates, 2.0)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_own_prior_weights_the_own_expert_but_leaves_the_foreign_slots_in_the_top_m():
    """M = 2, slots [own, own, foreign], keep 2, logits [0.5, 0, 1], prior b = 2 on the own slots. The kept
    slots come from the logits alone: {0, 2}; the weights from logits + prior: own e^2.5 / (e^2.5 + e^1) =
    e^1.5 / (e^1.5 + 1) = 0.8176, foreign the rest, and the foreign slot's logit gets a gradient. Were the
    prior in the selection, [2.5, 2, 1] would keep slots {0, 1}: own 1, foreign 0, no gradient (the collapse
    measured with the first version of this option)."""
    from fedlease.models.moe import route_fused

    slots, keep, _ = slot_map(2)
    prior = torch.tensor([2.0, 2.0, 0.0])
    for fn in (route, route_fused):
        logits = torch.tensor([0.5, 0.0, 1.0], requires_grad=True)
        gates, sel = fn(logits, slots, keep, True, prior=prior) if fn is route else fn(
            logits, slots, keep, True, want_selected=True, prior=prior)
        own = torch.e ** 1.5 / (torch.e ** 1.5 + 1)
        assert torch.allclose(gates, torch.tensor([own, 1 - own]), atol=1e-6), fn.__name__
        assert sel.tolist() == [True, True]
        gates[0].backward()
        assert abs(logits.grad[2]) > 0.1 and abs(logits.grad[1]) < 1e-6, "the kept foreign slot learns, the dropped not"


def test_own_prior_adds_a_fixed_logit_to_the_own_slots():
    """M = 3, 2M-1 = 5 slots [own, own, own, e1, e2]: the layer keeps the top 3 slots of G x and weights them
    by softmax(G x + [b, b, b, 0, 0]); with a router at zero that gives the own expert 3 e^b / (3 e^b + 2) of
    the softmax (3/5 without the prior)."""
    lora = LoraConfig(r=2, alpha=4, target_modules=["query"])
    model = wrap_lora(_tiny_base(), lora, 3, RouterConfig(renormalize=True, own_prior=2.0), seed=0)
    state = get_state(model, "classifier", ("lora", "router", "foreign"))
    set_state(model, {k: torch.randn_like(v) for k, v in state.items()}, "classifier")
    layer = lora_layers(model)["query"]
    x = torch.randn(2, 3, 8)
    st = get_state(model, None, ("lora", "router", "foreign"))
    slots, keep, _ = slot_map(3)
    prior = torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0])
    gates, _ = route(x @ st["router.query"].T, slots, keep, True, prior=prior)
    a = torch.cat([st["lora.query.A"].unsqueeze(0), st["foreign.query.A"]])
    b = torch.cat([st["lora.query.B"].unsqueeze(0), st["foreign.query.B"]])
    assert torch.allclose(layer(x), layer.get_base_layer()(x) + mixture_delta(x, a, b, gates, 2.0), atol=1e-5)
    w = torch.softmax(torch.zeros(5) + prior, -1)
    assert float(w[:3].sum()) == pytest.approx(3 * torch.e ** 2 / (3 * torch.e ** 2 + 2))
    plain = wrap_lora(_tiny_base(), lora, 3, RouterConfig(), seed=0)
    assert lora_layers(plain)["query"].moe_prior is None, "no prior: no extra kernel"


def test_personal_slot_is_always_kept_and_takes_no_place_in_the_top_m():
    """M = 2 with a personal expert: slots [own, own, foreign, personal] -> experts [own, foreign, personal],
    keep 3 = the top M = 2 of the first three slots plus the personal slot. Logits [0.5, 0, 1, -5]: the
    personal slot is kept although its logit is the lowest, slot 1 (0) is dropped, and the weights are the
    softmax over the kept [0.5, 1, -5]: own e^0.5, foreign e^1, personal e^-5 over their sum."""
    from fedlease.models.moe import route_fused

    slots, keep, always = slot_map(2, personal=True)
    assert slots.argmax(-1).tolist() == [0, 0, 1, 2] and keep == 3 and always.tolist() == [False] * 3 + [True]
    e = torch.e
    z = e**0.5 + e + e**-5
    for fn in (route, route_fused):
        logits = torch.tensor([0.5, 0.0, 1.0, -5.0], requires_grad=True)
        gates, sel = (fn(logits, slots, keep, True, always=always) if fn is route
                      else fn(logits, slots, keep, True, want_selected=True, always=always))
        assert torch.allclose(gates, torch.tensor([e**0.5 / z, e / z, e**-5 / z]), atol=1e-6), fn.__name__
        assert sel.tolist() == [True, True, True]
        gates[2].backward()
        assert logits.grad[3] > 0 and abs(logits.grad[1]) < 1e-6, "the personal slot learns, the dropped not"
    # without the personal slot always kept, top 3 of [0.5, 0, 1, -5] would keep slot 1 and drop the personal one
    plain_gates, plain_sel = route(torch.tensor([0.5, 0.0, 1.0, -5.0]), slots, keep, True)
    assert plain_sel.tolist() == [True, True, False] and float(plain_gates[2]) == 0.0


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("top_k", [None, 1, "m"])
def test_personal_slot_keeps_the_own_expert_always_selected(m: int, top_k: int | str | None):
    """The pigeonhole still holds: of the 2M-1 regular slots the top M are kept, so the own expert is in, and
    the personal one always; the fused routing equals the reference (also for the top-k ablation, whose k
    regular slots are kept beside the personal one, and for M = 1, where nothing is dropped)."""
    from fedlease.models.moe import route_fused

    k = m if top_k == "m" else top_k
    slots, keep, always = slot_map(m, k, personal=True)
    logits = torch.randn(64, slots.shape[0], generator=torch.Generator().manual_seed(m)) * 4
    for renormalize in (True, False):
        ref, ref_sel = route(logits, slots, keep, renormalize, always=always)
        got, sel = route_fused(logits, slots, keep, renormalize, want_selected=True, always=always)
        assert torch.allclose(got, ref, atol=1e-6) and torch.equal(sel, ref_sel), (m, k, renormalize)
        assert sel[:, -1].all() and (sel.sum(-1) <= keep).all()
        if renormalize:
            assert torch.allclose(got.sum(-1), torch.ones(64), atol=1e-6)
    if k is None:
        assert sel[:, 0].all()
    else:
        assert (sel[:, :-1].sum(-1) == k).all(), "the ablation keeps k of the M experts beside the personal one"


def test_layer_with_a_personal_expert_adds_it_to_the_mixture_and_trains_it():
    """The layer's output = W0 x + scaling * sum_e g_e B_e A_e x over [own, foreign..., personal] with the
    gates of `route` (personal slot always kept); the personal LoRA is its own state group, trained when
    named, and a model without it refuses its keys by name."""
    lora = LoraConfig(r=2, alpha=4, target_modules=["query"])
    model = wrap_lora(_tiny_base(), lora, 3, RouterConfig(personal_expert=True), seed=0)
    groups = ("lora", "router", "foreign", "personal")
    state = get_state(model, "classifier", groups)
    assert state["personal.query.A"].shape == (2, 8) and state["personal.query.B"].shape == (8, 2)
    assert state["router.query"].shape == (6, 8), "2M-1 = 5 slots plus the personal one"
    set_state(model, {k: torch.randn_like(v) for k, v in state.items()}, "classifier")
    layer = lora_layers(model)["query"]
    x = torch.randn(2, 3, 8)
    st = get_state(model, None, groups)
    slots, keep, always = slot_map(3, personal=True)
    gates, _ = route(x @ st["router.query"].T, slots, keep, True, always=always)
    a = torch.cat([st["lora.query.A"].unsqueeze(0), st["foreign.query.A"], st["personal.query.A"].unsqueeze(0)])
    b = torch.cat([st["lora.query.B"].unsqueeze(0), st["foreign.query.B"], st["personal.query.B"].unsqueeze(0)])
    assert torch.allclose(layer(x), layer.get_base_layer()(x) + mixture_delta(x, a, b, gates, 2.0), atol=1e-5)
    params = set_trainable(model, ("lora", "router", "personal", "head"), "classifier")
    model(torch.randn(2, 5, 8)).sum().backward()
    personal = layer.lora_personal_A["default"].weight
    assert any(p is personal for p in params) and personal.grad is not None and personal.grad.abs().sum() > 0
    from fedlease.io import ArtifactError

    plain = wrap_lora(_tiny_base(), lora, 3, RouterConfig(), seed=0)
    assert "personal.query.A" not in get_state(plain, None, groups)
    with pytest.raises(ArtifactError, match="no personal expert"):
        set_state(plain, {"personal.query.A": torch.zeros(2, 8)})
