"""Real multi-process training on CPU (gloo over 127.0.0.1): torchrun and mpiexec."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_photos import make_photo_dir
from helpers_hub import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run_with_submitit.py
WORKER = REPO / "tests" / "_train_dist_worker.py"
STEPS = 3



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_dir(tmp_path_factory.mktemp("photos"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in [k for k in env if k.startswith(("SLURM_", "SUBMITIT_", "PMI_", "OMPI_"))] + ["RANK", "WORLD_SIZE"]:
        env.pop(key, None)
    return env


def _check_two_ranks(out: Path, launcher: str) -> None:
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["launcher"] == r1["launcher"] == launcher
    assert r0["world_size"] == r1["world_size"] == 2 and r0["step"] == r1["step"] == STEPS
    # the ranks read different images ...
    assert not torch.equal(r0["seen"], r1["seen"])
    # ... and started from different random weights, yet hold identical parameters and EMA
    for a, b in zip(r0["params"] + r0["ema"], r1["params"] + r1["ema"]):
        assert torch.equal(a, b)
    # the loss-second-moment sampler saw both ranks' losses: 2 ranks x 2 images x STEPS steps
    assert int(r0["loss_counts"].sum()) == int(r1["loss_counts"].sum()) == 2 * 2 * STEPS
    assert torch.equal(r0["loss_counts"], r1["loss_counts"])
    # rank 0 alone writes the logs and checkpoints
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cache", "ema_0.9_000003.pt", "log.txt", "model000003.pt", "opt000003.pt",
                     "progress.csv", "rank0.pt", "rank1.pt"]
    # the feature cache was encoded by both ranks together, each writing its own shard
    assert sorted(p.name for p in (out / "cache").iterdir()) == [
        "index.json", "shard-0000-00000-of-00002.pt", "shard-0000-00001-of-00002.pt"]
    assert r0["cache_paths"] == r1["cache_paths"] and len(r0["cache_paths"]) == 6
    assert torch.equal(r0["cache_feats"], r1["cache_feats"])
    assert "encoding 6 image(s)" in (out / "log.txt").read_text()
    assert (out / "progress.csv").read_text().count("\n") == 2


def test_torchrun_two_cpu_ranks_stay_identical(photos, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(WORKER), photos, str(out), str(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_two_ranks(out, "torchrun")


def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


@pytest.mark.skipif(_mpiexec() is None, reason="needs mpi4py and mpiexec (pip install mpi4py mpich)")
def test_mpiexec_two_cpu_ranks_stay_identical(photos, tmp_path):
    out = tmp_path / "run"
    cmd = [_mpiexec(), "-n", "2", sys.executable, str(WORKER), photos, str(out), str(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_two_ranks(out, "mpi")


def test_detect_reads_each_launchers_environment(monkeypatch):
    from guided_diffusion_rcdm import dist_util

    info = dist_util.detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                             "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (3, 8, 1, "node7", 1234)
    info = dist_util.detect({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
                             "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[012-013]",
                             "SLURM_JOB_ID": "4242"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr) == (5, 16, 1, "gpu012")
    assert info.launcher == "slurm" and 20000 <= info.master_port < 40000
    # an interactive allocation without srun is one process, not a hang waiting for others
    assert dist_util.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).world_size == 1
    assert dist_util.detect({}).launcher == "single"
    assert dist_util._first_slurm_host("a1,b[3-4]") == "a1"


# Three scenarios of TrainLoop under DDP, run one after the other by the same two processes (one
# process group: starting two interpreters and a rendezvous costs more than the scenarios do). Each
# writes its results under OUT/<scenario>/ for the tests below.
SCENARIOS_WORKER = r"""
import os
import sys
import warnings
import torch
from guided_diffusion_rcdm import dist_util, logger
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion_rcdm.train_util import TrainLoop

root = sys.argv[1]
warnings.simplefilter("always")  # DDP warns when a gradient's layout differs from its bucket's
dist_util.setup_dist()
rank = dist_util.get_rank()
FLAGS = {**model_and_diffusion_defaults(), **dict(image_size=16, num_channels=32, num_res_blocks=1,
         channel_mult="1,2", attention_resolutions="", diffusion_steps=50)}


