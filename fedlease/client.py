"""Client-side work: one local training round or one evaluation, from files to files.

Each call reads the server's download (safetensors), the client's own data and its
local state, trains or evaluates, and writes its upload; it returns only small
JSON-able facts (paths, counts, metrics). Raw examples never leave this module.
A `ClientRuntime` caches the base model and the engine once per worker process.

Local state (heads, FedSA's B, local-only LoRAs) is versioned by round, so a
round that is re-run after a crash starts from exactly the same local state.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedlease.allocation import Allocation
from fedlease.comm import nbytes
from fedlease.config import Config
from fedlease.data.stage import load_client
from fedlease.engine.batching import Batch, iterate_batches, worst_case_batch
from fedlease.engine.evaluate import classification_metrics, generate, predict_labels, rouge_l
from fedlease.engine.trainer import compute_loss, device, make_engine
from fedlease.io import ArtifactError, load_tensors, read_json, save_tensors
from fedlease.models.adapters import (attach_telemetry, detach_telemetry, get_state, set_state, set_trainable,
                                      wrap_lora)
from fedlease.models.base import head_init, load_base_model, set_head_classes
from fedlease.paths import RunPaths
from fedlease.strategies import make_strategy
from fedlease.strategies.base import Download, ModelSpec, Strategy, Tensors


class InjectedFault(RuntimeError):
    """A failure injected by the `faults:` params section (tests only)."""


def _fault_draws(cfg: Config, client_id: int, round_: int, strategy: str) -> dict[str, bool]:
    """Seeded per (client, round): the same client fails on every retry of that round."""
    import numpy as np

    rng = np.random.default_rng([cfg.seed, client_id, round_, zlib.crc32(strategy.encode()), 99])
    fail, nan = rng.random(2)
    return {"fail": bool(fail < cfg.faults.client_failure_rate), "nan": bool(nan < cfg.faults.nan_update_rate)}


def client_seed(seed: int, client_id: int, round_: int, strategy: str) -> int:
    return (seed * 1_000_003 + client_id * 1009 + round_ * 17 + zlib.crc32(strategy.encode())) % (2**31)


@dataclass
class _Built:
    model: PeftModel
    common: Tensors  # the seeded common init of lora (+ router, zero foreign, FedDPA's local LoRA)


class ClientRuntime:
    """Per-process cache: base models by structure, tokenizer, training engine."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cfg.data.cache_dir)
        self._models: dict[ModelSpec, _Built] = {}
        self._engine: Any = None
        self._reserved: set[ModelSpec] = set()
        self.tokenizer: Any = None
        if cfg.training.torch_threads:
            torch.set_num_threads(cfg.training.torch_threads)

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = make_engine(self.cfg.training, self.cache_dir)
        return self._engine

    def build(self, spec: ModelSpec) -> _Built:
        if spec not in self._models:
            loaded = load_base_model(self.cfg.model, self.cfg.data.kind, self.cache_dir, seed=self.cfg.seed)
            self.tokenizer = loaded.tokenizer
            lora = self.cfg.lora.model_copy(update={"r": spec.r})
            router = self.cfg.fedlease.router.model_copy(update={"top_k": spec.top_k})
            model = wrap_lora(loaded.model, lora, spec.num_experts, router, seed=self.cfg.seed,
                              dual=spec.dual).to(device())
            common = get_state(model, None, ("lora", "router", "foreign", "dual"))
            common = {k: (torch.zeros_like(v) if k.startswith("foreign.") else v) for k, v in common.items()}
            self._models[spec] = _Built(model, common)
        return self._models[spec]

    def head_module(self) -> str | None:
        return self.cfg.model.head_module if self.cfg.data.kind == "classification" else None

    def fresh_model(self, spec: ModelSpec, num_labels: int) -> PeftModel:
        """The structure's model reset to the common init, with a fresh head for `num_labels`."""
        built = self.build(spec)
        set_state(built.model, built.common)
        head = self.head_module()
        if head is not None:
            linear = set_head_classes(built.model.get_base_model(), head, num_labels).to(device())
            init = head_init(linear.in_features, num_labels, self.cfg.seed, linear.bias is not None)
            set_state(built.model, {f"head.{k}": v for k, v in init.items()}, head)
        return built.model

    def reserve_batch(self, spec: ModelSpec) -> Batch | None:
        """The worst-case batch the first time this structure trains here (`training.reserve_steps` > 0)."""
        if not self.cfg.training.reserve_steps or spec in self._reserved:
            return None
        self._reserved.add(spec)
        return worst_case_batch(self.tokenizer, self.cfg.data.kind, self.cfg.training.batch_size,
                                self.cfg.model.max_length)

    def engine_config(self) -> dict[str, Any] | None:
        """The generated DeepSpeed config, if this process built a DeepSpeed engine."""
        return getattr(self._engine, "config", None)

    def common_init(self, spec: ModelSpec) -> Tensors:
        return dict(self.build(spec).common)


