"""One process per run folder: an exclusive lock held for the whole run.

:class:`RunLock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``RUN_DIR/run.lock`` and writes the
holder's pid, host and start time into it. A second ``rollingq train`` on the same folder (``--out``,
``--overwrite`` or ``--resume``) gets a :class:`RunLockedError` naming that pid instead of mixing its
files with the first run's. The kernel drops the lock when its holder dies (even by SIGKILL), so a lock
file left behind by a dead process is *stale*: the next run takes it over and logs whose it was.
The lock file is removed when the lock is released.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from datetime import datetime
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not guarded
    fcntl = None

logger = logging.getLogger("rollingq.train")

LOCK_FILENAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock (the message names its pid, host and start time)."""


def _holder(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "pid unknown"
    return f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}"


class RunLock:
    """The exclusive lock of one run folder (the folder must exist).

    Args:
        run_dir: the run folder.
        what: the argument the folder came from (``--out``, ``--resume``), for the error message.

    Raises:
        RunLockedError: another process holds the lock.
    """

    def __init__(self, run_dir: str, what: str = "--out") -> None:
        self.path = os.path.join(run_dir, LOCK_FILENAME)
        self.fd: int | None = None
        if fcntl is None:  # pragma: no cover
            logger.warning("%s: file locks are not available here; a second run on %s is not detected", what, run_dir)
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    logger.warning("%s: cannot lock %s (%s); a second run on this folder is not detected",
                                   what, self.path, exc)
                    return
                raise RunLockedError(
                    f"{what}: {run_dir!r} is in use by another rollingq process ({_describe(self._read())}); "
                    "wait for it to end (or stop it), or choose another folder"
                ) from None
            if self._same_file(fd):
                break
            os.close(fd)  # the file was removed (released) between open and flock: lock the new one
        self.fd = fd
        previous = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if previous:
            logger.warning("%s: taking over the lock of %s, which is no longer running (it ended without "
                           "releasing %s)", run_dir, _describe(previous), LOCK_FILENAME)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        os.fsync(fd)

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return _holder(f.read(4096))
        except OSError:
            return {}

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed while still held: nobody can lock the old file)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
