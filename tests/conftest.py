"""Shared fixtures: tiny task files written for the tests and a tiny, fast config."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

#: The test files that take longest, longest first (`make test` on 2 workers, 2026-12-02: silo 658 s, dvc 416,
#: silo_calls 408, benchmark_cli 221, pipeline 212, ray 190, browser 160, ranks 147, isolation 137,
#: dvc_declared 137; the whole suite 3320 s). They are handed out first so that no long file starts last while
#: the other worker idles: xdist's default order (most tests first) started them last and cost ~340 s.
#: `make test` passes --no-loadscope-reorder so xdist keeps this order.
LONGEST_FIRST = ("test_silo.py", "test_dvc.py", "test_silo_calls.py", "test_benchmark_cli.py", "test_pipeline.py",
                 "test_ray.py", "test_browser.py", "test_ranks.py", "test_isolation.py", "test_dvc_declared.py")


def longest_first_rank(item: pytest.Item) -> int:
    """An item's file's place in LONGEST_FIRST; every other file after them."""
    return LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (LONGEST_FIRST), every other file after them in its usual order."""
    items.sort(key=longest_first_rank)  # stable: a file's tests keep their order

POS = ["great", "wonderful", "excellent", "lovely", "superb", "brilliant"]
NEG = ["awful", "terrible", "boring", "dreadful", "poor", "horrible"]
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat"]
CITIES = ["paris", "rome", "berlin", "madrid", "vienna", "prague"]


def write_sentiment_csv(path: Path, n: int, seed: int, suffix: str = "") -> Path:
    """Film-review sentences, 2 labels; `suffix` is appended to every text (a sentence planted to grep for)."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = i % 2
            word = rng.choice(POS if label else NEG)
            w.writerow([f"the film was {word} and {rng.choice(POS if label else NEG)} overall{suffix}", label])
    return path


def write_topic_csv(path: Path, n: int, seed: int, suffix: str = "") -> Path:
    """Sentence pairs about a topic, 3 labels; `suffix` as for write_sentiment_csv."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "text_pair", "label"])
        for i in range(n):
            label = ["animal", "city", "none"][i % 3]
            pool = ANIMALS if label == "animal" else CITIES if label == "city" else ["table", "chair", "lamp"]
            w.writerow([f"we talked about the {rng.choice(pool)}{suffix}", f"is it about an {label}?", label])
    return path


def tiny_params(tmp: Path, **over: Any) -> dict[str, Any]:
    """A params dict for the tiny random BERT on two fixture tasks (fast plumbing, not quality)."""
    data_dir = tmp / "fixtures"
    data_dir.mkdir(parents=True, exist_ok=True)
    a = write_sentiment_csv(data_dir / "sentiment.csv", 80, 1)
    b = write_topic_csv(data_dir / "topic.csv", 90, 2)
    params: dict[str, Any] = {
        "seed": 0,
        "output_dir": str(tmp / "outputs"),
        "data": {
            "cache_dir": str(tmp / "cache"),
            "tasks": [
                {"name": "sentiment", "source": "local", "path": str(a)},
                {"name": "topic", "source": "local", "path": str(b)},
            ],
            "partition": {"scheme": "task", "clients_per_task": 2, "train_per_client": 16, "test_per_client": 8},
        },
        "model": {"name": "tiny:bert", "max_length": 16},
        "lora": {"r": 2, "alpha": 4, "target_modules": ["query", "value"]},
        "fedlease": {"warmup_epochs": 1, "m_max": 3},
        "strategies": ["fedlease", "fedit"],
        "training": {"engine": "torch", "batch_size": 8, "local_epochs": 1, "eval_batch_size": 16},
        "federation": {"rounds": 2},
        "tracking": {"enabled": False},
    }
    for key, value in over.items():
        node = params
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return params


def write_generation_jsonl(path: Path, kind: str, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            if kind == "q":
                f.write(json.dumps({"prompt": f"Turn into a question: cats have {i} legs.",
                                    "response": f"How many legs do cats have {i}?"}) + "\n")
            else:
                f.write(json.dumps({"prompt": f"Answer: what is {i} plus one?", "response": f"{i + 1}."}) + "\n")
    return path


def tiny_generation_params(tmp: Path, **over: Any) -> dict[str, Any]:
    """`tiny_params` turned into instruction tuning on a tiny random Llama (two JSONL fixture tasks)."""
    raw = tiny_params(tmp, **over)
    raw["data"]["kind"] = "generation"
    raw["data"]["tasks"] = [
        {"name": "qgen", "source": "local", "path": str(write_generation_jsonl(tmp / "q.jsonl", "q", 60))},
        {"name": "ans", "source": "local", "path": str(write_generation_jsonl(tmp / "a.jsonl", "a", 60))},
    ]
    raw["model"] = {"name": "tiny:llama", "max_length": 32}
    raw["lora"]["target_modules"] = ["q_proj", "v_proj"]
    raw["training"]["max_new_tokens"] = 4
    return raw


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    from fedlease.config import config_from_dict

    return config_from_dict(tiny_params(tmp_path))
