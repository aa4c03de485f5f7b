"""Federated methods behind one interface; `make_strategy` builds one by name."""

from __future__ import annotations

from fedlease.config import Config
from fedlease.strategies.base import Strategy


def _registry() -> dict[str, type[Strategy]]:
    from fedlease.strategies.feddpa import FedDPA
    from fedlease.strategies.fedit import FedIT
    from fedlease.strategies.fedlease import FedLEASE, Warmup
    from fedlease.strategies.fedsa_lora import FedSALoRA
    from fedlease.strategies.ffa_lora import FFALoRA
    from fedlease.strategies.ifca import IFCA
    from fedlease.strategies.local import LocalOnly

    return {
        "fedlease": FedLEASE, "warmup": Warmup, "fedit": FedIT, "ffa_lora": FFALoRA,
        "fedsa_lora": FedSALoRA, "ifca": IFCA, "local": LocalOnly, "feddpa": FedDPA,
    }


def make_strategy(name: str, cfg: Config, num_clients: int) -> Strategy:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"strategies: unknown method {name!r} (known: {sorted(registry)})")
    return registry[name](cfg, num_clients)


def builds_on_warmup(name: str) -> bool:
    """Whether the method continues from the warm-up's client states (FedLEASE's heads, the local floor)."""
    return getattr(_registry().get(name), "inherit_local_from", None) == "warmup"


def needs_warmup(cfg: Config) -> bool:
    """The warm-up stage runs when any compared method builds on it."""
    return any(builds_on_warmup(name) for name in cfg.strategies)
