"""The pipeline's stages as plain functions: data -> warmup -> allocate -> federate -> evaluate.

The CLI (and so `dvc repro`), the Prefect flows and the tests all call these, with
a `ClientMapper` choosing how client work is dispatched. Every stage reads the
previous stage's files and writes its own atomically.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from fedlease.allocation import Allocation, b_distance_matrix, choose_experts, init_experts
from fedlease.client import runtime_for
from fedlease.config import Config
from fedlease.data.stage import load_manifest, run_data_stage
from fedlease.io import atomic_write_json, load_tensors, read_json, save_tensors
from fedlease.paths import RunPaths
from fedlease.server import ClientMapper, run_rounds, sequential_mapper
from fedlease.strategies import builds_on_warmup, make_strategy, needs_warmup
from fedlease.strategies.base import ModelSpec, ServerState, prefixed, unprefixed
from fedlease.tracking import Tracker, register_model


def stage_data(cfg: Config) -> dict[str, Any]:
    tracker = Tracker(cfg)
    manifest = run_data_stage(cfg)
    paths = RunPaths.of(cfg)
    parent = tracker.parent_run_id()
    for name in ("stats.json", "stats.png", "manifest.json"):
        tracker.log_artifacts(parent, paths.data / name, "data")
    return manifest


def _num_clients(cfg: Config) -> int:
    return len(load_manifest(cfg)["clients"])


def stage_warmup(cfg: Config, mapper: ClientMapper = sequential_mapper) -> list[str]:
    """Every client (sampled or not in later rounds) trains one LoRA from the common init; adapters
    land in <output>/warmup/."""
    paths = RunPaths.of(cfg)
    tracker = Tracker(cfg)
    n = _num_clients(cfg)
    strategy = make_strategy("warmup", cfg, n)
    common = runtime_for(cfg).common_init(ModelSpec(r=cfg.lora.r))
    every_client = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"clients_per_round": 1.0})})
    result = run_rounds(every_client, strategy, lambda: strategy.init_state(common), paths.warmup / "run", 1, mapper,
                        n, evaluate=False, inputs=[paths.manifest])
    state = result["state"]
    missing = [c for c in range(n) if not any(k.startswith(f"client{c}.") for k in state.tensors)]
    if missing:
        raise RuntimeError(f"warm-up: clients {missing} produced no adapter")
    out = []
    for c in range(n):
        path = paths.warmup_adapter(c)
        save_tensors(path, unprefixed(state.tensors, f"client{c}."))
        out.append(str(path))
    atomic_write_json(paths.warmup / "summary.json", {"clients": n, "history": result["history"]})
    parent = tracker.parent_run_id()
    for path in out:
        tracker.log_artifacts(parent, Path(path), "warmup_adapters")
    return out


def stage_allocate(cfg: Config) -> dict[str, Any]:
    """B-distance clustering, silhouette choice of M, cluster-mean expert init."""
    from fedlease.plots import plot_allocation

    paths = RunPaths.of(cfg)
    manifest = load_manifest(cfg)
    n = len(manifest["clients"])
    adapters = [load_tensors(paths.warmup_adapter(c)) for c in range(n)]
    dist = b_distance_matrix(adapters)
    fl = cfg.fedlease
    alloc = choose_experts(dist, fl.m_max, fl.clustering.method, fl.clustering.linkage, fl.clustering.fixed_m,
                           cfg.seed, fl.clustering.silhouette_tolerance)
    weights = [float(c["train"]) for c in manifest["clients"]] if fl.weighting == "examples" else None
    experts = init_experts(adapters, alloc, weights)
    tensors = {}
    for e, expert in enumerate(experts):
        tensors.update(prefixed(expert, f"expert{e}."))
    save_tensors(paths.allocation / "experts.safetensors", tensors)
    doc = alloc.to_json()
    doc["tasks"] = {str(c["client_id"]): c["task"] for c in manifest["clients"]}
    doc["ari_vs_task"] = task_ari(alloc, [c["task"] for c in manifest["clients"]])
    atomic_write_json(paths.cluster_map, doc)
    atomic_write_json(paths.allocation / "silhouette.json",
                      [{"k": k, "silhouette": s} for k, s in sorted(alloc.silhouette.items())])
    plot_allocation(alloc, [c["task"] for c in manifest["clients"]], paths.allocation)
    tracker = Tracker(cfg)
    parent = tracker.parent_run_id()
    for k, score in sorted(alloc.silhouette.items()):
        tracker.log_metrics(parent, {"allocation.silhouette": score}, step=k)
    tracker.log_metrics(parent, {"allocation.num_experts": alloc.num_experts, "allocation.seconds": alloc.seconds,
                                 "allocation.ari_vs_task": doc["ari_vs_task"]})
    tracker.log_artifacts(parent, paths.allocation, "allocation")
    return doc


def task_ari(alloc: Allocation, tasks: list[str]) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(tasks, alloc.assignment))


def _fedlease_initial(cfg: Config, strategy: Any) -> ServerState:
    paths = RunPaths.of(cfg)
    tensors = load_tensors(paths.allocation / "experts.safetensors")
    experts = [unprefixed(tensors, f"expert{e}.") for e in range(strategy.num_experts)]
    common = runtime_for(cfg).common_init(strategy.spec(0))
    router = {k: v for k, v in common.items() if k.startswith("router.")}
    return strategy.initial_state(experts, router)


def join_client(cfg: Config, data_file: str, task: str) -> dict[str, Any]:
    """Beyond the paper: a client joining after allocation warms up from the common init, takes the
    expert of the cluster with the smallest mean B-distance (no re-clustering), then trains one
    FedLEASE round from the current experts. Returns its assignment and accuracy."""
    import numpy as np

    from fedlease.allocation import assign_late_joiner
    from fedlease.client import client_evaluate, client_train, strategy_for, write_download
    from fedlease.config import TaskSpec
    from fedlease.data.partition import ClientData
    from fedlease.data.sources import DataError, read_local
    from fedlease.data.stage import late_client_file
    from fedlease.server import Checkpoint
    from fedlease.strategies.base import Download, select

    paths = RunPaths.of(cfg)
    n = _num_clients(cfg)
    late_root = paths.root / "late"
    joined = read_json(late_root / "joined.json") if (late_root / "joined.json").exists() else {}
    cid = n + len(joined)
    data = read_local(TaskSpec(name=task, source="local", path=data_file), cfg.data.kind)
    part = cfg.data.partition
    if len(data.records) < 2:
        raise DataError(f"{data_file}: a joining client needs at least 2 examples")
    order = np.random.default_rng([cfg.seed, cid]).permutation(len(data.records))
    n_test = max(1, round(len(order) * part.test_per_client / (part.train_per_client + part.test_per_client)))
    recs = [{**data.records[i], "task": task} for i in order]
    atomic_write_json(late_client_file(cfg, cid),
                      ClientData(cid, task, data.label_names, recs[n_test:], recs[:n_test]).to_json())
    # 1. warm-up from the common init, exactly as the original clients did
    work = late_root / f"client_{cid:03d}"
    common = runtime_for(cfg).common_init(ModelSpec(r=cfg.lora.r))
    down = work / "warmup_down.safetensors"
    write_download(down, Download(select(common, "lora.")))
    client_train(cfg, "warmup", cid, 1, str(down), str(work / "warmup_adapter.safetensors"), n + 1)
    # 2. nearest cluster by mean B-distance
    adapters = [load_tensors(paths.warmup_adapter(c)) for c in range(n)]
    alloc = Allocation.from_json(read_json(paths.cluster_map))
    expert, means = assign_late_joiner(load_tensors(work / "warmup_adapter.safetensors"), adapters, alloc)
    # 3. one local round from the current experts (the latest FedLEASE checkpoint, else the initial experts)
    strategy = strategy_for(cfg, "fedlease", n + 1)
    loaded = Checkpoint(paths.strategy_dir("fedlease") / "checkpoint").load()
    state = loaded[0] if loaded is not None else _fedlease_initial(cfg, strategy)
    tensors = select(state.tensors, "expert")
    tensors.update(select(state.tensors, f"router{expert}."))
    write_download(work / "down.safetensors", Download(tensors, {"expert": expert}))
    train = client_train(cfg, "fedlease", cid, 1, str(work / "down.safetensors"), str(work / "up.safetensors"), n + 1)
    metrics = client_evaluate(cfg, "fedlease", cid, 1, str(work / "down.safetensors"), n + 1)
    record = {"client_id": cid, "task": task, "expert": expert, "mean_distances": means,
              "accuracy": metrics.get("accuracy"), "bytes_up": train["bytes_up"], "bytes_down": train["bytes_down"]}
    joined[str(cid)] = record
    atomic_write_json(late_root / "joined.json", joined)
    return record


def stage_federate(cfg: Config, mapper: ClientMapper = sequential_mapper,
                   strategies: list[str] | None = None) -> dict[str, Any]:
    """Run every configured method on the same partitions, seeds and budgets."""
    from fedlease.client import strategy_for

    paths = RunPaths.of(cfg)
    tracker = Tracker(cfg)
    n = _num_clients(cfg)
    results = {}
    for name in strategies or cfg.strategies:
        t0 = time.perf_counter()
        strategy = strategy_for(cfg, name, n)
        if name == "fedlease":
            initial = lambda s=strategy: _fedlease_initial(cfg, s)  # noqa: E731
        else:
            common = runtime_for(cfg).common_init(strategy.spec(0))
            initial = lambda s=strategy, c=common: s.init_state(c)  # noqa: E731
        inputs = [paths.manifest] + ([paths.allocation / "experts.safetensors"] if name == "fedlease" else [])
        if builds_on_warmup(name):
            inputs.append(paths.warmup / "summary.json")  # a redone warm-up restarts the methods built on it
        out = run_rounds(cfg, strategy, initial, paths.strategy_dir(name), cfg.federation.rounds, mapper, n,
                         inputs=inputs, on_round=lambda rec, hist, m=name: _log_round(tracker, m, rec, hist))
        # the rounds' own seconds (kept in the checkpoint), so a resumed or finished run reports the
        # time its rounds took, not the seconds this call happened to last
        rounds_seconds = sum(r["seconds"] for r in out["history"])
        summary = {
            "strategy": name, "history": out["history"], "wall_seconds": rounds_seconds,
            "call_seconds": time.perf_counter() - t0,
            "trainable_params": trainable_params(cfg, strategy),
        }
        atomic_write_json(paths.strategy_dir(name) / "result.json", summary)
        export_final_model(cfg, strategy, out["state"], paths.strategy_dir(name) / "final")
        run_id = tracker.method_run_id(name)
        tracker.log_artifacts(run_id, paths.strategy_dir(name) / "final", "final_model")
        tracker.log_artifacts(run_id, paths.strategy_dir(name) / "result.json", "")
        if name == "fedlease":
            register_model(tracker, run_id, "final_model")
        results[name] = summary
    return results


def _log_round(tracker: Tracker, method: str, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
    cumulative = {"up": sum(sum(r["bytes_up"].values()) for r in history[:-1]),
                  "down": sum(sum(r["bytes_down"].values()) for r in history[:-1])}
    tracker.log_round(method, record, cumulative)


def export_final_model(cfg: Config, strategy: Any, state: ServerState, folder: Path) -> None:
    """Final server state (experts, routers / shared LoRA) as safetensors + the cluster map + a loading README."""
    from fedlease.io import atomic_dir, atomic_write_text

    paths = RunPaths.of(cfg)
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / "server_state.safetensors", state.tensors)
        atomic_write_json(tmp / "meta.json", {"strategy": strategy.name, "state_meta": state.meta,
                                              "model": cfg.model.model_dump(), "lora": cfg.lora.model_dump()})
        if paths.cluster_map.exists() and strategy.name == "fedlease":
            atomic_write_json(tmp / "cluster_map.json", read_json(paths.cluster_map))
        engine_config = runtime_for(cfg).engine_config()
        if engine_config is not None:
            atomic_write_json(tmp / "deepspeed_config.json", engine_config)
        atomic_write_json(tmp / "params.json", cfg.model_dump(mode="json"))
        manifest = load_manifest(cfg)
        atomic_write_json(tmp / "clients.json", {str(c["client_id"]): {"task": c["task"]} for c in manifest["clients"]})
        # The simulation keeps every client's local state (its head) beside the model so any
        # client's model can be rebuilt; in a real deployment each silo keeps its own.
        from fedlease.client import latest_local_state
        from fedlease.data.stage import load_client

        (tmp / "clients").mkdir()
        for c in manifest["clients"]:
            cid = c["client_id"]
            local = latest_local_state(cfg, strategy, cid, 10**9)
            if local is not None:
                shutil.copyfile(local, tmp / "clients" / f"client_{cid:03d}.safetensors")
            label_names = load_client(cfg, cid).label_names
            atomic_write_json(tmp / "clients" / f"client_{cid:03d}.json", {"task": c["task"], "label_names": label_names})
        atomic_write_text(tmp / "README.md", MODEL_README.format(strategy=strategy.name))


MODEL_README = """# Final {strategy} model (FedLEASE pipeline)

