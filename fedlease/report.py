"""Results in one shape and one table: a method's summary from its round records, and the markdown
table every caller prints (the pipeline's results, the benchmark's mean ± std over seeds, the table
read back from MLflow)."""

from __future__ import annotations

import statistics
from typing import Any

from fedlease.records import RoundRecord


def summarise_method(history: list[RoundRecord], result: dict[str, Any], num_clients: int,
                     warmup: list[RoundRecord] | None = None, warmup_traffic: bool = False) -> dict[str, Any]:
    """Final scores, per-round curve, compute and traffic of one method's run.

    `warmup`: the warm-up rounds the method continues from (their local steps and seconds count as its compute;
    None: it continues from none; []: it does, but no record of them is left);
    `warmup_traffic`: the warm-up's uploads and downloads count as its communication too (FedLEASE's
    server needs every warm-up adapter to cluster)."""
    last_eval = next(r.eval for r in reversed(history) if r.eval)
    rounds = len(history)
    ups = [r.total_up / max(1, len(r.bytes_up)) for r in history]
    downs = [r.total_down / max(1, len(r.bytes_down)) for r in history]
    prelude = warmup or []
    traffic = history + (prelude if warmup_traffic else [])
    steps = sum(r.steps.get(str(c), 0) for r in history + prelude for c in range(num_clients))
    return {
        "metric": last_eval["metric"], "mean": last_eval["mean"], "per_task": last_eval["per_task"],
        "weighted_mean": last_eval.get("weighted_mean"), "mean_macro_f1": last_eval.get("mean_macro_f1"),
        "majority": last_eval.get("majority"), "balanced": last_eval.get("balanced"),
        "balanced_majority": last_eval.get("balanced_majority"), "rounds": rounds,
        "local_steps_per_client": steps / num_clients,
        "bytes_up_total_per_client": sum(r.total_up for r in traffic) / num_clients,
        "bytes_down_total_per_client": sum(r.total_down for r in traffic) / num_clients,
        "bytes_up_per_client_round": float(sum(ups) / max(1, rounds)),
        "bytes_down_per_client_round": float(sum(downs) / max(1, rounds)),
        "wall_seconds": result["wall_seconds"], "trainable_params": result["trainable_params"],
        # an heir (warm-up given) whose warm-up left no record has no time of it: left out, shown "-"
        **({} if warmup == [] else {"warmup_seconds": float(sum(r.seconds for r in prelude))}),
        "ari_vs_task": result.get("ari_vs_task"), "code_version": result.get("code_version"),
        "failed_evaluations": last_eval.get("failed_clients", []),
        "instance_weight": _instance_weights(last_eval),
        "per_round": [{"round": r.round, "mean": r.eval["mean"]} for r in history if r.eval],
    }


