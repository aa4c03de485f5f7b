"""The robustness table: FedLEASE under the paper's rule and under a candidate rule (its options on),
beside `local` and the best other method, for each setting, from benchmark run folders of one code version.

    python benchmarks/robustness_table.py --setting "LABEL=PAPER_SETTING_DIR,DEFAULT_SETTING_DIR" ... [--out FILE]

Each SETTING_DIR is one of quality.py's setting folders (seed<k>/metrics.json inside). A setting with
no default folder ("LABEL=PAPER_DIR,-": the shipped default changes nothing there but the silhouette
tolerance, as for generation) gets the default's M from the paper run's stored silhouette scores: with
the same warm-up, the same M means the same FedLEASE run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlease.provenance import describe  # noqa: E402


def _runs(folder: str) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("seed*/metrics.json"))]
    if not runs:
        raise SystemExit(f"error: {folder}: no seed*/metrics.json (run quality.py first)")
    return runs


def _mean(runs: list[dict], method: str) -> float:
    return 100 * statistics.mean(r["methods"][method]["mean"] for r in runs)


def _alloc(runs: list[dict]) -> str:
    return ", ".join(f"M={r['allocation']['num_experts']}{' (cap)' if r['allocation'].get('capped') else ''} "
                     f"ARI {r['allocation']['ari_vs_task']:.2f}" for r in runs if "allocation" in r)


def row(setting: str, label: str, paper: list[dict], default: list[dict], tolerance: float,
        excluded: tuple[str, ...] = ()) -> str:
    others = {m: _mean(paper, m) for m in paper[0]["methods"] if m not in ("fedlease", "local", *excluded)}
    best = max(others, key=others.get) if others else None
    fl_paper, local_paper = _mean(paper, "fedlease"), _mean(paper, "local")
    if default:
        fl_default, local_default, alloc_default = _mean(default, "fedlease"), _mean(default, "local"), _alloc(default)
    else:  # tolerance only: the M the default would choose, from the stored silhouette scores
        chosen = []
        for r in paper:
            sil = {int(k): v for k, v in r["allocation"]["silhouette"].items()}
            top = max(sil.values())
            chosen.append(min(k for k, v in sil.items() if v >= top - tolerance))
        same = all(c == r["allocation"]["num_experts"] for c, r in zip(chosen, paper, strict=True))
        fl_default = fl_paper if same else float("nan")
        local_default, alloc_default = local_paper, f"M={chosen} ({'same as the paper rule' if same else 'differs: not run'})"
    best_default = max(local_default, others[best] if best else float("-inf"))
    best_paper = max(local_paper, others[best] if best else float("-inf"))
    return (f"| {label} | {len(paper)} | {fl_paper:.2f} | {fl_default:.2f} | {local_paper:.2f} / {local_default:.2f} | "
            f"{f'{best} {others[best]:.2f}' if best else '-'} | {fl_paper - best_paper:+.2f} / "
            f"{fl_default - best_default:+.2f} | {_alloc(paper)} | {alloc_default} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", default=[], metavar="LABEL=PAPER_DIR,CANDIDATE_DIR",
                    help="a setting's run folders under the paper rule and the candidate rule (- for none)")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--not-best", action="append", default=[],
                    help="a method left out of 'best other' (e.g. one that trained more steps in these runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = ["| setting | seeds | FedLEASE, paper rule | FedLEASE, candidate rule | local (paper / candidate warm-up) | "
             "best other federated method | margin over the best other, `local` included (paper / candidate) | "
             "allocation, paper rule | allocation, candidate |", "|" + "---|" * 9]
    versions = set()
    for item in args.setting:
        label, folders = item.split("=", 1)
        paper_dir, default_dir = folders.split(",", 1)
        paper = _runs(paper_dir)
        default = _runs(default_dir) if default_dir != "-" else []
        versions |= {json.dumps({k: r["code_version"][k] for k in ("sources", "commit")}) for r in paper + default}
        lines.append(row(label, label, paper, default, args.tolerance, tuple(args.not_best)))
    if len(versions) > 1:
        raise SystemExit(f"error: runs of different code versions: {sorted(versions)}")
    version = json.loads(next(iter(versions)))
    lines += ["", f"Code: {describe(version)}; protocol equal compute; quick size (6-8 clients, 2 rounds)."
              + (f" Left out of 'best other method': {', '.join(args.not_best)}." if args.not_best else "")]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
