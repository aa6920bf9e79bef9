"""Metrics on cases with a known answer: representation fidelity (rank / top-k / MRR and its
shuffled control), the Fréchet distance, the Inception Score, the FID Inception network's weights
file, reference statistics cached by content, and scripts/image_eval.py end to end on a real
image_sample.py file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion_rcdm.cli.flags import parse_args  # noqa: E402
from guided_diffusion_rcdm import metrics as M
from guided_diffusion_rcdm.encoders import encode_images

from _sampling_helpers import REPO, SCRIPTS, TINY_ARGV, make_tiny_checkpoint, photo, write_photos


# ----------------------------------------------------------------------------- fidelity


def test_chance_scores_are_the_analytic_values():
    c = M.chance_scores(4)
    assert c["mean_rank"] == pytest.approx(2.5)
    assert c["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert c["top1"] == pytest.approx(0.25)
    assert c["top5"] == pytest.approx(1.0)  # 5 > 4 images: always in the top 5


@pytest.mark.parametrize("metric", M.METRICS)
def test_perfect_generator_has_rank_one_and_mrr_one(metric):
    torch.manual_seed(0)
    conds = torch.randn(12, 64)
    samples = conds[:, None].repeat(1, 3, 1)  # every sample IS its conditioning representation
    res = M.representation_fidelity(samples, conds, metric=metric, num_shuffles=20)
    assert res.model.mean_rank == 1.0 and res.model.mrr == 1.0 and res.model.top1 == 1.0
    assert res.model.per_condition_rank == [1.0] * 12
    assert res.shuffled.mrr < 0.5  # the same samples scored against shuffled conditioning


def test_known_ranks():
    conds = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Sample 0 is closest to condition 1, then condition 0: rank 2. Sample 1: rank 1. Sample 2: rank 3.
    samples = torch.tensor([[0.5, 1.0], [0.0, 1.0], [1.0, 0.2]])
    res = M.representation_fidelity(samples, conds, metric="cosine")
    assert res.model.per_condition_rank == [2.0, 1.0, 3.0]
    assert res.model.mean_rank == pytest.approx(2.0)
    assert res.model.top1 == pytest.approx(1 / 3)
    assert res.model.mrr == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_shuffled_control_is_at_chance():
    rng = np.random.default_rng(1)
    conds = rng.normal(size=(50, 32))
    samples = conds[:, None] + 0.3 * rng.normal(size=(50, 4, 32))  # a good but imperfect generator
    res = M.representation_fidelity(samples, conds, num_shuffles=300, seed=3)
    chance = M.chance_scores(50)
    assert res.model.mrr > 0.9
    assert res.shuffled.mrr == pytest.approx(chance["mrr"], abs=0.01)
    assert res.shuffled.mean_rank == pytest.approx(chance["mean_rank"], abs=1.0)
    assert res.shuffled.top1 == pytest.approx(chance["top1"], abs=0.01)


def test_generator_that_ignores_conditioning_scores_chance():
    rng = np.random.default_rng(2)
    conds = rng.normal(size=(40, 16))
    samples = rng.normal(size=(40, 25, 16))  # unrelated to the conditioning
    res = M.representation_fidelity(samples, conds)
    assert res.model.mrr == pytest.approx(M.chance_scores(40)["mrr"], abs=0.03)


def test_ties_never_flatter_an_encoder_that_sees_no_difference():
    conds = torch.ones(7, 5)  # a constant encoder: every representation identical
    res = M.representation_fidelity(torch.ones(7, 2, 5), conds, metric="l2")
    chance = M.chance_scores(7)
    for key in ("mean_rank", "mrr", "top1", "top5"):
        assert getattr(res.model, key) == pytest.approx(chance[key])


def test_fidelity_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="N x K x D"):
        M.representation_fidelity(torch.zeros(3, 2, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="at least 2"):
        M.representation_fidelity(torch.zeros(1, 2, 8), torch.zeros(1, 8))


def test_real_encoder_on_real_photos_ranks_the_photos_themselves_first():
    """samples = the conditioning photos, through the real encoder path (uint8 -> 224 -> encoder)."""
    from guided_diffusion_rcdm.get_ssl_models import get_model
    from guided_diffusion_rcdm.image_datasets import center_crop_arr, encoder_input

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    images = [photo(n, 230) for n in names]
    encoder = get_model("resnet18", pretrained=False)
    conds = encoder(torch.stack([encoder_input(im) for im in images]))
    samples = np.stack([center_crop_arr(im, 224) for im in images])
    feats = encode_images(encoder, samples, batch_size=2).features
    res = M.representation_fidelity(feats[:, None], conds)
    assert res.model.mean_rank == 1.0 and res.model.mrr == 1.0


# ----------------------------------------------------------------------------- FID / IS arithmetic


def test_frechet_distance_of_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_a_singular_covariance_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(10, 64))  # 10 samples, 64 dims: rank-deficient
    mu, sigma = M.feature_statistics(feats)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    factor = M.covariance_factor(feats)
    np.testing.assert_allclose(factor.T @ factor, sigma, atol=1e-12)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma, factor1=factor)) < 1e-9 * np.trace(sigma)


def test_low_rank_path_agrees_with_the_full_one():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(30, 12)) * 2 + 1
    (mu1, s1), (mu2, s2) = M.feature_statistics(a), M.feature_statistics(b)
    full = M.frechet_distance(mu1, s1, mu2, s2)
    low = M.frechet_distance(mu1, s1, mu2, s2, factor1=M.covariance_factor(a))
    # s2 is full rank, so scipy's sqrtm of s1 @ s2 is well defined here
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert low == pytest.approx(full, rel=1e-9) and full == pytest.approx(expected, rel=1e-6)


def test_inception_score_extremes():
    assert M.inception_score(np.zeros((20, 1008)), splits=2)[0] == pytest.approx(1.0)
    confident = np.full((40, 10), -50.0)
    confident[np.arange(40), np.arange(40) % 10] = 50.0  # each class predicted surely, equally often
    mean, std = M.inception_score(confident, splits=4)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_splits_at_the_original_boundaries():
    # Part i is images [i*N//splits, (i+1)*N//splits), as in the original IS code; np.array_split
    # puts the remainder in the first parts instead, which moves the score when N % splits != 0.
    rng = np.random.default_rng(0)
    n, splits = 1003, 10
    logits = rng.normal(size=(n, 50)) * np.linspace(0.5, 4.0, n)[:, None]  # sharper towards the end
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    expected = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        kl = (part * (np.log(part) - np.log(part.mean(axis=0)))).sum(axis=1).mean()
        expected.append(np.exp(kl))
    mean, std = M.inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert std == pytest.approx(np.std(expected), rel=1e-12)


# ----------------------------------------------------------------------------- Inception network and files


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A weights file in the published layout (random values: only the plumbing is tested)."""
    path = tmp_path_factory.mktemp("inception") / M.FID_WEIGHTS_FILE
    torch.save(M.random_inception(seed=0).state_dict(), path)
    return str(path)


