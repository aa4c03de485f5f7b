"""Client-side work: one local training round or one evaluation, from files to files.

Each call reads the server's download, the client's own data and its local state, trains or
evaluates, and writes its upload; it returns only small facts (paths, counts, metrics). Raw
examples never leave this module.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import zlib
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from fedlease import faults
from fedlease.allocation import SIGNATURE_KEY
from fedlease.comm import nbytes
from fedlease.config import Config
from fedlease.data.stage import load_client
from fedlease.engine.batching import iterate_batches
from fedlease.engine.evaluate import classification_metrics, encode_inputs, generate, predict_labels, rouge_l
from fedlease.engine.trainer import TrainResult, autocast_for, compute_loss, device
from fedlease.exchange import read_download, write_upload
from fedlease.local_state import load_local_state, save_local_state
from fedlease.models.adapters import attach_telemetry, detach_telemetry, get_state, set_state, set_trainable
from fedlease.models.dual import mean_last_hidden, recorded_weights
from fedlease.ranks import claim_device, in_rank_group, rank_and_world, run_on_ranks
from fedlease.records import ClientTrainResult
from fedlease.runtime import SEEDED, ClientRuntime, build_client_model, runtime_for, strategy_for
from fedlease.strategies.base import Download, ModelSpec, Strategy, Tensors


def client_seed(seed: int, client_id: int, round_: int, strategy: str) -> int:
    return (seed * 1_000_003 + client_id * 1009 + round_ * 17 + zlib.crc32(strategy.encode())) % (2**31)


def _client_model(rt: ClientRuntime, strategy: Strategy, client_id: int, num_labels: int, download_path: str,
                  local_up_to: int) -> tuple[PeftModel, Any]:
    download = read_download(download_path, rt.cfg.federation.exchange, who=f"client {client_id}")
    local = load_local_state(rt.cfg, strategy, client_id, local_up_to)
    return build_client_model(rt, strategy, client_id, num_labels, download, local), download


def client_train(cfg: Config, strategy_name: str, client_id: int, round_: int, download_path: str,
                 upload_path: str, num_clients: int) -> ClientTrainResult:
    """One local round: load, train what the strategy trains, write the upload and local state. With
    `training.deepspeed.ranks_per_client` > 1, the round runs as a group of that many processes (one per
    device, fedlease/ranks.py) and rank 0 writes the files."""
    ranks = cfg.training.deepspeed.ranks_per_client
    if ranks > 1 and not in_rank_group():
        call = dict(cfg=cfg, strategy_name=strategy_name, client_id=client_id, round_=round_,
                    download_path=download_path, upload_path=upload_path, num_clients=num_clients)
        return run_on_ranks(client_train, call, ranks, cfg.orchestration.task_timeout_s, f"client {client_id}")
    claim_device()
    t0 = time.perf_counter()
    strategy = strategy_for(cfg, strategy_name, num_clients)
    if strategy.federated:  # injected faults hit the federated rounds, not the warm-up
        faults.before_training(cfg, client_id, round_, strategy_name)
    rt = runtime_for(cfg)
    data = load_client(cfg, client_id)
    seed = client_seed(cfg.seed, client_id, round_, strategy.name)
    head = rt.head_module()
    with SEEDED:  # torch's RNG is one per process: seeded work of concurrent clients must not interleave
        model, download = _client_model(rt, strategy, client_id, len(data.label_names), download_path, round_ - 1)
        candidates = strategy.candidates(download)
        group = (adopt_lowest_loss(rt, model, candidates, data.train, seed) if candidates
                 else strategy.upload_group(download))
        private = strategy.federated and cfg.privacy.enabled  # the warm-up's uploads are not noised
        start = get_state(model, head, strategy.upload_groups) if private else {}
        signature = input_signature(rt, model, data.train) if strategy.uploads_input_signature() else None
        result = train_phases(rt, strategy, model, data.train, round_, seed, strategy.spec(client_id),
                              len(data.label_names))
        if strategy.reference_examples():
            strategy.after_training(model, reference_inputs(rt, data.train, strategy.reference_examples(), seed))
        upload = get_state(model, head, strategy.upload_groups)
        local = get_state(model, head, strategy.local_groups)
    update_norm = None
    if private and upload:
        from fedlease.privacy import clip_and_noise, noise_multiplier

        noised, update_norm = clip_and_noise({k: upload[k] - start[k] for k in upload}, cfg.privacy.clip_norm,
                                             noise_multiplier(cfg, strategy.rounds()), seed + 7)
        upload = {k: start[k] + noised[k] for k in upload}
    if strategy.federated:
        upload = faults.poison_upload(cfg, client_id, round_, strategy_name, upload)
    if signature is not None:  # the allocation's `inputs` distance: one d-vector, counted in the upload
        upload[SIGNATURE_KEY] = signature
    if rank_and_world()[0] == 0:  # in a rank group the ranks hold the same model: rank 0 writes it
        write_upload(upload_path, upload, cfg.federation.exchange)
        save_local_state(cfg, strategy, client_id, round_, local)
    bytes_up = nbytes(upload)
    del model, upload, local
    if cfg.training.release_memory:
        release_memory()
    return ClientTrainResult(
        client_id=client_id, upload=upload_path, num_examples=len(data.train), loss=result.loss, steps=result.steps,
        bytes_up=bytes_up, bytes_down=nbytes(download.tensors), train_seconds=result.seconds,
        setup_seconds=result.setup_seconds, seconds=time.perf_counter() - t0, group=group, update_norm=update_norm)


def train_phases(rt: ClientRuntime, strategy: Strategy, model: PeftModel, records: list[dict[str, Any]],
                 round_: int, seed: int, spec: ModelSpec, num_labels: int = 0) -> TrainResult:
    """The strategy's local phases in turn, each with its trainable groups, epochs and model setting;
    the steps, seconds and step-weighted mean loss of all of them."""
    cfg, head = rt.cfg, rt.head_module()
    results = []
    for i, phase in enumerate(strategy.local_phases(round_)):
        params = set_trainable(model, phase.train_groups, head)
        phase_seed = seed + i  # phase 0 keeps the client's round seed
        torch.manual_seed(phase_seed)
        batches = iterate_batches(rt.tokenizer, records, cfg.data.kind, cfg.training.batch_size,
                                  cfg.model.max_length, phase.epochs, seed if phase.part[1] > 1 else phase_seed)
        if phase.part[1] > 1:  # phases sharing one budget: the same batch sequence, a part each
            batches = share_of(list(batches), *phase.part)
        reserve = rt.reserve_batch(spec)
        weights = (class_weights(records, num_labels) if phase.class_balanced and cfg.data.kind == "classification"
                   else None)
        with phase.setting(model) if phase.setting is not None else contextlib.nullcontext():
            results.append(rt.engine.train(model, params, batches, cfg.data.kind, reserve=reserve,
                                           class_weights=weights))
    steps = sum(r.steps for r in results)
    return TrainResult(sum(r.loss * r.steps for r in results) / max(1, steps), steps,
                       sum(r.seconds for r in results), sum(r.setup_seconds for r in results))


def share_of(items: list[Any], index: int, parts: int) -> list[Any]:
    """The index-th of `parts` consecutive, near-equal slices of `items`."""
    bounds = [round(len(items) * k / parts) for k in range(parts + 1)]
    return items[bounds[index] : bounds[index + 1]]


def class_weights(records: list[dict[str, Any]], num_labels: int) -> torch.Tensor:
    """Inverse label frequencies, n / (K * n_c) over the K labels the client has (0 for labels it lacks):
    every present label weighs the same in the loss."""
    counts = np.bincount([r["label"] for r in records], minlength=num_labels)
    present = counts > 0
    weights = np.zeros(len(counts))
    weights[present] = len(records) / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def reference_inputs(rt: ClientRuntime, records: list[dict[str, Any]], k: int, seed: int) -> dict[str, torch.Tensor]:
    """A seeded sample of k of the client's training examples, encoded as inference sees them."""
    pick = np.random.default_rng([seed, 7]).permutation(len(records))[:k]
    enc = encode_inputs(rt.tokenizer, [records[i] for i in sorted(pick)], rt.cfg.data.kind, rt.cfg.model.max_length)
    return {key: v.to(device()) for key, v in enc.items()}


