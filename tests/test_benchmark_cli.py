"""`benchmarks/quality.py` on a task mix and seeds of the caller's choosing (tiny fixtures): the table,
mean +- std over seeds, the label-skew table, and the two last lines a reader greps."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, tiny_params

pytestmark = pytest.mark.slow


def test_quality_benchmark_takes_params_seeds_and_overrides(tmp_path: Path):
    params = tmp_path / "mix.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tmp_path, strategies=["fedlease", "local", "fedit"])))
    out = tmp_path / "quality.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--params", str(params), "--seeds", "0,1",
         "--set", "federation.rounds=1", "--label-skew", "--runs", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-2:]
    assert re.fullmatch(r"ari: -?\d+\.\d{3}", last[0]) and re.fullmatch(r"fedlease_margin: -?\d+\.\d{2}", last[1])
    text = out.read_text()
    # both seeds ran in their own folders under --runs, with the override applied
    for setting in ("task", "label_skew"):
        for seed in (0, 1):
            metrics = json.loads((tmp_path / "runs" / setting / f"seed{seed}" / "metrics.json").read_text())
            assert {m["rounds"] for m in metrics["methods"].values()} == {1}
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"fedlease", "local", "fedit"} <= set(rows)
    assert "±" in rows["fedlease"]  # mean ± std over the two seeds
    assert "## Task + label heterogeneity" in text and "seeds [0, 1]" in text
