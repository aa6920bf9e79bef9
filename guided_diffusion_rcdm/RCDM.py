"""`RCDM`: one module that holds the frozen encoder, the UNet and the diffusion, and samples.

`RCDM(args)` takes the sampling scripts' flags (an argparse namespace, the original's included, or
keyword arguments) and builds everything `sample_util.load_components` builds: the checkpoint of
`--model_path`, or the published one for `--type_model`/`--use_head`. `rcdm(images, num_samples)`
returns `num_samples` samples for each image of a batch (or for an image path), each conditioned
on that image's own representation, computed once for the whole batch (the original recomputed the
batch's features inside its per-image loop). `sample_shared_noise` draws the samples of several
representations from the same noise, so that only the representation differs between them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import representation_ops as ops
from .image_datasets import ENCODER_IMAGE_SIZE, encoder_input, load_rgb_image, normalize_for_encoder
from .precision import prepare_model
from .sample_util import UsageError, complete_args, load_components, sampler_name
from .samplers import sample_images

ImageInput = str | Path | Sequence[str | Path] | torch.Tensor


class RCDM(nn.Module):
    """Representation-conditioned diffusion model, ready to sample.

    Attributes keep the original's names: `ssl_model` (frozen encoder), `rcdm_model` (UNet),
    `diffusion`, `ssl_dim`, `args`.
    """

    def __init__(self, args: argparse.Namespace | dict | None = None, **overrides):
        super().__init__()
        self.args = complete_args(args, **overrides)
        parts = load_components(self.args)
        self.ssl_model = parts.encoder
        self.rcdm_model = parts.model
        self.diffusion = parts.diffusion
        self.precision = parts.precision
        self.model_flags = parts.model_flags
        self.encoder_info = parts.encoder_info
        self.meta = parts.meta
        self.ssl_dim = parts.ssl_dim
        self.image_size = int(parts.model_flags["image_size"])
        self.sampler = sampler_name(self.args)
        self._runner: tuple[torch.device, nn.Module] | None = None
        if float(self.args.guidance_scale) != 1.0 and not getattr(self.rcdm_model, "supports_guidance", False):
            raise UsageError(
                f"--guidance_scale {self.args.guidance_scale} needs a model trained with --feat_drop_prob > 0 "
                "(it learns the null representation guidance contrasts with); this checkpoint was not: "
                "leave --guidance_scale at 1"
            )

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return next(self.rcdm_model.parameters()).device

    def sample_fn(self, model, shape, **kwargs) -> torch.Tensor:
        """The original's `sample_fn(model, shape, ...)`: the diffusion's DDPM or DDIM loop."""
        loop = self.diffusion.ddim_sample_loop if self.sampler == "ddim" else self.diffusion.p_sample_loop
        return loop(model, shape, **kwargs)

    def _model_for_sampling(self) -> nn.Module:
        # Rebuilt when the module moved device, since autocast is bound to a device type.
        device = self.device
        if self._runner is None or self._runner[0] != device:
            runner = prepare_model(
                self.rcdm_model,
                # auto: the measured kernel choices too (the precision is the one already chosen)
                precision="auto" if self.args.precision == "auto" else self.precision,
                device=device,
                channels_last=bool(self.args.channels_last),
                compile=bool(self.args.compile),
                freeze=True,  # the weights are fixed while sampling
            )
            # A plain tuple attribute: the wrapper must not register the UNet a second time.
            self._runner = (device, runner)
        return self._runner[1]

    def encoder_view(self, images: ImageInput) -> torch.Tensor:
        """The encoder's input for an image path, a list of paths, or an image tensor.

        Tensors are 3xHxW or Bx3xHxW in [-1, 1] (after the encoder's normalisation); other sizes
        than 224x224 are resized, since the encoder was trained on 224x224 crops.
        """
        normalize = self.encoder_info["normalize"]
        if isinstance(images, (str, Path)):
            if not os.path.exists(images) and "://" not in str(images):
                raise FileNotFoundError(f"no such image file: {images}")
            batch = encoder_input(images, normalize=normalize).unsqueeze(0)
        elif isinstance(images, torch.Tensor):
            batch = images.unsqueeze(0) if images.ndim == 3 else images
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise ValueError(f"expected images as Bx3xHxW, got {list(images.shape)}")
            if batch.shape[-2:] != (ENCODER_IMAGE_SIZE, ENCODER_IMAGE_SIZE):
                batch = F.interpolate(batch.float(), size=(ENCODER_IMAGE_SIZE, ENCODER_IMAGE_SIZE),
                                      mode="bilinear", antialias=True, align_corners=False)
        else:
            batch = torch.stack([encoder_input(p, normalize=normalize) for p in images])
        return batch.to(self.device, torch.float32)

    @torch.no_grad()
    def encode(self, images: ImageInput) -> torch.Tensor:
        """B x ssl_dim representations (float32; the encoder runs in fp32 so they are exact)."""
        return self.ssl_model(self.encoder_view(images)).float()

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, feat: torch.Tensor, noise: torch.Tensor | None = None,
               progress: bool | None = None, noise_fn=None) -> torch.Tensor:
        """One sample per row of `feat` (N x ssl_dim): N x 3 x S x S in [-1, 1].

        `noise` is the starting noise; `noise_fn(x)` draws the noise added at each step (DDPM,
        DDIM with eta > 0); both default to fresh standard normal noise.
        """
        feat = feat.to(self.device, torch.float32)
        shape = (feat.shape[0], 3, self.image_size, self.image_size)
        return sample_images(
            self._model_for_sampling(),
            self.diffusion,
            shape,
            sampler=self.sampler,
            steps=self.args.steps,
            model_kwargs={"feat": feat},
            noise=noise,
            clip_denoised=bool(self.args.clip_denoised),
            eta=float(self.args.eta),
            guidance_scale=float(self.args.guidance_scale),
            device=self.device,
            progress=self.args.progress if progress is None else progress,
            noise_fn=noise_fn,
        )

    @torch.no_grad()
    def sample_shared_noise(self, feats: torch.Tensor, num_samples: int = 1,
                            progress: bool | None = None) -> torch.Tensor:
        """`num_samples` samples for each of G representations (G x D), sample j of every
        representation drawn from the same noise: G x num_samples x 3 x S x S.

        Same noise means the same starting noise and, for samplers that add noise at every step
        (DDPM, DDIM with eta > 0), the same noise at every step. All G x num_samples samples run
        as one batch.
        """
        feats = feats.to(self.device, torch.float32)
        groups = feats.shape[0]
        shape = (num_samples, 3, self.image_size, self.image_size)
        noise = torch.randn(*shape, device=self.device)

        def shared_step_noise(x: torch.Tensor) -> torch.Tensor:
            return torch.randn(shape, device=x.device, dtype=x.dtype).repeat(groups, 1, 1, 1)

        flat = self.sample(feats.repeat_interleave(num_samples, dim=0), noise=noise.repeat(groups, 1, 1, 1),
                           progress=progress, noise_fn=shared_step_noise)
        return flat.view(groups, *shape)

    @torch.no_grad()
    def forward(self, batch: ImageInput, num_samples: int = 1) -> torch.Tensor:
        """`num_samples` samples per image, image by image: (B * num_samples) x 3 x S x S.

        `batch` is an image path, a list of paths, or a Bx3xHxW tensor in [-1, 1].
        """
        feats = self.encode(batch)
        samples = [self.sample(f.unsqueeze(0).expand(num_samples, -1)) for f in feats]
        return torch.cat(samples, dim=0)

    # ------------------------------------------------------------------ visualisations

    @torch.no_grad()
    def encode_files(self, paths: Sequence[str], batch_size: int = 32,
                     progress: bool | None = None) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        """Representations of image files: `(N x D features, paths kept, [(path, reason) skipped])`.

        Files that cannot be decoded are skipped with a warning naming them (and returned), so one
        bad file in a folder of neighbours does not stop the run.
        """
        import warnings

        from tqdm.auto import tqdm

        normalize = self.encoder_info["normalize"]
        feats, kept, skipped, pending = [], [], [], []

        def flush() -> None:
            if pending:
                feats.append(self.ssl_model(torch.stack([v for _, v in pending]).to(self.device)).float())
                kept.extend(p for p, _ in pending)
                pending.clear()

        show = self.args.progress if progress is None else progress
        for path in tqdm(paths, desc="encoding", unit="image", disable=not show):
            try:
                view = encoder_input(load_rgb_image(path), normalize=normalize)
            except OSError as err:
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                skipped.append((str(path), str(err)))
                continue
            pending.append((str(path), view))
            if len(pending) == batch_size:
                flush()
        flush()
        empty = torch.zeros(0, self.ssl_dim, device=self.device)
        return (torch.cat(feats) if feats else empty), kept, skipped

    @torch.no_grad()
    def representation_distance(self, samples: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """Squared L2 distance between each sample's representation and `feat` (N x D or D):
        how far the encoder puts the sample from the representation it was drawn from."""
        views = normalize_for_encoder(samples.to(self.device, torch.float32), self.encoder_info["normalize"])
        got = self.encode(views)
        return ((got - feat.to(self.device).reshape(-1, self.ssl_dim)) ** 2).sum(dim=1)

    @torch.no_grad()
    def interpolate(self, feat_a: torch.Tensor, feat_b: torch.Tensor, num_points: int,
                    methods: Sequence[str] = ops.INTERPOLATIONS, num_samples: int = 1,
                    progress: bool | None = None) -> dict[str, torch.Tensor | list]:
        """Samples along the path from representation `feat_a` (alpha 0) to `feat_b` (alpha 1).

        Every sample, of every method and point, comes from the same noise, so only the
        representation changes along a row. Returns `samples` (M x num_points x num_samples x 3 x S
        x S), `features` (M x num_points x D), `alphas` and `methods`.
        """
        paths = [ops.interpolation_path(feat_a, feat_b, num_points, m)[0] for m in methods]
        alphas = ops.interpolation_path(feat_a, feat_b, num_points, methods[0])[1]
        feats = torch.stack(paths)  # M x P x D
        flat = self.sample_shared_noise(feats.flatten(0, 1), num_samples, progress=progress)
        return {
            "samples": flat.view(len(methods), num_points, *flat.shape[1:]),
            "features": feats,
            "alphas": alphas,
            "methods": list(methods),
        }

    @torch.no_grad()
    def manipulate(self, feat_source: torch.Tensor, feat_target: torch.Tensor,
                   neighbor_feats: torch.Tensor, n_neighbors: int = 20, n_common: int = 14,
                   num_samples: int = 8, backend: str = "auto",
                   progress: bool | None = None) -> dict[str, torch.Tensor]:
        """The paper's manipulation: the dimensions shared by the source's neighbourhood, zeroed
        and replaced by the target's values.

        The `n_neighbors` nearest rows of `neighbor_feats` to `feat_source` (cosine) are the
        neighbourhood; a dimension is shared when it is non-zero in more than `n_common` of them.
        Samples from the original, zeroed and transplanted representations share their noise.
        Returns `samples` (3 x num_samples x 3 x S x S), `features` (3 x D: original, zeroed,
        transplanted), `dims`, `counts` (per dimension), `neighbors` and `distances` (indices into
        `neighbor_feats` and squared L2 distances of the unit vectors).
        """
        if neighbor_feats.shape[0] < n_neighbors:
            raise UsageError(
                f"--n_neighbors {n_neighbors}: only {neighbor_feats.shape[0]} neighbour images to "
                "choose from; add images to --folder_nn_path or lower --n_neighbors"
            )
        source = feat_source.reshape(1, -1).to(self.device, torch.float32)
        target = feat_target.reshape(1, -1).to(self.device, torch.float32)
        distances, neighbors = ops.nearest_neighbors(neighbor_feats, source, n_neighbors, backend=backend)
        hood = neighbor_feats[neighbors[0].to(neighbor_feats.device)]
        dims = ops.shared_dimensions(hood, n_common)
        counts = ops.dimension_counts(hood)
        feats = torch.cat([
            source,
            ops.zero_dimensions(source, dims),
            ops.transplant_dimensions(source, target, dims),
        ])
        samples = self.sample_shared_noise(feats, num_samples, progress=progress)
        return {
            "samples": samples,
            "features": feats,
            "dims": dims.cpu(),
            "counts": counts.cpu(),
            "neighbors": neighbors[0],
            "distances": distances[0],
        }
