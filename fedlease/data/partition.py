"""Partitioners: split task examples into disjoint per-client train/test sets.

Deterministic for a seed. Schemes:
- task: each task goes to `clients_per_task` clients (the paper's task heterogeneity);
- dirichlet: one pooled label space, each label spread over clients by Dir(alpha);
- task_dirichlet: per task, its clients get Dir(alpha) label skew;
- iid: pooled and shuffled, equal shares;
- files: each client from its own file, any size (`client_from_file`).
A client's test set is drawn from the same distribution as its train set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlease.config import ClientFileSpec, PartitionConfig
from fedlease.data.sources import DataError, TaskData


@dataclass
class ClientData:
    client_id: int
    task: str  # the client's (majority) task
    label_names: list[str]
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    #: label-balanced test examples of the client's task, shared by its task's clients (label skew only)
    balanced_test: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {"client_id": self.client_id, "task": self.task, "label_names": self.label_names,
               "train": self.train, "test": self.test}
        return {**out, "balanced_test": self.balanced_test} if self.balanced_test else out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ClientData:
        return cls(obj["client_id"], obj["task"], obj["label_names"], obj["train"], obj["test"],
                   obj.get("balanced_test", []))


def _tag(records: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [{**r, "task": task} for r in records]


def _need(task: TaskData, clients: int, cfg: PartitionConfig, sizes: list[tuple[int, int]] | None = None) -> int:
    need = sum(tr + te for tr, te in sizes) if sizes else clients * (cfg.train_per_client + cfg.test_per_client)
    if len(task.records) < need:
        shape = (f"{clients} clients of {[tr for tr, _ in sizes]} train examples" if sizes else
                 f"{clients} clients x ({cfg.train_per_client} train + {cfg.test_per_client} test)")
        raise DataError(f"task {task.name}: {len(task.records)} examples, but {shape} = {need} are needed")
    return need


def client_sizes(cfg: PartitionConfig, clients: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(train, test) per client: the configured sizes, or with `size_skew` > 0 each scaled by
    exp(size_skew * z), z ~ N(0, 1) (at least 2 training and 1 test example)."""
    if cfg.size_skew == 0:
        return [(cfg.train_per_client, cfg.test_per_client)] * clients
    scale = np.exp(cfg.size_skew * rng.standard_normal(clients))
    return [(max(2, round(cfg.train_per_client * f)), max(1, round(cfg.test_per_client * f))) for f in scale]


def _task_partition(tasks: list[TaskData], cfg: PartitionConfig, rng: np.random.Generator) -> list[ClientData]:
    clients: list[ClientData] = []
    for task in tasks:
        n = cfg.clients_of(task.name)
        sizes = client_sizes(cfg, n, rng)
        need = _need(task, n, cfg, sizes if cfg.size_skew else None)
        idx = rng.permutation(len(task.records))[:need]
        start = 0
        for train, test in sizes:
            own = [task.records[i] for i in idx[start : start + train + test]]
            start += train + test
            clients.append(ClientData(len(clients), task.name, task.label_names,
                                      _tag(own[:train], task.name), _tag(own[train:], task.name)))
    return clients


def _n_test(size: int, cfg: PartitionConfig) -> int:
    return max(1, round(size * cfg.test_per_client / (cfg.train_per_client + cfg.test_per_client)))


def _dirichlet_shares(labels: np.ndarray, n_clients: int, cfg: PartitionConfig, rng: np.random.Generator,
                      what: str, first_client: int = 0) -> list[np.ndarray]:
    """Indices per client, each label's examples split by Dir(alpha) proportions; redrawn (up to 100 times)
    until every client gets at least `min_test_per_client` test examples and one training example."""
    alpha = cfg.dirichlet_alpha
    for _attempt in range(100):
        shares: list[list[int]] = [[] for _ in range(n_clients)]
        for lab in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == lab))
            props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props) * len(members)).astype(int)[:-1]
            for c, part in enumerate(np.split(members, cuts)):
                shares[c].extend(part.tolist())
        sizes = [len(s) for s in shares]
        if all(_n_test(n, cfg) >= cfg.min_test_per_client and n > _n_test(n, cfg) for n in sizes):
            return [rng.permutation(np.array(s, dtype=int)) for s in shares]
    worst = int(np.argmin(sizes))
    raise DataError(
        f"{what}: client {first_client + worst} gets {_n_test(sizes[worst], cfg)} test examples ({sizes[worst]} in "
        f"all) under Dirichlet(alpha={alpha}), fewer than data.partition.min_test_per_client="
        f"{cfg.min_test_per_client}, in each of 100 draws; raise data.partition.dirichlet_alpha or "
        "test_per_client, or lower the number of clients or min_test_per_client")


