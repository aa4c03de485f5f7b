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


#: profiler ops that only describe or reshape memory (no kernel would run on a GPU)
METADATA_OPS = {
    "aten::as_strided", "aten::view", "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::empty",
    "aten::empty_strided", "aten::detach", "aten::alias", "aten::_reshape_alias", "aten::expand", "aten::permute",
    "aten::t", "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select",
    "aten::lift_fresh", "aten::_local_scalar_dense", "aten::result_type", "aten::reshape", "aten::narrow",
    "aten::flatten", "aten::unflatten", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::unbind",
}


def kernel_ops(events: list) -> int:
    """Operators that would launch a kernel: aten compute ops none of whose descendants is one (a
    composite op such as linear counts as the matmul it runs)."""

    def descendants(e):  # noqa: ANN001, ANN202
        stack = list(e.cpu_children)
        while stack:
            child = stack.pop()
            yield child
            stack += child.cpu_children

    def compute(e) -> bool:  # noqa: ANN001
        return e.name.startswith("aten::") and e.name not in METADATA_OPS and not noop_cast(e)

    def noop_cast(e) -> bool:  # noqa: ANN001
        """`aten::to` to the dtype/device a tensor already has returns it as is: a copying one has an
        `aten::_to_copy` under it (counted there), so a `to` without one launches nothing. Counting it also
        hid the op it sits under (scatter_add_, gather) as a non-leaf."""
        return e.name == "aten::to" and not any(d.name == "aten::_to_copy" for d in descendants(e))

    def leaf(e) -> bool:  # noqa: ANN001
        return not any(compute(d) for d in descendants(e))

    return sum(1 for e in events if compute(e) and leaf(e))
