"""The silo side of silo mode, every method, in one process: each client call goes through what a silo's
worker runs (`fedlease.silo.run_silo_call`, its own config and work folder, results through the
exchange store), and the run equals the simulation on the same files. tests/test_silo.py does the same
across real Prefect workers and processes for FedLEASE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlease.config import config_from_dict
from fedlease.pipeline import run_all
from fedlease.silo import SiloConfig, SiloError, run_silo_call, silo_call_for, silo_call_result
from fedlease.strategies import federated_names

from .conftest import tiny_params, write_sentiment_csv, write_topic_csv


def _scores(output_dir: Path) -> dict[str, Any]:
    out = {}
    for result in sorted((output_dir / "federate").glob("*/result.json")):
        history = json.loads(result.read_text())["history"]
        out[result.parent.name] = [(r["round"], r["loss"], {c: v["accuracy"] for c, v in r["eval"]["clients"].items()})
                                   for r in history]
    return out


def _in_process_silos(silos: dict[str, SiloConfig]) -> Any:
    """A mapper that sends each call as the coordinator does (its parameters through JSON) and runs it as
    the client's silo would."""

    def mapper(fn: Any, calls: list[dict[str, Any]], label: str) -> list[Any]:
        out = []
        for call in calls:
            sent = silo_call_for(fn, call)
            wire = json.loads(json.dumps(sent.parameters))
            run_silo_call(wire["kind"], wire["call"], wire["result_path"], silos[sent.silo])
            out.append(silo_call_result(call["cfg"], sent))
        return out

    return mapper


