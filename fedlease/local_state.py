"""A client's local state between rounds (heads, FedSA's B, local-only LoRAs, FedDPA's local LoRA).

It never leaves the client. It is versioned by round (`round_NNNN.safetensors` under the method's
stage output), so a round that is re-run after a crash starts from exactly the same local state;
a method that `inherits_warmup` starts round 1 from the warm-up's.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedlease.config import Config
from fedlease.io import ArtifactError, load_tensors, save_tensors
from fedlease.paths import RunPaths
from fedlease.strategies import warmup_strategy
from fedlease.strategies.base import Strategy, Tensors, prefixed, unprefixed


def local_dir(cfg: Config, strategy: Strategy, client_id: int) -> Path:
    """A client's local state for one method, under that method's stage output (one DVC out each; a late
    joiner's under `late/`)."""
    paths = RunPaths.of(cfg)
    return paths.home_of(strategy.home(paths), client_id) / "clients" / f"client_{client_id:03d}"


def save_local_state(cfg: Config, strategy: Strategy, client_id: int, round_: int, state: Tensors) -> None:
    save_tensors(local_dir(cfg, strategy, client_id) / f"round_{round_:04d}.safetensors", state)


def _rounds_in(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"round_(\d+)\.safetensors", p.name))]


def latest_local_state(cfg: Config, strategy: Strategy, client_id: int, up_to: int) -> Path | None:
    """The client's newest local state of this method up to round `up_to`, else the inherited one."""
    own = [r for r in _rounds_in(local_dir(cfg, strategy, client_id)) if r <= up_to]
    if own:
        return local_dir(cfg, strategy, client_id) / f"round_{max(own):04d}.safetensors"
    if strategy.inherits_warmup:
        warmup = warmup_strategy(cfg, strategy.num_clients)
        inherited = _rounds_in(local_dir(cfg, warmup, client_id))
        if inherited:
            return local_dir(cfg, warmup, client_id) / f"round_{max(inherited):04d}.safetensors"
    return None


def load_local_state(cfg: Config, strategy: Strategy, client_id: int, up_to: int) -> Tensors | None:
    """The client's local state for this method; inherited from the warm-up, it is the warm-up's head
    plus (for a method that keeps a LoRA locally: `local`'s LoRA, FedLEASE's personal expert) the client's
    warm-up adapter, which the warm-up uploads rather than keeps."""
    path = latest_local_state(cfg, strategy, client_id, up_to)
    if path is None:
        return None
    state = load_tensors(path)
    paths = RunPaths.of(cfg)
    keeps = [g for g in ("lora", "personal") if g in strategy.local_groups]
    assert len(keeps) <= 1, f"{strategy.name}: one local LoRA continues the warm-up's, not {keeps}"
    if path.is_relative_to(paths.home_of(paths.warmup, client_id)) and keeps:
        adapter = paths.warmup_adapter(client_id)
        if not adapter.exists():
            raise ArtifactError(f"client {client_id}: {strategy.name} continues from the warm-up, but {adapter} "
                                "is missing (run the warmup stage; a late joiner: fedlease join)")
        # lora.<module>.A|B: `local`'s LoRA, or FedLEASE's personal expert
        state.update(prefixed(unprefixed(load_tensors(adapter), "lora."), f"{keeps[0]}."))
    return state


def tensor_group(key: str) -> str:
    """The group a state key belongs to (lora_A / lora_B / router / foreign / dual / head)."""
    kind = key.split(".", 1)[0]
    if kind == "lora":
        return "lora_A" if key.endswith(".A") else "lora_B"
    return kind


def keep_groups(state: Tensors, groups: tuple[str, ...]) -> Tensors:
    """The part of `state` in `groups` ("lora" stands for both lora_A and lora_B)."""
    wanted = set(groups) | ({"lora_A", "lora_B"} if "lora" in groups else set())
    return {k: v for k, v in state.items() if tensor_group(k) in wanted}
