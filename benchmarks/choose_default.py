"""Issue 20's choice of the shipped default, by the rule fixed in benchmarks/README.md before any option row
was read ("How the shipped default will be chosen"), from the verdicts robustness_table.py wrote per option.

    python benchmarks/choose_default.py VERDICTS.json ... [--sets-dir DIR] [--out FILE]

Each VERDICTS.json is one candidate option's block (its settings' goal checks and margins, and the paper
rule's on the same settings). Per candidate, every setting any block ran counts: where the option did not
run (the class-balanced loss on generation, which has no labels), the paper rule's verdict stands for it. The
winner meets the goal in the most settings, ties to the higher smallest margin (an exact tie between options:
the first name in alphabetical order); it replaces the paper rule only with a higher count, or an equal count and
a smallest margin at least `--replace-by` points higher (up to float noise).
Prints `shipped_default: NAME` last; with `--sets-dir`, NAME's `--set` overrides are read from DIR/NAME.sets.

With `--full FULL.json` (the pick's verdicts on the full-size settings, the file's stem its name) the pick must
also hold at full size: it stands only if no full-size setting's margin is more than `--replace-by` below the
paper rule's there, else the paper rule is shipped. Added (2026-12-04) after the first pick's full-size rows were
read: quick-size rows had hidden a cost that grows with the rounds (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlease.io import atomic_write_text  # noqa: E402

PAPER = "paper"
FLOAT_NOISE = 1e-9  # margins are differences of percentages: 0.5 apart may read 0.49999999999999


def paper_verdicts(blocks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The paper rule's verdict per setting, the same in every block that ran the setting (one set of runs)."""
    paper: dict[str, dict[str, Any]] = {}
    for name, block in blocks.items():
        for label, verdict in block["paper_rule"].items():
            if label in paper and paper[label] != verdict:
                raise SystemExit(f"error: {name}: the paper rule's verdict on {label!r} differs from another "
                                 f"block's ({verdict} vs {paper[label]}): not the same runs")
            paper[label] = verdict
    return paper


def standing(verdicts: dict[str, dict[str, Any]]) -> tuple[int, float]:
    """Settings where the goal is met, and the smallest margin (the tie-break)."""
    return sum(bool(v["met"]) for v in verdicts.values()), min(v["margin"] for v in verdicts.values())


def choose(blocks: dict[str, dict[str, Any]], replace_by: float) -> tuple[str, dict[str, tuple[int, float]]]:
    """The shipped default's name (an option's or PAPER) and every candidate's standing."""
    if not blocks:
        raise SystemExit("error: no option's verdicts to choose from")
    codes = {block["code"] for block in blocks.values()}
    if len(codes) != 1:
        raise SystemExit(f"error: the options' verdicts come from different code versions: {sorted(codes)}")
    paper = paper_verdicts(blocks)
    standings = {PAPER: standing(paper)}
    for name, block in blocks.items():
        standings[name] = standing({**paper, **block["settings"]})
    best = max(sorted(blocks), key=lambda name: standings[name])  # an exact tie: the first name in order
    (count, smallest), (paper_count, paper_smallest) = standings[best], standings[PAPER]
    if count > paper_count or (count == paper_count and smallest >= paper_smallest + replace_by - FLOAT_NOISE):
        return best, standings
    return PAPER, standings


def full_size_falls(full: dict[str, Any], replace_by: float) -> dict[str, tuple[float, float]]:
    """The full-size settings where the pick's margin is more than `replace_by` below the paper rule's (pick's
    margin, paper rule's): an empty dict lets the pick stand."""
    falls = {}
    for label, verdict in full["settings"].items():
        paper_margin = full["paper_rule"][label]["margin"]
        if verdict["margin"] < paper_margin - replace_by - FLOAT_NOISE:
            falls[label] = (verdict["margin"], paper_margin)
    return falls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("verdicts", nargs="+", help="an option's verdicts (robustness_table.py --verdicts); its name: "
                                                "the file's stem")
    ap.add_argument("--replace-by", type=float, default=0.5,
                    help="on an equal count, how much higher an option's smallest margin must be than the paper's")
    ap.add_argument("--sets-dir", default=None, help="where NAME.sets holds the winner's --set overrides")
    ap.add_argument("--full", default=None, metavar="FULL.json",
                    help="the pick's verdicts on the full-size settings (robustness_table.py --verdicts); the pick "
                         "stands only if it holds there (see above)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    blocks = {Path(f).stem: json.loads(Path(f).read_text()) for f in args.verdicts}
    chosen, standings = choose(blocks, args.replace_by)
    pick = chosen
    columns = {PAPER: "paper rule", **{name: block["column"] for name, block in blocks.items()}}
    settings = sorted({label for block in blocks.values() for label in block["settings"]})
    lines = [f"# The shipped default (issue 20), by the rule fixed before the rows were read "
             f"(benchmarks/README.md); code: {next(iter(blocks.values()))['code']}", "",
             f"Settings ({len(settings)}): {'; '.join(settings)}. A setting an option did not run counts as the "
             "paper rule's there.", "",
             "| candidate | settings meeting the goal | smallest margin |", "|---|---|---|"]
    lines += [f"| {columns[name]} | {count} of {len(settings)} | {smallest:+.2f} |"
              for name, (count, smallest) in standings.items()]
    if args.full:
        full = json.loads(Path(args.full).read_text())
        if Path(args.full).stem != pick:
            raise SystemExit(f"error: --full {args.full} holds {Path(args.full).stem!r}'s full-size verdicts; "
                             f"the pick is {pick!r}")
        falls = full_size_falls(full, args.replace_by)
        lines += ["", f"Full-size check of the pick, {columns[pick]} (code: {full['code']}): it stands only if no "
                      f"full-size setting's margin is more than {args.replace_by:g} below the paper rule's (a check "
                      "added after the first pick's full-size rows were read: benchmarks/README.md).", "",
                  "| full-size setting | the pick's margin | the paper rule's margin | holds |", "|---|---|---|---|"]
        lines += [f"| {label} | {v['margin']:+.2f} | {full['paper_rule'][label]['margin']:+.2f} | "
                  f"{'**no**' if label in falls else 'yes'} |" for label, v in full["settings"].items()]
        if falls:
            chosen = PAPER
    sets = ""
    if chosen != PAPER and args.sets_dir:
        sets = " ".join((Path(args.sets_dir) / f"{chosen}.sets").read_text().split())
    why = f" ({columns[pick]}, the quick-size pick, does not hold at full size)" if chosen != pick else ""
    lines += ["", f"Chosen: {columns[chosen]}" + (f" (`{sets}`)" if sets else "") + why + ".", "",
              f"shipped_default: {chosen}"]
    text = "\n".join(lines)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
