"""Clients as they come (`partition.scheme: files`): each client from its own file, any size, its task
label optional (ARI only when every task is known)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from fedlease.config import ConfigError, config_from_dict
from fedlease.data.sources import DataError
from fedlease.data.stage import run_data_stage
from fedlease.pipeline import run_all
from fedlease.report import results_table

from .conftest import tiny_params, write_sentiment_csv, write_topic_csv


def _files_params(tmp: Path, with_tasks: bool) -> dict[str, Any]:
    fixtures = tmp / "own"
    fixtures.mkdir(parents=True, exist_ok=True)
    renamed = fixtures / "c3.csv"  # a client whose file uses its own column names
    with write_topic_csv(fixtures / "tmp.csv", 70, 9).open() as f, renamed.open("w", newline="") as out:
        rows = list(csv.DictReader(f))
        w = csv.writer(out)
        w.writerow(["utterance", "question", "answer"])
        w.writerows([r["text"], r["text_pair"], r["label"]] for r in rows)
    clients = [
        {"path": str(write_sentiment_csv(fixtures / "c0.csv", 24, 1)), "task": "sentiment"},
        {"path": str(write_sentiment_csv(fixtures / "c1.csv", 90, 2)), "task": "sentiment",
         "test_path": str(write_sentiment_csv(fixtures / "c1_test.csv", 12, 3))},
        {"path": str(write_topic_csv(fixtures / "c2.csv", 40, 4)), "task": "topic"},
        {"path": str(renamed), "task": "topic",
         "columns": {"text": "utterance", "text_pair": "question", "label": "answer"}},
    ]
    if not with_tasks:
        for c in clients:
            del c["task"]
    raw = tiny_params(tmp, strategies=["fedlease", "local"], federation__rounds=1)
    raw["data"] = {"cache_dir": str(tmp / "cache"), "tasks": [], "clients": clients,
                   "partition": {"scheme": "files", "test_fraction": 0.25, "min_test_per_client": 4}}
    return raw


def test_each_client_from_its_own_file_any_size(tmp_path: Path):
    cfg = config_from_dict(_files_params(tmp_path, with_tasks=True))
    assert cfg.num_clients == 4
    manifest = run_data_stage(cfg)
    # sizes follow each client's own file: 24 -> 18 + 6, 90 + its own 12 test, 40 -> 30 + 10, 70 -> 52 + 18
    assert [(c["train"], c["test"]) for c in manifest["clients"]] == [(18, 6), (90, 12), (30, 10), (52, 18)]
    assert [c["task"] for c in manifest["clients"]] == ["sentiment", "sentiment", "topic", "topic"]
    renamed = json.loads((tmp_path / "outputs" / "data" / "clients" / "client_003.json").read_text())
    assert renamed["train"][0]["text"].startswith("we talked about") and renamed["train"][0]["text_pair"]
    metrics = run_all(cfg)
    assert isinstance(metrics["allocation"]["ari_vs_task"], float)
    assert "ARI vs true tasks = " in results_table(metrics)


def test_unknown_tasks_run_and_report_no_ari(tmp_path: Path):
    cfg = config_from_dict(_files_params(tmp_path, with_tasks=False))
    metrics = run_all(cfg)
    manifest = json.loads((tmp_path / "outputs" / "data" / "manifest.json").read_text())
    assert manifest["tasks_known"] is False and {c["task"] for c in manifest["clients"]} == {"unlabelled"}
    assert metrics["allocation"]["ari_vs_task"] is None
    assert metrics["methods"]["fedlease"]["ari_vs_task"] is None
    assert "ARI vs true tasks: not known" in results_table(metrics)


def test_bad_client_files_are_named(tmp_path: Path):
    raw = _files_params(tmp_path, with_tasks=True)
    raw["data"]["partition"]["min_test_per_client"] = 8  # client 0 holds 24 examples: 6 test
    with pytest.raises(DataError, match=r"data.clients.0 \(.*c0.csv\): 6 test examples, fewer than"):
        run_data_stage(config_from_dict(raw))
    raw = _files_params(tmp_path, with_tasks=True)
    raw["data"]["tasks"] = [{"name": "x", "source": "local", "path": "x.csv"}]
    with pytest.raises(ConfigError, match="data.tasks: partition.scheme files reads data.clients"):
        config_from_dict(raw)
    raw["data"]["tasks"], raw["data"]["clients"] = [], []
    with pytest.raises(ConfigError, match="data.clients: partition.scheme files needs one entry per client"):
        config_from_dict(raw)
    raw = _files_params(tmp_path, with_tasks=True)
    raw["data"]["clients"][3]["columns"] = {"text": "nope"}
    with pytest.raises(DataError, match=r"task topic: columns names \['nope'\]"):
        run_data_stage(config_from_dict(raw))


def test_a_declared_label_space_orders_the_head(tmp_path: Path):
    """label_names: the client's file holds one label of three; the head follows the declared order."""
    path = tmp_path / "one_label.csv"
    path.write_text("text,label\n" + "".join(f"row {i},city\n" for i in range(20)))
    raw = _files_params(tmp_path, with_tasks=True)
    raw["data"]["clients"][0] = {"path": str(path), "task": "topic", "label_names": ["animal", "city", "none"]}
    run_data_stage(config_from_dict(raw))
    client = json.loads((tmp_path / "outputs" / "data" / "clients" / "client_000.json").read_text())
    assert client["label_names"] == ["animal", "city", "none"]
    assert {r["label"] for r in client["train"] + client["test"]} == {1}
    raw["data"]["clients"][0]["label_names"] = ["animal", "none"]
    with pytest.raises(DataError, match=r"data.clients.0 \(.*one_label.csv\): labels \['city'\] are not in"):
        run_data_stage(config_from_dict(raw))