def _split_share(records: list[dict[str, Any]], cfg: PartitionConfig) -> tuple[list, list]:
    n_test = _n_test(len(records), cfg)
    return records[n_test:], records[:n_test]


def _pooled(tasks: list[TaskData]) -> tuple[list[dict[str, Any]], list[str]]:
    """One label space over all tasks: 'task:label' (just 'label' for a single task)."""
    names: list[str] = []
    pooled: list[dict[str, Any]] = []
    for task in tasks:
        offset = len(names)
        names += task.label_names if len(tasks) == 1 else [f"{task.name}:{n}" for n in task.label_names]
        pooled += [{**r, "label": r["label"] + offset, "task": task.name} for r in task.records]
    return pooled, names


def _majority_task(records: list[dict[str, Any]]) -> str:
    tasks = [r["task"] for r in records]
    return max(sorted(set(tasks)), key=tasks.count)


def _pooled_partition(tasks: list[TaskData], cfg: PartitionConfig, rng: np.random.Generator,
                      dirichlet: bool) -> list[ClientData]:
    assert cfg.num_clients is not None
    pooled, names = _pooled(tasks)
    total = cfg.num_clients * (cfg.train_per_client + cfg.test_per_client)
    if len(pooled) < total:
        raise DataError(
            f"tasks {[t.name for t in tasks]}: {len(pooled)} examples, but {cfg.num_clients} clients x "
            f"({cfg.train_per_client} train + {cfg.test_per_client} test) = {total} are needed"
        )
    chosen = [pooled[i] for i in rng.permutation(len(pooled))[:total]]
    if dirichlet:
        labels = np.array([r["label"] for r in chosen])
        shares = _dirichlet_shares(labels, cfg.num_clients, cfg, rng, "pooled tasks")
    else:
        shares = np.array_split(np.arange(total), cfg.num_clients)
    clients = []
    for c, share in enumerate(shares):
        recs = [chosen[i] for i in share]
        train, test = _split_share(recs, cfg)
        clients.append(ClientData(c, _majority_task(recs), names, train, test))
    return clients


def _task_dirichlet_partition(tasks: list[TaskData], cfg: PartitionConfig,
                              rng: np.random.Generator) -> list[ClientData]:
    clients: list[ClientData] = []
    for task in tasks:
        need = _need(task, cfg.clients_of(task.name), cfg)
        idx = rng.permutation(len(task.records))[:need]
        chosen = [task.records[i] for i in idx]
        labels = np.array([r["label"] for r in chosen])
        shares = _dirichlet_shares(labels, cfg.clients_of(task.name), cfg, rng, f"task {task.name}", len(clients))
        mine = []
        for share in shares:
            train, test = _split_share(_tag([chosen[i] for i in share], task.name), cfg)
            mine.append(ClientData(len(clients) + len(mine), task.name, task.label_names, train, test))
        if cfg.balanced_test_per_label:
            balanced = _balanced_test(mine, cfg.balanced_test_per_label, rng)
            for c in mine:
                c.balanced_test = balanced
        clients += mine
    return clients


