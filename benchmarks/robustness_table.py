"""The robustness table (issue 20): per setting, FedLEASE under the paper's rule and under the shipped
default, beside the floors (majority class, `local`) and the best baseline, from quality.py run folders
of one code version.

    python benchmarks/robustness_table.py --setting "LABEL=PAPER_DIR[,SHIPPED_DIR]" ... [--out FILE]

Each DIR is one of quality.py's setting folders (seed<k>/metrics.json inside). Without SHIPPED_DIR the
setting's paper-rule runs stand for the shipped default too: pass that only when the shipped default *is*
the paper rule at the runs' commit (the table says so under it). The margin is the shipped default's
mean minus the best other mean, `local` included; the goal is a margin >= `--goal-margin` in every setting
and an ARI >= `--goal-ari` wherever the clients differ by task (every setting here). Under the goal table: the
label-skew settings on label-balanced test sets (where a skewed client's own test set cannot tell methods apart),
and what each method spent (local steps, MB, seconds with its warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedlease.io import atomic_write_text  # noqa: E402
from fedlease.provenance import describe  # noqa: E402
from fedlease.strategies import floor_names, primary_name, strategy_class  # noqa: E402
from quality import method_units, no_failed_evaluations, one_code_version  # noqa: E402

HEADER = ("| setting | seeds | majority floor | `local` | best baseline | FedLEASE, paper rule | FedLEASE, {column} | "
          "margin of the {column} over the best other (`local` included) | >= goal | M per seed | "
          "ARI vs tasks per seed | >= goal on every seed |")


def load_runs(folder: str) -> dict[str, dict[str, Any]]:
    """A setting folder's runs by seed folder name; refused when a run is of the paper protocol, has a
    failed client evaluation (it would be out of its method's mean) or is stale (see `merged_from_units`)."""
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("seed*/metrics.json"))}
    if not runs:
        raise SystemExit(f"error: {folder}: no seed*/metrics.json (run quality.py first)")
    if {r.get("protocol") for r in runs.values()} != {"equal_compute"}:
        raise SystemExit(f"error: {folder}: every run must use the equal-compute protocol")
    for seed, run in runs.items():
        merged_from_units(Path(folder) / seed, run)
    no_failed_evaluations(list(runs.values()))
    return runs


def merged_from_units(seed_dir: Path, run: dict[str, Any]) -> None:
    """A seed's metrics.json is quality.py's merge of the unit records beside it (`units/<unit>.json`, the
    units its methods run in); one that its units no longer give (a unit removed or rerun since the merge) is
    stale, and refused by name."""
    by_name: dict[str, Any] = {}
    for unit in method_units(list(run["methods"])):
        path = seed_dir / "units" / f"{'+'.join(unit)}.json"
        if path.exists():
            try:
                by_name.update(json.loads(path.read_text())["metrics"]["methods"])
            except (ValueError, KeyError) as exc:
                raise SystemExit(f"error: {path}: not a unit record ({exc!r})") from None
    stale = sorted(name for name, m in run["methods"].items() if by_name.get(name, {}).get("mean") != m["mean"])
    if stale:
        raise SystemExit(f"error: {seed_dir / 'metrics.json'} is not the merge of its unit records (missing or "
                         f"different: {', '.join(stale)}); rerun quality.py on that setting")


def meets(value: float, goal: float) -> bool:
    """value >= goal, up to float noise (100 * 0.565 - 100 * 0.555 is 0.99999999999998, a margin of 1.00)."""
    return value >= goal - 1e-9


def shown(value: float, goal: float, spec: str) -> str:
    """`value` in `spec`, with more decimals while the rounding would put it on the other side of the goal
    (a margin of 0.996 reads +0.996, not +1.00 beside a failed check)."""
    sign, digits = spec.rstrip("f").split(".")
    for places in range(int(digits), 10):
        text = format(value, f"{sign}.{places}f")
        if meets(float(text), goal) == meets(value, goal):
            break
    return text


def mean_of(runs: list[dict[str, Any]], method: str) -> float:
    """The method's score over seeds, in percent (accuracy or ROUGE-L)."""
    return 100 * statistics.mean(r["methods"][method]["mean"] for r in runs)


