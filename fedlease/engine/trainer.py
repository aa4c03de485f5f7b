"""Local training engines: DeepSpeed (default) and plain torch (for debugging), one interface.

Both run the same loop over the same batches with AdamW at a constant learning rate and
the same clipping, so switching engines changes speed, never the maths.
DeepSpeed is imported once per process; on a CPU it runs one gloo process with
its JIT extensions cached under the project's cache directory.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedlease.config import TrainingConfig
from fedlease.engine.batching import Batch
from fedlease.ranks import free_port, rank_and_world, rank_share


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps
    steps: int
    seconds: float
    setup_seconds: float  # engine creation and teardown (the fixed per-client-round cost)


def compute_loss(model: nn.Module, tensors: dict[str, torch.Tensor], kind: str,
                 class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (classification, optionally class-weighted) or next-token loss on response tokens."""
    inputs = {k: v for k, v in tensors.items() if k != "labels"}
    labels = tensors["labels"]
    if kind == "classification":
        logits = model(**inputs).logits.float()
        weight = class_weights.to(logits.device) if class_weights is not None else None
        return F.cross_entropy(logits, labels, weight=weight)
    start = response_logits_start(labels)
    # the LM head (vocab x hidden per position) only where a response token is predicted: the prompt's
    # logits would be computed, upcast and thrown away (most of the sequence in instruction tuning)
    logits = model(**inputs, logits_to_keep=labels.shape[1] - start).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, start + 1 :]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100)


