"""A tiny RCDM trained on a ViT-S representation (a DINOv2 file in its upstream layout with random
weights, 28-pixel encoder views), sampled from, scored with the same encoder, and its feature cache."""

from __future__ import annotations

import torch

from guided_diffusion_rcdm import dist_util, hub, logger
from guided_diffusion_rcdm.apps.quickstart import choose_encoder
from guided_diffusion_rcdm import vit_encoders as vit
from guided_diffusion_rcdm.encoders import EncoderSpec, encode_images
from guided_diffusion_rcdm.feature_cache import load_cache, prepare_feature_cache
from guided_diffusion_rcdm.image_datasets import list_image_files_recursively, load_data
from guided_diffusion_rcdm.metrics import representation_fidelity
from guided_diffusion_rcdm.RCDM import RCDM
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion_rcdm.train_util import TrainLoop, conditioned_batches
from _train_photos import make_photo_dir
from helpers_hub import closed_port_url
from test_vit_encoders import upstream_file

VIEW = 28  # the encoder's input: a 2x2 grid of 14-pixel patches


def test_train_sample_and_score_on_a_vit_representation(tmp_path):
    photos = make_photo_dir(tmp_path / "photos", short_side=48)
    encoder_file = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(upstream_file(vit.VIT_ENCODERS["dinov2_vits14_reg"], seed=1)[0], encoder_file)
    spec = EncoderSpec(str(encoder_file), pooling="mean_patch", input_size=VIEW)
    encoder = spec.build("cpu")
    assert encoder.spec.width == 384 and encoder.spec.input_normalize == "imagenet"

    # the feature cache: once per image, recorded with the pooling and the input size
    paths = list_image_files_recursively(photos)
    kept, features = prepare_feature_cache(str(tmp_path / "cache"), photos, paths, encoder.spec,
                                           make_encoder=lambda: encoder, batch_size=4,
                                           num_workers=0, progress=False)
    assert features.shape == (len(paths), 2, 384)
    by_path = dict(zip(kept, (features[i, 0] for i in range(len(kept)))))  # unflipped
    record = load_cache(str(tmp_path / "cache"))["encoder"]
    assert (record["pooling"], record["input_size"]) == ("mean_patch", VIEW)

    flags = {**model_and_diffusion_defaults(), "image_size": 32, "channel_mult": "1,2", "num_channels": 32,
             "num_res_blocks": 1, "attention_resolutions": "16", "learn_sigma": True,
             "diffusion_steps": 50}
    model, diffusion = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=encoder.spec.width)
    stream = load_data(data_dir=photos, batch_size=2, image_size=32, num_workers=0,
                       encoder_normalize=encoder.spec.input_normalize, encoder_size=encoder.spec.input_size)
    out = tmp_path / "run"
    dist_util.setup_dist()
    try:
        TrainLoop(model=model, diffusion=diffusion, data=conditioned_batches(stream, encoder, "cpu"),
                  batch_size=2, microbatch=-1, lr=1e-4, ema_rate="0.9", log_interval=1, save_interval=3,
                  resume_checkpoint="", max_steps=3, progress=False, out_dir=str(out),
                  checkpoint_meta={"model_flags": {**flags, "feat_cond": True, "ssl_dim": encoder.spec.width},
                                   "encoder": encoder.spec.to_dict()}).run_loop()
    finally:
        stream.close()
        logger.reset()

    rcdm = RCDM.from_checkpoint(out / "ema_0.9_000003.pt", device="cpu", sampler="ddim", steps=4,
                                progress=False)
    assert rcdm.encoder_spec == encoder.spec  # pooling, input size and file from the checkpoint
    feats = rcdm.encode(paths[:3])
    torch.testing.assert_close(feats, torch.stack([by_path[p] for p in paths[:3]]), rtol=0, atol=1e-5)
    torch.manual_seed(0)
    samples = rcdm.sample(feats)
    assert samples.shape == (3, 3, 32, 32) and torch.isfinite(samples).all()

    # representation fidelity with the same encoder (ViT views resized to its 28 pixels)
    sample_feats = encode_images(rcdm.ssl_model, samples).features
    scores = representation_fidelity(sample_feats, feats)
    assert sample_feats.shape == (3, 384)
    assert scores.num_conditions == 3 and 0 < scores.model.mrr <= 1


def test_the_quickstart_takes_a_vit_from_disk_or_says_it_is_untrained(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(hub.MIRROR_ENV, closed_port_url())  # offline: auto would download with a network
    spec, sentence = choose_encoder("dinov2_vits14", "auto")
    assert spec.name == "dinov2_vits14" and spec.pretrained is False and spec.pooling == "cls"
    assert "an UNTRAINED dinov2_vits14 network" in sentence
    assert "dinov2_vits14_pretrain.pth" in sentence and vit.VIT_ENCODERS["dinov2_vits14"].url in sentence
    cached = hub.hub_cache_dir() / "dinov2_vits14_pretrain.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")  # only its presence is looked at here; get_model reads it later
    spec, sentence = choose_encoder("dinov2_vits14", "auto")
    assert spec.pretrained is True and "published weights" in sentence and str(cached) in sentence
