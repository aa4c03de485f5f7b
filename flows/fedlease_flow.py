"""Prefect flows: one subflow per pipeline stage (data, warmup, allocate, federate, evaluate) and
`fedlease` chaining them in the order of `fedlease.pipeline.STAGES`.

Flows only orchestrate: every number is computed in `fedlease/`. Client work is one
Prefect task per client per stage (warm-up, each local round, each evaluation), so
the UI shows which client does what; tasks pass file paths, never tensors.
`prefect deployment run fedlease/full` runs the `fedlease` flow (see infra/).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from fedlease import pipeline  # noqa: E402
from fedlease.config import Config, load_config  # noqa: E402
from fedlease.isolation import run_client_call  # noqa: E402
from fedlease.server import ClientMapper  # noqa: E402


@task(name="client", cache_policy=NO_CACHE, persist_result=False)
def client_task(fn: Callable[..., Any], call: dict[str, Any]) -> Any:
    """One client's work for one stage and round (train or evaluate), from files to files: here, or at
    the client's silo (silo mode, flows/silo_flow.py)."""
    if call["cfg"].orchestration.at_silos:
        from flows.silo_flow import run_at_silo

        return run_at_silo(fn, call)
    return run_client_call(fn, call)


def prefect_mapper(cfg: Config) -> ClientMapper:
    """Submit one task per client; retries and timeouts come from params.yaml."""
    orch = cfg.orchestration
    # A timeout cannot interrupt a task running in a worker thread (Prefect only warns), so it is
    # applied where tasks run in their own processes (the Ray runner; with fresh_process, the
    # call's own process is killed at task_timeout_s under any runner, fedlease/isolation.py).
    timeout = orch.task_timeout_s if orch.task_runner == "ray" else None

    def run(fn: Callable[..., Any], calls: list[dict[str, Any]], label: str) -> list[Any | BaseException]:
        futures = []
        for call in calls:
            name = f"{label}-client-{call['client_id']:03d}"
            t = client_task.with_options(name=f"{label.split('-r')[0]}-{fn.__name__}", task_run_name=name,
                                         retries=orch.retries, retry_delay_seconds=orch.retry_delay_s,
                                         timeout_seconds=timeout)
            with _client_resources(cfg, call["client_id"]):
                futures.append(t.submit(fn, call))
        out: list[Any | BaseException] = []
        for fut in futures:
            try:
                out.append(fut.result())
            except BaseException as exc:  # noqa: BLE001 - a failed client is dropped by the server
                out.append(exc)
        return out

    return run


def _client_resources(cfg: Config, client_id: int) -> AbstractContextManager[Any]:
    """A client task's Ray resources (num_cpus, num_gpus, its silo's custom resources) from params;
    nothing for the local runners."""
    if cfg.orchestration.task_runner != "ray":
        return nullcontext()
    from prefect_ray.context import remote_options

    ray_cfg = cfg.orchestration.ray
    extra = ray_cfg.client_resources.get(client_id)
    return remote_options(num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus,
                          **({"resources": dict(extra)} if extra else {}))


def _runner(cfg: Config) -> Any:
    if cfg.orchestration.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        address = cfg.orchestration.ray.address
        if address == "auto":  # join the running cluster, never silently start a private one
            return RayTaskRunner(init_kwargs={"address": "auto"})
        return RayTaskRunner(address=address)
    if cfg.orchestration.at_silos:  # the work runs at the silos: wait for every client at once
        return ThreadPoolTaskRunner(max_workers=min(64, cfg.num_clients))
    workers = 1 if cfg.orchestration.task_runner == "sequential" else os.cpu_count() or 1
    return ThreadPoolTaskRunner(max_workers=workers)


def _cfg(params: str, overrides: list[str] | None) -> Config:
    return load_config(params, overrides or [])


def _stage_flow(stage: pipeline.Stage) -> Any:
    """A Prefect subflow running one pipeline stage (client work as one task per client)."""

    @flow(name=stage.name, description=stage.description)
    def run_stage(params: str = "params.yaml", overrides: list[str] | None = None) -> Any:
        cfg = _cfg(params, overrides)
        return pipeline.run_stage(stage, cfg, prefect_mapper(cfg))

    return run_stage


