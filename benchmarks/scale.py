"""Cost flat in the number of clients: a sampled round with N = 100 vs N = 10 simulated clients.

Both runs sample the same number of clients per round (`federation.clients_per_round`,
10 in `benchmarks/params_scale.yaml`); client state lives on disk, so neither the
round time nor the server process's peak memory should grow with N. Each N runs in
its own process (data staged in another one first), so peak RSS is that process's
own. The timed rounds are training rounds (the server's round loop with sampling);
evaluating every client is O(N) by nature and is left to `federation.eval_every`.
Round 1 builds the model and is reported but not compared.

    python benchmarks/scale.py [--params FILE] [--small 10] [--large 100] [--set key=value ...]

Last lines: `round_time_ratio: <v>` and `peak_rss_ratio: <v>` (large / small).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import peak_rss_mb  # noqa: E402
from fedlease.config import Config, load_config  # noqa: E402

HERE = Path(__file__).resolve().parent


def _config(params: str, n: int, overrides: list[str]) -> Config:
    return load_config(params, [*overrides, f"data.partition.num_clients={n}",
                                f"output_dir=benchmarks/runs/scale/n{n}"])


def stage(params: str, n: int, overrides: list[str]) -> None:
    from fedlease.pipeline import stage_data

    stage_data(_config(params, n, overrides))


def rounds(params: str, n: int, overrides: list[str]) -> dict[str, object]:
    """Run the configured rounds of the first configured method without evaluation; time each round."""
    import shutil

    from fedlease.paths import RunPaths
    from fedlease.pipeline import clients_via, initial_context
    from fedlease.runtime import strategy_for
    from fedlease.server import run_rounds, sequential_mapper

    cfg = _config(params, n, overrides)
    trained = type(strategy_for(cfg, cfg.strategies[0], n))

    class TrainOnly(trained):  # type: ignore[misc, valid-type]
        def evaluates(self) -> bool:
            return False  # the benchmark times training rounds

    strategy = TrainOnly(cfg, n, strategy_for(cfg, cfg.strategies[0], n).allocation)
    shutil.rmtree(strategy.home(RunPaths.of(cfg)), ignore_errors=True)
    t0 = time.perf_counter()
    out = run_rounds(cfg, strategy, lambda: strategy.init_state(initial_context(cfg, strategy)),
                     clients_via(sequential_mapper))
    return {"n": n, "round_seconds": [h.seconds for h in out.history],
            "sampled": [len(h.sampled) for h in out.history], "peak_rss_mb": peak_rss_mb(),
            "total_seconds": time.perf_counter() - t0}


def _child(args: argparse.Namespace, mode: str, n: int) -> str:
    cmd = [sys.executable, __file__, "--params", args.params, f"--{mode}", str(n)]
    for item in args.overrides:
        cmd += ["--set", item]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"scale benchmark: the {mode} step for N = {n} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(HERE / "params_scale.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--large", type=int, default=100)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage is not None:
        stage(args.params, args.stage, args.overrides)
        return
    if args.rounds is not None:
        print(json.dumps(rounds(args.params, args.rounds, args.overrides)))
        return
    results = {}
    for n in (args.small, args.large):
        _child(args, "stage", n)
        results[n] = json.loads(_child(args, "rounds", n).strip().splitlines()[-1])
    steady = {n: statistics.mean(r["round_seconds"][1:] or r["round_seconds"]) for n, r in results.items()}
    for n, r in results.items():
        print(f"N = {n}: sampled per round {r['sampled']}, round seconds "
              f"{[round(s, 2) for s in r['round_seconds']]} (steady mean {steady[n]:.2f}), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"round_time_ratio: {steady[args.large] / steady[args.small]:.3f}")
    print(f"peak_rss_ratio: {results[args.large]['peak_rss_mb'] / results[args.small]['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
