"""Stage 1 maths: B distances, silhouette choice of M, cluster-mean init, aggregation, late joiners."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlease import allocation
from fedlease.aggregation import weighted_mean
from fedlease.allocation import (DISTANCE_RANGE, Allocation, assign_late_joiner, b_distance_matrix,
                                 b_subspace_distance_matrix, cap_reached, choose_experts, distance_matrix,
                                 init_experts)


def _adapter(b1: list[float], b2: list[float], a: float = 0.0) -> dict[str, torch.Tensor]:
    return {"lora.m1.B": torch.tensor([b1], dtype=torch.float32), "lora.m2.B": torch.tensor([b2], dtype=torch.float32),
            "lora.m1.A": torch.full((1, 2), a), "lora.m2.A": torch.full((1, 2), a)}


def test_distance_is_mean_over_modules_of_one_minus_cosine():
    x = _adapter([1.0, 0.0], [1.0, 1.0])
    y = _adapter([0.0, 1.0], [1.0, 1.0])  # module 1 orthogonal (d=1), module 2 identical (d=0)
    z = _adapter([-1.0, 0.0], [-1.0, -1.0])  # opposite of x in both modules (d=2)
    d = b_distance_matrix([x, y, z])
    assert d[0, 1] == pytest.approx(0.5)
    assert d[0, 2] == pytest.approx(2.0)
    assert d[1, 2] == pytest.approx((1.0 + 2.0) / 2)
    assert np.allclose(d, d.T) and np.allclose(np.diag(d), 0)


def _b(*modules: list[list[float]]) -> dict[str, torch.Tensor]:
    return {f"lora.m{i}.B": torch.tensor(b, dtype=torch.float64) for i, b in enumerate(modules)}


E12 = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]  # B (d = 3, r = 2) spanning the first two axes


def test_subspace_distance_is_one_minus_the_overlap_of_the_column_spaces():
    x = _b(E12, E12)
    flipped = _b([[-1.0, 0.0], [0.0, -1.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # -B; columns swapped
    rotated = _b([[0.6, -0.8], [0.8, 0.6], [0.0, 0.0]], [[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # B R; B scaled
    half = _b([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], E12)  # module 0 shares one of two axes (1 - 1/2), module 1 all
    rank1 = _b([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], E12)  # module 0 spans one axis inside x's two: 1 - 1/max(1, 2)
    zero = _b([[0.0, 0.0]] * 3, E12)  # a zero B spans nothing: 1 from everyone in that module
    r = 0.5**0.5
    tilted = _b([[r, 0.0], [0.0, 1.0], [r, 0.0]], E12)  # module 0: e2 shared, e1 at 45 degrees: 1 - (1/2 + 1)/2
    rank1_too = _b([[-2.0, 0.0], [0.0, 0.0], [0.0, 0.0]], E12)  # the same one axis as rank1: 0, not 1 - 1/r
    d = b_subspace_distance_matrix([x, flipped, rotated, half, rank1, zero, tilted, rank1_too])
    assert d[0, 6] == pytest.approx((0.25 + 0.0) / 2)
    assert d[4, 7] == pytest.approx(0.0, abs=1e-12)
    assert d[0, 1] == pytest.approx(0.0, abs=1e-12) and d[0, 2] == pytest.approx(0.0, abs=1e-12)
    assert d[0, 3] == pytest.approx((0.5 + 0.0) / 2)
    assert d[0, 4] == pytest.approx((0.5 + 0.0) / 2)
    assert d[0, 5] == pytest.approx((1.0 + 0.0) / 2)
    assert d[3, 4] == pytest.approx((0.5 + 0.0) / 2)  # e1 lies in half's span {e1, e3}: 1 - 1/2
    assert np.array_equal(d, d.T) and np.array_equal(np.diag(d), np.zeros(len(d)))
    assert b_distance_matrix([x, flipped])[0, 1] == pytest.approx((2.0 + 1.0) / 2)  # the paper's cosine: far apart


def test_subspace_distance_in_row_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch):
    """One block computes every pair; the blocked upper half (by memory, or by the minimum count of blocks)
    must give the same matrix, mirrored."""
    gen = torch.Generator().manual_seed(0)
    adapters = [{"lora.m.B": torch.randn(6, 3, generator=gen, dtype=torch.float64)} for _ in range(7)]
    adapters[4]["lora.m.B"][:, 2] = adapters[4]["lora.m.B"][:, 0]  # rank 2 among rank 3: max(rank_i, rank_j) by pair
    monkeypatch.setattr(allocation, "SUBSPACE_MIN_BLOCKS", 1)
    whole = b_subspace_distance_matrix(adapters)
    monkeypatch.setattr(allocation, "SUBSPACE_BLOCK", 9 * 7 * 2)  # two clients' rows at first, more as j >= i narrows
    assert np.allclose(b_subspace_distance_matrix(adapters), whole, atol=1e-12)
    assert np.allclose(b_subspace_distance_matrix(adapters, "float32"), whole, atol=1e-5)
    monkeypatch.setattr(allocation, "SUBSPACE_BLOCK", 2**24)
    monkeypatch.setattr(allocation, "SUBSPACE_MIN_BLOCKS", 3)  # rows of 3, 3, 1 clients
    assert np.allclose(b_subspace_distance_matrix(adapters), whole, atol=1e-12)
    upper = np.triu(whole, 1) + np.tril(np.full_like(whole, 9.0))  # junk below and on the diagonal
    allocation._mirror_upper_in_place(upper, rows=3)  # bands of 3, 3, 1 rows
    assert np.array_equal(upper, np.triu(whole, 1) + np.triu(whole, 1).T)


@pytest.mark.parametrize("n", [1, 2, 7, 13, 300])
@pytest.mark.parametrize("block", [1, 40, 2**24])
@pytest.mark.parametrize("min_blocks", [1, 3, 8])
def test_subspace_row_blocks_cover_the_clients_within_the_memory_bound(monkeypatch: pytest.MonkeyPatch, n: int,
                                                                       block: int, min_blocks: int):
    """The blocks' inner products stay within SUBSPACE_BLOCK entries (a single row may exceed it) and pair each
    block with the clients j >= its start only; there are at least min(N, SUBSPACE_MIN_BLOCKS) of them."""
    monkeypatch.setattr(allocation, "SUBSPACE_BLOCK", block)
    monkeypatch.setattr(allocation, "SUBSPACE_MIN_BLOCKS", min_blocks)
    r = 4
    blocks = allocation._row_blocks(n, r)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])) and all(lo < hi for lo, hi in blocks)
    assert all(hi - lo == 1 or (hi - lo) * (n - lo) * r * r <= block for lo, hi in blocks)
    assert len(blocks) >= min(n, min_blocks)


def test_subspace_distance_groups_a_task_whose_clients_flip_b_where_cosine_does_not():
    """Label skew within a task, planted: each task's clients share B's column space but half of them hold the
    opposite label mix and learn -B (measured under Dirichlet 0.1: within-task 1 - cos > across-task)."""
    gen = torch.Generator().manual_seed(1)
    tasks = [torch.linalg.qr(torch.randn(8, 2, generator=gen, dtype=torch.float64))[0] for _ in range(3)]
    adapters, truth = [], []
    for t, basis in enumerate(tasks):
        for sign in (1.0, -1.0, 1.0, -1.0):
            mix = torch.eye(2, dtype=torch.float64) + 0.1 * torch.randn(2, 2, generator=gen, dtype=torch.float64)
            adapters.append({"lora.m.B": sign * basis @ mix})
            truth.append(t)
    by_subspace = choose_experts(distance_matrix(adapters, "subspace"), 6)
    by_cosine = choose_experts(distance_matrix(adapters, "cosine"), 6)
    assert by_subspace.assignment == [0] * 4 + [1] * 4 + [2] * 4
    assert set(DISTANCE_RANGE) == set(allocation.DISTANCES) and DISTANCE_RANGE["subspace"] == 1.0
    spectral = choose_experts(distance_matrix(adapters, "subspace"), 6, method="spectral",
                              max_distance=DISTANCE_RANGE["subspace"])
    assert spectral.assignment == by_subspace.assignment
    assert by_cosine.assignment != by_subspace.assignment
    with pytest.raises(ValueError, match="fedlease.clustering.distance"):
        distance_matrix(adapters, "euclid")


def _signed(*signatures: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{allocation.SIGNATURE_KEY: torch.tensor(s, dtype=torch.float64)} for s in signatures]


def test_inputs_distance_is_one_minus_cosine_of_the_centred_signatures():
    """1 - cos(s_i - mean, s_j - mean), by hand: [2,1],[2,1],[0,1],[0,1] centre to +-[1,0] (d 0 within, 2
    across); the three axes centre to [2,-1,-1]/3 and its rotations (cos -1/2 between any two: d 1.5)."""
    pairs = distance_matrix(_signed([2, 1], [2, 1], [0, 1], [0, 1]), "inputs")
    assert np.allclose(pairs, [[0, 0, 2, 2], [0, 0, 2, 2], [2, 2, 0, 0], [2, 2, 0, 0]], atol=1e-12)
    axes = distance_matrix(_signed([1, 0, 0], [0, 1, 0], [0, 0, 1]), "inputs")
    assert np.allclose(axes, 1.5 * (1 - np.eye(3)), atol=1e-12)
    assert DISTANCE_RANGE["inputs"] == 2.0
    with pytest.raises(ValueError, match=r"clients \[1\] uploaded no input signature"):
        distance_matrix([_signed([1, 0])[0], _adapter([1.0, 0.0], [0.0, 1.0])], "inputs")
    plain = [_adapter([1.0, 0.0], [0.0, 1.0])] * 2
    assert allocation.applicable_distances(plain) == ["cosine", "subspace"]
    assert allocation.applicable_distances([{**a, **s} for a, s in zip(plain, _signed([1, 0], [0, 1]))]) == [
        "cosine", "subspace", "inputs"]


def test_inputs_distance_finds_tasks_under_a_shared_direction_that_plain_cosine_cannot_see():
    """Planted: every client's signature is one large shared vector (what any text looks like to a sentence
    encoder) plus a small task offset and noise. Uncentred, all pairs have cos ~ 1; centred, the tasks separate
    and the allocation rule recovers them exactly."""
    gen = torch.Generator().manual_seed(3)
    shared = 50 * torch.randn(32, generator=gen, dtype=torch.float64)
    offsets = [torch.randn(32, generator=gen, dtype=torch.float64) for _ in range(3)]
    sigs = [shared + offsets[t] + 0.1 * torch.randn(32, generator=gen, dtype=torch.float64)
            for t in range(3) for _ in range(4)]
    adapters = [{allocation.SIGNATURE_KEY: s} for s in sigs]
    unit = torch.stack(sigs) / torch.stack(sigs).norm(dim=1, keepdim=True)
    assert float((1 - unit @ unit.T).max()) < 0.01  # plain cosine: every client looks the same
    alloc = choose_experts(distance_matrix(adapters, "inputs"), 6, max_distance=DISTANCE_RANGE["inputs"])
    assert alloc.assignment == [0] * 4 + [1] * 4 + [2] * 4

def _planted(k: int, per: int, seed: int = 0, noise: float = 0.05) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    centers = [torch.randn(16, generator=gen) for _ in range(k)]
    out = []
    for c in range(k):
        for _ in range(per):
            b = centers[c] + noise * torch.randn(16, generator=gen)
            out.append({"lora.m.B": b.reshape(4, 4), "lora.m.A": torch.randn(4, 4, generator=gen)})
    return out


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_silhouette_recovers_planted_clusters(k: int):
    adapters = _planted(k, 3, seed=k)
    alloc = choose_experts(b_distance_matrix(adapters), m_max=8)
    assert alloc.num_experts == k
    truth = [c for c in range(k) for _ in range(3)]
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, alloc.assignment) == 1.0
    assert set(alloc.silhouette) == set(range(2, min(8, len(adapters) - 1) + 1))
    assert alloc.assignment[0] == 0  # canonical numbering


def test_fixed_m_and_spectral():
    adapters = _planted(3, 3)
    d = b_distance_matrix(adapters)
    assert choose_experts(d, 8, fixed_m=3).num_experts == 3
    assert choose_experts(d, 8, fixed_m=1).assignment == [0] * 9
    spectral = choose_experts(d, 8, method="spectral")
    assert spectral.num_experts == 3


def test_silhouette_tolerance_prefers_fewer_experts_on_a_near_tie():
    d = b_distance_matrix(_planted(3, 3))
    paper = choose_experts(d, 8)
    assert paper.num_experts == max(paper.silhouette, key=paper.silhouette.get) == 3
    gap = paper.silhouette[3] - paper.silhouette[2]
    assert gap > 0
    assert choose_experts(d, 8, tolerance=gap * 0.99).num_experts == 3
    within = choose_experts(d, 8, tolerance=gap * 1.01)
    assert within.num_experts == 2 and within.silhouette == paper.silhouette


def test_the_cap_names_the_limit_m_stopped_at():
    # the silhouette tries k = 2..min(m_max, N - 1): the smaller of the two is the cap, and only it is named
    assert cap_reached(4, m_max=4, n_clients=10, fixed_m=None) == "fedlease.m_max = 4"
    assert cap_reached(3, m_max=4, n_clients=10, fixed_m=None) is None
    assert cap_reached(5, m_max=8, n_clients=6, fixed_m=None) == "N - 1 = 5 with 6 clients"
    assert cap_reached(5, m_max=5, n_clients=6, fixed_m=None) == "fedlease.m_max = 5"  # both: m_max is the knob
    assert cap_reached(4, m_max=8, n_clients=6, fixed_m=None) is None
    assert cap_reached(4, m_max=4, n_clients=10, fixed_m=4) is None  # M fixed by hand: no silhouette, no cap


def test_cluster_mean_init():
    adapters = [_adapter([1, 0], [0, 1], a=1.0), _adapter([3, 0], [0, 3], a=3.0), _adapter([5, 5], [5, 5], a=5.0)]
    alloc = Allocation([0, 0, 1], 2)
    experts = init_experts(adapters, alloc)
    assert experts[0]["lora.m1.B"].tolist() == [[2.0, 0.0]]
    assert experts[0]["lora.m1.A"].tolist() == [[2.0, 2.0]]
    assert experts[1]["lora.m2.B"].tolist() == [[5.0, 5.0]]
    weighted = init_experts(adapters, alloc, weights=[3.0, 1.0, 1.0])
    assert weighted[0]["lora.m1.B"].tolist() == [[1.5, 0.0]]


def test_weighted_mean_hand_made_updates():
    u = [{"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([2.0, 0.0])}]
    assert weighted_mean(u)["w"].tolist() == [1.0, 2.0]
    assert weighted_mean(u, [3, 1])["w"].tolist() == [0.5, 3.0]
    with pytest.raises(ValueError):
        weighted_mean([])


def test_late_joiner_lands_in_nearest_cluster():
    adapters = _planted(3, 3, seed=11)
    alloc = choose_experts(b_distance_matrix(adapters), m_max=8)
    newcomer = {k: v + 0.01 for k, v in adapters[7].items()}
    expert, means = assign_late_joiner(newcomer, adapters, alloc)
    assert expert == alloc.assignment[7]
    assert means[expert] == min(means)



def test_late_joiner_is_placed_by_the_distance_the_allocation_used():
    """A newcomer holding the opposite label mix of cluster 0's task (-B in its column space)."""
    peers = [_b([[1.0], [0.0], [0.0]]), _b([[1.0], [0.1], [0.0]]), _b([[0.0], [0.0], [1.0]]), _b([[0.0], [0.1], [1.0]])]
    newcomer = _b([[-1.0], [0.0], [0.0]])
    alloc = Allocation([0, 0, 1, 1], 2)
    assert assign_late_joiner(newcomer, peers, alloc, "subspace")[0] == 0
    assert assign_late_joiner(newcomer, peers, alloc, "cosine")[0] == 1  # 1 - cos = 2 from its own task's clients

