"""Writing files so that a fault loses nothing: atomic replace, appends that never follow a planted
link, one training run per folder, and disk-full errors that say which file and how much room.

- `atomic_write(path, write)`: a temporary file in the same folder, fsync, rename (also
  `atomic_write_text`, `atomic_write_bytes`, `save_npz`, `save_image`). A symbolic link
  at `path` is replaced, never followed; a crash leaves the old file or the new one, never half.
  Files get the usual permissions (0666 less the umask), like any file the user creates.
- `open_append(path)`: append to a log without following a symbolic link at `path`.
- `acquire_run_lock(folder)`: `train.lock` names the run that holds the folder (host, PID); a
  second run gets one line; a lock whose process is gone is taken over with a warning.
- Temporary files carry their writer's host and PID in their name, so clean-up removes only
  those whose writer is dead (`writer_is_dead`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from .errors import UsageError, UserError

LOCK_NAME = "train.lock"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]*)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(UserError, OSError):
    """Writing a file failed because its device (or the user's quota) is full."""


class RunLockedError(UserError, RuntimeError):
    """Another live training run holds the output folder."""


class UnsafePathError(UserError, OSError):
    """An output name is a symbolic link (which would send the write elsewhere)."""


class UnwritableFolderError(UserError, PermissionError):
    """An output folder cannot be created or written to."""


def _error(cls, code: int, message: str) -> OSError:
    # The message alone (no "[Errno N]" prefix): it is shown to the user as one line.
    err = cls(message)
    err.errno = code
    return err


def unwritable(folder: str, err: OSError) -> UnwritableFolderError:
    return _error(UnwritableFolderError, err.errno or errno.EACCES,
                  f"cannot write in {folder} ({err.strerror or err}): choose a folder you can write to")


# ----------------------------------------------------------------------------- disk space


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(folder: str) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    """True if `exc`, or an error it was raised from, is "no space left" / "quota exceeded".

    torch.save reports a full disk as a RuntimeError from its zip writer, chained to the OSError.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left" in text or "Disk quota exceeded" in text or "file write failed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str, needed: Optional[int] = None) -> DiskFullError:
    folder = os.path.dirname(os.path.abspath(path))
    free = free_space(folder)
    room = f"{format_bytes(free)} free" if free is not None else "free space unknown"
    need = f", about {format_bytes(needed)} needed" if needed else ""
    return _error(
        DiskFullError, errno.ENOSPC,
        f"no space left to write {path} ({room} in {folder}{need}); the file was not written: free "
        "some space or choose another folder, then run again",
    )


# ----------------------------------------------------------------------------- writing


def _hostname() -> str:
    return socket.gethostname().split(".")[0].replace(".", "_") or "host"


def is_remote(path) -> bool:
    """A blobfile URL (gs://, az://, ...), which is written in one upload rather than renamed."""
    return "://" in str(path) and not str(path).startswith("file://")


def temp_name(path: str) -> str:
    """`.<name>.<host>.<pid>.<random>.tmp` next to `path`: who writes it is in the name."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{_hostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def refuse_symlink(path: str) -> None:
    if os.path.islink(path):
        raise _error(
            UnsafePathError, errno.ELOOP,
            f"{path} is a symbolic link (to {os.readlink(path)}): refusing to write through it; "
            "remove the link or choose another output name",
        )


def make_folder(path: str) -> str:
    """Create the folder `path` (and its parents) unless it exists; a symbolic link there (which
    would send every file written in it elsewhere) raises `UnsafePathError` naming it."""
    if os.path.islink(path):
        raise _error(
            UnsafePathError, errno.ELOOP,
            f"{path} is a symbolic link (to {os.readlink(path)}): refusing to write through it; "
            "remove the link or choose another output folder",
        )
    os.makedirs(path, exist_ok=True)
    return path


def atomic_write(path: str, write: Callable, *, text: bool = False,
                 check: Callable[[str], None] | None = None) -> None:
    """Write `path` through `write(file)` into a temporary file of the same folder, then rename.

    `check(temporary_path)`, when given, runs on the complete, synced file before the rename; if it
    raises, nothing is written (a download verified before it enters the cache). A symbolic link at
    `path` is replaced, not followed. A full disk raises `DiskFullError` (one line with the file and
    the free space) and leaves no temporary file behind. Every file the package writes goes through
    here.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o666)  # the umask applies, as to any new file
    try:
        try:
            with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {})) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except DiskFullError:
            raise  # already names the file (and perhaps the room needed)
        except Exception as exc:
            if is_disk_full(exc):
                raise disk_full_error(path) from None
            raise
        if check is not None:
            check(tmp)
        if _GROUPS:  # put in place with the other files of the group, or removed with them
            _GROUPS[-1].append((tmp, path))
            tmp = ""
            return
        os.replace(tmp, path)
    finally:
        if tmp and os.path.lexists(tmp):
            os.remove(tmp)
    _fsync_folder(folder)


