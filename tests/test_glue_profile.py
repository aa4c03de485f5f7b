"""The paper's GLUE profile (params_glue.yaml), offline: the same four tasks, each a small dataset in the
`datasets` on-disk format with GLUE's own column names, read through the profile's `columns` mappings."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from fedlease.config import TaskSpec, config_from_dict, read_params_file
from fedlease.data.sources import DataError, read_hf
from fedlease.pipeline import run_all

from .conftest import REPO

# GLUE's column names per configuration (the text columns; every one also has label and idx)
GLUE_COLUMNS = {"sst2": ["sentence"], "qnli": ["question", "sentence"], "mrpc": ["sentence1", "sentence2"],
                "qqp": ["question1", "question2"]}


def _save_glue_like(root: Path, config: str, n: int, seed: int) -> Path:
    """A DatasetDict with GLUE's columns and a ClassLabel label, written by `save_to_disk`."""
    import datasets

    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]

    def split(size: int, tag: str) -> datasets.Dataset:
        rows: dict[str, list[Any]] = {col: [] for col in GLUE_COLUMNS[config]}
        rows["label"], rows["idx"] = [], []
        for i in range(size):
            label = i % 2
            for c, col in enumerate(GLUE_COLUMNS[config]):
                rows[col].append(f"{config} {tag} {col} {i} {rng.choice(words)} {'yes' if label else 'no'} {c}")
            rows["label"].append(label)
            rows["idx"].append(i)
        features = datasets.Features({**{col: datasets.Value("string") for col in GLUE_COLUMNS[config]},
                                      "label": datasets.ClassLabel(names=["no", "yes"]),
                                      "idx": datasets.Value("int32")})
        return datasets.Dataset.from_dict(rows, features=features)

    path = root / config
    datasets.DatasetDict({"train": split(n, "train"), "validation": split(8, "val")}).save_to_disk(str(path))
    return path


def test_glue_profile_runs_offline_on_saved_datasets(tmp_path: Path):
    raw = read_params_file(REPO / "params_glue.yaml")
    assert [t["hf_config"] for t in raw["data"]["tasks"]] == ["sst2", "qnli", "mrpc", "qqp"]
    for seed, task in enumerate(raw["data"]["tasks"]):
        task["path"] = str(_save_glue_like(tmp_path / "glue", task["hf_config"], 40, seed))
    raw.update(output_dir=str(tmp_path / "out"), strategies=["fedlease", "local"], tracking={"enabled": False})
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    raw["data"]["partition"].update(clients_per_task=2, train_per_client=12, test_per_client=8)
    raw["model"] = {"name": "tiny:bert", "max_length": 24}
    raw["fedlease"] = {"warmup_epochs": 1, "m_max": 3}
    raw["training"] = {"engine": "torch", "batch_size": 8, "local_epochs": 1, "eval_batch_size": 16}
    raw["federation"] = {"rounds": 1}
    metrics = run_all(config_from_dict(raw))

    clients = sorted((tmp_path / "out" / "data" / "clients").glob("client_*.json"))
    assert len(clients) == 8
    by_task: dict[str, dict[str, Any]] = {}
    for path in clients:
        client = json.loads(path.read_text())
        by_task.setdefault(client["task"], client)
    for name, config in [("sst2", "sst2"), ("qnli", "qnli"), ("mrpc", "mrpc"), ("qqp", "qqp")]:
        example = by_task[name]["train"][0]
        first, *second = GLUE_COLUMNS[config]
        assert example["text"].startswith(f"{config} train {first} "), (name, example)
        if second:
            assert example["text_pair"].startswith(f"{config} train {second[0]} "), (name, example)
        else:
            assert example["text_pair"] is None
        # the dataset's ClassLabel names, not its ids, and the label follows the text
        assert by_task[name]["label_names"] == ["no", "yes"]
        assert example["label"] == (1 if " yes " in example["text"] else 0)
    assert set(metrics["methods"]) >= {"fedlease", "local"}


def test_hf_source_errors_name_the_task(tmp_path: Path):
    path = _save_glue_like(tmp_path, "mrpc", 6, 0)
    with pytest.raises(DataError, match=r"task pairs: columns names \['premise'\]"):
        read_hf(TaskSpec(name="pairs", source="hf", path=str(path), columns={"text": "premise"}), "classification")
    with pytest.raises(DataError, match=r"task pairs: no split 'test' \(has \['train', 'validation'\]\)"):
        read_hf(TaskSpec(name="pairs", source="hf", path=str(path), hf_split="test",
                         columns={"text": "sentence1"}), "classification")
    with pytest.raises(DataError, match="missing column 'text'"):
        read_hf(TaskSpec(name="pairs", source="hf", path=str(path)), "classification")
