"""Allocation at scale: B-distances, clustering and the silhouette choice of M for N clients.

Synthetic warm-up B matrices with the default encoder's shapes (MiniLM: 6 layers x query/value = 12
modules of 384 x r) and planted clusters in the near-orthogonal regime measured on real runs
(B_i = sqrt(rho) c_k + sqrt(1 - rho) noise: 1 - cos ~0.85 within a cluster, ~1.0 across). Each N runs
in its own process, so its peak memory is its own.

    python benchmarks/allocation_scale.py [--sizes 100,1000,10000] [--dtype float64|float32] [--clusters 8]
                                          [--distance cosine|subspace]

Prints a table row per N (seconds for distances, for clustering + silhouette over k = 2..m_max, peak
RSS, chosen M, ARI against the planted clusters) and the cluster map's size in bytes. The CPU seconds (all
threads) are less sensitive than wall time to other work on a shared machine, though not immune to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_b(n: int, clusters: int, modules: int, d_out: int, r: int, rho: float, seed: int):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, modules, d_out * r)).astype(np.float32)
    truth = rng.integers(clusters, size=n)
    adapters = []
    for i in range(n):
        noise = rng.standard_normal((modules, d_out * r)).astype(np.float32)
        b = np.sqrt(rho) * centres[truth[i]] + np.sqrt(1 - rho) * noise
        adapters.append({f"lora.m{m}.B": torch.from_numpy(b[m].reshape(d_out, r)) for m in range(modules)})
    return adapters, truth


def one_size(args: argparse.Namespace, n: int) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score

    from common import peak_rss_mb
    from fedlease.allocation import choose_experts, distance_matrix

    adapters, truth = synthetic_b(n, args.clusters, args.modules, args.d_out, args.r, args.rho, args.seed)
    base_mb = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    dist = distance_matrix(adapters, args.distance, args.dtype)
    t1 = time.perf_counter()
    alloc = choose_experts(dist, args.m_max)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"n": n, "distance_s": t1 - t0, "cluster_s": t2 - t1, "total_s": t2 - t0, "total_cpu_s": c2 - c0,
            "peak_rss_mb": peak_rss_mb(),
            "inputs_mb": base_mb, "m": alloc.num_experts, "ari": float(adjusted_rand_score(truth, alloc.assignment)),
            "map_bytes": len(json.dumps(alloc.to_json()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--distance", default="cosine", choices=["cosine", "subspace"],
                    help="fedlease.clustering.distance (subspace: r times the cosine's inner products)")
    ap.add_argument("--clusters", type=int, default=6)
    ap.add_argument("--m-max", type=int, default=8)
    ap.add_argument("--modules", type=int, default=12)
    ap.add_argument("--d-out", type=int, default=384)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--rho", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args, args.one)))
        return
    print(f"B shapes: {args.modules} modules of {args.d_out} x {args.r}; {args.clusters} planted clusters, "
          f"rho {args.rho}; {args.distance} distances in {args.dtype}; m_max {args.m_max}")
    print("| N | distances s | clustering + silhouette s | total s | CPU s (all threads) | peak RSS MB (inputs alone) "
          "| M | ARI | cluster map bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(n), *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {n} | {row['distance_s']:.1f} | {row['cluster_s']:.1f} | {row['total_s']:.1f} | "
              f"{row['total_cpu_s']:.1f} | "
              f"{row['peak_rss_mb']:.0f} ({row['inputs_mb']:.0f}) | {row['m']} | {row['ari']:.3f} | "
              f"{row['map_bytes']} |",
              flush=True)
    big = rows[-1]
    print(f"largest_n_seconds: {big['total_s']:.1f}")
    print(f"largest_n_peak_rss_gb: {big['peak_rss_mb'] / 1024:.2f}")


if __name__ == "__main__":
    main()
