r"""Score a sample file: representation fidelity (rank, top-k, MRR vs a shuffled control), FID and IS.

    python scripts/image_eval.py OUT_DIR/samples.npz
    python scripts/image_eval.py OUT_DIR/samples.npz --ref REFERENCE_FOLDER_OR_NPZ \
        --inception_path pt_inception-2015-12-05-6726825d.pth

The `.npz` is what scripts/image_sample.py writes: N x K samples and the N representations they
were drawn from. Each sample is encoded with the same frozen encoder (resized to 224x224), and the
rank of its own conditioning image among the N, by similarity of representations, gives mean rank,
top-1 / top-5 and MRR; the same with randomly permuted conditioning is the chance level measured on
these samples. The encoder is the one the samples were made with (the checkpoint's record, the
.npz's fields), unless --type_model / --use_head / --pretrained_encoder say otherwise.

With --ref, FID of all the samples against the reference (a folder of images, centre-cropped to the
samples' size; an .npz of images, of any size: see --ref_resize; or an .npz with `mu` and `sigma`) and their Inception Score are
computed with the TF-FID Inception network; reference statistics are cached (see --stats_cache).
Writes the scores as JSON (--out_json, default NPZ_eval.json) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from .. import hub, metrics
from ..encoders import EncoderSpec, encode_images, given_fields, sample_file_record
from ..errors import UsageError
from ..fileio import atomic_write_text, check_out_dir, check_writable, whole_run_or_nothing
from ..get_rcdm_models import published_meta
from ..get_ssl_models import ENCODER_NAMES
from ..loading import resolve_device
from ..precision import set_fp32_math
from .flags import ENCODER_FLAGS, Parser, add_flags
from .policy import run_command


def create_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("sample_path", help=".npz written by the sampling commands (put it before the flags)")
    add_flags(parser, "fidelity", "metric", "num_shuffles", "seed", "batch_size", "device", "precision", "tf32",
              "progress", "out_json", defaults={"batch_size": 32, "precision": "fp32"}, helps={
                  "seed": "seed of the shuffles",
                  "precision": "encoder precision for the samples' representations (the .npz's are fp32); "
                               "auto: bf16 only where this machine runs it natively and faster"})
    add_flags(parser.add_argument_group("encoder (default: the one the samples were made with)"),
              *ENCODER_FLAGS, helps={"encoder_normalize": "encoder input scaling (default: the recorded one, "
                                                          "else the encoder's own)"})
    add_flags(parser.add_argument_group("FID and IS"), "ref", "inception_path", "download_inception",
              "stats_cache", "ref_resize", "splits")
    return parser


def encoder_of_samples(args: argparse.Namespace, meta: dict) -> tuple[EncoderSpec, str]:
    """Which encoder the samples were made with, and where that was read from.

    Order: the command line's explicit flags; the .npz's own fields (what sampling used); the
    checkpoint's record (`model_path` in the .npz); the published checkpoint's conventions; defaults.
    """
    recorded: dict = {}
    source = "defaults"
    model_path = str(meta.get("model_path", "") or "")
    if model_path and os.path.isfile(model_path):
        try:
            recorded = dict(hub.load_checkpoint(model_path)[1].get("encoder") or {})
            source = f"the checkpoint {model_path}"
        except Exception:  # an unreadable checkpoint only costs us its record
            recorded = {}
    elif "type_model" in meta and not model_path:
        if str(meta["type_model"]) in ENCODER_NAMES:  # sampled from a published checkpoint
            recorded = published_meta(str(meta["type_model"]), bool(meta.get("use_head")))["encoder"]
            source = "the published checkpoint's conventions"
    in_file = sample_file_record(meta)
    if in_file:
        if recorded.get("type_model") not in (None, in_file.get("type_model", recorded["type_model"])):
            recorded = {}
        recorded.update(in_file)
        source = "the sample file" if source == "defaults" else source + " and the sample file"
    given = given_fields(args, args.explicit)
    if given:
        source += " and the command line"
    return EncoderSpec.resolve(given, recorded), source


def evaluate(args: argparse.Namespace) -> dict:
    if args.num_shuffles < 1:
        raise UsageError("--num_shuffles must be at least 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size}: must be at least 1")
    out = args.out_json or os.path.splitext(args.sample_path)[0] + "_eval.json"
    check_out_dir(os.path.dirname(os.path.abspath(out)), "--out_json's folder")
    data = metrics.read_sample_file(args.sample_path)
    if not args.fidelity and not args.ref:
        raise UsageError("nothing to compute: --fidelity False and no --ref")
    if args.fidelity and data.features is None:
        raise UsageError(
            f"{args.sample_path} holds samples but no 'features' (the representations they were drawn "
            "from), so representation fidelity cannot be computed: make the file with "
            "scripts/image_sample.py, or pass --fidelity False and --ref to compute only FID and IS"
        )
    if args.fidelity and data.num_conditions < 2:
        raise UsageError(f"{args.sample_path} has samples of {data.num_conditions} representation; "
                            "fidelity ranks each among several: sample with --num_images 2 or more")
    if args.ref and not os.path.exists(args.ref):
        raise UsageError(f"--ref {args.ref}: no such folder or .npz file")
    device = resolve_device(args.device)
    set_fp32_math(args.tf32)  # the encoder's; FID's Inception features are always exact float32
    results: dict = {"sample_path": os.path.abspath(args.sample_path),
                     "num_conditions": data.num_conditions,
                     "samples_per_condition": int(data.samples.shape[1]),
                     "sample_size": int(data.samples.shape[2])}
    inception = None
    if args.ref:  # load the network first: a missing weights file fails before any long work
        inception = metrics.load_inception(args.inception_path or None, download=args.download_inception,
                                           device=device)

    if args.fidelity:
        spec, source = encoder_of_samples(args, data.meta)
        print(f"encoder: {spec.describe()}, from {source}", flush=True)
        encoder = spec.build(device)
        n, k = data.samples.shape[:2]
        feats = encode_images(encoder, data.samples.reshape(n * k, *data.samples.shape[2:]),
                              batch_size=args.batch_size, precision=args.precision, progress=args.progress,
                              desc="encoding samples").features
        if feats.shape[1] != data.features.shape[1]:
            raise UsageError(
                f"the encoder gives {feats.shape[1]}-d representations but the file's features are "
                f"{data.features.shape[1]}-d: pass the --type_model/--use_head the samples were made with"
            )
        fidelity = metrics.representation_fidelity(feats.view(n, k, -1), data.features, metric=args.metric,
                                                   num_shuffles=args.num_shuffles, seed=args.seed)
        print(fidelity.summary())
        results["encoder"] = encoder.spec.to_dict()
        results["fidelity"] = fidelity.as_dict()

    if inception is not None:
        flat = data.samples.reshape(-1, *data.samples.shape[2:])
        scores = metrics.fid_and_is(flat, args.ref, inception, cache_dir=args.stats_cache,
                                    batch_size=args.batch_size, splits=args.splits, progress=args.progress,
                                    ref_resize=args.ref_resize)
        print(f"reference: {scores.reference_preprocessing or 'statistics computed earlier'}")
        print(f"FID {scores.fid:.2f} ({scores.num_samples} samples vs {scores.num_reference} reference images)  "
              f"IS {scores.inception_score:.2f} +- {scores.inception_score_std:.2f}")
        if scores.num_samples < 2048:
            print(f"note: FID is biased upwards with fewer samples than its 2048 dimensions "
                  f"({scores.num_samples} here); compare only FIDs computed with the same number")
        results["fid_is"] = scores.as_dict() | {"ref": os.path.abspath(args.ref)}

    folder = os.path.dirname(os.path.abspath(out))
    with whole_run_or_nothing(folder):  # a full disk leaves no folder made for the scores either
        check_writable(folder, "--out_json's folder")
        atomic_write_text(out, json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`rcdm eval` / scripts/image_eval.py: the exit status."""
    return run_command(evaluate, create_argparser(prog), argv)
