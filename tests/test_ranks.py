"""Several ranks per client (`training.deepspeed.ranks_per_client`): the row split, the engine in a
two-process DeepSpeed group against one process, and a client round through the group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedlease.isolation import await_processes, start_process
from fedlease.ranks import RANK_GROUP_ENV, free_port, rank_share

ROOT = Path(__file__).resolve().parents[1]


def test_rank_share_weights_each_share_to_the_whole_batch_mean():
    """5 rows over 2 ranks: rows 0-2 (factor 3 * 2 / 5 = 1.2) and 3-4 (0.8). DeepSpeed averages the ranks:
    (1.2 * mean(l0..l2) + 0.8 * mean(l3, l4)) / 2 = mean(l0..l4). Fewer rows than ranks: the whole batch."""
    batch = {"x": torch.arange(5.0), "y": torch.arange(5) * 10}
    (first, f0), (second, f1) = rank_share(batch, 0, 2), rank_share(batch, 1, 2)
    assert first["x"].tolist() == [0.0, 1.0, 2.0] and first["y"].tolist() == [0, 10, 20]
    assert second["x"].tolist() == [3.0, 4.0]
    assert (f0, f1) == pytest.approx((1.2, 0.8))
    losses = torch.tensor([0.3, 1.1, 0.7, 2.0, 0.1])
    assert (f0 * losses[:3].mean() + f1 * losses[3:].mean()) / 2 == pytest.approx(float(losses.mean()))
    whole, f = rank_share({"x": torch.arange(1.0)}, 1, 2)
    assert whole["x"].tolist() == [0.0] and f == 1.0


def test_rank_share_follows_the_loss_denominator_of_token_and_class_weighted_means():
    """A token-mean loss (generation) and a class-weighted mean: each share's factor is its part of the
    denominator x world, so (sum over ranks of factor x share mean) / world is the whole batch's loss."""
    from fedlease.engine.trainer import loss_row_weights

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100], [-100, 1, 2, 3], [-100, -100, -100, 4]])
    token_loss = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.5, 0.5, 3.0], [0.0, 0.0, 0.0, 9.0]])
    scored = labels != -100
    whole = token_loss[scored].mean()
    weights = loss_row_weights({"labels": labels}, "generation")
    assert weights.tolist() == [2, 1, 3, 1]
    combined = 0.0
    for rank in range(2):
        share, factor = rank_share({"labels": labels, "loss": token_loss}, rank, 2, weights)
        combined += factor * share["loss"][share["labels"] != -100].mean() / 2
    assert float(combined) == pytest.approx(float(whole))
    # class-weighted: rows' losses l, weights w[label]: the loss is sum(w l) / sum(w)
    labels, losses, class_weights = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), \
        torch.tensor([0.5, 2.0, 1.0])
    w = loss_row_weights({"labels": labels}, "classification", class_weights)
    whole = (w * losses).sum() / w.sum()
    combined = 0.0
    for rank in range(2):
        share, factor = rank_share({"labels": labels, "loss": losses}, rank, 2, w)
        sw = class_weights[share["labels"]]
        combined += factor * (sw * share["loss"]).sum() / sw.sum() / 2
    assert float(combined) == pytest.approx(float(whole))


def test_two_ranks_on_threads_are_refused_naming_the_keys(tmp_path: Path):
    from tests.conftest import tiny_params

    from fedlease.config import ConfigError, config_from_dict

    raw = tiny_params(tmp_path, training__engine="deepspeed", training__deepspeed={"ranks_per_client": 2},
                      orchestration={"task_runner": "threads"})
    with pytest.raises(ConfigError, match="ranks_per_client: 2 .*task_runner: threads"):
        config_from_dict(raw)
    raw["training"]["batch_size"] = 7
    raw["orchestration"] = {"task_runner": "sequential"}
    with pytest.raises(ConfigError, match="cannot share batch_size 7"):
        config_from_dict(raw)


def _spawn_one() -> dict[str, Any]:
    """(In a spawned process.) Starts a process of its own, as a client call starting its rank group does."""
    return {"child": await_processes([start_process(_fail_if, {"fail": False}, "grandchild")], 60)[0]}


def _fail_if(fail: bool) -> dict[str, Any]:
    if fail:
        raise RuntimeError("rank went wrong")
    return {"ok": True}


def test_a_fresh_process_call_may_start_its_rank_group_and_a_failure_names_its_process(tmp_path: Path):
    """`orchestration.fresh_process` with ranks_per_client > 1: the call's process starts the rank processes
    (a daemonic one may not have children); a failing process's error says which one it was."""
    from tests.conftest import tiny_params

    from fedlease.config import config_from_dict
    from fedlease.isolation import run_in_fresh_process

    cfg = config_from_dict(tiny_params(tmp_path, training__engine="deepspeed",
                                       training__deepspeed={"ranks_per_client": 2}))
    assert run_in_fresh_process(_spawn_with_cfg, {"cfg": cfg}, 120) == {"child": {"ok": True}}
    with pytest.raises(RuntimeError, match="rank went wrong") as err:
        await_processes([start_process(_fail_if, {"fail": True}, "client 3 rank 1")], 60)
    assert "(in client 3 rank 1)" in err.value.__notes__


