"""The arithmetic behind RCDM's visualisations: moving between and editing representations.

Interpolation (`lerp`, `slerp`, `interpolation_path`) walks from one image's representation to
another's and is exact at both ends, so the first and last samples of an interpolation are
conditioned on exactly the two images' representations. Manipulation follows the paper: find the
source image's nearest neighbours (`nearest_neighbors`: cosine similarity, i.e. L2 on unit vectors,
with faiss when it is installed and an exact torch search otherwise), keep the dimensions that are
active (non-zero) in more than `n_common` of them (`shared_dimensions`), then either zero those
dimensions (`zero_dimensions`) or copy another image's values into them (`transplant_dimensions`);
every other dimension is left bit-for-bit untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Below this angle (radians) the two directions are parallel for float32 and slerp is ill-posed.
_SLERP_MIN_ANGLE = 1e-4

INTERPOLATIONS = ("linear", "spherical")


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) a + alpha b; exactly `a` at alpha 0 and exactly `b` at alpha 1."""
    if alpha == 0:
        return a.clone()
    if alpha == 1:
        return b.clone()
    return (1.0 - alpha) * a + alpha * b


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of the last dimension (great circle between the directions).

    The norm is interpolated linearly along the way, so vectors of different lengths (trunk
    features are not normalised) go from one length to the other. Exactly `a` at alpha 0 and `b`
    at alpha 1; falls back to `lerp` where the two directions are (anti)parallel.
    """
    if alpha == 0:
        return a.clone()
    if alpha == 1:
        return b.clone()
    a64, b64 = a.double(), b.double()
    na = a64.norm(dim=-1, keepdim=True)
    nb = b64.norm(dim=-1, keepdim=True)
    ua = a64 / na.clamp_min(1e-12)
    ub = b64 / nb.clamp_min(1e-12)
    omega = torch.acos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    degenerate = (sin_omega.abs() < _SLERP_MIN_ANGLE) | (na == 0) | (nb == 0)
    safe_sin = torch.where(degenerate, torch.ones_like(sin_omega), sin_omega)
    direction = (torch.sin((1.0 - alpha) * omega) * ua + torch.sin(alpha * omega) * ub) / safe_sin
    out = direction * ((1.0 - alpha) * na + alpha * nb)
    out = torch.where(degenerate, (1.0 - alpha) * a64 + alpha * b64, out)
    return out.to(a.dtype)


def interpolation_path(
    a: torch.Tensor, b: torch.Tensor, num_points: int, method: str = "linear"
) -> tuple[torch.Tensor, list[float]]:
    """`num_points` representations from `a` (alpha 0) to `b` (alpha 1), evenly spaced in alpha.

    `a` and `b` are D-vectors (or 1xD); returns `(num_points x D, alphas)`.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}: choose one of {', '.join(INTERPOLATIONS)}")
    if num_points < 2:
        raise ValueError(f"an interpolation needs at least 2 points (both ends), got {num_points}")
    a, b = a.reshape(-1), b.reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate representations of sizes {a.numel()} and {b.numel()}")
    # Endpoints are set to exactly 0 and 1 (linspace's last value can be off by an ulp).
    alphas = [0.0] + [i / (num_points - 1) for i in range(1, num_points - 1)] + [1.0]
    fn = lerp if method == "linear" else slerp
    return torch.stack([fn(a, b, alpha) for alpha in alphas]), alphas


# ----------------------------------------------------------------------------- neighbours


def faiss_available() -> bool:
    """Whether the optional faiss package can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def nearest_neighbors(
    database: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` nearest rows of `database` (N x D) to each query (Q x D) by cosine similarity.

    Both sides are L2-normalised first (the original normalised the folder's representations), so
    the squared L2 distance returned is 2 - 2 cos. `backend`: "faiss" (exact flat index on CPU),
    "torch" (exact, any device) or "auto" (faiss when installed). Returns `(distances, indices)`,
    each Q x k, nearest first.
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown neighbour search backend {backend!r}: auto, faiss or torch")
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(
            f"need N x D database and Q x D queries, got {list(database.shape)} and {list(queries.shape)}"
        )
    n = database.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot find {k} nearest neighbours among {n} representations")
    db = torch.nn.functional.normalize(database.float(), dim=-1)
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        import faiss

        # A flat index is exact; the original's IVF index with nprobe == nlist searched every
        # list anyway, and needs at least nlist training points, which small folders lack.
        index = faiss.IndexFlatL2(db.shape[1])
        index.add(db.cpu().numpy())
        dist, idx = index.search(q.cpu().numpy(), k)
        return torch.from_numpy(dist), torch.from_numpy(idx).long()
    # Squared L2 between unit vectors; exact, and on the representations' device.
    dist = (2.0 - 2.0 * q @ db.T).clamp_min(0.0)
    dist, idx = torch.topk(dist, k, dim=1, largest=False, sorted=True)
    return dist.cpu(), idx.cpu()


# ----------------------------------------------------------------------------- manipulation


def dimension_counts(features: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """For each dimension, in how many of the rows (K x D) it is active (|x| > eps)."""
    return (features.abs() > eps).sum(dim=0)


def shared_dimensions(neighbor_features: torch.Tensor, n_common: int, eps: float = 0.0) -> torch.Tensor:
    """The dimensions active (|x| > eps) in more than `n_common` of the neighbours, sorted.

    As the original: a dimension counts for a neighbour when it is non-zero, and is selected when
    its count exceeds `n_common`.
    """
    if n_common < 0:
        raise ValueError(f"`n_common` must be >= 0, got {n_common}")
    counts = dimension_counts(neighbor_features, eps)
    return torch.nonzero(counts > n_common).flatten()


def _dims_index(dims: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(dims, dtype=torch.long, device=device).flatten()


def zero_dimensions(features: torch.Tensor, dims: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A copy of `features` (... x D) with the dimensions `dims` set to zero."""
    out = features.clone()
    out[..., _dims_index(dims, features.device)] = 0
    return out


def transplant_dimensions(
    features: torch.Tensor, donor: torch.Tensor, dims: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """A copy of `features` (... x D) whose dimensions `dims` take the values of `donor` (D or 1xD)."""
    idx = _dims_index(dims, features.device)
    out = features.clone()
    out[..., idx] = donor.reshape(-1)[idx].to(out.dtype)
    return out
