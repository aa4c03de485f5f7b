"""Silo mode across real process boundaries: a Prefect server, three silos each with its own worker
process, data folder and working directory, and a coordinator process that never gets a data path.

Proves the boundary (planted sentences from every client's data appear nowhere on the coordinator's
side: not in the exchange store, the Prefect database, the MLflow store, its outputs or its logs), that
silo mode gives the simulation's results on the same files and seeds, and that a silo whose worker is
stopped mid-run is dropped for the round and rejoins when its worker is back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedlease.config import config_from_dict
from fedlease.pipeline import run_all
from flows.local_federation import LocalFederation

from .conftest import tiny_params, write_sentiment_csv, write_topic_csv

pytestmark = pytest.mark.slow
SILOS = {"north": ["n0", "n1"], "south": ["s0"], "east": ["e0"]}
TASKS = {"n0": "sentiment", "n1": "topic", "s0": "sentiment", "e0": "topic"}


def _planted(client: str) -> str:
    return f"PLANTED {client} zanzibar quokka"


def _write_client(path: Path, client: str, n: int, seed: int) -> None:
    """A client's own file; every example carries a sentence planted for this client."""
    write = write_sentiment_csv if TASKS[client] == "sentiment" else write_topic_csv
    write(path, n, seed, suffix=f" {_planted(client)}")


def _params(root: Path, exchange: str, clients: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    raw = tiny_params(root, **{"strategies": ["fedlease", "local"], "federation__rounds": 1, **over})
    raw["data"] = {"cache_dir": str(root / "cache"), "tasks": [], "clients": clients,
                   "partition": {"scheme": "files", "test_fraction": 0.25, "min_test_per_client": 4}}
    raw["federation"]["exchange"] = {"url": exchange, "wait_s": 5.0, "poll_s": 0.2}
    return raw


def _scores(output_dir: Path) -> dict[str, Any]:
    out = {}
    for result in sorted((output_dir / "federate").glob("*/result.json")):
        history = json.loads(result.read_text())["history"]
        out[result.parent.name] = [(r["round"], r["loss"], sorted(r["dropped"]),
                                    {c: v["accuracy"] for c, v in (r.get("eval") or {}).get("clients", {}).items()})
                                   for r in history]
    return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Any:
    fed = LocalFederation(tmp_path_factory.mktemp("federation"), list(SILOS))
    fed.files = {}
    for silo, clients in SILOS.items():
        (fed.silo_home(silo) / "data").mkdir(parents=True)
        spec = {}
        for k, client in enumerate(clients):
            path = fed.silo_home(silo) / "data" / f"{client}.csv"
            _write_client(path, client, 32 + 16 * k, seed=sum(map(ord, client)))
            spec[client] = {"path": str(path)}
        fed.add_silo(silo, spec)
        fed.files.update(spec)
        fed.start_worker(silo)
    yield fed
    fed.close()


def _silo_params(fed: LocalFederation, run: str, **over: Any) -> dict[str, Any]:
    clients = [{"silo": silo, "name": c, "task": TASKS[c]} for silo, cs in SILOS.items() for c in cs]
    params = _params(fed.root / "coordinator", str(fed.root / "store"), clients, **over)
    params["output_dir"] = str(fed.root / "coordinator" / run)
    params["tracking"] = {"enabled": True, "uri": f"sqlite:///{fed.root / 'coordinator' / 'mlflow.db'}",
                          "experiment": "silo"}
    params["orchestration"] = {"task_runner": "silo", "silo_timeout_s": 300, "retries": 0}
    return params


def _run_coordinator(fed: LocalFederation, params: dict[str, Any]) -> None:
    run = fed.run_coordinator(params, timeout_s=1500)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


def test_silos_keep_their_data_and_match_the_simulation(federation: LocalFederation):
    fed = federation
    params = _silo_params(fed, "outputs", strategies=["fedlease"])  # every method: test_silo_calls.py
    _run_coordinator(fed, params)

    # the simulation on the same files and seeds gives the same rounds, losses and scores
    sim_clients = [{**fed.files[c["name"]], "task": c["task"]} for c in params["data"]["clients"]]
    sim = _params(fed.root / "sim", "unused", sim_clients, strategies=["fedlease"])
    sim["federation"]["exchange"] = {"url": None}
    run_all(config_from_dict(sim))
    silo_scores = _scores(fed.root / "coordinator" / "outputs")
    assert set(silo_scores) == {"fedlease"}
    assert silo_scores == _scores(fed.root / "sim" / "outputs")

    # the boundary: no client's text anywhere on the coordinator's side
    coordinator_side = [fed.root / "store", fed.root / "prefect", fed.root / "coordinator", fed.root / "logs"]
    planted = [_planted(c).encode() for c in TASKS]
    leaks = [str(p) for root in coordinator_side for p in root.rglob("*") if p.is_file()
             and any(s in p.read_bytes() for s in planted)]
    assert not leaks, f"client text reached the coordinator's side: {leaks}"
    assert not (fed.root / "coordinator" / "outputs" / "data" / "clients").exists()
    assert not list((fed.root / "coordinator" / "outputs").glob("*/*/clients"))  # no client's local state
    assert list((fed.root / "silos" / "north" / "work").glob("outputs-*/warmup/clients/client_000"))
    # ... while it is where it belongs (the grep can find it)
    assert any(planted[0] in p.read_bytes() for p in (fed.root / "silos" / "north" / "work").rglob("client_*.json"))
    # heads stay at the silos: the central model holds experts and routers, no client state
    final = fed.root / "coordinator" / "outputs" / "federate" / "fedlease" / "final"
    assert (final / "server_state.safetensors").exists() and not any((final / "clients").iterdir())

    # a silo exports its clients' full models (heads included) and predicts there, as the simulation does
    def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedlease.cli", *args], cwd=cwd, env=fed.env,
                              capture_output=True, text=True, timeout=300)

    north = fed.root / "silos" / "north"
    export = cli("silo", "export", "--config", "silo.yaml", "--store", str(fed.root / "store"), "--run", "outputs",
                 cwd=north)
    assert export.returncode == 0, export.stderr[-3000:]
    (folder,) = (north / "work").glob("outputs-*/export/fedlease")  # the run's folder: name + params
    assert sorted(p.name for p in (folder / "clients").iterdir()) == [
        "client_000.json", "client_000.safetensors", "client_001.json", "client_001.safetensors"]
    from fedlease.io import load_tensors

    sim_final = fed.root / "sim" / "outputs" / "federate" / "fedlease" / "final"
    for name in ("client_000.safetensors", "client_001.safetensors"):  # the heads the simulation keeps
        mine, theirs = load_tensors(folder / "clients" / name), load_tensors(sim_final / "clients" / name)
        assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)
    text = "the film was wonderful"
    at_silo = cli("predict", "--model-uri", str(folder), "--client", "1", text, cwd=north)
    in_sim = cli("predict", "--model-uri", str(sim_final), "--client", "1", text, cwd=fed.root)
    assert at_silo.returncode == 0 and in_sim.returncode == 0, at_silo.stderr[-2000:] + in_sim.stderr[-2000:]
    assert at_silo.stdout.startswith("client 1: ") and at_silo.stdout == in_sim.stdout
    central = cli("predict", "--model-uri", str(final), "--client", "1", text, cwd=fed.root)
    assert central.returncode == 1 and "stay" not in central.stdout and "at the client's silo" in central.stderr