- `server_state.safetensors`: the server's final tensors. For FedLEASE: `expert<e>.lora.<module>.A|B`
  (one LoRA expert per cluster, rank r, scaling alpha/r) and `router<e>.router.<module>` (the router
  of cluster e, shape (2M-1, d_in)). For the single-LoRA baselines: `lora.<module>.A|B`.
- `cluster_map.json`: client -> expert, silhouette per k, the B-distance matrix.
- `meta.json`: base model and LoRA settings; `deepspeed_config.json`: the engine config used.
- Client heads stay with the clients (`../clients/client_NNN/round_XXXX.safetensors`).

Rebuild a client's model and predict without the training code path:

    fedlease predict --model-dir <this folder> --client 3 "some text"
"""


def trainable_params(cfg: Config, strategy: Any) -> int:
    """Parameters one client trains (adapters + router + head) for the table."""
    from fedlease.models.adapters import set_trainable

    rt = runtime_for(cfg)
    model = rt.fresh_model(strategy.spec(0), 2)
    params = set_trainable(model, strategy.train_groups, rt.head_module())
    return sum(p.numel() for p in params)


def stage_evaluate(cfg: Config) -> dict[str, Any]:
    """Collect every method's final metrics into metrics.json, a results table and plots."""
    from fedlease.plots import plot_accuracy_rounds, plot_communication, plot_router_usage
    from fedlease.report import results_table

    paths = RunPaths.of(cfg)
    results = {name: read_json(paths.strategy_dir(name) / "result.json") for name in cfg.strategies}
    methods = {name: summarise_method(res) for name, res in results.items()}
    alloc = read_json(paths.cluster_map) if paths.cluster_map.exists() else None
    metrics = {"methods": methods}
    if alloc is not None:
        metrics["allocation"] = {"num_experts": alloc["num_experts"], "ari_vs_task": alloc["ari_vs_task"],
                                 "silhouette": alloc["silhouette"]}
        if (paths.warmup / "summary.json").exists():
            warm = read_json(paths.warmup / "summary.json")["history"]
            metrics["allocation"]["warmup_seconds"] = float(sum(r["seconds"] for r in warm))
    atomic_write_json(paths.metrics, metrics)
    curves = []
    for name, res in results.items():
        for rec in res["history"]:
            if "eval" in rec:
                curves.append({"method": name, "round": rec["round"], "score": rec["eval"]["mean"]})
    atomic_write_json(paths.plots / "score_per_round.json", curves)
    plot_accuracy_rounds(curves, paths.plots / "score_per_round.png")
    plot_communication({n: res["history"] for n, res in results.items()}, paths.plots / "communication.png")
    if "fedlease" in results:
        history = results["fedlease"]["history"]
        last = next(r["eval"] for r in reversed(history) if "eval" in r)
        usage = {cid: c["router"] for cid, c in last["clients"].items() if "router" in c}
        plot_router_usage(usage, paths.plots / "router_usage.png")
        atomic_write_json(paths.plots / "router_usage.json", usage)
    table = results_table(metrics)
    from fedlease.io import atomic_write_text

    atomic_write_text(paths.root / "results.md", table + "\n")
    tracker = Tracker(cfg)
    parent = tracker.parent_run_id()
    for name, m in methods.items():
        tracker.log_metrics(tracker.method_run_id(name), {f"final_mean_{m['metric']}": m["mean"],
                                                          "wall_seconds": m["wall_seconds"],
                                                          "trainable_params": m["trainable_params"]})
        tracker.log_metrics(parent, {f"{name}.final_mean_{m['metric']}": m["mean"]})
    for path in (paths.metrics, paths.root / "results.md", paths.plots):
        tracker.log_artifacts(parent, path, "results")
    for name in methods:
        tracker.set_terminated(tracker.method_run_id(name))
    tracker.set_terminated(parent)
    return metrics


