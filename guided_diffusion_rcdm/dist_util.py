"""One process group, however the job was launched.

`setup_dist()` reads the launcher's environment, in this order:

1. torchrun / `torch.distributed.run` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR/PORT`);
2. submitit (`SUBMITIT_EXECUTOR`, SLURM or local executor) or a plain `srun` step
   (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, first host of the node list; the port
   comes from the job and step ids, below the kernel's ephemeral port range);
3. `mpiexec` (`PMI_RANK` / `OMPI_COMM_WORLD_RANK`), through mpi4py, an optional extra: rank 0's
   address (its source address towards the other hosts, never the loopback 127.0.1.1 that Debian
   gives a host's own name) and a free port are broadcast over MPI;
4. otherwise one process, and no process group at all.

The backend is NCCL when CUDA is available and gloo otherwise (`RCDM_DIST_BACKEND` overrides it).
Each process takes GPU `local_rank % torch.cuda.device_count()`, so it works whether every task sees
all the node's GPUs or SLURM gives each task its own; nothing assumes a number of GPUs per node.
With NCCL, two processes on one GPU are an error (NCCL refuses them), so the ranks compare which GPU
each drives before the first NCCL call and stop with one line that says how many processes this
node can take; sharing a GPU on purpose (tests, debugging) works with `RCDM_DIST_BACKEND=gloo`.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import socket
import subprocess
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .errors import UsageError

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
        return torch.device("cuda", local_device_index(_INFO.local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def local_device_index(local_rank: int, device_count: int) -> int:
    """The GPU index a process takes: its local rank among the GPUs it sees.

    With more processes on a node than GPUs visible to each, the index wraps around: right when
    SLURM binds each task to its own GPU (each sees one, index 0), and a shared GPU otherwise,
    which `check_distinct_devices` reports.
    """
    if device_count < 1:
        raise UsageError("no GPU is visible to this process")
    return local_rank % device_count


def device_identity(device: torch.device) -> str:
    """A name for the physical device that is the same in every process that sees it."""
    if device.type != "cuda":
        return ""  # CPU processes never share a device in a way that matters
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"{socket.gethostname()}/{uuid if uuid is not None else device.index}"


def check_distinct_devices(identities: list[str]) -> None:
    """Raise if two ranks drive the same GPU; `identities[r]` is rank r's `device_identity`.

    The message names the ranks, the GPU and what to do instead.
    """
    first: dict[str, int] = {}
    for rank, ident in enumerate(identities):
        if not ident:
            continue
        if ident in first:
            host = ident.split("/", 1)[0]
            on_host = sum(1 for x in identities if x.split("/", 1)[0] == host)
            gpus = len({x for x in identities if x.split("/", 1)[0] == host})
            raise RuntimeError(
                f"ranks {first[ident]} and {rank} both drive the same GPU on {host} ({on_host} "
                f"processes for {gpus} distinct GPU(s) there), which NCCL refuses: launch one process per "
                "GPU (torchrun --nproc_per_node / run_with_submitit.py --ngpus = the node's GPU count), "
                "or set RCDM_DIST_BACKEND=gloo to share a GPU on purpose"
            )
        first[ident] = rank


# ----------------------------------------------------------------------------- discovery


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


LOWEST_PORT = 20000  # rendezvous ports are taken from LOWEST_PORT up to the ephemeral range


def ephemeral_port_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux's default when unreadable)."""
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def rendezvous_ports(ephemeral: tuple[int, int] | None = None) -> range:
    """Ports for a rendezvous: from LOWEST_PORT to just below the ephemeral range, so that no
    outgoing connection of the node holds the port (above the range when it starts too low)."""
    low, high = ephemeral or ephemeral_port_range()
    if low - LOWEST_PORT >= 1000:
        return range(LOWEST_PORT, low)
    return range(max(high + 1, LOWEST_PORT), 65536)


