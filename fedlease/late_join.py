"""Beyond the paper: a client that joins after the run started (`fedlease join`).

It warms up from the common init exactly as the original clients did, the method places it
(`Strategy.admit`: FedLEASE takes the cluster with the smallest mean B-distance, no re-clustering),
then it trains one round from the method's current state and is evaluated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlease.client import client_evaluate, client_train
from fedlease.config import Config, TaskSpec
from fedlease.data.partition import ClientData
from fedlease.data.sources import DataError, read_local
from fedlease.data.stage import load_manifest
from fedlease.exchange import write_download
from fedlease.io import atomic_write_json, load_tensors, read_json
from fedlease.paths import RunPaths
from fedlease.pipeline import initial_context
from fedlease.runlock import run_lock
from fedlease.runtime import strategy_for
from fedlease.server import Checkpoint
from fedlease.strategies import primary_name, warmup_strategy


def join_client(cfg: Config, data_file: str, task: str, strategy_name: str | None = None) -> dict[str, Any]:
    """Add a client with its own data file to a finished run of `strategy_name` (default: the primary
    method among the params' strategies). Returns its placement and score."""
    with run_lock(cfg.output_dir):  # one joiner at a time: client ids come from joined.json
        return _join(cfg, data_file, task, strategy_name)


def _join(cfg: Config, data_file: str, task: str, strategy_name: str | None) -> dict[str, Any]:
    name = strategy_name or primary_name(cfg.strategies)
    if name is None:
        raise ValueError("join: name a method with --strategy (none of the params' strategies is primary)")
    paths = RunPaths.of(cfg)
    n = len(load_manifest(cfg)["clients"])
    late_root = paths.late
    joined = read_json(late_root / "joined.json") if (late_root / "joined.json").exists() else {}
    cid = n + len(joined)
    data = read_local(TaskSpec(name=task, source="local", path=data_file), cfg.data.kind)
    part = cfg.data.partition
    if len(data.records) < 2:
        raise DataError(f"{data_file}: a joining client needs at least 2 examples")
    order = np.random.default_rng([cfg.seed, cid]).permutation(len(data.records))
    n_test = max(1, round(len(order) * part.test_per_client / (part.train_per_client + part.test_per_client)))
    recs = [{**data.records[i], "task": task} for i in order]
    atomic_write_json(paths.late_client_file(cid),
                      ClientData(cid, task, data.label_names, recs[n_test:], recs[:n_test]).to_json())
    work = late_root / f"client_{cid:03d}"
    # 1. warm-up from the common init, exactly as the original clients did
    warmup = warmup_strategy(cfg, n + 1)
    down = work / "warmup_down.safetensors"
    write_download(down, warmup.download(warmup.init_state(initial_context(cfg, warmup)), cid))
    # its warm-up adapter and head where the original clients' are, mirrored under late/ (RunPaths.home_of):
    # `local` continues from them as it does for the original clients
    adapter = paths.warmup_adapter(cid)
    client_train(cfg, warmup.name, cid, 1, str(down), str(adapter), n + 1)
    # 2. the method places it, from its warm-up adapter and the original clients'
    strategy = strategy_for(cfg, name, n + 1)
    loaded = Checkpoint(strategy.home(paths) / "checkpoint").load()
    state = loaded[0] if loaded is not None else strategy.init_state(initial_context(cfg, strategy))
    peers = [load_tensors(paths.warmup_adapter(c)) for c in range(n)]
    state, placement = strategy.admit(state, cid, load_tensors(adapter), peers)
    # 3. one local round from the current state, then its evaluation
    write_download(work / "down.safetensors", strategy.download(state, cid))
    train = client_train(cfg, name, cid, 1, str(work / "down.safetensors"), str(work / "up.safetensors"), n + 1)
    write_download(work / "eval.safetensors", strategy.eval_download(state, cid))
    metrics = client_evaluate(cfg, name, cid, 1, str(work / "eval.safetensors"), n + 1)
    metric = "accuracy" if cfg.data.kind == "classification" else "rougeL"
    record = {"client_id": cid, "task": task, "strategy": name, **placement, "metric": metric,
              "score": metrics.get(metric), metric: metrics.get(metric),
              "bytes_up": train.bytes_up, "bytes_down": train.bytes_down}
    joined[str(cid)] = record
    atomic_write_json(late_root / "joined.json", joined)
    return record