def test_inception_weights_file_loads_strictly_and_gives_the_same_network(inception_file):
    net = M.load_inception(inception_file)
    ref = M.random_inception(seed=0)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        (p1, l1), (p2, l2) = net(x), ref(x)
    assert p1.shape == (2, 2048) and l1.shape == (2, 1008)
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(l1, l2)
    assert net.weights_source == inception_file


def test_inception_weights_without_batch_counters_load(tmp_path):
    """Files saved by old PyTorch lack BatchNorm's num_batches_tracked: they load all the same."""
    sd = {k: v for k, v in M.random_inception(seed=0).state_dict().items() if "num_batches_tracked" not in k}
    torch.save(sd, tmp_path / "old.pth")
    net = M.load_inception(str(tmp_path / "old.pth"))
    assert not any(t.is_meta for t in net.state_dict().values())
    assert net.Conv2d_1a_3x3.bn.num_batches_tracked.dtype == torch.long


def test_missing_inception_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(M.InceptionWeightsMissing, match="pass `path` FILE") as err:
        M.load_inception(download=False)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / M.FID_WEIGHTS_FILE) in str(err.value)
    # An offline mirror that lacks the file: the same message, and no network is contacted.
    monkeypatch.setenv("RCDM_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(M.InceptionWeightsMissing, match="RCDM_MIRROR"):
        M.load_inception()
    with pytest.raises(M.InceptionWeightsMissing, match="no such file"):
        M.load_inception(str(tmp_path / "nothing.pth"))


def test_inception_weights_from_the_mirror_directory(tmp_path, monkeypatch, inception_file):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    os.link(inception_file, mirror / M.FID_WEIGHTS_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("RCDM_MIRROR", str(mirror))
    assert M.load_inception().weights_source == str(mirror / M.FID_WEIGHTS_FILE)


@pytest.fixture(scope="module")
def net():
    return M.random_inception(seed=0)


def _photos(names, size=48):
    from guided_diffusion_rcdm.image_datasets import center_crop_arr

    return np.stack([center_crop_arr(photo(n, size), size) for n in names])


def test_fid_of_identical_sets_is_zero_and_of_different_sets_is_not(net, tmp_path):
    a = _photos(("astronaut", "coffee", "chelsea"))
    b = _photos(("immunohistochemistry", "hubble_deep_field", "camera"))
    np.savez(tmp_path / "a.npz", arr_0=a)
    same = M.fid_and_is(a, str(tmp_path / "a.npz"), net, cache_dir=tmp_path / "stats")
    other = M.fid_and_is(b, str(tmp_path / "a.npz"), net, cache_dir=tmp_path / "stats")
    assert other.fid > 1e-3
    assert abs(same.fid) < 1e-9 * other.fid
    assert same.num_samples == 3 and same.num_reference == 3 and same.inception_score >= 1.0


def test_reference_statistics_are_cached_by_content(net, tmp_path):
    folder = tmp_path / "ref"
    write_photos(folder, ("astronaut", "coffee"), short_side=40)
    cache = tmp_path / "cache"
    first = M.reference_statistics(str(folder), net, size=32, cache_dir=cache)
    assert not first.from_cache and os.path.isfile(first.cache_path)
    again = M.reference_statistics(str(folder), net, size=32, cache_dir=cache)
    assert again.from_cache and again.cache_path == first.cache_path
    np.testing.assert_array_equal(again.sigma, first.sigma)
    # Another size or other content: other statistics, never the stale ones.
    assert M.reference_statistics(str(folder), net, size=40, cache_dir=cache).cache_path != first.cache_path
    photo("rocket", 40).save(sorted(folder.iterdir())[0])
    edited = M.reference_statistics(str(folder), net, size=32, cache_dir=cache)
    assert not edited.from_cache and edited.cache_path != first.cache_path
    assert not np.allclose(edited.mu, first.mu)
    # A statistics .npz (mu, sigma) is used as it is.
    stats = M.reference_statistics(edited.cache_path, net, size=32)
    np.testing.assert_array_equal(stats.mu, edited.mu)


def test_npz_reference_of_another_size_goes_straight_to_the_network_by_default(net, tmp_path):
    from PIL import Image

    from guided_diffusion_rcdm.image_datasets import center_crop_arr

    ref = _photos(("astronaut", "coffee", "chelsea"), size=48)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    cache = tmp_path / "cache"
    # pytorch-fid's way: each 48x48 image resized to 299 by the network, whatever the samples' size
    default = M.reference_statistics(str(tmp_path / "ref.npz"), net, size=32, cache_dir=cache)
    direct = M.feature_statistics(M.inception_outputs(net, ref)[0])
    np.testing.assert_allclose(default.mu, direct[0], rtol=1e-12)
    assert "pytorch-fid" in default.preprocessing and "48x48" in default.preprocessing
    # the other way: centre-cropped to the samples' 32x32 first, cached separately
    cropped = M.reference_statistics(str(tmp_path / "ref.npz"), net, size=32, cache_dir=cache, ref_resize="crop")
    crops = np.stack([center_crop_arr(Image.fromarray(im), 32) for im in ref])
    np.testing.assert_allclose(cropped.mu, M.feature_statistics(M.inception_outputs(net, crops)[0])[0], rtol=1e-12)
    assert "centre-cropped" in cropped.preprocessing and cropped.cache_path != default.cache_path
    assert not np.allclose(cropped.mu, default.mu)
    again = M.reference_statistics(str(tmp_path / "ref.npz"), net, size=32, cache_dir=cache)
    assert again.from_cache and again.preprocessing == default.preprocessing
    result = M.fid_and_is(_photos(("camera", "rocket"), size=32), str(tmp_path / "ref.npz"), net, cache_dir=cache)
    assert result.reference_preprocessing == default.preprocessing
    with pytest.raises(ValueError, match="ref_resize"):
        M.reference_statistics(str(tmp_path / "ref.npz"), net, size=32, ref_resize="bicubic")


# ----------------------------------------------------------------------------- scripts/image_eval.py


def _run(*argv, env=None):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def sample_npz(tmp_path_factory):
    """A real image_sample.py output: 3 photos x 2 samples from a tiny untrained checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    write_photos(root / "photos", ("astronaut", "coffee", "chelsea"))
    ckpt = make_tiny_checkpoint(root / "tiny.pt")
    env = {**os.environ, "TORCH_HOME": str(root / "torch"), "RCDM_MIRROR": str(root / "no_mirror")}
    proc = _run(SCRIPTS / "image_sample.py", "--model_path", ckpt, "--data_dir", root / "photos",
                "--num_images", 3, "--batch_size", 2, "--out_dir", root, "--progress", "False",
                "--device", "cpu", *TINY_ARGV, env=env)
    assert proc.returncode == 0, proc.stderr
    return root / "samples.npz", env


def test_image_eval_scores_an_image_sample_file(sample_npz):
    npz, env = sample_npz
    proc = _run(SCRIPTS / "image_eval.py", npz, "--progress", "False", "--device", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "representation fidelity: 3 conditioning images x 2 samples" in proc.stdout
    assert "UNTRAINED" in proc.stdout  # the checkpoint records an untrained resnet18: said plainly
    scores = json.loads((npz.parent / "samples_eval.json").read_text())
    fid = scores["fidelity"]
    assert scores["encoder"]["type_model"] == "resnet18" and scores["encoder"]["pretrained"] is False
    assert 1.0 <= fid["model"]["mean_rank"] <= 3.0
    assert fid["chance"]["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_image_eval_perfect_samples_and_fid_with_a_local_inception_file(sample_npz, inception_file, tmp_path):
    """Samples replaced by the conditioning images themselves: rank 1, MRR 1; FID vs the same images 0."""
    npz, env = sample_npz
    with np.load(npz) as data:
        fields = dict(data)
    crops = _photos(("astronaut", "coffee", "chelsea"), size=224)
    from guided_diffusion_rcdm.get_ssl_models import get_model

    encoder = get_model("resnet18", pretrained=False)
    fields["features"] = encode_images(encoder, crops).features.numpy()
    fields["samples"] = crops[:, None]  # one sample per conditioning image: the image itself
    perfect = tmp_path / "perfect.npz"
    np.savez(perfect, **fields)
    np.savez(tmp_path / "ref.npz", arr_0=crops)
    proc = _run(SCRIPTS / "image_eval.py", perfect, "--progress", "False", "--device", "cpu",
                "--ref", tmp_path / "ref.npz", "--inception_path", inception_file, "--stats_cache",
                tmp_path / "stats", "--out_json", tmp_path / "scores.json", env=env)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["fidelity"]["model"]["mean_rank"] == 1.0 and scores["fidelity"]["model"]["mrr"] == 1.0
    assert abs(scores["fid_is"]["fid"]) < 1e-3
    assert "FID" in proc.stdout and "biased" in proc.stdout
    assert "reference: 224x224 images as they are" in proc.stdout


def test_image_eval_use_head_is_a_switch_as_in_the_other_scripts():
    from guided_diffusion_rcdm.cli import sampling as su
    from guided_diffusion_rcdm.cli import evaluate as image_eval

    parser = image_eval.create_argparser()
    recorded = {"type_model": "dino", "use_head": False}  # the sample file's own fields
    args = parse_args(parser, ["samples.npz", "--use_head"])
    assert args.use_head is True and image_eval.encoder_of_samples(args, recorded)[0].use_head is True
    args = parse_args(parser, ["samples.npz"])
    assert args.use_head is False and image_eval.encoder_of_samples(args, recorded)[0].use_head is False


def test_non_finite_features_and_a_zero_batch_size_are_clear_errors(sample_npz, capsys):
    from guided_diffusion_rcdm.cli import evaluate

    feats = torch.randn(3, 2, 16)
    conds = torch.randn(3, 16)
    feats[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="sample features hold 1 non-finite value"):
        M.representation_fidelity(feats, conds)
    conds[0, 0] = float("inf")
    with pytest.raises(ValueError, match="conditioning features hold 1 non-finite value"):
        M.representation_fidelity(torch.randn(3, 2, 16), conds)
    npz, _ = sample_npz
    with pytest.raises(SystemExit) as exit_:  # refused by the parser: the flag's declared range
        evaluate.main([str(npz), "--batch_size", "0", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "--batch_size: 0 is outside the accepted range" in capsys.readouterr().err
