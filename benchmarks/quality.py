"""Quality benchmark: every method on the same partitions, seeds and budgets; FedLEASE's margin.

Runs the real pipeline (`fedlease.pipeline.run_all`) per seed and unit of methods (`method_units`), writes
`benchmarks/results/quality.md` (method x task accuracy, mean +- std over seeds, MB up/down
per client per round, trainable parameters, wall time, the paper's GLUE table beside it), and
ends with four lines, `ari: <v>`, `fedlease_margin: <points over the best other method>`, `skew_margin:` (with
--label-skew) and `nlg_margin:` (a run with --nlg), each naming the protocol and the seeds it averages; a setting
the run left out prints `not run` and the flag that runs it.

    python benchmarks/quality.py [--params FILE] [--set key.path=value ...] [--seeds 0,1,2] [--quick]
                                 [--label-skew] [--ablations [--ablation-seeds 0]] [--dp]
                                 [--runs benchmarks/runs] [--records DIR] [--out benchmarks/results/quality.md]
    python benchmarks/quality.py --nlg [--quick] [--seeds 0]    # the NLG table (ROUGE-L), its own section

The NLG run and the classification run each replace only their own section of the output file. Each unit's
result is recorded (`--records`, small JSON); a unit whose record has this run's params and code version is read
instead of rerun, so keeping the records (e.g. committed) lets a long benchmark continue on a fresh machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlease.config import load_config  # noqa: E402
from fedlease.io import atomic_write_text  # noqa: E402
from fedlease.pipeline import run_all  # noqa: E402
from fedlease.provenance import describe  # noqa: E402
from fedlease.report import mean_std, method_table  # noqa: E402

HERE = Path(__file__).resolve().parent
QUICK = ["data.partition.clients_per_task=2", "data.partition.train_per_client=48",
         "data.partition.test_per_client=32", "federation.rounds=2", "fedlease.warmup_epochs=3",
         "training.local_epochs=1"]  # every method of the profile, at a small budget
LABEL_SKEW = ["data.partition.scheme=task_dirichlet", "data.partition.dirichlet_alpha=0.5",
              "data.partition.balanced_test_per_label=8"]
NLG_PARAMS = str(Path(__file__).resolve().parents[1] / "params_nlg.yaml")
# `local` (no federation, continuing from FedLEASE's warm-up) is the equal-compute floor: it tells a
# collaboration gain from the extra epochs FedLEASE's warm-up gives it
NLG_METHODS = ["strategies=[fedlease,local,fedit,ffa_lora,fedsa_lora,ifca,feddpa]"]
NLG_QUICK = ["data.partition.train_per_client=8", "data.partition.test_per_client=8", "federation.rounds=1",
             "fedlease.warmup_epochs=1", "training.max_new_tokens=12", "training.eval_batch_size=8"]
NLG_HEADING = "## NLG: federated instruction tuning"
RUNS = Path("benchmarks/runs")  # run folders (per setting, seed and unit; resumable); --runs changes it
RECORDS = RUNS  # the units' results and each seed's metrics.json (small; kept apart with --records)

PAPER = """| method (paper: RoBERTa-Large, GLUE, 16 clients) | SST-2 | QNLI | MRPC | QQP | avg |
|---|---|---|---|---|---|
| FedIT | 93.33 | 85.43 | 76.35 | 73.82 | 82.23 |
| FedSA-LoRA | 91.97 | 82.70 | 82.08 | 81.65 | 84.60 |
| IFCA + LoRA | 92.95 | 85.90 | 78.63 | 80.42 | 84.48 |
| FedLEASE | 93.33 | 87.22 | 86.93 | 83.57 | 87.76 |"""


def method_units(methods: list[str]) -> list[list[str]]:
    """A setting's methods in units that run and are recorded on their own: the methods continuing from
    FedLEASE's warm-up together (they share it), every other method alone. A unit is minutes, so an
    interrupted benchmark loses at most one unit once its records are kept (e.g. committed)."""
    from fedlease.strategies.registry import needs_warmup

    heirs = [m for m in methods if needs_warmup([m])]
    return ([heirs] if heirs else []) + [[m] for m in methods if m not in heirs]


def machine() -> str:
    """The CPU a unit ran on, with its core count: the same code rounds differently in the last bits on
    different CPUs, and its seconds are that machine's."""
    import os
    import platform

    import torch

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        name = names[0] if names else name
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{name}, {cores} cores{gpu}"


