"""Which code produced a result: a hash of the package's sources and the lock, and the git commit.

The round checkpoint's fingerprint includes it (a run folder made by other code is not reused),
every metrics file and table names it, and the benchmark refuses to put runs of different code in
one table.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
_PINNED = ("requirements.lock", "constraints.txt", "pyproject.toml")


def sources_hash(package: Path = PACKAGE, repo: Path = REPO) -> str:
    """sha256 over every .py file of the package (path and bytes) and the pinned dependency files."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in _PINNED:
        if (repo / name).exists():
            h.update(name.encode() + b"\0" + (repo / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit(repo: Path = REPO) -> tuple[str | None, bool]:
    """HEAD's commit and whether tracked files differ from it; (None, False) outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None, False
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


@functools.cache
def code_version() -> dict[str, Any]:
    """{"sources": hash, "commit": sha or None, "dirty": bool}, computed once per process."""
    commit, dirty = git_commit()
    return {"sources": sources_hash(), "commit": commit, "dirty": dirty}


def describe(version: dict[str, Any]) -> str:
    """One line for a table: the commit (with -dirty) and the sources hash."""
    commit = (version.get("commit") or "no git commit")[:12] + ("-dirty" if version.get("dirty") else "")
    return f"commit {commit}, sources {version.get('sources')}"
