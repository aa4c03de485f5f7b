"""FedDPA's dual adapter: the instance-wise weight and the mixed output on hand-checkable tensors."""

from __future__ import annotations

import torch

from fedlease.config import LoraConfig
from fedlease.models.adapters import get_state, lora_layers, set_state, set_trainable, wrap_lora
from fedlease.models.dual import (NO_CENTROID_WEIGHT, dual_delta, instance_weight, sequence_mean,
                                  updated_centroid)
from tests.test_moe import _tiny_base


def test_sequence_mean_leaves_padding_out():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert sequence_mean(x, mask).tolist() == [[2.0, 1.0]]
    assert torch.allclose(sequence_mean(x, None), torch.tensor([[104 / 3, 34.0]]))


def test_instance_weight_is_clamped_cosine_to_the_centroid():
    centroid = torch.tensor([1.0, 0.0])
    reps = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [-1.0, 0.0]])
    w = instance_weight(reps, centroid, count=10)
    assert torch.allclose(w, torch.tensor([1.0, 2 ** -0.5, 0.0, 0.0]))
    assert instance_weight(reps, centroid, count=0).tolist() == [NO_CENTROID_WEIGHT] * 4


def test_centroid_is_the_running_mean():
    c, n = updated_centroid(torch.zeros(2), 0, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert c.tolist() == [1.0, 1.0] and n == 2
    c, n = updated_centroid(c, n, torch.tensor([[4.0, 4.0]]))
    assert c.tolist() == [2.0, 2.0] and n == 3


def test_dual_delta_mixes_per_instance():
    g = torch.ones(2, 3, 4)
    loc = torch.full((2, 3, 4), 3.0)
    out = dual_delta(g, loc, torch.tensor([0.0, 0.25]))
    assert torch.all(out[0] == 1.0) and torch.all(out[1] == 0.75 * 1 + 0.25 * 3)


def test_dual_model_output_matches_the_formula_and_trains_both_loras():
    lora = LoraConfig(r=2, alpha=4, target_modules=["query"])
    model = wrap_lora(_tiny_base(), lora, None, seed=0, dual=True)
    state = get_state(model, "classifier", ("lora", "dual"))
    state = {k: (torch.randn_like(v) if k.endswith((".A", ".B")) else v) for k, v in state.items()}
    centroid = torch.randn(8)
    state["dual.query.centroid"], state["dual.query.count"] = centroid, torch.tensor([5.0])
    set_state(model, state, "classifier")
    model.eval()
    layer = lora_layers(model)["query"]
    x = torch.randn(3, 4, 8)
    base = layer.get_base_layer()(x)
    alpha = torch.nn.functional.cosine_similarity(x.mean(1), centroid.unsqueeze(0), dim=-1).clamp(0, 1)
    glob = x @ state["lora.query.A"].T @ state["lora.query.B"].T
    loc = x @ state["dual.query.A"].T @ state["dual.query.B"].T
    expected = base + 2.0 * ((1 - alpha)[:, None, None] * glob + alpha[:, None, None] * loc)
    assert torch.allclose(layer(x), expected, atol=1e-5)

    model.train()
    params = set_trainable(model, ("lora", "dual", "head"), "classifier")
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert float(layer.dpa_count) == 5 + 3, "training inputs update the client's centroid"
