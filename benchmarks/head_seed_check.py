"""Do tasks with the same label count look alike to the allocation because their heads start alike?

    python benchmarks/head_seed_check.py [--params benchmarks/params_mix5.yaml] [--seeds 0,1,2] [--runs DIR]

Every client's classification head starts from one draw seeded by (run seed, number of labels)
(`fedlease/models/base.py::head_init`), so two binary tasks share their initial head. On the 5-task mix
the subspace distance merges exactly those two tasks (benchmarks/README). This runs the (quick-size) warm-up
twice per seed, once as shipped and once with each task's head drawn from its own seed (a diagnostic patch,
not an option: a head seeded by the task would hand the allocation the task's identity), and prints the
allocation each distance makes of each, with its ARI against the tasks. If the per-task heads separate the
two binary tasks, the shared head is the cause.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedlease.config import load_config  # noqa: E402

HERE = Path(__file__).resolve().parent


@contextmanager
def heads_seeded_by_task(tasks: list[str]) -> Iterator[None]:
    """Within the block, client c's head is drawn from a seed that also depends on its task's index."""
    import fedlease.client as client_module
    import fedlease.runtime as runtime_module

    order = sorted(set(tasks))
    current = threading.local()
    build, draw = client_module.build_client_model, runtime_module.head_init

    def build_noting_the_client(rt: Any, strategy: Any, client_id: int, *rest: Any) -> Any:
        current.task = order.index(tasks[client_id])
        return build(rt, strategy, client_id, *rest)

    def head_of_the_task(in_features: int, num_labels: int, seed: int, bias: bool, std: float) -> Any:
        return draw(in_features, num_labels, seed * 7919 + 101 * (current.task + 1), bias, std)

    client_module.build_client_model, runtime_module.head_init = build_noting_the_client, head_of_the_task
    try:
        yield
    finally:
        client_module.build_client_model, runtime_module.head_init = build, draw


def warm_up(params: str, overrides: list[str], folder: Path, per_task_heads: bool) -> tuple[list[str], list[dict]]:
    """The data and warm-up stages in `folder`; the clients' tasks and warm-up adapters."""
    from fedlease.io import load_tensors
    from fedlease.pipeline import stage_data, stage_warmup

    cfg = load_config(params, [*overrides, f"output_dir={folder}", "tracking.enabled=false", "strategies=[fedlease]"])
    stage_data(cfg)
    tasks = [c["task"] for c in json.loads((folder / "data" / "stats.json").read_text())["clients"]]
    if per_task_heads:
        with heads_seeded_by_task(tasks):
            stage_warmup(cfg)
    else:
        stage_warmup(cfg)
    return tasks, [load_tensors(p) for p in sorted((folder / "warmup").glob("client_*.safetensors"))]


def allocations(params: str, overrides: list[str], tasks: list[str], adapters: list[dict]) -> str:
    """The allocation each distance makes of these adapters under the run's clustering settings, its ARI."""
    from sklearn.metrics import adjusted_rand_score

    from fedlease.allocation import applicable_distances
    from fedlease.pipeline import allocate

    cfg = load_config(params, overrides)
    parts = []
    for kind in applicable_distances(adapters):
        _, alloc = allocate(cfg, adapters, kind)
        groups: dict[int, set[str]] = {}
        for task, cluster in zip(tasks, alloc.assignment, strict=True):
            groups.setdefault(int(cluster), set()).add(task)
        parts.append(f"{kind}: M = {alloc.num_experts}, ARI {adjusted_rand_score(tasks, alloc.assignment):.3f} "
                     + str(sorted(sorted(g) for g in groups.values())))
    return "; ".join(parts)


def main() -> None:
    from quality import QUICK

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(HERE / "params_mix5.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default=str(HERE / "runs" / "head-seed-check"))
    ap.add_argument("--try", dest="tries", action="append", default=[], metavar="KEY=VALUE",
                    help="also a warm-up with this override (shared heads, as shipped): e.g. an option meant to "
                         "make the allocation follow the data rather than the initial head")
    ap.add_argument("--full", action="store_true", help="the params' own size (default: quality.py's quick size)")
    ap.add_argument("--only-tries", action="store_true",
                    help="only the --try warm-ups (the shipped and per-task ones already measured)")
    args = ap.parse_args()
    variants = [] if args.only_tries else [("heads per label count (shipped)", "shipped", [], False),
                                           ("heads per task", "per-task", [], True)]
    variants += [(f"shipped heads, {kv}", kv.replace("=", "-").replace(".", "_"), [kv], False) for kv in args.tries]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, folder_name, extra, per_task in variants:
            overrides = [*([] if args.full else QUICK), f"seed={seed}", *extra]
            folder = Path(args.runs) / f"seed{seed}" / folder_name
            tasks, adapters = warm_up(args.params, overrides, folder, per_task)
            print(f"seed {seed}, {name}: {allocations(args.params, overrides, tasks, adapters)}", flush=True)


if __name__ == "__main__":
    main()
