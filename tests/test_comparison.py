"""The comparison's rules on hand-checkable cases: equal compute, provenance, floors and fair averages,
faithful baselines' invariants, allocation in the near-orthogonal regime measured in practice."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlease.allocation import b_distance_matrix, choose_experts
from fedlease.client import majority_accuracy
from fedlease.config import ConfigError, config_from_dict
from fedlease.data.partition import partition
from fedlease.data.sources import DataError, TaskData
from fedlease.models.adapters import get_state, set_state
from fedlease.server import summarise_eval
from fedlease.strategies import make_strategy

from .conftest import REPO, tiny_params

sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts' modules: quality


def test_equal_compute_gives_baselines_the_warmup_epochs_as_extra_rounds(tmp_path: Path):
    """warm-up 3 epochs, 2 rounds x 2 epochs: FedLEASE trains 3 + 4 = 7 epochs; FedIT 2 + 2 rounds of
    2, 2, 2, 1 epochs = 7; under the paper's protocol FedIT gets only its 4."""
    cfg = config_from_dict(tiny_params(tmp_path, fedlease__warmup_epochs=3, training__local_epochs=2,
                                       federation__rounds=2))
    fedit = make_strategy("fedit", cfg, 4)
    assert fedit.rounds() == 4 and [fedit.local_epochs(r) for r in range(1, 5)] == [2, 2, 2, 1]
    local = make_strategy("local", cfg, 4)
    assert local.rounds() == 2 and local.warmup_epochs() == 3 and [local.local_epochs(r) for r in (1, 2)] == [2, 2]
    for name in ("fedit", "ffa_lora", "fedsa_lora", "ifca", "feddpa", "local"):
        s = make_strategy(name, cfg, 4)
        assert s.warmup_epochs() + sum(s.local_epochs(r) for r in range(1, s.rounds() + 1)) == 7, name
    paper = config_from_dict(tiny_params(tmp_path, fedlease__warmup_epochs=3, training__local_epochs=2,
                                         federation__rounds=2, federation__protocol="paper"))
    assert make_strategy("fedit", paper, 4).rounds() == 2


def test_fingerprint_names_the_code_version(tmp_path: Path, monkeypatch):
    """A checkpoint made by other code (other sources or another commit) is not reused."""
    import fedlease.provenance as provenance
    from fedlease.server import fingerprint

    cfg = config_from_dict(tiny_params(tmp_path))
    base = {"sources": "0" * 16, "commit": "abc", "dirty": False}

    def made_by(**version: object) -> str:
        monkeypatch.setattr(provenance, "code_version", lambda: {**base, **version})
        return fingerprint(cfg, "fedit", [])

    here = made_by()
    assert made_by() == here  # the same code: reused
    assert made_by(commit="def") != here  # the commit alone
    assert made_by(sources="1" * 16) != here  # the sources alone
    assert made_by(dirty=True) == here  # uncommitted edits show in the sources hash, not in a flag


def test_sources_hash_follows_every_package_file(tmp_path: Path):
    from fedlease.provenance import sources_hash

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    before = sources_hash(pkg, tmp_path)
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    edited = sources_hash(pkg, tmp_path)
    assert edited != before
    # the lock too, alone (the sources unchanged from here on): a new pin, then a changed pin
    (tmp_path / "requirements.lock").write_text("torch==2.13.0\n")
    locked = sources_hash(pkg, tmp_path)
    (tmp_path / "requirements.lock").write_text("torch==2.12.0\n")
    assert len({edited, locked, sources_hash(pkg, tmp_path)}) == 3


def test_benchmark_refuses_runs_of_different_code(monkeypatch):
    import quality

    same = {"sources": "s", "commit": "c"}

    def run(version: dict, method_version: dict | None = None) -> dict:
        return {"code_version": version, "methods": {"fedlease": {"code_version": method_version or version}}}

    assert quality.one_code_version([run(same), run({**same, "dirty": True})])
    with pytest.raises(SystemExit, match="different code versions"):
        quality.one_code_version([run(same), run({**same, "sources": "t"})])
    with pytest.raises(SystemExit, match="different code versions"):  # one method's rounds from other code
        quality.one_code_version([run(same), run(same, {**same, "commit": "old"})])