def _port_from_job_id(job_id: str, step_id: str | int = 0) -> int:
    """A port every task of one job step computes alike; two steps of a job get different ones."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    step = int(re.sub(r"\D", "", str(step_id)) or 0)
    ports = rendezvous_ports()
    return ports[(int(digits[-9:]) * 101 + step) % len(ports)]


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def host_addresses(hostname: str | None = None) -> list[str]:
    """The IPv4 addresses `hostname` (default: this host) resolves to, loopback ones left out.

    Debian and Ubuntu map the host's own name to 127.0.1.1 in /etc/hosts: no use to other nodes.
    """
    try:
        infos = socket.getaddrinfo(hostname or socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    found = []
    for *_, sockaddr in infos:
        if not _is_loopback(sockaddr[0]) and sockaddr[0] not in found:
            found.append(sockaddr[0])
    return found


def address_towards(peer: str) -> Optional[str]:
    """This host's address on the route to `peer` (a UDP socket is connected; nothing is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def rendezvous_address(peer_addresses: Iterable[str], own: Optional[list[str]] = None) -> str:
    """The address other hosts reach this one at: the source address of the route to a peer host,
    else a non-loopback address of this host's name; an error naming MASTER_ADDR otherwise."""
    for peer in peer_addresses:
        addr = address_towards(peer)
        if addr and not _is_loopback(addr):
            return addr
    own = host_addresses() if own is None else own
    if own:
        return own[0]
    raise RuntimeError(
        f"cannot find an address of {socket.gethostname()} that other nodes can reach (its name "
        "resolves only to loopback): set MASTER_ADDR to this node's address on the cluster network"
    )


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
        master_port=int(env.get("MASTER_PORT", _port_from_job_id(job.job_id, env.get("SLURM_STEP_ID", 0)))),
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
        master_port=int(env.get("MASTER_PORT", _port_from_job_id(env.get("SLURM_JOB_ID", "0"),
                                                                  env.get("SLURM_STEP_ID", 0)))),
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
    hostname = socket.gethostname()
    gathered = comm.allgather((hostname, host_addresses(hostname)))
    hosts = [h for h, _ in gathered]
    local_rank = int(
        env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", env.get("PMIX_LOCAL_RANK", -1)))
    )
    if local_rank < 0:  # count the ranks before us on the same host
        local_rank = hosts[:rank].count(hosts[rank])
    addr, port = None, None
    if rank == 0:
        peers = [a for h, addrs in gathered if h != hostname for a in addrs]
        addr = "127.0.0.1" if len(set(hosts)) == 1 else rendezvous_address(peers, gathered[0][1])
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
        _DEVICE = torch.device("cuda", local_device_index(info.local_rank, torch.cuda.device_count()))
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
    # No `device_id`: NCCL's communicator is then created at the first collective, after the
    # check below, instead of failing inside init with "Duplicate GPU detected".
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    identities = _gather_device_identities()
    if backend == "nccl":
        check_distinct_devices(identities)
    return info


def _gather_device_identities() -> list[str]:
    """Every rank's `device_identity`, over a short-lived gloo group: NCCL cannot run yet if two
    ranks share a GPU."""
    group = dist.new_group(backend="gloo")
    identities: list = [None] * get_world_size()
    dist.all_gather_object(identities, device_identity(dev()), group=group)
    dist.destroy_process_group(group)
    return identities


def init_distributed_mode(args=None) -> DistInfo:  # the original's name (its users may call it)
    info = setup_dist()
    if args is not None:
        args.rank, args.world_size, args.gpu = info.rank, info.world_size, dev()
    return info


def cleanup() -> None:
    global _CONTROL_GROUP
    _CONTROL_GROUP = None
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


_CONTROL_GROUP = None


def _control_group():
    """A gloo group for small host-side flags, so that agreeing on them never waits for the GPU
    (None: the default group is gloo already)."""
    global _CONTROL_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def max_over_ranks(values: list[int]) -> list[int]:
    """The element-wise maximum of `values` over all ranks: one host-side collective for several
    flags (stop signal, time limit), which does not synchronise with the GPU."""
    if not is_initialized():
        return [int(v) for v in values]
    box = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_control_group())
    return [int(v) for v in box.tolist()]


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object, on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclasses.dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor sits in a state sent by `broadcast_state`, and what it looks like."""

    index: int
    shape: tuple
    dtype: torch.dtype


def broadcast_state(state=None, src: int = 0):
    """Rank `src`'s nested state (dicts, lists and tuples of tensors and plain values, such as an
    optimizer's state dict) on every rank; other ranks pass nothing.

    The structure travels as one small object and each tensor by itself, on this process's device
    (where NCCL needs it), so only rank `src` reads the files the state came from.
    """
    if not is_initialized():
        return state
    tensors: list[torch.Tensor] = []

    def strip(x):
        if torch.is_tensor(x):
            tensors.append(x)
            return _TensorSlot(len(tensors) - 1, tuple(x.shape), x.dtype)
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(strip(v) for v in x)
        return x

    skeleton = broadcast_object(strip(state) if get_rank() == src else None, src=src)
    device = dev()

    def fill(x):
        if isinstance(x, _TensorSlot):
            if get_rank() == src:
                buf = tensors[x.index].to(device)
            else:
                buf = torch.empty(x.shape, dtype=x.dtype, device=device)
            dist.broadcast(buf, src)
            return buf
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(fill(v) for v in x)
        return x

    return fill(skeleton)


def all_gather_objects(obj) -> list:
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
