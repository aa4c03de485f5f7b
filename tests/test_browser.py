"""The UIs in a real headless Chromium: MLflow's experiment page, a method run, and the compare view of
two runs whose params differ; Prefect's flow-run page and the results artifact it links to.

Needs Debian's chromium (`make test` installs it when run as root); the screenshots are kept
under test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fedlease.config import config_from_dict
from fedlease.pipeline import run_all
from fedlease.ranks import free_port

from .conftest import REPO, tiny_params

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _wait_for(url: str, seconds: int = 120) -> None:
    for _ in range(seconds):
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def _page(url: str, shot: str, profile: Path) -> str:
    """Screenshot a page into test-artifacts/ and return its rendered DOM."""
    shot_dir = REPO / "test-artifacts"
    shot_dir.mkdir(exist_ok=True)
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--window-size=1600,1200"]
    subprocess.run([*common, f"--screenshot={shot_dir / shot}", url], capture_output=True, timeout=180)
    assert (shot_dir / shot).stat().st_size > 10_000, f"{shot}: empty screenshot"
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


def _text(dom: str) -> str:
    """The page's visible text, one space between cells."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_mlflow_ui_shows_runs_metrics_and_the_compare_view(tmp_path: Path):
    db = tmp_path / "mlflow.db"
    for rank in (2, 3):  # two runs whose params differ in lora.r
        raw = tiny_params(tmp_path / f"r{rank}", strategies=["fedlease", "fedit"], lora__r=rank)
        raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{db}", "experiment": "browser"}
        run_all(config_from_dict(raw))
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(base + "/health")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(base)
        exp = client.get_experiment_by_name("browser")
        children = client.search_runs([exp.experiment_id], "tags.`fedlease.strategy` = 'fedlease'")
        assert len(children) == 2
        profile = tmp_path / "chrome-profile"
        runs = _page(f"{base}/#/experiments/{exp.experiment_id}/runs", "mlflow_runs.png", profile)
        assert "pipeline-seed0" in runs, "the parent run is not on the experiment's runs page"
        assert re.search(r"6(\s|<[^>]*>|<!--[^>]*-->)*matching runs", runs), "2 x (parent + two method runs) expected"
        child = children[0]
        run_page = _page(f"{base}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}", "mlflow_run.png",
                         profile)
        assert "fedlease" in run_page and "mean_accuracy" in run_page, "the method run's metric is not shown"

        ids = json.dumps([r.info.run_id for r in children], separators=(",", ":"))
        compare = _text(_page(f"{base}/#/compare-runs?runs={ids}&experiments=[\"{exp.experiment_id}\"]",
                              "mlflow_compare.png", profile))
        for run in children:  # both runs, by their descriptive names, side by side
            assert run.info.run_name in compare, f"{run.info.run_name} is not in the compare view"
        ranks = [run.data.params["lora.r"] for run in children]
        assert sorted(ranks) == ["2", "3"] and children[0].info.run_name != children[1].info.run_name
        assert f"lora.r {' '.join(ranks)}" in compare, "the differing param is not shown with both values"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_prefect_ui_shows_the_flow_run_and_its_results_artifact(tmp_path: Path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_UI_API_URL": api, "PREFECT_UI_ENABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait_for(api + "/health")
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(tiny_params(tmp_path, strategies=["fedlease", "local"])))
        flow = subprocess.run([sys.executable, "-c", "import sys; from flows.fedlease_flow import fedlease_flow; "
                               "fedlease_flow(sys.argv[1], rounds=1)", str(params)],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert flow.returncode == 0, flow.stderr[-3000:]

        def post(path: str, body: dict) -> list[dict]:
            req = urllib.request.Request(api + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=30).read())

        (flow_run,) = post("/flow_runs/filter", {"flow_runs": {"name": {"any_": ["params-rounds=1"]}}})
        (artifact,) = post("/artifacts/filter", {"artifacts": {"key": {"any_": ["fedlease-results"]}}})
        assert artifact["flow_run_id"] == flow_run["id"]
        profile = tmp_path / "chrome-profile"
        ui = f"http://127.0.0.1:{port}"
        run_page = _text(_page(f"{ui}/runs/flow-run/{flow_run['id']}", "prefect_flow_run.png", profile))
        assert "params-rounds=1" in run_page and "Completed" in run_page and "Artifacts" in run_page
        art_page = _page(f"{ui}/artifacts/artifact/{artifact['id']}", "prefect_results_artifact.png", profile)
        assert "<table" in art_page, "the results artifact is not rendered as a table"
        text = _text(art_page)
        for row in ("fedlease", "local", "majority class (floor)"):
            assert re.search(rf"{re.escape(row)} \d+\.\d\d", text), f"results row {row!r} is not shown"
        assert "params-rounds=1" in text, "the artifact page does not name its flow run"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