def test_a_failed_client_evaluation_is_counted_and_refused_by_the_benchmark():
    """A client whose evaluation failed is out of the means: summarise_eval names it, and the benchmark
    refuses to publish a table with it (it could move a method either way)."""
    import quality

    ok = {"task": "t", "accuracy": 0.5, "num_test": 4, "macro_f1": 0.4, "majority_accuracy": 0.5}
    summary = summarise_eval({"0": ok, "1": {"error": "RuntimeError: boom"}, "2": ok}, "classification")
    assert summary["failed_clients"] == ["1"] and summary["mean"] == 0.5
    with pytest.raises(SystemExit, match=r"\(0, 'fedlease'\).*\['1'\]"):
        quality.no_failed_evaluations([{"seed": 0, "methods": {"fedlease": {"failed_evaluations": ["1"]}}}])
    quality.no_failed_evaluations([{"seed": 0, "methods": {"fedlease": {"failed_evaluations": []}}}])


def test_majority_floor_and_weighted_mean_by_hand():
    train = [{"label": 2}, {"label": 2}, {"label": 0}]
    test = [{"label": 2}, {"label": 1}, {"label": 2}, {"label": 0}]
    assert majority_accuracy(train, test) == 0.5
    clients = {"0": {"task": "a", "accuracy": 1.0, "macro_f1": 1.0, "majority_accuracy": 0.5, "num_test": 1},
               "1": {"task": "a", "accuracy": 0.5, "macro_f1": 0.4, "majority_accuracy": 0.25, "num_test": 3},
               "2": {"task": "b", "accuracy": 0.0, "macro_f1": 0.0, "majority_accuracy": 1.0, "num_test": 4}}
    s = summarise_eval(clients, "classification")
    assert s["mean"] == pytest.approx(0.5) and s["weighted_mean"] == pytest.approx((1 + 1.5 + 0) / 8)
    assert s["per_task"] == {"a": 0.75, "b": 0.0}
    assert s["majority"]["mean"] == pytest.approx(1.75 / 3)
    assert s["majority"]["weighted_mean"] == pytest.approx((0.5 + 0.75 + 4) / 8)


def test_clients_still_at_their_floor_after_the_warmup_are_named_in_the_results():
    """A warm-up client at or below its majority floor has learnt little for the allocation to read: the
    clients are counted by hand (a tie counts, a failed evaluation and a generation client do not), and the
    results table says so beside the warm-up's score and floor."""
    from fedlease.report import clients_at_their_floor, results_table

    clients = {"0": {"accuracy": 0.50, "majority_accuracy": 0.50},   # a tie: at the floor
               "1": {"accuracy": 0.75, "majority_accuracy": 0.50},   # learnt
               "2": {"accuracy": 0.25, "majority_accuracy": 0.60},   # below
               "3": {"error": "RuntimeError: boom"},                  # failed: not judged
               "10": {"rougeL": 0.3}}                                 # generation: no floor
    assert clients_at_their_floor(clients) == [0, 2]
    method = {"metric": "accuracy", "mean": 0.6, "per_task": {"a": 0.6}, "trainable_params": 10, "wall_seconds": 1.0}
    metrics = {"methods": {"fedlease": method},
               "allocation": {"num_experts": 2, "ari_vs_task": 1.0, "clients": 4, "warmup_at_floor": [0, 2],
                              "warmup_score": 0.4833, "warmup_floor": 0.5333}}
    table = results_table(metrics)
    assert "48.33 (majority-class floor 53.33)" in table
    assert "2 of 4 clients ended the warm-up at or below their majority-class floor (clients [0, 2])" in table
    metrics["allocation"]["warmup_at_floor"] = []
    assert "at or below their majority-class floor" not in results_table(metrics)
    metrics["allocation"]["warmup_eval_failed"] = [3]  # a failed evaluation is named, not read as a client that learnt
    assert "The warm-up evaluation of 1 of 4 clients failed (clients [3])" in results_table(metrics)
    # M at the cap names the limit it stopped at (N - 1 here, not m_max)
    assert "M = 2 (at the cap" not in results_table(metrics)
    metrics["allocation"].update(num_experts=3, capped=True, cap="N - 1 = 3 with 4 clients")
    assert "M = 3 (at the cap, N - 1 = 3 with 4 clients)" in results_table(metrics)