def _instance_weights(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """FedDPA: each client's mean instance-wise local weight and the range over all its test inputs."""
    per = {cid: c["instance_weight"] for cid, c in evaluation["clients"].items() if "instance_weight" in c}
    if not per:
        return None
    return {"client_means": {cid: round(w["mean"], 4) for cid, w in sorted(per.items(), key=lambda kv: int(kv[0]))},
            "min": min(w["min"] for w in per.values()), "max": max(w["max"] for w in per.values())}


def instance_weight_lines(runs: list[dict[str, Any]]) -> list[str]:
    """A line per method with instance-wise weights: their per-client means and range, per run."""
    lines = []
    for name in runs[0]["methods"]:
        weights = [r["methods"][name].get("instance_weight") for r in runs]
        if all(weights):
            shown = "; ".join(f"client means {list(w['client_means'].values())}, range {w['min']:.3f}-{w['max']:.3f}"
                              for w in weights)
            lines += ["", f"{name}'s instance-wise local weights at the last evaluation (per run): {shown}."]
    return lines


def mean_std(values: list[float]) -> str:
    """A score in %: the value itself for one run, mean ± std for several."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def method_table(runs: list[dict[str, Any]]) -> str:
    """Method x task score (%), client mean and test-example-weighted mean, local steps per client,
    rounds, total MB up/down per client over the run, trainable parameters, seconds of rounds and seconds in
    all (the warm-up a method continues from included: the time of its equal compute); one row per method,
    cells over runs (mean ± std); the majority-class floor under them for classification."""
    methods = list(runs[0]["methods"])
    tasks = sorted({t for r in runs for m in r["methods"].values() for t in m["per_task"]})
    metric = runs[0]["methods"][methods[0]]["metric"]
    head = ["method", *tasks, f"avg {metric}", "weighted avg", "local steps/client", "rounds",
            "MB up/client", "MB down/client", "trainable params", "rounds s", "s with warm-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in methods:
        per = [r["methods"][name] for r in runs]

        def mean(key: str, per: list[dict[str, Any]] = per) -> float:
            return statistics.mean(p.get(key, float("nan")) for p in per)

        lines.append(_row([name, *_score_cells(per, tasks), f"{mean('local_steps_per_client'):.0f}",
                           str(per[0].get("rounds", "-")), f"{mean('bytes_up_total_per_client') / 1e6:.2f}",
                           f"{mean('bytes_down_total_per_client') / 1e6:.2f}", f"{per[0]['trainable_params']:,}",
                           f"{statistics.mean(p['wall_seconds'] for p in per):.0f}", _seconds_in_all(per)]))
    floors = [m for m in (next((p.get("majority") for p in r["methods"].values() if p.get("majority")), None)
                          for r in runs) if m]
    if len(floors) == len(runs):
        lines.append(_row(["majority class (floor)", *_score_cells(floors, tasks), *["-"] * 7]))
    return "\n".join(lines)


def _seconds_in_all(per: list[dict[str, Any]]) -> str:
    """Rounds plus the warm-up the method continues from, mean over runs; "-" for a summary made before
    the warm-up's seconds were kept (its rounds alone would read as the whole)."""
    if any("warmup_seconds" not in p for p in per):
        return "-"
    return f"{statistics.mean(p['wall_seconds'] + p['warmup_seconds'] for p in per):.0f}"


def _score_cells(per: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    weighted = [p.get("weighted_mean") for p in per]
    return [*[mean_std([p["per_task"].get(t, float("nan")) for p in per]) for t in tasks],
            mean_std([p["mean"] for p in per]),
            mean_std([float(w) for w in weighted]) if all(w is not None for w in weighted) else "-"]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def balanced_table(runs: list[dict[str, Any]]) -> str | None:
    """Accuracy on each task's label-balanced test set (label-skew runs that hold one out), else None."""
    methods = [n for n in runs[0]["methods"] if all(r["methods"][n].get("balanced") for r in runs)]
    if not methods:
        return None
    tasks = sorted(runs[0]["methods"][methods[0]]["balanced"]["per_task"])
    lines = [_row(["method (label-balanced test sets)", *tasks, "avg accuracy"]), "|" + "---|" * (len(tasks) + 2)]
    for name in methods:
        per = [r["methods"][name]["balanced"] for r in runs]
        lines.append(_row([name, *[mean_std([p["per_task"][t] for p in per]) for t in tasks],
                           mean_std([p["mean"] for p in per])]))
    floors = [r["methods"][methods[0]].get("balanced_majority") for r in runs]
    if all(floors):  # each client predicting its most frequent training label: chance on a balanced set
        lines.append(_row(["majority class (floor)", *[mean_std([f["per_task"][t] for f in floors]) for t in tasks],
                           mean_std([f["mean"] for f in floors])]))
    return "\n".join(lines)


def results_rows(metrics: dict[str, Any]) -> dict[str, list[Any]]:
    """The results table as columns (an MLflow table: sortable in the UI)."""
    methods = metrics["methods"]
    tasks = sorted({t for m in methods.values() for t in m["per_task"]})
    rows: dict[str, list[Any]] = {"method": list(methods)}
    for t in tasks:
        rows[t] = [100 * m["per_task"].get(t, float("nan")) for m in methods.values()]
    rows["avg"] = [100 * m["mean"] for m in methods.values()]
    for key in ("weighted_mean", "local_steps_per_client", "rounds", "bytes_up_total_per_client",
                "bytes_down_total_per_client", "trainable_params", "wall_seconds", "warmup_seconds"):
        rows[key] = [m.get(key) for m in methods.values()]
    return rows


def clients_at_their_floor(clients: dict[str, dict[str, Any]]) -> list[int]:
    """The clients whose accuracy is at or below their majority-class floor (predicting their most frequent
    training label), from one round's evaluation; clients without a floor (generation) or whose evaluation
    failed are left out. After the warm-up these are the clients whose B matrices have learnt little of their
    task for the allocation to read."""
    return sorted(int(c) for c, v in clients.items()
                  if None not in (v.get("accuracy"), v.get("majority_accuracy"))
                  and v["accuracy"] <= v["majority_accuracy"])


def warmup_floor_note(at_floor: list[int], num_clients: int, failed: list[int] | None = None) -> str:
    """One sentence for the allocation line and the results table; empty when every client's warm-up was
    evaluated and beat its floor (a failed evaluation is named, never read as a client that learnt)."""
    parts = []
    if at_floor:
        parts.append(f"{len(at_floor)} of {num_clients} clients ended the warm-up at or below their majority-class "
                     f"floor (clients {at_floor}): the allocation reads little of their tasks (benchmarks/README.md, "
                     "the warm-up)")
    if failed:
        parts.append(f"the warm-up evaluation of {len(failed)} of {num_clients} clients failed (clients {failed}): "
                     "whether they learnt is not known")
    return "; ".join(parts)


def results_table(metrics: dict[str, Any]) -> str:
    """The pipeline's table of one run: the protocol, the code version, FedLEASE's allocation."""
    from fedlease.provenance import describe

    rows = [method_table([metrics]), *instance_weight_lines([metrics])]
    balanced = balanced_table([metrics])
    if balanced:
        rows += ["", balanced]
    alloc = metrics.get("allocation")
    if alloc:
        capped = f" (at the cap, {alloc.get('cap') or 'fedlease.m_max or N - 1'})" if alloc.get("capped") else ""
        ari = ("ARI vs true tasks: not known (some clients' tasks are unknown)" if alloc["ari_vs_task"] is None
               else f"ARI vs true tasks = {alloc['ari_vs_task']:.3f}")
        rows += ["", f"FedLEASE allocation: M = {alloc['num_experts']}{capped}, {ari}"]
        if "warmup_score" in alloc:
            floor = (f" (majority-class floor {100 * alloc['warmup_floor']:.2f})"
                     if alloc.get("warmup_floor") is not None else "")
            rows += [f"The warm-up itself (each client's own LoRA, before round 1): {100 * alloc['warmup_score']:.2f}"
                     f"{floor}."]
        note = warmup_floor_note(alloc.get("warmup_at_floor") or [], alloc.get("clients", 0),
                                 alloc.get("warmup_eval_failed"))
        if note:
            rows += [note[0].upper() + note[1:] + "."]
    if "protocol" in metrics:
        rows += ["", f"Protocol: {metrics['protocol']}; code: {describe(metrics.get('code_version', {}))}."]
    return "\n".join(rows)
