"""Results tables in markdown, from metrics dicts (the pipeline's or MLflow's)."""

from __future__ import annotations

from typing import Any


def results_table(metrics: dict[str, Any]) -> str:
    methods = metrics["methods"]
    tasks = sorted({t for m in methods.values() for t in m["per_task"]})
    metric = next(iter(methods.values()))["metric"]
    head = ["method", *tasks, f"avg {metric}", "MB up/client/round", "MB down/client/round", "trainable params",
            "wall s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [name, *[f"{100 * m['per_task'].get(t, float('nan')):.2f}" for t in tasks], f"{100 * m['mean']:.2f}",
                 f"{m['bytes_up_per_client_round'] / 1e6:.3f}", f"{m['bytes_down_per_client_round'] / 1e6:.3f}",
                 f"{m['trainable_params']:,}", f"{m['wall_seconds']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    alloc = metrics.get("allocation")
    if alloc:
        rows.append("")
        rows.append(f"FedLEASE allocation: M = {alloc['num_experts']}, ARI vs true tasks = {alloc['ari_vs_task']:.3f}")
    return "\n".join(rows)