def _spawn_with_cfg(cfg: Any) -> dict[str, Any]:
    return _spawn_one()


def _train_tiny(world: int) -> dict[str, Any]:
    """(In a spawned process.) A dropout-free tiny BERT trained by the DeepSpeed engine (class-weighted
    loss, clipping at 1.0) on fixed batches of 10, 3, 1 and 10 rows; the rows each forward saw, the mean
    loss, the final weights."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlease.config import TrainingConfig
    from fedlease.engine import trainer
    from fedlease.engine.batching import Batch

    seen: list[int] = []
    original = trainer.compute_loss

    def recording(model: Any, tensors: dict[str, torch.Tensor], kind: str, weights: Any = None) -> torch.Tensor:
        seen.append(int(tensors["labels"].shape[0]))
        return original(model, tensors, kind, weights)

    trainer.compute_loss = recording
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))
    gen = torch.Generator().manual_seed(1)
    batches = [Batch({"input_ids": torch.randint(1, 50, (n, 6), generator=gen),
                      "attention_mask": torch.ones(n, 6, dtype=torch.long),
                      "labels": torch.randint(0, 3, (n,), generator=gen)}, n) for n in (10, 3, 1, 10)]
    cfg = TrainingConfig(engine="deepspeed", batch_size=10, reserve_steps=0,
                         deepspeed={"zero_stage": 2, "ranks_per_client": world})
    engine = trainer.DeepSpeedEngine(cfg, ROOT / ".cache")
    # a class-weighted loss: a share's factor must follow the weights of its rows, not their count
    result = engine.train(model, list(model.parameters()), batches, "classification",
                          class_weights=torch.tensor([0.5, 2.0, 1.0]))
    return {"rows": seen, "loss": result.loss, "steps": result.steps,
            "weights": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}}  # no shared fds


def test_two_ranks_train_what_one_process_trains_each_on_half_the_rows():
    """ZeRO-2 over a group of two processes (gloo on this CPU) vs the same engine alone: the same weights
    within float rounding, the same mean loss and steps, and each rank ran only its share of each batch."""
    alone = await_processes([start_process(_train_tiny, {"world": 1}, "one process")], 300)[0]
    port = str(free_port())
    started = [start_process(_train_tiny, {"world": 2}, f"rank {r}",
                             {RANK_GROUP_ENV: "1", "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                              "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
               for r in range(2)]
    rank0, rank1 = await_processes(started, 300)
    assert alone["rows"] == [10, 3, 1, 10]
    assert rank0["rows"] == [5, 2, 1, 5] and rank1["rows"] == [5, 1, 1, 5]
    assert rank0["steps"] == alone["steps"] == 4
    assert rank0["loss"] == pytest.approx(alone["loss"], rel=1e-5) and rank1["loss"] == rank0["loss"]
    moved = 0
    for key, value in alone["weights"].items():
        value, mine, other = torch.from_numpy(value), *(torch.from_numpy(r["weights"][key]) for r in (rank0, rank1))
        assert torch.allclose(mine, value, atol=1e-5), key
        assert torch.equal(mine, other), key
        moved += int(not torch.equal(value, _initial_weight(key)))
    assert moved > 10, "the weights must have trained"


def _initial_weight(key: str) -> torch.Tensor:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))
    return model.state_dict()[key]


def test_a_client_round_on_two_ranks_writes_one_upload_from_its_group(tmp_path: Path, monkeypatch):
    """The warm-up of two tiny clients with `ranks_per_client: 2` (DeepSpeed): each client's round goes to a
    group of two processes (and only there), rank 0's adapter lands where the server reads it, with the
    steps of one rank and its loss up to the dropout masks each share draws (tiny BERT keeps dropout 0.1;
    the exact equality is the engine test's above)."""
    import json

    from tests.conftest import tiny_params

    from fedlease import client
    from fedlease.config import config_from_dict
    from fedlease.io import load_tensors
    from fedlease.pipeline import stage_data, stage_warmup

    groups: list[tuple[int, int]] = []
    real = client.run_on_ranks

    def counting(fn: Any, call: dict[str, Any], world: int, timeout_s: float, who: str) -> Any:
        groups.append((call["client_id"], world))
        return real(fn, call, world, timeout_s, who)

    monkeypatch.setattr(client, "run_on_ranks", counting)
    runs = {}
    for ranks in (1, 2):
        raw = tiny_params(tmp_path / f"r{ranks}", data__partition__clients_per_task=1,
                          training__engine="deepspeed", training__deepspeed={"ranks_per_client": ranks})
        cfg = config_from_dict(raw)
        stage_data(cfg)
        adapters = [load_tensors(Path(p)) for p in stage_warmup(cfg)]
        history = json.loads((Path(cfg.output_dir) / "warmup" / "summary.json").read_text())["history"]
        runs[ranks] = adapters, history[0]
    assert sorted(groups) == [(0, 2), (1, 2)], "each client's round ran as one group of two, only with 2 ranks"
    (one, h1), (two, h2) = runs[1], runs[2]
    assert h2["steps"] == h1["steps"] and h2["loss"] == pytest.approx(h1["loss"], rel=0.01)
    for mine, single in zip(two, one):
        assert mine.keys() == single.keys() and all(float(v.norm()) > 0 for v in mine.values())
