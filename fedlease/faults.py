"""Fault injection for the reliability tests (`faults:` in params; all off by default).

Draws are seeded per (client, round, method), so a client that fails does so on every retry of
that round, and a resumed run replays the same faults.
"""

from __future__ import annotations

import time
import zlib

import torch

from fedlease.config import Config

Tensors = dict[str, torch.Tensor]


class InjectedFault(RuntimeError):
    """A failure injected by the `faults:` params section (tests only)."""


def _draws(cfg: Config, client_id: int, round_: int, strategy: str) -> tuple[bool, bool]:
    import numpy as np

    rng = np.random.default_rng([cfg.seed, client_id, round_, zlib.crc32(strategy.encode()), 99])
    fail, nan = rng.random(2)
    return bool(fail < cfg.faults.client_failure_rate), bool(nan < cfg.faults.nan_update_rate)


def before_training(cfg: Config, client_id: int, round_: int, strategy: str) -> None:
    """Raise an injected failure, or hang, as the params ask for this client and round."""
    if _draws(cfg, client_id, round_, strategy)[0]:
        raise InjectedFault(f"client {client_id} round {round_}: injected failure (faults.client_failure_rate)")
    if client_id in cfg.faults.hang_client_ids:
        time.sleep(cfg.faults.hang_seconds)  # a stuck client: only a task timeout gets the round going


def poison_upload(cfg: Config, client_id: int, round_: int, strategy: str, upload: Tensors) -> Tensors:
    """The upload with its first tensor turned to NaN when the params' nan_update_rate draws this client."""
    if not upload or not _draws(cfg, client_id, round_, strategy)[1]:
        return upload
    key = sorted(upload)[0]
    return {**upload, key: torch.full_like(upload[key], float("nan"))}
