"""MLflow: parent + nested runs, per-round metrics with step = round, artifacts, registry, predict, report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlease.config import config_from_dict
from fedlease.io import read_json
from fedlease.paths import RunPaths
from fedlease.pipeline import run_all

from .conftest import REPO, tiny_params

pytestmark = pytest.mark.slow


def test_runs_metrics_artifacts_registry_predict_report(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = tiny_params(tmp_path, strategies=["fedlease", "fedit"])
    raw["tracking"] = {"enabled": True, "uri": uri, "experiment": "t", "registered_model": "fl-test"}
    cfg = config_from_dict(raw)
    run_all(cfg)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fedlease.kind") == "pipeline"]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    children = {r.data.tags["fedlease.strategy"]: r for r in kids}
    assert set(children) == {"fedlease", "fedit"}
    # runs with identity: descriptive names, key params on every child, context tags, a dataset input
    phash = parents[0].data.tags["fedlease.params_hash"][:6]
    assert parents[0].info.run_name == f"pipeline-seed0-{phash}"
    m = read_json(RunPaths.of(cfg).cluster_map)["num_experts"]
    assert children["fedlease"].info.run_name == f"fedlease-M{m}-seed0-{phash}"
    assert children["fedit"].info.run_name == f"fedit-seed0-{phash}"
    for run in (parents[0], *kids):
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
        assert run.data.tags["fedlease.sources"] and run.data.tags.get("mlflow.source.git.commit")
    assert children["fedit"].data.params["lora.r"] == "2" and children["fedit"].data.params["seed"] == "0"
    assert children["fedit"].data.params["federation.protocol"] == "equal_compute"
    for key in ("fedlease.variant", "fedlease.clustering.distance", "fedlease.router.own_prior",
                "fedlease.router.personal_expert", "fedlease.warmup_head_epochs"):  # option runs tell apart
        assert key in children["fedlease"].data.params, key
    warm = read_json(RunPaths.of(cfg).metrics)["allocation"]  # the warm-up's own score, beside the methods'
    assert parents[0].data.metrics["warmup.mean_score"] == pytest.approx(warm["warmup_score"])
    assert parents[0].data.metrics["warmup.majority_floor"] == pytest.approx(warm["warmup_floor"])
    inputs = client.get_run(parents[0].info.run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "task-partition-4-clients"
    assert all(r.info.status == "FINISHED" for r in (parents[0], *kids))
    # metrics grouped by kind with '/', one chart section each
    assert client.get_metric_history(children["fedit"].info.run_id, "client_accuracy/0")
    assert client.get_metric_history(children["fedit"].info.run_id, "task_accuracy/sentiment")
    assert "results_table.json" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    hist = client.get_metric_history(children["fedlease"].info.run_id, "mean_accuracy")
    assert sorted(m.step for m in hist) == [1, 2]
    assert parents[0].data.params["lora.r"] == "2"
    sil = client.get_metric_history(parents[0].info.run_id, "allocation.silhouette")
    assert sorted(m.step for m in sil) == [2, 3]
    arts = {a.path for a in client.list_artifacts(children["fedlease"].info.run_id, "final_model")}
    assert "final_model/server_state.safetensors" in arts and "final_model/README.md" in arts
    parent_arts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"allocation", "data", "warmup_adapters", "results"} <= parent_arts
    mv = client.get_model_version_by_alias("fl-test", "current")
    assert mv.run_id == children["fedlease"].info.run_id

    # an MLflow Model: pyfunc with a signature, loads and answers per client; served on 127.0.0.1
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/fl-test@current")
    assert [c.name for c in model.metadata.signature.inputs] == ["client", "text", "text_pair"]
    rows = pd.DataFrame({"client": [0, 2], "text": ["the film was great and lovely overall", "we talked about the cat"],
                         "text_pair": ["", "is it about an animal?"]})
    answers = list(model.predict(rows))
    assert answers[0] in ("0", "1") and answers[1] in ("animal", "city", "none")
    assert list(model.predict(rows[["client", "text"]].iloc[:1])) == answers[:1], "text_pair is optional"
    _serve_and_ask(uri, "models:/fl-test@current", rows, answers, tmp_path)

    # a re-run continues the same parent run instead of creating another
    run_all(cfg)
    assert len([r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("fedlease.kind") == "pipeline"]) == 1

    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    # no --model-uri: the params' registered model (fl-test) at its alias
    res = subprocess.run([sys.executable, "-m", "fedlease.cli", "predict", "--params", str(params),
                          "--client", "0", "the film was great and lovely overall"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-1500:]
    assert res.stdout.startswith("client 0: ") and res.stdout.split("\t")[0].split(": ")[1] in ("0", "1")
    rep = subprocess.run([sys.executable, "-m", "fedlease.cli", "report", "--params", str(params)],
                         capture_output=True, text=True, cwd=REPO)
    assert rep.returncode == 0, rep.stderr[-1500:]
    assert "| fedlease |" in rep.stdout and "| fedit |" in rep.stdout and "sentiment" in rep.stdout
    # read back from MLflow: the floor, the protocol and the code version, and FedLEASE's time with its warm-up
    assert "| majority class (floor) |" in rep.stdout and "protocol: equal_compute; code: commit " in rep.stdout
    metrics = read_json(RunPaths.of(cfg).metrics)
    fl_row = next(line for line in rep.stdout.splitlines() if line.startswith("| fedlease |"))
    with_warmup = metrics["methods"]["fedlease"]["wall_seconds"] + metrics["allocation"]["warmup_seconds"]
    assert fl_row.endswith(f"| {with_warmup:.0f} |"), fl_row

    # other params in the same output_dir (a DVC experiment): a new parent run, no mixed params
    other = config_from_dict({**raw, "lora": {**raw["lora"], "alpha": 8}})
    from fedlease.tracking import Tracker

    new_parent = Tracker(other).parent_run_id()
    assert new_parent != parents[0].info.run_id
    assert client.get_run(new_parent).data.params["lora.alpha"] == "8.0"


def _serve_and_ask(uri: str, model_uri: str, rows, expected: list[str], tmp_path: Path) -> None:
    """`mlflow models serve` (this environment) on a free 127.0.0.1 port answers /invocations as the
    loaded model does."""
    import json
    import os
    from fedlease.ranks import free_port
    import time
    import urllib.request

    port = free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"),
                              start_new_session=True)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(1)
        body = json.dumps({"dataframe_split": rows.to_dict(orient="split")}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert json.loads(resp.read())["predictions"] == expected
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_unreachable_tracking_server_fails_fast_naming_the_uri(tmp_path: Path):
    raw = tiny_params(tmp_path)
    raw["tracking"] = {"enabled": True, "uri": "http://127.0.0.1:9", "connect_timeout_s": 2}
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "fedlease.cli", "data", "--params", str(params)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1
    assert "http://127.0.0.1:9" in res.stderr and "Traceback" not in res.stderr
    assert not (Path(raw["output_dir"]) / "data").exists(), "no stage output when tracking is unreachable"


def test_a_failing_stage_leaves_no_run_running(tmp_path: Path):
    """Every client fails in federate: the round fails, and the pipeline and strategy runs are FAILED,
    not RUNNING forever."""
    from mlflow.tracking import MlflowClient

    from fedlease.server import RoundFailed

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = tiny_params(tmp_path, strategies=["fedit"])
    raw["tracking"] = {"enabled": True, "uri": uri, "experiment": "f"}
    raw["faults"] = {"client_failure_rate": 1.0}
    raw["orchestration"] = {"retries": 0}
    with pytest.raises(RoundFailed):
        run_all(config_from_dict(raw))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("f").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}


def test_one_store_rule(tmp_path: Path, monkeypatch):
    """tracking.uri, else $MLFLOW_TRACKING_URI, else in the project the stack's server when it answers and
    its SQLite store when it does not, else ./mlflow.db."""
    import http.server
    from fedlease.ranks import free_port
    import threading

    from fedlease.tracking import tracking_uri

    cfg = config_from_dict(tiny_params(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FEDLEASE_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "infra").mkdir()
    (tmp_path / "infra" / "stack.sh").write_text("#!/bin/sh\n")
    port = free_port()
    monkeypatch.setenv("MLFLOW_PORT", str(port))
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'infra' / 'state' / 'mlflow.db'}", "stack down: its store"

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert tracking_uri(cfg) == f"http://127.0.0.1:{port}", "stack up: its server"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team.example:5000")
        assert tracking_uri(cfg) == "http://team.example:5000"
        other = config_from_dict({**tiny_params(tmp_path), "tracking": {"uri": "sqlite:///x.db"}})
        assert tracking_uri(other) == "sqlite:///x.db"
    finally:
        server.shutdown()
