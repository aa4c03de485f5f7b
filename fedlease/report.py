"""Results in one shape and one table: a method's summary from its round records, and the markdown
table every caller prints (the pipeline's results, the benchmark's mean ± std over seeds, the table
read back from MLflow)."""

from __future__ import annotations

import statistics
from typing import Any

from fedlease.records import RoundRecord


def summarise_method(history: list[RoundRecord], result: dict[str, Any]) -> dict[str, Any]:
    """Final scores, per-round curve and mean bytes per client per round of one method's run."""
    last_eval = next(r.eval for r in reversed(history) if r.eval)
    rounds = len(history)
    ups = [r.total_up / max(1, len(r.bytes_up)) for r in history]
    downs = [r.total_down / max(1, len(r.bytes_down)) for r in history]
    return {
        "metric": last_eval["metric"], "mean": last_eval["mean"], "per_task": last_eval["per_task"],
        "mean_macro_f1": last_eval.get("mean_macro_f1"), "rounds": rounds,
        "bytes_up_per_client_round": float(sum(ups) / max(1, rounds)),
        "bytes_down_per_client_round": float(sum(downs) / max(1, rounds)),
        "wall_seconds": result["wall_seconds"], "trainable_params": result["trainable_params"],
        "per_round": [{"round": r.round, "mean": r.eval["mean"]} for r in history if r.eval],
    }


def mean_std(values: list[float]) -> str:
    """A score in %: the value itself for one run, mean ± std for several."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def method_table(runs: list[dict[str, Any]], extra: dict[str, dict[str, str]] | None = None) -> str:
    """Method x task score (%), average, then `extra` columns (name -> method -> cell), MB up/down per
    client per round, trainable parameters and seconds of rounds; one row per method, cells over runs."""
    methods = list(runs[0]["methods"])
    tasks = sorted({t for r in runs for m in r["methods"].values() for t in m["per_task"]})
    metric = runs[0]["methods"][methods[0]]["metric"]
    extra = extra or {}
    head = ["method", *tasks, f"avg {metric}", *extra, "MB up/client/round", "MB down/client/round",
            "trainable params", "rounds s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in methods:
        per = [r["methods"][name] for r in runs]
        cells = [name, *[mean_std([p["per_task"].get(t, float("nan")) for p in per]) for t in tasks],
                 mean_std([p["mean"] for p in per]), *[column.get(name, "-") for column in extra.values()],
                 f"{per[0]['bytes_up_per_client_round'] / 1e6:.3f}", f"{per[0]['bytes_down_per_client_round'] / 1e6:.3f}",
                 f"{per[0]['trainable_params']:,}", f"{statistics.mean(p['wall_seconds'] for p in per):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_table(metrics: dict[str, Any]) -> str:
    """The pipeline's table of one run, with FedLEASE's allocation under it."""
    rows = [method_table([metrics])]
    alloc = metrics.get("allocation")
    if alloc:
        rows += ["", f"FedLEASE allocation: M = {alloc['num_experts']}, ARI vs true tasks = {alloc['ari_vs_task']:.3f}"]
    return "\n".join(rows)
