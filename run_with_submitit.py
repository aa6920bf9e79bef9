"""Run scripts/image_train.py as a SLURM job through submitit (or on this machine with --local).

    python run_with_submitit.py --nodes 4 --ngpus 8 --use_volta32 $MODEL_FLAGS_128 $TRAIN_FLAGS \
        --feat_cond --data_dir DATA --type_model dino --out_dir RUN

Every training flag is accepted. One task per GPU (`--ngpus` tasks on each of `--nodes` nodes); the
tasks find each other through submitit's job environment. Checkpoints, logs and submitit's own
files (`RUN/submitit/`) go under `--out_dir` (`%j` in it becomes the job id). When SLURM preempts
the job or its time runs out, every task finishes its step and saves a checkpoint, then submitit
calls `Trainer.checkpoint`, the job is requeued and training resumes from that checkpoint.

`--local` runs the same job on this machine with submitit's local executor (`--ngpus` processes,
CPU-only machines included) and waits for it to finish.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys

from guided_diffusion_rcdm.cli import train as image_train
from guided_diffusion_rcdm.cli.flags import Flag, Parser
from guided_diffusion_rcdm.cli.flags import parse_args as parse_flags
from guided_diffusion_rcdm.cli.policy import run_main
from guided_diffusion_rcdm.errors import UsageError
from guided_diffusion_rcdm.script_util import Range


# The launcher's own flags (the training flags are the `train` command's).
JOB_FLAGS = (
    Flag("ngpus", 8, int, "GPUs (= training processes) per node", range=Range(1, 1024)),
    Flag("nodes", 2, int, "number of nodes", range=Range(1, 100000)),
    Flag("timeout", 2800, int, "job duration, in minutes", range=Range(1, 10**6)),
    Flag("partition", "", str, "SLURM partition"),
    Flag("use_volta32", False, bool, "ask for 32 GB V100s (constraint volta32gb)"),
    Flag("comment", "", str, "comment for the scheduler"),
    Flag("cpus_per_task", 10, int, "CPU cores per process", range=Range(1, 4096)),
    Flag("mem_per_gpu_gb", 40, int, "memory per GPU, in GB", range=Range(1, 10**5)),
    Flag("job_name", "rcdm", str, "the job's name in the queue"),
    Flag("max_num_timeout", 30, int, "how many times a job that runs out of time is requeued", range=Range(0, 10**4)),
    Flag("local", False, bool, "run the job here with submitit's local executor and wait for it"),
)


def create_argparser() -> argparse.ArgumentParser:
    """Every training flag, and the job's."""
    parser = Parser(prog="run_with_submitit.py", description=__doc__, parents=[image_train.create_argparser()],
                    add_help=False)
    job = parser.add_argument_group("job")
    for flag in JOB_FLAGS:
        flag.add_to(job)
    # image_train.py writes to the current folder by default; a job has no useful one: it must
    # be named (see `check_out_dir`).
    parser.set_defaults(out_dir=None)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_flags(create_argparser(), argv)  # records the flags given (for --init_from's)


def check_out_dir(out_dir: str | None) -> str:
    """The job's `--out_dir` as an absolute path (`%j` kept), or an error saying what to do.

    The launcher needs it named: every task on every node and every requeued attempt must write
    and resume in the same folder, so it cannot default to wherever the command was typed, and
    it must be creatable (on a file system the nodes share) before the job waits in the queue.
    """
    if not out_dir:
        raise UsageError("--out_dir is required: the folder (on a file system every node "
                         "shares) where checkpoints, logs and submitit's files go; '%j' in it "
                         "becomes the job id")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    # the folders above the one that holds the job id must exist or be creatable now
    existing = os.path.dirname(out_dir.split("%j", 1)[0]) if "%j" in out_dir else out_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out_dir {out_dir}: cannot create it ({existing} is not a writable "
                         "folder); pass a folder you can write to")
    return out_dir


def _fresh_port() -> int:
    from guided_diffusion_rcdm.dist_util import rendezvous_ports

    # Below the ephemeral range: no outgoing connection on the node can be holding it.
    return random.SystemRandom().choice(rendezvous_ports())


