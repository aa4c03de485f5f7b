"""NLG plumbing on a tiny random Llama: generation tasks through the same strategies and stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlease.config import config_from_dict
from fedlease.pipeline import run_all

from .conftest import REPO, tiny_generation_params

pytestmark = pytest.mark.slow


def test_generation_pipeline_reports_rouge_l(tmp_path: Path):
    cfg = config_from_dict(tiny_generation_params(tmp_path, strategies=["fedlease", "local", "fedit"]))
    metrics = run_all(cfg)
    for name in ("fedlease", "local", "fedit"):
        m = metrics["methods"][name]
        assert m["metric"] == "rougeL"
        assert set(m["per_task"]) == {"qgen", "ans"}
    # the NLG table's equal-compute floor runs on the generation path and exchanges nothing
    assert metrics["methods"]["local"]["bytes_up_per_client_round"] == 0.0
    # the exported NLG model, rebuilt by `fedlease predict`'s code, generates exactly what was scored:
    # ROUGE-L of its answers on client 0's test prompts is the client's reported score
    from fedlease.data.stage import load_client
    from fedlease.engine.evaluate import rouge_l as score
    from fedlease.io import read_json
    from fedlease.paths import RunPaths
    from fedlease.predict import predict

    data = load_client(cfg, 0)
    outs = predict(RunPaths.of(cfg).strategy_dir("fedlease") / "final", 0, [r["prompt"] for r in data.test])
    assert len(outs) == len(data.test) and all(isinstance(o, str) for o in outs)
    hist = read_json(RunPaths.of(cfg).strategy_dir("fedlease") / "result.json")["history"]
    reported = hist[-1]["eval"]["clients"]["0"]["rougeL"]
    assert score(outs, [r["response"] for r in data.test]) == pytest.approx(reported)


def test_nlg_profile_is_valid():
    from fedlease.config import load_config

    cfg = load_config(REPO / "params_nlg.yaml")
    assert cfg.data.kind == "generation" and cfg.num_clients == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_packaged_decoder_generates_and_rouge_is_sane(tmp_path: Path):
    """The real SmolLM2-135M-Instruct (converted from the wheel's GGUF once, cached under .cache)."""
    from fedlease.config import ModelConfig
    from fedlease.engine.evaluate import generate, rouge_l
    from fedlease.models.base import load_base_model

    loaded = load_base_model(ModelConfig(name="packaged:smollm2-135m", max_length=64), "generation",
                             REPO / ".cache")
    prompts = ["Repeat exactly this sentence: the cat sat on the mat.",
               "What is the capital of France? Answer in one word."]
    outs = generate(loaded.model, loaded.tokenizer, prompts, max_length=64, max_new_tokens=16, batch_size=2)
    assert len(outs) == 2 and all(isinstance(o, str) and o for o in outs)
    assert rouge_l(outs[:1], ["the cat sat on the mat."]) > 0.5, outs
    assert "paris" in outs[1].lower(), outs
    assert rouge_l(["completely unrelated words"], ["the cat sat on the mat"]) == 0.0
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0


def test_generation_under_the_inputs_distance_signs_prompts_and_runs_to_the_end(tmp_path: Path):
    """The input-signature distance on a decoder: each client's signature is its prompts' mean last-layer
    representation; the warm-up is evaluated (ROUGE-L, no failed client) and FedLEASE runs on the clusters."""
    from fedlease.allocation import SIGNATURE_KEY
    from fedlease.io import load_tensors, read_json
    from fedlease.paths import RunPaths

    cfg = config_from_dict(tiny_generation_params(tmp_path, strategies=["fedlease"],
                                                  fedlease__clustering__distance="inputs"))
    metrics = run_all(cfg)
    paths = RunPaths.of(cfg)
    signatures = [load_tensors(paths.warmup_adapter(c))[SIGNATURE_KEY] for c in range(4)]
    assert all(s.ndim == 1 and bool(s.isfinite().all()) for s in signatures)
    assert not all(bool((s == signatures[0]).all()) for s in signatures[1:])  # clients' prompts differ
    warm = read_json(paths.warmup / "summary.json")["history"][-1]["eval"]
    assert warm["failed_clients"] == [] and all("rougeL" in v for v in warm["clients"].values())
    assert metrics["methods"]["fedlease"]["metric"] == "rougeL" and metrics["allocation"]["warmup_eval_failed"] == []