def rank_batches(batch_size=2):
    g = torch.Generator().manual_seed(rank)
    while True:
        yield torch.randn(batch_size, 3, 16, 16, generator=g), {}


def loop(model, diffusion, out, **kwargs):
    options = dict(batch_size=2, microbatch=-1, lr=1e-4, ema_rate="0.9", log_interval=1000,
                   save_interval=100000, resume_checkpoint="", progress=False, out_dir=out)
    options.update(kwargs)
    return TrainLoop(model=model, diffusion=diffusion, **options)


def time_limit(out):
    # Rank 1 runs out of time after a second; rank 0's own limit is far away, as if its clock were slow.
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**FLAGS)
    train = loop(model, diffusion, out, data=rank_batches(), max_steps=100000,
                 max_seconds=1.0 if rank == 1 else 1e6)
    train.run_loop()
    torch.save({"step": train.step, "params": [p.detach().clone() for p in model.parameters()]},
               f"{out}/rank{rank}.pt")


def collectives(out, steps=30):
    counted = []
    agree = dist_util.max_over_ranks

    def counting(values):  # the real collective, counted
        counted.append(list(values))
        return agree(values)

    dist_util.max_over_ranks = counting
    try:
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**FLAGS)
        # agreements every 10 s of training: even on a machine so busy that a step takes a second or
        # two, 30 steps then hold only a few of them (every 2 s, the default, they were 23 of 30)
        train = loop(model, diffusion, out, data=rank_batches(), max_steps=steps, max_seconds=3600.0,
                     agree_seconds=10.0)
        train.run_loop()
    finally:
        dist_util.max_over_ranks = agree
    torch.save({"step": train.step, "collectives": len(counted),
                "params": [p.detach().clone() for p in model.parameters()]}, f"{out}/rank{rank}.pt")


def channels_last(out):
    flags = {**FLAGS, "attention_resolutions": "8", "learn_sigma": True}
    batch = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))  # each rank its own
    result = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**flags)
        os.makedirs(f"{out}/{layout}", exist_ok=True)

        def batches():
            while True:
                yield batch, {}

        train = loop(model, diffusion, f"{out}/{layout}", data=batches(), batch_size=4, microbatch=2, lr=1e-3,
                     save_interval=1000, max_steps=1, precision="fp32", seed=0,
                     channels_last=layout == "channels_last")
        train.run_loop()  # one step of two microbatches (DDP's no_sync, then the all-reduce), then a save

        def is_channels_last(tensors):
            return [t.is_contiguous(memory_format=torch.channels_last) for t in tensors if t.dim() == 4]

        result[layout] = {"grads": [p.grad.detach().contiguous() for p in train.params],
                          "params_cl": is_channels_last(train.params),
                          "grads_cl": is_channels_last(p.grad for p in train.params),
                          "ema_cl": is_channels_last(train.ema_params[0]),
                          "ema": [p.detach().contiguous() for p in train.ema_params[0]]}
    torch.save(result, f"{out}/rank{rank}.pt")


for scenario in (time_limit, collectives, channels_last):
    out = os.path.join(root, scenario.__name__)
    os.makedirs(out, exist_ok=True)
    logger.configure(dir=out, format_strs="log")
    scenario(out)
    logger.reset()
    print(f"=== {scenario.__name__} done", flush=True)
dist_util.cleanup()
"""


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """The two ranks' outputs (text) and results folder of SCENARIOS_WORKER."""
    root = tmp_path_factory.mktemp("ddp_scenarios")
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", SCENARIOS_WORKER, str(root)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    return root, outputs


def _ranks(folder: Path):
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_a_time_limit_stops_every_rank_at_the_same_step_and_saves(scenarios):
    out = scenarios[0] / "time_limit"
    r0, r1 = _ranks(out)
    assert 0 < r0["step"] == r1["step"] < 100000
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    step = r0["step"]
    assert (out / f"model{step:06d}.pt").is_file() and (out / f"ema_0.9_{step:06d}.pt").is_file()


