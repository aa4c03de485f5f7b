"""The cluster definitions in infra/ are real: Ray's own schema accepts the cluster launcher YAML,
and Prefect registers the work-pool deployment from infra/prefect/ on a temporary server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "infra" / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # fills Ray's defaults, then raises on any schema error
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1, "the cluster has GPU workers"
    gpu["bogus_key"] = 1  # the schema check is real: a key Ray does not know is rejected
    with pytest.raises(Exception, match="bogus_key"):
        validate_config(prepare_config(config))


@pytest.mark.slow
def test_work_pool_and_deployment_register_on_a_prefect_server(tmp_path: Path):
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    prefect = str(Path(sys.executable).with_name("prefect"))
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "FEDLEASE_HOME": str(REPO),
               "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
        for cmd in ([prefect, "work-pool", "create", "fedlease", "--type", "process",
                     "--base-job-template", str(REPO / "infra" / "prefect" / "work-pool.json")],
                    [prefect, "--no-prompt", "deploy", "--prefect-file",
                     str(REPO / "infra" / "prefect" / "prefect.yaml"), "--all"]):
            res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("fedlease/cluster")
    assert dep.work_pool_name == "fedlease"
    assert "orchestration.task_runner=ray" in dep.parameters["overrides"]


def test_no_global_offline_switch_blocks_a_hub_model():
    """The packaged assets load from local folders with `local_files_only`; a hub model or dataset named in
    params must load when a network is there, so neither the Makefile nor the stack turns the hub off."""
    for path in ("Makefile", "infra/stack.sh"):
        text = (REPO / path).read_text()
        for switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            assert switch not in text, f"{path} sets {switch}"


def test_silo_examples_are_valid():
    """The README's silo-mode files: the coordinator's params and a silo's own config."""
    from fedlease.config import load_config
    from fedlease.silo import load_silo_config

    cfg = load_config(REPO / "infra/silo/params_silo.example.yaml")
    assert cfg.orchestration.task_runner == "silo" and cfg.num_clients == 4
    assert all(c.path is None for c in cfg.data.clients)  # the coordinator never names a data file
    silo = load_silo_config(str(REPO / "infra/silo/silo.example.yaml"))
    assert set(silo.clients) == {c.name for c in cfg.data.clients if c.silo == silo.name}


def test_the_longest_test_files_are_handed_out_first(request: pytest.FixtureRequest):
    """`make test` keeps the collection order (--no-loadscope-reorder), and the collection puts the files
    named in conftest.LONGEST_FIRST first, in that order: a renamed file would silently fall back to the end."""
    from .conftest import LONGEST_FIRST, longest_first_rank

    if request.config.getoption("failedfirst", False) or request.config.getoption("newfirst", False):
        pytest.skip("--ff / --nf reorder the collection after the hook")
    assert re.search(r"pytest .*--dist loadfile --no-loadscope-reorder", (REPO / "Makefile").read_text())
    assert not [name for name in LONGEST_FIRST if not (REPO / "tests" / name).exists()], "a renamed test file"
    collected = [longest_first_rank(item) for item in request.session.items]
    assert collected == sorted(collected), "a file of LONGEST_FIRST collected after a shorter one"


def test_python_lines_stay_within_the_configured_length():
    """pyproject's `line-length` (ruff's setting) holds in every Python file of the project (ruff itself is not
    in the lock, so the rule is checked here)."""
    import tomllib

    limit = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["line-length"]
    files = [p for top in ("fedlease", "flows", "tests", "benchmarks") for p in (REPO / top).rglob("*.py")
             if "runs" not in p.relative_to(REPO).parts]
    assert len(files) > 50
    long = [f"{p.relative_to(REPO)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > limit]
    assert not long, f"lines over {limit} columns: {long}"
