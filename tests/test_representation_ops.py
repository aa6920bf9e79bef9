"""Interpolation, nearest neighbours and dimension editing of representations (representation_ops)."""

from __future__ import annotations

import math

import pytest
import torch

from guided_diffusion_rcdm import representation_ops as ops


def _pair(d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # ReLU'd like trunk features, with different norms
    return torch.relu(torch.randn(d, generator=g)) * 3.0, torch.relu(torch.randn(d, generator=g))


@pytest.mark.parametrize("method", ops.INTERPOLATIONS)
def test_interpolation_ends_are_exactly_the_two_representations(method):
    a, b = _pair()
    path, alphas = ops.interpolation_path(a, b, 7, method)
    assert path.shape == (7, 64)
    assert alphas[0] == 0.0 and alphas[-1] == 1.0 and len(alphas) == 7
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    assert not torch.equal(path[3], a) and not torch.equal(path[3], b)


def test_lerp_is_the_straight_line():
    a, b = _pair()
    path, alphas = ops.interpolation_path(a, b, 5, "linear")
    for p, alpha in zip(path, alphas):
        torch.testing.assert_close(p, (1 - alpha) * a + alpha * b)


def test_slerp_follows_the_great_circle_and_interpolates_the_norm():
    a, b = _pair()
    mid = ops.slerp(a, b, 0.5)
    ua, ub, um = (v / v.norm() for v in (a, b, mid))
    # halfway along the arc: equal angles to both ends, and in the plane of the two directions
    assert math.isclose(float(um @ ua), float(um @ ub), rel_tol=1e-5)
    omega = torch.acos(ua @ ub)
    assert math.isclose(float(torch.acos((um @ ua).clamp(-1, 1))), float(omega / 2), rel_tol=1e-4)
    assert math.isclose(float(mid.norm()), float((a.norm() + b.norm()) / 2), rel_tol=1e-5)
    # a quarter of the way: a quarter of the angle
    q = ops.slerp(a, b, 0.25)
    assert math.isclose(float(torch.acos((q / q.norm()) @ ua)), float(omega / 4), rel_tol=1e-3)


def test_slerp_of_parallel_vectors_falls_back_to_lerp():
    a = torch.rand(16)
    b = 2 * a
    out = ops.slerp(a, b, 0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.7 * a + 0.3 * b)


def test_interpolation_rejects_bad_requests():
    a, b = _pair()
    with pytest.raises(ValueError, match="at least 2"):
        ops.interpolation_path(a, b, 1)
    with pytest.raises(ValueError, match="unknown interpolation"):
        ops.interpolation_path(a, b, 3, "cubic")
    with pytest.raises(ValueError, match="sizes"):
        ops.interpolation_path(a, b[:10], 3)


def _brute_force(db: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    dbn = torch.nn.functional.normalize(db, dim=-1)
    qn = torch.nn.functional.normalize(q, dim=-1)
    return torch.stack([torch.argsort(-(dbn @ x), stable=True)[:k] for x in qn])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_nearest_neighbors_are_the_cosine_nearest(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    db = torch.randn(50, 32, generator=g)
    q = torch.randn(3, 32, generator=g)
    dist, idx = ops.nearest_neighbors(db, q, 6, backend=backend)
    assert idx.shape == dist.shape == (3, 6)
    assert torch.equal(idx, _brute_force(db, q, 6))
    assert (dist[:, 1:] >= dist[:, :-1] - 1e-6).all()  # nearest first
    # distances are squared L2 between unit vectors
    unit = torch.nn.functional.normalize
    want = ((unit(q, dim=-1)[0] - unit(db[idx[0, 0]], dim=0)) ** 2).sum()
    assert math.isclose(float(dist[0, 0]), float(want), rel_tol=1e-4, abs_tol=1e-5)
    # a database row is its own nearest neighbour, scaling does not matter (cosine)
    _, idx = ops.nearest_neighbors(db, 5 * db[7:8], 1, backend=backend)
    assert int(idx[0, 0]) == 7


def test_faiss_and_torch_agree():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    db, q = torch.randn(200, 64, generator=g), torch.randn(5, 64, generator=g)
    d1, i1 = ops.nearest_neighbors(db, q, 10, backend="faiss")
    d2, i2 = ops.nearest_neighbors(db, q, 10, backend="torch")
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2, atol=1e-5, rtol=1e-4)


def test_nearest_neighbors_needs_enough_rows():
    with pytest.raises(ValueError, match="cannot find 5 nearest neighbours among 3"):
        ops.nearest_neighbors(torch.randn(3, 4), torch.randn(1, 4), 5, backend="torch")


def test_shared_dimensions_count_non_zero_entries_like_the_original():
    hood = torch.zeros(5, 8)
    hood[:, 0] = 1.0            # active in all 5
    hood[:4, 1] = 0.5           # in 4
    hood[:3, 2] = -2.0          # in 3 (negative values count: non-zero)
    hood[:1, 3] = 1.0           # in 1
    assert ops.dimension_counts(hood).tolist() == [5, 4, 3, 1, 0, 0, 0, 0]
    assert ops.shared_dimensions(hood, n_common=3).tolist() == [0, 1]  # strictly more than 3
    assert ops.shared_dimensions(hood, n_common=0).tolist() == [0, 1, 2, 3]
    assert ops.shared_dimensions(hood, n_common=5).tolist() == []


def test_zero_and_transplant_change_only_the_selected_dimensions():
    g = torch.Generator().manual_seed(3)
    feat, donor = torch.rand(2, 32, generator=g) + 0.1, torch.rand(32, generator=g) + 2.0
    dims = torch.tensor([1, 5, 30])
    others = torch.ones(32, dtype=torch.bool)
    others[dims] = False

    zeroed = ops.zero_dimensions(feat, dims)
    assert (zeroed[:, dims] == 0).all()
    assert torch.equal(zeroed[:, others], feat[:, others])

    moved = ops.transplant_dimensions(feat, donor, dims)
    assert torch.equal(moved[:, dims], donor[dims].expand(2, -1))
    assert torch.equal(moved[:, others], feat[:, others])
    assert feat.min() > 0.0  # inputs untouched
