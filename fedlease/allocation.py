"""Stage 1 of FedLEASE: B-matrix distances, clustering, silhouette choice of M, expert init.

Pure functions over tensors and numpy arrays, readable in one sitting:
  d(i, j) = mean over adapted modules l of (1 - cos(vec B_i^l, vec B_j^l))          (the paper: `cosine`)
  d(i, j) = mean over l of (1 - ||U_i^l' U_j^l||_F^2 / max(rank B_i^l, rank B_j^l))   (`subspace`, beyond it)
    with U^l an orthonormal basis of B^l's column space: blind to B's sign and to rotations within that
    space. Under label skew within a task the clients' B matrices point in opposite directions (cos < 0,
    measured: benchmarks/README.md), so `cosine` puts them further apart than clients of other tasks.
  d(i, j) = 1 - cos(s_i - s_mean, s_j - s_mean)                                        (`inputs`, beyond it)
    with s_i client i's input signature: the frozen base model's mean representation of its training inputs
    (no head, no labels, no training: at small budgets B follows the head a client starts from more than its
    data, benchmarks/README.md). It tells clients apart by their inputs, not by two tasks on the same inputs.
  M = argmax_k silhouette(D, labels_k), k = 2..min(M_max, N-1)
  expert_j = per-module mean of (A_i, B_i) over the clients of cluster j

At scale (benchmarks/allocation_scale.py: 10,000 clients), the distance matrix is built module by
module into one (N, N) array, the average-linkage tree is built once and cut at every k (not
re-clustered per k), and the matrix never goes into the cluster map that every client reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import silhouette_score

from fedlease.aggregation import weighted_mean


def b_keys(adapter: dict[str, torch.Tensor]) -> list[str]:
    keys = sorted(k for k in adapter if k.startswith("lora.") and k.endswith(".B"))
    if not keys:
        raise ValueError("adapter has no LoRA B matrices (keys lora.<module>.B)")
    return keys


def b_distance_matrix(adapters: list[dict[str, torch.Tensor]], dtype: str = "float64") -> np.ndarray:
    """(N, N) mean-over-modules cosine distance between clients' B matrices, accumulated in place one
    module at a time (memory: the matrix plus one module's stacked B). `float32` halves the memory and
    the matmul time at N in the thousands; `float64` (the default) for exact ties at small N."""
    keys = b_keys(adapters[0])
    n = len(adapters)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    dist = torch.zeros((n, n), dtype=tdtype)
    for key in keys:
        flat = torch.stack([a[key].reshape(-1).to(tdtype) for a in adapters])
        flat /= flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        dist.addmm_(flat, flat.T, beta=1.0, alpha=-1.0)  # dist -= cos
        del flat
    out = dist.numpy()
    out += len(keys)  # sum over modules of (1 - cos)
    out /= len(keys)
    np.fill_diagonal(out, 0.0)
    out += out.T  # symmetric to the last bit, in place
    out /= 2
    return np.clip(out, 0.0, 2.0, out=out)


RANK_TOLERANCE = 1e-6  # singular values below this share of the largest do not span B's column space
SUBSPACE_BLOCK = 2**24  # entries of one block of basis inner products (chunks the rows at large N)
SUBSPACE_MIN_BLOCKS = 8  # row blocks at least, so about half the pairs are computed at any N ((k + 1) / 2k)


def _column_bases(bs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the column spaces of a stack of B (N, d, r), one batched SVD in float64 (B is small,
    and torch's batched float32 SVD on the CPU is ~8x slower than its float64 one), the columns beyond each B's
    numerical rank set to zero; and the ranks (N,)."""
    u, sv, _ = torch.linalg.svd(bs.to(torch.float64), full_matrices=False)
    ranks = (sv > sv.amax(dim=1, keepdim=True).clamp_min(1e-30) * RANK_TOLERANCE).sum(dim=1)
    keep = torch.arange(u.shape[2]) < ranks[:, None]  # singular values come largest first; min(d, r) of them
    return torch.where(keep[:, None, :], u, torch.zeros((), dtype=u.dtype)), ranks


def b_subspace_distance_matrix(adapters: list[dict[str, torch.Tensor]], dtype: str = "float64") -> np.ndarray:
    """(N, N) mean-over-modules subspace distance 1 - ||U_i' U_j||_F^2 / max(rank_i, rank_j) between the
    column spaces of the clients' B matrices (0: the same space, whatever the sign or rotation; 1: orthogonal;
    a zero B is at 1 from everyone). Only the pairs j >= i are computed, and both orders within a block of
    rows (the distance is symmetric: about half the r^2 N^2 d multiply-adds), in row blocks of basis inner
    products that bound memory at large N."""
    keys = b_keys(adapters[0])
    n = len(adapters)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    dist = torch.zeros((n, n), dtype=tdtype)
    for key in keys:
        bases, ranks = _column_bases(torch.stack([a[key] for a in adapters]))
        r = bases.shape[2]
        flat = bases.to(tdtype).transpose(1, 2).reshape(n * r, -1)  # (N r, d): client i's basis in rows i r ..
        rank = ranks.to(tdtype)
        for start, stop in _row_blocks(n, r):
            width = n - start  # clients j >= start
            inner = flat[start * r:stop * r] @ flat[start * r:].T  # (block r, width r)
            overlap = inner.square_().reshape(stop - start, r, width, r).sum(dim=(1, 3))
            norm = torch.maximum(rank[start:stop, None], rank[None, start:]).clamp_min(1.0)
            dist[start:stop, start:] += 1.0 - overlap / norm
        del flat
    out = dist.numpy()  # the same memory: at N = 10,000 in float64 one more (N, N) copy is 0.8 GB
    out /= len(keys)
    _mirror_upper_in_place(out)
    return np.clip(out, 0.0, 1.0, out=out)


def _row_blocks(n: int, r: int) -> list[tuple[int, int]]:
    """Contiguous row blocks [start, stop) over N clients, each paired with the clients j >= start: a block's
    (rows r, (N - start) r) inner products stay within SUBSPACE_BLOCK entries (unless one row alone exceeds
    it), and there are at least min(N, SUBSPACE_MIN_BLOCKS) blocks."""
    blocks, start = [], 0
    while start < n:
        rows = min(SUBSPACE_BLOCK // max(1, (n - start) * r * r), n // SUBSPACE_MIN_BLOCKS)
        stop = min(n, start + max(1, rows))
        blocks.append((start, stop))
        start = stop
    return blocks


def _mirror_upper_in_place(out: np.ndarray, rows: int = 1024) -> None:
    """Make a square matrix symmetric from its strict upper triangle (zero diagonal), a band of rows at a time
    so no second (N, N) array is made."""
    n = out.shape[0]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        upper = np.triu(out[start:stop, start:stop], 1)
        out[start:stop, start:stop] = upper + upper.T
        out[stop:, start:stop] = out[start:stop, stop:].T


#: the key of a client's input signature in its warm-up upload: the frozen base model's mean last-layer
#: representation of its training inputs, (d,) (`client.input_signature`; uploaded with distance `inputs` only)
SIGNATURE_KEY = "signature.inputs"


def inputs_distance_matrix(adapters: list[dict[str, torch.Tensor]], dtype: str = "float64") -> np.ndarray:
    """(N, N) cosine distance between the clients' input signatures, centred on their mean over clients:
    1 - cos(s_i - mean_k s_k, s_j - mean_k s_k). Centring removes what every client's inputs share (a
    sentence encoder's mean embedding is close to one direction for any text), leaving what tells them apart."""
    missing = [i for i, a in enumerate(adapters) if SIGNATURE_KEY not in a]
    if missing:
        raise ValueError(f"clients {missing[:10]} uploaded no input signature ({SIGNATURE_KEY}): the warm-up computes "
                         "it only when fedlease.clustering.distance is `inputs` (rerun the warm-up with it)")
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    sig = torch.stack([a[SIGNATURE_KEY].reshape(-1).to(tdtype) for a in adapters])
    sig -= sig.mean(dim=0, keepdim=True)
    sig /= sig.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = (1.0 - sig @ sig.T).numpy()
    np.fill_diagonal(out, 0.0)
    out += out.T  # symmetric to the last bit, in place
    out /= 2
    return np.clip(out, 0.0, 2.0, out=out)


DISTANCES = {"cosine": b_distance_matrix, "subspace": b_subspace_distance_matrix, "inputs": inputs_distance_matrix}
DISTANCE_RANGE = {"cosine": 2.0, "subspace": 1.0, "inputs": 2.0}  # the largest value each distance takes


def applicable_distances(adapters: list[dict[str, torch.Tensor]]) -> list[str]:
    """The distances these warm-up adapters can be compared by (diagnostics): the B ones always, `inputs` only
    when every client uploaded its signature."""
    return [kind for kind in DISTANCES if kind != "inputs" or all(SIGNATURE_KEY in a for a in adapters)]


def distance_matrix(adapters: list[dict[str, torch.Tensor]], kind: str = "cosine",
                    dtype: str = "float64") -> np.ndarray:
    """The clients' (N, N) distances by `fedlease.clustering.distance`: `cosine` (the paper) or `subspace`."""
    if kind not in DISTANCES:
        raise ValueError(f"fedlease.clustering.distance: {kind!r} is not one of {sorted(DISTANCES)}")
    return DISTANCES[kind](adapters, dtype)


def cluster_all(dist: np.ndarray, ks: list[int], method: str = "agglomerative", linkage: str = "average",
                seed: int = 0, max_distance: float = 2.0) -> dict[int, np.ndarray]:
    """Labels for every k in `ks`. Agglomerative: one linkage tree on the precomputed distances, cut
    at each k (the tree sklearn's AgglomerativeClustering builds for every k anew). Spectral: on the
    similarity 1 - dist / max_distance (the distance's range: DISTANCE_RANGE)."""
    if method == "agglomerative":
        from scipy.cluster.hierarchy import cut_tree
        from scipy.cluster.hierarchy import linkage as build_tree
        from scipy.spatial.distance import squareform

        tree = build_tree(squareform(dist, checks=False), method=linkage)
        cuts = cut_tree(tree, n_clusters=ks)
        return {k: cuts[:, i] for i, k in enumerate(ks)}
    affinity = np.clip(1.0 - dist / max_distance, 0.0, 1.0)  # similarity in [0, 1]
    return {k: SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed).fit_predict(affinity)
            for k in ks}


def canonical_labels(labels: np.ndarray) -> list[int]:
    """Renumber clusters in order of first appearance (cluster of client 0 is expert 0)."""
    mapping: dict[int, int] = {}
    return [mapping.setdefault(int(lab), len(mapping)) for lab in labels]


@dataclass
class Allocation:
    assignment: list[int]  # client -> expert
    num_experts: int
    silhouette: dict[int, float] = field(default_factory=dict)
    distances: np.ndarray | None = None  # (N, N); kept in memory, saved beside the map only for small N
    seconds: float = 0.0
    method: str = "agglomerative"

    def to_json(self) -> dict[str, Any]:
        """The cluster map every client reads: small (no distance matrix)."""
        return {"assignment": {str(i): e for i, e in enumerate(self.assignment)}, "num_experts": self.num_experts,
                "silhouette": {str(k): v for k, v in self.silhouette.items()},
                "seconds": self.seconds, "method": self.method}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Allocation:
        assignment = [obj["assignment"][str(i)] for i in range(len(obj["assignment"]))]
        return cls(assignment, obj["num_experts"], {int(k): v for k, v in obj["silhouette"].items()},
                   None, obj.get("seconds", 0.0), obj.get("method", "agglomerative"))

    def members(self, expert: int) -> list[int]:
        return [i for i, e in enumerate(self.assignment) if e == expert]


def choose_experts(dist: np.ndarray, m_max: int, method: str = "agglomerative", linkage: str = "average",
                   fixed_m: int | None = None, seed: int = 0, tolerance: float = 0.0,
                   max_distance: float = 2.0) -> Allocation:
    """Cluster for k = 2..min(m_max, N-1) and keep the silhouette-best k (or `fixed_m`).

    With `tolerance` > 0 the smallest k whose silhouette is within `tolerance` of the best wins
    (fewer experts, less traffic, when the scores are a near tie); 0 is the paper's plain argmax."""
    t0 = time.perf_counter()
    n = dist.shape[0]
    if fixed_m is not None:
        if not 1 <= fixed_m <= n:
            raise ValueError(f"fedlease.clustering.fixed_m: {fixed_m} is outside 1..{n} clients")
        labels = (np.zeros(n, dtype=int) if fixed_m == 1
                  else cluster_all(dist, [fixed_m], method, linkage, seed, max_distance)[fixed_m])
        return Allocation(canonical_labels(labels), fixed_m, {}, dist, time.perf_counter() - t0, method)
    if n < 3:
        raise ValueError(f"silhouette needs at least 3 clients to compare k >= 2 clusters, got {n}")
    labels_of = cluster_all(dist, list(range(2, min(m_max, n - 1) + 1)), method, linkage, seed, max_distance)
    scores = {k: float(silhouette_score(dist, labels, metric="precomputed")) for k, labels in labels_of.items()}
    top = max(scores.values())
    k = min(k for k, score in scores.items() if score >= top - tolerance)
    return Allocation(canonical_labels(labels_of[k]), k, scores, dist, time.perf_counter() - t0, method)


def cap_reached(num_experts: int, m_max: int, n_clients: int, fixed_m: int | None) -> str | None:
    """The limit M stopped at when the silhouette had no larger k to try (M may then be the cap rather than the
    data's structure): `fedlease.m_max`, or N - 1 (the silhouette needs two clients in some cluster) when that
    is smaller. None when M is below both or was fixed by hand."""
    if fixed_m is not None:
        return None
    if m_max <= n_clients - 1:
        return f"fedlease.m_max = {m_max}" if num_experts == m_max else None
    return f"N - 1 = {n_clients - 1} with {n_clients} clients" if num_experts == n_clients - 1 else None


def init_experts(adapters: list[dict[str, torch.Tensor]], allocation: Allocation,
                 weights: list[float] | None = None) -> list[dict[str, torch.Tensor]]:
    """Expert j = mean of its cluster members' LoRA A and B, per module."""
    experts = []
    for j in range(allocation.num_experts):
        members = allocation.members(j)
        lora = [{k: v for k, v in adapters[i].items() if k.startswith("lora.")} for i in members]
        experts.append(weighted_mean(lora, [weights[i] for i in members] if weights else None))
    return experts


def assign_late_joiner(adapter: dict[str, torch.Tensor], adapters: list[dict[str, torch.Tensor]],
                       allocation: Allocation, distance: str = "cosine") -> tuple[int, list[float]]:
    """Expert of the cluster with the smallest mean distance to the newcomer (no re-clustering), by the
    distance the allocation used (`inputs` centres the signatures on the peers and the newcomer together: its
    mean moves by 1/(N+1) of the newcomer's offset)."""
    dist = distance_matrix([adapter, *adapters], distance)[0, 1:]
    means = [float(np.mean([dist[i] for i in allocation.members(j)])) for j in range(allocation.num_experts)]
    return int(np.argmin(means)), means