def test_allocation_json_round_trip():
    alloc = Allocation([0, 1, 1], 2, {2: 0.5}, [[0.0]], 0.1)
    again = Allocation.from_json(alloc.to_json())
    assert again.assignment == [0, 1, 1] and again.silhouette == {2: 0.5}


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_one_tree_cut_at_every_k_equals_sklearn_refitting_per_k(linkage: str):
    """The scale path (one linkage tree, cut per k) gives sklearn's partitions exactly on random
    distance matrices, so small runs allocate as before."""
    from sklearn.cluster import AgglomerativeClustering

    from fedlease.allocation import canonical_labels, cluster_all

    for seed in range(12):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(5, 40))
        b = [{"lora.m.B": torch.tensor(rng.standard_normal((6, 2)) + rng.integers(0, 3))} for _ in range(n)]
        dist = b_distance_matrix(b)
        ks = list(range(2, min(8, n - 1) + 1))
        ours = cluster_all(dist, ks, linkage=linkage)
        for k in ks:
            ref = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage).fit_predict(dist)
            assert canonical_labels(ours[k]) == canonical_labels(ref), (seed, n, k)


def test_float32_distances_agree_with_float64():
    rng = np.random.default_rng(3)
    b = [{"lora.m.B": torch.tensor(rng.standard_normal((8, 4))), "lora.n.B": torch.tensor(rng.standard_normal((8, 4)))}
         for _ in range(30)]
    exact, fast = b_distance_matrix(b, "float64"), b_distance_matrix(b, "float32")
    assert fast.dtype == np.float32 and np.abs(exact - fast).max() < 1e-5
    assert np.array_equal(exact, exact.T) and np.all(np.diag(exact) == 0)
    assert choose_experts(exact, 6).assignment == choose_experts(fast.astype(np.float64), 6).assignment


def test_cluster_map_is_small():
    alloc = choose_experts(b_distance_matrix([{"lora.m.B": torch.randn(4, 2)} for _ in range(6)]), 4)
    doc = alloc.to_json()
    assert "distances" not in doc and Allocation.from_json(doc).assignment == alloc.assignment
