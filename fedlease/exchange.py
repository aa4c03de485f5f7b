"""The file format between server and clients: downloads and uploads as safetensors with JSON metadata.

The server writes a download per client and round; the client writes its upload; only these files
(tensors), counts and metrics cross between them. `validate_upload` is the server's check of what
came back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedlease.comm import nbytes
from fedlease.io import ArtifactError, load_tensors, save_tensors
from fedlease.strategies.base import Download, Tensors


def write_download(path: Path, download: Download) -> int:
    """Write what the server sends one client; returns its size in bytes."""
    save_tensors(path, download.tensors, {"meta": json.dumps(download.meta)})
    return nbytes(download.tensors)


def read_download(path: Path) -> Download:
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return Download(tensors, meta)


def write_upload(path: str | Path, upload: Tensors) -> int:
    """Write what a client sends back; returns its size in bytes."""
    save_tensors(path, upload)
    return nbytes(upload)


def validate_upload(path: Path) -> Tensors:
    """Load an upload and reject NaN or Inf (a shape check against the other clients' uploads follows
    in the round loop)."""
    tensors = load_tensors(path)
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ArtifactError(f"{path.name}: {key} contains NaN or Inf")
    return tensors
