"""The three sampling scripts, run from the command line on real photographs and a tiny checkpoint.

Each script runs in a fresh interpreter (as a user runs it); the tests read back the grid JPEG and
the `.npz` it writes and compare them with what the package computes in-process.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from _sampling_helpers import (
    SSL_DIM,
    grid_cells,
    make_tiny_checkpoint,
    run_script,
    write_photos,
)
from guided_diffusion_rcdm.cli.flags import parse_args  # noqa: E402
from guided_diffusion_rcdm.get_ssl_models import get_model
from guided_diffusion_rcdm.image_datasets import encoder_input, model_input

# The README's $MODEL_FLAGS_128, verbatim.
MODEL_FLAGS_128 = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 128 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 False --use_scale_shift_norm True"
).split()
# Flags of the original scripts that have no effect any more; old command lines pass them.
LEGACY = ["--no_shared", "--G_shared", "False", "--local_rank", "0", "--dist_url", "env://",
          "--submitit", "False", "--clip_denoised", "True"]
S = 32  # the tiny checkpoint's image size


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    photos = write_photos(root / "photos")
    return {"root": root, "ckpt": make_tiny_checkpoint(root / "tiny.pt"), "photos": photos}


@pytest.fixture(scope="module")
def encoder():
    return get_model("resnet18", pretrained=False)


def _features(encoder, paths) -> np.ndarray:
    with torch.no_grad():
        return encoder(torch.stack([encoder_input(p) for p in paths])).numpy()


def _expected_cell(path) -> np.ndarray:
    return ((model_input(path, S).permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int16)


def _blocks(images: np.ndarray) -> np.ndarray:
    """Means over 4x4 pixel blocks of ... x S x S x 3 images."""
    x = images.astype(np.float64)
    return x.reshape(*x.shape[:-3], S // 4, 4, S // 4, 4, 3).mean(axis=(-4, -2))


def _assert_not_constant(cells: np.ndarray) -> None:
    for cell in cells.reshape(-1, S, S, 3):
        assert cell.std() > 10, "a sample is (nearly) a constant image"


def test_image_sample_grid_npz_and_seed(env, encoder):
    data = env["root"] / "data"
    shutil.copytree(env["root"] / "photos", data)
    (data / "000_broken.jpg").write_bytes(b"not a jpeg at all")  # sorted first: must be skipped
    out = env["root"] / "out_sample"
    common = ["--model_path", env["ckpt"], "--batch_size", "3", "--num_images", "2", "--data_dir", data,
              "--out_dir", out, "--seed", "7", "--timestep_respacing", "5"]
    proc = run_script("image_sample.py", *common, "--name", "a")
    assert "000_broken.jpg" in proc.stderr  # the unreadable file is named, then skipped

    cells = grid_cells(out / "a.jpeg", rows=2, cols=4, size=S)
    used = [str(data / p.split("/")[-1]) for p in env["photos"][:2]]
    for r, path in enumerate(used):  # first column: the conditioning image
        assert np.abs(cells[r, 0] - _expected_cell(path)).mean() < 8
    _assert_not_constant(cells[:, 1:])

    npz = np.load(out / "a.npz")
    assert npz["samples"].shape == (2, 3, S, S, 3) and npz["samples"].dtype == np.uint8
    assert npz["features"].shape == (2, SSL_DIM)
    assert [p.split("/")[-1] for p in npz["paths"]] == [p.split("/")[-1] for p in used]
    np.testing.assert_allclose(npz["features"], _features(encoder, used), rtol=1e-4, atol=1e-4)
    assert str(npz["sampler"]) == "ddpm" and int(npz["seed"]) == 7
    # the grid shows the npz's samples, in order (compared on 4x4 block means: JPEG is lossy)
    assert np.abs(_blocks(cells[:, 1:]) - _blocks(npz["samples"])).mean() < 8
    assert np.abs(_blocks(cells[:, 1:]) - _blocks(npz["samples"][::-1])).mean() > 8

    # The README's command line, model flags and legacy flags included, on a checkpoint that
    # records its own flags: they are overridden (with a warning) and the same seed gives the same
    # samples. (In this process, through the script's main: the run above was the script itself.)
    from guided_diffusion_rcdm.cli.sample import main as image_sample

    with pytest.warns(UserWarning, match=r"--image_size 128 \(checkpoint: 32\)"):
        assert image_sample("sample", [str(a) for a in (*MODEL_FLAGS_128, *LEGACY, *common, "--name", "b",
                                                        "--type_model", "resnet18", "--pretrained_encoder",
                                                        "False")]) == 0
    again = np.load(out / "b.npz")
    assert np.array_equal(again["samples"], npz["samples"])
    assert np.array_equal(again["features"], npz["features"])


def test_interpolation_script(env, encoder):
    first, second = env["photos"][0], env["photos"][2]
    out = env["root"] / "out_interp"
    run_script("image_sample_interpolation.py", "--model_path", env["ckpt"], "--batch_size", "4",
               "--timestep_respacing", "5", "--use_ddim", "True", "--first_image_path", first,
               "--second_image_path", second, "--out_dir", out, "--dist", *LEGACY)
    cells = grid_cells(out / "interpolation.jpeg", rows=2, cols=6, size=S)
    for r in range(2):
        assert np.abs(cells[r, 0] - _expected_cell(first)).mean() < 8
        assert np.abs(cells[r, -1] - _expected_cell(second)).mean() < 8
    _assert_not_constant(cells[:, 1:-1])

    npz = np.load(out / "interpolation.npz")
    assert npz["samples"].shape == (2, 4, S, S, 3) and list(npz["methods"]) == ["linear", "spherical"]
    assert npz["alphas"].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1]) and str(npz["sampler"]) == "ddim"
    ends = npz["endpoint_features"]
    np.testing.assert_allclose(ends, _features(encoder, [first, second]), rtol=1e-4, atol=1e-4)
    for m in range(2):  # alpha 0 and 1 are exactly the two images' representations
        assert np.array_equal(npz["features"][m, 0], ends[0])
        assert np.array_equal(npz["features"][m, -1], ends[1])
    # same representation, same noise: same sample; the representation alone changes the rest
    assert np.array_equal(npz["samples"][0, 0], npz["samples"][1, 0])
    assert np.array_equal(npz["samples"][0, -1], npz["samples"][1, -1])
    assert np.abs(npz["samples"][0, 0].astype(int) - npz["samples"][0, -1]).mean() > 1
    assert npz["ssl_distances"].shape == (2, 4)


def test_manipulation_script(env, encoder):
    source, target = env["photos"][0], env["photos"][2]
    out = env["root"] / "out_manip"
    run_script("image_sample_manipulation.py", "--model_path", env["ckpt"], "--batch_size", "3",
               "--timestep_respacing", "5", "--dist", "--image_path", source, "--folder_nn_path",
               env["root"] / "photos", "--image_target_path", target, "--n_neighbors", "4",
               "--n_common", "2", "--out_dir", out, "--sampler", "dpm++", "--steps", "3")
    cells = grid_cells(out / "manipulation.jpeg", rows=3, cols=4, size=S)
    for r, path in enumerate((source, source, target)):
        assert np.abs(cells[r, 0] - _expected_cell(path)).mean() < 8
    _assert_not_constant(cells[:, 1:])

    npz = np.load(out / "manipulation.npz")
    original, zeroed, moved = npz["features"]
    dims = npz["dims"]
    np.testing.assert_allclose(original, _features(encoder, [source])[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(npz["target_feature"], _features(encoder, [target])[0], rtol=1e-4, atol=1e-4)
    assert np.array_equal(dims, np.nonzero(npz["counts"] > 2)[0]) and 0 < len(dims) < SSL_DIM
    others = np.setdiff1d(np.arange(SSL_DIM), dims)
    assert (zeroed[dims] == 0).all() and np.array_equal(zeroed[others], original[others])
    assert np.array_equal(moved[dims], npz["target_feature"][dims])
    assert np.array_equal(moved[others], original[others])
    assert len(npz["neighbors"]) == 4 and str(npz["neighbors"][0]).endswith(source.split("/")[-1])
    assert npz["samples"].shape == (3, 3, S, S, 3) and npz["ssl_distances"].shape == (3, 3)
    assert str(npz["sampler"]) == "dpm++"


def test_encoder_input_scaling_is_the_checkpoints_else_the_encoders_own():
    from guided_diffusion_rcdm.cli import sampling as su
    from guided_diffusion_rcdm.encoders import EncoderSpec, given_fields
    from guided_diffusion_rcdm.get_rcdm_models import published_meta

    parser = su.create_argparser()

    def scaling(argv, meta):
        args = parse_args(parser, argv)
        return EncoderSpec.resolve(given_fields(args, args.explicit), meta.get("encoder")).input_normalize

    # a published RCDM checkpoint: [-1, 1], as its encoder was fed in training
    assert scaling(["--type_model", "supervised"], published_meta("supervised", False)) == "minus_one_one"
    # the checkpoint's record wins over the encoder's own scaling
    recorded = {"encoder": {"type_model": "resnet18", "use_head": False, "normalize": "minus_one_one"}}
    assert scaling([], recorded) == "minus_one_one"
    # nothing recorded: the encoder's own
    assert scaling(["--type_model", "resnet18"], {}) == "imagenet"
    assert scaling(["--type_model", "dino"], {}) == "minus_one_one"
    # the flag overrides both
    assert scaling(["--encoder_normalize", "imagenet"], recorded) == "imagenet"
