"""The pipeline's stages as plain functions: data -> warmup -> allocate -> federate -> evaluate.

`STAGES` is the one description of their order and of when each runs; `run_all` (the CLI, so
`dvc repro` and `fedlease run`), the Prefect flow and the tests all walk it, with a `ClientMapper`
choosing how client work is dispatched. Every stage reads the previous stage's files and writes
its own atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlease.allocation import DISTANCE_RANGE, Allocation, cap_reached, choose_experts, distance_matrix, init_experts
from fedlease.client import client_evaluate, client_train
from fedlease.config import Config
from fedlease.data.stage import load_manifest, run_data_stage
from fedlease.export import export_final_model
from fedlease.io import atomic_write_json, atomic_write_text, load_tensors, read_json, save_array, save_tensors
from fedlease.paths import RunPaths
from fedlease.provenance import code_version
from fedlease.records import RoundRecord, history_from_json, history_to_json
from fedlease.report import clients_at_their_floor, results_rows, results_table, summarise_method
from fedlease.runlock import run_lock
from fedlease.runtime import runtime_for, strategy_for
from fedlease.server import ClientMapper, Clients, run_rounds, sequential_mapper
from fedlease.strategies import needs_allocation, needs_warmup, warmup_strategy
from fedlease.strategies.base import InitContext, Strategy, Tensors, prefixed, unprefixed
from fedlease.tracking import Tracker, register_model


def clients_via(mapper: ClientMapper) -> Clients:
    """The client functions the round loop runs, dispatched by `mapper`."""
    return Clients(client_train, client_evaluate, mapper)


def num_clients(cfg: Config) -> int:
    return len(load_manifest(cfg)["clients"])


def stage_data(cfg: Config, mapper: ClientMapper = sequential_mapper) -> dict[str, Any]:
    """Read the tasks and write per-client partitions and stats."""
    tracker = Tracker(cfg)
    manifest = run_data_stage(cfg, mapper)
    paths = RunPaths.of(cfg)
    parent = tracker.parent_run_id()
    for name in ("stats.json", "stats.png", "manifest.json"):
        tracker.log_artifacts(parent, paths.data / name, "data")
    tracker.log_partition(parent, manifest)
    return manifest


def initial_context(cfg: Config, strategy: Strategy) -> InitContext:
    """The seeded common init of the strategy's model, and the allocation's experts when it needs them."""
    common = runtime_for(cfg).common_init(strategy.spec(0))
    if strategy.allocation is None:
        return InitContext(common)
    tensors = load_tensors(RunPaths.of(cfg).allocation / "experts.safetensors")
    return InitContext(common, [unprefixed(tensors, f"expert{e}.") for e in range(strategy.allocation.num_experts)])


def stage_warmup(cfg: Config, mapper: ClientMapper = sequential_mapper) -> list[str]:
    """Every client (sampled or not in later rounds) trains one LoRA from the common init; adapters
    land in <output>/warmup/."""
    paths = RunPaths.of(cfg)
    tracker = Tracker(cfg)
    n = num_clients(cfg)
    strategy = warmup_strategy(cfg, n)
    result = run_rounds(cfg, strategy, lambda: strategy.init_state(initial_context(cfg, strategy)),
                        clients_via(mapper), inputs=[paths.manifest])
    state = result.state
    missing = [c for c in range(n) if not any(k.startswith(f"client{c}.") for k in state.tensors)]
    if missing:
        raise RuntimeError(f"warm-up: clients {missing} produced no adapter")
    out = []
    for c in range(n):
        path = paths.warmup_adapter(c)
        save_tensors(path, unprefixed(state.tensors, f"client{c}."))
        out.append(str(path))
    atomic_write_json(paths.warmup / "summary.json", {"clients": n, "history": history_to_json(result.history)})
    if cfg.orchestration.at_silos:  # each client's adapter back to its silo; heads are there
        from fedlease.silo import publish_warmup

        publish_warmup(cfg, n)
    else:
        export_warmup_adapters(cfg, strategy, n)
    parent = tracker.parent_run_id()
    for path in out:
        tracker.log_artifacts(parent, Path(path), "warmup_adapters")
    return out


def export_warmup_adapters(cfg: Config, warmup: Strategy, n: int) -> None:
    """Every client's warm-up LoRA and head as a standard peft adapter (<output>/warmup/peft/client_NNN)."""
    from fedlease.data.stage import load_client
    from fedlease.local_state import load_local_state
    from fedlease.peft_export import write_adapter

    paths = RunPaths.of(cfg)
    for c in range(n):
        state = {**(load_local_state(cfg, warmup, c, 1) or {}), **load_tensors(paths.warmup_adapter(c))}
        labels = load_client(cfg, c).label_names
        write_adapter(paths.warmup / "peft" / f"client_{c:03d}", cfg, state,
                      f"client {c}'s warm-up LoRA (FedLEASE Stage 1), before any federation.", len(labels))


