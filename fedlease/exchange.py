"""The file format and store between server and clients: downloads and uploads as safetensors.

The server writes a download per client and round; the client writes its upload; only these files
(tensors and their metadata), counts and metrics cross between them. The store is any fsspec
location: a local folder (the default: the round's folder under output_dir) or an object store
(`s3://bucket/prefix`). Each tensor file is written whole, then a manifest beside it
(`<file>.sha256`: its sha256 and size), last: a reader that finds the manifest finds the whole file,
and checks its sha256 before using it. `validate_upload` is the server's check of what came back.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from fedlease.comm import nbytes
from fedlease.config import ExchangeConfig
from fedlease.io import ArtifactError, atomic_write_bytes, tensors_to_bytes
from fedlease.strategies.base import Download, Tensors

MANIFEST_SUFFIX = ".sha256"
LOCAL = ExchangeConfig()


class ExchangeError(ArtifactError):
    """An exchanged file is missing, late, corrupt or malformed; the message names whose and where."""


def _fs(location: str, exchange: ExchangeConfig) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(location, **exchange.storage_options)


def _put(location: str | Path, payload: bytes, exchange: ExchangeConfig) -> None:
    """The file, then its manifest (written last: it says the file is complete)."""
    fs, path = _fs(str(location), exchange)
    manifest = json.dumps({"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}).encode()
    from fsspec.implementations.local import LocalFileSystem

    if fs.exists(path + MANIFEST_SUFFIX):  # a rewrite (a retried call): readers wait, never see a mismatch
        fs.rm(path + MANIFEST_SUFFIX)
    if isinstance(fs, LocalFileSystem):
        atomic_write_bytes(path, payload)  # rename: never a half-written file, even without the manifest
        atomic_write_bytes(path + MANIFEST_SUFFIX, manifest)
    else:  # an object store's PUT is atomic: the object appears whole or not at all
        fs.pipe_file(path, payload)
        fs.pipe_file(path + MANIFEST_SUFFIX, manifest)


def _get(location: str | Path, exchange: ExchangeConfig, what: str) -> bytes:
    """The file's bytes once its manifest is there (waiting up to `wait_s`), checked against it."""
    fs, path = _fs(str(location), exchange)
    deadline = time.monotonic() + exchange.wait_s
    while True:
        try:
            raw = fs.cat_file(path + MANIFEST_SUFFIX)
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                state = "late" if exchange.wait_s > 0 else "missing"
                waited = f" after waiting {exchange.wait_s:g} s" if exchange.wait_s > 0 else ""
                raise ExchangeError(f"{what}: {location} {state} (no manifest{waited})") from None
            time.sleep(exchange.poll_s)
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict):
        raise ExchangeError(f"{what}: {location}{MANIFEST_SUFFIX} is not a manifest")
    try:
        payload = fs.cat_file(path)
    except FileNotFoundError:
        raise ExchangeError(f"{what}: {location} missing (its manifest is there)") from None
    digest = hashlib.sha256(payload).hexdigest()
    if len(payload) != manifest.get("bytes") or digest != manifest.get("sha256"):
        raise ExchangeError(f"{what}: {location} is corrupt: sha256 {digest[:12]}... ({len(payload)} bytes), "
                            f"manifest says {str(manifest.get('sha256'))[:12]}... ({manifest.get('bytes')} bytes)")
    return payload


def _decode(payload: bytes, location: str | Path, what: str) -> tuple[Tensors, dict[str, str]]:
    from safetensors.torch import load

    try:
        tensors = load(payload)
        size = int.from_bytes(payload[:8], "little")  # safetensors: 8-byte header length, JSON header
        metadata = json.loads(payload[8 : 8 + size]).get("__metadata__") or {}
    except Exception as exc:  # noqa: BLE001 - the library's error, whatever its type, names no file
        raise ExchangeError(f"{what}: {location} is not a safetensors file ({exc})") from None
    return tensors, metadata


def write_download(location: str | Path, download: Download, exchange: ExchangeConfig = LOCAL) -> int:
    """Write what the server sends one client; returns its size in bytes."""
    _put(location, tensors_to_bytes(download.tensors, {"meta": json.dumps(download.meta)}, str(location)), exchange)
    return nbytes(download.tensors)


def read_download(location: str | Path, exchange: ExchangeConfig = LOCAL, who: str = "client") -> Download:
    what = f"{who}: download"
    tensors, metadata = _decode(_get(location, exchange, what), location, what)
    return Download(tensors, json.loads(metadata.get("meta", "{}")))


def write_upload(location: str | Path, upload: Tensors, exchange: ExchangeConfig = LOCAL) -> int:
    """Write what a client sends back; returns its size in bytes."""
    _put(location, tensors_to_bytes(upload, None, str(location)), exchange)
    return nbytes(upload)


def validate_upload(location: str | Path, exchange: ExchangeConfig = LOCAL, who: str = "client") -> Tensors:
    """Load an upload (present, whole, sha256 as its manifest says) and reject NaN or Inf (a shape check
    against the other clients' uploads follows in the round loop)."""
    what = f"{who}: upload"
    tensors, _ = _decode(_get(location, exchange, what), location, what)
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ExchangeError(f"{what}: {Path(str(location)).name}: {key} contains NaN or Inf")
    return tensors


def round_location(exchange: ExchangeConfig, local_round_dir: Path, run_key: str, strategy: str,
                   round_: int) -> str:
    """Where one round's files go: the local round folder, or under the store's URL by run and method
    (`run_key`: the output folder's name and the params' fingerprint, so neither two runs with other
    params nor two runs into other output folders share a round folder in a shared bucket)."""
    if exchange.url is None:
        return str(local_round_dir)
    return f"{exchange.url.rstrip('/')}/{run_key}/{strategy}/r{round_:04d}"


def remove_round(location: str, exchange: ExchangeConfig) -> None:
    """Drop a finished round's files (unless `keep_rounds`)."""
    if exchange.keep_rounds:
        return
    fs, path = _fs(location, exchange)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def write_json(location: str | Path, obj: Any, exchange: ExchangeConfig = LOCAL) -> None:
    """A small JSON document (a client's result, a shared cluster map) through the same store."""
    _put(location, json.dumps(obj).encode(), exchange)


def read_json_from(location: str | Path, exchange: ExchangeConfig = LOCAL, what: str = "result") -> Any:
    return json.loads(_get(location, exchange, what))


def exists(location: str | Path, exchange: ExchangeConfig = LOCAL) -> bool:
    """Whether a whole file is there (its manifest is)."""
    fs, path = _fs(str(location), exchange)
    return bool(fs.exists(path + MANIFEST_SUFFIX))


def copy_in(location: str | Path, dest: Path, exchange: ExchangeConfig, what: str) -> None:
    """Fetch a store file (checked) into a local file, atomically."""
    atomic_write_bytes(dest, _get(location, exchange, what))


def publish(src: Path, location: str | Path, exchange: ExchangeConfig) -> None:
    """Put a local file into the store (whole file, then its manifest)."""
    _put(location, src.read_bytes(), exchange)
