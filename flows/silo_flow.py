"""Silo mode on Prefect's own machinery: one work pool per organisation.

Each silo runs a Prefect worker in its own pool (`prefect worker start --pool silo-<name>`), in its own
environment, next to its data; `register` (below) creates the pools and one deployment per silo of the
`fedlease-silo` flow. The coordinator's flow (`orchestration.task_runner: silo`) starts that
deployment for every client call (`run_deployment`), waits for it, and reads the call's small result
from the exchange store. A call that does not finish in `orchestration.silo_timeout_s` (the worker is
down or slow) is cancelled (a running one: its worker stops it), and fails: Prefect's task retries run it again,
then the round drops the client by `federation.min_clients_fraction`; the next round asks again.

    python -m flows.silo_flow register hospital-a hospital-b     # coordinator, once per federation
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from prefect import flow  # noqa: E402

SILO_FLOW = "fedlease-silo"


class SiloUnavailable(RuntimeError):
    """A silo did not run a call in time (its worker is down or slow) or the call failed there."""


@flow(name=SILO_FLOW, persist_result=False, log_prints=False, validate_parameters=True)
def silo_call(kind: str, call: dict[str, Any], result_path: str) -> None:
    """One client call (prepare, train, evaluate), run by the silo's worker next to the silo's data.
    What reaches the Prefect server is the state; a failure's details (which may name the silo's
    files or quote its data) stay in the silo's own log."""
    from fedlease.silo import run_silo_call_logged

    run_silo_call_logged(kind, call, result_path)


def run_at_silo(fn: Callable[..., Any], call: dict[str, Any]) -> Any:
    """Coordinator: run one client call at the client's silo and return its result."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled, Cancelling

    from fedlease.silo import silo_call_for, silo_call_result

    cfg = call["cfg"]
    sent = silo_call_for(fn, call)
    silo, kind, client_id = sent.silo, sent.kind, sent.client_id
    run = run_deployment(f"{SILO_FLOW}/silo-{silo}", parameters=sent.parameters,
                         timeout=cfg.orchestration.silo_timeout_s, flow_run_name=f"{kind}-client-{client_id:03d}")
    state = run.state
    if state is None or not state.is_completed():
        if state is None or not state.is_final():
            # never picked up: cancelled, it cannot start late; running: Cancelling, its worker kills it
            # (a worker that cannot be reached cannot; its late upload is for a round already aggregated)
            stop = Cancelling if state is not None and state.is_running() else Cancelled
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run.id, stop(message="timed out at the coordinator"), force=True)
            raise SiloUnavailable(f"silo {silo}: client {client_id}'s {kind} call did not finish in "
                                  f"{cfg.orchestration.silo_timeout_s:g} s (is the silo-{silo} worker up?)")
        raise SiloUnavailable(f"silo {silo}: client {client_id}'s {kind} call ended {state.name}: {state.message}")
    return silo_call_result(cfg, sent)


def register(silos: list[str]) -> None:
    """Create each silo's process work pool (if missing) and its deployment of the silo flow. The
    worker runs the flow from its own checkout: `FEDLEASE_HOME` in the worker's environment."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(SILO_FLOW)
        for silo in silos:
            pool = f"silo-{silo}"
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            client.create_deployment(
                flow_id=flow_id, name=pool, entrypoint="flows/silo_flow.py:silo_call", work_pool_name=pool,
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $FEDLEASE_HOME }}"}}],
                parameter_openapi_schema=parameter_schema(silo_call).model_dump(),
                description=f"FedLEASE client calls at silo {silo}")
            print(f"registered {SILO_FLOW}/{pool} (work pool {pool})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.silo_flow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="create the silos' work pools and deployments")
    reg.add_argument("silos", nargs="+", help="silo names, as in data.clients[*].silo")
    args = parser.parse_args(argv)
    register(args.silos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
