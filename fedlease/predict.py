"""Rebuild a client's model from an exported final-model folder and predict, without training code.

The folder (written by the federate stage, logged to MLflow and registered) holds the
server state, the resolved params and each client's local state; a client's model is
the base model + what the server would send it + its local state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlease.allocation import Allocation
from fedlease.config import Config, config_from_dict
from fedlease.io import ArtifactError, load_tensors, read_json
from fedlease.strategies import make_strategy
from fedlease.strategies.base import ServerState


def load_client_model(model_dir: Path, client_id: int) -> tuple[Any, Any, list[str] | None, Config]:
    from fedlease.client import ClientRuntime
    from fedlease.models.adapters import set_state

    model_dir = Path(model_dir)
    meta = read_json(model_dir / "meta.json")
    cfg = config_from_dict(read_json(model_dir / "params.json"), source=str(model_dir / "params.json"))
    clients = read_json(model_dir / "clients.json")
    if str(client_id) not in clients:
        raise ArtifactError(f"client {client_id}: not in this model (clients 0..{len(clients) - 1})")
    strategy = make_strategy(meta["strategy"], cfg, len(clients))
    if hasattr(strategy, "with_allocation"):
        strategy.with_allocation(Allocation.from_json(read_json(model_dir / "cluster_map.json")))
    state = ServerState(load_tensors(model_dir / "server_state.safetensors"), meta["state_meta"])
    info = read_json(model_dir / "clients" / f"client_{client_id:03d}.json")
    label_names = info.get("label_names")
    rt = ClientRuntime(cfg)
    model = rt.fresh_model(strategy.spec(client_id), len(label_names or [0, 0]))
    head = rt.head_module()
    set_state(model, strategy.client_state(strategy.eval_download(state, client_id)), head)
    local = model_dir / "clients" / f"client_{client_id:03d}.safetensors"
    if local.exists():
        set_state(model, load_tensors(local), head)
    return model, rt.tokenizer, label_names, cfg


def predict(model_dir: Path, client_id: int, texts: list[str], text_pair: str | None = None) -> list[str]:
    model, tokenizer, label_names, cfg = load_client_model(model_dir, client_id)
    if cfg.data.kind == "generation":
        from fedlease.engine.evaluate import generate

        return generate(model, tokenizer, texts, cfg.model.max_length, cfg.training.max_new_tokens, 8)
    from fedlease.engine.evaluate import predict_labels

    records = [{"text": t, "text_pair": text_pair, "label": 0} for t in texts]
    preds = predict_labels(model, tokenizer, records, cfg.model.max_length, cfg.training.eval_batch_size)
    assert label_names is not None
    return [label_names[p] for p in preds]