#: one subflow per stage of `fedlease.pipeline.STAGES`, in its order
STAGE_FLOWS = {stage.name: _stage_flow(stage) for stage in pipeline.STAGES}


def run_name() -> str:
    """The flow run's name, from its parameters: the params file, the overrides' gist, the seed."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    stem = os.path.splitext(os.path.basename(str(params.get("params", "params.yaml"))))[0]
    overrides = typed_overrides(params.get("seed"), params.get("rounds"), params.get("strategies"), None)
    overrides += list(params.get("overrides") or [])
    seed = next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), None)
    rest = [o for o in overrides if not o.startswith("seed=")]
    gist = "-".join(o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[1] for o in rest[:3])
    return "-".join(p for p in (stem, gist, f"seed{seed}" if seed else "") if p)[:120] or "fedlease"


def typed_overrides(seed: int | None, rounds: int | None, strategies: list[str] | None,
                    output_dir: str | None) -> list[str]:
    """The flow's typed parameters as params overrides (applied before the free-form `overrides`)."""
    out = [f"seed={seed}"] if seed is not None else []
    out += [f"federation.rounds={rounds}"] if rounds is not None else []
    out += [f"strategies=[{','.join(strategies)}]"] if strategies else []
    out += [f"output_dir={output_dir}"] if output_dir else []
    return out


@flow(name="fedlease", log_prints=True, flow_run_name=run_name, validate_parameters=True)
def fedlease_flow(params: str = "params.yaml", overrides: list[str] | None = None, seed: int | None = None,
                  rounds: int | None = None, strategies: list[str] | None = None,
                  output_dir: str | None = None) -> dict[str, Any]:
    """The whole pipeline: the stages of `fedlease.pipeline.STAGES` the chosen methods need, in order.

    Typed parameters (their types checked by Prefect and its UI form; their values by the params model,
    which names the key) for the usual keys: seed, rounds, the methods to compare, the output folder;
    `overrides` takes any other params key as `dotted.key=value`. Plain builtin types on purpose: a served
    deployment rebuilds this signature from the source, where other names would not resolve. On the flow run:
    a progress artifact, the results table, a link to the MLflow run."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from fedlease.runlock import run_lock

    overrides = typed_overrides(seed, rounds, strategies, output_dir) + list(overrides or [])
    cfg = _cfg(params, overrides)
    stages = [stage for stage in pipeline.STAGES if stage.needed(cfg)]
    progress = create_progress_artifact(progress=0.0, key="fedlease-progress",
                                        description="Pipeline stages done (%)")
    metrics: Any = None
    with run_lock(cfg.output_dir):  # a second run on the same output_dir is refused, not interleaved
        for done, stage in enumerate(stages, 1):
            subflow = STAGE_FLOWS[stage.name]
            if stage.client_work:
                subflow = subflow.with_options(task_runner=_runner(cfg))
            metrics = subflow(params, overrides)
            update_progress_artifact(progress, 100.0 * done / len(stages))
    publish_results(cfg, metrics)
    return metrics


def publish_results(cfg: Config, metrics: dict[str, Any]) -> None:
    """The results table (markdown and table artifacts) and the MLflow run's link on the flow run's page."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    from fedlease.report import results_rows, results_table

    table = results_table(metrics)
    print(table)
    create_markdown_artifact(markdown=table, key="fedlease-results", description="FedLEASE results table")
    rows = results_rows(metrics)
    create_table_artifact(table=[dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)],
                          key="fedlease-results-table", description="Results, one row per method")
    link = mlflow_run_link(cfg)
    if link:
        create_link_artifact(link=link, link_text="MLflow run", key="fedlease-mlflow-run",
                             description="The pipeline's parent run in MLflow")


def mlflow_run_link(cfg: Config) -> str | None:
    """The parent MLflow run's UI address when tracking goes to an HTTP server, else None."""
    from fedlease.io import read_json
    from fedlease.paths import RunPaths

    state = RunPaths.of(cfg).root / "tracking.json"
    if not cfg.tracking.enabled or not state.exists():
        return None
    doc = read_json(state)
    uri = str(doc.get("uri", ""))
    if not uri.startswith(("http://", "https://")) or not doc.get("parent"):
        return None
    from fedlease.tracking import run_ui_path

    return uri.rstrip("/") + run_ui_path(cfg, doc["parent"])