def test_the_time_of_a_method_that_continues_from_the_warmup_counts_the_warmup():
    """At equal compute FedLEASE's and local's steps include the warm-up: so does their time in the table
    (`s with warm-up`), beside the rounds alone; a summary made before the warm-up's seconds were kept
    shows "-", not its rounds as the whole."""
    from fedlease.records import RoundRecord
    from fedlease.report import method_table, summarise_method

    def record(r: int, seconds: float) -> RoundRecord:
        ev = {"metric": "accuracy", "mean": 0.5, "per_task": {"a": 0.5}, "clients": {}}
        return RoundRecord(r, [0, 1], {}, 0.1, {"0": 8, "1": 8}, {"0": 8, "1": 8}, 1.0, 0.0, seconds=seconds,
                           steps={"0": 3, "1": 3}, eval=ev)

    result = {"wall_seconds": 100.0, "trainable_params": 10}
    heir = summarise_method([record(1, 50.0), record(2, 50.0)], result, 2, warmup=[record(1, 20.0), record(2, 10.0)])
    alone = summarise_method([record(1, 50.0), record(2, 50.0)], result, 2)
    assert heir["warmup_seconds"] == 30.0 and alone["warmup_seconds"] == 0.0
    lost = summarise_method([record(1, 50.0), record(2, 50.0)], result, 2, warmup=[])  # an heir, no warm-up record
    assert "warmup_seconds" not in lost and method_table([{"methods": {"x": lost}}]).splitlines()[2].endswith("| - |")
    assert heir["local_steps_per_client"] == 12 and alone["local_steps_per_client"] == 6
    table = method_table([{"methods": {"fedlease": heir, "fedit": alone}}])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert rows["fedlease"][-2:] == ["100", "130 |"] and rows["fedit"][-2:] == ["100", "100 |"]
    del heir["warmup_seconds"]
    assert method_table([{"methods": {"fedlease": heir}}]).splitlines()[2].endswith("| 100 | - |")


def _task(name: str, n: int, labels: int, seed: int) -> TaskData:
    rng = np.random.default_rng(seed)
    recs = [{"text": f"{name} {i}", "label": int(rng.integers(labels))} for i in range(n)]
    return TaskData(name, "classification", recs, [f"l{k}" for k in range(labels)])


def test_dirichlet_minimum_test_set_is_a_clear_error_naming_the_client(tmp_path: Path):
    raw = tiny_params(tmp_path)
    part = config_from_dict({**raw, "data": {**raw["data"], "partition": {
        "scheme": "task_dirichlet", "clients_per_task": 6, "dirichlet_alpha": 0.05, "train_per_client": 8,
        "test_per_client": 4, "min_test_per_client": 4}}}).data.partition
    with pytest.raises(DataError, match=r"task t: client \d+ gets \d+ test examples .*min_test_per_client=4"):
        partition([_task("t", 80, 3, 0)], part, seed=0)
    ok = part.model_copy(update={"dirichlet_alpha": 100.0, "min_test_per_client": 3})
    assert all(len(c.test) >= 3 for c in partition([_task("t", 80, 3, 0)], ok, seed=0))