def record_fingerprint(cfg: Any, unit: str) -> str:
    """What a unit's record was made from: the rounds' fingerprint (every param that changes results, the
    code version, the full schedule) plus the injected faults, which that one leaves out so a crash test
    resumes its run, but which change the results a record holds."""
    from fedlease.server import fingerprint

    faults = json.dumps(cfg.faults.model_dump(mode="json"), sort_keys=True)
    return fingerprint(cfg, unit, (), rounds_matter=True) + "-" + hashlib.sha256(faults.encode()).hexdigest()[:8]


def run_unit(params: str, base: list[str], unit: list[str], tag: str, seed: int) -> dict[str, Any]:
    """One unit's metrics: from its record when the record's fingerprint (every param that changes results,
    the code version) is this run's, else from running it (its own run folder, resumable round by round),
    then recorded."""
    from fedlease.io import atomic_write_json

    name = "+".join(unit)
    cfg = load_config(params, [*base, f"strategies=[{','.join(unit)}]",
                               f"output_dir={RUNS / tag / f'seed{seed}' / name}"])
    record = RECORDS / tag / f"seed{seed}" / "units" / f"{name}.json"
    fp = record_fingerprint(cfg, name)
    if record.exists():
        doc = json.loads(record.read_text())
        if doc.get("fingerprint") == fp:
            print(f"[{tag}] seed {seed}: {name} read from its record {record}", flush=True)
            return {**doc["metrics"], "machine": doc.get("machine", "not recorded")}
        print(f"[{tag}] seed {seed}: {name}'s record {record} is of other params or code: running it", flush=True)
    t0 = time.perf_counter()
    metrics = run_all(cfg)
    metrics["call_seconds"] = time.perf_counter() - t0
    where = machine()
    atomic_write_json(record, {"fingerprint": fp, "machine": where, "metrics": metrics})
    return {**metrics, "machine": where}


def merge_units(parts: list[dict[str, Any]], methods: list[str], seed: int) -> dict[str, Any]:
    """One seed's metrics from its units' (one code version and protocol, or a clear error)."""
    version = one_code_version(parts)
    protocols = {p.get("protocol") for p in parts}
    if len(protocols) != 1:
        raise SystemExit(f"error: seed {seed}: the units ran under different protocols: {sorted(map(str, protocols))}")
    by_name = {name: m for p in parts for name, m in p["methods"].items()}
    merged: dict[str, Any] = {"methods": {name: by_name[name] for name in methods}, "protocol": protocols.pop(),
                              "code_version": version, "seed": seed,
                              "call_seconds": sum(p["call_seconds"] for p in parts),
                              "machines": {name: p["machine"] for p in parts for name in p["methods"]}}
    allocation = [p["allocation"] for p in parts if "allocation" in p]
    if allocation:
        merged["allocation"] = allocation[0]
    merged["seconds"] = compute_seconds(merged)
    return merged


def run_setting(params: str, overrides: list[str], seeds: list[int], tag: str) -> list[dict[str, Any]]:
    """Every seed of a setting, unit by unit; each seed's merged metrics land in RECORDS/tag/seed<k>/metrics.json."""
    from fedlease.io import atomic_write_json

    out = []
    for seed in seeds:
        base = [*overrides, f"seed={seed}"]
        methods = list(load_config(params, base).strategies)
        parts = [run_unit(params, base, unit, tag, seed) for unit in method_units(methods)]
        metrics = merge_units(parts, methods, seed)
        atomic_write_json(RECORDS / tag / f"seed{seed}" / "metrics.json", metrics)
        out.append(metrics)
        print(f"[{tag}] seed {seed}: " + ", ".join(f"{m} {100 * v['mean']:.2f}" for m, v in metrics["methods"].items())
              + f" ({metrics['seconds']:.0f} s of rounds and warm-up; its calls {metrics['call_seconds']:.0f} s)",
              flush=True)
    return out


