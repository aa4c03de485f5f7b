"""The strategy interface as a contract: a new method is one registered class and nothing else; no
caller tests a method's name or probes a strategy for an attribute; FedLEASE's server rule on
distinct experts; clients trained concurrently get the sequential results."""

from __future__ import annotations

import ast
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedlease.aggregation import group_means, weighted_mean
from fedlease.allocation import Allocation
from fedlease.config import ConfigError, config_from_dict
from fedlease.strategies import federated_names, register, strategy_class, unregister
from fedlease.strategies.base import Download, InitContext, ServerState, Update
from fedlease.strategies.fedit import FedIT
from fedlease.strategies.fedlease import FedLEASE

from .conftest import REPO, tiny_params


class HalfStepFedIT(FedIT):
    """A toy method the tests register: the server moves halfway from its model to the clients' average
    (server learning rate 0.5), instead of replacing it."""

    name = "toy_half_step"

    def aggregate(self, state: ServerState, updates: list[Update]) -> ServerState:
        mean = super().aggregate(state, updates).tensors
        return ServerState({k: state.tensors[k] + 0.5 * (mean[k] - state.tensors[k]) for k in mean}, state.meta)


@pytest.fixture
def toy_method():
    register(HalfStepFedIT)
    yield HalfStepFedIT.name
    unregister(HalfStepFedIT.name)


def test_registry_is_the_one_list_the_config_validates_against(tmp_path: Path, toy_method: str):
    assert toy_method in federated_names() and "warmup" not in federated_names()
    config_from_dict(tiny_params(tmp_path, strategies=[toy_method]))
    unregister(toy_method)
    with pytest.raises(ConfigError, match=r"strategies\.0: .*unknown method 'toy_half_step'"):
        config_from_dict(tiny_params(tmp_path, strategies=[toy_method]))
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Impostor", (FedIT,), {"name": "fedit"}))


@pytest.mark.slow
def test_a_registered_toy_method_runs_end_to_end(tmp_path: Path, toy_method: str):
    from fedlease.io import load_tensors, read_json
    from fedlease.paths import RunPaths
    from fedlease.pipeline import run_all
    from fedlease.runtime import runtime_for
    from fedlease.server import sequential_mapper
    from fedlease.strategies.base import ModelSpec

    uploads: dict[int, dict[str, torch.Tensor]] = {}

    def recording(fn, calls, label):
        results = sequential_mapper(fn, calls, label)
        if label.startswith(f"{toy_method}-r1-train"):
            uploads.update({r.client_id: load_tensors(r.upload) for r in results})
        return results

    # the paper's protocol: exactly one round, so the final state is one half step from the init
    cfg = config_from_dict(tiny_params(tmp_path, strategies=[toy_method, "fedit"], federation__rounds=1,
                                       federation__protocol="paper"))
    metrics = run_all(cfg, recording)
    assert set(metrics["methods"]) == {toy_method, "fedit"}
    paths = RunPaths.of(cfg)
    assert not paths.warmup.exists() and not paths.cluster_map.exists(), "neither method needs them"
    assert len(read_json(paths.strategy_dir(toy_method) / "result.json")["history"][0]["eval"]["clients"]) == 4
    # its own server rule ran: halfway from the common init to the clients' FedAvg
    toy = load_tensors(paths.strategy_dir(toy_method) / "final" / "server_state.safetensors")
    init = runtime_for(cfg).common_init(ModelSpec(r=cfg.lora.r))
    mean = weighted_mean([uploads[c] for c in sorted(uploads)], [16.0] * len(uploads))
    assert sorted(uploads) == [0, 1, 2, 3] and set(toy) == set(mean)
    for key, value in mean.items():
        assert torch.allclose(toy[key], init[key] + 0.5 * (value - init[key]), atol=1e-6), key


def _literal_names() -> set[str]:
    return set(federated_names()) | {strategy_class(n).name for n in federated_names()} | {"warmup"}


def test_no_caller_tests_a_method_name_or_probes_a_strategy():
    """Outside fedlease/strategies/, no comparison with a method's name and no hasattr/getattr on a
    strategy object (the registry and the declared hooks say everything)."""
    names = _literal_names()
    offenders = []
    files = [p for p in (REPO / "fedlease").rglob("*.py") if "strategies" not in p.parts]
    files += list((REPO / "flows").rglob("*.py")) + list((REPO / "benchmarks").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                consts = [n for n in operands if isinstance(n, ast.Constant)]
                about_data = any("source" in ast.unparse(n) for n in operands)  # a data source named "local"
                if any(c.value in names for c in consts) and not about_data:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: compares with a method name")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr")
                    and node.args and "strateg" in ast.unparse(node.args[0]).lower()):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: probes a strategy with {node.func.id}")
    assert not offenders, "\n".join(offenders)


