"""Where each stage reads and writes: one place, so flows, DVC and tests agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlease.config import Config


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, cfg: Config) -> RunPaths:
        return cls(Path(cfg.output_dir))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def client_file(self, client_id: int) -> Path:
        return self.data / "clients" / f"client_{client_id:03d}.json"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def warmup(self) -> Path:
        return self.root / "warmup"

    def warmup_adapter(self, client_id: int) -> Path:
        return self.warmup / f"client_{client_id:03d}.safetensors"

    @property
    def allocation(self) -> Path:
        return self.root / "allocation"

    @property
    def cluster_map(self) -> Path:
        return self.allocation / "cluster_map.json"

    def strategy_dir(self, strategy: str) -> Path:
        return self.root / "federate" / strategy

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"