def test_each_rank_takes_its_own_gpu_and_a_shared_one_is_a_clear_error():
    from guided_diffusion_rcdm import dist_util

    # all GPUs visible to every task: local rank = GPU index; SLURM-bound tasks see one GPU each
    assert [dist_util.local_device_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [dist_util.local_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="no GPU"):
        dist_util.local_device_index(0, 0)
    dist_util.check_distinct_devices(["n1/GPU-a", "n1/GPU-b", "n2/GPU-a", "n2/GPU-b"])
    dist_util.check_distinct_devices(["", ""])  # CPU ranks
    # two processes on one GPU of a 1-GPU host (e.g. --local --ngpus 2)
    with pytest.raises(RuntimeError, match=r"ranks 0 and 1 both drive the same GPU on n1 \(2 processes for 1 "
                                           r"distinct GPU\(s\) there\).*RCDM_DIST_BACKEND=gloo"):
        dist_util.check_distinct_devices(["n1/GPU-a", "n1/GPU-a"])
    with pytest.raises(RuntimeError, match="ranks 1 and 3"):
        dist_util.check_distinct_devices(["n1/GPU-a", "n1/GPU-b", "n2/GPU-c", "n1/GPU-b"])


def test_local_launch_needs_a_gpu_per_process():
    import run_with_submitit

    assert run_with_submitit.local_gpu_problem(2, 0) is None  # CPU processes
    assert run_with_submitit.local_gpu_problem(2, 2) is None
    assert run_with_submitit.local_gpu_problem(2, 1) == (
        "--ngpus 2: this machine has 1 GPU(s) and each training process needs its own; use --ngpus 1 or fewer")


def test_rendezvous_ports_avoid_the_ephemeral_range_and_differ_per_job_step(tmp_path):
    from guided_diffusion_rcdm import dist_util

    proc_file = tmp_path / "ip_local_port_range"
    proc_file.write_text("32768\t60999\n")
    assert dist_util.ephemeral_port_range(str(proc_file)) == (32768, 60999)
    assert dist_util.ephemeral_port_range(str(tmp_path / "absent")) == (32768, 60999)
    assert dist_util.rendezvous_ports((32768, 60999)) == range(20000, 32768)
    # a kernel whose ephemeral range starts low: the ports lie above it
    assert dist_util.rendezvous_ports((15000, 50000)) == range(50001, 65536)
    low, high = dist_util.ephemeral_port_range()
    ports = {dist_util._port_from_job_id("123456", step) for step in range(8)}
    assert len(ports) == 8 and all(not low <= p <= high for p in ports)
    # every task of one step computes the same port
    assert dist_util._port_from_job_id("123456_7", 2) == dist_util._port_from_job_id("123456_7", "2")
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "99"}
    assert (dist_util.detect({**env, "SLURM_STEP_ID": "0"}).master_port
            != dist_util.detect({**env, "SLURM_STEP_ID": "1"}).master_port)
    import run_with_submitit

    assert all(not low <= run_with_submitit._fresh_port() <= high for _ in range(50))


def test_the_rendezvous_address_is_never_loopback_for_other_hosts():
    from guided_diffusion_rcdm import dist_util

    # Debian's /etc/hosts maps the host's name to 127.0.1.1: such addresses are left out
    assert "127.0.1.1" not in dist_util.host_addresses()
    assert dist_util.host_addresses("localhost") == []
    # the route to a peer on loopback has a loopback source: not usable, the host's own name decides
    assert dist_util.address_towards("127.0.0.1") == "127.0.0.1"
    assert dist_util.rendezvous_address(["127.0.0.1"], own=["10.1.2.3"]) == "10.1.2.3"
    with pytest.raises(RuntimeError, match="set MASTER_ADDR"):
        dist_util.rendezvous_address([], own=[])
    # with a real peer address, the source address of the route to it
    own = dist_util.host_addresses()
    if own:
        assert dist_util.rendezvous_address([own[0]], own=[]) == own[0]