def test_label_balanced_test_set_spans_the_task_and_comes_from_test_data(tmp_path: Path):
    raw = tiny_params(tmp_path)
    part = config_from_dict({**raw, "data": {**raw["data"], "partition": {
        "scheme": "task_dirichlet", "clients_per_task": 3, "dirichlet_alpha": 0.3, "train_per_client": 30,
        "test_per_client": 20, "min_test_per_client": 2, "balanced_test_per_label": 5}}}).data.partition
    clients = partition([_task("t", 200, 3, 1), _task("u", 200, 2, 2)], part, seed=0)
    for c in clients:
        counts = [sum(r["label"] == k for r in c.balanced_test) for k in range(len(c.label_names))]
        assert len(set(counts)) == 1 and 1 <= counts[0] <= 5, counts
        mates = [m for m in clients if m.task == c.task]
        tests = {r["text"] for m in mates for r in m.test}
        trains = {r["text"] for m in mates for r in m.train}
        assert {r["text"] for r in c.balanced_test} <= tests and not {r["text"] for r in c.balanced_test} & trains


def test_the_label_balanced_table_has_its_majority_floor():
    """On a label-balanced test set a client predicting its most frequent training label scores 1/L of its
    task's L labels: the floor row under the balanced table, from each client's own (hand-made) floor."""
    from fedlease.client import majority_accuracy
    from fedlease.report import balanced_table, summarise_method
    from fedlease.server import summarise_eval

    train = [{"label": 2}, {"label": 2}, {"label": 0}]
    assert majority_accuracy(train, [{"label": k} for k in range(3) for _ in range(4)]) == pytest.approx(1 / 3)

    def client(task: str, acc: float, bal: float, floor: float) -> dict:
        return {"task": task, "accuracy": acc, "macro_f1": acc, "majority_accuracy": 0.9, "num_test": 4,
                "balanced_accuracy": bal, "num_balanced_test": 6, "balanced_majority_accuracy": floor}

    ev = summarise_eval({"0": client("t3", 0.9, 0.5, 1 / 3), "1": client("t3", 0.8, 0.6, 1 / 3),
                         "2": client("t2", 0.9, 0.7, 0.5)}, "classification")
    assert ev["balanced_majority"]["per_task"] == {"t2": 0.5, "t3": pytest.approx(1 / 3)}
    from fedlease.records import RoundRecord

    record = RoundRecord(1, [0, 1, 2], {}, 0.1, {}, {}, 1.0, 0.0, steps={}, eval=ev)
    method = summarise_method([record], {"wall_seconds": 1.0, "trainable_params": 1}, 3)
    table = balanced_table([{"methods": {"fedlease": method}}])
    assert table.splitlines()[-1] == "| majority class (floor) | 50.00 | 33.33 | 38.89 |"
    assert table.splitlines()[-2] == "| fedlease | 70.00 | 55.00 | 60.00 |"


def test_ablation_and_privacy_tables_name_the_majority_floor():
    import quality

    runs = [{"methods": {"fedlease": {"mean": 0.6, "majority": {"mean": m}}}} for m in (0.40, 0.50)]
    assert quality.floor_note(runs) == "; majority-class floor 45.00 ± 7.07"
    assert quality.floor_note([{"methods": {"fedlease": {"mean": 0.3, "majority": None}}}]) == ""  # generation


def test_planted_near_orthogonal_clusters_are_recovered():
    """The regime measured on the default mix: every client pair 1 - cos in 0.8-1.0, silhouette ~0.15.
    B_i = sqrt(rho) c_k + sqrt(1 - rho) noise_i gives cos ~rho within a cluster, ~0 across."""
    rng = np.random.default_rng(0)
    rho, dim, truth = 0.15, 4096, [k for k in range(4) for _ in range(4)]
    centres = {(k, m): rng.standard_normal(dim) for k in range(4) for m in range(2)}
    adapters = [{f"lora.m{m}.B": torch.tensor(np.sqrt(rho) * centres[(k, m)]
                                              + np.sqrt(1 - rho) * rng.standard_normal(dim)).reshape(dim // 4, 4)
                 for m in range(2)} for k in truth]
    dist = b_distance_matrix(adapters)
    off = dist[~np.eye(16, dtype=bool)]
    assert 0.8 < off.min() and off.max() < 1.1, "the planted case is in the measured regime"
    alloc = choose_experts(dist, 8)
    assert alloc.num_experts == 4 and 0.1 < alloc.silhouette[4] < 0.2
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, alloc.assignment) == 1.0


