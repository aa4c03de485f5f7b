"""PNG plots a person would rather look at than read. Matplotlib, headless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedlease.io import atomic_write_bytes  # noqa: E402
from fedlease.records import RoundRecord  # noqa: E402


def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_partition_stats(stats: dict[str, Any], path: Path) -> None:
    """Heat-map: clients x (task:label) training example counts."""
    columns: list[str] = []
    for c in stats["clients"]:
        for name in c["label_names"]:
            col = name if ":" in name else f"{c['task']}:{name}"
            if col not in columns:
                columns.append(col)
    grid = np.zeros((len(stats["clients"]), len(columns)))
    for i, c in enumerate(stats["clients"]):
        for name, n in zip(c["label_names"], c["train_labels"], strict=True):
            col = name if ":" in name else f"{c['task']}:{name}"
            grid[i, columns.index(col)] = n
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(columns) + 2), max(3, 0.35 * len(grid) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(grid)), [f"client {c['client_id']} ({c['task']})" for c in stats["clients"]], fontsize=8)
    ax.set_title("Training examples per client and label")
    fig.colorbar(im, ax=ax, label="examples")
    _save(fig, path)


def plot_allocation(alloc: Any, tasks: list[str], folder: Path, heatmap: bool = True) -> None:
    """B-distance heat-map ordered by cluster, with the dendrogram (when `heatmap`); silhouette against k."""
    if heatmap and alloc.distances is not None:
        _plot_distances(alloc, tasks, folder)
    _plot_silhouette(alloc, folder)


def _plot_distances(alloc: Any, tasks: list[str], folder: Path) -> None:
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    dist = np.asarray(alloc.distances)
    n = len(dist)
    fig, (ax_d, ax_h) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    if n >= 2:
        z = linkage(squareform(dist, checks=False), method="average")
        dn = dendrogram(z, ax=ax_d, orientation="left", no_labels=True)
        order = [int(i) for i in dn["leaves"]][::-1]  # top to bottom, matching the heat-map rows
    else:
        order = list(range(n))
    ax_d.set_title("Average-linkage dendrogram of B distances")
    ax_d.set_xlabel("distance")
    im = ax_h.imshow(dist[np.ix_(order, order)], cmap="magma_r", vmin=0, vmax=max(1.0, float(dist.max())))
    labels = [f"{i} {tasks[i]} (E{alloc.assignment[i]})" for i in order]
    ax_h.set_xticks(range(n), labels, rotation=70, ha="right", fontsize=7)
    ax_h.set_yticks(range(n), labels, fontsize=7)
    ax_h.set_title(f"1 - cos(B_i, B_j), ordered by cluster (M = {alloc.num_experts})")
    fig.colorbar(im, ax=ax_h)
    _save(fig, folder / "b_distance.png")


def _plot_silhouette(alloc: Any, folder: Path) -> None:
    if alloc.silhouette:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ks = sorted(alloc.silhouette)
        ax.plot(ks, [alloc.silhouette[k] for k in ks], marker="o")
        ax.axvline(alloc.num_experts, color="red", ls="--", label=f"chosen M = {alloc.num_experts}")
        ax.set_xlabel("number of clusters k")
        ax.set_ylabel("silhouette")
        ax.legend()
        ax.set_title("Silhouette against k")
        _save(fig, folder / "silhouette.png")


def plot_accuracy_rounds(curves: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({c["method"] for c in curves}):
        pts = sorted((c["round"], c["score"]) for c in curves if c["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("mean score over clients")
    ax.set_title("Score per round, every method")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_communication(histories: dict[str, list[RoundRecord]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, hist in sorted(histories.items()):
        rounds = [r.round for r in hist]
        per_round = [(r.total_up + r.total_down) / 1e6 for r in hist]
        ax.plot(rounds, np.cumsum(per_round), marker="o", label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative MB (up + down, all clients)")
    ax.set_title("Communication")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_router_usage(usage: dict[str, Any], path: Path, num_experts: int | None = None) -> None:
    """Router weight share: clients x experts (mean over modules) and layer depth x experts (mean over clients).

    Expert columns are in each client's local order: 0 = its own expert, then the others, then (one column
    more than the allocation's `num_experts`) the client's personal expert.
    """
    clients = sorted(usage, key=int)
    if not clients:
        return
    modules = list(next(iter(usage.values())))
    by_client = np.array([np.mean([usage[c][m]["expert_weight_share"] for m in modules], axis=0) for c in clients])
    by_layer = np.array([np.mean([usage[c][m]["expert_weight_share"] for c in clients], axis=0) for m in modules])
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, max(3.5, 0.3 * max(len(clients), len(modules)) + 1.5)),
                               gridspec_kw={"wspace": 0.9})
    for ax, grid, labels, title in ((a, by_client, [f"client {c}" for c in clients], "per client"),
                                    (b, by_layer, [m.replace("bert.encoder.", "").replace("model.", "")
                                                   for m in modules], "by layer depth")):
        im = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1)
        personal = num_experts is not None and grid.shape[1] == num_experts + 1
        shared = grid.shape[1] - personal
        ax.set_xticks(range(grid.shape[1]), ["own"] + [f"other {i}" for i in range(1, shared)]
                      + (["personal"] if personal else []), fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"Router weight share {title}")
    fig.colorbar(im, ax=[a, b])
    _save(fig, path)
