"""What a worker keeps between client calls: base models by structure, the tokenizer, the engine.

One `ClientRuntime` per worker thread and config (`runtime_for`): threads never share a model
object, so two clients training at once under the `threads` task runner cannot overwrite each
other's weights. `build_client_model` is the one place a client's model is assembled, for training,
evaluation and `fedlease predict` alike: the structure's common init, a fresh head, what the server
sent, then the client's local state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedlease.allocation import Allocation
from fedlease.config import Config
from fedlease.engine.batching import Batch, worst_case_batch
from fedlease.engine.trainer import device, make_engine
from fedlease.io import ArtifactError, read_json
from fedlease.local_state import keep_groups
from fedlease.models.adapters import get_state, set_state, wrap_lora
from fedlease.models.base import head_init, load_base_model, set_head_classes
from fedlease.paths import RunPaths
from fedlease.strategies import make_strategy
from fedlease.strategies.base import Download, ModelSpec, Strategy, Tensors


#: held around work that seeds or draws from torch's process-wide RNG (model init, local training):
#: clients trained concurrently under the `threads` runner then get exactly the sequential results
SEEDED = threading.RLock()


@dataclass
class _Built:
    model: PeftModel
    common: Tensors  # the seeded common init of lora (+ router, zero foreign, FedDPA's local LoRA)


class ClientRuntime:
    """Per-worker cache: base models by structure, tokenizer, training engine."""

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
        with SEEDED:
            return self._build(spec)

    def _build(self, spec: ModelSpec) -> _Built:
        if spec not in self._models:
            loaded = load_base_model(self.cfg.model, self.cfg.data.kind, self.cache_dir, seed=self.cfg.seed)
            self.tokenizer = loaded.tokenizer
            lora = self.cfg.lora.model_copy(update={"r": spec.r})
            router = self.cfg.fedlease.router.model_copy(update={"top_k": spec.top_k,
                                                                 "personal_expert": spec.personal})
            dual_options = None
            if spec.dual:
                base = self.cfg.baselines
                dual_options = {"reference_instances": base.feddpa_reference_instances,
                                "max_weight": base.feddpa_max_weight}
            model = wrap_lora(loaded.model, lora, spec.num_experts, router, seed=self.cfg.seed, dual=spec.dual,
                              dual_options=dual_options).to(device())
            common = get_state(model, None, ("lora", "router", "foreign", "dual", "personal"))
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
            init = head_init(linear.in_features, num_labels, self.cfg.seed, linear.bias is not None,
                             self.cfg.model.head_init_std)
            set_state(built.model, {f"head.{k}": v for k, v in init.items()}, head)
        return built.model

    def reserve_batch(self, spec: ModelSpec) -> Batch | None:
        """The worst-case batch the first time this structure trains here (`training.reserve_steps` > 0)."""
        if not self.cfg.training.reserve_steps or spec in self._reserved:
            return None
        self._reserved.add(spec)
        rows = self.cfg.training.batch_size // self.cfg.training.deepspeed.ranks_per_client  # a rank's share
        return worst_case_batch(self.tokenizer, self.cfg.data.kind, rows, self.cfg.model.max_length)

    def engine_config(self) -> dict[str, Any] | None:
        """The generated DeepSpeed config, if this runtime built a DeepSpeed engine."""
        return getattr(self._engine, "config", None)

    def common_init(self, spec: ModelSpec) -> Tensors:
        return dict(self.build(spec).common)


_LOCAL = threading.local()


def runtime_for(cfg: Config) -> ClientRuntime:
    """This thread's runtime for `cfg` (one config per thread at a time; a new one frees the old models)."""
    key = cfg.model_dump_json()
    if getattr(_LOCAL, "key", None) != key:
        _LOCAL.runtime = None  # free the old models before loading new ones
        _LOCAL.runtime, _LOCAL.key = ClientRuntime(cfg), key
    runtime: ClientRuntime = _LOCAL.runtime
    return runtime


def strategy_for(cfg: Config, name: str, num_clients: int) -> Strategy:
    """The named method for this run, with the allocation stage's cluster map when it needs one."""
    from fedlease.strategies import strategy_class

    allocation = None
    if strategy_class(name).needs_allocation:
        allocation = Allocation.from_json(read_json(RunPaths.of(cfg).cluster_map))
    return make_strategy(name, cfg, num_clients, allocation)


def build_client_model(rt: ClientRuntime, strategy: Strategy, client_id: int, num_labels: int,
                       download: Download, local_state: Tensors | None) -> PeftModel:
    """Base model + common init + fresh head, then the server's download, then the client's local state."""
    model = rt.fresh_model(strategy.spec(client_id), num_labels)
    head = rt.head_module()
    set_state(model, strategy.client_state(download), head)
    if local_state is not None:
        set_state(model, keep_groups(local_state, strategy.local_groups), head)
    if "personal" in strategy.local_groups and not any(k.startswith("personal.") for k in local_state or {}):
        # a zero personal LoRA would take router weight and never learn (both its gradients are zero)
        raise ArtifactError(f"client {client_id}: {strategy.name} keeps a personal expert, but its local state has "
                            "none (it starts from the client's warm-up adapter: run the warmup stage)")
    return model
