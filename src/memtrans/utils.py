"""Small shared helpers: atomic file writes (results and checkpoints are never half-written), stale temporary
files, directory locks, signals, and one-line descriptions of OS errors."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write via a temporary file in the same directory, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file. The file gets the
    permissions of a plain `open` under the user's umask (mkstemp's are 0600: results others could not read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file; say which one
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore (once, at import)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path):
    """The parsed JSON file, or None when it is missing or not valid JSON (e.g. a run that never started)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class _RecordingWriter:
    """A file wrapper that remembers the first OSError of write(): torch.save turns it into a RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through atomic_write; a full disk or a file size limit raises the OSError (ENOSPC, EFBIG)
    rather than torch's RuntimeError, so callers can tell the user what happened."""
    import torch

    def write(f):
        w = _RecordingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:
                raise w.error from None
            raise
    atomic_write(path, write, mode="wb")


def clean_stale_tmp(directory: str | Path, names: Iterable[str] | None = None, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes left in `directory` (`.NAME.*.tmp`; only for
    `names` if given, and only files not modified for `min_age_s` seconds). Call it while no other process
    writes there (under the directory's lock). Returns the removed paths."""
    d = Path(directory)
    if not d.is_dir():
        return []
    now, removed = time.time(), []
    for p in d.iterdir():
        name = p.name
        if not (name.startswith(".") and name.endswith(".tmp") and p.is_file()):
            continue
        if names is not None and not any(name.startswith(f".{n}.") for n in names):
            continue
        try:
            if now - p.stat().st_mtime < min_age_s:
                continue
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


# ----------------------------------------------------------------------------------------- locks

class LockedError(ValueError):
    """The directory is locked by a live process (a ValueError: the CLI prints it as one line, exit 2)."""


class DirLock:
    """An exclusive lock on a directory: `fcntl.flock` on DIR/NAME, which holds the holder's PID, host, start
    time and command. The kernel releases a flock when its process dies however it dies (SIGKILL included), so a
    lock file left by a killed process is stale by construction and is taken over (`self.stale` then holds what
    it said). A live holder makes `acquire` raise LockedError naming its PID."""

    def __init__(self, directory: str | Path, name: str = ".lock", what: str = "directory"):
        self.directory, self.path, self.what = Path(directory), Path(directory) / name, what
        self.fd: int | None = None
        self.stale: dict | None = None

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            text = os.pread(fd, 65536, 0).decode(errors="replace")
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "DirLock":
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = None
                for _ in range(20):  # the holder may be between truncating and writing the file
                    holder = self._read(fd)
                    if holder:
                        break
                    time.sleep(0.05)
                os.close(fd)
                raise LockedError(self.held_message(holder)) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the file we locked must still be the one at the path (a releasing holder unlinks it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.stale = self._read(fd)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(__import__("sys").argv)[:500]}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise LockedError(f"could not take the lock {self.path} (it keeps being replaced)")

    def held_message(self, holder: dict | None) -> str:
        if not holder:
            who = "another process (the lock file names none)"
        else:
            who = f"PID {holder.get('pid')}" + (f" on {holder['host']}" if holder.get("host") != socket.gethostname()
                                                 else "") + f" since {holder.get('started')}"
            if holder.get("command"):
                who += f" ({holder['command'][:120]})"
        pid = (holder or {}).get("pid")
        return (f"{self.what} {self.directory} is in use by {who}; wait for it to finish or stop it first"
                + (f" (kill {pid})" if pid else "") + f"; the lock ({self.path}) is released when that process ends")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it (see the inode check in acquire)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def stale_lock_note(lock: DirLock) -> str | None:
    """A line about a taken-over stale lock, or None."""
    s = lock.stale
    if not s:
        return None
    return f"took over the lock of PID {s.get('pid')} (started {s.get('started')}), which ended without releasing it"


# --------------------------------------------------------------------------------------- signals

class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived (see handle_signals); a BaseException like KeyboardInterrupt."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def handle_signals(on_signal: Callable[[int, bool], None] | None = None,
                   signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    """Inside the block, the first SIGTERM / SIGINT calls `on_signal(signum, True)` and raises Interrupted(signum)
    in the main thread; later ones only call `on_signal(signum, False)` (so the cleanup that the first one
    started is not cut short). The previous handlers come back on exit. Outside the main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = []

    def handler(signum, frame):
        first = not seen
        seen.append(signum)
        if on_signal is not None:
            on_signal(signum, first)
        if first:
            raise Interrupted(signum)
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


PARENT_ENV = "MEMTRANS_PARENT_PID"  # set by `memtrans ablate` for its children (see stop_with_parent)


def stop_with_parent(poll_s: float = 1.0) -> bool:
    """In a child of `memtrans ablate` (MEMTRANS_PARENT_PID in the environment): a daemon thread sends this
    process SIGTERM once that parent is gone, however it went (SIGKILL included), so no orphan keeps training
    and writing. SIGTERM ends the command as an interrupt (status interrupted, resumable). The children run in
    sessions of their own, which a parent's SIGKILL never reaches; Linux's PR_SET_PDEATHSIG would fire when
    the spawning *thread* ends, so the child watches its parent PID instead. Returns whether it watches."""
    try:
        parent = int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        return False
    if parent <= 1:
        return False

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
    return True


def kill_at(point: str) -> None:
    """TEST ONLY: with MEMTRANS_TEST_KILL_AT=<point> in the environment, the process kills itself with SIGKILL
    when it reaches `point` (e.g. `after_final_checkpoint`), to test that no kill leaves a run it cannot finish.
    Never set it otherwise."""
    if os.environ.get("MEMTRANS_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------- OS errors

def describe_os_error(e: OSError) -> str:
    """One line for an OSError a user can meet: which file, what happened, what to do."""
    name = e.filename if e.filename is not None else "(a file)"
    if e.filename2 is not None:
        name = f"{name} -> {e.filename2}"
    code = e.errno
    kept = "nothing finished was lost (files are replaced only once completely written)"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"no space left on the device (or quota exceeded) writing {name}; free some space or choose another "
                f"directory, then run the same command again; {kept}")
    if code == errno.EFBIG:
        return (f"file too large writing {name} (a file size limit, e.g. `ulimit -f`, or the file system's maximum); "
                f"raise the limit or choose another directory, then run the same command again; {kept}")
    if code == errno.EROFS:
        return f"{name} is on a read-only file system; choose a writable directory (--run-dir / --out)"
    if isinstance(e, PermissionError):
        return (f"permission denied: {name}; make it writable (and readable) for this user, or choose another "
                f"directory (--run-dir / --out)")
    if isinstance(e, FileNotFoundError):
        return f"no such file or directory: {name}; check the path"
    if isinstance(e, NotADirectoryError):
        return f"{name}: a part of this path is a file, not a directory; choose another path"
    if isinstance(e, IsADirectoryError):
        return f"{name} is a directory, where a file was expected"
    return f"{name}: {e.strerror or e}"