def one_code_version(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The code version every run and every method's rounds were made with; a clear error when they differ
    (a table mixes no code versions: rerun the stale folders, or give --runs a fresh folder). Within one
    invocation the rounds' checkpoint fingerprints already force this (a folder from other code is redone);
    the per-method stamp also catches results assembled from stages run by other code (e.g. `dvc repro`)."""
    stamps = [r.get("code_version") or {} for r in runs]
    stamps += [m.get("code_version") or {} for r in runs for m in r["methods"].values()]
    versions = {json.dumps({k: v.get(k) for k in ("sources", "commit")}, sort_keys=True) for v in stamps}
    if len(versions) != 1:
        raise SystemExit(f"error: the runs of this table were made by different code versions: {sorted(versions)}")
    return runs[0].get("code_version", {})


def no_failed_evaluations(runs: list[dict[str, Any]]) -> None:
    """A client whose evaluation failed is out of its method's means, which could move the method up or
    down: a published table has none."""
    failed = {(r.get("seed"), name): m["failed_evaluations"] for r in runs for name, m in r["methods"].items()
              if m.get("failed_evaluations")}
    if failed:
        raise SystemExit(f"error: client evaluations failed (seed, method -> clients): {failed}; see the run's log")


def protocol_line(cfg: Any) -> str:
    if cfg.federation.protocol == "equal_compute":
        return ("Protocol: equal compute. Every method trains the same local steps per client: FedLEASE (and "
                "`local`, which continues from the same warm-up) spend "
                f"{cfg.fedlease.warmup_epochs} warm-up epochs before {cfg.federation.rounds} rounds; every other "
                "method runs those epochs as extra federated rounds (more communication, which favours it). "
                "Heads stay local; same partitions, seeds and learning rate for all.")
    return ("Protocol: the paper's. FedLEASE's warm-up comes on top of the rounds every method shares, so "
            "FedLEASE (and `local`) train more local steps than the other methods (see the steps column).")


def _seconds_list(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['seconds']:.0f} s" for r in runs)


def compute_seconds(metrics: dict[str, Any]) -> float:
    """Warm-up + every method's rounds, from the run's own records: the same number whether the run
    went through in one go or was resumed (a finished run re-run is a no-op taking seconds)."""
    warm = metrics.get("allocation", {}).get("warmup_seconds", 0.0)
    return float(warm + sum(m["wall_seconds"] for m in metrics["methods"].values()))


def ablations(params: str, overrides: list[str], seeds: list[int], num_clients: int, m: int, prefix: str) -> str:
    """The paper's ablations as FedLEASE variants, same budgets; mean accuracy over seeds."""
    variants = {
        "one shared expert, r = 4": ["fedlease.clustering.fixed_m=1"],
        "one shared expert, r = 16": ["fedlease.clustering.fixed_m=1", "lora.r=16"],
        "one expert per client": [f"fedlease.clustering.fixed_m={num_clients}"],
        **{f"fixed top-{k} routing over M slots": [f"fedlease.router.top_k={k}"] for k in range(1, m + 1)},
    }
    lines = ["| variant | avg accuracy |", "|---|---|"]
    for name, extra in variants.items():
        tag = prefix + "ablation-" + "".join(ch if ch.isalnum() else "_" for ch in name)
        runs = run_setting(params, [*overrides, *extra, "strategies=[fedlease]"], seeds, tag)
        no_failed_evaluations(runs)
        one_code_version(runs)
        lines.append(f"| {name} | {mean_std([r['methods']['fedlease']['mean'] for r in runs])} |")
    return "\n".join(lines)


def dp_table(params: str, overrides: list[str], seeds: list[int], no_dp: list[float], prefix: str) -> str:
    """FedLEASE under client-level DP at epsilon 1, 4, 8 (delta 1e-5) beside no DP."""
    lines = ["| privacy | noise multiplier | final epsilon | avg accuracy |", "|---|---|---|---|",
             f"| no DP | - | - | {mean_std(no_dp)} |"]
    for eps in (1, 4, 8):
        extra = ["privacy.enabled=true", f"privacy.target_epsilon={eps}", "strategies=[fedlease]"]
        runs = run_setting(params, [*overrides, *extra], seeds, f"{prefix}dp-eps{eps}")
        no_failed_evaluations(runs)
        one_code_version(runs)
        cfg = load_config(params, [*overrides, *extra])
        from fedlease.privacy import epsilon_after, noise_multiplier

        rounds = runs[0]["methods"]["fedlease"]["rounds"]
        lines.append(f"| epsilon = {eps} | {noise_multiplier(cfg, rounds):.3f} | "
                     f"{epsilon_after(cfg, rounds, rounds):.2f} | "
                     f"{mean_std([r['methods']['fedlease']['mean'] for r in runs])} |")
    floor = majority_floor_cell(runs)  # the same partitions at every epsilon: one floor
    if floor:
        lines.append(f"| majority class (floor) | - | - | {floor} |")
    return "\n".join(lines)


def table(runs: list[dict[str, Any]]) -> tuple[str, float, float]:
    """The pipeline's method table over seeds (mean ± std) and the majority floor; accuracy on
    label-balanced test sets when the runs have them; the primary method's cluster quality and its margin
    over the best other method (`local` included)."""
    from fedlease.report import balanced_table, instance_weight_lines
    from fedlease.strategies import primary_name, strategy_class

    no_failed_evaluations(runs)
    methods = list(runs[0]["methods"])
    lines = [method_table(runs), *instance_weight_lines(runs)]
    balanced = balanced_table(runs)
    if balanced:
        lines += ["", balanced]
    means = {name: statistics.mean(r["methods"][name]["mean"] for r in runs) for name in methods}
    primary = primary_name(methods)
    others = {k: v for k, v in means.items() if k != primary}
    margin = 100 * (means[primary] - max(others.values())) if primary and others else float("nan")
    aris = [r["allocation"]["ari_vs_task"] for r in runs if "allocation" in r]
    ms = [r["allocation"]["num_experts"] for r in runs if "allocation" in r]
    caps = [r["allocation"].get("cap") or "fedlease.m_max or N - 1" for r in runs  # no name: older records
            if r.get("allocation", {}).get("capped")]
    ari = statistics.mean(aris) if aris else float("nan")
    warm = [r["allocation"]["warmup_seconds"] for r in runs if "warmup_seconds" in r.get("allocation", {})]
    heirs = [m for m in methods if strategy_class(m).inherits_warmup and m != primary]
    if warm:
        shared = f"; {', '.join(heirs)} continue(s) from the same warm-up" if heirs else ""
        lines += ["", f"FedLEASE's warm-up (every client, before round 1) took {statistics.mean(warm):.0f} s on top of "
                      f"its rounds{shared} (`rounds s` leaves it out, `s with warm-up` counts it)."]
    for name in methods:
        method_aris = [r["methods"][name].get("ari_vs_task") for r in runs]
        if name != primary and all(a is not None for a in method_aris):
            lines += ["", f"{name}'s clusters vs the true tasks: ARI {[round(a, 3) for a in method_aris]} (per seed)."]
    at_cap = f"; at the cap in {len(caps)}: {', '.join(sorted(set(caps)))}" if caps else ""
    lines += ["", f"FedLEASE chose M = {ms} (per seed{at_cap}); "
                  f"ARI of its clusters vs the true tasks: {aris}.",
              f"FedLEASE margin over the best other method ({max(others, key=others.get) if others else '-'}): "
              f"{margin:+.2f} points (mean over {len(runs)} seed(s)).",
              f"Protocol: {runs[0].get('protocol', '?')}; code: {describe(one_code_version(runs))}.",
              machines_line(runs)]
    return "\n".join(lines), ari, margin


def machines_line(runs: list[dict[str, Any]]) -> str:
    """Which CPUs the table's units ran on (seconds are per machine; last-bit rounding too)."""
    counts: dict[str, int] = {}
    for r in runs:
        for name in r["methods"]:
            where = r.get("machines", {}).get(name, "not recorded")
            counts[where] = counts.get(where, 0) + 1
    return "Ran on: " + "; ".join(f"{where} ({n} method-seed(s))" for where, n in sorted(counts.items())) + "."


def majority_floor_cell(runs: list[dict[str, Any]]) -> str | None:
    """The majority-class floor of a classification setting's runs (each client predicting its most frequent
    training label, the same for every method and variant), mean ± std over runs; None for generation."""
    floors = [r["methods"]["fedlease"].get("majority") for r in runs]
    return mean_std([f["mean"] for f in floors]) if floors and all(floors) else None


def floor_note(runs: list[dict[str, Any]]) -> str:
    """`; majority-class floor X` after a score in a sentence, else nothing."""
    floor = majority_floor_cell(runs)
    return f"; majority-class floor {floor}" if floor else ""


def headline(name: str, value: float, runs: list[dict[str, Any]], digits: int = 2) -> str:
    """A last line a reader greps: the value, the protocol, the seeds it is the mean over."""
    return f"{name}: {value:.{digits}f} (protocol {runs[0].get('protocol', '?')}, mean over {len(runs)} seed(s))"


#: the headline lines of the settings a run did not include, and the flag that runs each: every run prints all
#: four, so a reader never takes a missing line for a setting that passed
NOT_RUN = {"ari": "the task setting: quality.py without --nlg", "fedlease_margin": "the task setting: quality.py "
           "without --nlg", "skew_margin": "--label-skew runs it", "nlg_margin": "--nlg runs it, in a run of its own"}


def not_run(name: str) -> str:
    return f"{name}: not run ({NOT_RUN[name]})"


def nlg_section(args: argparse.Namespace, seeds: list[int]) -> tuple[str, float]:
    """The NLG table: FedLEASE, FedIT, FedSA-LoRA, IFCA on the NLG profile, ROUGE-L per task."""
    params = args.params or NLG_PARAMS
    overrides = NLG_METHODS + (NLG_QUICK if args.quick else []) + args.overrides
    runs = run_setting(params, overrides, seeds, "nlg-quick" if args.quick else "nlg")
    body, _, margin = table(runs)
    args.nlg_runs = runs
    cfg = load_config(params, overrides)
    text = "\n".join([
        f"{NLG_HEADING} ({'quick' if args.quick else 'full'})", "",
        f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`; seeds {seeds}; {cfg.model.name}, "
        f"{cfg.num_clients} clients ({cfg.data.partition.clients_per_task} per task, "
        f"{cfg.data.partition.train_per_client} train / {cfg.data.partition.test_per_client} test each), "
        f"{cfg.federation.rounds} rounds x {cfg.training.local_epochs} local epochs, warm-up "
        f"{cfg.fedlease.warmup_epochs}, LoRA r {cfg.lora.r} on {', '.join(cfg.lora.target_modules)}, greedy "
        f"decoding of at most {cfg.training.max_new_tokens} tokens. Scores are ROUGE-L F1 x 100 on each client's "
        "held-out examples.", "", protocol_line(cfg), "", body, "", *[f"Note: {line}" for line in args.note],
        f"NLG benchmark time (warm-up + rounds, per seed): {_seconds_list(runs)}.", "",
        f"Headline: `{headline('nlg_margin', margin, runs)}`", ""])
    return text, margin


def of_version(text: str, version: dict[str, Any]) -> bool:
    """Whether a part of a results file was made by this code version: it names it, and no other. As for
    the runs' fingerprints, the commit and the sources hash decide, not `-dirty` (writing a results file
    into the checkout makes it dirty)."""
    named = {line.replace("-dirty,", ",") for line in re.findall(r"code: (commit [^,]+, sources \w+)", text)}
    return named == {describe({**version, "dirty": False})}


def stub(heading: str, version: dict[str, Any], what: str) -> str:
    return (f"{heading}\n\nNot run yet at this code version (code: {describe(version)}): run "
            f"`benchmarks/quality.py` {what} with `--out` naming this file (and `--quick` for the quick tables).\n")


def upsert_section(path: Path, heading: str, text: str, version: dict[str, Any]) -> str:
    """Replace the section that starts with `heading` (up to the next '## ' heading) or append it; the rest
    of the file is kept only when it is of the same code version (a file mixes none), else a stub says
    what to run."""
    old = path.read_text() if path.exists() else ""
    start = old.find(heading)
    end = old.find("\n## ", start + len(heading)) if start >= 0 else -1
    before, after = (old, "") if start < 0 else (old[:start], old[end + 1:] if end >= 0 else "")
    if (before + after).strip() and not of_version(before + after, version):
        print(f"{path}: its classification tables are not of this code version; replaced by a stub",
              file=sys.stderr)
        before, after = stub("# Quality benchmark", version, "for the classification tables"), ""
    return before.rstrip("\n") + ("\n\n" if before.strip() else "") + text + ("\n" + after if after else "")


def write_doc(out: str, doc: list[str], version: dict[str, Any]) -> None:
    """The classification document, keeping the NLG run's section when it is of the same code version."""
    old = Path(out).read_text() if Path(out).exists() else ""
    kept = old[old.find(NLG_HEADING):] if NLG_HEADING in old else ""
    if kept and not of_version(kept, version):
        print(f"{out}: its NLG section is not of this code version; replaced by a stub", file=sys.stderr)
        kept = stub(NLG_HEADING, version, "with `--nlg`")
    atomic_write_text(out, "\n".join(doc) + "\n" + ("\n" + kept if kept else ""))


def pinned_tracking_uri(args: argparse.Namespace) -> str:
    """One store, fixed before the first run: the one asked for (--tracking-uri, tracking.uri, then
    $MLFLOW_TRACKING_URI), else a SQLite store beside the run folders. Not the project's rule of a local server
    when one answers: a benchmark runs for hours, and a server someone else started and stops under it ended one
    regeneration step with `Connection refused` (benchmarks/README)."""
    if args.tracking_uri:
        return args.tracking_uri
    params = args.params or (NLG_PARAMS if args.nlg else str(HERE / "params_quality.yaml"))
    configured = load_config(params, args.overrides).tracking.uri
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    RUNS.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(RUNS / 'mlflow.db').resolve()}"


def main() -> None:
    global RUNS, RECORDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="default: params_quality.yaml (params_nlg.yaml with --nlg)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--quick", action="store_true", help="small budget (within ~5 minutes here)")
    ap.add_argument("--label-skew", action="store_true", help="also the task + Dirichlet(alpha) label-skew table")
    ap.add_argument("--skew-alpha", type=float, default=0.5, help="the label-skew table's Dirichlet alpha")
    ap.add_argument("--skew-min-test", type=int, default=None,
                    help="the label-skew table's data.partition.min_test_per_client (strong skew needs fewer)")
    ap.add_argument("--ablations", action="store_true", help="also the paper's ablations (FedLEASE variants)")
    ap.add_argument("--ablation-seeds", default=None,
                    help="the ablations' seeds (default: the first of --seeds; each variant is a full FedLEASE run)")
    ap.add_argument("--dp", action="store_true", help="also FedLEASE at epsilon = 1, 4, 8 (client-level DP)")
    ap.add_argument("--nlg", action="store_true", help="the NLG table (ROUGE-L) instead of classification")
    ap.add_argument("--out", default=None, help="default: results/quality.md (quality_quick.md with --quick)")
    ap.add_argument("--runs", default=str(RUNS), help="folder of the run folders (default benchmarks/runs)")
    ap.add_argument("--records", default=None,
                    help="folder of the small result records (default: --runs); a unit whose record matches its "
                         "params and code version is read, not rerun: keep them (e.g. in git) to resume on another "
                         "machine")
    ap.add_argument("--tracking-uri", default=None,
                    help="where its runs are tracked (default: tracking.uri or $MLFLOW_TRACKING_URI when set, else "
                         "a SQLite store in --runs; never a server it merely finds running)")
    ap.add_argument("--note", action="append", default=[],
                    help="a line on the conditions of the run (e.g. other load on the machine), written under the "
                         "tables")
    args = ap.parse_args()
    RUNS = Path(args.runs)
    RECORDS = Path(args.records) if args.records else RUNS
    args.overrides.append(f"tracking.uri={pinned_tracking_uri(args)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.ablation_seeds and not {int(s) for s in args.ablation_seeds.split(",")} <= set(seeds):
        ap.error("--ablation-seeds must be among --seeds (the ablations are read beside full FedLEASE on them)")
    if args.out is None:
        args.out = str(HERE / "results" / ("quality_quick.md" if args.quick else "quality.md"))
    if args.nlg:
        text, margin = nlg_section(args, seeds)
        version = one_code_version(args.nlg_runs)
        atomic_write_text(args.out, upsert_section(Path(args.out), NLG_HEADING, text, version))
        print(text)
        print("\n".join([not_run("ari"), not_run("fedlease_margin"), not_run("skew_margin"),
                         headline("nlg_margin", margin, args.nlg_runs)]))
        return
    args.params = args.params or str(HERE / "params_quality.yaml")
    overrides = (QUICK if args.quick else []) + args.overrides
    t0 = time.perf_counter()
    runs = run_setting(args.params, overrides, seeds, "quick" if args.quick else "task")
    prefix = "quick-" if args.quick else ""  # the other settings' run folders, kept apart by budget
    main_table, ari, margin = table(runs)
    version = one_code_version(runs)
    cfg = load_config(args.params, overrides)
    doc = [f"# Quality benchmark ({'quick' if args.quick else 'full'})", "",
           f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`; seeds {seeds}; "
           f"{cfg.num_clients} clients ({cfg.data.partition.clients_per_task} per task), "
           f"{cfg.federation.rounds} rounds x {cfg.training.local_epochs} local epochs, warm-up "
           f"{cfg.fedlease.warmup_epochs} epochs, rank {cfg.lora.r}, lr {cfg.training.lr}, model {cfg.model.name}.", "",
           protocol_line(cfg), "",
           "## Task heterogeneity (accuracy %, mean ± std over seeds)", "", main_table, ""]
    headlines = [headline("ari", ari, runs, digits=3), headline("fedlease_margin", margin, runs)]
    if args.label_skew:
        # the user's --set comes last, so it can change the skew (e.g. dirichlet_alpha=0.1)
        skew_overrides = ((QUICK if args.quick else []) + LABEL_SKEW
                          + [f"data.partition.dirichlet_alpha={args.skew_alpha}"]
                          + ([f"data.partition.min_test_per_client={args.skew_min_test}"] if args.skew_min_test else [])
                          + args.overrides)
        alpha = load_config(args.params, skew_overrides).data.partition.dirichlet_alpha
        skew_runs = run_setting(args.params, skew_overrides, seeds, prefix + f"label_skew_a{alpha:g}")
        skew_table, _, skew_margin = table(skew_runs)
        doc += [f"## Task + label heterogeneity (Dirichlet alpha = {alpha:g} within each task)", "",
                "Each client's own test set follows its label skew, so the majority floor is high; the second "
                "table scores every client on a label-balanced test set of its task (the task's whole label "
                "space). The margin and `skew_margin` are on the clients' own (skewed) test sets.", "",
                skew_table, ""]
        headlines.append(headline("skew_margin", skew_margin, skew_runs))
    else:
        headlines.append(not_run("skew_margin"))
    headlines.append(not_run("nlg_margin"))
    if args.ablations:  # hours more: what is done so far lands in the file first
        write_doc(args.out, doc + ["(ablations running)", ""], version)
        ablation_seeds = [int(s) for s in args.ablation_seeds.split(",")] if args.ablation_seeds else seeds[:1]
        same = [r for r in runs if r["seed"] in ablation_seeds]
        m = max(r["allocation"]["num_experts"] for r in same if "allocation" in r)
        doc += [f"## Ablations (FedLEASE variants, same budgets; seeds {ablation_seeds})", "",
                ablations(args.params, overrides, ablation_seeds, cfg.num_clients, m, prefix), "",
                f"Full FedLEASE on the same seeds: {mean_std([r['methods']['fedlease']['mean'] for r in same])}"
                + floor_note(same) + ".", ""]
    if args.dp:
        doc += ["## Client-level differential privacy (FedLEASE; clip 1.0, delta 1e-5, RDP accountant)", "",
                dp_table(args.params, overrides, seeds, [r["methods"]["fedlease"]["mean"] for r in runs], prefix), ""]
    doc += [f"Note: {line}" for line in args.note] + ([""] if args.note else [])
    doc += ["Headline lines (the benchmark's last lines):", "", "```", *headlines, "```", "",
            "## For reference: the paper's GLUE table (RoBERTa-Large, not this setup)", "", PAPER, "",
            f"Compute time of the main table (warm-up + rounds of every method, per seed): "
            f"{_seconds_list(runs)}; this invocation took "
            f"{time.perf_counter() - t0:.0f} s in all (a unit found in its record is read, not rerun: the "
            "per-seed times are the units' own)."]
    write_doc(args.out, doc, version)
    print("\n".join(doc))
    print("\n".join(headlines))


if __name__ == "__main__":
    main()
