"""PNG plots a person would rather look at than read. Matplotlib, headless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedlease.io import atomic_write_bytes  # noqa: E402


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
