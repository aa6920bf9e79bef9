"""Fast paths agree with the exact fp32 path: fused attention, bf16 autocast, channels-last."""

import pytest
import torch

from guided_diffusion_rcdm.cli.flags import parse_args  # noqa: E402
from guided_diffusion_rcdm.precision import AutocastModel, cpu_features, prepare_model, resolve_precision
from guided_diffusion_rcdm.script_util import create_model

_CPU = cpu_features()
# Compiling bf16 where the CPU emulates it takes minutes; the eager bf16 tests (tiny shapes) still run.
needs_native_bf16 = pytest.mark.skipif(
    not _CPU.native_bf16,
    reason=f"bf16 is emulated on this CPU ({_CPU.describe()}): its compiled bf16 kernels take minutes "
           "to build and run here; the eager bf16 tests cover bf16 on it",
)

CONFIG = dict(
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="16,8",
    num_heads=2, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True, feat_cond=True, ssl_dim=16,
)


def _random_model(seed: int, **flags):
    """The test UNet with every weight random (zero-initialised layers would hide differences)."""
    torch.manual_seed(seed)
    model = create_model(**{**CONFIG, **flags}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def model_and_inputs():
    model = _random_model(0)
    x, t, feat = torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), torch.randn(2, 16)
    with torch.no_grad():
        reference = model(x, t, feat=feat)
    return model, (x, t, feat), reference


def test_fused_attention_matches_the_original_arithmetic(model_and_inputs):
    model, (x, t, feat), reference = model_and_inputs
    try:
        model.set_fused_attention(True)
        with torch.no_grad():
            fused = model(x, t, feat=feat)
    finally:
        model.set_fused_attention(None)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)


def test_fp32_default_is_the_exact_path(model_and_inputs):
    model, (x, t, feat), reference = model_and_inputs
    assert prepare_model(model) is model
    with torch.no_grad():
        assert torch.equal(model(x, t, feat=feat), reference)


def test_bf16_autocast_is_close_and_returns_float32(model_and_inputs):
    model, (x, t, feat), reference = model_and_inputs
    fast = prepare_model(model, precision="bf16", device="cpu")
    assert isinstance(fast, AutocastModel)
    with torch.no_grad():
        out = fast(x, t, feat=feat)
    assert out.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: relative error of a few percent of the output scale
    scale = reference.abs().max()
    assert (out - reference).abs().max() < 0.05 * scale
    assert torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1] > 0.999


