"""Why FedLEASE does or does not gain on a run: the numbers behind it, read from a finished run folder.

    python benchmarks/fedlease_diagnostics.py RUN_FOLDER [RUN_FOLDER ...]

Per run: the warm-up's score and FedLEASE's per round (does the switch from warm-up to mixture cost
accuracy?); the own expert's share of the router weight per round (mean over clients, by layer at round 1
and the last round, and by client every round); the allocation (M, silhouette by k, whether the cap was
hit) and the one each `fedlease.clustering.distance` would make of the same warm-up adapters; the
B-distance structure (mean 1 - cos within and across tasks, and, within a task, its correlation with the
distance between the clients' training label mixes: do clients group by label mix rather than task?).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def warmup_adapters(run: Path) -> list[dict]:
    from fedlease.io import load_tensors

    return [load_tensors(p) for p in sorted((run / "warmup").glob("client_*.safetensors"))]


def by_distance(run: Path, tasks: list[str], k_max: int | None) -> str:
    """The allocation each `fedlease.clustering.distance` makes of the run's warm-up adapters (silhouette
    argmax up to the run's largest k), and its ARI against the tasks. The run folder keeps no params: this
    clusters with the defaults (agglomerative, average linkage, no tolerance), not a run's other settings."""
    if k_max is None:
        return "allocation by distance: - (M was fixed)"
    from sklearn.metrics import adjusted_rand_score

    from fedlease.allocation import DISTANCE_RANGE, applicable_distances, choose_experts, distance_matrix

    adapters = warmup_adapters(run)
    parts = []
    for kind in applicable_distances(adapters):  # k = 2..k_max as the run tried (choose_experts: min(m_max, N - 1))
        alloc = choose_experts(distance_matrix(adapters, kind), k_max, max_distance=DISTANCE_RANGE[kind])
        parts.append(f"{kind} M = {alloc.num_experts}, ARI {adjusted_rand_score(tasks, alloc.assignment):.3f}")
    return "allocation by distance (recomputed from the warm-up adapters): " + "; ".join(parts)


def diagnose(run: Path) -> list[str]:
    lines = [f"## {run}"]
    cmap = _load(run / "allocation" / "cluster_map.json")
    stats = _load(run / "data" / "stats.json")["clients"]
    warm = _load(run / "warmup" / "summary.json")["history"][-1].get("eval")
    hist = _load(run / "federate" / "fedlease" / "result.json")["history"]
    scores = [f"r{h['round']} {100 * h['eval']['mean']:.2f}" for h in hist if h.get("eval")]
    lines.append(f"score: warm-up {100 * warm['mean']:.2f} -> " + ", ".join(scores) if warm else
                 "score: (warm-up not evaluated) " + ", ".join(scores))
    own, personal = [], []
    m = cmap["num_experts"]
    for h in hist:
        clients = {cid: c for cid, c in h.get("eval", {}).get("clients", {}).items() if "router" in c}
        if clients:
            shares = np.array([[module["expert_weight_share"] for module in c["router"].values()]
                               for c in clients.values()])  # (client, layer, expert slot: own first)
            share = shares[..., 0].mean(axis=0)
            own.append((h["round"], float(share.mean()), share, dict(zip(clients, shares[..., 0].mean(axis=1)))))
            if shares.shape[-1] == m + 1:  # the personal expert's column (fedlease.router.personal_expert)
                personal.append((h["round"], float(shares[..., -1].mean())))
    if own:
        slots = 2 * m if personal else 2 * m - 1  # a uniform softmax over the router's slots
        lines.append(f"own-expert weight share (uniform router: {m}/{slots} = {m / slots:.2f}): "
                     + ", ".join(f"r{r} {s:.3f}" for r, s, _, _ in own))
        if personal:
            lines.append(f"personal-expert weight share (uniform router: 1/{slots} = {1 / slots:.2f}): "
                         + ", ".join(f"r{r} {s:.3f}" for r, s in personal))
        lines.append("  by layer, first eval: " + " ".join(f"{v:.2f}" for v in own[0][2])
                     + " | last: " + " ".join(f"{v:.2f}" for v in own[-1][2]))
        for r, _, _, by_client in own:
            lines.append(f"  by client, r{r}: " + " ".join(f"{c}:{v:.2f}" for c, v in by_client.items()))
    sil = ", ".join(f"k={k} {v:.3f}" for k, v in sorted(cmap["silhouette"].items(), key=lambda kv: int(kv[0])))
    lines.append(f"allocation: M = {cmap['num_experts']}{' (cap)' if cmap.get('capped') else ''}, ARI "
                 f"{cmap['ari_vs_task']:.3f}; silhouette {sil}")
    tasks = [c["task"] for c in stats]
    dist = np.load(run / "allocation" / "distances.npy", allow_pickle=False) if (
        run / "allocation" / "distances.npy").exists() else None
    lines.append(by_distance(run, tasks, max(int(k) for k in cmap["silhouette"]) if cmap["silhouette"] else None))
    if dist is None:  # recompute from the warm-up adapters
        from fedlease.allocation import b_distance_matrix

        dist = b_distance_matrix(warmup_adapters(run))
    mix = [np.array(c["train_labels"], dtype=float) / max(1, sum(c["train_labels"])) for c in stats]
    n = len(tasks)
    same = [dist[i, j] for i in range(n) for j in range(i + 1, n) if tasks[i] == tasks[j]]
    cross = [dist[i, j] for i in range(n) for j in range(i + 1, n) if tasks[i] != tasks[j]]
    lines.append(f"B-distance: within tasks {np.mean(same):.3f} (min {np.min(same):.3f}), across tasks "
                 f"{np.mean(cross):.3f} (min {np.min(cross):.3f}); gap {np.mean(cross) - np.mean(same):+.3f}")
    pairs = [(dist[i, j], 0.5 * np.abs(mix[i] - mix[j]).sum()) for i in range(n) for j in range(i + 1, n)
             if tasks[i] == tasks[j] and len(mix[i]) == len(mix[j])]
    if len(pairs) > 2 and np.std([p[1] for p in pairs]) > 0:
        r = np.corrcoef([p[0] for p in pairs], [p[1] for p in pairs])[0, 1]
        lines.append(f"within a task, corr(B-distance, label-mix distance) = {r:+.2f} over {len(pairs)} pairs")
    return lines


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print("\n".join(diagnose(Path(folder))), "\n")