def majority_floor(runs: list[dict[str, Any]]) -> float | None:
    """Each client predicting its most frequent training label (classification only; the same for every method)."""
    floors = [next(iter(r["methods"].values())).get("majority") for r in runs]
    return None if any(f is None for f in floors) else 100 * statistics.mean(f["mean"] for f in floors)


def experts_cell(alloc: dict[str, Any]) -> str:
    """M, and the cap it stopped at when it did (named where the run kept the name: 4c36b27's runs did not)."""
    if not alloc.get("capped"):
        return str(alloc["num_experts"])
    return f"{alloc['num_experts']} (cap{': ' + alloc['cap'] if alloc.get('cap') else ''})"


def allocation(runs: list[dict[str, Any]], goal_ari: float) -> tuple[str, str, float | None]:
    """M per seed (cap marked), the ARI of the clusters against the true tasks per seed, and the lowest ARI
    (the goal holds on every seed; None when a run has no allocation or its clients' tasks are not known)."""
    allocs = [r.get("allocation") or {} for r in runs]
    ms = ", ".join(experts_cell(a) if a else "-" for a in allocs)
    aris = [a.get("ari_vs_task") for a in allocs]
    if any(x is None for x in aris):
        return ms, "-", None
    return ms, ", ".join(shown(x, goal_ari, ".2f") for x in aris), min(aris)


@dataclass(frozen=True)
class Verdict:
    """A candidate's result in one setting: goals met (margin and ARI), and its margin (the tie-break)."""

    met: bool
    margin: float


def summary(name: str, verdicts: list[Verdict], column: str, goal_margin: float) -> str:
    smallest = min(v.margin for v in verdicts)
    return (f"{name}: met in {sum(v.met for v in verdicts)} of {len(verdicts)} settings ({column}); "
            f"smallest margin {shown(smallest, goal_margin, '+.2f')}")


def row(label: str, paper: list[dict[str, Any]], shipped: list[dict[str, Any]], goal_margin: float,
        goal_ari: float, runs_of_its_own: bool) -> tuple[str, Verdict, Verdict]:
    """One setting's line, and whether the second column (the shipped default, or an option) and the paper rule
    meet the goals, with their margins (the decision rule of benchmarks/README.md reads both).

    `runs_of_its_own`: the second column has run folders of its own (else the paper rule's runs stand for it)."""
    methods = list(paper[0]["methods"])
    primary = primary_name(methods)
    floors = floor_names(methods)
    if primary is None or not floors:
        raise SystemExit(f"error: {label}: the runs need the primary method and a floor (`local`); have {methods}")
    floor = floors[0]
    baselines = {m: mean_of(paper, m) for m in methods if m != primary and m not in floors}
    best = max(baselines, key=baselines.get) if baselines else None
    # a shipped default that changes the warm-up changes `local` too (its runs carry their own): then both
    # `local`s are other methods a user could run, and the margin is over the better one
    local_paper = mean_of(paper, floor)
    own_local = runs_of_its_own and all(floor in r["methods"] for r in shipped)
    local_shipped = mean_of(shipped, floor) if own_local else local_paper
    best_other = max([local_paper, local_shipped, *([baselines[best]] if best else [])])
    fl_paper, fl_shipped = mean_of(paper, primary), mean_of(shipped, primary)
    margin = fl_shipped - best_other
    ms, aris, ari = allocation(shipped, goal_ari)
    majority = majority_floor(paper)
    margin_met = meets(margin, goal_margin)
    ari_met = ari is None or meets(ari, goal_ari)  # on every seed; no known tasks: nothing to recover
    paper_margin = fl_paper - max([local_paper, *([baselines[best]] if best else [])])
    paper_ari = allocation(paper, goal_ari)[2]
    paper_met = meets(paper_margin, goal_margin) and (paper_ari is None or meets(paper_ari, goal_ari))
    local_cell = f"{local_paper:.2f}" + (f" (with its warm-up: {local_shipped:.2f})" if own_local else "")
    line = (f"| {label} | {len(paper)} | {'-' if majority is None else f'{majority:.2f}'} | {local_cell} | "
            f"{f'{best} {baselines[best]:.2f}' if best else '-'} | {fl_paper:.2f} | {fl_shipped:.2f} | "
            f"{shown(margin, goal_margin, '+.2f')} | {'yes' if margin_met else '**no**'} | {ms} | {aris} | "
            f"{'-' if ari is None else 'yes' if ari_met else '**no**'} |")
    return line, Verdict(margin_met and ari_met, margin), Verdict(paper_met, paper_margin)


