"""The robustness table (issue 20): per setting, FedLEASE under the paper's rule and under the shipped
default, beside the floors (majority class, `local`) and the best baseline, from quality.py run folders
of one code version.

    python benchmarks/robustness_table.py --setting "LABEL=PAPER_DIR[,SHIPPED_DIR]" ... [--out FILE]

Each DIR is one of quality.py's setting folders (seed<k>/metrics.json inside). Without SHIPPED_DIR the
setting's paper-rule runs stand for the shipped default too: pass that only when the shipped default *is*
the paper rule at the runs' commit (the table says so under it). The margin is the shipped default's
mean minus the best other mean, `local` included; the goal is a margin >= `--goal-margin` in every setting
and an ARI >= `--goal-ari` wherever the clients differ by task (every setting here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlease.io import atomic_write_text  # noqa: E402
from fedlease.provenance import describe  # noqa: E402
from fedlease.strategies import floor_names, primary_name  # noqa: E402

HEADER = ("| setting | seeds | majority floor | `local` | best baseline | FedLEASE, paper rule | FedLEASE, {column} | "
          "margin of the {column} over the best other (`local` included) | >= goal | M per seed | "
          "ARI vs tasks (mean) | >= goal |")


def load_runs(folder: str) -> list[dict[str, Any]]:
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("seed*/metrics.json"))]
    if not runs:
        raise SystemExit(f"error: {folder}: no seed*/metrics.json (run quality.py first)")
    return runs


def mean_of(runs: list[dict[str, Any]], method: str, key: str = "mean") -> float:
    """The method's score over seeds, in percent (accuracy or ROUGE-L)."""
    return 100 * statistics.mean(r["methods"][method][key] for r in runs)


def majority_floor(runs: list[dict[str, Any]]) -> float | None:
    """Each client predicting its most frequent training label (classification only; the same for every method)."""
    floors = [next(iter(r["methods"].values())).get("majority") for r in runs]
    return None if any(f is None for f in floors) else 100 * statistics.mean(f["mean"] for f in floors)


def allocation(runs: list[dict[str, Any]]) -> tuple[str, float]:
    """M per seed (cap marked) and the mean ARI of the clusters against the true tasks."""
    allocs = [r["allocation"] for r in runs]
    ms = ", ".join(f"{a['num_experts']}{' (cap)' if a.get('capped') else ''}" for a in allocs)
    return ms, statistics.mean(a["ari_vs_task"] for a in allocs)


def row(label: str, paper: list[dict[str, Any]], shipped: list[dict[str, Any]], goal_margin: float,
        goal_ari: float) -> tuple[str, float, float]:
    """One setting's line, its margin and its ARI (both of the second column: the shipped default, or an option)."""
    methods = list(paper[0]["methods"])
    primary = primary_name(methods)
    floors = floor_names(methods)
    if primary is None or not floors:
        raise SystemExit(f"error: {label}: the runs need the primary method and a floor (`local`); have {methods}")
    floor = floors[0]
    baselines = {m: mean_of(paper, m) for m in methods if m != primary and m not in floors}
    best = max(baselines, key=baselines.get) if baselines else None
    # a shipped default that changes the warm-up changes `local` too; runs without `local` share the paper's warm-up
    local_score = mean_of(shipped if floor in shipped[0]["methods"] else paper, floor)
    best_other = max([local_score, *([baselines[best]] if best else [])])
    fl_paper, fl_shipped = mean_of(paper, primary), mean_of(shipped, primary)
    margin = fl_shipped - best_other
    ms, ari = allocation(shipped)
    majority = majority_floor(paper)
    line = (f"| {label} | {len(paper)} | {'-' if majority is None else f'{majority:.2f}'} | {local_score:.2f} | "
            f"{f'{best} {baselines[best]:.2f}' if best else '-'} | {fl_paper:.2f} | {fl_shipped:.2f} | "
            f"{margin:+.2f} | {'yes' if margin >= goal_margin else '**no**'} | {ms} | {ari:.2f} | "
            f"{'yes' if ari >= goal_ari else '**no**'} |")
    return line, margin, ari


def code_version(runs: list[dict[str, Any]]) -> str:
    return json.dumps({k: runs[0]["code_version"][k] for k in ("sources", "commit")}, sort_keys=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", default=[], metavar="LABEL=PAPER_DIR[,SHIPPED_DIR]",
                    help="a setting's run folders: the paper rule's, and the shipped default's when it differs")
    ap.add_argument("--goal-margin", type=float, default=1.0)
    ap.add_argument("--goal-ari", type=float, default=0.95)
    ap.add_argument("--column", default="shipped default",
                    help="what the second folders hold (e.g. 'own prior b = 2' for an option's ablation rows)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.setting:
        ap.error("name at least one --setting")
    header = HEADER.format(column=args.column)
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    versions: set[str] = set()
    shared = []
    for item in args.setting:
        label, _, folders = item.partition("=")
        paper_dir, _, shipped_dir = folders.partition(",")
        paper = load_runs(paper_dir)
        shipped = load_runs(shipped_dir) if shipped_dir else paper
        if not shipped_dir:
            shared.append(label)
        if {r.get("protocol") for r in paper + shipped} != {"equal_compute"}:
            raise SystemExit(f"error: {label}: every run must use the equal-compute protocol")
        for runs in (paper, shipped):
            versions |= {code_version([r]) for r in runs}
        lines.append(row(label, paper, shipped, args.goal_margin, args.goal_ari)[0])
    if len(versions) > 1:
        raise SystemExit(f"error: runs of different code versions: {sorted(versions)}")
    lines += ["", f"Code: {describe(json.loads(versions.pop()))}; protocol: equal compute. Scores in % "
                  "(accuracy, each client on its own test set, client mean; ROUGE-L for generation). Goal: "
                  f"margin >= {args.goal_margin:+.2f} and ARI >= {args.goal_ari:.2f}."]
    if shared:
        lines.append(f"Same runs in both FedLEASE columns (the {args.column} is the paper rule there): "
                     f"{'; '.join(shared)}.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")


if __name__ == "__main__":
    main()
