"""The paper's scores: representation fidelity (rank / MRR), FID and Inception Score, in PyTorch.

Representation fidelity asks whether samples keep the representation they were drawn from: for N
conditioning images and K samples each, every sample's representation is compared (cosine or L2)
with the N conditioning representations, and the rank of its own conditioning image gives mean
rank, top-1 / top-5 accuracy and mean reciprocal rank (MRR). Ties are broken at random in
expectation, so an encoder that cannot tell images apart scores exactly chance. The same scores
for randomly permuted conditioning (the shuffled control) measure chance empirically; its
analytic value is (N+1)/2 for the rank, k/N for top-k and H_N/N for the MRR. FID and IS use the
Inception-v3 network of the TensorFlow FID/IS code, ported to PyTorch as pytorch-fid ports it
(`FIDInceptionV3`, weights `pt_inception-2015-12-05-6726825d.pth` read from a local file or the
torch.hub cache, or downloaded through `hub.download`); the statistics of a reference set are
cached on disk under a key made of its content and the network's weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from tqdm.auto import tqdm

from . import fileio, hub
from .errors import MissingInputError, UsageError
from .image_datasets import center_crop_arr, find_images, load_rgb_image
from .precision import exact_fp32_math

# ----------------------------------------------------------------------------- representation fidelity

METRICS = ("cosine", "l2")
TOPK = (1, 5)


def harmonic(n: int) -> float:
    """H_n = 1 + 1/2 + ... + 1/n (H_0 = 0)."""
    return float(sum(1.0 / r for r in range(1, n + 1)))


def chance_scores(n: int, topk: Sequence[int] = TOPK) -> dict[str, float]:
    """What a generator that ignores its conditioning scores on average among `n` images.

    The true image's rank is then uniform on 1..n: mean rank (n+1)/2, top-k k/n, MRR H_n/n.
    """
    if n < 1:
        raise ValueError("chance scores need at least one conditioning image")
    out = {"mean_rank": (n + 1) / 2, "mrr": harmonic(n) / n}
    out.update({f"top{k}": min(k, n) / n for k in topk})
    return out


def similarity(queries: torch.Tensor, keys: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """M x N similarities (higher = closer) in float64: cosine, or minus the squared L2 distance."""
    if metric not in METRICS:
        raise ValueError(f"unknown similarity {metric!r}: choose one of {', '.join(METRICS)}")
    q, k = queries.detach().double().cpu(), keys.detach().double().cpu()
    if metric == "cosine":
        return F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    return -torch.cdist(q, k).pow(2)


def _harmonic_table(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def expected_rank_scores(sim: np.ndarray, targets: np.ndarray, topk: Sequence[int] = TOPK) -> dict[str, np.ndarray]:
    """Per query: the rank of `targets[m]` among the N columns of `sim[m]` (1 = most similar).

    With `g` columns strictly more similar and `e` others exactly as similar, the rank is uniform
    on g+1..g+e+1 under random tie-breaking; the returned rank, reciprocal rank and top-k hits
    are the expectations over that (so ties never flatter a model).
    """
    sim = np.asarray(sim, dtype=np.float64)
    m_idx = np.arange(sim.shape[0])
    own = sim[m_idx, targets][:, None]
    greater = (sim > own).sum(axis=1)
    ties = (sim == own).sum(axis=1) - 1  # the target itself is not a tie
    h = _harmonic_table(sim.shape[1])
    out = {
        "rank": 1.0 + greater + ties / 2.0,
        "rr": (h[greater + ties + 1] - h[greater]) / (ties + 1),
    }
    for k in topk:
        out[f"top{k}"] = np.clip(k - greater, 0, ties + 1) / (ties + 1)
    return out


@dataclass
class FidelityScores:
    """Rank scores of one assignment of samples to conditioning images (see `representation_fidelity`)."""

    mean_rank: float
    median_rank: float
    top1: float
    top5: float
    mrr: float
    per_condition_rank: list[float] = field(default_factory=list)  # mean rank of each image's samples


@dataclass
class FidelityResult:
    """The model's scores, the shuffled-conditioning control and the analytic chance level."""

    num_conditions: int
    samples_per_condition: int
    metric: str
    model: FidelityScores
    shuffled: FidelityScores
    shuffled_mrr_std: float
    num_shuffles: int
    chance: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A small text table, model vs shuffled control vs chance."""
        rows = [("", "model", "shuffled", "chance")]
        for key, name in (("mean_rank", "mean rank"), ("top1", "top-1"), ("top5", "top-5"), ("mrr", "MRR")):
            fmt = "{:.2f}" if key == "mean_rank" else "{:.3f}"
            rows.append((name, fmt.format(getattr(self.model, key)), fmt.format(getattr(self.shuffled, key)),
                         fmt.format(self.chance[key])))
        width = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, width)) for r in rows]
        head = (f"representation fidelity: {self.num_conditions} conditioning images x "
                f"{self.samples_per_condition} samples, {self.metric} similarity "
                f"(shuffled: mean of {self.num_shuffles} permutations)")
        return "\n".join([head, *lines])


def _scores(parts: dict[str, np.ndarray], n: int, k: int) -> FidelityScores:
    rank = parts["rank"].reshape(n, k)
    return FidelityScores(
        mean_rank=float(rank.mean()),
        median_rank=float(np.median(rank)),
        top1=float(parts["top1"].mean()),
        top5=float(parts["top5"].mean()),
        mrr=float(parts["rr"].mean()),
        per_condition_rank=[float(r) for r in rank.mean(axis=1)],
    )


def representation_fidelity(
    sample_features: torch.Tensor | np.ndarray,
    condition_features: torch.Tensor | np.ndarray,
    *,
    metric: str = "cosine",
    num_shuffles: int = 10,
    seed: int = 0,
) -> FidelityResult:
    """Score how well samples keep the representation they were conditioned on.

    `sample_features` is N x K x D (K samples of each of N conditioning images, or N x D for one
    sample each); `condition_features` N x D. Each sample's similarity to all N conditioning
    representations ranks its own conditioning image; the scores are averaged over all N*K
    samples. The shuffled control scores the same samples against a uniformly random permutation
    of the conditioning images (averaged over `num_shuffles` permutations drawn with `seed`);
    its expectation is exactly `chance_scores(N)`.
    """
    samples = torch.as_tensor(np.asarray(sample_features) if not isinstance(sample_features, torch.Tensor)
                              else sample_features)
    conds = torch.as_tensor(np.asarray(condition_features) if not isinstance(condition_features, torch.Tensor)
                            else condition_features)
    if conds.ndim != 2:
        raise ValueError(f"conditioning features must be N x D, got shape {list(conds.shape)}")
    if samples.ndim == 2:
        samples = samples.unsqueeze(1)
    if samples.ndim != 3 or samples.shape[0] != conds.shape[0] or samples.shape[2] != conds.shape[1]:
        raise UsageError(
            f"sample features must be N x K x D with N={conds.shape[0]} and D={conds.shape[1]} to match "
            f"the conditioning features, got shape {list(samples.shape)}"
        )
    for what, feats in (("sample", samples), ("conditioning", conds)):
        bad = int((~torch.isfinite(feats.float())).sum())
        if bad:  # a NaN similarity ranks in the middle and would pass for "mean rank 0.50"
            raise UsageError(
                f"the {what} features hold {bad} non-finite value(s) (NaN or inf): the encoder's output "
                "is broken (check its weights and `precision`), so no fidelity can be computed"
            )
    n, k, _ = samples.shape
    if n < 2:
        raise UsageError("representation fidelity needs at least 2 conditioning images (a rank among 1 is always 1)")
    if num_shuffles < 1:
        raise UsageError("num_shuffles must be at least 1")
    sim = similarity(samples.reshape(n * k, -1), conds, metric).numpy()
    owner = np.repeat(np.arange(n), k)
    model = _scores(expected_rank_scores(sim, owner), n, k)
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(num_shuffles):
        perm = rng.permutation(n)
        runs.append(expected_rank_scores(sim, perm[owner]))
    pooled = {key: np.mean([r[key] for r in runs], axis=0) for key in runs[0]}
    shuffled = _scores(pooled, n, k)
    mrr_std = float(np.std([r["rr"].mean() for r in runs]))
    return FidelityResult(n, k, metric, model, shuffled, mrr_std, num_shuffles, chance_scores(n))


# ----------------------------------------------------------------------------- Inception for FID / IS

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILE = os.path.basename(FID_WEIGHTS_URL)
INCEPTION_SIZE = 299
STATS_FORMAT = "rcdm-fid-stats-v1"


def _basic(cin: int, cout: int, **kw) -> nn.Module:
    return BasicConv2d(cin, cout, **kw)


def _inception_blocks():
    # The TF graph's average pools do not count the zero padding (pytorch-fid's FIDInception*),
    # and its last block pools with max instead of average: both change the features.

    class FIDInceptionA(InceptionA):
        def _forward(self, x):
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return [b1, b5, b3, bp]

    class FIDInceptionC(InceptionC):
        def _forward(self, x):
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                bd = layer(bd)
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return [b1, b7, bd, bp]

    class FIDInceptionE(InceptionE):
        def __init__(self, in_channels: int, max_pool: bool):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x):
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            if self.max_pool:
                bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            return [b1, b3, bd, self.branch_pool(bp)]

    return FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInceptionV3(nn.Module):
    """The Inception-v3 of the TensorFlow FID and IS code (2015-12-05 graph), as pytorch-fid ports it.

    Parameter names are torchvision's `Inception3` (1008 classes, no auxiliary head), so the
    pytorch-fid weight file loads with `strict=True`. `forward(x)` takes B x 3 x H x W images in
    [0, 1] (any size: resized to 299 bilinearly, as pytorch-fid does) and returns `(pool, logits)`:
    the 2048-d pool features used by FID and the 1008 logits used by IS, computed without the
    classifier's bias as the original IS code does (`pool3 @ W`).
    """

    def __init__(self):
        super().__init__()

        block_a, block_c, block_e = _inception_blocks()
        self.Conv2d_1a_3x3 = _basic(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _basic(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _basic(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _basic(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _basic(80, 192, kernel_size=3)
        self.Mixed_5b = block_a(192, pool_features=32)
        self.Mixed_5c = block_a(256, pool_features=64)
        self.Mixed_5d = block_a(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = block_c(768, channels_7x7=128)
        self.Mixed_6c = block_c(768, channels_7x7=160)
        self.Mixed_6d = block_c(768, channels_7x7=160)
        self.Mixed_6e = block_c(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = block_e(1280, max_pool=False)
        self.Mixed_7c = block_e(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.weights_source = "random init"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # the TF graph's input scaling
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pool, pool @ self.fc.weight.T


class InceptionWeightsMissing(MissingInputError):
    """No Inception weights file and no way to download one: the message says where to put it."""


def inception_weights_path(path: str | None = None, *, download: bool = True) -> Path:
    """The local file of the FID Inception weights.

    `path` (e.g. `--inception_path`) is used as given; otherwise the torch.hub cache or the
    `RCDM_MIRROR` directory, else a download when `download` and the network allow it.
    """
    if path:
        if not os.path.isfile(path):
            raise InceptionWeightsMissing(
                f"`path` {path}: no such file. It must be pytorch-fid's {FID_WEIGHTS_FILE} "
                f"(from {FID_WEIGHTS_URL})"
            )
        return Path(path)
    cached = hub.hub_cache_dir() / FID_WEIGHTS_FILE
    mirror = os.environ.get(hub.MIRROR_ENV, "").strip()
    if not download and not cached.is_file() and not mirror:
        raise InceptionWeightsMissing(_missing_message("downloads are turned off"))
    try:
        return hub.download(FID_WEIGHTS_URL, file_name=FID_WEIGHTS_FILE, verify=_check_inception_file)
    except hub.DownloadError as err:
        raise InceptionWeightsMissing(_missing_message(str(err).splitlines()[0])) from None


def _missing_message(reason: str) -> str:
    return (
        f"FID and IS need the Inception weights {FID_WEIGHTS_FILE} ({reason}). Download it where there is "
        f"network from {FID_WEIGHTS_URL} and either pass `path` FILE, or put it at "
        f"{hub.hub_cache_dir() / FID_WEIGHTS_FILE} (used with no network), or in the folder named by "
        f"{hub.MIRROR_ENV}."
    )


def _inception_state_dict(obj, model: nn.Module) -> dict:
    """The state dict in a weights file (plain, `{"state_dict": ...}` or the project's own), as fp32,
    with the batch counters `model` has and files saved before BatchNorm counted batches lack."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if isinstance(obj, dict) and obj.get("format") == hub.CHECKPOINT_FORMAT:
        sd = obj["state_dict"]
    if not hub._is_state_dict(sd):
        raise hub.CheckpointError(f"not a state dict of the FID Inception network (found {type(sd).__name__})")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    for key in model.state_dict():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.tensor(0, dtype=torch.long)
    return sd


def _check_inception_file(path) -> None:
    """`hub.download`'s check of the Inception weights: the FID network's keys and shapes, before
    the file enters the cache."""
    with torch.device("meta"):
        model = FIDInceptionV3()
    sd = _inception_state_dict(hub.safe_torch_load(path, mmap=True), model)
    hub.expect_fit(FIDInceptionV3, sd, "the FID Inception network")


def load_inception(path: str | None = None, *, download: bool = True,
                   device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception network with its published weights (see `inception_weights_path`), in eval mode."""
    file = inception_weights_path(path, download=download)
    with torch.device("meta"):
        model = FIDInceptionV3()
    sd = _inception_state_dict(hub.safe_torch_load(file), model)
    hub.load_state_dict_checked(model, sd, strict=True, assign=True)
    model.weights_source = str(file)
    return model.to(device).eval().requires_grad_(False)


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """The same network with fixed-seed random weights: for tests of the arithmetic only (its
    FID and IS mean nothing and are not comparable with published numbers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FIDInceptionV3()
        # He init keeps the signal alive through ~100 conv layers (PyTorch's default shrinks it
        # at every layer, and every image would then have the same, zero, features).
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    model.weights_source = f"random init (seed {seed})"
    return model.eval().requires_grad_(False)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, values): the cache key's network part."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def inception_outputs(
    model: FIDInceptionV3,
    images: np.ndarray | Iterable[np.ndarray],
    *,
    batch_size: int = 32,
    progress: bool = False,
    total: int | None = None,
    desc: str = "inception",
) -> tuple[np.ndarray, np.ndarray]:
    """`(pool B x 2048, logits B x 1008)` in float64 for uint8 B x H x W x 3 images (an array,
    or an iterable of such batches). Runs in float32: FID is sensitive to the features' precision."""
    device = next(model.parameters()).device
    if isinstance(images, np.ndarray):
        arr = images
        batches: Iterable[np.ndarray] = (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))
        total = math.ceil(len(arr) / batch_size)
    else:
        batches = images
    pools, logits = [], []
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress):
        x = torch.as_tensor(np.asarray(batch))
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be uint8 B x H x W x 3, got {x.dtype} {list(x.shape)}")
        x = x.to(device).permute(0, 3, 1, 2).float() / 255.0
        with exact_fp32_math():  # TF32 on a GPU would move the features, and FID, by its rounding
            p, lg = model(x)
        pools.append(p.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
    if not pools:
        raise ValueError("no images to compute Inception features of")
    return np.concatenate(pools), np.concatenate(logits)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as numpy's `cov`) of N x D features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    # Eigenvalues at rounding level are zero: their square roots (1e-7 for 1e-14) would add up
    # over thousands of null directions of a covariance estimated from few samples.
    vals = np.where(vals > vals.max(initial=0.0) * matrix.shape[0] * np.finfo(np.float64).eps, vals, 0.0)
    return (vecs * np.sqrt(vals)) @ vecs.T


def _trace_sqrt_psd(matrix: np.ndarray) -> float:
    vals = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    vals = np.where(vals > vals.max(initial=0.0) * matrix.shape[0] * np.finfo(np.float64).eps, vals, 0.0)
    return float(np.sqrt(vals).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     factor1: np.ndarray | None = None) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    tr((S1 S2)^(1/2)) is the trace of the square root of a symmetric PSD matrix with the same
    non-zero eigenvalues as S1 S2: B S2 B^T when a factor `factor1` = B with S1 = B^T B is given
    (the centred features / sqrt(n - 1): a small n x n problem when there are fewer samples than
    dimensions), else S1^(1/2) S2 S1^(1/2). Both stay real and exact when the covariances are
    singular, where `scipy.linalg.sqrtm` of S1 S2 needs an epsilon added to the diagonals.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID statistics do not match: mean {mu1.shape} vs {mu2.shape}, covariance "
                         f"{s1.shape} vs {s2.shape}")
    if factor1 is not None and factor1.shape[0] < factor1.shape[1]:
        b = np.asarray(factor1, np.float64)
        tr_covmean = _trace_sqrt_psd(b @ s2 @ b.T)
    else:
        root1 = _psd_sqrt(s1)
        tr_covmean = _trace_sqrt_psd(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def covariance_factor(features: np.ndarray) -> np.ndarray:
    """B with `np.cov(features) == B.T @ B`: the centred features divided by sqrt(n - 1)."""
    features = np.asarray(features, dtype=np.float64)
    return (features - features.mean(axis=0)) / math.sqrt(features.shape[0] - 1)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score `exp(E_x KL(p(y|x) || p(y)))` from N x C logits: mean and std over `splits`
    parts, part i holding images [i*N//splits, (i+1)*N//splits) as in the original IS code (so
    scores compare with published ones when N is not a multiple of `splits`; fewer parts when
    there are fewer images)."""
    logits = np.asarray(logits, dtype=np.float64)
    n = logits.shape[0]
    if n < 1:
        raise ValueError("the Inception Score needs at least one image")
    splits = max(1, min(splits, n))
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for i in range(splits):
        lp = logp[i * n // splits : (i + 1) * n // splits]
        p = np.exp(lp)
        log_marginal = np.log(p.mean(axis=0) + 1e-300)
        kl = (p * (lp - log_marginal)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- image sets and caching


def default_stats_cache() -> Path:
    """Where reference statistics are cached: `$RCDM_STATS_CACHE`, else `$XDG_CACHE_HOME` (or
    ~/.cache) `/guided_diffusion_rcdm/fid_stats`."""
    if os.environ.get("RCDM_STATS_CACHE"):
        return Path(os.environ["RCDM_STATS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "guided_diffusion_rcdm" / "fid_stats"


def images_from_npz(path: str | Path, keys: Sequence[str] = ("samples", "arr_0", "images")) -> np.ndarray:
    """All images of an `.npz` as uint8 M x H x W x 3: the first of `keys` it holds (`samples` from
    the sampling scripts, `arr_0` from the original's and guided-diffusion's files), any leading
    dimensions (N x K samples) flattened."""
    with np.load(path, allow_pickle=False) as data:
        for key in keys:
            if key in data.files:
                arr = data[key]
                break
        else:
            raise UsageError(f"{path} holds no images: expected one of the arrays {', '.join(keys)}, "
                             f"found {', '.join(data.files) or 'none'}")
    if arr.ndim < 4 or arr.shape[-1] != 3:
        raise UsageError(f"{path}: '{key}' is not a set of H x W x 3 images (shape {arr.shape})")
    if arr.dtype != np.uint8:
        raise UsageError(f"{path}: '{key}' must hold uint8 images, not {arr.dtype}")
    return arr.reshape(-1, *arr.shape[-3:])


def folder_image_files(folder: str) -> list[str]:
    return find_images(folder)


def load_folder_images(files: Sequence[str], size: int, progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """Decode `files` to uint8 `size` x `size` centre crops (the training crop); unreadable files
    are skipped with a warning and returned."""
    out, skipped = [], []
    for f in tqdm(files, desc="reading reference images", unit="image", disable=not progress):
        try:
            out.append(center_crop_arr(load_rgb_image(f), size))
        except OSError as err:
            warnings.warn(f"skipping unreadable reference image {f}: {err}", stacklevel=2)
            skipped.append(f)
    if not out:
        raise UsageError("none of the reference images could be read")
    return np.stack(out), skipped


def _content_key(ref: str, size: int, net_digest: str, ref_resize: str) -> str:
    digest = hashlib.sha256(f"{STATS_FORMAT}|{size}|{net_digest}|{ref_resize}|".encode())
    paths = [ref] if os.path.isfile(ref) else folder_image_files(ref)
    root = os.path.abspath(ref)
    for p in paths:
        digest.update(os.path.relpath(os.path.abspath(p), root).encode() if p != ref else b"")
        digest.update(hub.sha256_of(p).encode())
    return digest.hexdigest()


# How an .npz reference whose images have another size than the samples reaches the network:
# "network": each image at its own size, resized straight to 299 by the network (pytorch-fid's
# behaviour, so FIDs compare with the literature); "crop": first centre-cropped to the samples'
# size with PIL (the training crop).
REF_RESIZE = ("network", "crop")


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    cache_path: str | None
    from_cache: bool
    preprocessing: str = ""  # what was done to the reference images before the network


def reference_statistics(
    ref: str,
    model: FIDInceptionV3,
    *,
    size: int,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    progress: bool = False,
    ref_resize: str = "network",
) -> ReferenceStats:
    """FID statistics of a reference set: a folder of images (centre crops at `size`, the samples'
    resolution), an `.npz` of images (of another size than `size`: see `REF_RESIZE` for
    `ref_resize`), or an `.npz` holding `mu` and `sigma` already. `preprocessing` in the result
    says what was done to the images.

    Computed statistics are cached in `cache_dir` (default `default_stats_cache()`) under the
    SHA-256 of the reference files' content, `size` and the network's weights, so an edited
    folder or other weights never reuse stale statistics. `cache_dir=""` turns caching off.
    """
    if not os.path.exists(ref):
        raise MissingInputError(f"reference {ref}: no such folder or .npz file")
    if ref_resize not in REF_RESIZE:
        raise UsageError(f"unknown ref_resize {ref_resize!r}: choose one of {', '.join(REF_RESIZE)}")
    if os.path.isfile(ref):
        if not ref.endswith(".npz"):
            raise UsageError(f"reference {ref}: expected a folder of images or an .npz file")
        with np.load(ref, allow_pickle=False) as data:
            if "mu" in data.files and "sigma" in data.files:
                return ReferenceStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64),
                                      int(data["count"]) if "count" in data.files else -1, ref, True,
                                      "precomputed statistics")
    key = _content_key(ref, size, weights_digest(model), ref_resize if os.path.isfile(ref) else "")
    cache = Path(default_stats_cache() if cache_dir is None else cache_dir) if cache_dir != "" else None
    path = cache / f"{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                preprocessing = str(data["preprocessing"]) if "preprocessing" in data.files else ""
                return ReferenceStats(data["mu"], data["sigma"], int(data["count"]), str(path), True,
                                      preprocessing)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is recomputed and replaced
    if os.path.isfile(ref):
        images = images_from_npz(ref)
        height, width = images.shape[1:3]
        if (height, width) == (size, size):
            preprocessing = f"{width}x{height} images as they are, resized to 299 by the network"
        elif ref_resize == "network":
            preprocessing = (f"{width}x{height} images resized straight to 299 by the network (as pytorch-fid), "
                             f"not to the samples' {size}x{size}")
        else:
            images = _resize_uint8(images, size)
            preprocessing = (f"{width}x{height} images centre-cropped to the samples' {size}x{size} (PIL), "
                             "then resized to 299 by the network")
    else:
        images, _ = load_folder_images(folder_image_files(ref), size, progress)
        preprocessing = f"centre crops at the samples' {size}x{size}, resized to 299 by the network"
    pool, _ = inception_outputs(model, images, batch_size=batch_size, progress=progress, desc="reference features")
    mu, sigma = feature_statistics(pool)
    if path is not None:
        # atomic: a crash never leaves half a statistics file
        fileio.save_npz(str(path), mu=mu, sigma=sigma, count=len(pool), source=os.path.abspath(ref),
                        format=STATS_FORMAT, preprocessing=preprocessing)
    return ReferenceStats(mu, sigma, len(pool), None if path is None else str(path), False, preprocessing)


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([center_crop_arr(Image.fromarray(im), size) for im in images])


@dataclass
class FidIsResult:
    fid: float
    inception_score: float
    inception_score_std: float
    num_samples: int
    num_reference: int
    inception_weights: str
    stats_cache: str | None
    reference_preprocessing: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fid_and_is(
    samples: np.ndarray,
    ref: str,
    model: FIDInceptionV3,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    splits: int = 10,
    progress: bool = False,
    ref_resize: str = "network",
) -> FidIsResult:
    """FID of uint8 M x H x W x 3 `samples` against the reference set `ref`, and their IS.

    `ref_resize`: how an `.npz` reference of another image size reaches the network (`REF_RESIZE`).
    """
    size = int(samples.shape[1])
    ref_stats = reference_statistics(ref, model, size=size, cache_dir=cache_dir, batch_size=batch_size,
                                     progress=progress, ref_resize=ref_resize)
    pool, logits = inception_outputs(model, samples, batch_size=batch_size, progress=progress,
                                     desc="sample features")
    mu, sigma = feature_statistics(pool)
    if mu.shape != ref_stats.mu.shape:
        raise UsageError(f"reference statistics have {ref_stats.mu.shape[0]} dimensions, the Inception "
                         f"features {mu.shape[0]}: the .npz statistics come from another network")
    fid = frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma, factor1=covariance_factor(pool))
    is_mean, is_std = inception_score(logits, splits)
    return FidIsResult(fid, is_mean, is_std, len(pool), ref_stats.count, model.weights_source,
                       ref_stats.cache_path, ref_stats.preprocessing)




# ----------------------------------------------------------------------------- sample files


@dataclass
class SampleFile:
    """What a sampling script's `.npz` holds for scoring: N x K x H x W x 3 samples, the N x D
    representations they were drawn from (None when the file has none), and its scalar fields."""

    samples: np.ndarray
    features: np.ndarray | None
    meta: dict[str, Any]

    @property
    def num_conditions(self) -> int:
        return int(self.samples.shape[0])


def read_sample_file(path: str | Path) -> SampleFile:
    """Read an `.npz` written by `image_sample.py` (or the interpolation / manipulation scripts).

    `samples` has the leading shape of `features` without its last dimension, optionally followed
    by K samples per representation: image_sample's N x K x H x W x 3 with N x D features, the
    interpolation's M x P x H x W x 3 with M x P x D (one sample each). Leading dimensions are
    flattened into N conditions. Files with only `arr_0` (the original's) have no features.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such sample file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from None
    try:
        with data:
            if not data.files:
                raise UsageError(f"{path} is an empty .npz: it holds no arrays (expected 'samples' and 'features')")
            samples = images_from_npz(path)  # validates dtype and layout
            raw = data["samples"] if "samples" in data.files else data["arr_0"] if "arr_0" in data.files else None
            features = data["features"] if "features" in data.files else None
            meta = {k: data[k].item() for k in data.files if data[k].ndim == 0}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, UsageError):
            raise
        # a truncated member, or an object array (never unpickled: allow_pickle=False)
        raise UsageError(f"{path} is not a readable sample file ({type(err).__name__}: {err})") from None
    if samples.size == 0:
        raise UsageError(f"{path} holds no samples (shape {tuple(samples.shape)}): sample again")
    if features is not None and (features.size == 0 or not np.issubdtype(features.dtype, np.floating)
                                 or not np.isfinite(features).all()):
        raise UsageError(f"{path}: its 'features' (shape {tuple(features.shape)}, {features.dtype}) are empty, "
                         "not numbers, or not finite: sample again")
    if features is None or raw is None:
        return SampleFile(samples.reshape(-1, 1, *samples.shape[-3:]), None, meta)
    lead = features.shape[:-1]
    if raw.shape[: len(lead)] != lead or raw.ndim not in (len(lead) + 3, len(lead) + 4):
        raise UsageError(
            f"{path}: samples of shape {raw.shape} do not match features of shape {features.shape} "
            "(expected samples N x K x H x W x 3 for features N x D)"
        )
    n = int(np.prod(lead))
    samples = raw.reshape(n, -1, *raw.shape[-3:])
    return SampleFile(samples, features.reshape(n, features.shape[-1]).astype(np.float32), meta)