def test_channels_last_matches(model_and_inputs):
    model, (x, t, feat), reference = model_and_inputs
    fast = prepare_model(create_model(**CONFIG).eval(), channels_last=True, device="cpu")
    fast.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = fast(x.contiguous(memory_format=torch.channels_last), t, feat=feat)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_precision_choice():
    assert resolve_precision(None, use_fp16=False, device="cpu") == "fp32"
    assert resolve_precision(None, use_fp16=True, device="cpu") == "bf16"
    assert resolve_precision("bf16", device="cpu") == "bf16"
    assert resolve_precision(None, use_fp16=True, device="cuda") == "fp16"
    with pytest.raises(ValueError, match="`precision`"):
        resolve_precision("int8", device="cpu")


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy-order", "new-order"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_token_major_fused_attention_matches_einsum(new_order, channels_last):
    # The fused path reads q, k, v as token-major views of one linear map; both head layouts
    # must split the channels exactly as the original's channel-major reshape does.
    model = _random_model(1, use_new_attention_order=new_order, num_head_channels=-1)
    x, t, feat = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.randn(2, 16)
    with torch.no_grad():
        reference = model(x, t, feat=feat)
        model.set_fused_attention(True)
        if channels_last:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        fused = model(x, t, feat=feat)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_fused_attention_is_automatic_only_in_reduced_precision(model_and_inputs):
    from guided_diffusion_rcdm.unet import _use_fused

    x = torch.zeros(1, 4, 2, 2)
    assert not _use_fused(None, x)
    assert _use_fused(None, x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _use_fused(None, x)
    assert _use_fused(True, x) and not _use_fused(False, x.bfloat16())


def test_group_norm_in_bf16_skips_the_float32_copy_but_keeps_float32_statistics():
    from guided_diffusion_rcdm.nn import normalization

    torch.manual_seed(0)
    norm = normalization(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    # A large offset and a small spread: statistics accumulated in bf16 would lose the spread.
    x = 100 + torch.randn(2, 64, 8, 8)
    reference = norm(x)
    assert torch.equal(reference, torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, norm.eps))
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # The input itself is rounded to bf16 (about 0.4 at 100), which is the spread's scale:
    # compare against float32 statistics of the same rounded input.
    expected = torch.nn.functional.group_norm(x.bfloat16().float(), 32, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


# The compiled test's model: the smallest UNet that still has every kind of block (residual blocks
# with the representation's scale-shift, attention, a down- and an upsampling), at one shape. Compile
# time grows with the graph: the module's test model took minutes to compile on a bf16-native CPU.
COMPILE_CONFIG = dict(CONFIG, image_size=16, channel_mult="1,2", attention_resolutions="8", resblock_updown=False)


def check_compiled_and_frozen_bf16_model() -> None:
    """One real torch.compile: the --compile path of the scripts, on a tiny model and one batch shape."""
    model = _random_model(2, **COMPILE_CONFIG)
    x, t, feat = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randn(2, 16)
    with torch.no_grad():
        reference = model(x, t, feat=feat)
    eager = prepare_model(model, precision="bf16", device="cpu")
    compiled = prepare_model(model, precision="bf16", device="cpu", compile=True, freeze=True)
    with torch.no_grad():
        expected = eager(x, t, feat=feat)
        out = compiled(x, t, feat=feat)
    assert out.dtype == torch.float32
    scale = reference.abs().max()
    assert (out - expected).abs().max() < 0.02 * scale
    assert (out - reference).abs().max() < 0.05 * scale


@needs_native_bf16
def test_compiled_and_frozen_bf16_model_agrees_with_eager():
    # In a process of its own, compiling serially: a crash inside the compiler's generated code (one
    # was seen with OMP_NUM_THREADS=1) fails this test with its output instead of taking the test
    # worker, and the rest of this file, down with it.
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c",
                           "import test_precision; test_precision.check_compiled_and_frozen_bf16_model()"],
                          cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"


def _count_casts(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def test_sampling_casts_the_weights_once_for_the_whole_loop():
    from guided_diffusion_rcdm.samplers import respace_for_sampler, sample_images
    from guided_diffusion_rcdm.script_util import create_gaussian_diffusion

    model = _random_model(3, **COMPILE_CONFIG)
    fast = prepare_model(model, precision="bf16", device="cpu")
    diffusion = respace_for_sampler(create_gaussian_diffusion(steps=100, learn_sigma=True), "ddim", 5)
    conv_params = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d) for _ in m.parameters(False))
    shape, kwargs = (1, 3, 16, 16), {"feat": torch.ones(1, 16)}
    noise = torch.randn(shape)
    # the diffusion's own loop opens a fresh autocast region, and casts every weight, at each call ...
    every_step, casts_every_step = _count_casts(
        lambda: diffusion.ddim_sample_loop(fast, shape, noise=noise, model_kwargs=kwargs))
    # ... sample_images keeps one region open over the whole loop: the convolutions' weights and
    # biases are cast once instead of five times
    once, casts_once = _count_casts(
        lambda: sample_images(fast, diffusion, shape, sampler="ddim", noise=noise, model_kwargs=kwargs, device="cpu"))
    assert casts_every_step - casts_once >= 4 * conv_params
    torch.testing.assert_close(once, every_step, atol=0, rtol=0)


@pytest.fixture
def saved_fp32_math():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved


