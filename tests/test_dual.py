"""FedDPA's dual adapter and schedule: the instance-wise weight and the mixed output on hand-checkable
tensors; the weight computed at inference from the stored references; what each round's phases train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlease.config import LoraConfig, config_from_dict
from fedlease.models.adapters import get_state, lora_layers, set_state, wrap_lora
from fedlease.models.dual import (dual_delta, dual_layers, fixed_weight, instance_weight, representations,
                                  sequence_mean, store_reference)
from tests.conftest import tiny_params
from tests.test_moe import _tiny_base


def test_sequence_mean_leaves_padding_out():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert sequence_mean(x, mask).tolist() == [[2.0, 1.0]]
    assert torch.allclose(sequence_mean(x, None), torch.tensor([[104 / 3, 34.0]]))


def test_instance_weight_is_w_times_the_mean_cosine_to_the_references():
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reps = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    w = instance_weight(reps, refs, max_weight=0.5)
    # cosines: (1, 0) -> mean 0.5; (2^-0.5, 2^-0.5) -> 2^-0.5; negative -> clamped to 0
    assert torch.allclose(w, torch.tensor([0.25, 0.5 * 2 ** -0.5, 0.0]))


def test_dual_delta_mixes_per_instance_or_by_a_fixed_weight():
    g = torch.ones(2, 3, 4)
    loc = torch.full((2, 3, 4), 3.0)
    out = dual_delta(g, loc, torch.tensor([0.0, 0.25]))
    assert torch.all(out[0] == 1.0) and torch.all(out[1] == 0.75 * 1 + 0.25 * 3)
    assert torch.all(dual_delta(g, loc, 0.5) == 2.0)


def test_fixed_weight_mixes_by_the_formula_and_restores():
    lora = LoraConfig(r=2, alpha=4, target_modules=["query"])
    model = wrap_lora(_tiny_base(), lora, None, seed=0, dual=True)
    state = get_state(model, "classifier", ("lora", "dual"))
    state = {k: (torch.randn_like(v) if k.endswith((".A", ".B")) else v) for k, v in state.items()}
    set_state(model, state, "classifier")
    layer = lora_layers(model)["query"]
    x = torch.randn(3, 4, 8)
    base = layer.get_base_layer()(x)
    glob = x @ state["lora.query.A"].T @ state["lora.query.B"].T
    loc = x @ state["dual.query.A"].T @ state["dual.query.B"].T
    with fixed_weight(model, 0.25):
        assert torch.allclose(layer(x), base + 2.0 * (0.75 * glob + 0.25 * loc), atol=1e-5)
    assert layer.dpa_weight is None
    assert torch.allclose(layer(x), base + 2.0 * glob, atol=1e-5), "no references yet: the global LoRA alone"


def _tiny_dual(tmp_path: Path):
    from fedlease.engine.evaluate import encode_inputs
    from fedlease.runtime import ClientRuntime
    from fedlease.strategies.base import ModelSpec

    cfg = config_from_dict(tiny_params(tmp_path, strategies=["feddpa"]))
    rt = ClientRuntime(cfg)
    model = rt.fresh_model(ModelSpec(r=2, dual=True), 2)
    state = get_state(model, None, ("lora", "dual"))
    torch.manual_seed(1)
    set_state(model, {k: torch.randn_like(v) * 0.5 for k, v in state.items() if k.endswith((".A", ".B"))})
    records = [{"text": t, "label": 0} for t in ("the film was great", "the film was awful", "a lovely film",
                                                   "we talked about the cat", "is it about a city?")]
    return rt, model, lambda recs: encode_inputs(rt.tokenizer, recs, "classification", 16), records


def test_inference_weights_each_input_by_its_similarity_to_the_references(tmp_path: Path):
    rt, model, encode, records = _tiny_dual(tmp_path)
    model.eval()
    store_reference(model, encode(records[:3]))
    layers = dual_layers(model)
    assert all(int(layer.dpa_count) == 3 for layer in layers)
    batch = encode(records)
    expected = instance_weight(representations(model, batch), layers[0].dpa_reference[:3], 0.5)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.allclose(layers[0].dpa_alpha, expected) and expected.max() > 0
    assert len(set(expected.tolist())) > 1, "one weight per instance"
    for i, a in enumerate(expected.tolist()):  # the output is the mixture at that instance's weight
        with torch.no_grad(), fixed_weight(model, a):
            alone = model(**{k: v[i : i + 1] for k, v in batch.items()}).logits
        assert torch.allclose(logits[i], alone[0], atol=1e-5)


def test_feddpa_rounds_train_global_first_then_local_and_global(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from fedlease.client import train_phases
    from fedlease.strategies import make_strategy
    from fedlease.strategies.base import ModelSpec

    rt, model, _, records = _tiny_dual(tmp_path)
    cfg = rt.cfg.model_copy(update={"training": rt.cfg.training.model_copy(update={"local_epochs": 2})})
    rt.cfg = cfg
    dpa = make_strategy("feddpa", cfg, 4)
    train_records = [{**r, "label": i % 2} for i, r in enumerate(records * 4)]
    for round_, local_moves in ((1, False), (2, True)):
        before = get_state(model, None, ("lora", "dual"))
        result = train_phases(rt, dpa, model, train_records, round_, seed=0, spec=ModelSpec(r=2, dual=True))
        after = get_state(model, None, ("lora", "dual"))
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("lora.") for k in moved), "the global LoRA trains every round"
        assert any(k.startswith("dual.") and k.endswith((".A", ".B")) for k in moved) == local_moves
        assert result.steps == 2 * 3  # 2 epochs of 3 batches of 8: in one phase, or 3 + 3 in two
    # round 2's order and freezing, phase by phase: the local LoRA first with the global one frozen, then the
    # global one with the local one frozen (the paper's alternating schedule)
    moved_by_phase = []
    train = rt.engine.train

    def recording_train(model_: torch.nn.Module, *args: object, **kwargs: object) -> object:
        before = get_state(model_, None, ("lora", "dual"))
        out = train(model_, *args, **kwargs)
        after = get_state(model_, None, ("lora", "dual"))
        moved_by_phase.append({k.split(".")[0] for k in before if not torch.equal(before[k], after[k])})
        return out

    monkeypatch.setattr(rt.engine, "train", recording_train)
    train_phases(rt, dpa, model, train_records, 3, seed=0, spec=ModelSpec(r=2, dual=True))
    assert moved_by_phase == [{"dual"}, {"lora"}]
    with pytest.raises(ValueError, match="hidden size"):
        bad = torch.zeros(1, 3, dtype=torch.long)
        for layer in dual_layers(model):
            layer.dpa_reference = torch.zeros(5, 7)
        store_reference(model, {"input_ids": bad, "attention_mask": torch.ones_like(bad)})


def test_phases_sharing_a_budget_split_the_same_batches():
    from fedlease.client import share_of

    items = list(range(7))
    parts = [share_of(items, i, 2) for i in range(2)]
    assert parts[0] + parts[1] == items and abs(len(parts[0]) - len(parts[1])) <= 1
    assert share_of(items, 0, 1) == items


@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_the_body_alone_gives_the_full_models_last_hidden_state(tmp_path: Path, kind: str):
    """FedDPA's representations and the `inputs` distance's signature read the model's body, not its full
    forward (no vocabulary-sized logits): the same mean-pooled last hidden state, to the bit, as the full
    model's `hidden_states[-1]`, with a LoRA that changes it (an encoder with its head; a causal LM)."""
    from fedlease.engine.evaluate import encode_inputs
    from fedlease.models.dual import mean_last_hidden
    from fedlease.runtime import ClientRuntime
    from fedlease.strategies.base import ModelSpec
    from tests.conftest import tiny_generation_params

    raw = tiny_params(tmp_path) if kind == "classification" else tiny_generation_params(tmp_path)
    rt = ClientRuntime(config_from_dict(raw))
    model = rt.fresh_model(ModelSpec(r=2), 2)
    state = get_state(model, None, ("lora",))
    torch.manual_seed(2)
    set_state(model, {k: torch.randn_like(v) for k, v in state.items() if k.endswith((".A", ".B"))})
    model.eval()
    records = ([{"text": t, "label": 0} for t in ("the film was great", "a cat", "is it about a city?")]
               if kind == "classification" else [{"prompt": p, "response": "x"} for p in ("Answer: 1?", "Say hi")])
    batch = encode_inputs(rt.tokenizer, records, kind, 16)
    call = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        body = mean_last_hidden(model, batch)
        full = sequence_mean(model(**call, output_hidden_states=True).hidden_states[-1].float(),
                             call.get("attention_mask"))
        with model.disable_adapter():
            frozen = mean_last_hidden(model, batch)
    assert torch.equal(body, full) and body.shape == (len(records), full.shape[1])
    with torch.no_grad():  # FedDPA's hook hands it the transformers model itself (peft's base model)
        assert torch.equal(mean_last_hidden(model.get_base_model(), batch), body)
    assert not torch.allclose(body, frozen), "the LoRA moves it: the body's forward ran through the adapter"