def balanced_row(label: str, paper: list[dict[str, Any]], shipped: list[dict[str, Any]], own: bool) -> str | None:
    """Under label skew a client's own test set is nearly one label, so every method scores near the majority
    floor there: the same runs scored on each task's label-balanced test set (the task's whole label space),
    `local` (the better of the two when the column has its own), the best baseline on it, FedLEASE under both
    rules and the column's margin. None when the runs hold no balanced scores (no label skew). A reading beside
    the goal, which stays on the clients' own test sets (the rule fixed before the rows: benchmarks/README.md)."""
    methods = list(paper[0]["methods"])
    if not all(m.get("balanced") for r in [*paper, *shipped] for m in r["methods"].values()):
        return None
    primary, floor = primary_name(methods), floor_names(methods)[0]

    def bal(runs: list[dict[str, Any]], method: str) -> float:
        return 100 * statistics.mean(r["methods"][method]["balanced"]["mean"] for r in runs)

    baselines = {m: bal(paper, m) for m in methods if m != primary and m != floor}
    best = max(baselines, key=baselines.get) if baselines else None
    locals_ = [bal(paper, floor), *([bal(shipped, floor)] if own and all(floor in r["methods"] for r in shipped)
                                    else [])]
    fl_paper, fl_shipped = bal(paper, primary), bal(shipped, primary)
    margin = fl_shipped - max([*locals_, *([baselines[best]] if best else [])])
    return (f"| {label} | {len(paper)} | {max(locals_):.2f} | {f'{best} {baselines[best]:.2f}' if best else '-'} | "
            f"{fl_paper:.2f} | {fl_shipped:.2f} | {margin:+.2f} |")


