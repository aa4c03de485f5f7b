"""A whole silo-mode federation on one machine, each part its own process and folder: a Prefect server
on 127.0.0.1, one worker per silo (its own working directory and silo config), and the coordinator's
flow. For the silo-mode tests and `benchmarks/silo_equivalence.py`; a real federation runs the same
commands on separate machines (README: "Run across organisations").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from fedlease.ranks import free_port

REPO = Path(__file__).resolve().parents[1]


class LocalFederation:
    """Start with the silos' names; `add_silo` writes a silo's config, `start_worker` starts its worker,
    `run_coordinator` runs the flow on a params dict; `close` stops everything."""

    def __init__(self, root: Path, silos: list[str], startup_s: int = 120) -> None:
        self.root = root
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.env = {**os.environ, "PREFECT_API_URL": self.api, "PREFECT_HOME": str(root / "prefect"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
                    "PREFECT_UI_ENABLED": "false", "PYTHONPATH": str(REPO)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], root)
        for _ in range(startup_s):
            try:
                urllib.request.urlopen(self.api + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            self.close()
            raise RuntimeError(f"the Prefect server did not answer at {self.api} in {startup_s} s")
        reg = subprocess.run([sys.executable, "-m", "flows.silo_flow", "register", *silos], cwd=REPO, env=self.env,
                             capture_output=True, text=True, timeout=300)
        if reg.returncode != 0:
            self.close()
            raise RuntimeError(f"registering the silos failed: {reg.stderr[-2000:]}")

    def _start(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.procs[name] = subprocess.Popen(cmd, cwd=cwd, env=env or self.env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def silo_home(self, silo: str) -> Path:
        return self.root / "silos" / silo

    def add_silo(self, silo: str, clients: dict[str, dict[str, Any]]) -> Path:
        """Write the silo's own config (its work folder under its home, its clients' file specs)."""
        home = self.silo_home(silo)
        home.mkdir(parents=True, exist_ok=True)
        config = home / "silo.yaml"
        config.write_text(yaml.safe_dump({"name": silo, "workdir": str(home / "work"), "clients": clients}))
        return config

    def start_worker(self, silo: str) -> None:
        home = self.silo_home(silo)
        env = {**self.env, "FEDLEASE_HOME": str(REPO), "FEDLEASE_SILO_CONFIG": str(home / "silo.yaml")}
        self._start(f"worker-{silo}", [sys.executable, "-m", "prefect", "worker", "start", "--pool", f"silo-{silo}",
                                       "--type", "process", "--name", f"worker-{silo}"], home, env)

    def run_coordinator(self, params: dict[str, Any], timeout_s: int = 3600) -> subprocess.CompletedProcess[str]:
        """The coordinator's flow in its own process and folder; its output is appended to logs/."""
        coord = self.root / "coordinator"
        coord.mkdir(parents=True, exist_ok=True)
        (coord / "params.yaml").write_text(yaml.safe_dump(params))
        run = subprocess.run([sys.executable, "-c", "from flows.fedlease_flow import fedlease_flow; "
                              "fedlease_flow('params.yaml')"], cwd=coord, env=self.env, capture_output=True,
                             text=True, timeout=timeout_s)
        with (self.root / "logs" / "coordinator.log").open("a") as log:
            log.write(run.stdout + run.stderr)
        return run

    def stop(self, name: str, hard: bool = False) -> None:
        """Stop a process and its group: SIGTERM (a graceful Prefect worker can still submit a run it has
        just picked up while it shuts down), or with `hard` SIGKILL at once, as a machine that goes down."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):  # already ended
            os.killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every process at once: SIGTERM, a shared grace period, then SIGKILL."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):  # already ended
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self.procs.clear()
