"""Run control for training: one run per output folder, stop signals that save before stopping,
and the stop rule every rank agrees on.

- `lock_out_dir(out_dir)`: rank 0 takes the folder's run lock (`fileio.acquire_run_lock`); every
  rank raises the same error when it cannot.
- SIGTERM, SIGINT, SIGUSR1 and submitit's preemption signal (`SUBMITIT_PREEMPT_SIGNAL`, default
  USR2) do not kill the run (`StopOnSignal`): the current step finishes, every rank agrees on the
  step, a checkpoint is saved, and only then is the signal passed on (submitit requeues the job;
  otherwise the process exits with status 128 + the signal's number, SIGINT raises
  KeyboardInterrupt). A second signal ends the process at once.
- `seed_everything(seed)`: torch (CPU and GPUs), numpy and random, so a seed decides a run.
- `StopRule`: a step target, a wall-clock budget (`max_seconds`) and the signals, decided the same
  on every rank with a collective only every `agree_seconds` of training.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import torch

from . import dist_util, fileio, logger


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and GPUs), numpy and random: the same seed, the same samples and batches."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------------------- the folder


def lock_out_dir(out_dir: str, warn=None) -> fileio.RunLock | None:
    """Rank 0 takes the run lock of `out_dir` (see `fileio.acquire_run_lock`); if it cannot,
    every rank raises the same error (`RunLockedError`, or `UnwritableFolderError`).
    Remote folders (gs://, az://) are not locked."""
    lock, error = None, None
    if dist_util.is_main_process() and out_dir and not fileio.is_remote(out_dir):
        try:
            lock = fileio.acquire_run_lock(out_dir, warn=warn or logger.warn)
        except (fileio.RunLockedError, OSError) as exc:
            error = (isinstance(exc, fileio.RunLockedError), str(exc))
    if dist_util.get_world_size() > 1:
        error = dist_util.broadcast_object(error)
    if error:
        raise (fileio.RunLockedError if error[0] else fileio.UnwritableFolderError)(error[1])
    return lock


# ------------------------------------------------------------------------------- signals


def stop_signals() -> list[int]:
    """The signals that make training save and stop: SIGTERM, SIGINT, SIGUSR1 and the signal
    submitit preempts with (`SUBMITIT_PREEMPT_SIGNAL`, default USR2)."""
    names = ["SIGTERM", "SIGINT", "SIGUSR1", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
    return list(dict.fromkeys(getattr(signal, n) for n in names if hasattr(signal, n)))


class StopOnSignal:
    """While active (a context manager), the stop signals only record themselves in `received`.

    The loop polls `received` between steps; after saving it calls `pass_on`, which hands the
    signal to the handler that was installed before (submitit's requeue, Python's
    KeyboardInterrupt) or exits with status 128 + signum. After the first signal the default
    action is restored, so a second one ends the process at once, even inside a long C call.
    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}
        self._active = False

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in stop_signals():
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN or previous is None:  # the user asked to ignore it
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._record)
        self._active = True
        return self

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            for sig in self._previous:
                signal.signal(sig, signal.SIG_DFL)
            return
        os.kill(os.getpid(), signum)  # the default action is back in place: this ends the process

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._active:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._active = False

    def requeues(self, signum: int) -> bool:
        """Whether the handler `pass_on` hands `signum` to is a job scheduler's requeue (submitit's),
        so the run resumes by itself rather than by running the command again."""
        previous = self._previous.get(signum)
        return callable(previous) and getattr(previous, "__name__", "") == "checkpoint_and_try_requeue" and \
            "submitit" in (getattr(previous, "__module__", "") or "")

    def pass_on(self, signum: int) -> None:
        """Deliver `signum` to the handler that was there before; exit if it does not."""
        previous = self._previous.get(signum)
        self._restore()
        if callable(previous):
            previous(signum, None)  # submitit requeues and exits; SIGINT raises KeyboardInterrupt
        raise SystemExit(128 + signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ------------------------------------------------------------------------------- when to stop


class StopRule:
    """When a run stops, decided the same on every rank: `target` steps done (None: no target),
    `max_seconds` of training since the rule was made (0: no limit), or a stop signal.

    One process decides every step from its own clock. Several agree in one collective, at steps
    all of them know in advance: every `agree_seconds` of training, as measured by the slowest rank
    since the last agreement (at least every step, at most every 1000).
    """

    def __init__(self, *, step: int, target: int | None = None, max_seconds: float = 0.0,
                 agree_seconds: float = 2.0, world_size: int = 1):
        self.target = target
        self.max_seconds = float(max_seconds)
        self.agree_seconds = float(agree_seconds)
        self.world_size = world_size
        self.started = time.monotonic()
        self._next_agreement = step  # the step at which the ranks next agree on stopping
        self._agreed_at = (step, self.started)  # (step, clock) of the last agreement

    def check(self, step: int, received: int | None) -> tuple[bool, int]:
        """`(done, signal)` after `step` steps, the same on every rank: done when the target is
        met or a rank ran out of time; signal is the number of a stop signal any rank `received`
        (0: none)."""
        if self.target is not None and step >= self.target:
            return True, received or 0
        now = time.monotonic()
        out_of_time = bool(self.max_seconds and now - self.started >= self.max_seconds)
        if self.world_size == 1:
            return out_of_time, received or 0
        if step < self._next_agreement:
            return False, 0
        last_step, last_clock = self._agreed_at
        per_step = (now - last_clock) / (step - last_step) if step > last_step else 0.0
        interval = 1 if per_step <= 0 else int(min(1000, max(1, self.agree_seconds / per_step)))
        # Clocks differ between ranks: stop everywhere as soon as one rank is out of time; the
        # next agreement comes after the fewest steps any rank asks for.
        out_of_time, signum, neg_interval = dist_util.max_over_ranks([out_of_time, received or 0, -interval])
        self._agreed_at = (step, time.monotonic())
        self._next_agreement = step - neg_interval
        return bool(out_of_time), signum
