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
        return self.home_of(self.warmup, client_id) / f"client_{client_id:03d}.safetensors"

    @property
    def late(self) -> Path:
        """Clients that joined after the run (`fedlease join`): their data, warm-up adapter and local states
        live here, outside every stage's DVC output, so a join leaves the outputs `dvc repro` made as they were."""
        return self.root / "late"

    def late_client_file(self, client_id: int) -> Path:
        return self.late / "clients" / f"client_{client_id:03d}.json"

    def is_late(self, client_id: int) -> bool:
        return not self.client_file(client_id).exists() and self.late_client_file(client_id).exists()

    def home_of(self, stage_dir: Path, client_id: int) -> Path:
        """Where a client's files of a stage output live: the stage's folder, or for a late joiner the same
        folder under `late/`."""
        return self.late / stage_dir.relative_to(self.root) if self.is_late(client_id) else stage_dir

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