@torch.no_grad()
def input_signature(rt: ClientRuntime, model: PeftModel, records: list[dict[str, Any]]) -> torch.Tensor:
    """(d,): the frozen base model's last-layer representation of the client's training inputs (prompts for
    generation), mean-pooled over real tokens, then over examples; with the adapter disabled and dropout off, so
    it reads neither the head nor any training. What the `inputs` distance compares: a summary of the client's
    inputs that leaves the client (one vector per client, as B is a summary of its training)."""
    cfg = rt.cfg
    total, count = torch.zeros(()), 0
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for i in range(0, len(records), cfg.training.eval_batch_size):
                enc = encode_inputs(rt.tokenizer, records[i:i + cfg.training.eval_batch_size], cfg.data.kind,
                                    cfg.model.max_length)
                pooled = mean_last_hidden(model, {k: v.to(device()) for k, v in enc.items()})
                total = total + pooled.sum(dim=0).cpu()
                count += pooled.shape[0]
    finally:
        model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def adopt_lowest_loss(rt: ClientRuntime, model: PeftModel, candidates: dict[int, Tensors],
                      records: list[dict[str, Any]], seed: int) -> int:
    """IFCA's choice: load the candidate with the lowest mean loss on the client's training data (the
    whole set, or `baselines.ifca_choice_batches` seeded batches of it) into the model; return its group."""
    limit = rt.cfg.baselines.ifca_choice_batches
    batches = list(itertools.islice(iterate_batches(rt.tokenizer, records, rt.cfg.data.kind,
                                                    rt.cfg.training.eval_batch_size, rt.cfg.model.max_length, 1,
                                                    seed), limit))
    losses = {}
    for group, cand in candidates.items():
        set_state(model, cand, rt.head_module())
        total = sum(float(compute_loss(model, {k: v.to(device()) for k, v in b.tensors.items()}, rt.cfg.data.kind))
                    * b.size for b in batches)
        losses[group] = total / sum(b.size for b in batches)
    best = min(losses, key=losses.__getitem__)
    set_state(model, candidates[best], rt.head_module())
    return best


