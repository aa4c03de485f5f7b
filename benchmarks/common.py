"""Shared helpers for the benchmarks: real default-config batches and a peak-RSS reader."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlease.config import Config, load_config  # noqa: E402


def default_config(output_dir: str, overrides: list[str] | None = None) -> Config:
    return load_config(Path(__file__).resolve().parents[1] / "params.yaml",
                       [f"output_dir={output_dir}", "tracking.enabled=false", *(overrides or [])])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20
