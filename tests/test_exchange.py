"""The exchange store: whole files with a manifest written last, sha256 checked on read, clear errors
naming the client when an upload is missing, late or corrupt; an S3-compatible store (moto's server on
127.0.0.1) gives the same run as the local folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlease.config import ExchangeConfig, config_from_dict
from fedlease.exchange import (ExchangeError, read_download, remove_round, validate_upload, write_download,
                               write_upload)
from fedlease.pipeline import run_all
from fedlease.ranks import free_port
from fedlease.records import ClientTrainResult
from fedlease.server import collect_updates
from fedlease.strategies.base import Download

from .conftest import tiny_params


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.lora_A": torch.randn(2, 4, generator=g), "layer.lora_B": torch.randn(4, 2, generator=g)}


def _result(cid: int, upload: str) -> ClientTrainResult:
    return ClientTrainResult(client_id=cid, upload=upload, num_examples=10, loss=1.0, steps=1, bytes_up=0,
                             bytes_down=0, train_seconds=0.0, setup_seconds=0.0, seconds=0.0, group=0)


def test_round_trip_and_every_failure_names_the_client(tmp_path: Path):
    up = tmp_path / "up_003.safetensors"
    write_upload(up, _tensors(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["up_003.safetensors", "up_003.safetensors.sha256"]
    got = validate_upload(up, who="client 3")
    assert all(torch.equal(got[k], v) for k, v in _tensors(0).items())
    down = tmp_path / "down_003.safetensors"
    write_download(down, Download(_tensors(1), {"round": 2, "expert": [0, 1]}))
    assert read_download(down, who="client 3").meta == {"round": 2, "expert": [0, 1]}

    payload = bytearray(up.read_bytes())
    payload[-1] ^= 0xFF  # one flipped bit in a tensor: still a valid safetensors file, but not what was sent
    up.write_bytes(bytes(payload))
    with pytest.raises(ExchangeError, match=r"client 3: upload: .*up_003.safetensors is corrupt: sha256"):
        validate_upload(up, who="client 3")
    (tmp_path / "up_003.safetensors.sha256").unlink()  # a file without its manifest was never finished
    with pytest.raises(ExchangeError, match=r"client 3: upload: .*up_003.safetensors missing \(no manifest\)"):
        validate_upload(up, who="client 3")
    with pytest.raises(ExchangeError, match=r"client 3: upload: .* late \(no manifest after waiting 0.2 s\)"):
        validate_upload(up, ExchangeConfig(wait_s=0.2, poll_s=0.05), who="client 3")
    for bad in ("not json", "[1, 2]"):
        (tmp_path / "up_003.safetensors.sha256").write_text(bad)
        with pytest.raises(ExchangeError, match="is not a manifest"):
            validate_upload(up, who="client 3")


def test_a_reader_waits_for_an_upload_that_arrives_late(tmp_path: Path):
    import threading

    up = tmp_path / "up_000.safetensors"
    writer = threading.Timer(0.3, write_upload, args=(up, _tensors(5)))
    writer.start()
    got = validate_upload(up, ExchangeConfig(wait_s=10.0, poll_s=0.05), who="client 0")
    writer.join()
    assert all(torch.equal(got[k], v) for k, v in _tensors(5).items())
    write_upload(up, _tensors(6))  # a rewrite (a retried call) replaces file and manifest together
    assert torch.equal(validate_upload(up)["layer.lora_B"], _tensors(6)["layer.lora_B"])


def test_a_corrupt_or_missing_upload_drops_that_client_with_the_reason(tmp_path: Path):
    for cid in range(3):
        write_upload(tmp_path / f"up_{cid}.safetensors", _tensors(cid))
    (tmp_path / "up_1.safetensors").write_bytes(b"x" * 40)  # replaced after its manifest was written
    (tmp_path / "up_2.safetensors.sha256").unlink()
    results: list[Any] = [_result(cid, str(tmp_path / f"up_{cid}.safetensors")) for cid in range(3)]
    updates, _, dropped = collect_updates([0, 1, 2], results)
    assert [u.client_id for u in updates] == [0]
    assert "client 1: upload" in dropped[1] and "is corrupt: sha256" in dropped[1]
    assert "client 2: upload" in dropped[2] and "safetensors missing (no manifest)" in dropped[2]


@pytest.fixture
def s3_store(monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's S3 server on 127.0.0.1, credentials and endpoint from the environment as a user would set."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("fedlease-exchange")
    yield fs
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def _scores(output_dir: Path) -> dict[str, Any]:
    """Every method's per-round loss, uploads' sizes and per-client scores: what a change of store must
    not change."""
    out = {}
    for result in sorted((output_dir / "federate").glob("*/result.json")):
        history = json.loads(result.read_text())["history"]
        out[result.parent.name] = [(r["round"], r["loss"], r["bytes_up"], r["dropped"],
                                    {c: v["accuracy"] for c, v in (r.get("eval") or {}).get("clients", {}).items()})
                                   for r in history]
    return out


@pytest.mark.slow
def test_an_s3_store_gives_the_same_run_and_only_tensors_travel(tmp_path: Path, s3_store: Any):
    base = tiny_params(tmp_path / "local", strategies=["fedlease", "fedit"])
    run_all(config_from_dict(base))
    raw = tiny_params(tmp_path / "s3", strategies=["fedlease", "fedit"])
    raw["federation"]["exchange"] = {"url": "s3://fedlease-exchange/runs", "keep_rounds": True}
    run_all(config_from_dict(raw))
    local_scores = _scores(tmp_path / "local" / "outputs")
    assert set(local_scores) == {"fedlease", "fedit"}
    assert _scores(tmp_path / "s3" / "outputs") == local_scores

    files = s3_store.find("fedlease-exchange/runs")
    tensors = [f for f in files if f.endswith(".safetensors")]
    assert {Path(f).name.split("_")[0] for f in tensors} == {"down", "up", "eval"}
    assert {f + ".sha256" for f in tensors} == {f for f in files if f.endswith(".sha256")}
    assert not list((tmp_path / "s3" / "outputs" / "federate").glob("*/rounds/**/*.safetensors"))
    # no raw text of any client's data in the store (the fixture sentences and labels)
    texts = [ex["text"] for p in (tmp_path / "s3" / "outputs" / "data" / "clients").glob("*.json")
             for ex in json.loads(p.read_text())["train"]]
    blob = b"".join(s3_store.cat_file(f) for f in files)
    assert texts and not any(t.encode() in blob for t in texts)
    assert b"the film was" not in blob and b"we talked about" not in blob

    # an upload altered in the bucket is caught on read, naming the client
    up = next(f for f in tensors if Path(f).name == "up_001.safetensors")
    s3_store.pipe_file(up, b"\0" * 16 + s3_store.cat_file(up)[16:])
    exchange = ExchangeConfig(url="s3://fedlease-exchange/runs")
    with pytest.raises(ExchangeError, match=r"client 1: upload: s3://.*up_001.safetensors is corrupt"):
        validate_upload(f"s3://{up}", exchange, who="client 1")
    # a finished round's files are removed from the bucket unless keep_rounds
    round_dir = str(Path(up).parent)
    remove_round(f"s3://{round_dir}", ExchangeConfig(url="s3://fedlease-exchange/runs", keep_rounds=True))
    assert s3_store.find(round_dir)
    remove_round(f"s3://{round_dir}", exchange)
    s3_store.invalidate_cache()
    assert not s3_store.find(round_dir)
