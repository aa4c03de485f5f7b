"""Silo mode against the simulation on the same partitions and seeds.

Runs a params file (default: the main job's params.yaml) once as the simulation, writes its partitions as
per-client files (train and test, the task's label space) at N local silos, runs the same config in
silo mode (a Prefect server, one worker process per silo, the coordinator's flow; flows/local_federation.py)
and compares every method's per-round losses and per-client scores. Prints both runs' wall times.

    .venv/bin/python benchmarks/silo_equivalence.py [--params params.yaml] [--silos 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fedlease.config import load_config, read_params_file
from fedlease.data.partition import ClientData
from fedlease.io import read_json
from fedlease.paths import RunPaths
from fedlease.pipeline import run_all
from flows.local_federation import LocalFederation


def scores(output_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every method's rounds: (round, loss, dropped clients, {client: score})."""
    out = {}
    for result in sorted((output_dir / "federate").glob("*/result.json")):
        history = json.loads(result.read_text())["history"]
        out[result.parent.name] = [
            (r["round"], r["loss"], sorted(r["dropped"]),
             {c: v.get("accuracy", v.get("rougeL")) for c, v in (r.get("eval") or {}).get("clients", {}).items()})
            for r in history]
    return out


def write_client_files(client: ClientData, folder: Path) -> dict[str, Any]:
    """A partition client as its own train and test files (labels by name, in the task's order)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"label_names": client.label_names}
    for split in ("train", "test"):
        path = folder / f"client_{client.client_id:03d}_{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for r in getattr(client, split):
                row = {k: v for k, v in r.items() if k != "task"}
                if "label" in row:
                    row["label"] = client.label_names[row["label"]]
                f.write(json.dumps(row) + "\n")
        spec["path" if split == "train" else "test_path"] = str(path)
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--work", default="outputs_silo_equivalence", help="a folder this script owns")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)

    sim_cfg = load_config(args.params, [f"output_dir={work / 'sim'}", "tracking.enabled=false"])
    t0 = time.perf_counter()
    run_all(sim_cfg)
    sim_s = time.perf_counter() - t0
    manifest = read_json(RunPaths.of(sim_cfg).manifest)

    silos = [f"s{k}" for k in range(args.silos)]
    fed = LocalFederation(work / "federation", silos)
    try:
        clients, specs = [], {s: {} for s in silos}
        for entry in manifest["clients"]:
            cid = entry["client_id"]
            silo = silos[cid % len(silos)]
            client = ClientData.from_json(read_json(RunPaths.of(sim_cfg).client_file(cid)))
            specs[silo][f"c{cid}"] = write_client_files(client, fed.silo_home(silo) / "data")
            clients.append({"silo": silo, "name": f"c{cid}", "task": entry["task"]})
        for silo in silos:
            fed.add_silo(silo, specs[silo])
            fed.start_worker(silo)
        raw = read_params_file(args.params)
        raw["output_dir"] = str(work / "federation" / "coordinator" / "outputs")
        raw["data"] = {"kind": sim_cfg.data.kind, "cache_dir": str(Path(sim_cfg.data.cache_dir).resolve()),
                       "tasks": [], "clients": clients, "partition": {"scheme": "files", "min_test_per_client": 1}}
        raw["tracking"] = {"enabled": False}
        raw["orchestration"] = {"task_runner": "silo", "silo_timeout_s": 3600, "retries": 0}
        raw.setdefault("federation", {})["exchange"] = {"url": str(work / "federation" / "store")}
        t0 = time.perf_counter()
        run = fed.run_coordinator(raw, timeout_s=4 * 3600)
        silo_s = time.perf_counter() - t0
    finally:
        fed.close()
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return 1
    sim, silo = scores(work / "sim"), scores(work / "federation" / "coordinator" / "outputs")
    values = [(m, r, c) for m in sim for r, rec in enumerate(sim[m]) for c in rec[3]]
    differ = [(m, r, c, sim[m][r][3][c], silo.get(m, [])[r][3].get(c) if m in silo else None)
              for m, r, c in values if m not in silo or silo[m][r][3].get(c) != sim[m][r][3][c]]
    losses = sum(1 for m in sim if m in silo for a, b in zip(sim[m], silo[m], strict=False) if a[1] != b[1])
    print(f"params: {args.params}; {len(manifest['clients'])} clients at {len(silos)} silos; "
          f"methods: {', '.join(sim)}")
    for m in sim:
        last = sim[m][-1][3], (silo.get(m) or [(None, None, None, {})])[-1][3]
        means = [sum(v.values()) / len(v) if v else float("nan") for v in last]
        print(f"  {m}: final client mean, simulation {100 * means[0]:.2f}, silo mode {100 * means[1]:.2f}")
    print(f"round losses that differ: {losses}; client scores that differ: {len(differ)} of {len(values)}")
    for d in differ[:10]:
        print(f"  {d}")
    print(f"identical: {sim == silo}")
    print(f"wall: simulation {sim_s:.0f} s, silo mode {silo_s:.0f} s ({silo_s / sim_s:.2f}x; each silo call is "
          "a new process on this machine)")
    return 0 if sim == silo else 1


if __name__ == "__main__":
    sys.exit(main())