def compute_row(label: str, paper: list[dict[str, Any]], shipped: list[dict[str, Any]], own: bool) -> str:
    """What each method spent in a setting, mean over seeds: local optimiser steps per client (equal compute:
    one number when every method's is the same), total MB up and down per client over the run, and seconds
    with the warm-up a method continues from (FedLEASE's and `local`'s; nan, shown "-", when a run kept none)."""
    def spent(runs: list[dict[str, Any]], method: str) -> tuple[float, float, float, float]:
        heir = strategy_class(method).inherits_warmup
        per = [(r["methods"][method], (r.get("allocation") or {}).get("warmup_seconds", float("nan")) if heir
                else 0.0) for r in runs]
        return (statistics.mean(m["local_steps_per_client"] for m, _ in per),
                statistics.mean(m["bytes_up_total_per_client"] for m, _ in per) / 1e6,
                statistics.mean(m["bytes_down_total_per_client"] for m, _ in per) / 1e6,
                statistics.mean(m["wall_seconds"] + w for m, w in per))

    columns = {m: spent(paper, m) for m in paper[0]["methods"]}
    if own:  # the column's runs: FedLEASE's (and its `local`'s, when it reruns the warm-up)
        columns.update({f"{m} (column)": spent(shipped, m) for m in shipped[0]["methods"]})
    steps = {round(c[0], 1) for c in columns.values()}
    steps_cell = (f"{steps.pop():g}" if len(steps) == 1
                  else "**differ**: " + ", ".join(f"{m} {c[0]:g}" for m, c in columns.items()))
    cells = "; ".join(f"{m} {c[1]:.2f} / {c[2]:.2f} MB, {'-' if c[3] != c[3] else f'{c[3]:.0f}'} s"
                      for m, c in columns.items())
    return f"| {label} | {steps_cell} | {cells} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", default=[], metavar="LABEL=PAPER_DIR[,SHIPPED_DIR]",
                    help="a setting's run folders: the paper rule's, and the shipped default's when it differs")
    ap.add_argument("--goal-margin", type=float, default=1.0)
    ap.add_argument("--goal-ari", type=float, default=0.95)
    ap.add_argument("--column", default="shipped default",
                    help="what the second folders hold (e.g. 'own prior b = 2' for an option's ablation rows)")
    ap.add_argument("--title", default=None, help="a heading above the tables (what the two FedLEASE columns are)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--verdicts", default=None, metavar="JSON",
                    help="also write each setting's verdicts (goal met, margin) of the column and of the paper rule, "
                         "for choose_default.py")
    args = ap.parse_args()
    if not args.setting:
        ap.error("name at least one --setting")
    header = HEADER.format(column=args.column)
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    every: list[dict[str, Any]] = []
    shared: list[str] = []
    verdicts: list[Verdict] = []
    paper_verdicts: list[Verdict] = []
    balanced_lines: list[str] = []
    compute_lines: list[str] = []
    for item in args.setting:
        label, _, folders = item.partition("=")
        paper_dir, _, shipped_dir = folders.partition(",")
        paper = load_runs(paper_dir)
        shipped = load_runs(shipped_dir) if shipped_dir else paper
        if sorted(paper) != sorted(shipped):  # the margin compares means over the same seeds
            raise SystemExit(f"error: {label}: {paper_dir} has {sorted(paper)}, {shipped_dir} {sorted(shipped)}")
        if not shipped_dir:
            shared.append(label)
        every += [*paper.values(), *shipped.values()]
        paper_runs, shipped_runs, own = list(paper.values()), list(shipped.values()), bool(shipped_dir)
        line, verdict, paper_verdict = row(label, paper_runs, shipped_runs, args.goal_margin, args.goal_ari,
                                           runs_of_its_own=own)
        lines.append(line)
        balanced = balanced_row(label, paper_runs, shipped_runs, own)
        balanced_lines += [balanced] if balanced else []
        compute_lines.append(compute_row(label, paper_runs, shipped_runs, own))
        verdicts.append(verdict)
        paper_verdicts.append(paper_verdict)
    version = one_code_version(every)  # every run and every method's rounds: one code version
    lines += ["", f"Code: {describe(version)}; protocol: equal compute. Scores in % "
                  "(accuracy, each client on its own test set, client mean; ROUGE-L for generation). Goal: "
                  f"margin >= {args.goal_margin:+.2f} and ARI >= {args.goal_ari:.2f}."]
    if shared:
        lines.append(f"Same runs in both FedLEASE columns (the {args.column} is the paper rule there): "
                     f"{'; '.join(shared)}.")
    if balanced_lines:
        lines += ["", "The label-skew settings on each task's label-balanced test set (the task's whole label space; "
                      "the goal above stays on the clients' own test sets):", "",
                  f"| setting | seeds | `local` | best baseline | FedLEASE, paper rule | FedLEASE, {args.column} | "
                  f"margin of the {args.column} over the best other |", "|---|---|---|---|---|---|---|",
                  *balanced_lines]
    lines += ["", "What each method spent (mean over seeds): local optimiser steps per client, total MB up / down "
                  "per client over the run, seconds with the warm-up a method continues from:", "",
              "| setting | local steps/client | per method: MB up / down per client, seconds |", "|---|---|---|",
              *compute_lines]
    lines.append("")
    if len(shared) < len(args.setting):  # a column of its own somewhere: the paper rule's count on the same settings
        lines.append(summary("robustness_goal_paper_rule", paper_verdicts, "paper rule", args.goal_margin))
    lines.append(summary("robustness_goal", verdicts, args.column, args.goal_margin))
    text = "\n".join(([f"# {args.title}", ""] if args.title else []) + lines)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    if args.verdicts:
        labels = [item.partition("=")[0] for item in args.setting]
        doc = {"column": args.column, "code": describe(version),
               "settings": {lab: asdict(v) for lab, v in zip(labels, verdicts)},
               "paper_rule": {lab: asdict(v) for lab, v in zip(labels, paper_verdicts)}}
        atomic_write_text(Path(args.verdicts), json.dumps(doc, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