def _expert(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"lora.m.A": torch.full((1, 2), a), "lora.m.B": torch.full((2, 1), b)}


def test_fedlease_aggregates_each_expert_within_its_cluster_only(tmp_path: Path):
    """Three distinct experts, five clients in clusters [0, 0, 1, 2, 2]: each expert and router becomes
    the example-weighted mean of its own members' uploads; cluster 1, silent this round, keeps its own."""
    cfg = config_from_dict(tiny_params(tmp_path))
    fl = FedLEASE(cfg, 5, Allocation([0, 0, 1, 2, 2], 3))
    common = {"router.m": torch.zeros(5, 2)}
    state = fl.init_state(InitContext(common, [_expert(1, 10), _expert(2, 20), _expert(3, 30)]))

    def upload(value: float) -> dict[str, torch.Tensor]:
        return {**_expert(value, -value), "router.m": torch.full((5, 2), value)}

    updates = [Update(0, upload(4.0), 10, 0), Update(1, upload(8.0), 30, 0),
               Update(3, upload(100.0), 1, 2), Update(4, upload(200.0), 3, 2)]
    new = fl.aggregate(state, updates).tensors
    assert torch.allclose(new["expert0.lora.m.A"], torch.full((1, 2), (4 * 10 + 8 * 30) / 40))
    assert torch.allclose(new["expert0.lora.m.B"], torch.full((2, 1), -(4 * 10 + 8 * 30) / 40))
    assert torch.allclose(new["router0.router.m"], torch.full((5, 2), 7.0))
    assert torch.allclose(new["expert2.lora.m.A"], torch.full((1, 2), (100 + 600) / 4))
    assert torch.allclose(new["router2.router.m"], torch.full((5, 2), 175.0))
    assert torch.equal(new["expert1.lora.m.A"], torch.full((1, 2), 2.0)), "a silent cluster keeps its expert"
    assert torch.equal(new["router1.router.m"], torch.zeros(5, 2))
    # what a client of cluster 2 gets: every expert, its own router; its own expert first, the others stacked
    down = fl.download(fl.aggregate(state, updates), 3)
    assert set(down.tensors) == {f"expert{e}.lora.m.{p}" for e in range(3) for p in "AB"} | {"router2.router.m"}
    client = fl.client_state(down)
    assert torch.allclose(client["lora.m.A"], torch.full((1, 2), 175.0))
    assert torch.allclose(client["foreign.m.A"][:, 0, 0], torch.tensor([7.0, 2.0])), "experts 0 and 1, in order"
    assert torch.allclose(client["router.m"], torch.full((5, 2), 175.0))
    assert fl.upload_group(down) == 2


def test_group_means_is_fedavg_per_group():
    class U:
        def __init__(self, group: int, value: float) -> None:
            self.group, self.tensors = group, {"w": torch.tensor([value])}

    ups = [U(1, 1.0), U(0, 5.0), U(1, 3.0)]
    means = group_means(ups, lambda members: [1.0] * len(members))
    assert list(means) == [0, 1] and means[0]["w"].item() == 5.0 and means[1]["w"].item() == 2.0
    assert weighted_mean([{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}], [3, 1])["w"].item() == 1.75


@pytest.mark.slow
def test_clients_trained_from_threads_get_the_sequential_results(tmp_path: Path):
    """Two worker threads training and evaluating clients at once (as the `threads` task runner does):
    every metric and every final server tensor equals the sequential run's."""
    from fedlease.io import load_tensors
    from fedlease.paths import RunPaths
    from fedlease.pipeline import run_all
    from fedlease.server import sequential_mapper

    def threaded(fn, calls, label):
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(lambda call: sequential_mapper(fn, [call], label)[0], calls))

    results = {}
    for name, mapper in (("sequential", sequential_mapper), ("threads", threaded)):
        cfg = config_from_dict(tiny_params(tmp_path / name, strategies=["fedlease", "fedit"]))
        metrics = run_all(cfg, mapper)
        states = {m: load_tensors(RunPaths.of(cfg).strategy_dir(m) / "final" / "server_state.safetensors")
                  for m in ("fedlease", "fedit")}
        results[name] = ({m: (v["mean"], v["per_task"]) for m, v in metrics["methods"].items()}, states)
    assert results["threads"][0] == results["sequential"][0]
    for method, state in results["sequential"][1].items():
        other = results["threads"][1][method]
        assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state), method


def test_download_meta_names_the_clients_expert(tmp_path: Path):
    cfg = config_from_dict(tiny_params(tmp_path))
    fl = FedLEASE(cfg, 2, Allocation([1, 0], 2))
    assert fl.upload_group(Download({}, {"expert": 1})) == 1
    with pytest.raises(ValueError, match="cluster map"):
        FedLEASE(cfg, 2)
