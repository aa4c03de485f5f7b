"""The data stage: read tasks, partition them, write per-client files and stats.

`run_data_stage` is what `fedlease data`, the DVC `data` stage and the Prefect
partition flow all call. The whole output folder is written to a temporary
directory and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fedlease.config import ClientFileSpec, Config
from fedlease.data.partition import UNLABELLED, ClientData, client_from_file, partition, partition_stats
from fedlease.data.sources import load_tasks
from fedlease.io import atomic_dir, atomic_write_json, read_json
from fedlease.paths import RunPaths


def client_of_files(cfg: Config, client_id: int, spec: ClientFileSpec, task: str | None = None) -> ClientData:
    """One client from its own file(s) (its test file or a seeded share; columns and label space as its
    spec says); `task` overrides the spec's. The simulation's files scheme and a silo both read this way."""
    from fedlease.config import TaskSpec
    from fedlease.data.sources import read_local

    own = spec if task is None else spec.model_copy(update={"task": task})

    def read(path: str) -> Any:
        return read_local(TaskSpec(name=own.task or f"client_{client_id:03d}", source="local", path=path,
                                   columns=spec.columns), cfg.data.kind)

    return client_from_file(client_id, own, read(str(spec.path)), read(spec.test_path) if spec.test_path else None,
                            cfg.data.partition, cfg.seed)


def manifest_entry(client: ClientData) -> dict[str, Any]:
    """What the manifest (the server side) knows of a client: its task and counts."""
    return {"client_id": client.client_id, "task": client.task, "num_labels": len(client.label_names),
            "train": len(client.train), "test": len(client.test)}


def clients_from_files(cfg: Config) -> tuple[list[ClientData], dict[str, list[str]]]:
    """partition.scheme files: every client from its own file(s)."""
    clients = [client_of_files(cfg, cid, spec) for cid, spec in enumerate(cfg.data.clients)]
    spaces: dict[str, list[str]] = {}
    for client in clients:
        spaces.setdefault(client.task, client.label_names)
    return clients, spaces


def build_partitions(cfg: Config) -> tuple[list[ClientData], dict[str, list[str]]]:
    if cfg.data.partition.scheme == "files":
        return clients_from_files(cfg)
    cache = Path(cfg.data.cache_dir)
    archives = {"bigbench": cfg.data.bigbench, "rotten_tomatoes": cfg.data.rotten_tomatoes}
    tasks = load_tasks(cfg.data.tasks, cfg.data.kind, cache, archives, cfg.data.download_timeout_s)
    for spec, task in zip(cfg.data.tasks, tasks, strict=True):
        if spec.max_examples is not None and len(task.records) > spec.max_examples:
            import numpy as np

            keep = np.random.default_rng(cfg.seed).permutation(len(task.records))[: spec.max_examples]
            task.records = [task.records[i] for i in sorted(keep)]
    clients = partition(tasks, cfg.data.partition, cfg.seed)
    return clients, {t.name: t.label_names for t in tasks}


def _prepared_at_silos(cfg: Config, mapper: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Silo mode: each silo splits its clients' files where they are; only counts come back."""
    from fedlease.data.sources import DataError
    from fedlease.silo import silo_prepare

    results = mapper(silo_prepare, [{"cfg": cfg, "client_id": cid} for cid in range(cfg.num_clients)], "data")
    failed = [f"client {cid} (silo {cfg.data.clients[cid].silo}): {res}"
              for cid, res in enumerate(results) if isinstance(res, BaseException)]
    if failed:
        raise DataError("data stage: " + "; ".join(failed))
    return [r["manifest"] for r in results], {"num_clients": len(results), "clients": [r["stats"] for r in results]}


def run_data_stage(cfg: Config, mapper: Any = None) -> dict[str, Any]:
    """Write partitions + stats under <output_dir>/data; return the manifest. In silo mode (`mapper`
    dispatches to the silos) the partitions stay at the silos and only the counts are written here."""
    from fedlease.plots import plot_partition_stats

    paths = RunPaths.of(cfg)
    if cfg.orchestration.at_silos:
        entries, stats = _prepared_at_silos(cfg, mapper)
        clients: list[ClientData] = []
        label_spaces = {}
        for e, st in zip(entries, stats["clients"], strict=True):  # the first client's, as in the simulation
            label_spaces.setdefault(e["task"], st["label_names"])
    else:
        clients, label_spaces = build_partitions(cfg)
        stats = partition_stats(clients)
        entries = [manifest_entry(c) for c in clients]
    manifest = {
        "kind": cfg.data.kind,
        "scheme": cfg.data.partition.scheme,
        "seed": cfg.seed,
        "tasks": label_spaces,
        "tasks_known": all(e["task"] != UNLABELLED for e in entries),
        "clients": entries,
    }
    if paths.manifest.exists() and read_json(paths.manifest) != manifest:
        # clients that joined a run of the old partition (`fedlease join`) do not belong to this one; their ids
        # would shadow the new partition's where its client files are not here (silo mode)
        shutil.rmtree(paths.late, ignore_errors=True)
    with atomic_dir(paths.data) as tmp:
        for c in clients:
            atomic_write_json(tmp / "clients" / f"client_{c.client_id:03d}.json", c.to_json())
        atomic_write_json(tmp / "stats.json", stats)
        plot_partition_stats(stats, tmp / "stats.png")
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def load_manifest(cfg: Config) -> dict[str, Any]:
    return read_json(RunPaths.of(cfg).manifest)


def load_client(cfg: Config, client_id: int) -> ClientData:
    """A partition client, or a client that joined after allocation (fedlease join)."""
    paths = RunPaths.of(cfg)
    path = paths.late_client_file(client_id) if paths.is_late(client_id) else paths.client_file(client_id)
    return ClientData.from_json(read_json(path))
