"""`RCDM`: one module that holds the frozen encoder, the UNet and the diffusion, and samples.

From Python, build it with plain keyword arguments:
`RCDM.from_checkpoint("run/ema_0.9999_010000.pt", sampler="dpm++", steps=20)` or
`RCDM.from_pretrained("dino", use_head=True)` (the published checkpoint, through the hub cache or
`RCDM_MIRROR`); both build `RCDM(components, sampling)`: the loaded parts (`loading.Components`) and
how to sample (`SamplingConfig`). `RCDM(args)` keeps taking the original's flags (an argparse
namespace, a dict or keyword arguments): `from_flags` maps them onto the same path.
`rcdm(images, num_samples)` returns `num_samples` samples for each image (paths, PIL images or
tensors), each conditioned on that image's own representation, computed once for the whole batch.
`sample_shared_noise` draws the samples of several representations from the same noise, so that
only the representation differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import representation_ops as ops
from .config import SamplingConfig
from .encoders import Images, check_paths_exist, encode_images
from .image_datasets import find_images
from .loading import ENCODER_KEYWORDS, SAMPLING_TIME_FLAGS, Components, UsageError, load_components
from .precision import prepare_model
from .samplers import SAMPLERS, respace_for_sampler, sample_images
from .script_util import model_and_diffusion_defaults

ImageInput = Images

# The original's sampling flags that are not `SamplingConfig` fields, with their defaults.
_FLAG_DEFAULTS: dict[str, Any] = dict(
    model_path="", type_model="dino", use_head=False, pretrained_encoder=True, encoder_normalize=None,
    encoder_pooling=None, encoder_input_size=None, encoder_weights=None, use_ddim=False, G_shared=False,
    sampler=None, device="", precision="",
)


def from_flags(args: argparse.Namespace | Mapping | None = None,
               **overrides) -> tuple[Components, SamplingConfig]:
    """The original's `RCDM(args)`: its sampling flags (an argparse namespace, a dict or keywords;
    model flags included) -> `(Components, SamplingConfig)`.

    Which flags count as given: `args.explicit` when the namespace records it (the commands' parser
    does), else those whose value differs from the default (one equal to the default cannot be told
    apart, and then the checkpoint's recorded value is the better choice anyway). The encoder flags
    count only when given (else the checkpoint's record decides); the model flags likewise, but
    for the sampling-time ones (`loading.SAMPLING_TIME_FLAGS`).
    """
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    given.update(overrides)
    explicit = given.pop("explicit", None)
    model_defaults = model_and_diffusion_defaults()
    sampling_fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    defaults = {**model_defaults, **{k: getattr(SamplingConfig, k) for k in sampling_fields}, **_FLAG_DEFAULTS}
    if explicit is None:
        explicit = {k for k, v in given.items() if k not in defaults or defaults[k] != v}
    settings = {**defaults, **given}
    path = settings["model_path"]
    encoder = {k: settings[k] if k in explicit else None for k in ENCODER_KEYWORDS}
    if not path:  # the published checkpoint of the named encoder
        encoder["type_model"] = encoder["type_model"] or settings["type_model"]
        encoder["use_head"] = bool(settings["use_head"])
    sampling = SamplingConfig(**{k: settings[k] for k in sampling_fields if k not in ("sampler", "device", "precision")},
                              sampler=settings["sampler"] or ("ddim" if settings["use_ddim"] else "ddpm"),
                              device=settings["device"] or None, precision=settings["precision"] or None)
    parts = load_components(
        path, **encoder, device=sampling.device, precision=sampling.precision, tf32=sampling.tf32,
        model_flags={k: settings[k] for k in model_defaults
                     if k in explicit or k in SAMPLING_TIME_FLAGS},
        G_shared=bool(settings["G_shared"]),
    )
    return parts, sampling


class RCDM(nn.Module):
    """Representation-conditioned diffusion model, ready to sample.

    `RCDM(components, sampling)`: the loaded parts and a `SamplingConfig` (default: DDPM over every
    step). Attributes keep the original's names: `ssl_model` (frozen encoder), `rcdm_model` (UNet),
    `diffusion`, `ssl_dim`; `sampling` is how the next samples are drawn (`configure_sampling`
    changes it), `model_flags` the UNet's settings, `encoder_spec` the encoder.
    """

    def __init__(self, components: Components | argparse.Namespace | Mapping | None = None,
                 sampling: SamplingConfig | None = None, **overrides):
        """`RCDM(components, sampling)`; or the original's `RCDM(args)`: its sampling flags as a
        namespace, a dict or keywords (`from_flags`)."""
        super().__init__()
        if not isinstance(components, Components):
            if sampling is not None:
                raise TypeError("RCDM(args) takes the original's flags; RCDM(components, sampling) the loaded parts")
            components, sampling = from_flags(components, **overrides)
        elif overrides:
            raise TypeError(f"RCDM(components, sampling) takes no other arguments: {', '.join(overrides)}")
        self._setup(components, sampling or SamplingConfig())

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, model_flags: Mapping[str, Any] | None = None,
                        timestep_respacing: str = "", sampling: SamplingConfig | None = None,
                        **keywords: Any) -> "RCDM":
        """An RCDM from a checkpoint file (the project's own, a published-style state dict or
        `.safetensors`).

        The architecture and the encoder come from the checkpoint's record. Keywords:
        - how to sample, `SamplingConfig`'s fields: `sampler` (ddpm, ddim, dpm++), `steps` (model
          calls; default every step of the diffusion, or of `timestep_respacing`), `eta`,
          `guidance_scale`, `clip_denoised`, `device` (cpu, cuda, cuda:N; default a GPU if there is
          one), `precision` (fp32, bf16, fp16, auto; default fp32), `tf32`, `channels_last`,
          `compile`, `progress`; or a whole `sampling` config, the keywords on top of it;
        - the encoder, over the checkpoint's record (`loading.ENCODER_KEYWORDS`): `type_model`,
          `use_head`, `encoder_normalize`, `pretrained_encoder`, `encoder_pooling` ("cls" or
          "mean_patch" for a Vision Transformer), `encoder_input_size`, `encoder_weights` (a timm or
          OpenCLIP weights file);
        - `model_flags`: the architecture of a checkpoint that records none.
        """
        if not str(path):
            raise UsageError("RCDM.from_checkpoint needs a checkpoint path; for a published model use "
                             "RCDM.from_pretrained(type_model, use_head=...)")
        return cls._load(str(path), model_flags, timestep_respacing, sampling, keywords)

    @classmethod
    def from_pretrained(cls, type_model: str = "dino", *, use_head: bool = False,
                        pretrained_encoder: bool = True, **keywords: Any) -> "RCDM":
        """A published 128x128 RCDM (dino, simclr, barlow, vicreg or supervised; trunk, or head
        with `use_head`), downloaded once into the torch hub cache (or taken from `RCDM_MIRROR`).

        Other keywords are `from_checkpoint`'s (`device`, `precision`, `sampler`, `steps`,
        `guidance_scale`, ...); `pretrained_encoder=False` gives the encoder random weights.
        """
        keywords.update(type_model=type_model, use_head=use_head, pretrained_encoder=pretrained_encoder)
        return cls._load("", keywords.pop("model_flags", None), keywords.pop("timestep_respacing", ""),
                         keywords.pop("sampling", None), keywords)

    @classmethod
    def _load(cls, path: str, model_flags, timestep_respacing: str, sampling: SamplingConfig | None,
              keywords: dict) -> "RCDM":
        encoder = {k: keywords.pop(k) for k in ENCODER_KEYWORDS if k in keywords}
        sampling = (sampling or SamplingConfig()).replace(**keywords)  # an unknown keyword: TypeError
        parts = load_components(path, **encoder, device=sampling.device, precision=sampling.precision,
                                tf32=sampling.tf32,
                                model_flags={**(model_flags or {}), "timestep_respacing": timestep_respacing})
        return cls(parts, sampling)

    def _setup(self, parts: Components, sampling: SamplingConfig) -> None:
        self.ssl_model = parts.encoder
        self.rcdm_model = parts.model
        self.diffusion = parts.diffusion
        self.precision = parts.precision
        self.model_flags = parts.model_flags
        self.model_path = parts.model_path
        self.encoder_spec = parts.encoder_spec
        self.encoder_info = parts.encoder_info  # its record, as a dict
        self.meta = parts.meta
        self.ssl_dim = parts.ssl_dim
        self.image_size = int(parts.model_flags["image_size"])
        self._runner: tuple[torch.device, nn.Module] | None = None
        self._check_sampling(sampling)
        self.sampling = sampling

    @property
    def sampler(self) -> str:
        return self.sampling.sampler

    @property
    def args(self) -> argparse.Namespace:
        """The original's view of the settings, under its flag names (read-only: a copy)."""
        return argparse.Namespace(**self.model_flags, **dataclasses.asdict(self.sampling), model_path=self.model_path,
                                  use_ddim=self.sampler == "ddim", type_model=self.encoder_spec.name,
                                  use_head=self.encoder_spec.use_head)

    def _check_sampling(self, sampling: SamplingConfig) -> None:
        if sampling.sampler not in SAMPLERS:
            raise UsageError(f"`sampler` {sampling.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if sampling.steps is not None and int(sampling.steps) < 1:
            raise UsageError(f"`steps` must be at least 1, got {sampling.steps}")
        if sampling.steps is not None:  # steps the diffusion cannot give fail now, not after the first writes
            respace_for_sampler(self.diffusion, sampling.sampler, int(sampling.steps))
        if float(sampling.guidance_scale) != 1.0 and not getattr(self.rcdm_model, "supports_guidance", False):
            raise UsageError(
                f"`guidance_scale` {sampling.guidance_scale} needs a model trained with `feat_drop_prob` > 0 "
                "(it learns the null representation guidance contrasts with); this checkpoint was not: "
                "leave `guidance_scale` at 1"
            )

    def configure_sampling(self, *, sampler: str | None = None, steps: int | None = None,
                           guidance_scale: float | None = None, eta: float | None = None) -> "RCDM":
        """Change how the next samples are drawn, the loaded model and encoder kept: `sampler`
        (ddpm, ddim, dpm++), `steps` (model calls), `guidance_scale`, `eta`; None keeps the current
        value. Checked as at construction (a mistake raises `UsageError` and changes nothing).
        Returns the module itself."""
        changes = dict(sampler=sampler, steps=None if steps is None else int(steps),
                       guidance_scale=None if guidance_scale is None else float(guidance_scale),
                       eta=None if eta is None else float(eta))
        sampling = self.sampling.replace(**{k: v for k, v in changes.items() if v is not None})
        self._check_sampling(sampling)
        self.sampling = sampling
        return self

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return next(self.rcdm_model.parameters()).device

    def _model_for_sampling(self) -> nn.Module:
        # Rebuilt when the module moved device, since autocast is bound to a device type.
        device = self.device
        if self._runner is None or self._runner[0] != device:
            runner = prepare_model(
                self.rcdm_model,
                # auto: the measured kernel choices too (the precision is the one already chosen)
                precision="auto" if self.sampling.precision == "auto" else self.precision,
                device=device,
                channels_last=bool(self.sampling.channels_last),
                compile=bool(self.sampling.compile),
                freeze=True,  # the weights are fixed while sampling
            )
            # A plain tuple attribute: the wrapper must not register the UNet a second time.
            self._runner = (device, runner)
        return self._runner[1]

    @torch.no_grad()
    def encode(self, images: ImageInput, batch_size: int = 32) -> torch.Tensor:
        """B x ssl_dim representations (float32, on the module's device; the encoder runs in fp32
        so they are exact) of images given as a path, a PIL image, a list of those, or a tensor
        (3xHxW or Bx3xHxW in [-1, 1], resized to the encoder's input size when another size).

        Every image is needed here, so one that cannot be read is an error naming it.
        """
        check_paths_exist(images)
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError("no images given")
        return encode_images(self.ssl_model, images, batch_size=batch_size, device=self.device,
                             out_device=self.device, skip_unreadable=False).features

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
            sampler=self.sampling.sampler,
            steps=self.sampling.steps,
            model_kwargs={"feat": feat},
            noise=noise,
            clip_denoised=bool(self.sampling.clip_denoised),
            eta=float(self.sampling.eta),
            guidance_scale=float(self.sampling.guidance_scale),
            device=self.device,
            progress=self.sampling.progress if progress is None else progress,
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

        `batch` is an image path, a PIL image, a list of those, or a Bx3xHxW tensor in [-1, 1].
        """
        feats = self.encode(batch)
        samples = [self.sample(f.unsqueeze(0).expand(num_samples, -1)) for f in feats]
        return torch.cat(samples, dim=0)

    # ------------------------------------------------------------------ visualisations

    @torch.no_grad()
    def encode_files(self, paths: Sequence[str], batch_size: int = 32,
                     progress: bool | None = None) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        """Representations of image files: `(N x D features, paths kept, [(path, reason) skipped])`.

        Files that cannot be decoded are skipped with a line naming each (and returned), so one
        bad file in a folder of neighbours does not stop the run.
        """
        paths = [str(p) for p in paths]
        show = self.sampling.progress if progress is None else progress
        done = encode_images(self.ssl_model, paths, batch_size=batch_size, device=self.device,
                             out_device=self.device, progress=show, desc="encoding")
        skipped = [(paths[i], reason) for i, reason in sorted(done.skipped.items())]
        return done.features, [paths[i] for i in done.kept], skipped

    def features(self, x: ImageInput) -> torch.Tensor:
        """Representations (N x D, float32) of `x`: taken as they are when `x` is a 1-d or 2-d
        tensor of width D, else encoded as images (paths, PIL images or image tensors)."""
        if isinstance(x, torch.Tensor) and x.ndim <= 2:
            if x.shape[-1] != self.ssl_dim:
                raise ValueError(f"expected {self.ssl_dim}-d representations, got shape {list(x.shape)}")
            return x.reshape(-1, self.ssl_dim).to(self.device, torch.float32)
        return self.encode(x)

    def neighbor_features(self, x: ImageInput | str) -> torch.Tensor:
        """`features(x)`, where `x` may also be a folder of images (read recursively; unreadable
        files are skipped with a warning)."""
        if isinstance(x, (str, Path)) and os.path.isdir(x):
            return self.encode_files(find_images(str(x), flag="neighbour folder"))[0]
        if isinstance(x, (list, tuple)) and x and all(isinstance(p, (str, Path)) for p in x):
            return self.encode_files([str(p) for p in x])[0]
        return self.features(x)

    @torch.no_grad()
    def representation_distance(self, samples: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """Squared L2 distance between each sample's representation and `feat` (N x D or D):
        how far the encoder puts the sample from the representation it was drawn from."""
        got = self.encode(samples)
        return ((got - feat.to(self.device).reshape(-1, self.ssl_dim)) ** 2).sum(dim=1)

    @torch.no_grad()
    def interpolate(self, feat_a: torch.Tensor | ImageInput, feat_b: torch.Tensor | ImageInput,
                    num_points: int = 8, methods: Sequence[str] = ops.INTERPOLATIONS,
                    num_samples: int = 1, progress: bool | None = None) -> dict[str, torch.Tensor | list]:
        """Samples along the path from representation `feat_a` (alpha 0) to `feat_b` (alpha 1).

        `feat_a`/`feat_b` are representations (D or 1 x D) or one image each (path, PIL image,
        image tensor), encoded first.
        Every sample, of every method and point, comes from the same noise, so only the
        representation changes along a row. Returns `samples` (M x num_points x num_samples x 3 x S
        x S), `features` (M x num_points x D), `alphas` and `methods`.
        """
        feat_a, feat_b = self.features(feat_a)[0], self.features(feat_b)[0]
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
    def manipulate(self, feat_source: torch.Tensor | ImageInput, feat_target: torch.Tensor | ImageInput,
                   neighbor_feats: torch.Tensor | ImageInput | str, n_neighbors: int = 20, n_common: int = 14,
                   num_samples: int = 8, backend: str = "auto",
                   progress: bool | None = None) -> dict[str, torch.Tensor]:
        """The paper's manipulation: the dimensions shared by the source's neighbourhood, zeroed
        and replaced by the target's values.

        Source and target are representations or one image each (path, PIL image, image tensor);
        `neighbor_feats` is N x D representations, images, or a folder of images.
        The `n_neighbors` nearest rows of `neighbor_feats` to `feat_source` (cosine) are the
        neighbourhood; a dimension is shared when it is non-zero in more than `n_common` of them.
        Samples from the original, zeroed and transplanted representations share their noise.
        Returns `samples` (3 x num_samples x 3 x S x S), `features` (3 x D: original, zeroed,
        transplanted), `dims`, `counts` (per dimension), `neighbors` and `distances` (indices into
        `neighbor_feats` and squared L2 distances of the unit vectors).
        """
        neighbor_feats = self.neighbor_features(neighbor_feats)
        if neighbor_feats.shape[0] < n_neighbors:
            raise UsageError(
                f"`n_neighbors` {n_neighbors}: only {neighbor_feats.shape[0]} neighbour images to "
                "choose from; add images to `neighbor_feats` or lower `n_neighbors`"
            )
        source = self.features(feat_source)[:1]
        target = self.features(feat_target)[:1]
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
