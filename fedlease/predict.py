"""Rebuild a client's model from an exported final-model folder and predict, without training code.

The folder (written by the federate stage, logged to MLflow and registered) holds the
server state, the resolved params and each client's local state; a client's model is
the base model + what the server would send it + its local state (`fedlease.runtime.build_client_model`,
the same builder training uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlease.allocation import Allocation
from fedlease.config import Config, config_from_dict
from fedlease.io import ArtifactError, load_tensors, read_json
from fedlease.runtime import ClientRuntime, build_client_model
from fedlease.strategies import make_strategy, strategy_class
from fedlease.strategies.base import ServerState


def load_client_model(model_dir: Path, client_id: int) -> tuple[Any, Any, list[str] | None, Config]:
    model_dir = Path(model_dir)
    meta = read_json(model_dir / "meta.json")
    cfg = config_from_dict(read_json(model_dir / "params.json"), source=str(model_dir / "params.json"))
    clients = read_json(model_dir / "clients.json")
    if str(client_id) not in clients:
        raise ArtifactError(f"client {client_id}: not in this model (clients 0..{len(clients) - 1})")
    allocation = None
    if strategy_class(meta["strategy"]).needs_allocation:
        allocation = Allocation.from_json(read_json(model_dir / "cluster_map.json"))
    strategy = make_strategy(meta["strategy"], cfg, len(clients), allocation)
    state = ServerState(load_tensors(model_dir / "server_state.safetensors"), meta["state_meta"])
    own = model_dir / "clients" / f"client_{client_id:03d}.json"
    if not own.exists():
        raise ArtifactError(f"client {client_id}: its head and local state are not in {model_dir} (silo mode keeps "
                            "them at the client's silo: `fedlease silo export` there writes its full model)")
    label_names = read_json(own).get("label_names")
    local_file = model_dir / "clients" / f"client_{client_id:03d}.safetensors"
    local = load_tensors(local_file) if local_file.exists() else None
    rt = ClientRuntime(cfg)
    model = build_client_model(rt, strategy, client_id, len(label_names or [0, 0]),
                               strategy.eval_download(state, client_id), local)
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


def predict_rows(model_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """One answer per row ({client, text[, text_pair]} or {client, prompt}), each from its client's model;
    rows are batched by client (and pair text), in their order."""
    out: list[str | None] = [None] * len(rows)
    groups: dict[tuple[int, str | None], list[int]] = {}
    for i, row in enumerate(rows):
        if "client" not in row:
            raise ArtifactError(f"row {i}: no 'client' column (columns: client, text[, text_pair] or prompt)")
        pair = row.get("text_pair")
        groups.setdefault((int(row["client"]), pair if isinstance(pair, str) and pair else None), []).append(i)
    for (client, pair), idx in groups.items():
        texts = [str(rows[i].get("text", rows[i].get("prompt", ""))) for i in idx]
        for i, answer in zip(idx, predict(model_dir, client, texts, pair), strict=True):
            out[i] = answer
    return [o or "" for o in out]
