"""No secret from the environment lands in logs, params, metrics or artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedlease.config import config_from_dict
from fedlease.pipeline import run_all

from ..conftest import tiny_params

pytestmark = pytest.mark.slow
TOKEN = "hf_PLANTEDsecret0123456789abcdef"


def test_planted_token_never_written(tmp_path: Path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TOKEN)
    raw = tiny_params(tmp_path, strategies=["fedlease"])
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "s"}
    run_all(config_from_dict(raw))
    out, err = capfd.readouterr()
    assert TOKEN not in out and TOKEN not in err
    hits = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not hits, f"secret written to {hits}"
    assert os.environ["HF_TOKEN"] == TOKEN
