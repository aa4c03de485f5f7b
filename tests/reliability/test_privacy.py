"""Privacy: the server side sees only tensors, counts and metrics; DP clipping/noise and epsilon."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlease.config import config_from_dict
from fedlease.data.stage import load_client
from fedlease.pipeline import run_all
from fedlease.privacy import clip_and_noise, epsilon_after, noise_multiplier
from fedlease.records import ClientTrainResult
from fedlease.server import sequential_mapper

from ..conftest import tiny_params


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (_strings(k) + _strings(v))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


@pytest.mark.slow
def test_server_receives_no_raw_examples(tmp_path: Path):
    received: list[Any] = []

    def spying(fn, calls, label):
        results = sequential_mapper(fn, calls, label)
        received.extend(results)
        return results

    cfg = config_from_dict(tiny_params(tmp_path, strategies=["fedlease", "fedit"]))
    run_all(cfg, mapper=spying)
    texts = {r[k] for c in range(4) for split in ("train", "test") for r in getattr(load_client(cfg, c), split)
             for k in ("text", "text_pair") if r.get(k)}
    assert received
    for res in received:
        if isinstance(res, ClientTrainResult):  # a typed record of small facts: check its fields alike
            res = asdict(res)
        assert isinstance(res, dict), type(res)
        for value in res.values():
            assert isinstance(value, (int, float, str, dict, list, type(None)))
        for s in _strings(res):
            assert not any(t in s for t in texts), f"raw example text reached the server: {s!r}"


def test_clip_and_noise_hand_checked():
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # norm 5
    clipped, norm = clip_and_noise(update, clip_norm=1.0, noise_multiplier=0.0, seed=0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([[0.8]]))
    small, _ = clip_and_noise({"a": torch.tensor([0.3, 0.4])}, 1.0, 0.0, 0)
    assert torch.allclose(small["a"], torch.tensor([0.3, 0.4])), "updates inside the ball are not scaled"
    noisy = torch.stack([clip_and_noise({"a": torch.zeros(2000)}, 0.5, 2.0, s)[0]["a"] for s in range(5)])
    assert noisy.std().item() == pytest.approx(1.0, rel=0.05)  # sigma * C = 2.0 * 0.5


def test_epsilon_grows_with_rounds_and_target_is_met(tmp_path: Path):
    raw = tiny_params(tmp_path)
    raw["privacy"] = {"enabled": True, "noise_multiplier": 1.0}
    cfg = config_from_dict(raw)
    eps = [epsilon_after(cfg, r, 4) for r in (1, 2, 4)]
    assert eps[0] < eps[1] < eps[2]
    raw["privacy"] = {"enabled": True, "target_epsilon": 4.0}
    cfg = config_from_dict(raw)
    assert epsilon_after(cfg, 2, 2) == pytest.approx(4.0, abs=0.05), "sigma is solved to spend the target"
    assert epsilon_after(cfg, 5, 5) == pytest.approx(4.0, abs=0.05), "over the method's own rounds"
    assert noise_multiplier(cfg, 5) > noise_multiplier(cfg, 2) > 0, "more rounds, more noise per round"


@pytest.mark.slow
def test_dp_run_logs_epsilon_per_round(tmp_path: Path):
    raw = tiny_params(tmp_path, strategies=["fedlease"])
    raw["privacy"] = {"enabled": True, "target_epsilon": 8.0, "clip_norm": 0.5}
    metrics = run_all(config_from_dict(raw))
    from fedlease.io import read_json

    hist = read_json(Path(raw["output_dir"]) / "federate" / "fedlease" / "result.json")["history"]
    eps = [h["epsilon"] for h in hist]
    assert eps == sorted(eps) and eps[-1] <= 8.0 + 1e-6 and not math.isnan(metrics["methods"]["fedlease"]["mean"])
