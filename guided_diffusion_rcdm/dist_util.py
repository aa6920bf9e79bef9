"""One process group, however the job was launched.

`setup_dist()` reads the launcher's environment, in this order:

1. torchrun / `torch.distributed.run` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR/PORT`);
2. submitit (`SUBMITIT_EXECUTOR`, SLURM or local executor) or a plain `srun` step
   (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, first host of the node list);
3. `mpiexec` (`PMI_RANK` / `OMPI_COMM_WORLD_RANK`), through mpi4py, an optional extra: rank 0's
   host and a free port are broadcast over MPI;
4. otherwise one process, and no process group at all.

The backend is NCCL when CUDA is available and gloo otherwise (`RCDM_DIST_BACKEND` overrides it).
Each process takes GPU `local_rank % torch.cuda.device_count()`, so it works whether every task sees
all the node's GPUs or SLURM gives each task its own; nothing assumes a number of GPUs per node.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import subprocess
from typing import Iterable, Optional

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"


_INFO = DistInfo()
_DEVICE: Optional[torch.device] = None


# ----------------------------------------------------------------------------- queries


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return _INFO.local_rank


def is_main_process() -> bool:
    return get_rank() == 0


def launcher() -> str:
    """How this process was started: 'torchrun', 'submitit', 'slurm', 'mpi' or 'single'."""
    return _INFO.launcher


def dev() -> torch.device:
    """The device this process computes on."""
    if _DEVICE is not None:
        return _DEVICE
    if torch.cuda.is_available():
        return torch.device("cuda", _INFO.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- discovery


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_from_job_id(job_id: str) -> int:
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 20000 + int(digits[-6:]) % 20000


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, e.g. 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not first:
        return nodelist
    prefix, ranges = first.group(1), first.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _from_torchrun(env) -> DistInfo:
    return DistInfo(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
        launcher="torchrun",
    )


def _from_submitit(env) -> DistInfo:
    import submitit  # present whenever SUBMITIT_EXECUTOR is set

    job = submitit.JobEnvironment()
    addr = "127.0.0.1" if job.num_nodes == 1 else job.hostnames[0]
    return DistInfo(
        rank=job.global_rank,
        world_size=job.num_tasks,
        local_rank=job.local_rank,
        master_addr=env.get("MASTER_ADDR", addr),
        master_port=int(env.get("MASTER_PORT", _port_from_job_id(job.job_id))),
        launcher="submitit",
    )


def _from_slurm(env) -> DistInfo:
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    addr = "127.0.0.1" if nodes == 1 else _first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
    return DistInfo(
        rank=int(env["SLURM_PROCID"]),
        world_size=int(env["SLURM_STEP_NUM_TASKS"]),
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        master_addr=env.get("MASTER_ADDR", addr),
        master_port=int(env.get("MASTER_PORT", _port_from_job_id(env.get("SLURM_JOB_ID", "0")))),
        launcher="slurm",
    )


def _mpi_size_from_env(env) -> int:
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if key in env:
            return int(env[key])
    return 1


def _from_mpi(env) -> DistInfo:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            f"this process was started by mpiexec ({_mpi_size_from_env(env)} processes) but mpi4py "
            "is not installed: `pip install mpi4py` (the `mpi` extra of this package), or launch "
            "with torchrun / SLURM, which need no MPI"
        ) from exc
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    local_rank = int(
        env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", env.get("PMIX_LOCAL_RANK", -1)))
    )
    if local_rank < 0:  # count the ranks before us on the same host
        local_rank = hosts[:rank].count(hosts[rank])
    addr, port = None, None
    if rank == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.getfqdn())
        port = int(env.get("MASTER_PORT", _find_free_port()))
    addr, port = comm.bcast((env.get("MASTER_ADDR", addr), port), root=0)
    return DistInfo(rank, size, local_rank, addr, port, "mpi")


def detect(env=None) -> DistInfo:
    """Work out rank, world size, local rank and rendezvous address from the environment."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if env.get("SUBMITIT_EXECUTOR"):
        return _from_submitit(env)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return _from_slurm(env)
    if any(k in env for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")):
        if _mpi_size_from_env(env) > 1:
            return _from_mpi(env)
    return DistInfo()


# ----------------------------------------------------------------------------- setup


def setup_dist(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed from the launcher's environment (idempotent).

    With one process no process group is created: every helper here works without one.
    """
    global _INFO, _DEVICE
    if is_initialized():
        return _INFO
    info = detect()
    _INFO = info
    if torch.cuda.is_available():
        _DEVICE = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(_DEVICE)
    else:
        _DEVICE = torch.device("cpu")
    if info.world_size <= 1:
        return info
    backend = backend or os.environ.get("RCDM_DIST_BACKEND") or (
        "nccl" if torch.cuda.is_available() else "gloo"
    )
    os.environ["MASTER_ADDR"] = info.master_addr
    os.environ["MASTER_PORT"] = str(info.master_port)
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = _DEVICE
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return info


def init_distributed_mode(args=None) -> DistInfo:
    """The original scripts' entry point: set up, and record rank/gpu/world_size on `args`."""
    info = setup_dist()
    if args is not None:
        args.rank, args.world_size, args.gpu = info.rank, info.world_size, dev()
    return info


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[dev().index])
        else:
            dist.barrier()


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's tensors to every rank (in place)."""
    if not is_initialized():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (so that all ranks take the same branch)."""
    if not is_initialized():
        return bool(flag)
    box = torch.tensor([1.0 if flag else 0.0], device=dev())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def max_over_ranks(values: list[int]) -> list[int]:
    """The element-wise maximum of `values` over all ranks (one collective for several flags)."""
    if not is_initialized():
        return [int(v) for v in values]
    box = torch.tensor([float(v) for v in values], device=dev())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return [int(v) for v in box.tolist()]


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object, on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
