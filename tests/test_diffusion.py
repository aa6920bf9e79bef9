"""Respacing forms, schedules, schedule samplers and flag validation."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion_rcdm import gaussian_diffusion as gd
from guided_diffusion_rcdm.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from guided_diffusion_rcdm.respace import space_timesteps
from guided_diffusion_rcdm.script_util import (
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def test_respacing_even_count():
    steps = space_timesteps(1000, "100")
    assert len(steps) == 100 and min(steps) == 0 and max(steps) == 999


def test_respacing_ddim_uses_a_fixed_stride():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))


def test_respacing_sections():
    steps = sorted(space_timesteps(300, "10,20,30"))
    assert len(steps) == 60
    first, second, third = steps[:10], steps[10:30], steps[30:]
    assert first[0] == 0 and first[-1] == 99 and all(s < 100 for s in first)
    assert all(100 <= s < 200 for s in second) and second[-1] == 199
    assert all(200 <= s < 300 for s in third) and third[-1] == 299


def test_respacing_list_and_full():
    assert space_timesteps(10, [10]) == set(range(10))
    assert space_timesteps(10, [2, 3]) == {0, 4, 5, 7, 9}


@pytest.mark.parametrize(
    "spacing, message",
    [("ddim600", "no integer stride"), ("ddimx", "ddimN"), ("2000", "cannot take"), ("ten", "expected a count")],
)
def test_respacing_errors(spacing, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, spacing)


@pytest.mark.parametrize("spacing", ["100", "ddim25", "10,20,30", "1000", ""])
def test_respaced_diffusion_keeps_the_noise_levels(spacing):
    base = create_gaussian_diffusion(steps=1000)
    spaced = create_gaussian_diffusion(steps=1000, timestep_respacing=spacing)
    kept = spaced.timestep_map
    assert spaced.num_timesteps == len(kept) == (1000 if spacing in ("", "1000") else len(space_timesteps(1000, spacing)))
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10)


def test_respaced_model_sees_original_timesteps():
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.clone())
        return torch.zeros_like(x)

    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim25")
    x = torch.zeros(1, 3, 4, 4)
    diffusion.ddim_sample_loop(model, (1, 3, 4, 4), noise=x, device="cpu")
    assert [int(t) for t in seen] == list(range(960, -1, -40))

    rescaled = create_gaussian_diffusion(steps=500, timestep_respacing="5", rescale_timesteps=True)
    seen.clear()
    rescaled.p_mean_variance(model, x, torch.tensor([4]))
    assert seen[0].dtype.is_floating_point and float(seen[0]) == pytest.approx(rescaled.timestep_map[4] * 2.0)


def test_schedules():
    linear = gd.get_named_beta_schedule("linear", 1000)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    assert gd.get_named_beta_schedule("linear", 100)[-1] == pytest.approx(0.2)
    cosine = gd.get_named_beta_schedule("cosine", 1000)
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert np.cumprod(1 - cosine)[499] == pytest.approx(alpha_bar(0.5) / alpha_bar(0), rel=1e-6)
    assert cosine.max() <= 0.999
    with pytest.raises(ValueError, match="noise_schedule"):
        gd.get_named_beta_schedule("quadratic", 1000)


def test_uniform_sampler_is_unbiased():
    diffusion = create_gaussian_diffusion(steps=50)
    sampler = create_named_schedule_sampler("uniform", diffusion)
    assert isinstance(sampler, UniformSampler)
    t, w = sampler.sample(4000, "cpu")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 50
    assert torch.all(w == 1)
    assert len(torch.unique(t)) == 50


def test_loss_second_moment_sampler_follows_the_losses():
    diffusion = create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(sampler, LossSecondMomentResampler)
    assert np.all(sampler.weights() == 1)  # uniform until warmed up
    losses = torch.arange(1, 11, dtype=torch.float64)  # loss of step t is t + 1
    for _ in range(sampler.history_per_term):
        sampler.update_with_local_losses(torch.arange(10), losses)
    weights = sampler.weights()
    expected = np.arange(1, 11) / np.arange(1, 11).sum() * (1 - sampler.uniform_prob) + sampler.uniform_prob / 10
    np.testing.assert_allclose(weights, expected)
    np.random.seed(0)
    t, w = sampler.sample(20000, "cpu")
    counts = torch.bincount(t, minlength=10).double() / 20000
    np.testing.assert_allclose(counts.numpy(), expected, atol=0.01)
    # importance weights undo the non-uniform sampling
    assert float(w.double().mean()) == pytest.approx(1.0, abs=0.05)
    # the history is a sliding window of the last losses, and survives a state round trip
    sampler.update_with_local_losses(torch.tensor([0]), torch.tensor([100.0]))
    assert sampler._loss_history[0, -1] == 100.0
    clone = create_named_schedule_sampler("loss-second-moment", diffusion)
    clone.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(clone.weights(), sampler.weights())


def test_unknown_schedule_sampler():
    with pytest.raises(ValueError, match="schedule_sampler"):
        create_named_schedule_sampler("importance", create_gaussian_diffusion(steps=10, noise_schedule="cosine"))


def _args(**overrides):
    args = model_and_diffusion_defaults()
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(image_size=48), "`image_size` 48 without `channel_mult`"),
        (dict(image_size=32, channel_mult="1,2", num_channels=48), "`num_channels` 48"),
        (dict(image_size=32, channel_mult="1,1.5", num_channels=32), "GroupNorm"),
        (dict(noise_schedule="sqrt"), "`noise_schedule` 'sqrt'"),
        (dict(timestep_respacing="ddim600"), "`timestep_respacing`"),
        (dict(diffusion_steps=0), "`diffusion_steps`"),
        (dict(diffusion_steps=20), "diffusion_steps=20 is too few"),
        (dict(image_size=36, channel_mult="1,2,2,2"), "not divisible by 8"),
        (dict(image_size=32, channel_mult="1,x"), "`channel_mult`"),
        (dict(attention_resolutions="16;8"), "`attention_resolutions`"),
        (dict(image_size=32, channel_mult="1,2", num_channels=32, num_heads=3), "`num_heads` 3"),
        (dict(image_size=32, channel_mult="1,2", num_head_channels=24), "`num_head_channels` 24"),
    ],
)
def test_invalid_flags_fail_before_building(overrides, flag, monkeypatch):
    built = []
    import guided_diffusion_rcdm.script_util as su

    original = su.UNetModel
    monkeypatch.setattr(su, "UNetModel", lambda *a, **k: built.append(1) or original(*a, **k))
    with pytest.raises(ValueError) as err:
        create_model_and_diffusion(**_args(**overrides), feat_cond=True, ssl_dim=8, G_shared=False)
    assert flag in str(err.value)
    assert not built, "the model was built before the flags were checked"


def test_training_losses_without_model_kwargs():
    diffusion = create_gaussian_diffusion(steps=10, learn_sigma=True, noise_schedule="cosine")
    model = lambda x, t: torch.zeros(x.shape[0], 6, *x.shape[2:])  # noqa: E731
    losses = diffusion.training_losses(model, torch.zeros(2, 3, 4, 4), torch.tensor([0, 9]))
    assert set(losses) == {"loss", "mse", "vb"}
    assert torch.isfinite(losses["loss"]).all()


def _tiny_model_and_diffusion(**extra):
    flags = {**model_and_diffusion_defaults(), **dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
        diffusion_steps=40), **extra}
    return create_model_and_diffusion(**flags)


@pytest.mark.parametrize("extra", [dict(learn_sigma=True, timestep_respacing="8"),
                                   dict(learn_sigma=False, predict_xstart=True)])
def test_cached_schedule_tables_gather_what_the_numpy_arrays_hold(extra):
    _, diffusion = _tiny_model_and_diffusion(**extra)
    t = torch.arange(diffusion.num_timesteps).flip(0)
    shape = (len(t), 3, 2, 2)
    names = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
             "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
             "posterior_mean_coef1", "posterior_mean_coef2"]
    for name in names:
        assert torch.equal(diffusion._gather(name, t, shape), gd._extract_into_tensor(getattr(diffusion, name), t, shape))
    d = diffusion
    derived = {"one_minus_alphas_cumprod": 1.0 - d.alphas_cumprod, "log_betas": np.log(d.betas),
               "recip_posterior_mean_coef1": 1.0 / d.posterior_mean_coef1,
               "posterior_mean_coef2_over_coef1": d.posterior_mean_coef2 / d.posterior_mean_coef1,
               "fixed_large_variance": np.append(d.posterior_variance[1], d.betas[1:]),
               "fixed_large_log_variance": np.log(np.append(d.posterior_variance[1], d.betas[1:]))}
    for name, array in derived.items():
        assert torch.equal(diffusion._gather(name, t, shape), gd._extract_into_tensor(array, t, shape)), name


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_sampling_copies_each_schedule_table_to_the_device_once(sampler):
    from _host_traffic import HostTraffic
    from guided_diffusion_rcdm.samplers import sample_images

    model, diffusion = _tiny_model_and_diffusion(learn_sigma=True, timestep_respacing="6")
    model.eval()
    sample_images(model, diffusion, (2, 3, 16, 16), sampler=sampler, eta=0.5)
    tables = dict(diffusion._device_tables)
    assert tables and all(device == torch.device("cpu") for _, device in tables)
    # A second run, six steps: no table is made again, no host data becomes a tensor, no value is
    # read back (each would be a host-device synchronisation per step on a GPU).
    with HostTraffic() as traffic:
        sample_images(model, diffusion, (2, 3, 16, 16), sampler=sampler, eta=0.5)
    assert diffusion._device_tables.keys() == tables.keys()
    assert all(diffusion._device_tables[k] is v for k, v in tables.items())
    assert traffic.host_tensors <= 1 and traffic.reads == 0, traffic.counts  # dpm++: its abar, once per run
