"""Strategy bookkeeping on hand-made tensors: IFCA's remembered cluster choice, the local floor's epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlease.config import config_from_dict
from fedlease.strategies import make_strategy, needs_warmup
from fedlease.strategies.base import ServerState, Update

from .conftest import tiny_params


def _lora(value: float) -> dict[str, torch.Tensor]:
    return {"lora.m.A": torch.full((1, 2), value), "lora.m.B": torch.full((2, 1), value)}


def test_ifca_averages_within_clusters_and_evaluates_the_joined_cluster(tmp_path: Path):
    cfg = config_from_dict(tiny_params(tmp_path, baselines__ifca_clusters=2))
    ifca = make_strategy("ifca", cfg, 3)
    state = ServerState({"cluster0.lora.m.A": torch.zeros(1, 2), "cluster0.lora.m.B": torch.zeros(2, 1),
                         "cluster1.lora.m.A": torch.ones(1, 2), "cluster1.lora.m.B": torch.ones(2, 1)})
    assert set(ifca.candidates(ifca.eval_download(state, 0))) == {0, 1}, "no pick yet: the client chooses by loss"
    updates = [Update(0, _lora(2.0), 10, 1), Update(1, _lora(4.0), 30, 1), Update(2, _lora(8.0), 5, 0)]
    state = ifca.aggregate(state, updates)
    assert torch.allclose(state.tensors["cluster1.lora.m.A"], torch.full((1, 2), (2 * 10 + 4 * 30) / 40))
    assert torch.allclose(state.tensors["cluster0.lora.m.B"], torch.full((2, 1), 8.0))
    assert state.meta["assignment"] == {"0": 1, "1": 1, "2": 0}
    down = ifca.eval_download(state, 2)
    assert set(down.tensors) == {"cluster0.lora.m.A", "cluster0.lora.m.B"} and not ifca.candidates(down)
    assert torch.equal(ifca.client_state(down)["lora.m.A"], torch.full((1, 2), 8.0))
    assert len(ifca.download(state, 2).tensors) == 4, "training still downloads every cluster LoRA"
    # a client absent from a round keeps its last pick
    state = ifca.aggregate(state, [Update(0, _lora(1.0), 10, 0)])
    assert state.meta["assignment"] == {"0": 0, "1": 1, "2": 0}


def test_local_floor_trains_the_common_budget_from_the_warmup(tmp_path: Path):
    cfg = config_from_dict(tiny_params(tmp_path, strategies=["local"], training__local_epochs=3))
    local = make_strategy("local", cfg, 4)
    assert [local.local_epochs(r) for r in (1, 2)] == [3, 3]
    assert needs_warmup(["local"]) and needs_warmup(["fedlease"]) and needs_warmup(cfg.strategies)
    assert not needs_warmup(["fedit", "ifca"])


def test_ifca_final_model_records_the_cluster_an_unsampled_client_was_evaluated_with(tmp_path: Path):
    """A client IFCA never sampled joins no cluster; its evaluation chooses one by loss. The final model
    records that choice, so `fedlease predict` gives the evaluated model (it gave the common init)."""
    from fedlease.data.stage import load_client
    from fedlease.engine.evaluate import predict_labels
    from fedlease.io import load_tensors, read_json
    from fedlease.models.adapters import get_state
    from fedlease.pipeline import run_all
    from fedlease.predict import load_client_model

    cfg = config_from_dict(tiny_params(tmp_path, strategies=["ifca"], federation__clients_per_round=0.25,
                                       federation__protocol="paper", baselines__ifca_clusters=2))
    run_all(cfg)
    home = tmp_path / "outputs" / "federate" / "ifca"
    result = read_json(home / "result.json")
    unsampled = [c for c, g in enumerate(result["assignment"]) if g == -1]
    assert unsampled, "the setting leaves a client unsampled"
    recorded = read_json(home / "final" / "meta.json")["state_meta"]["assignment"]
    assert sorted(map(int, recorded)) == list(range(len(result["assignment"]))), "every client has a cluster"
    last = result["history"][-1]["eval"]["clients"]
    for c in unsampled:
        model, tokenizer, _, _ = load_client_model(home / "final", c)
        test = load_client(cfg, c).test
        preds = predict_labels(model, tokenizer, test, cfg.model.max_length, cfg.training.eval_batch_size)
        accuracy = sum(p == r["label"] for p, r in zip(preds, test, strict=True)) / len(test)
        assert accuracy == pytest.approx(last[str(c)]["accuracy"]), (c, "the predicted model is the evaluated one")
        cluster = load_tensors(home / "final" / "server_state.safetensors")
        lora = get_state(model, None, ("lora",))
        prefix = f"cluster{recorded[str(c)]}."
        assert lora and all(torch.equal(v, cluster[prefix + k]) for k, v in lora.items()), "it loads its cluster"