def loss_row_weights(tensors: dict[str, torch.Tensor], kind: str, class_weights: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Each row's part of `compute_loss`'s denominator: 1 (mean cross-entropy), its label's class weight
    (class-weighted mean), its number of scored tokens (generation: a mean over response tokens)."""
    labels = tensors["labels"]
    if kind == "classification":
        if class_weights is None:
            return torch.ones(labels.shape[0])
        return class_weights.to(labels.device)[labels]
    return (labels[:, 1:] != -100).sum(1)


def response_logits_start(labels: torch.Tensor) -> int:
    """First position whose logits predict a scored token: one before the batch's earliest response token
    (the token at position 0 has nothing before it and is never scored)."""
    scored = (labels[:, 1:] != -100).any(0).nonzero()
    if scored.numel() == 0:
        raise ValueError("batch has no response tokens to score (all truncated)")
    return int(scored[0, 0])


def reserve_memory(model: nn.Module, params: list[nn.Parameter], batch: Batch, kind: str, steps: int) -> None:
    """Forward + backward of a worst-case batch, `steps` times, leaving no trace: run the first time a
    model structure trains in a process.

    Batches are padded to their longest text, so a long-lived worker that trains short-text clients
    first and long-text clients later sees its peak memory rise mid-run, and an out-of-memory error
    shows up hours in, on whichever client has the longest texts. These steps move that peak (or that
    error) to the first client-round. Two by default: glibc serves a process's first large blocks by
    mmap and only later ones from its heap, so the second step is what lays the heap out at the worst
    case (benchmarks/README.md). Gradients come back from `torch.autograd.grad` and are dropped (nothing
    accumulates into `.grad`, no optimizer or DeepSpeed hook fires); the RNG state is restored.
    """
    dev = device()
    trainable = [p for p in params if p.requires_grad]
    tensors = {k: v.to(dev) for k, v in batch.tensors.items()}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dev.type == "cuda" else []):
        for _ in range(steps):
            loss = compute_loss(model, tensors, kind)
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
            del loss, grads


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class TorchEngine:
    name = "torch"

    def __init__(self, cfg: TrainingConfig) -> None:
        self.cfg = cfg

    def train(self, model: nn.Module, params: list[nn.Parameter], batches: Iterable[Batch], kind: str,
              reserve: Batch | None = None, class_weights: torch.Tensor | None = None) -> TrainResult:
        """Train on `batches`; with `reserve`, `reserve_memory` first (counted as setup)."""
        t0 = time.perf_counter()
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        accum = self.cfg.gradient_accumulation_steps
        model.train()
        if reserve is not None:
            reserve_memory(model, params, reserve, kind, self.cfg.reserve_steps)
        setup = time.perf_counter() - t0
        losses: list[float] = []
        dev = device()
        for i, batch in enumerate(batches):
            with autocast_for(self.cfg):
                loss = compute_loss(model, {k: v.to(dev) for k, v in batch.tensors.items()}, kind, class_weights)
            (loss / accum).backward()
            losses.append(float(loss.detach()))
            if (i + 1) % accum == 0:
                self._step(opt, params)
        if len(losses) % accum:
            self._step(opt, params)
        model.eval()
        return TrainResult(sum(losses) / max(1, len(losses)), len(losses), time.perf_counter() - t0, setup)

    def _step(self, opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        if self.cfg.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.gradient_clipping)
        opt.step()
        opt.zero_grad(set_to_none=True)


# A module's hook dicts, each with the side dicts a hook's id is also filed in (torch's RemovableHandle
# clears the same ones).
_MODULE_HOOK_DICTS: dict[str, tuple[str, ...]] = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_backward_pre_hooks": (),
    "_backward_hooks": (),
    "_state_dict_hooks": (),
    "_state_dict_pre_hooks": (),
    "_load_state_dict_pre_hooks": (),
    "_load_state_dict_post_hooks": (),
}

HookSnapshot = dict[int, dict[str, set[int]]]


def hook_snapshot(model: nn.Module) -> HookSnapshot:
    """The hook ids on every submodule, to undo what a library registers on a model it does not own."""
    return {id(m): {name: set(getattr(m, name, {})) for name in _MODULE_HOOK_DICTS} for m in model.modules()}


def remove_hooks_since(model: nn.Module, snapshot: HookSnapshot) -> int:
    """Remove every module hook added since `snapshot`; returns how many.

    `DeepSpeedEngine.destroy` leaves its forward hooks on the model, and they close over the engine: a
    worker that reuses one base model for client after client would keep every past engine (its
    optimizer, its buffers) alive and run all their hooks on each forward pass.
    """
    removed = 0
    for m in model.modules():
        before = snapshot.get(id(m), {})
        for name, side in _MODULE_HOOK_DICTS.items():
            hooks = getattr(m, name, None)
            if not hooks:
                continue
            for hook_id in set(hooks) - before.get(name, set()):
                del hooks[hook_id]
                for extra in side:
                    getattr(m, extra, {}).pop(hook_id, None)
                removed += 1
    return removed


_OWN_PORT: str | None = None  # this process's rendezvous port, chosen once


def prepare_deepspeed_env(cache_dir: Path) -> None:
    """Single-process DeepSpeed without a launcher; JIT extensions cached in the project."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str((cache_dir / "torch_extensions").resolve()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.environ.get("WORLD_SIZE", "1") == "1":
        # a world of one rendezvouses with itself: on a port of its own, never one inherited from the
        # process that started it (a parent's port is in use there; sibling processes would collide)
        global _OWN_PORT
        _OWN_PORT = _OWN_PORT or str(free_port())
        os.environ["MASTER_PORT"] = _OWN_PORT
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def resolve_precision(cfg: TrainingConfig) -> str:
    """`training.precision`, with auto resolved: bf16 on a GPU, fp32 on a CPU (measured: benchmarks/README.md)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def autocast_for(cfg: TrainingConfig) -> contextlib.AbstractContextManager[Any]:
    """The plain-torch engine's (and evaluation's) precision: autocast to bf16/fp16, or nothing for fp32."""
    precision = resolve_precision(cfg)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device().type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def deepspeed_config(cfg: TrainingConfig) -> dict[str, Any]:
    """The DeepSpeed config generated from params.yaml (saved with each run)."""
    ds = cfg.deepspeed
    conf: dict[str, Any] = {  # with several ranks per client each takes its share of a batch's rows
        "train_micro_batch_size_per_gpu": cfg.batch_size // ds.ranks_per_client,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps,
        "zero_optimization": {"stage": ds.zero_stage},
        "gradient_clipping": cfg.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer != "none":
        conf["zero_optimization"]["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": True}
    precision = resolve_precision(cfg)
    if precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif precision == "fp16":
        conf["fp16"] = {"enabled": True}
    if ds.config_file:
        conf = merge_user_config(conf, ds.config_file)
    return conf


_PARAMS_OWN = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def merge_user_config(conf: dict[str, Any], path: str) -> dict[str, Any]:
    """The user's DeepSpeed JSON over the generated config, section by section (its keys win), except the
    batch sizes, which the params own (every method must see the same batches)."""
    import json

    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"training.deepspeed.config_file: {path}: cannot read a JSON object ({exc})") from None
    if not isinstance(user, dict):
        raise ValueError(f"training.deepspeed.config_file: {path}: the top level must be an object")
    clash = sorted(k for k in _PARAMS_OWN if k in user and user[k] != conf[k])
    if clash:
        raise ValueError(f"training.deepspeed.config_file: {path}: {clash} differ from training.batch_size / "
                         "gradient_accumulation_steps in params; set them there")
    out = dict(conf)
    for key, value in user.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, cfg: TrainingConfig, cache_dir: Path) -> None:
        if cfg.deepspeed.zero_stage == 3:
            raise ValueError("training.deepspeed.zero_stage: 3 partitions the parameters themselves across ranks, "
                             "which the client's state exchange does not gather; choose 0-2 (ZeRO-1/2 shard the "
                             "optimizer state and gradients across ranks_per_client)")
        prepare_deepspeed_env(cache_dir)
        import deepspeed  # noqa: PLC0415 - imported once per worker process, after the env is set

        self.deepspeed = deepspeed
        self.cfg = cfg
        self.config = deepspeed_config(cfg)
        self._comm_ready = False

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW; with the optimizer offloaded to the host, DeepSpeed's CPU Adam (its C++ op, built once)."""
        offloaded = self.config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offloaded == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, adamw_mode=True)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def train(self, model: nn.Module, params: list[nn.Parameter], batches: Iterable[Batch], kind: str,
              reserve: Batch | None = None, class_weights: torch.Tensor | None = None) -> TrainResult:
        """As `TorchEngine.train`; the reserve steps run on the engine's module (its precision)."""
        t0 = time.perf_counter()
        if not self._comm_ready:
            self.deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                            verbose=False)
            self._comm_ready = True
        opt = self._optimizer(params)
        hooks = hook_snapshot(model)
        engine = None
        losses: list[float] = []
        try:
            engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=opt,
                                                        model_parameters=params, config=self.config)
            engine.train()
            if reserve is not None:
                reserve_memory(engine.module, params, reserve, kind, self.cfg.reserve_steps)
            setup = time.perf_counter() - t0
            dev = engine.device
            rank, world = rank_and_world()
            for batch in batches:
                tensors = {k: v.to(dev) for k, v in batch.tensors.items()}
                factor = 1.0
                if world > 1:
                    weights = loss_row_weights(tensors, kind, class_weights)
                    tensors, factor = rank_share(tensors, rank, world, weights)
                loss = compute_loss(engine, tensors, kind, class_weights)
                engine.backward(loss * factor if factor != 1.0 else loss)
                engine.step()
                losses.append(batch_loss(loss, factor, world))
            t1 = time.perf_counter()
        finally:  # also when a step fails: the worker goes on to other clients with this model
            if engine is not None:
                engine.destroy()
            remove_hooks_since(model, hooks)
            del engine, opt
            for p in params:
                p.grad = None
            model.eval()
        setup += time.perf_counter() - t1
        return TrainResult(sum(losses) / max(1, len(losses)), len(losses), time.perf_counter() - t0, setup)


def batch_loss(loss: torch.Tensor, factor: float, world: int) -> float:
    """The whole batch's mean loss: a rank group sums each rank's loss x factor / world (one all-reduce)."""
    if world == 1:
        return float(loss.detach())
    share = loss.detach() * (factor / world)
    torch.distributed.all_reduce(share)
    return float(share)


def make_engine(cfg: TrainingConfig, cache_dir: Path) -> TorchEngine | DeepSpeedEngine:
    if cfg.engine == "deepspeed":
        return DeepSpeedEngine(cfg, cache_dir)
    return TorchEngine(cfg)
