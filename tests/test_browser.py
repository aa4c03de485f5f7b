"""The MLflow UI in a real headless Chromium: the runs and a metric are on the experiment page.

Needs Debian's chromium (`make test` installs it when run as root); the screenshot is kept
under test-artifacts/.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedlease.config import config_from_dict
from fedlease.pipeline import run_all

from .conftest import REPO, tiny_params

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_mlflow_ui_shows_runs_and_metrics(tmp_path: Path):
    db = tmp_path / "mlflow.db"
    raw = tiny_params(tmp_path, strategies=["fedlease", "fedit"])
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{db}", "experiment": "browser"}
    run_all(config_from_dict(raw))
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(base)
        exp = client.get_experiment_by_name("browser")
        child = client.search_runs([exp.experiment_id], "tags.`fedlease.strategy` = 'fedlease'")[0]
        profile = tmp_path / "chrome-profile"
        shot_dir = REPO / "test-artifacts"
        shot_dir.mkdir(exist_ok=True)
        common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                  "--window-size=1600,1000"]

        def page(url: str, shot: str) -> str:
            subprocess.run([*common, f"--screenshot={shot_dir / shot}", url], capture_output=True, timeout=180)
            return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout

        runs = page(f"{base}/#/experiments/{exp.experiment_id}/runs", "mlflow_runs.png")
        assert "pipeline-seed0" in runs, "the parent run is not on the experiment's runs page"
        assert re.search(r"3(\s|<[^>]*>|<!--[^>]*-->)*matching runs", runs), "parent + two nested method runs expected"
        run_page = page(f"{base}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}", "mlflow_run.png")
        assert "fedlease" in run_page and "mean_accuracy" in run_page, "the method run's metric is not shown"
        assert (shot_dir / "mlflow_runs.png").stat().st_size > 10_000
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