def allocate(cfg: Config, adapters: list[Tensors], distance: str | None = None) -> tuple[np.ndarray, Allocation]:
    """The distance matrix and allocation the run's settings make of these warm-up adapters (`distance`:
    another `fedlease.clustering.distance` than the configured one, for diagnostics)."""
    clustering, kind = cfg.fedlease.clustering, distance or cfg.fedlease.clustering.distance
    dist = distance_matrix(adapters, kind, clustering.distance_dtype)
    return dist, choose_experts(dist, cfg.fedlease.m_max, clustering.method, clustering.linkage, clustering.fixed_m,
                                cfg.seed, clustering.silhouette_tolerance, DISTANCE_RANGE[kind])


def stage_allocate(cfg: Config, mapper: ClientMapper = sequential_mapper) -> dict[str, Any]:
    """B-distance clustering, silhouette choice of M, cluster-mean expert init."""
    from fedlease.plots import plot_allocation

    paths = RunPaths.of(cfg)
    manifest = load_manifest(cfg)
    n = len(manifest["clients"])
    adapters = [load_tensors(paths.warmup_adapter(c)) for c in range(n)]
    fl = cfg.fedlease
    dist, alloc = allocate(cfg, adapters)
    weights = [float(c["train"]) for c in manifest["clients"]] if fl.weighting == "examples" else None
    experts = init_experts(adapters, alloc, weights)
    tensors = {}
    for e, expert in enumerate(experts):
        tensors.update(prefixed(expert, f"expert{e}."))
    save_tensors(paths.allocation / "experts.safetensors", tensors)
    doc = alloc.to_json()
    doc["tasks"] = {str(c["client_id"]): c["task"] for c in manifest["clients"]}
    doc["ari_vs_task"] = ari_vs_task(alloc.assignment, manifest)
    # the silhouette had no larger k to try: M may be the cap rather than the data's structure
    doc["cap"] = cap_reached(alloc.num_experts, fl.m_max, n, fl.clustering.fixed_m)
    doc["capped"] = doc["cap"] is not None
    warm_eval = warmup_evaluation(paths)
    if warm_eval is not None:  # what the adapters being clustered had learnt: clients still at their floor
        doc["warmup_at_floor"] = clients_at_their_floor(warm_eval["clients"])
        doc["warmup_eval_failed"] = sorted(int(c) for c in warm_eval.get("failed_clients", []))
    atomic_write_json(paths.cluster_map, doc)
    atomic_write_json(paths.allocation / "silhouette.json",
                      [{"k": k, "silhouette": s} for k, s in sorted(alloc.silhouette.items())])
    if n <= fl.clustering.keep_distances_up_to:
        save_array(paths.allocation / "distances.npy", dist)
    plot_allocation(alloc, [c["task"] for c in manifest["clients"]], paths.allocation,
                    heatmap=n <= fl.clustering.keep_distances_up_to)
    tracker = Tracker(cfg)
    parent = tracker.parent_run_id()
    for k, score in sorted(alloc.silhouette.items()):
        tracker.log_metrics(parent, {"allocation.silhouette": score}, step=k)
    known = {"allocation.ari_vs_task": doc["ari_vs_task"]} if doc["ari_vs_task"] is not None else {}
    at_floor = ({"allocation.warmup_clients_at_floor": float(len(doc["warmup_at_floor"])),
                 "allocation.warmup_eval_failed": float(len(doc["warmup_eval_failed"]))}
                if "warmup_at_floor" in doc else {})
    tracker.log_metrics(parent, {"allocation.num_experts": alloc.num_experts, "allocation.seconds": alloc.seconds,
                                 **known, "allocation.capped": float(doc["capped"]), **at_floor})
    tracker.log_artifacts(parent, paths.allocation, "allocation")
    if cfg.orchestration.at_silos:  # the cluster map, for the clients' model layout
        from fedlease.silo import publish_allocation

        publish_allocation(cfg)
    return doc