def summarise_method(res: dict[str, Any]) -> dict[str, Any]:
    history = res["history"]
    last_eval = next(r["eval"] for r in reversed(history) if "eval" in r)
    rounds = len(history)
    ups = [sum(r["bytes_up"].values()) / max(1, len(r["bytes_up"])) for r in history]
    downs = [sum(r["bytes_down"].values()) / max(1, len(r["bytes_down"])) for r in history]
    return {
        "metric": last_eval["metric"], "mean": last_eval["mean"], "per_task": last_eval["per_task"],
        "mean_macro_f1": last_eval.get("mean_macro_f1"), "rounds": rounds,
        "bytes_up_per_client_round": float(sum(ups) / max(1, rounds)),
        "bytes_down_per_client_round": float(sum(downs) / max(1, rounds)),
        "wall_seconds": res["wall_seconds"], "trainable_params": res["trainable_params"],
        "per_round": [{"round": r["round"], "mean": r["eval"]["mean"]} for r in history if "eval" in r],
    }


def run_all(cfg: Config, mapper: ClientMapper = sequential_mapper) -> dict[str, Any]:
    stage_data(cfg)
    if needs_warmup(cfg):
        stage_warmup(cfg, mapper)
    if "fedlease" in cfg.strategies:
        stage_allocate(cfg)
    stage_federate(cfg, mapper)
    return stage_evaluate(cfg)