_RUNTIMES: dict[str, ClientRuntime] = {}


def runtime_for(cfg: Config) -> ClientRuntime:
    key = cfg.model_dump_json()
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one config per worker at a time; frees the old models
        _RUNTIMES[key] = ClientRuntime(cfg)
    return _RUNTIMES[key]


def strategy_for(cfg: Config, name: str, num_clients: int) -> Strategy:
    strategy = make_strategy(name, cfg, num_clients)
    if hasattr(strategy, "with_allocation"):
        strategy.with_allocation(Allocation.from_json(read_json(RunPaths.of(cfg).cluster_map)))
    return strategy


# --- files ---------------------------------------------------------------------------------------


def write_download(path: Path, download: Download) -> int:
    save_tensors(path, download.tensors, {"meta": json.dumps(download.meta)})
    return nbytes(download.tensors)


def read_download(path: Path) -> Download:
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return Download(tensors, meta)


def local_dir(cfg: Config, strategy: str, client_id: int) -> Path:
    """A client's local state for one method, under that method's stage output (one DVC out each)."""
    paths = RunPaths.of(cfg)
    base = paths.warmup if strategy == "warmup" else paths.strategy_dir(strategy)
    return base / "clients" / f"client_{client_id:03d}"


def latest_local_state(cfg: Config, strategy: Strategy, client_id: int, up_to: int) -> Path | None:
    """The client's newest local state of this method up to round `up_to`, else the inherited one."""
    names = [strategy.name] + ([getattr(strategy, "inherit_local_from")] if hasattr(strategy, "inherit_local_from")
                               else [])
    for name in names:
        folder = local_dir(cfg, name, client_id)
        if folder.is_dir():
            rounds = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"round_(\d+)\.safetensors", p.name))]
            rounds = [r for r in rounds if r <= up_to] if name == strategy.name else rounds
            if rounds:
                return folder / f"round_{max(rounds):04d}.safetensors"
    return None


def _load_client_model(rt: ClientRuntime, strategy: Strategy, client_id: int, round_: int, num_labels: int,
                       download: Download, local_up_to: int) -> PeftModel:
    model = rt.fresh_model(strategy.spec(client_id), num_labels)
    head = rt.head_module()
    set_state(model, strategy.client_state(download), head)
    state = load_local_state(rt.cfg, strategy, client_id, local_up_to)
    if state is not None:
        keep = {k: v for k, v in state.items() if _group(k) in _expand(strategy.local_groups)}
        set_state(model, keep, head)
    return model


def load_local_state(cfg: Config, strategy: Strategy, client_id: int, up_to: int) -> Tensors | None:
    """The client's local state for this method; inherited from the warm-up, it is the warm-up's head
    plus (for a method that keeps its LoRA locally, `local`) the client's warm-up adapter, which the
    warm-up uploads rather than keeps."""
    path = latest_local_state(cfg, strategy, client_id, up_to)
    if path is None:
        return None
    state = load_tensors(path)
    paths = RunPaths.of(cfg)
    if path.is_relative_to(paths.warmup) and "lora" in strategy.local_groups:
        adapter = paths.warmup_adapter(client_id)
        if not adapter.exists():
            raise ArtifactError(f"client {client_id}: {strategy.name} continues from the warm-up, but {adapter} "
                                "is missing (run the warmup stage)")
        state.update(load_tensors(adapter))
    return state


def _group(key: str) -> str:
    kind = key.split(".", 1)[0]
    if kind == "lora":
        return "lora_A" if key.endswith(".A") else "lora_B"
    return kind


def _expand(groups: tuple[str, ...]) -> set[str]:
    out = set(groups)
    if "lora" in out:
        out |= {"lora_A", "lora_B"}
    return out


# --- the two client calls -------------------------------------------------------------------------


