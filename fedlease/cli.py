"""`fedlease ...` commands: the entry points `dvc.yaml`, the Makefile and users call.

Expected failures (bad params, bad data, missing artifacts) print one line naming
the problem and exit non-zero; config errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a params key (repeatable)")


def _load(args: argparse.Namespace) -> Any:
    from fedlease.config import load_config

    return load_config(args.params, args.overrides)


def cmd_config_check(args: argparse.Namespace) -> int:
    import yaml

    from fedlease.config import load_config

    cfg = load_config(args.file, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# {args.file}: valid ({cfg.num_clients} clients, strategies: {', '.join(cfg.strategies)})",
          file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fedlease.paths import RunPaths
    from fedlease.pipeline import run_stage, stage_named

    cfg = _load(args)
    manifest = run_stage(stage_named("data"), cfg)
    paths = RunPaths.of(cfg)
    print(f"data: {len(manifest['clients'])} clients ({manifest['scheme']} partition) over tasks "
          f"{', '.join(manifest['tasks'])} -> {paths.data}/ (clients/, stats.json, stats.png, manifest.json)")
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    from fedlease.pipeline import run_stage, stage_named

    out = run_stage(stage_named("warmup"), _load(args))
    print(f"warmup: {len(out)} adapters -> {os.path.dirname(out[0])}/")
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from fedlease.pipeline import run_stage, stage_named
    from fedlease.report import warmup_floor_note

    doc = run_stage(stage_named("allocate"), _load(args))
    sil = ", ".join(f"k={k}: {v:.3f}" for k, v in doc["silhouette"].items())
    capped = f" (at the cap, {doc['cap']}: the silhouette had no larger k to try)" if doc["capped"] else ""
    ari = "tasks not known" if doc["ari_vs_task"] is None else f"ARI vs tasks {doc['ari_vs_task']:.3f}"
    print(f"allocate: M = {doc['num_experts']} experts{capped}, assignment {list(doc['assignment'].values())}, "
          f"{ari} (silhouette {sil})")
    note = warmup_floor_note(doc.get("warmup_at_floor") or [], len(doc["assignment"]), doc.get("warmup_eval_failed"))
    if note:
        print(f"allocate: note: {note}")
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from fedlease.pipeline import Stage, run_stage, stage_federate

    only = args.strategy or None
    res = run_stage(Stage("federate", lambda cfg, mapper: stage_federate(cfg, mapper, only)), _load(args))
    for name, r in res.items():
        last = next(h["eval"] for h in reversed(r["history"]) if "eval" in h)
        print(f"federate: {name}: final mean {last['metric']} {last['mean']:.4f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedlease.pipeline import run_stage, stage_named
    from fedlease.report import results_table

    print(results_table(run_stage(stage_named("evaluate"), _load(args))))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedlease.paths import RunPaths
    from fedlease.pipeline import run_all
    from fedlease.report import results_table

    cfg = _load(args)
    metrics = run_all(cfg)
    print(results_table(metrics))
    print(f"\nartifacts: {RunPaths.of(cfg).root}/ (metrics.json, results.md, plots/)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import tempfile

    from fedlease.predict import predict
    from fedlease.tracking import fetch_model, tracking_uri

    if args.model_uri and Path(args.model_uri).is_dir():  # a model folder needs no params (e.g. at a silo)
        folder = Path(args.model_uri)
    else:
        cfg = _load(args)
        uri = args.model_uri or f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"
        folder = fetch_model(uri, Path(tempfile.mkdtemp(prefix="fedlease-model-")), tracking_uri(cfg))
    for text, pred in zip(args.text, predict(folder, args.client, args.text, args.pair), strict=True):
        print(f"client {args.client}: {pred}\t<- {text}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from fedlease.io import ArtifactError
    from fedlease.paths import RunPaths

    path = RunPaths.of(_load(args)).root / "results.md"
    if not path.exists():
        raise ArtifactError(f"{path}: no results yet (run the pipeline first)")
    print(path.read_text(encoding="utf-8"), end="")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from fedlease.late_join import join_client

    rec = join_client(_load(args), args.data, args.task, args.strategy)
    placement = ""
    if "expert" in rec:
        dists = ", ".join(f"E{e}: {d:.3f}" for e, d in enumerate(rec["mean_distances"]))
        placement = f" -> expert {rec['expert']} (mean B-distance {dists})"
    print(f"join: client {rec['client_id']} ({rec['task']}, {rec['strategy']}){placement}; "
          f"{rec['metric']} after one round {rec['score']:.4f}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedlease.tracking import report_from_mlflow

    print(report_from_mlflow(_load(args), args.run_id))
    return 0


def cmd_silo_export(args: argparse.Namespace) -> int:
    from fedlease.silo import export_at_silo, load_silo_config

    silo = load_silo_config(args.config)
    folder = export_at_silo(silo, args.store, args.run, args.method)
    print(f"silo {silo.name}: {args.method} model with its clients' heads -> {folder}/ "
          f"(fedlease predict --model-uri {folder} --client <id> TEXT)")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "data": cmd_data, "warmup": cmd_warmup, "allocate": cmd_allocate, "federate": cmd_federate,
    "evaluate": cmd_evaluate, "run": cmd_run, "predict": cmd_predict, "report": cmd_report,
    "join": cmd_join, "results": cmd_results,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlease", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cfg = sub.add_parser("config", help="inspect params")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a params file and print the resolved config")
    check.add_argument("file", nargs="?", default="params.yaml")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    check.set_defaults(func=cmd_config_check)
    helps = {"data": "read tasks and write client partitions", "warmup": "warm up one LoRA per client",
             "allocate": "cluster clients by LoRA B and initialise experts",
             "federate": "run the federated rounds of every configured method",
             "evaluate": "collect final metrics, tables and plots", "run": "all stages, in this process",
             "predict": "rebuild a client's model (registry, run or folder) and predict",
             "report": "markdown table of a pipeline run, read back from MLflow",
             "join": "add a client after allocation: warm up, nearest cluster, one round",
             "results": "print the results table of the last run"}
    for name, func in COMMANDS.items():
        p = sub.add_parser(name, help=helps[name])
        _add_params(p)
        if name == "federate":
            p.add_argument("--strategy", action="append", help="only this method (repeatable)")
        if name == "predict":
            p.add_argument("--model-uri", default=None,
                           help="models:/name@alias, runs:/<id>/final_model or a local folder (default: the "
                                "params' tracking.registered_model @ tracking.alias)")
            p.add_argument("--client", type=int, required=True, help="whose model (its expert, router, head)")
            p.add_argument("--pair", default=None, help="second text of a pair task (e.g. the claim)")
            p.add_argument("text", nargs="+")
        if name == "join":
            p.add_argument("--data", required=True, help="the new client's .csv/.jsonl file")
            p.add_argument("--task", required=True, help="a name for its task (for tables)")
            p.add_argument("--strategy", default=None, help="the method it joins (default: fedlease)")
        if name == "report":
            p.add_argument("--run-id", default=None, help="pipeline (parent) run; default: the latest")
        p.set_defaults(func=func)
    silo = sub.add_parser("silo", help="silo mode, at an organisation")
    silo_sub = silo.add_subparsers(dest="silo_command", required=True)
    export = silo_sub.add_parser("export", help="the final model with this silo's clients' heads, kept here")
    export.add_argument("--config", default=None, help="the silo's config (default: $FEDLEASE_SILO_CONFIG)")
    export.add_argument("--store", required=True, help="the federation's exchange store (federation.exchange.url)")
    export.add_argument("--run", default="outputs", help="the coordinator's output_dir name (default: outputs)")
    export.add_argument("--method", default="fedlease", help="which method's model (default: fedlease)")
    export.set_defaults(func=cmd_silo_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedlease.config import ConfigError
    from fedlease.data.sources import DataError
    from fedlease.engine.batching import TruncationError
    from fedlease.io import ArtifactError
    from fedlease.models.base import ModelError
    from fedlease.runlock import RunLocked
    from fedlease.server import RoundFailed
    from fedlease.silo import SiloError
    from fedlease.tracking import TrackingError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DataError, ArtifactError, ModelError, TruncationError, RoundFailed, TrackingError, RunLocked,
            SiloError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
