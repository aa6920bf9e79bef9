"""`RCDM`: one module that holds the frozen encoder, the UNet and the diffusion, and samples.

From Python, build it with plain keyword arguments:
`RCDM.from_checkpoint("run/ema_0.9999_010000.pt", sampler="dpm++", steps=20)` or
`RCDM.from_pretrained("dino", use_head=True)` (the published checkpoint, through the hub cache or
`RCDM_MIRROR`). `RCDM(args)` keeps taking the original's flags (an argparse namespace, a dict or
keyword arguments) and maps them onto the same path. `rcdm(images, num_samples)` returns
`num_samples` samples for each image (paths, PIL images or tensors), each conditioned on that
image's own representation, computed once for the whole batch. `sample_shared_noise` draws the
samples of several representations from the same noise, so that only the representation differs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import representation_ops as ops
from .encoders import Images, check_paths_exist, encode_images
from .image_datasets import find_images
from .loading import Components, UsageError, load_components
from .precision import prepare_model
from .samplers import SAMPLERS, respace_for_sampler, sample_images
from .script_util import model_and_diffusion_defaults

ImageInput = Images

# The sampling settings and their defaults, under the original's flag names (`RCDM(args)`).
SAMPLING_SETTINGS: dict[str, Any] = dict(
    model_path="",
    type_model="dino",
    use_head=False,
    pretrained_encoder=True,
    encoder_normalize=None,
    encoder_pooling=None,
    encoder_input_size=None,
    encoder_weights=None,
    device="",
    precision="",
    tf32=False,
    channels_last=False,
    compile=False,
    sampler=None,
    use_ddim=False,
    steps=None,
    eta=0.0,
    guidance_scale=1.0,
    clip_denoised=True,
    progress=True,
    seed=0,
    G_shared=False,
)


def _flag_defaults() -> dict[str, Any]:
    return {**model_and_diffusion_defaults(), **SAMPLING_SETTINGS}


def explicit_settings(args: argparse.Namespace | Mapping | None = None,
                      **overrides) -> tuple[dict[str, Any], frozenset[str]]:
    """All settings (given ones over the defaults) and the names the caller gave.

    Given: `args.explicit` when the namespace records it (the scripts' parser does), else the
    values that differ from the default (one equal to the default cannot be told apart, and then
    the checkpoint's recorded value is the better choice anyway).
    """
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    given.update(overrides)
    explicit = given.pop("explicit", None)
    defaults = _flag_defaults()
    if explicit is None:
        explicit = {k for k, v in given.items() if k not in defaults or defaults[k] != v}
    return {**defaults, **given}, frozenset(explicit)


def component_kwargs(settings: Mapping[str, Any], explicit: frozenset[str] | set[str]) -> dict[str, Any]:
    """`loading.load_components` keyword arguments from flag-named settings: the encoder fields
    only when given (else the checkpoint's), the model flags given plus the sampling-time ones."""
    model_keys = model_and_diffusion_defaults()

    def chosen(name: str) -> Any:
        return settings[name] if name in explicit else None

    return dict(
        model_path=settings["model_path"],
        type_model=chosen("type_model") or (None if settings["model_path"] else settings["type_model"]),
        use_head=chosen("use_head") if settings["model_path"] else bool(settings["use_head"]),
        encoder_normalize=chosen("encoder_normalize"),
        pretrained_encoder=chosen("pretrained_encoder"),
        encoder_pooling=chosen("encoder_pooling"),
        encoder_input_size=chosen("encoder_input_size"),
        encoder_weights=chosen("encoder_weights") if "encoder_weights" in settings else None,
        device=settings["device"] or None,
        precision=settings["precision"] or None,
        tf32=bool(settings["tf32"]),
        model_flags={k: settings[k] for k in model_keys
                     if k in explicit or k in ("timestep_respacing", "use_fp16", "use_checkpoint")},
        G_shared=bool(settings["G_shared"]),
    )


class RCDM(nn.Module):
    """Representation-conditioned diffusion model, ready to sample.

    Attributes keep the original's names: `ssl_model` (frozen encoder), `rcdm_model` (UNet),
    `diffusion`, `ssl_dim`, `args` (the sampling settings, as a namespace).
    """

    def __init__(self, args: argparse.Namespace | Mapping | None = None, **overrides):
        """The original's constructor: the sampling scripts' flags, as a namespace, dict or keywords."""
        super().__init__()
        settings, explicit = explicit_settings(args, **overrides)
        parts = load_components(**component_kwargs(settings, explicit))
        sampler = settings["sampler"] or ("ddim" if settings["use_ddim"] else "ddpm")
        self._setup(parts, argparse.Namespace(**{**settings, "sampler": sampler, "explicit": explicit}))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        precision: str | None = None,
        sampler: str = "ddpm",
        steps: int | None = None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        clip_denoised: bool = True,
        timestep_respacing: str = "",
        type_model: str | None = None,
        use_head: bool | None = None,
        encoder_normalize: str | None = None,
        pretrained_encoder: bool | None = None,
        encoder_pooling: str | None = None,
        encoder_input_size: int | None = None,
        encoder_weights: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        progress: bool = True,
        model_flags: Mapping[str, Any] | None = None,
    ) -> "RCDM":
        """An RCDM from a checkpoint file (the project's own, a published-style state dict or
        `.safetensors`).

        The architecture and the encoder come from the checkpoint's record; `type_model`,
        `use_head`, `encoder_normalize`, `pretrained_encoder`, `encoder_pooling` ("cls" or
        "mean_patch" for a Vision Transformer), `encoder_input_size` and `encoder_weights` (a timm or
        OpenCLIP weights file) override the encoder, and
        `model_flags` gives the architecture of a checkpoint that records none.
        `sampler` is ddpm, ddim or dpm++; `steps` its number of model calls (default: every step
        of the diffusion, or of `timestep_respacing`); `precision` fp32, bf16, fp16 or auto (default
        fp32); `device` cpu, cuda, cuda:N (default: a GPU if there is one).
        """
        if not str(path):
            raise UsageError("RCDM.from_checkpoint needs a checkpoint path; for a published model use "
                             "RCDM.from_pretrained(type_model, use_head=...)")
        return cls._from_keywords(
            str(path), type_model=type_model, use_head=use_head, encoder_normalize=encoder_normalize,
            pretrained_encoder=pretrained_encoder, encoder_pooling=encoder_pooling,
            encoder_input_size=encoder_input_size, encoder_weights=encoder_weights, model_flags=model_flags,
            timestep_respacing=timestep_respacing, device=device, precision=precision, sampler=sampler,
            steps=steps, guidance_scale=guidance_scale, eta=eta, clip_denoised=clip_denoised,
            channels_last=channels_last, compile=compile, progress=progress,
        )

    @classmethod
    def from_pretrained(cls, type_model: str = "dino", *, use_head: bool = False,
                        pretrained_encoder: bool = True, **kwargs) -> "RCDM":
        """A published 128x128 RCDM (dino, simclr, barlow, vicreg or supervised; trunk, or head
        with `use_head`), downloaded once into the torch hub cache (or taken from `RCDM_MIRROR`).

        Other keyword arguments are `from_checkpoint`'s (`device`, `precision`, `sampler`, `steps`,
        `guidance_scale`, ...); `pretrained_encoder=False` gives the encoder random weights.
        """
        return cls._from_keywords("", type_model=type_model, use_head=use_head,
                                  pretrained_encoder=pretrained_encoder, **kwargs)

    @classmethod
    def _from_keywords(cls, model_path: str, *, type_model, use_head, encoder_normalize=None,
                       pretrained_encoder=None, encoder_pooling=None, encoder_input_size=None,
                       encoder_weights=None, model_flags=None, timestep_respacing: str = "", device=None, precision=None, sampler: str = "ddpm", steps=None,
                       guidance_scale: float = 1.0, eta: float = 0.0, clip_denoised: bool = True,
                       channels_last: bool = False, compile: bool = False, progress: bool = True) -> "RCDM":
        flags = {**(model_flags or {}), "timestep_respacing": timestep_respacing}
        parts = load_components(model_path, type_model=type_model, use_head=use_head,
                                encoder_normalize=encoder_normalize, pretrained_encoder=pretrained_encoder,
                                encoder_pooling=encoder_pooling, encoder_input_size=encoder_input_size,
                                encoder_weights=encoder_weights, device=device, precision=precision, model_flags=flags)
        settings = {
            **SAMPLING_SETTINGS, **flags, "model_path": model_path, "type_model": parts.encoder_info["type_model"],
            "use_head": parts.encoder_info["use_head"], "device": str(parts.device), "precision": precision or "",
            "sampler": sampler, "use_ddim": sampler == "ddim", "steps": steps, "eta": eta,
            "guidance_scale": guidance_scale, "clip_denoised": clip_denoised, "channels_last": channels_last,
            "compile": compile, "progress": progress,
        }
        rcdm = cls.__new__(cls)
        nn.Module.__init__(rcdm)
        rcdm._setup(parts, argparse.Namespace(**settings, explicit=frozenset(settings)))
        return rcdm

    def _setup(self, parts: Components, args: argparse.Namespace) -> None:
        self.args = args
        self.ssl_model = parts.encoder
        self.rcdm_model = parts.model
        self.diffusion = parts.diffusion
        self.precision = parts.precision
        self.model_flags = parts.model_flags
        self.encoder_spec = parts.encoder_spec
        self.encoder_info = parts.encoder_info  # its record, as a dict
        self.meta = parts.meta
        self.ssl_dim = parts.ssl_dim
        self.image_size = int(parts.model_flags["image_size"])
        self.sampler = args.sampler
        self._runner: tuple[torch.device, nn.Module] | None = None
        self._check_sampling()

    def _check_sampling(self) -> None:
        args = self.args
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if args.steps is not None and int(args.steps) < 1:
            raise UsageError(f"--steps must be at least 1, got {args.steps}")
        if args.steps is not None:  # steps the diffusion cannot give fail now, not after the first writes
            respace_for_sampler(self.diffusion, self.sampler, int(args.steps))
        if float(args.guidance_scale) != 1.0 and not getattr(self.rcdm_model, "supports_guidance", False):
            raise UsageError(
                f"--guidance_scale {args.guidance_scale} needs a model trained with --feat_drop_prob > 0 "
                "(it learns the null representation guidance contrasts with); this checkpoint was not: "
                "leave --guidance_scale at 1"
            )

    def configure_sampling(self, *, sampler: str | None = None, steps: int | None = None,
                           guidance_scale: float | None = None, eta: float | None = None) -> "RCDM":
        """Change how the next samples are drawn, the loaded model and encoder kept: `sampler`
        (ddpm, ddim, dpm++), `steps` (model calls), `guidance_scale`, `eta`; None keeps the current
        value. Checked as at construction (a mistake raises `UsageError` and changes nothing).
        Returns the module itself."""
        before = (self.sampler, self.args.use_ddim, self.args.steps, self.args.guidance_scale, self.args.eta)
        if sampler is not None:
            self.sampler = self.args.sampler = sampler
            self.args.use_ddim = sampler == "ddim"
        if steps is not None:
            self.args.steps = int(steps)
        if guidance_scale is not None:
            self.args.guidance_scale = float(guidance_scale)
        if eta is not None:
            self.args.eta = float(eta)
        try:
            self._check_sampling()
        except Exception:
            self.sampler, self.args.use_ddim, self.args.steps, self.args.guidance_scale, self.args.eta = before
            self.args.sampler = self.sampler
            raise
        return self

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
        show = self.args.progress if progress is None else progress
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
                f"--n_neighbors {n_neighbors}: only {neighbor_feats.shape[0]} neighbour images to "
                "choose from; add images to --folder_nn_path or lower --n_neighbors"
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