def _balanced_test(clients: list[ClientData], per_label: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """A label-balanced test set of one task, drawn from its clients' test sets pooled (no client trains on
    any of it): the same number of examples of every label, at most `per_label`, as many as the rarest
    label allows."""
    pooled = [r for c in clients for r in c.test]
    by_label = [[r for r in pooled if r["label"] == lab] for lab in range(len(clients[0].label_names))]
    take = min(per_label, *(len(m) for m in by_label))
    if take < 1:
        rare = clients[0].label_names[int(np.argmin([len(m) for m in by_label]))]
        raise DataError(f"task {clients[0].task}: no test example of label {rare!r} in any of its clients' test sets, "
                        "so no label-balanced test set can be drawn (raise test_per_client, or set "
                        "data.partition.balanced_test_per_label: 0)")
    out: list[dict[str, Any]] = []
    for members in by_label:
        out += [members[i] for i in sorted(rng.choice(len(members), size=take, replace=False).tolist())]
    return out


def partition(tasks: list[TaskData], cfg: PartitionConfig, seed: int) -> list[ClientData]:
    rng = np.random.default_rng(seed)
    if cfg.scheme == "task":
        return _task_partition(tasks, cfg, rng)
    if cfg.scheme == "task_dirichlet":
        return _task_dirichlet_partition(tasks, cfg, rng)
    return _pooled_partition(tasks, cfg, rng, dirichlet=cfg.scheme == "dirichlet")


def label_counts(client: ClientData, split: str = "train") -> list[int]:
    counts = [0] * len(client.label_names)
    for r in getattr(client, split):
        if "label" in r:
            counts[r["label"]] += 1
    return counts


def partition_stats(clients: list[ClientData]) -> dict[str, Any]:
    return {
        "num_clients": len(clients),
        "clients": [
            {"client_id": c.client_id, "task": c.task, "train": len(c.train), "test": len(c.test),
             "label_names": c.label_names, "train_labels": label_counts(c, "train"),
             "test_labels": label_counts(c, "test"),
             "train_tasks": {t: sum(r["task"] == t for r in c.train) for t in sorted({r["task"] for r in c.train})}}
            for c in clients
        ],
    }


#: the task of a client whose task is not known (files scheme)
UNLABELLED = "unlabelled"


def client_from_file(client_id: int, spec: ClientFileSpec, train: TaskData, test: TaskData | None,
                     cfg: PartitionConfig, seed: int) -> ClientData:
    """A client that brings its own examples: its test set is its own test file, or a seeded
    `test_fraction` of its examples. Labels are the union of its files' labels."""
    task = spec.task or UNLABELLED
    if test is None:
        order = np.random.default_rng([seed, client_id]).permutation(len(train.records))
        n_test = max(1, round(cfg.test_fraction * len(order)))
        test_records = [train.records[i] for i in order[:n_test]]
        train_records = [train.records[i] for i in order[n_test:]]
        labels = train.label_names
    else:
        labels = train.label_names + [n for n in test.label_names if n not in train.label_names]
        train_records = _relabel(train.records, train.label_names, labels)
        test_records = _relabel(test.records, test.label_names, labels)
    if spec.label_names is not None:  # a declared label space (its order is the head's): map onto it
        unknown = sorted(set(labels) - set(spec.label_names))
        if unknown:
            raise DataError(f"data.clients.{client_id} ({spec.path}): labels {unknown} are not in its label_names")
        train_records = _relabel(train_records, labels, spec.label_names)
        test_records = _relabel(test_records, labels, spec.label_names)
        labels = list(spec.label_names)
    if len(test_records) < cfg.min_test_per_client:
        raise DataError(f"data.clients.{client_id} ({spec.path}): {len(test_records)} test examples, fewer than "
                        f"partition.min_test_per_client = {cfg.min_test_per_client}")
    if len(train_records) < 2:
        raise DataError(f"data.clients.{client_id} ({spec.path}): {len(train_records)} training examples (need 2)")
    return ClientData(client_id, task, labels, _tag(train_records, task), _tag(test_records, task))


def _relabel(records: list[dict[str, Any]], names: list[str], onto: list[str]) -> list[dict[str, Any]]:
    """Label ids over `names` as ids over `onto` (which holds every one of them)."""
    remap = {i: onto.index(name) for i, name in enumerate(names)}
    return [{**r, "label": remap[r["label"]]} if "label" in r else r for r in records]
