"""End to end on the tiny config: every stage's real outputs, determinism, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedlease.config import config_from_dict
from fedlease.io import read_json
from fedlease.paths import RunPaths
from fedlease.pipeline import run_all

from .conftest import REPO, tiny_params

pytestmark = pytest.mark.slow


def _final(metrics: dict) -> dict:
    return {m: (v["mean"], v["per_task"], v["bytes_up_per_client_round"]) for m, v in metrics["methods"].items()}


def test_end_to_end_outputs_and_determinism(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = config_from_dict(tiny_params(tmp_path / "a"))
    metrics = run_all(cfg)
    paths = RunPaths.of(cfg)
    assert set(metrics["methods"]) == {"fedlease", "fedit"}
    cmap = read_json(paths.cluster_map)
    assert cmap["num_experts"] == len(set(cmap["assignment"].values())) >= 2
    assert len(list(paths.warmup.glob("client_*.safetensors"))) == 4
    hist = read_json(paths.strategy_dir("fedlease") / "result.json")["history"]
    assert [h["round"] for h in hist] == [1, 2]
    for c in hist[-1]["eval"]["clients"].values():  # a share of the client's own test examples
        assert c["num_test"] == 8 and c["accuracy"] * 8 == pytest.approx(round(c["accuracy"] * 8))
    # FedLEASE uploads one expert + router, downloads M experts + router: more down than up
    last = hist[-1]
    assert all(last["bytes_down"][c] > last["bytes_up"][c] > 0 for c in last["bytes_up"])
    assert "router" in next(iter(hist[-1]["eval"]["clients"].values()))
    assert (paths.root / "results.md").read_text().count("|") > 10
    assert (paths.plots / "score_per_round.png").stat().st_size > 1000
    # the allocation names the clients its warm-up left at or below their majority floor (its own evaluation)
    warm_clients = read_json(paths.warmup / "summary.json")["history"][-1]["eval"]["clients"]
    at_floor = sorted(int(c) for c, v in warm_clients.items() if v["accuracy"] <= v["majority_accuracy"])
    assert cmap["warmup_at_floor"] == metrics["allocation"]["warmup_at_floor"] == at_floor
    assert cmap["warmup_eval_failed"] == metrics["allocation"]["warmup_eval_failed"] == []
    assert metrics["allocation"]["warmup_floor"] == pytest.approx(
        np.mean([v["majority_accuracy"] for v in warm_clients.values()]))
    # same params and seed -> identical metrics
    again = run_all(config_from_dict(tiny_params(tmp_path / "b")))
    assert _final(again) == _final(metrics)
    # the allocation says when M is the m_max cap (the silhouette had no larger k), in the map and the CLI line
    assert cmap["capped"] == (cmap["num_experts"] == min(cfg.fedlease.m_max, 3))  # 4 clients: k = 2..3
    from fedlease.cli import main

    params = tmp_path / "a.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tmp_path / "a")))
    for override, capped in (("fedlease.m_max=2", True), ("fedlease.clustering.fixed_m=3", False)):
        assert main(["allocate", "--params", str(params), "--set", override]) == 0
        line = capsys.readouterr().out
        assert read_json(paths.cluster_map)["capped"] is capped, override
        assert read_json(paths.cluster_map)["cap"] == ("fedlease.m_max = 2" if capped else None), override
        assert ("at the cap, fedlease.m_max = 2:" in line) is capped, line
        assert ("at or below their majority-class floor" in line) is bool(at_floor), line
    # the configured distance is the one the allocation clusters (saved beside the map for small N)
    from fedlease.allocation import distance_matrix
    from fedlease.io import load_tensors

    assert main(["allocate", "--params", str(params), "--set", "fedlease.clustering.distance=subspace"]) == 0
    warm = [load_tensors(paths.warmup_adapter(c)) for c in range(4)]
    saved = np.load(paths.allocation / "distances.npy", allow_pickle=False)
    assert np.array_equal(saved, distance_matrix(warm, "subspace")) and not np.allclose(saved, distance_matrix(warm))


def test_finished_run_is_a_noop_and_params_change_restarts(tmp_path: Path):
    raw = tiny_params(tmp_path, strategies=["fedit"])
    cfg = config_from_dict(raw)
    first = run_all(cfg)
    ckpt = RunPaths.of(cfg).strategy_dir("fedit") / "checkpoint" / "checkpoint.json"
    stamp = ckpt.stat().st_mtime_ns
    assert _final(run_all(cfg)) == _final(first)
    assert ckpt.stat().st_mtime_ns == stamp, "a finished run must not train again"
    raw["training"]["lr"] = 0.01
    run_all(config_from_dict(raw))
    assert ckpt.stat().st_mtime_ns != stamp, "changed params must not resume a stale checkpoint"


def test_kill_and_resume_gives_identical_metrics(tmp_path: Path):
    raw = tiny_params(tmp_path / "killed", strategies=["fedlease"])
    raw["federation"].update(rounds=4, clients_per_round=2)  # sampled rounds: the resume must replay the choices
    params = tmp_path / "killed.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedlease.cli", "run", "--params", str(params)], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "[fedlease] round 2:" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = read_json(Path(raw["output_dir"]) / "federate" / "fedlease" / "checkpoint" / "checkpoint.json")
    assert ckpt["round"] == 2
    res = subprocess.run([sys.executable, "-m", "fedlease.cli", "run", "--params", str(params)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming after round 2" in res.stderr
    resumed = json.loads((Path(raw["output_dir"]) / "metrics.json").read_text())
    clean_raw = tiny_params(tmp_path / "clean", strategies=["fedlease"])
    clean_raw["federation"].update(rounds=4, clients_per_round=2)
    clean = run_all(config_from_dict(clean_raw))
    assert _final(resumed) == _final(clean)
    hist = read_json(Path(raw["output_dir"]) / "federate" / "fedlease" / "result.json")["history"]
    assert [h["round"] for h in hist] == [1, 2, 3, 4]
    clean_hist = read_json(Path(clean_raw["output_dir"]) / "federate" / "fedlease" / "result.json")["history"]
    assert [h["sampled"] for h in hist] == [h["sampled"] for h in clean_hist]
    assert len({tuple(h["sampled"]) for h in hist}) > 1, "the rounds sampled different clients"


def test_late_joiner_is_assigned_and_trains_from_current_experts(tmp_path: Path):
    from fedlease.late_join import join_client

    from .conftest import write_sentiment_csv

    cfg = config_from_dict(tiny_params(tmp_path, strategies=["fedlease", "local"]))
    run_all(cfg)
    paths = RunPaths.of(cfg)
    stage_dirs = [paths.data, paths.warmup, paths.allocation, paths.root / "federate", paths.plots]  # dvc.yaml's outs
    assert all(d.is_dir() for d in stage_dirs) and paths.metrics.exists() and (paths.root / "results.md").exists()

    def listing() -> dict[str, bytes]:
        files = [f for d in stage_dirs for f in sorted(d.rglob("*")) if f.is_file()]
        return {str(f): f.read_bytes() for f in [*files, paths.metrics, paths.root / "results.md"]}

    before = listing()
    newcomer = write_sentiment_csv(tmp_path / "new.csv", 30, seed=9)
    rec = join_client(cfg, str(newcomer), "sentiment")
    assert rec["client_id"] == 4 and rec["strategy"] == "fedlease"
    assert rec["expert"] == min(range(len(rec["mean_distances"])), key=rec["mean_distances"].__getitem__)
    n_test = round(30 * 8 / (16 + 8))  # the joiner's own split, in the partition's train:test ratio
    assert rec["accuracy"] * n_test == pytest.approx(round(rec["accuracy"] * n_test))
    assert rec["bytes_down"] > rec["bytes_up"] > 0
    cmap = read_json(RunPaths.of(cfg).cluster_map)
    assert len(cmap["assignment"]) == 4, "joining must not re-cluster"
    assert join_client(cfg, str(newcomer), "sentiment")["client_id"] == 5
    # `local` continues from the joiner's own warm-up adapter, as it does for the original clients
    alone = join_client(cfg, str(newcomer), "sentiment", "local")
    assert alone["client_id"] == 6 and alone["strategy"] == "local" and alone["bytes_up"] == 0
    # the joins wrote nothing into a stage's output: `dvc status` stays clean, `dvc repro` has nothing to redo
    assert listing() == before, "a join wrote into a stage's DVC output"
    assert paths.warmup_adapter(6) == paths.late / "warmup" / "client_006.safetensors"
    # the joiner is placed by the distance the allocation is configured with (here the subspace one)
    from fedlease.allocation import distance_matrix
    from fedlease.io import load_tensors
    from fedlease.runtime import strategy_for
    from fedlease.strategies.base import ServerState

    subspace = cfg.model_copy(deep=True)
    subspace.fedlease.clustering.distance = "subspace"
    joiner = load_tensors(paths.warmup_adapter(4))
    peers = [load_tensors(paths.warmup_adapter(c)) for c in range(4)]
    _, placed = strategy_for(subspace, "fedlease", 4).admit(ServerState({}, {"assignment": list(
        cmap["assignment"].values())}), 7, joiner, peers)
    to_peers = distance_matrix([joiner, *peers], "subspace")[0, 1:]
    members = [[c for c in range(4) if cmap["assignment"][str(c)] == e] for e in range(cmap["num_experts"])]
    assert placed["mean_distances"] == [float(np.mean([to_peers[c] for c in m])) for m in members]
    assert paths.warmup_adapter(6).exists() and (paths.late / "federate" / "local" / "clients" / "client_006").is_dir()
    # the same partition written again (a rerun) keeps them; a new partition drops them (their ids would
    # shadow its clients')
    from fedlease.data.stage import run_data_stage

    run_data_stage(cfg)
    assert paths.is_late(4) and paths.warmup_adapter(6).exists()
    run_data_stage(config_from_dict({**tiny_params(tmp_path, strategies=["fedlease", "local"]), "seed": 1}))
    assert not paths.late.exists() and not paths.is_late(4)


def test_inputs_distance_end_to_end_the_warmup_uploads_a_signature_the_allocation_clusters_and_a_joiner_too(
        tmp_path: Path):
    """`fedlease.clustering.distance: inputs`: each client's warm-up upload carries its input signature (one
    d-vector, counted in its upload bytes), the allocation clusters those signatures, the experts stay LoRA
    only, and a late joiner's warm-up brings its own signature; with the paper's distance no signature moves."""
    from fedlease.allocation import SIGNATURE_KEY, distance_matrix
    from fedlease.io import load_tensors
    from fedlease.late_join import join_client
    from fedlease.pipeline import stage_allocate, stage_data, stage_warmup

    from .conftest import write_sentiment_csv

    runs = {}
    for distance in ("inputs", "cosine"):
        cfg = config_from_dict(tiny_params(tmp_path / distance, strategies=["fedlease"],
                                           fedlease__clustering__distance=distance))
        stage_data(cfg)
        stage_warmup(cfg)
        stage_allocate(cfg)
        paths = RunPaths.of(cfg)
        warm = [load_tensors(paths.warmup_adapter(c)) for c in range(4)]
        up = read_json(paths.warmup / "summary.json")["history"][0]["bytes_up"]
        runs[distance] = (cfg, paths, warm, up)
    cfg, paths, warm, up = runs["inputs"]
    assert all(SIGNATURE_KEY in w and w[SIGNATURE_KEY].ndim == 1 for w in warm)
    assert not any(SIGNATURE_KEY in w for w in runs["cosine"][2])
    # computing it changes no training: the warm-up LoRA and head are the paper distance's, bit for bit (so
    # `local`, which continues from the warm-up, need not be rerun beside this option)
    assert all(torch.equal(warm[c][k], runs["cosine"][2][c][k]) for c in range(4) for k in runs["cosine"][2][c])
    from fedlease.local_state import load_local_state
    from fedlease.strategies import warmup_strategy

    heads = [{c: load_local_state(run[0], warmup_strategy(run[0], 4), c, 1) for c in range(4)}
             for run in (runs["inputs"], runs["cosine"])]
    assert all(heads[0][c] and heads[0][c].keys() == heads[1][c].keys()
               and all(torch.equal(heads[0][c][k], heads[1][c][k]) for k in heads[0][c]) for c in range(4))
    # the warm-up is evaluated with the signature in its upload (its LoRA alone is loaded), every client
    evaluation = read_json(paths.warmup / "summary.json")["history"][-1]["eval"]
    assert evaluation["failed_clients"] == [] and all("accuracy" in v for v in evaluation["clients"].values())
    assert read_json(paths.cluster_map)["warmup_eval_failed"] == []
    extra = warm[0][SIGNATURE_KEY].numel() * warm[0][SIGNATURE_KEY].element_size()
    assert all(up[c] == runs["cosine"][3][c] + extra for c in up)  # the signature is in the traffic
    saved = np.load(paths.allocation / "distances.npy", allow_pickle=False)
    assert np.array_equal(saved, distance_matrix(warm, "inputs"))
    assert not any(k.startswith("expert") and "signature" in k
                   for k in load_tensors(paths.allocation / "experts.safetensors"))
    rec = join_client(cfg, str(write_sentiment_csv(tmp_path / "new.csv", 30, seed=9)), "sentiment")
    assert SIGNATURE_KEY in load_tensors(paths.warmup_adapter(rec["client_id"]))
    assert len(rec["mean_distances"]) == read_json(paths.cluster_map)["num_experts"]

def test_client_sampling_is_seeded_and_warmup_covers_everyone(tmp_path: Path):
    from fedlease.server import sample_clients

    raw = tiny_params(tmp_path, strategies=["fedlease"])
    raw["federation"]["clients_per_round"] = 0.5
    raw["federation"]["rounds"] = 3
    cfg = config_from_dict(raw)
    run_all(cfg)
    assert len(list(RunPaths.of(cfg).warmup.glob("client_*.safetensors"))) == 4
    hist = read_json(RunPaths.of(cfg).strategy_dir("fedlease") / "result.json")["history"]
    assert [h["sampled"] for h in hist] == [sample_clients(cfg, r, 4) for r in (1, 2, 3)]
    assert all(len(h["sampled"]) == 2 for h in hist)
    assert len({tuple(h["sampled"]) for h in hist}) > 1, "sampling should vary across rounds"


def test_every_baseline_runs_end_to_end(tmp_path: Path):
    from fedlease.data.stage import load_client
    from fedlease.predict import predict

    cfg = config_from_dict(tiny_params(tmp_path, strategies=["ifca", "ffa_lora", "fedsa_lora", "feddpa", "local"]))
    metrics = run_all(cfg)
    for name in ("ifca", "ffa_lora", "fedsa_lora", "feddpa", "local"):
        hist = read_json(RunPaths.of(cfg).strategy_dir(name) / "result.json")["history"]
        assert all(not h["dropped"] for h in hist), (name, hist[-1]["dropped"])
        # the exported model, rebuilt by `fedlease predict`'s code, scores exactly what the pipeline reported
        last = hist[-1]["eval"]["clients"]["0"]
        data = load_client(cfg, 0)
        labels = predict(RunPaths.of(cfg).strategy_dir(name) / "final" / "", 0, [r["text"] for r in data.test])
        hits = [lab == data.label_names[r["label"]] for lab, r in zip(labels, data.test, strict=True)]
        assert sum(hits) / len(hits) == pytest.approx(last["accuracy"]), name
        assert metrics["methods"][name]["mean"] == pytest.approx(
            sum(c["accuracy"] for c in hist[-1]["eval"]["clients"].values()) / 4), name
    ifca = read_json(RunPaths.of(cfg).strategy_dir("ifca") / "result.json")["history"]
    assert all(ifca[-1]["bytes_down"][c] == 4 * ifca[-1]["bytes_up"][c] for c in ifca[-1]["bytes_up"]), \
        "IFCA downloads its 4 cluster LoRAs and uploads one"
    from fedlease.io import load_tensors
    from fedlease.local_state import load_local_state, local_dir
    from fedlease.strategies import make_strategy

    # `local` continues from the client's own warm-up (adapter and head), run for it without FedLEASE
    local = make_strategy("local", cfg, 4)
    warm_lora = load_tensors(RunPaths.of(cfg).warmup_adapter(0))
    start = load_local_state(cfg, local, 0, 0)
    assert start is not None and any(k.startswith("head.") for k in start)
    assert all(torch.equal(start[k], v) for k, v in warm_lora.items()), "local round 1 starts from the warm-up LoRA"
    after = load_tensors(local_dir(cfg, local, 0) / "round_0001.safetensors")
    assert set(warm_lora) <= set(after) and not all(torch.equal(after[k], v) for k, v in warm_lora.items())
    # IFCA: the server remembers every client's pick, and evaluation gets only that cluster's LoRA
    ifca_meta = read_json(RunPaths.of(cfg).strategy_dir("ifca") / "final" / "meta.json")["state_meta"]
    assert sorted(ifca_meta["assignment"]) == ["0", "1", "2", "3"]
    assert set(ifca_meta["assignment"].values()) <= set(range(4))
    dpa_local = load_tensors(local_dir(cfg, make_strategy("feddpa", cfg, 4), 0)
                             / f"round_{cfg.federation.rounds:04d}.safetensors")
    counts = [v for k, v in dpa_local.items() if k.startswith("dual.") and k.endswith(".count")]
    assert counts and all(float(c) == 5 for c in counts), "FedDPA keeps its local LoRA and 5 references on the client"
    dpa = read_json(RunPaths.of(cfg).strategy_dir("feddpa") / "result.json")["history"]
    weights = [c["instance_weight"] for c in dpa[-1]["eval"]["clients"].values()]
    assert len(weights) == 4 and all(0.0 <= w["min"] <= w["median"] <= w["max"] <= 0.5 for w in weights)
    assert max(w["max"] for w in weights) > 0, "some inputs lean on the local LoRA"
    assert metrics["methods"]["feddpa"]["instance_weight"]["client_means"]
    server_state = RunPaths.of(cfg).strategy_dir("feddpa") / "final" / "server_state.safetensors"
    assert not any(k.startswith("dual.") for k in load_tensors(server_state)), "never uploaded"
    assert dpa[-1]["bytes_up"] == dpa[-1]["bytes_down"], "FedDPA exchanges only the global LoRA"


def test_fedlease_personal_expert_starts_from_the_warmup_stays_home_and_predicts(tmp_path: Path):
    """`fedlease.router.personal_expert`: each client's mixture gains its own LoRA, which starts round 1 as its
    warm-up LoRA, is trained every round, stays in its local state (never in the server's state or the
    uploads: they grow by the router's extra slot alone), shows as the last column of the router telemetry,
    and is part of the exported model (`fedlease predict` scores what the pipeline reported)."""
    from fedlease.data.stage import load_client
    from fedlease.io import load_tensors
    from fedlease.local_state import load_local_state, local_dir
    from fedlease.predict import predict
    from fedlease.runtime import strategy_for

    raw = tiny_params(tmp_path, strategies=["fedlease"], fedlease__router__personal_expert=True)
    cfg = config_from_dict(raw)
    metrics = run_all(cfg)
    paths = RunPaths.of(cfg)
    strategy = strategy_for(cfg, "fedlease", 4)
    warm = load_tensors(paths.warmup_adapter(0))
    start = load_local_state(cfg, strategy, 0, 0)
    assert start is not None and not any(k.startswith("lora.") for k in start)
    assert all(torch.equal(start["personal." + k[len("lora."):]], v) for k, v in warm.items()), \
        "round 1 starts the personal expert from the client's warm-up LoRA"
    after = load_tensors(local_dir(cfg, strategy, 0) / f"round_{cfg.federation.rounds:04d}.safetensors")
    personal = {k: v for k, v in after.items() if k.startswith("personal.")}
    assert len(personal) == len(warm)
    assert not all(torch.equal(personal["personal." + k[5:]], v) for k, v in warm.items()), "trained"
    final = paths.strategy_dir("fedlease") / "final"
    assert not any("personal" in k for k in load_tensors(final / "server_state.safetensors")), "never uploaded"
    hist = read_json(paths.strategy_dir("fedlease") / "result.json")["history"]
    m = read_json(paths.cluster_map)["num_experts"]
    client = hist[-1]["eval"]["clients"]["0"]
    shares = next(iter(client["router"].values()))["expert_weight_share"]
    assert len(shares) == m + 1 and shares[-1] > 0, "the personal expert is the telemetry's last column"
    data = load_client(cfg, 0)
    labels = predict(final, 0, [r["text"] for r in data.test])
    hits = [lab == data.label_names[r["label"]] for lab, r in zip(labels, data.test, strict=True)]
    assert sum(hits) / len(hits) == pytest.approx(client["accuracy"])
    # the evaluated model holds the trained personal LoRA, and it moves the output
    from fedlease.models.adapters import get_state, lora_layers
    from fedlease.runtime import build_client_model, runtime_for
    from fedlease.server import Checkpoint

    rt = runtime_for(cfg)
    state, _ = Checkpoint(paths.strategy_dir("fedlease") / "checkpoint").load()
    model = build_client_model(rt, strategy, 0, len(data.label_names), strategy.eval_download(state, 0), after)
    assert all(torch.equal(v, personal[k]) for k, v in get_state(model, None, ("personal",)).items())
    layer = next(iter(lora_layers(model).values()))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        out = layer(x)
        layer.lora_personal_B["default"].weight.zero_()
        assert not torch.allclose(layer(x), out), "the personal LoRA enters the layer's output"
    # a personal expert without its local LoRA is refused by name, not run as a zero expert
    from fedlease.io import ArtifactError

    without = {k: v for k, v in after.items() if not k.startswith("personal.")}
    with pytest.raises(ArtifactError, match="client 0: fedlease keeps a personal expert"):
        build_client_model(rt, strategy, 0, len(data.label_names), strategy.eval_download(state, 0), without)
    # the uploads grow only by the router's one extra slot (a row of d_in per adapted module), per round
    plain = run_all(config_from_dict(tiny_params(tmp_path / "plain", strategies=["fedlease"])))
    routers = {k: v for k, v in load_tensors(final / "server_state.safetensors").items() if k.startswith("router0.")}
    assert all(v.shape[0] == 2 * m for v in routers.values())
    extra_row = sum(v.shape[1] * v.element_size() for v in routers.values())
    assert metrics["methods"]["fedlease"]["bytes_up_total_per_client"] == \
        plain["methods"]["fedlease"]["bytes_up_total_per_client"] + cfg.federation.rounds * extra_row


def test_adapters_load_with_peft_and_answer_as_the_pipeline(tmp_path: Path):
    """Exported adapters are standard peft folders: PeftModel.from_pretrained on the base model gives the
    pipeline's own logits for a client's model (FedIT), its warm-up adapter, and FedLEASE's experts load."""
    from peft import PeftModel

    from fedlease.data.stage import load_client
    from fedlease.engine.batching import encode_classification
    from fedlease.models.base import load_base_model
    from fedlease.predict import load_client_model

    cfg = config_from_dict(tiny_params(tmp_path, strategies=["fedlease", "fedit"], federation__rounds=1))
    run_all(cfg)
    paths = RunPaths.of(cfg)
    data = load_client(cfg, 2)  # a 3-label topic client
    enc = encode_classification(load_base_model(cfg.model, "classification", Path(cfg.data.cache_dir)).tokenizer,
                                data.test, cfg.model.max_length)
    enc.pop("labels")

    def peft_logits(folder: Path) -> torch.Tensor:
        base = load_base_model(cfg.model, "classification", Path(cfg.data.cache_dir), num_labels=3,
                               seed=cfg.seed).model
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        with torch.no_grad():
            return model(**enc).logits

    ours, _, _, _ = load_client_model(paths.strategy_dir("fedit") / "final", 2)
    with torch.no_grad():
        expected = ours.eval()(**enc).logits
    assert torch.allclose(peft_logits(paths.strategy_dir("fedit") / "peft" / "client_002"), expected, atol=1e-5)
    config = json.loads((paths.strategy_dir("fedit") / "peft" / "client_002" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["modules_to_save"] == ["classifier"]
    assert "library_name: peft" in (paths.strategy_dir("fedit") / "peft" / "client_002" / "README.md").read_text()
    warm = peft_logits(paths.warmup / "peft" / "client_002")
    assert warm.shape == expected.shape and not torch.allclose(warm, expected)
    experts = sorted(p.name for p in (paths.strategy_dir("fedlease") / "peft").iterdir())
    m = read_json(paths.cluster_map)["num_experts"]
    assert experts == [f"expert{e}" for e in range(m)]
    assert peft_logits(paths.strategy_dir("fedlease") / "peft" / "expert0").shape == expected.shape