_GROUPS: list[list[tuple[str, str]]] = []


@contextlib.contextmanager
def all_or_nothing():
    """Within it, the files `atomic_write` writes (and `save_npz`, `save_image`, ...) stay under their
    temporary names; they are renamed into place together when the block ends without an error,
    and removed when it raises (a full disk at the second output leaves neither). Not for files
    that other processes must see before the end."""
    group: list[tuple[str, str]] = []
    _GROUPS.append(group)
    try:
        yield
    except BaseException:
        for tmp, _ in group:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    finally:
        _GROUPS.remove(group)
    for tmp, path in group:
        os.replace(tmp, path)
    for folder in dict.fromkeys(os.path.dirname(path) for _, path in group):
        _fsync_folder(folder)


@contextlib.contextmanager
def whole_run_or_nothing(folder: str, on_failure: Callable[[], Any] | None = None, appends: tuple = ()):
    """The part of a command that writes in `folder`: its outputs are put in place together
    (`all_or_nothing`), and when the block raises (a full disk, Ctrl-C) the files it created in
    `folder` (a new log, say) and `folder` itself, if it created it, are removed too, after
    `on_failure()` (e.g. closing the log). A `DiskFullError` then says that nothing of the run was
    kept, or, where a file named in `appends` (a log) was there before, only the lines it added."""
    folder = os.path.abspath(folder)
    existed = os.path.isdir(folder)
    before = set(os.listdir(folder)) if existed else set()
    try:
        with all_or_nothing():
            yield
    except BaseException as err:
        if on_failure is not None:
            on_failure()
        kept = []
        if os.path.isdir(folder) and not os.path.islink(folder):
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name not in before and (os.path.islink(path) or os.path.isfile(path)):
                    os.remove(path)
                elif name not in before:
                    kept.append(name)
            if not existed and not os.listdir(folder):
                os.rmdir(folder)
        if isinstance(err, DiskFullError) and not kept:
            added = [name for name in appends if name in before]
            left = f"nothing of this run was kept in {folder}" + (
                f" but the lines it added to {', '.join(added)}" if added else "")
            raise _error(DiskFullError, err.errno or errno.ENOSPC, f"{err} ({left})") from None
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, data: str) -> None:
    atomic_write(path, lambda f: f.write(data), text=True)


def save_npz(path: str, **arrays: Any) -> str:
    """`np.savez` through `atomic_write`; tensors are moved to the CPU first. Returns `path`."""
    plain = {k: np.asarray(v.detach().cpu()) if hasattr(v, "detach") else np.asarray(v) for k, v in arrays.items()}
    atomic_write(path, lambda f: np.savez(f, **plain))
    return path


def _fsync_folder(folder: str) -> None:
    try:  # make the rename itself durable; not possible on every platform / filesystem
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def check_writable(folder: str, flag: str = "") -> None:
    """Create `folder` and write (then remove) a probe file in it, so that an unwritable or full
    output folder fails in one line before any heavy work."""
    named = f"{flag} {folder}" if flag else folder
    try:
        os.makedirs(folder, exist_ok=True)
        probe = temp_name(os.path.join(folder, "write-probe"))
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(os.path.join(folder, "write-probe")) from None
        raise unwritable(named, err) from None