def test_a_silo_whose_worker_stops_is_dropped_then_rejoins(federation: LocalFederation):
    fed = federation
    # FedIT (no warm-up to wait for), scored after round 2 only: the fewest calls that show the rule
    params = _silo_params(fed, "outputs-down", strategies=["fedit"], federation__rounds=2,
                          federation__protocol="paper", federation__eval_every=2)
    params["data"]["clients"] = [c for c in params["data"]["clients"] if c["name"] != "n1"]  # one per silo
    params["orchestration"]["silo_timeout_s"] = 45  # three calls at once take ~10-20 s each on 2 cores
    manifest = fed.root / "coordinator" / "outputs-down" / "data" / "manifest.json"
    events: list[str] = []

    def watch() -> None:
        """Stop east's worker once its client is prepared (round 1 is next), start it again when round 2's
        downloads appear."""
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and not manifest.exists():
            time.sleep(0.1)
        fed.stop("worker-east", hard=True)  # at once: a graceful stop may still take round 1's call
        events.append("stopped")
        round_2_sent = "store/*/fedit/r0002/down_000.safetensors.sha256"
        while time.monotonic() < deadline and not list(fed.root.glob(round_2_sent)):
            time.sleep(0.2)
        fed.start_worker("east")
        events.append("restarted")

    import threading

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _run_coordinator(fed, params)
    watcher.join(timeout=60)
    assert events == ["stopped", "restarted"]
    history = json.loads((fed.root / "coordinator" / "outputs-down" / "federate" / "fedit" / "result.json")
                         .read_text())["history"]
    first, second = history
    assert sorted(first["dropped"]) == ["2"], first["dropped"]  # client 2 (e0) is east's
    assert "silo east" in first["dropped"]["2"] and "did not finish in 45 s" in first["dropped"]["2"]
    assert sorted(first["steps"]) == ["0", "1"]  # the round went on with the other silos
    assert second["dropped"] == {} and "2" in second["steps"]  # back at the next round
    assert "accuracy" in second["eval"]["clients"]["2"]