def test_ifca_cluster_models_are_distinct_functions(tmp_path: Path):
    from fedlease.runtime import runtime_for
    from fedlease.strategies.base import InitContext, ModelSpec

    cfg = config_from_dict(tiny_params(tmp_path))
    ifca = make_strategy("ifca", cfg, 4)
    state = ifca.init_state(InitContext(runtime_for(cfg).common_init(ModelSpec(r=2))))
    deltas = []
    for c in range(4):
        lora = {k.split(".", 1)[1]: v for k, v in state.tensors.items() if k.startswith(f"cluster{c}.")}
        key = next(k for k in lora if k.endswith(".B"))
        deltas.append(lora[key] @ lora[key.replace(".B", ".A")])
    norms = [float(d.norm()) for d in deltas]
    assert min(norms) > 0, "B is not zero: each cluster model is its own function"
    assert min(float((a - b).norm()) for i, a in enumerate(deltas) for b in deltas[i + 1:]) > 0.1 * max(norms)


#: std of the warm-up's B per module, measured on the shipped settings (2026-12-01): the packaged encoder's
#: classification warm-up 0.019-0.022, the NLG profile's (SmolLM2, 8 steps at lr 1e-3) 0.0041-0.0061
WARMUP_B_STD = {"classification": 0.02, "generation": 0.005}


def test_every_shipped_profile_draws_ifca_models_at_the_warmup_scale():
    """The README's IFCA draws each cluster's B at the size of a warmed-up B: far smaller (params.yaml and
    the benchmark profile once set 1e-3) gives K near-identical models whose first choice is noise; far
    larger (0.02 on the NLG profile, 4x its warm-up's B) gives IFCA a random start its few steps cannot undo."""
    from fedlease.config import load_config

    profiles = [REPO / "params.yaml", *sorted(REPO.glob("params_*.yaml")),
                *sorted(REPO.glob("benchmarks/params_*.yaml"))]
    assert len(profiles) >= 6
    for profile in profiles:
        cfg = load_config(profile)
        scale = WARMUP_B_STD[cfg.data.kind]
        assert scale / 2 <= cfg.baselines.ifca_init_std <= 2 * scale, profile.name
        if profile.parent.name == "benchmarks" and "ifca" in cfg.strategies:  # IFCA gets the number of tasks
            assert cfg.baselines.ifca_clusters == len(cfg.data.tasks), profile.name


