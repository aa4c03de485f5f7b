"""The data stage: read tasks, partition them, write per-client files and stats.

`run_data_stage` is what `fedlease data`, the DVC `data` stage and the Prefect
partition flow all call. The whole output folder is written to a temporary
directory and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlease.config import ClientFileSpec, Config
from fedlease.data.partition import UNLABELLED, ClientData, client_from_file, partition, partition_stats
from fedlease.data.sources import load_tasks
from fedlease.io import atomic_dir, atomic_write_json, read_json
from fedlease.paths import RunPaths


def clients_from_files(cfg: Config) -> tuple[list[ClientData], dict[str, list[str]]]:
    """partition.scheme files: every client from its own file(s)."""
    from fedlease.config import TaskSpec
    from fedlease.data.sources import read_local

    clients, spaces = [], {}
    for cid, spec in enumerate(cfg.data.clients):
        name = spec.task or f"client_{cid:03d}"

        def read(path: str, name: str = name, spec: ClientFileSpec = spec) -> Any:
            return read_local(TaskSpec(name=name, source="local", path=path, columns=spec.columns), cfg.data.kind)

        client = client_from_file(cid, spec, read(spec.path), read(spec.test_path) if spec.test_path else None,
                                  cfg.data.partition, cfg.seed)
        clients.append(client)
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


def run_data_stage(cfg: Config) -> dict[str, Any]:
    """Write partitions + stats under <output_dir>/data; return the manifest."""
    from fedlease.plots import plot_partition_stats

    paths = RunPaths.of(cfg)
    clients, label_spaces = build_partitions(cfg)
    stats = partition_stats(clients)
    manifest = {
        "kind": cfg.data.kind,
        "scheme": cfg.data.partition.scheme,
        "seed": cfg.seed,
        "tasks": label_spaces,
        "tasks_known": all(c.task != UNLABELLED for c in clients),
        "clients": [{"client_id": c.client_id, "task": c.task, "num_labels": len(c.label_names),
                     "train": len(c.train), "test": len(c.test)} for c in clients],
    }
    with atomic_dir(paths.data) as tmp:
        for c in clients:
            atomic_write_json(tmp / "clients" / f"client_{c.client_id:03d}.json", c.to_json())
        atomic_write_json(tmp / "stats.json", stats)
        plot_partition_stats(stats, tmp / "stats.png")
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def load_manifest(cfg: Config) -> dict[str, Any]:
    return read_json(RunPaths.of(cfg).manifest)


def late_client_file(cfg: Config, client_id: int) -> Path:
    return RunPaths.of(cfg).root / "late" / "clients" / f"client_{client_id:03d}.json"


def load_client(cfg: Config, client_id: int) -> ClientData:
    """A partition client, or a client that joined after allocation (fedlease join)."""
    path = RunPaths.of(cfg).client_file(client_id)
    late = late_client_file(cfg, client_id)
    return ClientData.from_json(read_json(late if not path.exists() and late.exists() else path))
