"""The library's front door: the top-level exports, `ModelConfig` as the one declaration of the
model settings (flags, records, presets), `SamplingConfig` and the one way into `RCDM`, and the
original's names kept as aliases."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sampling_helpers import REPO, make_tiny_checkpoint  # noqa: E402

import guided_diffusion_rcdm  # noqa: E402
from guided_diffusion_rcdm import RCDM, EncoderSpec, ModelConfig, SamplingConfig, sample_images, train  # noqa: E402
from guided_diffusion_rcdm.cli import train as train_cli  # noqa: E402
from guided_diffusion_rcdm.cli.flags import parse_args  # noqa: E402
from guided_diffusion_rcdm.config import MODEL_FLAGS, PRESETS  # noqa: E402


def test_the_package_top_exports_the_front_door():
    from guided_diffusion_rcdm import encoders, samplers, training
    from guided_diffusion_rcdm.RCDM import RCDM as by_module_path

    assert inspect.isclass(RCDM) and issubclass(RCDM, torch.nn.Module)
    assert by_module_path is RCDM and guided_diffusion_rcdm.RCDM.RCDM is RCDM  # the original's spellings
    assert (EncoderSpec, train, sample_images) == (encoders.EncoderSpec, training.train, samplers.sample_images)
    assert set(guided_diffusion_rcdm.__all__) >= {"RCDM", "ModelConfig", "SamplingConfig", "EncoderSpec", "train",
                                                  "sample_images"}


def test_model_config_is_the_one_declaration_of_the_model_flags():
    from guided_diffusion_rcdm import script_util

    names = [f.name for f in dataclasses.fields(ModelConfig)]
    assert list(MODEL_FLAGS) == names[: len(MODEL_FLAGS)] and names[len(MODEL_FLAGS):] == ["feat_cond", "ssl_dim"]
    assert script_util.MODEL_FLAGS is MODEL_FLAGS
    assert script_util.model_and_diffusion_defaults() == ModelConfig().flags()
    assert script_util.diffusion_defaults() == {k: v for k, v in ModelConfig().flags().items()
                                                if MODEL_FLAGS[k].part == "diffusion"}  # the original's name
    # the command line's flags are the fields, with their defaults
    args = parse_args(train_cli.create_argparser(), [])
    assert {k: getattr(args, k) for k in MODEL_FLAGS} == ModelConfig().flags()


def test_records_round_trip_and_presets_build():
    config = ModelConfig.preset("quickstart", num_channels=64, feat_drop_prob=0.1)
    record = config.to_record()
    assert ModelConfig.from_record(record) == config
    assert ModelConfig.from_record({**record, "not_a_setting": 1}) == config  # a newer record's extra entries
    assert ModelConfig.from_record({"image_size": 32, "channel_mult": "1,2"}) == ModelConfig(image_size=32,
                                                                                          channel_mult="1,2")
    with pytest.raises(ValueError, match="unknown ModelConfig preset 'big': choose one of published_128"):
        ModelConfig.preset("big")
    with pytest.raises(TypeError):
        config.replace(num_chanels=3)
    for name in PRESETS:
        with torch.device("meta"):
            model, diffusion = ModelConfig.preset(name).build()
        assert model.ssl_emb.in_features == ModelConfig.preset(name).ssl_dim and diffusion.num_timesteps > 0


def test_published_checkpoints_record_the_published_preset():
    from guided_diffusion_rcdm.foundations import FOUNDATIONS, MODEL_FLAGS_256
    from guided_diffusion_rcdm.get_rcdm_models import MODEL_FLAGS_128, published_meta

    assert published_meta("dino", use_head=True)["model_flags"] == ModelConfig.preset("published_128",
                                                                                      ssl_dim=256).to_record()
    assert MODEL_FLAGS_128 == ModelConfig.preset("published_128").flags()
    assert MODEL_FLAGS_256 == ModelConfig.preset("rcdm_256").flags()
    assert ModelConfig(**FOUNDATIONS["openai_256"].flags) == ModelConfig.preset("rcdm_256", feat_cond=False)


@pytest.mark.parametrize("doc, variable, preset", [("README.md", "MODEL_FLAGS_128", "published_128"),
                                                   ("docs/training.md", "MODEL_FLAGS_256", "rcdm_256")])
def test_the_docs_shell_variables_are_the_presets(doc, variable, preset):
    text = (REPO / doc).read_text()
    line = re.search(rf'export {variable}="([^"]+)"', text)
    assert line, f"{doc} exports {variable}"
    args = parse_args(train_cli.create_argparser(), shlex.split(line.group(1)) + ["--feat_cond", "True"])
    config, _ = train_cli.model_config(args)
    assert config == ModelConfig.preset(preset)


def test_create_model_keeps_the_originals_signature_and_defaults():
    """guided-diffusion's `create_model` defaults, which differ from `model_and_diffusion_defaults`
    (num_heads, attention_resolutions, use_scale_shift_norm): code calling it directly builds what
    it built before."""
    from guided_diffusion_rcdm.script_util import create_model

    original = dict(channel_mult="", learn_sigma=False, class_cond=False, use_checkpoint=False,
                    attention_resolutions="16", num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                    use_scale_shift_norm=False, dropout=0, resblock_updown=False, use_fp16=False,
                    use_new_attention_order=False)
    params = inspect.signature(create_model).parameters
    assert list(params)[:3] == ["image_size", "num_channels", "num_res_blocks"]
    assert {k: params[k].default for k in original} == original


def test_the_originals_helpers_stay_importable():
    from guided_diffusion_rcdm import dist_util, logger, train_util
    from guided_diffusion_rcdm.script_util import add_dict_to_argparser, args_to_dict

    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, {"lr": 1e-4, "use_fp16": False, "name": "x"})
    args = parser.parse_args(["--use_fp16", "yes", "--lr", "0.5"])
    assert args_to_dict(args, ["lr", "use_fp16", "name"]) == {"lr": 0.5, "use_fp16": True, "name": "x"}
    assert train_util.get_blob_logdir is logger.get_dir
    assert callable(dist_util.init_distributed_mode)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("front") / "tiny.pt")


def test_one_construction_path_for_every_way_in(ckpt):
    from guided_diffusion_rcdm.loading import load_components

    sampling = SamplingConfig(sampler="ddim", steps=2, device="cpu", progress=False)
    by_keywords = RCDM.from_checkpoint(ckpt, sampler="ddim", steps=2, device="cpu", progress=False,
                                       pretrained_encoder=False)
    by_config = RCDM.from_checkpoint(ckpt, sampling=sampling, pretrained_encoder=False)
    by_parts = RCDM(load_components(ckpt, pretrained_encoder=False, device="cpu"), sampling)
    by_flags = RCDM({"model_path": ckpt, "use_ddim": True, "steps": 2, "device": "cpu", "progress": False,
                     "pretrained_encoder": False})  # the original's RCDM(args)
    for rcdm in (by_keywords, by_config, by_parts, by_flags):
        assert rcdm.sampling == sampling, rcdm.sampling
        assert (rcdm.args.steps, rcdm.args.use_ddim, rcdm.args.model_path) == (2, True, ckpt)
    with pytest.raises(TypeError, match="stepz"):
        RCDM.from_checkpoint(ckpt, stepz=2)
    by_keywords.configure_sampling(sampler="dpm++", steps=3)
    assert by_keywords.sampling == sampling.replace(sampler="dpm++", steps=3)


def test_the_train_command_and_train_agree_on_defaults():
    """`rcdm train` passes its flags to `train()` by name: a flag's default and the keyword's are the same."""
    from guided_diffusion_rcdm import training

    args = parse_args(train_cli.create_argparser(), [])
    shared = [(k, p.default) for k, p in inspect.signature(training.train).parameters.items()
              if hasattr(args, k) and p.default is not inspect.Parameter.empty]
    assert len(shared) > 20
    assert [(k, getattr(args, k) or None) for k, _ in shared] == [(k, d or None) for k, d in shared]