@pytest.mark.slow
def test_baselines_keep_their_invariants_and_equal_steps(tmp_path: Path):
    """FFA-LoRA: A never changes and never crosses the wire; FedSA-LoRA: B never leaves the client; IFCA
    chooses on the whole training set and reports its clusters' ARI; every method the same local steps."""
    from fedlease.io import load_tensors
    from fedlease.paths import RunPaths
    from fedlease.pipeline import run_all
    from fedlease.runtime import runtime_for
    from fedlease.server import sequential_mapper
    from fedlease.strategies.base import ModelSpec

    from fedlease.models.adapters import get_state

    uploads: dict[str, list[set[str]]] = {}
    a_after_ffa: list[dict[str, torch.Tensor]] = []

    def spying(fn, calls, label):
        results = []
        for call in calls:  # one at a time, to look at the model right after each client's training
            results += sequential_mapper(fn, [call], label)
            if label.startswith("ffa_lora") and "-train" in label:
                model = runtime_for(cfg).build(ModelSpec(r=cfg.lora.r)).model
                a_after_ffa.append(get_state(model, None, ("lora_A",)))
        if "-train" in label:
            uploads.setdefault(label.split("-r")[0], []).extend(set(load_tensors(r.upload)) for r in results)
        return results

    cfg = config_from_dict(tiny_params(tmp_path, strategies=["fedlease", "ffa_lora", "fedsa_lora", "ifca", "feddpa"]))
    metrics = run_all(cfg, spying)
    paths = RunPaths.of(cfg)
    init = runtime_for(cfg).common_init(ModelSpec(r=cfg.lora.r))
    ffa = load_tensors(paths.strategy_dir("ffa_lora") / "final" / "server_state.safetensors")
    assert ffa and all(k.endswith(".B") for k in ffa)
    assert all(k.endswith(".B") for up in uploads["ffa_lora"] for k in up)
    assert len(a_after_ffa) == 4 * make_strategy("ffa_lora", cfg, 4).rounds()
    for a in a_after_ffa:  # right after every client's local training, A is still the common init
        assert a and all(torch.equal(v, init[k]) for k, v in a.items())
    fedsa = load_tensors(paths.strategy_dir("fedsa_lora") / "final" / "server_state.safetensors")
    assert fedsa and all(k.endswith(".A") for k in fedsa)
    assert all(k.endswith(".A") for up in uploads["fedsa_lora"] for k in up), "B never leaves the client"
    local_b = load_tensors(paths.strategy_dir("fedsa_lora") / "final" / "clients" / "client_000.safetensors")
    assert any(k.endswith(".B") for k in local_b)
    assert not any(torch.equal(ffa[k], init[k]) for k in ffa), "B trained"
    steps = {name: m["local_steps_per_client"] for name, m in metrics["methods"].items()}
    assert len(set(steps.values())) == 1, steps
    assert metrics["methods"]["ifca"]["ari_vs_task"] is not None
    assert metrics["methods"]["fedlease"]["ari_vs_task"] == metrics["allocation"]["ari_vs_task"]
    assert metrics["protocol"] == "equal_compute" and metrics["code_version"]["sources"]
    table = (paths.root / "results.md").read_text()
    assert "majority class (floor)" in table and "equal_compute" in table


def test_class_balanced_weights_by_hand():
    from fedlease.client import class_weights

    recs = [{"label": 0}] * 6 + [{"label": 2}] * 2
    w = class_weights(recs, 4)
    assert w.tolist() == pytest.approx([8 / (2 * 6), 0.0, 8 / (2 * 2), 0.0])
    # weighted: each present label contributes alike: 6 * w0 == 2 * w2
    assert 6 * w[0] == pytest.approx(2 * w[2])


def test_warmup_balanced_loss_is_an_option_of_the_warmup_only(tmp_path: Path):
    from fedlease.strategies import warmup_strategy

    cfg = config_from_dict(tiny_params(tmp_path, fedlease__warmup_balanced_loss=True))
    assert [p.class_balanced for p in warmup_strategy(cfg, 4).local_phases(1)] == [True]
    assert not any(p.class_balanced for p in make_strategy("local", cfg, 4).local_phases(1))
    off = config_from_dict(tiny_params(tmp_path))
    assert [p.class_balanced for p in warmup_strategy(off, 4).local_phases(1)] == [False]