class Trainer:
    """The submitted callable: trains, and on preemption asks to be requeued.

    Each submission carries its own rendezvous port, so a requeued job never waits for a port the
    previous attempt left in TIME_WAIT.
    """

    def __init__(self, args: argparse.Namespace, port: int | None = None):
        self.args = args
        self.port = port or _fresh_port()

    def __call__(self) -> None:
        import submitit


        os.environ["MASTER_PORT"] = str(self.port)
        env = submitit.JobEnvironment()
        args = copy.copy(self.args)
        args.out_dir = args.out_dir.replace("%j", str(env.job_id))
        args.submitit = True
        image_train.train(args)

    def checkpoint(self):
        """Called by submitit when the job is preempted or times out: requeue a fresh copy.

        During training, the preemption signal first makes every task finish its step and save
        (TrainLoop), and only then reaches submitit, which calls this; so nothing since the last
        periodic save is lost. The new run resumes from the newest complete checkpoint in
        --out_dir (an explicit --resume_checkpoint is dropped once the run has written its own).
        """
        import submitit

        from guided_diffusion_rcdm.train_util import list_checkpoint_steps

        args = copy.copy(self.args)
        out_dir = args.out_dir.replace("%j", str(submitit.JobEnvironment().job_id))
        if list_checkpoint_steps(out_dir):
            args.resume_checkpoint = ""
        print(f"requeuing; training resumes from the newest checkpoint in {out_dir}", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(args))


def local_gpu_problem(ngpus: int, gpu_count: int) -> str | None:
    """Why `--local --ngpus ngpus` cannot run on a machine with `gpu_count` GPUs (None: it can).

    With GPUs, each process needs its own (NCCL refuses two processes on one GPU); without any,
    the processes train on the CPU.
    """
    if 0 < gpu_count < ngpus:
        return (f"--ngpus {ngpus}: this machine has {gpu_count} GPU(s) and each training process needs "
                f"its own; use --ngpus {gpu_count} or fewer")
    return None


def make_executor(args: argparse.Namespace):
    import submitit

    folder = os.path.join(args.out_dir, "submitit")
    if args.local:
        if args.nodes > 1:
            print(f"--local runs on this machine: --nodes {args.nodes} is ignored", file=sys.stderr)
        import torch

        problem = local_gpu_problem(args.ngpus, torch.cuda.device_count())
        if problem:
            raise UsageError(problem)
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(
            timeout_min=args.timeout, tasks_per_node=args.ngpus, nodes=1,
            gpus_per_node=min(args.ngpus, torch.cuda.device_count()),
        )
    else:
        if submitit.AutoExecutor.which() != "slurm":
            raise UsageError("SLURM is not available here (no sbatch): use --local to run the job on "
                             "this machine, or torchrun (see docs/training.md)")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                         slurm_max_num_timeout=args.max_num_timeout)
        extra = {}
        if args.use_volta32:
            extra["slurm_constraint"] = "volta32gb"
        if args.comment:
            extra["slurm_comment"] = args.comment
        if args.partition:
            extra["slurm_partition"] = args.partition
        executor.update_parameters(
            mem_gb=args.mem_per_gpu_gb * args.ngpus, gpus_per_node=args.ngpus,
            tasks_per_node=args.ngpus, cpus_per_task=args.cpus_per_task, nodes=args.nodes,
            timeout_min=args.timeout, slurm_signal_delay_s=120, **extra,
        )
    executor.update_parameters(name=args.job_name)
    return executor


def submit(args: argparse.Namespace):
    """Submit the training job; returns the submitit job."""
    args.out_dir = check_out_dir(args.out_dir)
    # Fail now, not in the queue, when the data or the model flags cannot work.
    image_train.check_inputs(args)  # a data folder and flags that can build a model
    if __name__ != "__main__":  # let the job unpickle Trainer without importing this file
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = make_executor(args)
    job = executor.submit(Trainer(args))
    where = args.out_dir.replace("%j", str(job.job_id))
    print(f"Submitted job_id: {job.job_id}")
    print(f"Logs and checkpoints will be saved at: {where}")
    return job


def launch(args: argparse.Namespace) -> None:
    job = submit(args)
    if args.local:
        job.results()  # waits; raises with the job's error if training failed
        print(f"job {job.job_id} finished")


def main(argv=None) -> int:
    """Parse the flags and submit the job (one line and exit status 2 for a mistake); the exit status."""
    parser = create_argparser()
    args = parse_flags(parser, argv)  # records the flags given (for --init_from's)
    return run_main(lambda: launch(args), parser.prog, parser)


if __name__ == "__main__":
    sys.exit(main())
