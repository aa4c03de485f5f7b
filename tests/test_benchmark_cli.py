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
         "--set", "federation.rounds=1", "--set", "data.partition.min_test_per_client=2", "--label-skew", "--runs", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-3:]
    assert re.fullmatch(r"ari: -?\d+\.\d{3}", last[0])
    for line, name in zip(last[1:], ("fedlease_margin", "skew_margin"), strict=True):
        assert re.fullmatch(name + r": -?\d+\.\d{2} \(protocol equal_compute, mean over 2 seed\(s\)\)", line), line
    text = out.read_text()
    # both seeds ran in their own folders under --runs, with the override applied: one round, and fedit
    # one more (the warm-up's epoch, equal compute); the printed margin is the one of those metrics
    margins = {}
    for setting in ("task", "label_skew_a0.5"):
        means = []
        for seed in (0, 1):
            metrics = json.loads((tmp_path / "runs" / setting / f"seed{seed}" / "metrics.json").read_text())
            assert {n: m["rounds"] for n, m in metrics["methods"].items()} == {"fedlease": 1, "local": 1, "fedit": 2}
            means.append({n: m["mean"] for n, m in metrics["methods"].items()})
        avg = {n: sum(m[n] for m in means) / 2 for n in means[0]}
        margins[setting] = 100 * (avg["fedlease"] - max(avg["local"], avg["fedit"]))
    assert float(last[1].split()[1]) == pytest.approx(margins["task"], abs=0.006)
    assert float(last[2].split()[1]) == pytest.approx(margins["label_skew_a0.5"], abs=0.006)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"fedlease", "local", "fedit"} <= set(rows)
    assert "±" in rows["fedlease"]  # mean ± std over the two seeds
    assert "## Task + label heterogeneity" in text and "seeds [0, 1]" in text
    assert "majority class (floor)" in rows and "Protocol: equal compute" in text and "code: commit" in text
    assert "label-balanced test sets" in text