def client_train(cfg: Config, strategy_name: str, client_id: int, round_: int, download_path: str,
                 upload_path: str, num_clients: int) -> dict[str, Any]:
    """One local round: load, train what the strategy trains, write the upload and local state."""
    t0 = time.perf_counter()
    faults = _fault_draws(cfg, client_id, round_, strategy_name)
    if faults["fail"]:
        raise InjectedFault(f"client {client_id} round {round_}: injected failure (faults.client_failure_rate)")
    if client_id in cfg.faults.hang_client_ids:
        time.sleep(cfg.faults.hang_seconds)  # a stuck client: only a task timeout gets the round going
    rt = runtime_for(cfg)
    strategy = strategy_for(cfg, strategy_name, num_clients)
    data = load_client(cfg, client_id)
    download = read_download(Path(download_path))
    model = _load_client_model(rt, strategy, client_id, round_, len(data.label_names), download, round_ - 1)
    meta = strategy.upload_meta(download)
    seed = client_seed(cfg.seed, client_id, round_, strategy.name)
    if hasattr(strategy, "candidates"):
        meta["cluster"] = _adopt_lowest_loss(rt, model, strategy.candidates(download), data.train, seed)
    params = set_trainable(model, strategy.train_groups, rt.head_module())
    start = get_state(model, rt.head_module(), strategy.upload_groups) if cfg.privacy.enabled else {}
    torch.manual_seed(seed)
    batches = iterate_batches(rt.tokenizer, data.train, cfg.data.kind, cfg.training.batch_size,
                              cfg.model.max_length, strategy.local_epochs(round_), seed)
    reserve = rt.reserve_batch(strategy.spec(client_id))
    result = rt.engine.train(model, params, batches, cfg.data.kind, reserve=reserve)
    upload = get_state(model, rt.head_module(), strategy.upload_groups)
    update_norm = None
    if cfg.privacy.enabled and upload and strategy.name != "warmup":
        from fedlease.privacy import clip_and_noise, noise_multiplier

        noised, update_norm = clip_and_noise({k: upload[k] - start[k] for k in upload}, cfg.privacy.clip_norm,
                                             noise_multiplier(cfg), seed + 7)
        upload = {k: start[k] + noised[k] for k in upload}
    if faults["nan"] and upload:
        key = sorted(upload)[0]
        upload[key] = torch.full_like(upload[key], float("nan"))
    save_tensors(upload_path, upload, {"meta": json.dumps(meta)})
    local = get_state(model, rt.head_module(), strategy.local_groups)
    save_tensors(local_dir(cfg, strategy.name, client_id) / f"round_{round_:04d}.safetensors", local)
    bytes_up = nbytes(upload)
    del model, upload, local, batches
    if cfg.training.release_memory:
        release_memory()
    return {
        "client_id": client_id, "upload": upload_path, "num_examples": len(data.train), "loss": result.loss,
        "steps": result.steps, "bytes_up": bytes_up, "bytes_down": nbytes(download.tensors),
        "train_seconds": result.seconds, "setup_seconds": result.setup_seconds,
        "seconds": time.perf_counter() - t0, "meta": meta, "update_norm": update_norm,
    }


@torch.no_grad()
def _adopt_lowest_loss(rt: ClientRuntime, model: PeftModel, candidates: dict[int, Tensors],
                       records: list[dict[str, Any]], seed: int) -> int:
    """IFCA's choice: load the candidate LoRA with the lowest loss on (a seeded slice of) the training
    data into the model; return its cluster id."""
    losses = {}
    batch = next(iterate_batches(rt.tokenizer, records, rt.cfg.data.kind, rt.cfg.training.eval_batch_size,
                                 rt.cfg.model.max_length, 1, seed))
    for cluster, cand in candidates.items():
        set_state(model, cand, rt.head_module())
        losses[cluster] = float(compute_loss(model, {k: v.to(device()) for k, v in batch.tensors.items()},
                                             rt.cfg.data.kind))
    best = min(losses, key=losses.__getitem__)
    set_state(model, candidates[best], rt.head_module())
    return best


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
    download = read_download(Path(download_path))
    model = _load_client_model(rt, strategy, client_id, round_, len(data.label_names), download, round_)
    candidates = strategy.candidates(download) if hasattr(strategy, "candidates") else {}
    if candidates:  # IFCA, a client never sampled: it chooses by loss
        seed = client_seed(cfg.seed, client_id, round_, strategy.name)
        _adopt_lowest_loss(rt, model, candidates, data.train, seed)
    telemetry = attach_telemetry(model)
    out: dict[str, Any] = {"client_id": client_id, "task": data.task, "num_test": len(data.test)}
    try:
        if cfg.data.kind == "classification":
            preds = predict_labels(model, rt.tokenizer, data.test, cfg.model.max_length, cfg.training.eval_batch_size)
            out.update(classification_metrics(preds, [r["label"] for r in data.test], len(data.label_names)))
            by_task: dict[str, list[bool]] = {}
            for p, r in zip(preds, data.test, strict=True):
                by_task.setdefault(r["task"], []).append(p == r["label"])
            out["task_accuracy"] = {t: sum(v) / len(v) for t, v in by_task.items()}
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
    del model
    if cfg.training.release_memory:
        release_memory()
    return out


def validate_update(path: Path, expected: dict[str, tuple[int, ...]] | None) -> dict[str, torch.Tensor]:
    """Load an upload and reject NaN/Inf or shapes that differ from what the server expects."""
    tensors = load_tensors(path)
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ArtifactError(f"{path.name}: {key} contains NaN or Inf")
        if expected is not None and key in expected and tuple(value.shape) != expected[key]:
            raise ArtifactError(f"{path.name}: {key} has shape {tuple(value.shape)}, expected {expected[key]}")
    return tensors


def read_upload_meta(path: Path) -> dict[str, Any]:
    return read_download(path).meta
