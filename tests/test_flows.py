"""The Prefect flow chain against a temporary Prefect server: real outputs, one task per client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import tiny_params

pytestmark = pytest.mark.slow


def test_fedlease_flow_runs_the_chain_with_per_client_tasks(tmp_path: Path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.fedlease_flow import fedlease_flow

    raw = tiny_params(tmp_path, strategies=["fedlease", "local"])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    with prefect_test_harness(server_startup_timeout=120):
        metrics = fedlease_flow(str(params), rounds=1, seed=0)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            names = {t.name for t in client.read_task_runs()}
            flows = {f.name for f in client.read_flow_runs()}
            artifacts = {a.key: a for a in client.read_artifacts()}
    assert set(metrics["methods"]) == {"fedlease", "local"}
    assert (Path(raw["output_dir"]) / "metrics.json").exists()
    assert "params-rounds=1-seed0" in flows, flows  # named from its parameters, not at random
    with pytest.raises(Exception, match="rounds"):  # Prefect checks the types before a run starts
        fedlease_flow.validate_parameters({"params": str(params), "rounds": "three"})
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(fedlease_flow.fn).model_dump()["properties"]  # what the UI form is built from
    assert {"seed", "rounds", "strategies", "output_dir", "overrides", "params"} <= set(schema)
    assert "| fedlease |" in artifacts["fedlease-results"].data and "| local |" in artifacts["fedlease-results"].data
    assert artifacts["fedlease-progress"].data == 100.0
    assert {row["method"] for row in json.loads(artifacts["fedlease-results-table"].data)} == {"fedlease", "local"}
    for cid in range(4):
        assert f"warmup-r1-train-client-{cid:03d}" in names
        assert f"fedlease-r1-train-client-{cid:03d}" in names
        assert f"fedlease-r1-eval-client-{cid:03d}" in names
