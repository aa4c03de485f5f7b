"""Client faults: failures and NaN updates are dropped, aggregation runs over the survivors only,
too few survivors fail the round with the last checkpoint intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlease.aggregation import weighted_mean
from fedlease.client import client_evaluate, client_train
from fedlease.config import config_from_dict
from fedlease.data.stage import run_data_stage
from fedlease.io import load_tensors
from fedlease.paths import RunPaths
from fedlease.runtime import runtime_for
from fedlease.server import Checkpoint, Clients, RoundFailed, run_rounds, sequential_mapper
from fedlease.strategies.base import InitContext, ModelSpec, select
from fedlease.strategies.fedit import FedIT

from ..conftest import tiny_params


class _FedITNoEval(FedIT):
    """FedIT whose rounds are not evaluated (these tests look at training rounds only)."""

    def evaluates(self) -> bool:
        return False


def _rounds(cfg, common, rounds: int, mapper=sequential_mapper, num_clients: int = 4):
    """`rounds` rounds of FedIT in the run's federate/fedit folder (the paper's protocol: no extra rounds)."""
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": rounds,
                                                                                 "protocol": "paper"})})
    strategy = _FedITNoEval(cfg, num_clients)
    return run_rounds(cfg, strategy, lambda: strategy.init_state(InitContext(common)),
                      Clients(client_train, client_evaluate, mapper))


def _checkpoint(cfg) -> Checkpoint:
    return Checkpoint(RunPaths.of(cfg).strategy_dir("fedit") / "checkpoint")


def _setup(tmp_path: Path, **faults):
    raw = tiny_params(tmp_path, strategies=["fedit"])
    raw["faults"] = faults
    raw["orchestration"] = {"retries": 1, "retry_delay_s": 0}
    cfg = config_from_dict(raw)
    run_data_stage(cfg)
    common = runtime_for(cfg).common_init(ModelSpec(r=cfg.lora.r))
    return cfg, common


def test_failed_and_nan_clients_are_dropped_and_survivors_aggregated(tmp_path: Path):
    raw = tiny_params(tmp_path, strategies=["fedit"])
    raw["data"]["partition"]["clients_per_task"] = 3  # 6 clients: 0, 3, 5 survive
    raw["orchestration"] = {"retries": 1, "retry_delay_s": 0}
    cfg = config_from_dict(raw)
    run_data_stage(cfg)
    common = runtime_for(cfg).common_init(ModelSpec(r=cfg.lora.r))
    seen: dict[int, dict[str, torch.Tensor]] = {}
    calls_per_client: dict[int, int] = {}

    def faulty(fn, calls, label):
        def wrapped(**call):
            cid = call["client_id"]
            calls_per_client[cid] = calls_per_client.get(cid, 0) + 1
            if cid == 1:
                raise RuntimeError("disk on fire")
            res = fn(**call)
            if cid in (2, 4):  # a poisoned update; a wrong-shaped one
                from fedlease.exchange import write_upload  # what such a client sends: a whole, signed file

                t = load_tensors(res.upload)
                key = sorted(t)[0]
                t[key] = torch.full_like(t[key], float("nan")) if cid == 2 else torch.zeros(t[key].shape[0] + 1,
                                                                                            *t[key].shape[1:])
                write_upload(res.upload, t)
            seen[cid] = load_tensors(res.upload)
            return res

        return sequential_mapper(wrapped, calls, label)

    out = _rounds(cfg, common, 1, faulty, num_clients=6)
    rec = out.history[0]
    assert set(rec.dropped) == {"1", "2", "4"}
    assert "disk on fire" in rec.dropped["1"] and "NaN" in rec.dropped["2"] and "shapes" in rec.dropped["4"]
    assert sorted(rec.bytes_up) == ["0", "3", "5"], "only the aggregated clients count as reported"
    assert calls_per_client[1] == 2, "a failing client is retried before it is dropped"
    expected = weighted_mean([select(seen[c], "lora.") for c in (0, 3, 5)], [16.0, 16.0, 16.0])
    for key, value in expected.items():
        assert torch.allclose(out.state.tensors[key], value)


def test_too_few_clients_fail_the_round_and_keep_the_checkpoint(tmp_path: Path):
    cfg, common = _setup(tmp_path)
    _rounds(cfg, common, 1)
    ckpt = _checkpoint(cfg)
    before = ckpt.load()
    assert before is not None and before[1]["round"] == 1
    broken = cfg.model_copy(update={"faults": cfg.faults.model_copy(update={"client_failure_rate": 1.0})})
    with pytest.raises(RoundFailed, match="only 0 of 4"):
        _rounds(broken, common, 2)
    after = ckpt.load()
    assert after is not None and after[1]["round"] == 1
    for key in before[0].tensors:
        assert torch.equal(before[0].tensors[key], after[0].tensors[key])


def test_injected_failure_rate_drops_some_clients(tmp_path: Path):
    cfg, common = _setup(tmp_path, client_failure_rate=0.5)
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"min_clients_fraction": 0.25})})
    out = _rounds(cfg, common, 2)
    dropped = [c for r in out.history for c in r.dropped]
    assert dropped, "a 50% failure rate over 8 client-rounds dropped nobody"
    assert all("injected failure" in r.dropped[c] for r in out.history for c in r.dropped)


def test_unwritable_output_path_is_a_clear_error(tmp_path: Path):
    import subprocess
    import sys

    import yaml

    from ..conftest import REPO

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    raw = tiny_params(tmp_path)
    raw["output_dir"] = str(blocker / "outputs")
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "fedlease.cli", "data", "--params", str(params)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert str(blocker / "outputs") in res.stderr and "cannot write" in res.stderr


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch):
    cfg, common = _setup(tmp_path)
    _rounds(cfg, common, 1)
    import fedlease.server as server
    from fedlease.io import ArtifactError

    def full_disk(*args, **kwargs):
        raise ArtifactError("state: cannot write (No space left on device)")

    monkeypatch.setattr(server, "save_tensors", full_disk)
    with pytest.raises(ArtifactError, match="No space left"):
        _rounds(cfg, common, 2)
    loaded = _checkpoint(cfg).load()
    assert loaded is not None and loaded[1]["round"] == 1


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path: Path):
    """Two concurrent runs sharing output_dir: the second fails at once naming the folder and the holder;
    the first one's files are untouched; with the holder gone, the folder is free again."""
    import subprocess
    import sys
    import time

    from fedlease.pipeline import run_all
    from fedlease.runlock import RunLocked

    from ..conftest import REPO

    cfg = config_from_dict(tiny_params(tmp_path, strategies=["fedit"], federation__rounds=1))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fedlease.runlock import run_lock\n"
                               f"with run_lock({cfg.output_dir!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (Path(cfg.output_dir) / "first.txt").write_text("the first run's work")
        t0 = time.perf_counter()
        in_use = rf"output_dir {cfg.output_dir}: in use by another run \(pid {holder.pid}\)"
        with pytest.raises(RunLocked, match=in_use):
            run_all(cfg)
        assert time.perf_counter() - t0 < 10, "refused at once, not after waiting"
        assert (Path(cfg.output_dir) / "first.txt").read_text() == "the first run's work"
        assert not (Path(cfg.output_dir) / "data").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_all(cfg)["methods"]["fedit"]["rounds"] >= 1
    # another thread of the same process is refused too; the owning thread may take it again
    import threading

    from fedlease.runlock import run_lock

    refused: list[BaseException] = []
    with run_lock(cfg.output_dir), run_lock(cfg.output_dir):
        worker = threading.Thread(target=lambda: _try_lock(cfg.output_dir, refused))
        worker.start()
        worker.join()
    assert refused and "in use by another run in this process" in str(refused[0])


def _try_lock(folder: str, errors: list[BaseException]) -> None:
    from fedlease.runlock import run_lock

    try:
        with run_lock(folder):
            pass
    except BaseException as exc:  # noqa: BLE001 - collected for the assertion
        errors.append(exc)