def test_warmup_head_epochs_train_the_head_alone_first_then_lora_within_the_same_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`fedlease.warmup_head_epochs`: the warm-up's first epochs fit the head with the LoRA at its init (B = 0),
    so B then learns behind a head fitted to the client's data; the warm-up's epochs (and steps) stay the same."""
    from fedlease.client import train_phases
    from fedlease.runtime import ClientRuntime
    from fedlease.strategies import warmup_strategy
    from fedlease.strategies.base import ModelSpec

    cfg = config_from_dict(tiny_params(tmp_path, fedlease__warmup_epochs=3, fedlease__warmup_head_epochs=1))
    warmup = warmup_strategy(cfg, 4)
    assert [(p.train_groups, p.epochs) for p in warmup.local_phases(1)] == [(("head",), 1), (("lora", "head"), 2)]
    plain = warmup_strategy(config_from_dict(tiny_params(tmp_path, fedlease__warmup_epochs=3)), 4)
    assert [(p.train_groups, p.epochs) for p in plain.local_phases(1)] == [(("lora", "head"), 3)]
    rt = ClientRuntime(cfg)
    model = rt.fresh_model(ModelSpec(r=2), 2)
    records = [{"text": t, "label": i % 2} for i, t in enumerate(["a good film", "a bad film", "lovely", "awful"] * 4)]
    moved_by_phase = []
    train = rt.engine.train

    def recording_train(model_: torch.nn.Module, *args: object, **kwargs: object) -> object:
        before = get_state(model_, "classifier", ("lora", "head"))
        out = train(model_, *args, **kwargs)
        after = get_state(model_, "classifier", ("lora", "head"))
        moved_by_phase.append({k.split(".")[0] for k in before if not torch.equal(before[k], after[k])})
        return out

    monkeypatch.setattr(rt.engine, "train", recording_train)
    result = train_phases(rt, warmup, model, records, 1, seed=0, spec=ModelSpec(r=2), num_labels=2)
    assert moved_by_phase == [{"head"}, {"lora", "head"}]
    assert result.steps == 3 * 2  # 3 epochs of 2 batches of 8, one of them the head's alone
    with pytest.raises(ConfigError, match="warmup_head_epochs: 3 leaves none of the 3"):
        config_from_dict(tiny_params(tmp_path, fedlease__warmup_epochs=3, fedlease__warmup_head_epochs=3))


def test_the_common_head_is_one_draw_per_label_count_scaled_by_model_head_init_std(tmp_path: Path):
    """Every client of a label count starts from the same head (the common init), N(0, std^2) with
    `model.head_init_std`; 0 gives a zero head, which sends the encoder no gradient until it has learnt."""
    from fedlease.runtime import ClientRuntime
    from fedlease.strategies.base import ModelSpec

    heads = {}
    for std in (0.02, 0.1, 0.0):
        rt = ClientRuntime(config_from_dict(tiny_params(tmp_path, model__head_init_std=std)))
        heads[std] = {labels: get_state(rt.fresh_model(ModelSpec(r=2), labels), "classifier", ("head",))
                      for labels in (2, 3)}
        again = get_state(rt.fresh_model(ModelSpec(r=2), 2), "classifier", ("head",))
        assert all(torch.equal(again[k], heads[std][2][k]) for k in again)  # one draw per label count
    weight = next(k for k in heads[0.02][2] if k.endswith("weight"))
    assert torch.allclose(heads[0.1][2][weight], 5 * heads[0.02][2][weight])
    assert 0.015 < float(heads[0.02][2][weight].std()) < 0.025
    assert not torch.equal(heads[0.02][2][weight][:2], heads[0.02][3][weight][:2])  # another label count, another draw
    assert all(float(t.abs().max()) == 0.0 for t in heads[0.0][2].values())


def test_input_signature_reads_the_frozen_base_model_not_the_adapter_the_head_or_dropout(tmp_path: Path):
    """The `inputs` distance's signature: the base model's mean-pooled last layer, averaged over examples (not
    over batches), the adapter disabled and dropout off, so neither the warm-up's LoRA nor the head a client
    starts from enters it; the warm-up uploads it only with that distance."""
    from fedlease.client import input_signature
    from fedlease.runtime import ClientRuntime
    from fedlease.strategies import warmup_strategy
    from fedlease.strategies.base import ModelSpec

    cfg = config_from_dict(tiny_params(tmp_path, fedlease__clustering__distance="inputs",
                                       training__eval_batch_size=3))
    assert warmup_strategy(cfg, 4).uploads_input_signature()
    assert not warmup_strategy(config_from_dict(tiny_params(tmp_path)), 4).uploads_input_signature()
    rt = ClientRuntime(cfg)
    model = rt.fresh_model(ModelSpec(r=2), 2)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())  # dropout would show
    records = [{"text": t, "label": i % 2} for i, t in enumerate(
        ["a good film", "a bad film", "lovely", "awful acting", "the plot was thin", "superb", "dull", "fine"])]
    model.train()
    sig = input_signature(rt, model, records)
    assert sig.ndim == 1 and model.training  # one vector; the model's mode restored
    assert torch.allclose(input_signature(rt, model, records), sig, atol=0, rtol=0)  # no dropout in it
    one_by_one = torch.stack([input_signature(rt, model, [r]) for r in records]).mean(dim=0)
    assert torch.allclose(one_by_one, sig, atol=1e-6)  # 8 examples in batches of 3, 3, 2: a mean over examples
    state = get_state(model, "classifier", ("lora", "head"))
    set_state(model, {k: torch.randn_like(v) for k, v in state.items()}, "classifier")
    assert torch.allclose(input_signature(rt, model, records), sig, atol=1e-6)  # blind to LoRA and head


def test_ifca_client_adopts_the_lowest_loss_cluster_over_its_whole_training_set(tmp_path: Path, monkeypatch):
    """IFCA (Ghosh et al.): each client takes the cluster model with the lowest loss on its data, here the whole
    training set unless `baselines.ifca_choice_batches` names a number of batches."""
    import fedlease.client as client
    from fedlease.engine.batching import encode_classification
    from fedlease.engine.trainer import compute_loss
    from fedlease.models.adapters import get_state, set_state
    from fedlease.runtime import runtime_for
    from fedlease.strategies.base import Download, InitContext, ModelSpec

    cfg = config_from_dict(tiny_params(tmp_path, training__eval_batch_size=4))
    rt = runtime_for(cfg)
    ifca = make_strategy("ifca", cfg, 4)
    state = ifca.init_state(InitContext(rt.common_init(ModelSpec(r=cfg.lora.r))))
    candidates = ifca.candidates(Download(state.tensors, {}))
    model = rt.build(ModelSpec(r=cfg.lora.r)).model
    words = ["great", "awful", "fine", "dull", "superb", "bad", "moving", "boring", "fun", "slow"]
    records = [{"text": f"the film was {w} and {words[(i * 3) % 10]}", "label": i % 2} for i, w in
               enumerate(words * 2)]  # 20 examples: 5 batches of 4
    whole = {}
    with torch.no_grad():
        for group, cand in candidates.items():
            set_state(model, cand, rt.head_module())
            whole[group] = float(compute_loss(model, encode_classification(rt.tokenizer, records, 64), cfg.data.kind))
    assert len(set(whole.values())) == len(whole), "distinct cluster models give distinct losses"
    calls = []
    monkeypatch.setattr(client, "compute_loss", lambda *a, **k: calls.append(1) or compute_loss(*a, **k))
    with torch.no_grad():
        chosen = client.adopt_lowest_loss(rt, model, candidates, records, seed=0)
    assert chosen == min(whole, key=whole.__getitem__)
    assert len(calls) == 5 * len(candidates)  # every batch of the training set, for every candidate
    held = get_state(model, rt.head_module(), groups=("lora",))
    shared = [k for k in candidates[chosen] if k in held]
    assert shared and all(torch.equal(held[k], candidates[chosen][k]) for k in shared)  # the chosen one is loaded
    calls.clear()
    limited = config_from_dict(tiny_params(tmp_path, training__eval_batch_size=4, baselines__ifca_choice_batches=2))
    monkeypatch.setattr(rt, "cfg", limited)
    with torch.no_grad():
        client.adopt_lowest_loss(rt, model, candidates, records, seed=0)
    assert len(calls) == 2 * len(candidates)

