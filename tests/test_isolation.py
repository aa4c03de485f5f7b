"""`orchestration.fresh_process`: each client call in its own process, errors and timeouts brought back."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlease.client import client_train
from fedlease.exchange import write_download
from fedlease.runtime import runtime_for
from fedlease.config import config_from_dict
from fedlease.data.stage import run_data_stage
from fedlease.io import load_tensors
from fedlease.isolation import ClientProcessDied, run_client_call, run_in_fresh_process
from fedlease.server import sequential_mapper
from fedlease.strategies import make_strategy
from fedlease.strategies.base import InitContext, ModelSpec

from .conftest import tiny_params


# Client functions the spawned children import from this module by name.
def _pid(cfg: Any, client_id: int) -> dict[str, Any]:
    return {"client_id": client_id, "pid": os.getpid()}


def _fail(cfg: Any, client_id: int) -> dict[str, Any]:
    raise ValueError(f"client {client_id}: label file unreadable")


def _hang(cfg: Any, client_id: int) -> dict[str, Any]:
    time.sleep(300)
    return {}


def _die(cfg: Any, client_id: int) -> dict[str, Any]:
    os._exit(3)  # a hard crash: no exception, no result


def _cfg(tmp_path: Path, fresh: bool, **over: Any):
    return config_from_dict(tiny_params(tmp_path, orchestration__fresh_process=fresh,
                                        orchestration__retries=0, **over))


def test_each_client_call_runs_in_its_own_process_only_when_asked(tmp_path: Path):
    from flows.fedlease_flow import client_task

    fresh = _cfg(tmp_path, True)
    out = sequential_mapper(_pid, [{"cfg": fresh, "client_id": c} for c in range(2)], "t")
    pids = [r["pid"] for r in out]
    assert os.getpid() not in pids and len(set(pids)) == 2
    assert client_task.fn(_pid, {"cfg": fresh, "client_id": 0})["pid"] != os.getpid()  # the Prefect path
    same = _cfg(tmp_path, False)
    assert [r["pid"] for r in sequential_mapper(_pid, [{"cfg": same, "client_id": 0}], "t")] == [os.getpid()]


def test_a_client_process_error_timeout_or_crash_comes_back_as_an_exception(tmp_path: Path):
    cfg = _cfg(tmp_path, True)
    [err] = sequential_mapper(_fail, [{"cfg": cfg, "client_id": 5}], "t")
    assert isinstance(err, ValueError) and "client 5: label file unreadable" in str(err)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"client 2: no result after 1 s \(orchestration.task_timeout_s\)"):
        run_in_fresh_process(_hang, {"cfg": cfg, "client_id": 2}, timeout_s=1.0)
    assert time.monotonic() - t0 < 120, "the hung process must be killed, not waited for"
    with pytest.raises(ClientProcessDied, match="client 4: its process ended \\(exit code 3\\)"):
        run_client_call(_die, {"cfg": cfg, "client_id": 4})


@pytest.mark.slow
def test_client_round_in_a_fresh_process_equals_the_in_process_one(tmp_path: Path):
    """The real client path (DeepSpeed engine) after this process has run DeepSpeed itself: the
    child must not reuse the parent's rendezvous port, and must train bit-identically."""
    cfg = _cfg(tmp_path, False, strategies=["fedit"], training__engine="deepspeed")
    run_data_stage(cfg)
    strategy = make_strategy("fedit", cfg, 4)
    state = strategy.init_state(InitContext(runtime_for(cfg).common_init(ModelSpec(r=cfg.lora.r))))
    down = tmp_path / "down.safetensors"
    write_download(down, strategy.download(state, 1))
    call = {"cfg": cfg, "strategy_name": "fedit", "client_id": 1, "round_": 1, "download_path": str(down),
            "upload_path": str(tmp_path / "up_here.safetensors"), "num_clients": 4}
    here = run_client_call(client_train, call)
    fresh_cfg = _cfg(tmp_path, True, strategies=["fedit"], training__engine="deepspeed")
    there = run_client_call(client_train, {**call, "cfg": fresh_cfg,
                                           "upload_path": str(tmp_path / "up_there.safetensors")})
    assert there.steps == here.steps > 0 and there.loss == here.loss
    a, b = load_tensors(Path(here.upload)), load_tensors(Path(there.upload))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _start_sleeper_then_die(pid_file: str) -> dict:
    """(In a spawned process.) Starts a client process that sleeps, writes its pid, then dies abruptly."""
    import os as _os

    from fedlease.isolation import start_process

    started = start_process(_sleep_and_report, {"pid_file": pid_file}, "sleeper")
    deadline = time.monotonic() + 60
    while not Path(pid_file).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    _os._exit(9)  # no cleanup: as a process killed by its orchestrator
    return {"never": started}


def _sleep_and_report(pid_file: str) -> dict:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(300)
    return {}


def test_a_client_process_dies_with_the_process_that_started_it(tmp_path: Path):
    """A silo's flow run cancelled (killed) while its client call or rank group runs: the client processes
    must not live on holding memory or a GPU."""
    from fedlease.isolation import ClientProcessDied, await_processes, start_process

    pid_file = tmp_path / "sleeper.pid"
    with pytest.raises(ClientProcessDied):
        await_processes([start_process(_start_sleeper_then_die, {"pid_file": str(pid_file)}, "parent", daemon=False)],
                        120)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the orphaned client process is still running"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
