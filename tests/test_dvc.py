"""`dvc repro` on the tiny config in a scratch copy of the repo: builds, then has nothing to do."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlease.config import config_from_dict

from .conftest import REPO, tiny_generation_params, tiny_params

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(cwd / ".dvc-site")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_dvc_repro_twice_and_param_change(tmp_path: Path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "fedlease", ".dvcignore", ".gitignore", "params_glue.yaml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    raw = tiny_params(tmp_path, strategies=["fedlease", "fedit"])
    raw["output_dir"] = "outputs"
    # like the repo's params.yaml, the file holds every key (DVC checks each declared param exists)
    (work / "params.yaml").write_text(yaml.safe_dump(config_from_dict(raw).model_dump(mode="json")))
    nlg_profile = tiny_generation_params(tmp_path / "nlg", strategies=["fedit"], federation__rounds=1)
    # every section the shipped NLG profile sets (DVC refuses a declared section the file lacks)
    shipped = yaml.safe_load((REPO / "params_nlg.yaml").read_text())
    nlg_profile.update({k: v for k, v in shipped.items() if k not in nlg_profile})
    (work / "params_nlg.yaml").write_text(yaml.safe_dump(nlg_profile))
    with (work / ".gitignore").open("a") as f:
        f.write("/.dvc-site/\n")
    assert _run(["git", "init", "-q"], work).returncode == 0
    init = _run([sys.executable, "-m", "dvc", "init", "-q"], work)
    assert init.returncode == 0, init.stderr
    _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], work)

    first = _run([sys.executable, "-m", "dvc", "repro"], work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (work / "outputs" / "metrics.json").exists() and (work / "dvc.lock").exists()
    second = _run([sys.executable, "-m", "dvc", "repro"], work)
    assert second.returncode == 0
    assert "didn't change, skipping" in second.stdout and "Running stage" not in second.stdout
    status = _run([sys.executable, "-m", "dvc", "status"], work)
    assert "up to date" in status.stdout.lower(), status.stdout

    metrics = _run([sys.executable, "-m", "dvc", "metrics", "show"], work)
    assert metrics.returncode == 0 and "methods.fedlease.mean" in metrics.stdout
    plots = _run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots_html")], work)
    assert plots.returncode == 0, plots.stderr
    html = (tmp_path / "plots_html" / "index.html").read_text()
    assert "score_per_round" in html and "silhouette" in html
    assert {p.stem for p in (work / "outputs" / "plots" / "score_per_round").glob("*.json")} == {"fedlease", "fedit"}
    push = _run([sys.executable, "-m", "dvc", "push"], work)
    assert push.returncode == 0, push.stderr
    shutil.rmtree(work / "outputs" / "data")
    shutil.rmtree(work / ".dvc" / "cache")
    pull = _run([sys.executable, "-m", "dvc", "pull"], work)
    assert pull.returncode == 0, pull.stderr
    assert (work / "outputs" / "data" / "manifest.json").exists()

    raw["federation"]["rounds"] = 1  # a federation param: data and warm-up stay cached
    (work / "params.yaml").write_text(yaml.safe_dump(config_from_dict(raw).model_dump(mode="json")))
    third = _run([sys.executable, "-m", "dvc", "repro"], work)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "Running stage 'federate'" in third.stdout
    assert "Running stage 'data'" not in third.stdout and "Running stage 'warmup'" not in third.stdout

    # an experiment with a params override, listed by `dvc exp show`
    for args in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"]):
        assert _run(args, work).returncode == 0
    exp = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "fedlease.m_max=2", "-n", "mmax2"], work)
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-2000:]
    assert "Running stage 'allocate'" in exp.stdout and "Running stage 'warmup'" not in exp.stdout
    show = _run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], work)
    assert "mmax2" in show.stdout

    # the NLG profile, selected by one key: every stage re-runs on params_nlg.yaml
    nlg = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "profile=params_nlg.yaml", "-n", "nlg"], work)
    assert nlg.returncode == 0, nlg.stdout[-2000:] + nlg.stderr[-2000:]
    assert "Running stage 'data'" in nlg.stdout
    assert json.loads((work / "outputs" / "metrics.json").read_text())["methods"]["fedit"]["metric"] == "rougeL"
    # the profile's own values are columns of `dvc exp show`, and a profile key is an experiment's param
    nlg2 = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "profile=params_nlg.yaml", "-S",
                 "params_nlg.yaml:federation.rounds=2", "-n", "nlg2"], work)
    assert nlg2.returncode == 0, nlg2.stdout[-2000:] + nlg2.stderr[-2000:]
    # a profile's sections are declared whole: a federation key re-runs every stage that reads that section
    assert "Running stage 'federate'" in nlg2.stdout and "Running stage 'data'" not in nlg2.stdout
    rows = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(
        _run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], work).stdout))}
    assert rows["nlg"]["params_nlg.yaml:data.kind"] == "generation"
    assert rows["nlg"]["params_nlg.yaml:federation.rounds"] == "1"
    assert rows["nlg2"]["params_nlg.yaml:federation.rounds"] == "2"
    profile_column = next(k for k in rows["nlg2"] if k in ("profile", "params.yaml:profile"))
    assert rows["nlg2"][profile_column] == "params_nlg.yaml"
