"""The Ray task runner for real: a local Ray head on 127.0.0.1, the tiny config end to end on it,
the same final metrics as the local runner, and the head stopped afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedlease.ranks import free_port

from .conftest import tiny_params

pytestmark = pytest.mark.slow


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """Start a Ray head bound to 127.0.0.1 (its own temp dir) and stop exactly that head afterwards."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", '--resources={"silo_a": 2}', "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run([str(ray_bin), "status", f"--address={address}"], env=env,
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the Ray head on {address} did not start")
        time.sleep(1)
    try:
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # a hung client's worker can hold a graceful stop for a minute
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)  # reaped: a zombie leader would still count as a live group
    # the head is stopped: its processes are gone and its port refuses (`ray status` would retry ~40 s)
    deadline = time.time() + 15
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    if _group_alive(proc.pid):  # a raylet or worker that ignored the graceful stop: no leak either way
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a process of the head this test started outlived its stop by 15 s")
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server for the module's flows (each start costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_ray_runner_matches_the_local_runner(tmp_path: Path, ray_head: str, prefect_server: None):
    from fedlease.config import config_from_dict
    from fedlease.pipeline import run_all
    from flows.fedlease_flow import fedlease_flow

    local = run_all(config_from_dict(tiny_params(tmp_path / "local", strategies=["fedlease", "fedit"])))

    raw = tiny_params(tmp_path / "ray", strategies=["fedlease", "fedit"])
    # client 0 is pinned to the nodes of its organisation (a custom resource only this head has)
    raw["orchestration"] = {"task_runner": "ray", "ray": {"address": ray_head, "num_cpus": 1,
                                                          "client_resources": {0: {"silo_a": 1}}}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    on_ray = fedlease_flow(str(params))
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = {t.name for t in client.read_task_runs()}
    assert "fedlease-r2-train-client-003" in names, "client tasks ran as Prefect tasks on Ray"
    from fedlease.io import read_json

    for method in ("fedlease", "fedit"):
        for key in ("mean", "per_task", "per_round"):
            assert on_ray["methods"][method][key] == local["methods"][method][key], (method, key)
        losses = [[read_json(tmp_path / run / "outputs" / "federate" / method / "result.json")["history"][r]["loss"]
                   for r in range(2)] for run in ("local", "ray")]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), (method, losses)
    for key in ("num_experts", "ari_vs_task"):
        assert on_ray["allocation"][key] == local["allocation"][key], key
    # Ray gives each worker one thread (num_cpus = 1): sums reduce in another order, so floats agree to ~1e-8
    assert on_ray["allocation"]["silhouette"] == pytest.approx(local["allocation"]["silhouette"], rel=1e-6)


def test_a_hanging_client_times_out_on_ray_and_is_dropped(tmp_path: Path, ray_head: str, prefect_server: None):
    """Ray runs each client task in its own worker process, so a task timeout really interrupts it."""
    from fedlease.io import read_json
    from flows.fedlease_flow import fedlease_flow

    raw = tiny_params(tmp_path, strategies=["fedit"])
    raw["federation"]["rounds"] = 1
    raw["federation"]["protocol"] = "paper"  # one round (equal compute would add the warm-up's as a second)
    raw["faults"] = {"hang_client_ids": [1], "hang_seconds": 600}
    raw["orchestration"] = {"task_runner": "ray", "task_timeout_s": 10, "retries": 1, "retry_delay_s": 0,
                            "ray": {"address": ray_head}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    fedlease_flow(str(params))
    assert time.time() - t0 < 300, "the hang did not block the round"
    record = read_json(tmp_path / "outputs" / "federate" / "fedit" / "result.json")["history"][0]
    assert list(record["dropped"]) == ["1"] and "Timeout" in record["dropped"]["1"], record["dropped"]
    assert sorted(record["bytes_up"]) == ["0", "2", "3"], "the round aggregated the other clients"