def test_tf32_is_both_or_neither_and_fid_features_stay_exact(saved_fp32_math):
    from guided_diffusion_rcdm.precision import exact_fp32_math, fp32_math_mode, set_fp32_math

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # PyTorch's default
    assert fp32_math_mode() == "mixed"
    set_fp32_math(True, fixed_shapes=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    assert fp32_math_mode() == "tf32"
    with exact_fp32_math():
        assert fp32_math_mode() == "exact"
    assert fp32_math_mode() == "tf32"
    set_fp32_math(False)
    assert fp32_math_mode() == "exact" and torch.backends.cudnn.benchmark  # fixed_shapes=None: unchanged


def test_every_script_takes_tf32_and_sampling_applies_it(saved_fp32_math, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _sampling_helpers import make_tiny_checkpoint
    from guided_diffusion_rcdm.cli import sampling as su
    from guided_diffusion_rcdm.precision import fp32_math_mode
    from guided_diffusion_rcdm.RCDM import from_flags
    from guided_diffusion_rcdm.cli import evaluate as image_eval, train as image_train
    from guided_diffusion_rcdm.apps import benchmark

    assert image_train.create_argparser().parse_args(["--tf32"]).tf32
    assert not image_train.create_argparser().parse_args([]).tf32
    assert benchmark.parse_args(["--tf32"]).tf32
    assert image_eval.create_argparser().parse_args(["x.npz", "--tf32"]).tf32
    ckpt = make_tiny_checkpoint(tmp_path / "model.pt")
    for flags, mode in (([], "exact"), (["--tf32"], "tf32")):
        args = parse_args(su.create_argparser(), ["--model_path", ckpt, "--pretrained_encoder", "False",
                                                     "--device", "cpu", *flags])
        from_flags(args)  # what RCDM(args) does: the commands' path
        assert fp32_math_mode() == mode


def test_a_gpu_that_is_not_there_is_named_in_one_line():
    from guided_diffusion_rcdm.precision import device_problem

    assert device_problem(torch.device("cpu"), 0) is None
    assert device_problem(torch.device("cuda"), 1) is None and device_problem(torch.device("cuda:1"), 2) is None
    assert device_problem(torch.device("cuda:9"), 2) == "this machine has 2 GPU(s): cuda:0 to cuda:1"
    assert device_problem(torch.device("cuda:0"), 0) == "no GPU is available here; use `device` cpu"
    from guided_diffusion_rcdm.apps import benchmark

    assert benchmark.main(["--device", "cuda:9"]) == 2 and benchmark.main(["--device", "gpu"]) == 2


def test_a_compiled_model_takes_new_batch_sizes_without_recompiling():
    # A real torch.compile with a backend that runs each captured graph as it is and counts it.
    import torch._dynamo

    from guided_diffusion_rcdm.samplers import GuidedModel

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = _random_model(1, feat_drop_prob=0.5, **COMPILE_CONFIG)  # guidance needs a learned null representation
    compiled = prepare_model(model, compile=counting_backend)
    with torch.no_grad():
        compiled(torch.randn(3, 3, 16, 16), torch.randint(0, 1000, (3,)), feat=torch.randn(3, 16))
        per_graph_set = len(graphs)  # the UNet's graphs (more than one where it breaks the trace)
        # a training run's smaller last microbatch, another batch size, guidance's doubled batch
        out = compiled(torch.randn(2, 3, 16, 16), torch.randint(0, 1000, (2,)), feat=torch.randn(2, 16))
        assert out.shape == (2, 6, 16, 16)
        GuidedModel(compiled, 2.0)(torch.randn(5, 3, 16, 16), torch.randint(0, 1000, (5,)), feat=torch.randn(5, 16))
        assert len(graphs) == per_graph_set  # 3, 2 and 10 share the first graphs
        compiled(torch.randn(1, 3, 16, 16), torch.randint(0, 1000, (1,)), feat=torch.randn(1, 16))
        assert len(graphs) <= 2 * per_graph_set  # a batch of one is specialised: one more at most
        reference = model(torch.ones(4, 3, 16, 16), torch.full((4,), 7), feat=torch.ones(4, 16))
        assert torch.equal(compiled(torch.ones(4, 3, 16, 16), torch.full((4,), 7), feat=torch.ones(4, 16)), reference)
    torch._dynamo.reset()