def test_channels_last_ddp_gradients_match_the_contiguous_ones(scenarios):
    # Channels-last is set before DDP lays out its gradient buckets and before the EMA copies are
    # made: the two ranks' averaged gradients equal the contiguous model's, with no layout copies.
    root, outputs = scenarios
    for output in outputs:
        assert "strides do not match bucket view strides" not in output, output[-2000:]
    out = root / "channels_last"
    r0, r1 = _ranks(out)
    for rank in (r0, r1):
        cl = rank["channels_last"]
        assert cl["params_cl"] and all(cl["params_cl"]) and all(cl["grads_cl"]) and all(cl["ema_cl"])
        for a, b in zip(cl["grads"], rank["contiguous"]["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for layout in ("contiguous", "channels_last"):  # both ranks hold the same averaged gradients
        for a, b in zip(r0[layout]["grads"] + r0[layout]["ema"], r1[layout]["grads"] + r1[layout]["ema"]):
            assert torch.equal(a, b)
    # the checkpoints are written in the standard layout whatever the training layout
    from guided_diffusion_rcdm import hub

    saved, _ = hub.load_checkpoint(out / "channels_last" / "ema_0.9_000001.pt")
    assert all(t.is_contiguous() for t in saved.values())


def test_a_time_limit_costs_no_collective_per_step(scenarios):
    # --max_minutes: each rank reads its clock every step, but the ranks agree (a collective and a
    # host sync) only every `agree_seconds` of training, not every step.
    r0, r1 = _ranks(scenarios[0] / "collectives")
    steps = 30
    assert r0["step"] == r1["step"] == steps
    assert r0["collectives"] == r1["collectives"]
    assert 1 <= r0["collectives"] < steps / 3, r0["collectives"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


RESUME_WORKER = r"""
import os, sys
import torch
from guided_diffusion_rcdm import dist_util, logger
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion_rcdm.train_util import TrainLoop

out, steps = sys.argv[1], int(sys.argv[2])
dist_util.setup_dist()
rank = dist_util.get_rank()
logger.configure(dir=out, format_strs="log")
torch.manual_seed(100 + rank)  # every rank builds different weights: only what it receives counts
flags = {**model_and_diffusion_defaults(), **dict(image_size=16, num_channels=32, num_res_blocks=1,
         channel_mult="1,2", attention_resolutions="", diffusion_steps=50)}
model, diffusion = create_model_and_diffusion(**flags)
opened = []

def record(event, args):  # every file this process opens, as Python opens it
    if event == "open" and isinstance(args[0], str) and args[0].startswith(out):
        opened.append(os.path.basename(args[0]))

sys.addaudithook(record)

def batches():
    g = torch.Generator().manual_seed(rank)
    while True:
        yield torch.randn(2, 3, 16, 16, generator=g), {}

loop = TrainLoop(model=model, diffusion=diffusion, data=batches(), batch_size=2, microbatch=-1, lr=1e-3,
                 ema_rate="0.9", log_interval=1000, save_interval=2, resume_checkpoint="", max_steps=steps,
                 progress=False, out_dir=out, seed=5)
resumed = {"step": loop.step, "params": [p.detach().clone() for p in model.parameters()],
           "ema": [p.clone() for p in loop.ema_params[0]],
           "opt": [t.clone() for s in loop.opt.state_dict()["state"].values() for k, t in sorted(s.items())]}
loop.run_loop()
opened_before_training = list(opened)
torch.save({"resumed": resumed, "opened": opened_before_training,
            "params": [p.detach().clone() for p in model.parameters()]}, f"{out}/rank{rank}_{steps}.pt")
"""


def test_on_resume_only_rank_0_reads_the_checkpoint_and_every_rank_gets_its_state(tmp_path):
    def launch(steps):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-c", RESUME_WORKER, str(tmp_path), str(steps)],
                                  env=dict(_env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        outputs = [p.communicate(timeout=240)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        return [torch.load(tmp_path / f"rank{r}_{steps}.pt", weights_only=True) for r in (0, 1)]

    launch(2)  # trains two steps and saves them
    r0, r1 = launch(4)  # resumes at step 2
    assert {"model000002.pt", "opt000002.pt", "ema_0.9_000002.pt"} <= set(r0["opened"])
    assert not [name for name in r1["opened"] if name.endswith(".pt")], r1["opened"]
    a, b = r0["resumed"], r1["resumed"]
    assert a["step"] == b["step"] == 2
    for key in ("params", "ema", "opt"):
        assert len(a[key]) == len(b[key]) > 0
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    from guided_diffusion_rcdm import hub

    saved, _ = hub.load_checkpoint(tmp_path / "model000002.pt")
    assert all(torch.equal(x, y) for x, y in zip(a["params"], saved.values()))
    assert all(torch.equal(x, y) for x, y in zip(r0["params"], r1["params"]))  # and they train alike
