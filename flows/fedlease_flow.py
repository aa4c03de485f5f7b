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
    """One client's work for one stage and round (train or evaluate), from files to files."""
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


@flow(name="fedlease", log_prints=True)
def fedlease_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """The whole pipeline: the stages of `fedlease.pipeline.STAGES` the chosen methods need, in order."""
    cfg = _cfg(params, overrides)
    metrics: Any = None
    for stage in pipeline.STAGES:
        if stage.needed(cfg):
            subflow = STAGE_FLOWS[stage.name]
            if stage.client_work:
                subflow = subflow.with_options(task_runner=_runner(cfg))
            metrics = subflow(params, overrides)
    from fedlease.report import results_table

    print(results_table(metrics))
    return metrics