def save_image(image, path: str, **options) -> None:
    """`PIL.Image.save` through `atomic_write` (the format from the file name's extension)."""
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {ext!r} (use .png or .jpeg)")
    atomic_write(path, lambda f: image.save(f, format=fmt, **options))


def open_append(path: str, mode: str = "a", newline: Optional[str] = None):
    """Open `path` for appending (created 0666 less the umask), refusing a symbolic link there."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP or os.path.islink(path):
            refuse_symlink(path)
        raise
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": newline}))


# ----------------------------------------------------------------------------- processes


def _process_start(pid: int) -> Optional[int]:
    """The start time of process `pid` (clock ticks since boot, Linux), to tell a reused PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start: Optional[int] = None) -> bool:
    """Is process `pid` on this host running (and, when `start` is known, the same process)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the PID was reused by another process
    return True


def writer_is_dead(name: str, max_foreign_age_s: float = 3600.0, folder: str = "") -> bool:
    """For a temporary file name made by `temp_name`: is its writer gone?

    On this host, the PID tells. A file from another host counts as abandoned once it has not
    changed for `max_foreign_age_s` (a live save keeps writing it). Other names: False.
    """
    match = _TMP_RE.match(os.path.basename(name))
    if not match:
        return False
    if match.group("host") == _hostname():
        return not process_alive(int(match.group("pid")))
    try:
        age = time.time() - os.path.getmtime(os.path.join(folder, name) if folder else name)
    except OSError:
        return False
    return age > max_foreign_age_s


# ----------------------------------------------------------------------------- reading state files


SMALL_FILE_LIMIT = 64 * 1024  # state files (locks, caches of measurements) are a few hundred bytes


class NotAPlainFileError(OSError):
    """A state file that is a link, a FIFO, a device or a folder (never read: it could block or never end)."""


def describe_kind(path: str) -> str:
    """What `path` is, for a message: "a symbolic link to X", "a FIFO", "a folder", "a device", ..."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link to {os.readlink(path)}"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "a device"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket"
    return "a file"


