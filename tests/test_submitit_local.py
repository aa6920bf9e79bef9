"""run_with_submitit.py: the same job through submitit's real local executor, preempted and requeued."""

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from _train_photos import make_photo_dir

submitit = pytest.importorskip("submitit")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import run_with_submitit  # noqa: E402
from guided_diffusion_rcdm.errors import UsageError  # noqa: E402

TINY = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
        "--attention_resolutions 16 --learn_sigma True --diffusion_steps 100").split()


def _children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_local_job_with_two_tasks_requeues_on_preemption_and_resumes(tmp_path, monkeypatch):
    photos = make_photo_dir(tmp_path / "photos")
    out = tmp_path / "run"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))] + ["RANK", "WORLD_SIZE"]:
        monkeypatch.delenv(key, raising=False)
    args = run_with_submitit.parse_args(
        ["--local", "--ngpus", "2", "--nodes", "1", "--timeout", "10", *TINY, "--feat_cond",
         "--data_dir", photos, "--type_model", "resnet18", "--pretrained_encoder", "False",
         "--out_dir", str(out), "--batch_size", "2", "--save_interval", "100000", "--log_interval", "1",
         "--max_steps", "12", "--num_workers", "0", "--progress", "False"])
    job = run_with_submitit.submit(args)
    deadline = time.time() + 240
    while not (out / "progress.csv").exists() or (out / "progress.csv").read_text().count("\n") < 3:
        assert job.state not in ("FINISHED", "INTERRUPTED") and time.time() < deadline, job.stderr()
        time.sleep(0.05)
    # preemption: SLURM signals every task; they finish the step and save together, then submitit
    # requeues the job from rank 0. (The tasks are paused while they are signalled, so the run
    # cannot finish in between.)
    tasks = _children(job._process.pid)
    assert len(tasks) == 2
    for sig in (signal.SIGSTOP, signal.SIGUSR2, signal.SIGCONT):
        for pid in tasks:
            os.kill(pid, sig)
    job.results()  # raises if a task failed for good
    log = (out / "log.txt").read_text()
    assert "2 process(es) launched by submitit" in log
    stopped = re.search(r"stopped by SIGUSR2 at step (\d+), checkpoint saved", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 2 <= step < 12  # nothing was saved before the signal (save_interval 100000)
    assert f"resumed from checkpoint {out / f'model{step:06d}.pt'} at step {step}" in log
    assert (out / "model000012.pt").exists() and (out / "opt000012.pt").exists()
    stdout = Path(job.paths.stdout).read_text()
    assert "requeuing; training resumes from the newest checkpoint" in stdout
    assert stdout.index("stopped by SIGUSR2") < stdout.index("requeuing")  # saved, then requeued
    assert stdout.count("2 process(es) launched by submitit") == 2  # the first run and the requeued one


def test_cli_without_slurm_says_what_to_do_and_keeps_the_original_flags(tmp_path, monkeypatch, capsys):
    # run_with_submitit.py's main, in this process: one line, exit status 2, nothing queued
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin")  # no sbatch here
    monkeypatch.chdir(tmp_path)
    photos = make_photo_dir(tmp_path / "photos", names=("coffee",))

    def refused(argv: list) -> str:
        assert run_with_submitit.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("run_with_submitit.py: error: "), err
        return err

    err = refused(["--nodes", "4", "--ngpus", "8", "--use_volta32", "--partition", "learnlab", "--comment", "x",
                   "--timeout", "60", *TINY, "--feat_cond", "--data_dir", photos, "--type_model", "dino",
                   "--out_dir", tmp_path / "run"])
    assert "SLURM is not available" in err and "--local" in err
    err = refused(["--data_dir", tmp_path / "nope", "--local", "--out_dir", tmp_path / "run"])
    assert "does not exist" in err  # checked before anything is queued
    err = refused(["--data_dir", photos, "--local", "--image_size", "100", "--out_dir", tmp_path / "run2"])
    assert "image_size" in err and not (tmp_path / "run2" / "submitit").exists()  # nothing queued
    err = refused(["--data_dir", photos, "--local", "--train_only", "cond", "--train_only_steps", "10",
                   "--out_dir", tmp_path / "run3"])
    assert "--init_from" in err and not (tmp_path / "run3" / "submitit").exists()  # a warm-start setting alone


def test_the_launcher_needs_a_writable_out_dir_and_makes_it_absolute(tmp_path, monkeypatch):
    # image_train.py alone writes to "." by default; a job's tasks, nodes and requeued attempts
    # need one named folder, so the launcher asks for it before anything is queued.
    photos = make_photo_dir(tmp_path / "photos", names=("coffee",))
    with pytest.raises(UsageError, match="--out_dir is required"):
        run_with_submitit.submit(run_with_submitit.parse_args(["--local", "--data_dir", str(photos)]))
    monkeypatch.chdir(tmp_path)
    assert run_with_submitit.check_out_dir("runs/%j") == str(tmp_path / "runs" / "%j")
    assert run_with_submitit.check_out_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UsageError, match=r"--out_dir .*a_file/run: cannot create it"):
        run_with_submitit.check_out_dir(str(tmp_path / "a_file" / "run"))
    (tmp_path / "runs").write_text("")  # a file where the job-id folders would go
    with pytest.raises(UsageError, match="is not a writable folder"):
        run_with_submitit.check_out_dir("runs/%j")
