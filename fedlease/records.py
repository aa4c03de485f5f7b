"""Typed records that cross module boundaries: what a client's round returns, what a round leaves.

Both are plain dataclasses with a JSON form (the round checkpoint, `result.json`), so the server,
tracking, the stages, the plots and the benchmark read the same fields instead of dict keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ClientTrainResult:
    """One client's local round, as the server receives it (small facts and the upload's path)."""

    client_id: int
    upload: str  # path of the upload file (safetensors)
    num_examples: int
    loss: float
    steps: int
    bytes_up: int
    bytes_down: int
    train_seconds: float
    setup_seconds: float
    seconds: float
    group: int = 0  # the model its upload updates (FedLEASE: expert; IFCA: chosen cluster)
    update_norm: float | None = None  # with DP: the update's norm before clipping


@dataclass
class RoundRecord:
    """What one round did: who was asked, who reported, what crossed the wire, the evaluation."""

    round: int
    sampled: list[int]
    dropped: dict[str, str]  # client id -> why
    loss: float  # mean training loss over the reporting clients
    bytes_up: dict[str, int]  # client id -> bytes
    bytes_down: dict[str, int]
    client_seconds: float
    setup_seconds: float
    seconds: float = 0.0
    steps: dict[str, int] = field(default_factory=dict)  # client id -> local optimiser steps (batches)
    epsilon: float | None = None  # with DP: the privacy spent after this round
    noise_multiplier: float | None = None
    eval: dict[str, Any] | None = field(default=None)  # fedlease.server.summarise_eval, when evaluated

    @property
    def total_up(self) -> int:
        return sum(self.bytes_up.values())

    @property
    def total_down(self) -> int:
        return sum(self.bytes_down.values())

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("epsilon", "noise_multiplier", "eval")}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RoundRecord:
        return cls(**obj)


def history_from_json(items: list[dict[str, Any]]) -> list[RoundRecord]:
    return [RoundRecord.from_json(item) for item in items]


def history_to_json(history: list[RoundRecord]) -> list[dict[str, Any]]:
    return [r.to_json() for r in history]