def read_small_file(path: str, limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of the plain file `path`, read without ever blocking or reading without end.

    A symbolic link (followed by nothing here), a FIFO, a device or a folder raises
    `NotAPlainFileError` without reading; so does a file larger than `limit` bytes. A missing file
    raises `FileNotFoundError`.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:  # ELOOP: a link; ENXIO: a FIFO or socket without a writer; ...
        raise NotAPlainFileError(err.errno, f"{path} is {describe_kind(path)}, not a plain file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAPlainFileError(errno.EINVAL, f"{path} is {describe_kind(path)}, not a plain file")
        if st.st_size > limit:
            raise NotAPlainFileError(errno.EFBIG, f"{path} is {st.st_size} bytes, larger than such a file can be")
        return os.read(fd, limit + 1)[:limit]
    finally:
        os.close(fd)


def read_small_json(path: str, limit: int = SMALL_FILE_LIMIT) -> Any:
    """`read_small_file` parsed as JSON; `ValueError` for text that is not JSON (or nested too deep)."""
    data = read_small_file(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not JSON ({type(err).__name__})") from None


# ----------------------------------------------------------------------------- run lock


def _me() -> dict:
    me = {"host": _hostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    if os.environ.get("SLURM_JOB_ID"):
        me["slurm_job"] = os.environ["SLURM_JOB_ID"]
        me["slurm_restart"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return me


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host')}, PID {holder.get('pid')}{job}, since {holder.get('since')}"


def _stale(holder: dict, me: dict) -> bool:
    if holder.get("host") == me["host"]:
        pid, start = holder.get("pid"), holder.get("start")
        if not isinstance(pid, int) or isinstance(pid, bool) or not (start is None or isinstance(start, int)):
            return True  # not a record this code writes: nothing to wait for
        return not process_alive(pid, start)
    # A requeued SLURM job runs again under the same id, maybe elsewhere: its old attempt is over.
    return bool(holder.get("slurm_job")) and holder.get("slurm_job") == me.get("slurm_job") and (
        holder.get("slurm_restart") != me.get("slurm_restart")
    )


class RunLock:
    def __init__(self, path: str, record: dict):
        self.path, self.record, self.count = path, record, 1

    def release(self) -> None:
        self.count -= 1
        if self.count > 0:
            return
        _HELD.pop(os.path.dirname(self.path), None)
        try:
            holder = read_small_json(self.path)
            mine = isinstance(holder, dict) and holder.get("pid") == self.record["pid"]
        except (OSError, ValueError):
            mine = False
        if mine:
            os.remove(self.path)


_HELD: dict[str, RunLock] = {}


def _read_holder(path: str) -> Optional[dict]:
    """The record in the lock file `path`: None when it is gone, {} when it is not a record (a
    link, a FIFO, a folder or a device raise `NotAPlainFileError`: never read)."""
    for _ in range(20):  # the holder may be writing it this very moment
        try:
            holder = read_small_json(path)
        except FileNotFoundError:
            return None
        except NotAPlainFileError:
            raise
        except ValueError:
            time.sleep(0.05)
            continue
        well_formed = isinstance(holder, dict) and isinstance(holder.get("host"), str)
        return holder if well_formed else {}  # {}: not a record this code writes
    return {}


def acquire_run_lock(folder: str, warn: Callable[[str], None] = print) -> RunLock:
    """Hold `folder` for this process (re-entrant); raise `RunLockedError` if a live run has it.

    The folder is created; failing to write there raises OSError naming it (checked before any
    heavy work by the scripts).
    """
    folder = os.path.realpath(folder)
    if folder in _HELD:
        _HELD[folder].count += 1
        return _HELD[folder]
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise unwritable(folder, err) from None
    path = os.path.join(folder, LOCK_NAME)
    me = _me()
    for _ in range(10):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            try:
                holder = _read_holder(path)
            except NotAPlainFileError:
                raise RunLockedError(
                    f"{path} is {describe_kind(path)}, not a run lock: remove it (if no run is using "
                    f"{folder}) and run again") from None
            if holder is None:
                continue  # released meanwhile
            if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                os.remove(path)  # our own, from a lock released without the file going away
                continue
            if holder and not _stale(holder, me):
                raise RunLockedError(
                    f"{folder} is in use by another training run ({_describe(holder)}): wait for "
                    f"it to end, choose another `out_dir`, or delete {path} if that run is gone"
                ) from None
            _take_over(path, holder)
            readable = bool(holder) and isinstance(holder.get("pid"), int)
            warn(f"taking over {path}: the run that held it ({_describe(holder) if readable else 'unreadable lock'}) "
                 "is no longer running")
            continue
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(path) from None
            raise unwritable(folder, err) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as err:
            os.remove(path)
            if is_disk_full(err):
                raise disk_full_error(path) from None
            raise
        lock = _HELD[folder] = RunLock(path, me)
        return lock
    raise RunLockedError(f"could not take {path}: other runs keep taking it; start one run per folder")


def _take_over(path: str, holder: Optional[dict]) -> None:
    """Remove the stale lock `holder` at `path`, unless another run replaced it meanwhile."""
    grave = f"{path}.{os.getpid()}.stale"
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    current = _read_holder(grave)
    if current and holder and current != holder:  # a live run's fresh lock: put it back
        try:
            os.link(grave, path)
        except OSError:
            pass
    os.remove(grave)


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.count = 1
        lock.release()


def check_out_dir(folder: str, flag: str = "`out_dir`") -> None:
    """Fail, naming the argument (`flag`), when `folder` could not be created or written; creates nothing."""
    path = os.path.abspath(folder or ".")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing != path and not os.path.isdir(existing):
        raise UsageError(f"{flag} {folder}: cannot create it ({existing} is a file); choose another folder")
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {folder}: is a file, not a folder; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: cannot write in {existing} (permission denied); "
                         "choose a folder you can write to")