def _client_files(tmp_path: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Four clients' data files, two per silo (a, b), and their tasks."""
    data = tmp_path / "files"
    data.mkdir()
    files = {"a0": write_sentiment_csv(data / "a0.csv", 40, 1), "a1": write_topic_csv(data / "a1.csv", 44, 2),
             "b0": write_sentiment_csv(data / "b0.csv", 36, 3), "b1": write_topic_csv(data / "b1.csv", 48, 4)}
    return files, {"a0": "sentiment", "a1": "topic", "b0": "sentiment", "b1": "topic"}


def test_every_method_through_silo_calls_equals_the_simulation(tmp_path: Path):
    files, tasks = _client_files(tmp_path)
    methods = federated_names()

    def params(root: Path, clients: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
        raw = tiny_params(root, strategies=methods, federation__rounds=2)  # local state carried over a round
        raw["data"] = {"cache_dir": str(tmp_path / "cache"), "tasks": [], "clients": clients,
                       "partition": {"scheme": "files", "min_test_per_client": 4}}
        raw.update(over)
        return raw

    sim = params(tmp_path / "sim", [{"path": str(files[c]), "task": tasks[c]} for c in files])
    run_all(config_from_dict(sim))

    silos = {s: SiloConfig(name=s, workdir=str(tmp_path / "silos" / s),
                           clients={c: {"path": str(files[c])} for c in files if c.startswith(s)})
             for s in ("a", "b")}
    silo_params = params(tmp_path / "coord", [{"silo": c[0], "name": c, "task": tasks[c]} for c in files])
    silo_params["orchestration"] = {"task_runner": "silo"}
    silo_params["federation"]["exchange"] = {"url": str(tmp_path / "store")}
    run_all(config_from_dict(silo_params), mapper=_in_process_silos(silos))

    got, want = _scores(tmp_path / "coord" / "outputs"), _scores(tmp_path / "sim" / "outputs")
    assert set(want) == set(methods) and got == want
    coord = tmp_path / "coord" / "outputs"
    assert not (coord / "data" / "clients").exists() and not list(coord.glob("*/*/clients"))
    assert list((tmp_path / "silos" / "b").glob("outputs-*/data/clients/client_003.json"))
    assert list((tmp_path / "silos" / "b").glob("outputs-*/federate/fedsa_lora/clients/client_003/round_0002*"))

    # a call for a client the silo does not hold, or belonging to another silo, is refused by name
    call = {"cfg": config_from_dict(silo_params).model_dump(mode="json"), "client_id": 0}
    with pytest.raises(SiloError, match="silo b: client 0 \\(a0\\) belongs to silo a"):
        run_silo_call("prepare", call, str(tmp_path / "r.json"), silos["b"])
    stray = SiloConfig(name="a", workdir=str(tmp_path / "stray"), clients={})
    with pytest.raises(SiloError, match="silo a: no client 'a0' in its config"):
        run_silo_call("prepare", call, str(tmp_path / "r.json"), stray)


def test_a_silo_export_gives_an_unsampled_ifca_client_the_cluster_it_was_evaluated_with(tmp_path: Path):
    """IFCA, a client never sampled: at its silo (whose data chose its cluster at evaluation), the exported
    model records that choice, so `fedlease predict` there gives the evaluated model, not the common init."""
    from fedlease.data.stage import load_client
    from fedlease.engine.batching import iterate_batches
    from fedlease.engine.evaluate import predict_labels
    from fedlease.engine.trainer import compute_loss
    from fedlease.io import load_tensors, read_json
    from fedlease.models.adapters import get_state, set_state
    from fedlease.predict import load_client_model
    from fedlease.silo import export_at_silo, silo_config_for

    files, tasks = _client_files(tmp_path)
    raw = tiny_params(tmp_path / "coord", strategies=["ifca"], federation__clients_per_round=0.25,
                      federation__protocol="paper", baselines__ifca_clusters=2)
    raw["data"] = {"cache_dir": str(tmp_path / "cache"), "tasks": [],
                   "clients": [{"silo": c[0], "name": c, "task": tasks[c]} for c in files],
                   "partition": {"scheme": "files", "min_test_per_client": 4}}
    raw["orchestration"] = {"task_runner": "silo"}
    raw["federation"]["exchange"] = {"url": str(tmp_path / "store")}
    silos = {s: SiloConfig(name=s, workdir=str(tmp_path / "silos" / s),
                           clients={c: {"path": str(files[c])} for c in files if c.startswith(s)})
             for s in ("a", "b")}
    cfg = config_from_dict(raw)
    run_all(cfg, mapper=_in_process_silos(silos))

    result = read_json(tmp_path / "coord" / "outputs" / "federate" / "ifca" / "result.json")
    unsampled = [c for c, g in enumerate(result["assignment"]) if g == -1]
    assert unsampled, "the setting leaves a client unsampled"
    last = result["history"][-1]["eval"]["clients"]
    names = list(files)
    for silo_name in sorted({names[c][0] for c in unsampled}):
        silo = silos[silo_name]
        folder = export_at_silo(silo, str(tmp_path / "store"), "outputs", "ifca")
        recorded = read_json(folder / "meta.json")["state_meta"]["assignment"]
        clusters = load_tensors(folder / "server_state.safetensors")
        for c in [c for c in unsampled if names[c][0] == silo_name]:
            assert str(c) in recorded, (c, "the silo's export records the client's cluster")
            model, tokenizer, _, _ = load_client_model(folder, c)
            lora = get_state(model, None, ("lora",))
            assert lora and all(torch.equal(v, clusters[f"cluster{recorded[str(c)]}.{k}"]) for k, v in lora.items())
            data = load_client(silo_config_for(cfg, silo), c)
            preds = predict_labels(model, tokenizer, data.test, cfg.model.max_length, cfg.training.eval_batch_size)
            accuracy = sum(p == r["label"] for p, r in zip(preds, data.test, strict=True)) / len(data.test)
            assert accuracy == pytest.approx(last[str(c)]["accuracy"]), (c, "the predicted model is the evaluated one")
            # the recorded cluster is IFCA's choice: the lowest mean loss on the client's whole training set
            losses = {}
            model.eval()
            for k in (0, 1):
                set_state(model, {key: clusters[f"cluster{k}.{key}"] for key in lora})
                with torch.no_grad():
                    batches = list(iterate_batches(tokenizer, data.train, "classification",
                                                   cfg.training.eval_batch_size, cfg.model.max_length, 1, 0))
                    losses[k] = sum(float(compute_loss(model, b.tensors, "classification")) * b.size
                                    for b in batches) / len(data.train)
            assert losses[0] != losses[1] and int(recorded[str(c)]) == min(losses, key=losses.__getitem__), losses
