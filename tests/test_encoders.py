"""The encoder description (`EncoderSpec`) and the one batched encode (`encode_images`)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from _sampling_helpers import TINY_FLAGS, write_photos
from guided_diffusion_rcdm import feature_cache, hub
from guided_diffusion_rcdm.encoders import (
    EncoderSpec,
    UnreadableImageError,
    encode_images,
    encode_views,
    given_fields,
    sample_file_record,
)
from guided_diffusion_rcdm.image_datasets import encoder_input, model_input

SPEC = EncoderSpec("resnet18", pretrained=False)  # untrained: no download


@pytest.fixture(scope="module")
def encoder():
    return SPEC.build("cpu")


@pytest.fixture
def folder(tmp_path):
    """Three real photographs and, sorted between them, a file that is not an image."""
    paths = write_photos(tmp_path / "photos", names=("astronaut", "coffee", "chelsea"))
    broken = tmp_path / "photos" / "01_broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return sorted([*paths, str(broken)]), str(broken)


def test_a_spec_fills_the_encoders_own_input_and_builds_a_frozen_encoder(encoder):
    assert SPEC.input_normalize == "imagenet" and SPEC.input_size == 224  # torchvision's own
    assert EncoderSpec("dino").input_normalize == "minus_one_one"  # the published ones: [-1, 1]
    assert EncoderSpec("resnet18", input_normalize="minus_one_one").input_normalize == "minus_one_one"
    assert encoder.spec == SPEC and encoder.spec.width == 512  # measured
    assert encoder.input_normalize == "imagenet" and encoder.input_size == 224
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="`input_normalize` 'centered'"):
        EncoderSpec("dino", input_normalize="centered")
    with pytest.raises(ValueError, match="`pooling` 'cls': resnet18 is not a Vision Transformer"):
        EncoderSpec("resnet18", pooling="cls", pretrained=False).build()


def test_the_spec_round_trips_through_a_checkpoints_metadata(tmp_path, encoder):
    spec = encoder.spec
    path = tmp_path / "model.pt"
    hub.save_checkpoint(str(path), {"w": torch.zeros(1)}, meta={"encoder": spec.to_dict()})
    _, meta = hub.load_checkpoint(str(path))
    back = EncoderSpec.from_dict(meta["encoder"])
    assert back == spec and back.width == 512 and back.to_dict() == spec.to_dict()
    # width is what was measured, not the encoder's identity
    assert spec == SPEC and SPEC.to_dict().get("width") is None


def test_old_records_still_resolve():
    # what checkpoints, feature caches and the quickstart recorded before input size and pooling
    old = {"type_model": "resnet18", "use_head": False, "normalize": "minus_one_one", "pretrained": False}
    spec = EncoderSpec.from_dict(old)
    assert spec == EncoderSpec("resnet18", input_normalize="minus_one_one", input_size=224, pretrained=False)
    # older still: name and head only -> trained weights, the encoder's own input scaling
    assert EncoderSpec.from_dict({"type_model": "dino", "use_head": True}) == EncoderSpec("dino", use_head=True)
    assert EncoderSpec.from_dict({"type_model": "resnet18", "normalize": None}).input_normalize == "imagenet"
    with pytest.raises(ValueError, match="unknown field"):
        EncoderSpec.from_dict({"type_model": "dino", "colour": "blue"})


def test_resolve_takes_given_fields_over_the_record_and_another_name_discards_it():
    record = {"type_model": "resnet18", "use_head": False, "normalize": "minus_one_one",
              "pretrained": False, "width": 512}
    assert EncoderSpec.resolve({}, record) == EncoderSpec.from_dict(record)
    assert EncoderSpec.resolve({}, record).width == 512
    kept = EncoderSpec.resolve({"input_normalize": "imagenet"}, record)
    assert kept.input_normalize == "imagenet" and kept.pretrained is False and kept.width is None
    other = EncoderSpec.resolve({"name": "dino"}, record)  # another encoder: nothing recorded applies
    assert other == EncoderSpec("dino")
    assert EncoderSpec.resolve({"name": None, "use_head": None}, None) == EncoderSpec()  # nothing given


def test_flags_and_sample_file_fields_name_the_same_fields():
    args = {"type_model": "dino", "use_head": True, "encoder_normalize": None, "pretrained_encoder": False}
    spec = EncoderSpec.from_flags(args)
    assert spec == EncoderSpec("dino", use_head=True, pretrained=False)
    assert given_fields(args, {"type_model"}) == {"name": "dino"}
    assert EncoderSpec.from_dict(sample_file_record(spec.sample_file_fields())) == spec


def test_paths_pil_images_and_tensors_give_the_same_representation(folder, encoder):
    paths, _ = folder
    good = [p for p in paths if "broken" not in p]
    by_path = encode_images(encoder, good).features
    assert by_path.shape == (3, 512) and by_path.dtype == torch.float32 and by_path.device.type == "cpu"
    with Image.open(good[0]) as im:
        pil = im.convert("RGB")
    torch.testing.assert_close(encode_images(encoder, pil).features[0], by_path[0])
    # a tensor is an image in [-1, 1]: the encoder's own scaling (imagenet here) is applied to it
    tensor = torch.stack([model_input(p, 224) for p in good])
    torch.testing.assert_close(encode_images(encoder, tensor).features, by_path)
    uint8 = ((tensor + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    torch.testing.assert_close(encode_images(encoder, uint8.numpy()).features, by_path, atol=1e-4, rtol=1e-4)
    # the training loader's core: views already cropped and scaled
    views = torch.stack([encoder_input(p, normalize="imagenet") for p in good])
    torch.testing.assert_close(encode_views(encoder, views), by_path)
    # mirrored: plain and flipped rows, as the feature cache keeps them
    both = encode_images(encoder, good, batch_size=2, mirrored=True).features
    assert both.shape == (3, 2, 512)
    torch.testing.assert_close(both[:, 0], by_path)
    torch.testing.assert_close(both[:, 1], encode_views(encoder, views.flip(-1)))


def test_an_unreadable_file_is_skipped_with_one_line_and_rows_stay_aligned(folder, encoder, capsys):
    paths, broken = folder
    done = encode_images(encoder, paths, batch_size=2)
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1 and err.count(broken) == 1
    assert len(err.strip().splitlines()) == 1
    bad = paths.index(broken)
    assert list(done.skipped) == [bad] and done.kept == [i for i in range(len(paths)) if i != bad]
    assert done.features.shape == (len(paths) - 1, 512)
    for row, i in enumerate(done.kept):  # each row is its own image's representation
        torch.testing.assert_close(done.features[row], encode_images(encoder, paths[i]).features[0])
    with pytest.raises(UnreadableImageError, match="01_broken.jpg: cannot be read"):
        encode_images(encoder, paths, skip_unreadable=False)


def test_the_feature_cache_records_the_spec_keeps_rows_aligned_and_reads_old_caches(folder, encoder, tmp_path):
    paths, broken = folder
    root = str(tmp_path / "photos")
    cache = str(tmp_path / "cache")
    built = []

    def make():
        built.append(1)
        return encoder

    kept, feats = feature_cache.prepare_feature_cache(cache, root, paths, SPEC, make, num_workers=0,
                                                      progress=False)
    assert broken not in kept and len(kept) == len(paths) - 1 and built == [1]
    stored = feature_cache.load_cache(cache)
    assert EncoderSpec.from_dict(stored["encoder"]) == SPEC and stored["encoder"]["width"] == 512
    for row, path in enumerate(kept):
        torch.testing.assert_close(feats[row, 0], encode_images(encoder, path).features[0])
    assert list(stored["bad"]) == ["01_broken.jpg"]
    # the record, as a dict, is as good as the spec; nothing is encoded again
    feature_cache.prepare_feature_cache(cache, root, paths, SPEC.to_dict(), make, num_workers=0)
    assert built == [1]
    with pytest.raises(ValueError, match="was made with encoder resnet18.*not dino"):
        feature_cache.prepare_feature_cache(cache, root, paths, EncoderSpec("dino", pretrained=False), make)

    # a cache written before the spec existed: the old four-field record, no precision recorded
    old = {"format": feature_cache.CACHE_FORMAT, "paths": stored["paths"], "features": stored["features"].clone(),
           "bad": stored["bad"],
           "encoder": {"type_model": "resnet18", "use_head": False, "normalize": "imagenet", "pretrained": False}}
    old_dir = tmp_path / "old_cache"
    old_dir.mkdir()
    torch.save(old, feature_cache.cache_path(str(old_dir)))
    again, old_feats = feature_cache.prepare_feature_cache(str(old_dir), root, paths, SPEC, make, num_workers=0)
    assert again == kept and built == [1]
    torch.testing.assert_close(old_feats[0, 0], feats[0, 0])


def test_a_vision_transformer_is_described_and_encoded_the_same_way(folder):
    paths, broken = folder
    cls = EncoderSpec("dino_vits16", pretrained=False)
    assert (cls.pooling, cls.input_normalize, cls.input_size) == ("cls", "imagenet", 224)  # its own
    mean = EncoderSpec("dino_vits16", pretrained=False, pooling="mean_patch", input_size=112)
    assert mean != cls and EncoderSpec.from_dict(mean.to_dict()) == mean
    encoder = mean.build("cpu")
    assert encoder.spec.width == 384 and encoder.input_size == 112
    done = encode_images(encoder, paths)  # cropped at the encoder's own 112, the bad file skipped
    assert done.features.shape == (3, 384) and list(done.skipped) == [paths.index(broken)]
    tensor = torch.stack([model_input(paths[i], 112) for i in done.kept])
    torch.testing.assert_close(encode_images(encoder, tensor).features, done.features)


def test_a_checkpoint_that_records_a_vit_rebuilds_it_pooling_and_input_size_included(folder, tmp_path):
    from guided_diffusion_rcdm.RCDM import RCDM
    from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    paths, broken = folder
    spec = EncoderSpec("dino_vits16", pretrained=False, pooling="mean_patch", input_size=112, width=384)
    flags = {**model_and_diffusion_defaults(), **TINY_FLAGS}
    model, _ = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=384)
    ckpt = tmp_path / "vit.pt"
    hub.save_checkpoint(str(ckpt), model.state_dict(), meta={
        "model_flags": {**flags, "feat_cond": True, "ssl_dim": 384}, "encoder": spec.to_dict()})
    rcdm = RCDM.from_checkpoint(ckpt, device="cpu", progress=False)
    assert rcdm.encoder_spec == spec and rcdm.ssl_model.input_size == 112
    good = [p for p in paths if p != broken]
    want = encode_images(spec.build(), good).features
    torch.testing.assert_close(rcdm.encode(good), want)
    # the pooling is an override like the other encoder fields
    cls = RCDM.from_checkpoint(ckpt, device="cpu", progress=False, encoder_pooling="cls")
    assert cls.encoder_spec == EncoderSpec("dino_vits16", pretrained=False, input_size=112)
