"""Atomic file output: every artifact appears whole or not at all.

Stages write into a temporary sibling and rename, so a crash, a full disk or a
kill never leaves a half-written partition, adapter or checkpoint behind, and
DVC/Prefect can trust that a file that exists is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save


class ArtifactError(OSError):
    """An artifact could not be written or read; the message names the path."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ArtifactError(f"{path}: cannot write ({exc.strerror or exc})") from None
    _fsync_dir(path.parent)


def save_array(path: str | Path, array: Any) -> None:
    """A numpy array as .npy (no pickled objects), atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found (run the stage that writes it first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     what: str = "tensors") -> bytes:
    """The safetensors encoding (never pickle) of a state, for a file or the exchange store."""
    try:
        # clone: states built from one init (IFCA clusters, FedLEASE routers) share storage, which safetensors refuses
        return save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata=metadata)
    except RuntimeError as exc:
        raise ArtifactError(f"{what}: cannot encode ({exc})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save as safetensors atomically (write, fsync, rename)."""
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata, str(path)))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ArtifactError(f"{path}: adapters load only from .safetensors files")
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found") from None
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: not a valid safetensors file ({exc})") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(f"{path}: cannot write ({exc.strerror or exc})") from None
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
