"""Every command-line flag, declared once: its name, type, default, help and old aliases.

Each command builds its parser from these declarations (`add_flags(parser, "type_model",
"use_head", ...)`), so a flag has the same name, meaning and boolean convention everywhere.
A command may give a flag another default, a help text that says what it does there, or fewer
choices; the name, the type and the aliases are the declaration's. The model and diffusion flags are
declared in `script_util.MODEL_FLAGS` (read by the UNet factory and recorded in checkpoints too)
and added here from there.

Booleans: `--flag True/False` (also yes/no, 1/0: the original's convention) and a bare `--flag`
(meaning True) work for every boolean flag of every command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..foundations import TRAIN_ONLY_CHOICES
from ..metrics import FID_WEIGHTS_FILE, METRICS, REF_RESIZE
from ..precision import PRECISION_CHOICES
from ..representation_ops import INTERPOLATIONS
from ..resample import SCHEDULE_SAMPLERS
from ..samplers import SAMPLERS
from ..vit_encoders import POOLINGS as VIT_POOLINGS
from ..script_util import MODEL_FLAGS, NON_NEGATIVE, POSITIVE, Range, str2bool


@dataclass(frozen=True)
class Flag:
    """One flag: `--name`, parsed with `type` (`bool`: the boolean convention), and its old names
    (`aliases`), which still parse but are not shown by --help. A numeric flag states its `range`
    (`script_util.Range`): the parser refuses a value outside it, NaN included, before any work,
    and --help shows it."""

    name: str
    default: Any = None
    type: Callable[[str], Any] | None = str
    help: str = ""
    choices: Sequence[Any] | None = None
    aliases: tuple[str, ...] = ()
    range: Range | None = None

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
               default: Any = ..., help: str | None = None, choices: Sequence[Any] | None = None) -> None:
        kwargs: dict[str, Any] = dict(default=self.default if default is ... else default,
                                      help=self.help if help is None else help)
        if self.type is bool:
            # `--flag`, `--flag True`, `--flag no`, ...: one convention for every boolean.
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
        elif self.type is not None:
            kwargs.update(type=self.type if self.range is None else _in_range(self.type, self.range))
        if self.range is not None and kwargs["help"] is not argparse.SUPPRESS:
            kwargs["help"] += f" [range: {self.range}]"
        if choices or self.choices:
            kwargs["choices"] = tuple(choices or self.choices)
        parser.add_argument(f"--{self.name}", dest=self.name, **kwargs)
        for alias in self.aliases:  # old spellings: same destination, hidden from --help
            parser.add_argument(f"--{alias}", dest=self.name, **{**kwargs, "help": argparse.SUPPRESS,
                                                                  "default": argparse.SUPPRESS})


def _in_range(parse: Callable[[str], Any], allowed: Range) -> Callable[[str], Any]:
    """`parse`, then a refusal (argparse's one line naming the flag) of a value outside `allowed`."""

    def parse_in_range(text: str) -> Any:
        value = parse(text)  # a ValueError here is argparse's "invalid int value"
        problem = allowed.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse_in_range.__name__ = getattr(parse, "__name__", "value")
    parse_in_range.__wrapped__ = parse  # type: ignore[attr-defined]
    return parse_in_range


def _model_flag(name: str) -> Flag:
    spec = MODEL_FLAGS[name]
    kind = type(spec.default)
    return Flag(name, spec.default, bool if kind is bool else kind, spec.help, range=spec.range)


ENCODER_HELP = ("encoder: dino, simclr, barlow, vicreg, supervised (the published ResNet-50s), a Vision "
                "Transformer (dino_vits16, dinov2_vits14, dinov2_vitb14_reg, mae_vitb16, mocov3_vitb16, "
                "ibot_vitb16, ...: README's table), a torchvision model name, a checkpoint file, or a library's "
                "model: timm:NAME, hf:REPO_OR_FOLDER, open_clip:ARCH[:TAG_OR_FILE], py:package.module:factory")
NO_EFFECT = "accepted for the original's command lines; no effect"

_DECLARED: list[Flag] = [
    # ---------------------------------------------------------------- inputs and outputs
    Flag("data_dir", "", help="folder of images (searched recursively)"),
    Flag("out_dir", ".", help="output folder"),
    Flag("name", "samples", help="file name (without extension) of the outputs"),
    Flag("model_path", "", help="RCDM checkpoint (default: the published one for --type_model/--use_head, "
                                "downloaded once)"),
    Flag("num_images", 1, int, "conditioning images taken from --data_dir", range=Range(1, 100000)),
    Flag("batch_size", 16, int, "images per batch", range=Range(1, 1 << 20)),
    Flag("seed", 0, int, "random seed: the same seed gives the same result", range=Range(0, 2**31 - 1)),
    Flag("device", "", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)"),
    Flag("progress", True, bool, "tqdm progress bars"),
    # ---------------------------------------------------------------- the encoder
    Flag("type_model", "dino", help=ENCODER_HELP),
    Flag("use_head", False, bool, "the encoder's projector/head output instead of the trunk's"),
    Flag("pretrained_encoder", True, bool,
         "False: the encoder with fixed-seed random weights, no download (tests, offline)"),
    Flag("encoder_normalize", None, help="encoder input scaling: minus_one_one, imagenet or mean=R,G,B;std=R,G,B "
         "(default: the checkpoint's record, else the encoder's own: minus_one_one for the published encoders, "
         "imagenet for torchvision models, the library's mean/std for timm:, hf:, open_clip: models)"),
    Flag("encoder_pooling", None, help="a Vision Transformer's representation: cls (the CLS token, default) or "
         "mean_patch (the mean patch token after the final norm); for timm:/hf: models the default is the "
         "library's own pooled output", choices=VIT_POOLINGS),
    Flag("encoder_weights", None, help="local weights file of a timm: or open_clip: encoder (timm loads it through "
         "pretrained_cfg_overlay; default: the library's own, from its cache)"),
    Flag("encoder_input_size", None, int, "side of the square crop the encoder sees (default: the encoder's own, "
         "224 for the ResNets)", range=Range(16, 4096)),
    Flag("encoder_precision", "fp32", help="the frozen encoder's compute precision, separate from the UNet's: "
         "fp32 (exact, default), auto (bf16 only where this machine runs it natively and faster), bf16 or fp16",
         choices=PRECISION_CHOICES),
    # ---------------------------------------------------------------- speed
    Flag("precision", None, help="compute precision of the UNet: auto (the fastest on this machine, measured: "
         "the recommended speed flag), fp32 (exact, the original's), bf16 (fast on GPUs and CPUs with AMX or "
         "AVX512-BF16, emulated and slow elsewhere) or fp16 (GPU); default fp32 (fp16 on GPU with --use_fp16)",
         choices=PRECISION_CHOICES),
    Flag("channels_last", False, bool,
         "channels-last memory format (faster with bf16/fp16; --precision auto decides by measuring)"),
    Flag("compile", False, bool, "compile the UNet with torch.compile (slow first call)"),
    Flag("tf32", False, bool, "on NVIDIA GPUs, float32 convolutions and matrix products in TensorFloat-32 "
         "(fast, about 1e-3 relative error); without it they are exact float32"),
    # ---------------------------------------------------------------- the model
    *(_model_flag(name) for name in MODEL_FLAGS),
    Flag("feat_cond", False, bool, "condition the model on the encoder's representation"),
    # ---------------------------------------------------------------- sampling
    Flag("sampler", None, help="ddpm, ddim or dpm++ (default: ddim with --use_ddim, else ddpm)", choices=SAMPLERS),
    Flag("steps", None, int, "model calls of the sampler (default: the --timestep_respacing steps)",
         aliases=("sampling_steps",), range=Range(1, 100000)),
    Flag("use_ddim", False, bool, "sample with DDIM (the original's switch; see --sampler)"),
    Flag("clip_denoised", True, bool, "clip each predicted clean image to [-1, 1]"),
    Flag("eta", 0.0, float, "DDIM stochasticity (0: deterministic)", range=Range(0, 1)),
    Flag("guidance_scale", 1.0, float,
         "representation guidance (1: none; needs a model trained with --feat_drop_prob > 0)", range=Range(0, 100)),
    Flag("dist", False, bool, "also report the representation distance between each sample and its target"),
    Flag("first_image_path", "", help="image at alpha 0"),
    Flag("second_image_path", "", help="image at alpha 1"),
    Flag("interpolation", "both", help="linear, spherical or both (one grid row each)",
         choices=("both", *INTERPOLATIONS)),
    Flag("image_path", "", help="image whose representation is edited"),
    Flag("folder_nn_path", "", help="folder of images to find neighbours in"),
    Flag("image_target_path", "", help="image whose values are transplanted"),
    Flag("n_common", 14, int, "a dimension is shared when non-zero in more than this many neighbours",
         range=NON_NEGATIVE),
    Flag("n_neighbors", 20, int, "size of the neighbourhood (the original's 20)", range=Range(1, 100000)),
    Flag("knn_backend", "auto", help="neighbour search: faiss if installed (auto), or exact torch",
         choices=("auto", "faiss", "torch")),
    # ---------------------------------------------------------------- training
    Flag("schedule_sampler", "uniform", help="timestep sampling: uniform or loss-second-moment",
         choices=SCHEDULE_SAMPLERS),
    Flag("lr", 1e-4, float, "learning rate (AdamW)", range=Range(0, 10)),
    Flag("weight_decay", 0.0, float, "AdamW weight decay", range=Range(0, 10)),
    Flag("lr_anneal_steps", 0, int, "decay the learning rate linearly to 0 over this many steps (0: constant)",
         range=NON_NEGATIVE),
    Flag("microbatch", -1, int, "split each batch into microbatches of this size (-1: off)",
         range=Range(1, also=(-1, 0))),
    Flag("ema_rate", "0.9999", help="comma-separated EMA rates of the weights", range=Range(0, 1, True, True)),
    Flag("log_interval", 10, int, "steps between log lines", range=POSITIVE),
    Flag("save_interval", 10000, int, "steps between checkpoints", range=POSITIVE),
    Flag("resume_checkpoint", "", help="model checkpoint to resume from (default: the newest in --out_dir)"),
    Flag("fp16_scale_growth", 1e-3, float, "the original's loss-scale growth (fp16 training)", range=Range(0, 1)),
    Flag("init_from", "", help="start a new run from a published diffusion model or a checkpoint file (a resumed "
         "run ignores it): openai_64, openai_128, openai_256, openai_256_uncond, openai_512 (guided-diffusion's "
         "ImageNet models), rcdm_<encoder>[_head] (the published RCDMs, e.g. rcdm_dino, rcdm_simclr_head) or a "
         "UNet state dict file; a name sets the model flags it needs unless given. See docs/training.md"),
    Flag("init_lr_scale", 1.0, float, "with --init_from: the copied weights train at --lr times this, the new "
         "`ssl_emb` at --lr (1: everything at --lr; from a class-conditional foundation, 0.1 halved the steps "
         "in docs/training.md's benchmark)", range=Range(0, 10)),
    Flag("train_only", "", help="with --init_from: 'cond' trains only the representation's path (`ssl_emb`, the "
         "residual blocks' embedding layers and norms) for --train_only_steps, then everything",
         choices=TRAIN_ONLY_CHOICES),
    Flag("train_only_steps", 0, int, "the steps of --train_only cond", range=NON_NEGATIVE),
    Flag("init_fit_images", 0, int, "with a class-conditional --init_from (openai_64/128/256/512): start the new "
         "`ssl_emb` as the least-squares map from this many training images' representations to their classes' "
         "embeddings (class: the image's folder, sorted, as in ImageNet's train set), not at zero (0: zero)",
         range=NON_NEGATIVE),
    Flag("feat_cache", "", help="folder of cached representations: encode the dataset once, then train from it"),
    Flag("feat_cache_dtype", "fp32", help="how --feat_cache stores the representations: fp32 (exact), bf16 or fp16 "
         "(half the size); recorded in the cache, which another dtype refuses", choices=("fp32", "bf16", "fp16")),
    Flag("max_steps", 0, int, "stop after this many steps (0: never)", range=NON_NEGATIVE),
    Flag("max_minutes", 0.0, float, "stop after this many minutes of training and save a checkpoint (0: no "
         "limit); set it under a job's time limit so the job ends with a checkpoint", range=NON_NEGATIVE),
    Flag("num_workers", None, int, "data loading processes per rank (default: the CPUs each rank may use, "
         "less one, at most 8)", range=Range(0, 256)),
    Flag("random_crop", False, bool, "random crops instead of centre crops"),
    Flag("random_flip", True, bool, "random horizontal flips"),
    Flag("sync_bn", False, bool, "with --norm_style cbn: batch statistics over all processes (SyncBatchNorm)"),
    # ---------------------------------------------------------------- evaluation
    Flag("fidelity", True, bool, "compute representation fidelity (needs the file's 'features')"),
    Flag("metric", "cosine", help="similarity between representations: cosine or (minus squared) L2",
         choices=METRICS),
    Flag("num_shuffles", 10, int, "random permutations averaged in the shuffled-conditioning control",
         range=Range(1, 100000)),
    Flag("ref", "", help="FID/IS reference: folder of images, .npz of images, or .npz with mu/sigma "
         "(omit to skip FID and IS)"),
    Flag("inception_path", "", help=f"local {FID_WEIGHTS_FILE} (default: the torch.hub cache or RCDM_MIRROR, "
         "else downloaded)"),
    Flag("download_inception", True, bool, "allow downloading the FID Inception weights", aliases=("download",)),
    Flag("stats_cache", None, help="folder caching reference statistics ('' to disable; default "
         "$RCDM_STATS_CACHE or ~/.cache/guided_diffusion_rcdm/fid_stats)"),
    Flag("ref_resize", "network", help="an .npz reference of another image size than the samples: 'network' "
         "feeds each image to the Inception network, which resizes it to 299 (pytorch-fid's way, comparable "
         "with published FIDs); 'crop' centre-crops it to the samples' size first", choices=REF_RESIZE),
    Flag("splits", 10, int, "Inception Score splits", range=Range(1, 1000)),
    Flag("out_json", "", help="where to write the scores (default: NPZ_eval.json)"),
    # ---------------------------------------------------------------- the original's, no effect
    Flag("no_shared", False, bool, NO_EFFECT),
    Flag("G_shared", False, bool, NO_EFFECT),
    Flag("submitit", False, bool, NO_EFFECT),
    Flag("local_rank", 0, int, NO_EFFECT + " (the launcher's environment names the rank)", range=NON_NEGATIVE),
    Flag("dist_url", "env://", help=NO_EFFECT + " (the launcher's environment gives the rendezvous)"),
]
FLAGS: dict[str, Flag] = {f.name: f for f in _DECLARED}
assert len(FLAGS) == len(_DECLARED), "a flag is declared twice"

ORIGINAL_NO_EFFECT = ("no_shared", "G_shared", "submitit", "local_rank", "dist_url")
ENCODER_FLAGS = ("type_model", "use_head", "pretrained_encoder", "encoder_normalize", "encoder_pooling",
                 "encoder_input_size", "encoder_weights")
SPEED_FLAGS = ("precision", "channels_last", "compile", "tf32")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str,
              defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None,
              choices: dict[str, Sequence[Any]] | None = None) -> None:
    """Add the declared flags `names` to `parser`, with per-command `defaults`, `helps` and
    `choices` (a command may narrow a flag's values to those it supports)."""
    defaults, helps, choices = defaults or {}, helps or {}, choices or {}
    unknown = (set(defaults) | set(helps) | set(choices)) - set(names)
    if unknown:
        raise ValueError(f"defaults, helps or choices for flags not added: {sorted(unknown)}")
    for name in names:
        FLAGS[name].add_to(parser, default=defaults.get(name, ...), help=helps.get(name), choices=choices.get(name))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, "", argparse.SUPPRESS, False) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line (status 2) naming the flag; --help shows the rest."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> frozenset[str]:
    """The destinations the command line sets explicitly (whatever their value)."""
    # Re-parse with every default suppressed: only what argv names ends up in the namespace.
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return frozenset(vars(given))


def parse_args(parser: argparse.ArgumentParser, argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default: the command line) and remember which flags were given (`args.explicit`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(parser, argv)
    return args
