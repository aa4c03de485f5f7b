"""The one list of methods: every strategy class registers itself here by its `name`.

The config validates `strategies` against it, the pipeline asks it which stages the chosen
methods need, and adding a method is one new module with `@register` on its class (and, for a
method outside this package, importing that module before the params are loaded).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from fedlease.strategies.base import Strategy

if TYPE_CHECKING:
    from fedlease.allocation import Allocation
    from fedlease.config import Config

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make `cls` selectable by its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategies: {cls.name!r} is registered twice ({_REGISTRY[cls.name].__qualname__}, "
                         f"{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def strategy_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise ValueError(f"strategies: unknown method {name!r} (known: {', '.join(federated_names())})")
    return _REGISTRY[name]


def federated_names() -> list[str]:
    """The methods params.yaml's `strategies` may name."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.federated)


def make_strategy(name: str, cfg: Config, num_clients: int, allocation: Allocation | None = None) -> Strategy:
    return strategy_class(name)(cfg, num_clients, allocation)


def warmup_strategy(cfg: Config, num_clients: int) -> Strategy:
    """FedLEASE's Stage 1 warm-up, the one registered strategy that is not a federated method."""
    (cls,) = [c for c in _REGISTRY.values() if not c.federated]
    return cls(cfg, num_clients)


def needs_warmup(names: Iterable[str]) -> bool:
    """The warm-up stage runs when any chosen method continues from it."""
    return any(strategy_class(n).inherits_warmup for n in names)


def needs_allocation(names: Iterable[str]) -> bool:
    """The allocation stage runs when any chosen method needs its cluster map."""
    return any(strategy_class(n).needs_allocation for n in names)


def primary_name(names: Iterable[str]) -> str | None:
    """The pipeline's own method among `names` (FedLEASE), if chosen."""
    return next((n for n in names if strategy_class(n).primary), None)


def floor_names(names: Iterable[str]) -> list[str]:
    """The floors among `names` (`local`): a column of their own, left out of the best baseline (margins are
    still taken over them)."""
    return [n for n in names if strategy_class(n).floor]