def warmup_evaluation(paths: RunPaths) -> dict[str, Any] | None:
    """The warm-up's last evaluation (every client's own adapter before round 1), or None without one."""
    if not (paths.warmup / "summary.json").exists():
        return None
    history = read_json(paths.warmup / "summary.json")["history"]
    return next((r["eval"] for r in reversed(history) if r.get("eval")), None)


def ari_vs_task(assignment: list[int], manifest: dict[str, Any]) -> float | None:
    """Adjusted Rand index of a clustering of the clients against their true tasks (1: the tasks exactly);
    None when some client's task is not known (clients that bring their own files without one)."""
    from sklearn.metrics import adjusted_rand_score

    if not manifest.get("tasks_known", True):
        return None
    return float(adjusted_rand_score([c["task"] for c in manifest["clients"]], assignment))


def stage_federate(cfg: Config, mapper: ClientMapper = sequential_mapper,
                   strategies: list[str] | None = None) -> dict[str, Any]:
    """Run every configured method on the same partitions, seeds and budgets."""
    paths = RunPaths.of(cfg)
    tracker = Tracker(cfg)
    n = num_clients(cfg)
    results = {}
    for name in strategies or cfg.strategies:
        t0 = time.perf_counter()
        strategy = strategy_for(cfg, name, n)
        inputs = [paths.manifest]
        if strategy.needs_allocation:
            inputs.append(paths.allocation / "experts.safetensors")
        if strategy.inherits_warmup:
            inputs.append(paths.warmup / "summary.json")  # a redone warm-up restarts the methods built on it
        out = run_rounds(cfg, strategy, lambda s=strategy: s.init_state(initial_context(cfg, s)),
                         clients_via(mapper), inputs=inputs,
                         on_round=lambda rec, hist, m=name: _log_round(tracker, m, rec, hist))
        # the rounds' own seconds (kept in the checkpoint), so a resumed or finished run reports the
        # time its rounds took, not the seconds this call happened to last
        summary = {
            "strategy": name, "history": history_to_json(out.history),
            "wall_seconds": sum(r.seconds for r in out.history), "call_seconds": time.perf_counter() - t0,
            "trainable_params": trainable_params(cfg, strategy),
            # the version whose fingerprint the rounds' checkpoint matched: the code that made them
            "code_version": code_version(),
        }
        assignment = strategy.assignment(out.state)
        if assignment is not None:
            summary["assignment"] = assignment
            summary["ari_vs_task"] = ari_vs_task(assignment, load_manifest(cfg))
        home = strategy.home(paths)
        atomic_write_json(home / "result.json", summary)
        export_final_model(cfg, strategy, out.state, home / "final")
        if cfg.orchestration.at_silos:  # each silo adds its clients' heads (fedlease silo export)
            from fedlease.silo import publish_final

            publish_final(cfg, name, home / "final")
        run_id = tracker.strategy_run_id(name)
        tracker.log_artifacts(run_id, home / "final", "final_model")
        tracker.log_artifacts(run_id, home / "result.json", "")
        if strategy.primary:
            register_model(tracker, run_id, home / "final", cfg.data.kind)
        results[name] = summary
    return results


