"""Federated methods behind one interface (`base.Strategy`), each registered by name (`registry`)."""

from __future__ import annotations

# Importing the built-in methods registers them.
from fedlease.strategies import feddpa, fedit, fedlease, fedsa_lora, ffa_lora, ifca, local  # noqa: F401
from fedlease.strategies.registry import (federated_names, floor_names, make_strategy, needs_allocation,
                                          needs_warmup, primary_name, register, strategy_class, unregister,
                                          warmup_strategy)

__all__ = ["federated_names", "floor_names", "make_strategy", "needs_allocation", "needs_warmup", "primary_name",
           "register", "strategy_class", "unregister", "warmup_strategy"]