def adopt_evaluation_choice(rt: ClientRuntime, strategy: Strategy, model: PeftModel, download: Download,
                            train: list[dict[str, Any]], client_id: int, round_: int) -> int | None:
    """IFCA, a client never sampled: the candidate it is evaluated with, chosen by loss on its training data
    with the round's evaluation seed, loaded into the model (the exported final model records the same
    choice); None when the download leaves nothing to choose."""
    candidates = strategy.candidates(download)
    if not candidates:
        return None
    return adopt_lowest_loss(rt, model, candidates, train, client_seed(rt.cfg.seed, client_id, round_, strategy.name))


def majority_accuracy(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> float:
    """The floor: accuracy on `test` of always predicting the most frequent label of `train` (ties: the
    smallest label id)."""
    labels = [r["label"] for r in train]
    majority = max(sorted(set(labels)), key=labels.count)
    return sum(r["label"] == majority for r in test) / max(1, len(test))


def release_memory() -> None:
    """Hand freed heap back to the OS between client calls (~20 ms). A long-lived worker trains clients
    with other sequence lengths one after another; without this, glibc keeps every earlier client's
    fragmented activation heap resident, and the peak creeps up client after client."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def client_evaluate(cfg: Config, strategy_name: str, client_id: int, round_: int, download_path: str,
                    num_clients: int) -> dict[str, Any]:
    """Evaluate the client's current model (server state after aggregation + its local state) on its test split."""
    rt = runtime_for(cfg)
    strategy = strategy_for(cfg, strategy_name, num_clients)
    data = load_client(cfg, client_id)
    with SEEDED:  # builds (seeded init) and loads the model this thread shares with no other
        model, download = _client_model(rt, strategy, client_id, len(data.label_names), download_path, round_)
        adopt_evaluation_choice(rt, strategy, model, download, data.train, client_id, round_)
    telemetry = attach_telemetry(model)
    out: dict[str, Any] = {"client_id": client_id, "task": data.task, "num_test": len(data.test)}
    with recorded_weights(model) as weights, autocast_for(cfg.training):
        _score(cfg, rt, model, data, out, telemetry)
    if weights:  # FedDPA: how much each test input leaned on the local LoRA
        q = np.quantile(weights, [0.0, 0.1, 0.5, 0.9, 1.0])
        out["instance_weight"] = {"mean": float(np.mean(weights)), "min": float(q[0]), "p10": float(q[1]),
                                  "median": float(q[2]), "p90": float(q[3]), "max": float(q[4])}
    del model
    if cfg.training.release_memory:
        release_memory()
    return out


def _score(cfg: Config, rt: ClientRuntime, model: PeftModel, data: Any, out: dict[str, Any],
           telemetry: dict[str, Any]) -> None:
    """The client's test metrics (and the router's telemetry) into `out`."""
    try:
        if cfg.data.kind == "classification":
            preds = predict_labels(model, rt.tokenizer, data.test, cfg.model.max_length, cfg.training.eval_batch_size)
            out.update(classification_metrics(preds, [r["label"] for r in data.test], len(data.label_names)))
            by_task: dict[str, list[bool]] = {}
            for p, r in zip(preds, data.test, strict=True):
                by_task.setdefault(r["task"], []).append(p == r["label"])
            out["task_accuracy"] = {t: sum(v) / len(v) for t, v in by_task.items()}
            out["majority_accuracy"] = majority_accuracy(data.train, data.test)
            if data.balanced_test:
                preds = predict_labels(model, rt.tokenizer, data.balanced_test, cfg.model.max_length,
                                       cfg.training.eval_batch_size)
                out["balanced_accuracy"] = float(np.mean([p == r["label"] for p, r in zip(preds, data.balanced_test,
                                                                                           strict=True)]))
                out["num_balanced_test"] = len(data.balanced_test)
                out["balanced_majority_accuracy"] = majority_accuracy(data.train, data.balanced_test)  # its floor
        else:
            preds_text = generate(model, rt.tokenizer, [r["prompt"] for r in data.test], cfg.model.max_length,
                                  cfg.training.max_new_tokens, cfg.training.eval_batch_size)
            out["rougeL"] = rouge_l(preds_text, [r["response"] for r in data.test])
    finally:
        detach_telemetry(model)
    if telemetry:
        out["router"] = {
            name: {"distinct_experts_share": (t.distinct / max(1, t.tokens)).tolist(),
                   "expert_weight_share": (t.weight / max(1e-12, float(t.weight.sum()))).tolist()}
            for name, t in telemetry.items()
        }