def _log_round(tracker: Tracker, strategy: str, record: RoundRecord, history: list[RoundRecord]) -> None:
    cumulative = {"up": sum(r.total_up for r in history[:-1]), "down": sum(r.total_down for r in history[:-1])}
    tracker.log_round(strategy, record, cumulative)


def trainable_params(cfg: Config, strategy: Strategy) -> int:
    """Parameters one client trains (adapters + router + head) for the table."""
    from fedlease.models.adapters import set_trainable

    rt = runtime_for(cfg)
    model = rt.fresh_model(strategy.spec(0), 2)
    params = set_trainable(model, strategy.train_groups, rt.head_module())
    return sum(p.numel() for p in params)


def stage_evaluate(cfg: Config, mapper: ClientMapper = sequential_mapper) -> dict[str, Any]:
    """Collect every method's final metrics into metrics.json, a results table and plots."""
    from fedlease.plots import plot_accuracy_rounds, plot_communication, plot_router_usage

    paths = RunPaths.of(cfg)
    n = num_clients(cfg)
    strategies = {name: strategy_for(cfg, name, n) for name in cfg.strategies}
    results = {name: read_json(s.home(paths) / "result.json") for name, s in strategies.items()}
    histories = {name: history_from_json(res["history"]) for name, res in results.items()}
    warm = (history_from_json(read_json(paths.warmup / "summary.json")["history"])
            if (paths.warmup / "summary.json").exists() else [])
    methods = {name: summarise_method(histories[name], res, n, warm if s.inherits_warmup else None,
                                      warmup_traffic=s.needs_allocation)
               for (name, res), s in zip(results.items(), strategies.values(), strict=True)}
    metrics: dict[str, Any] = {"methods": methods, "protocol": cfg.federation.protocol, "code_version": code_version()}
    if paths.cluster_map.exists():
        alloc = read_json(paths.cluster_map)
        metrics["allocation"] = {"num_experts": alloc["num_experts"], "ari_vs_task": alloc["ari_vs_task"],
                                 "silhouette": alloc["silhouette"], "capped": alloc.get("capped", False),
                                 "cap": alloc.get("cap"), "clients": n}
        for key in ("warmup_at_floor", "warmup_eval_failed"):
            if key in alloc:
                metrics["allocation"][key] = alloc[key]
        if warm:
            metrics["allocation"]["warmup_seconds"] = float(sum(r.seconds for r in warm))
            if warm[-1].eval:  # the warm-up's own score: where FedLEASE's and local's rounds start from
                metrics["allocation"]["warmup_score"] = warm[-1].eval["mean"]
                metrics["allocation"]["warmup_floor"] = (warm[-1].eval.get("majority") or {}).get("mean")
    atomic_write_json(paths.metrics, metrics)
    curves = [{"method": name, "round": rec.round, "score": rec.eval["mean"]}
              for name, hist in histories.items() for rec in hist if rec.eval]
    for name in histories:  # one file per method: DVC draws one line per file
        atomic_write_json(paths.plots / "score_per_round" / f"{name}.json",
                          [{"round": c["round"], "score": c["score"]} for c in curves if c["method"] == name])
    plot_accuracy_rounds(curves, paths.plots / "score_per_round.png")
    plot_communication(histories, paths.plots / "communication.png")
    for hist in histories.values():  # the router telemetry of the (first) mixture method
        last = next(r.eval for r in reversed(hist) if r.eval)
        usage = {cid: c["router"] for cid, c in last["clients"].items() if "router" in c}
        if usage:
            plot_router_usage(usage, paths.plots / "router_usage.png", metrics.get("allocation", {}).get("num_experts"))
            atomic_write_json(paths.plots / "router_usage.json", usage)
            break
    atomic_write_text(paths.root / "results.md", results_table(metrics) + "\n")
    tracker = Tracker(cfg)
    parent = tracker.parent_run_id()
    for name, m in methods.items():
        tracker.log_metrics(tracker.strategy_run_id(name), {
            f"final_mean_{m['metric']}": m["mean"], f"final_weighted_mean_{m['metric']}": m["weighted_mean"],
            "wall_seconds": m["wall_seconds"], "trainable_params": m["trainable_params"], "rounds": m["rounds"],
            "local_steps_per_client": m["local_steps_per_client"],
            "bytes_up_total_per_client": m["bytes_up_total_per_client"],
            "bytes_down_total_per_client": m["bytes_down_total_per_client"]})
        tracker.log_metrics(parent, {f"{name}.final_mean_{m['metric']}": m["mean"]})
    warm_alloc = metrics.get("allocation", {})
    warm_keys = {"warmup_score": "warmup.mean_score", "warmup_floor": "warmup.majority_floor",
                 "warmup_seconds": "warmup.seconds"}  # the warm-up that FedLEASE's and local's rounds start from
    tracker.log_metrics(parent, {name: warm_alloc[key] for key, name in warm_keys.items()
                                 if warm_alloc.get(key) is not None})
    for path in (paths.metrics, paths.root / "results.md", paths.plots):
        tracker.log_artifacts(parent, path, "results")
    tracker.log_table(parent, results_rows(metrics), "results_table.json")
    for name in methods:
        tracker.set_terminated(tracker.strategy_run_id(name))
    tracker.set_terminated(parent)
    return metrics


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name (the CLI command, the DVC stage, the Prefect subflow), what it does,
    whether it dispatches client work, and whether the chosen methods need it."""

    name: str
    run: Callable[[Config, ClientMapper], Any]
    client_work: bool = False
    needed: Callable[[Config], bool] = lambda cfg: True

    @property
    def description(self) -> str:
        return (self.run.__doc__ or self.name).strip().splitlines()[0]


STAGES: tuple[Stage, ...] = (
    Stage("data", stage_data),
    Stage("warmup", stage_warmup, client_work=True, needed=lambda cfg: needs_warmup(cfg.strategies)),
    Stage("allocate", stage_allocate, needed=lambda cfg: needs_allocation(cfg.strategies)),
    Stage("federate", stage_federate, client_work=True),
    Stage("evaluate", stage_evaluate),
)


def run_stage(stage: Stage, cfg: Config, mapper: ClientMapper = sequential_mapper) -> Any:
    """Run one stage; if it raises, the run's MLflow runs still RUNNING are closed as FAILED (KILLED when
    interrupted) before the error goes on."""
    with run_lock(cfg.output_dir):  # outside the try: a refused run must not close the other run's MLflow runs
        try:
            return stage.run(cfg, mapper)
        except BaseException as exc:
            _close_runs(cfg, exc)
            raise


def _close_runs(cfg: Config, exc: BaseException) -> None:
    """Close this run's MLflow runs still open as FAILED (KILLED when interrupted); best effort."""
    if not cfg.tracking.enabled:
        return
    try:
        Tracker(cfg).close_open_runs("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
    except Exception:  # noqa: BLE001 - the stage's own error is the one to report
        pass


def stage_named(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def run_all(cfg: Config, mapper: ClientMapper = sequential_mapper) -> dict[str, Any]:
    """Every stage the chosen methods need, in order; returns the evaluate stage's metrics."""
    out: Any = None
    with run_lock(cfg.output_dir):  # the whole run, not only each stage: no other run slips in between
        for stage in STAGES:
            if stage.needed(cfg):
                out = run_stage(stage, cfg, mapper)
    return out
