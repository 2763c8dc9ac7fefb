"""Atomic file writes: a crash leaves the old file or the new one, never a torn one.

:func:`atomic_write_bytes` writes to a temporary file ``<target>.tmp.<pid>`` in the target's folder,
flushes and fsyncs it, then renames it over the target and fsyncs the folder. A write that fails
(a full disk included) removes its temporary; a full disk is a :class:`DiskFullError` naming the path
and the bytes needed. Temporaries left behind by a process that was killed (SIGKILL, power loss) are
removed by :func:`remove_stale_temporaries`, which a run calls on its folders when it starts.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil

logger = logging.getLogger("rollingq.files")

TEMPORARY = re.compile(r"^(?P<target>.+)\.tmp\.(?P<pid>\d+)$")
"""The name of an atomic write's temporary: ``<target>.tmp.<pid>``."""

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space (or quota) left to write a file; the message names the path and the bytes needed
    (``errno``, ``strerror`` and ``filename`` are set as for any ``OSError``)."""

    def __str__(self) -> str:
        return str(self.strerror)


def fsync_dir(path: str) -> None:
    """fsync a folder (its entries: a rename in it becomes durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # pragma: no cover
        return None


def _write_file(path: str, data: bytes | memoryview) -> None:
    """Create ``path`` with ``data``, fsynced (``os.write`` until every byte is written)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(exc: OSError, path: str, size: int) -> DiskFullError:
    folder = os.path.dirname(os.path.abspath(path))
    free = _free_bytes(folder)
    left = "" if free is None else f", {free} bytes free in {folder}"
    return DiskFullError(
        exc.errno, f"{path}: no space left on the device to write {size} bytes{left} "
        f"({os.strerror(exc.errno)}); free some space and continue the run with --resume", path,
    )


def append_bytes(data: bytes, path: str) -> None:
    """Append ``data`` to ``path`` (created if missing) with one ``O_APPEND`` write, then fsync: a short
    record (a line) lands whole even when several processes append. A full disk is a :class:`DiskFullError`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise _disk_full(exc, path, len(data)) from exc
        raise


def atomic_write_bytes(data: bytes | memoryview, path: str, keep_previous: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename, folder fsync).

    Args:
        data: the file's full content.
        path: the target file (its folder is created).
        keep_previous: if given and ``path`` exists, it becomes this path (hard link, then rename),
            so the previous file survives next to the new one and ``path`` is never absent.

    Raises:
        DiskFullError: no space or quota left (``errno`` ENOSPC / EDQUOT); the temporary is removed and
            ``path`` is untouched. Any other ``OSError`` also removes the temporary.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        _write_file(tmp, data)
    except BaseException as exc:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            raise _disk_full(exc, path, memoryview(data).nbytes) from exc
        raise
    if keep_previous is not None and os.path.exists(path):
        # hard-link the current file to a temporary name and rename that over keep_previous, so
        # ``path`` exists at every moment of the rotation (a crash in between leaves the old one)
        prev_tmp = f"{keep_previous}.tmp.{os.getpid()}"
        if os.path.lexists(prev_tmp):
            os.remove(prev_tmp)
        try:
            os.link(path, prev_tmp)
        except OSError:  # pragma: no cover - file systems without hard links
            shutil.copyfile(path, prev_tmp)
        os.replace(prev_tmp, keep_previous)
    os.replace(tmp, path)
    fsync_dir(folder)


def _writer_alive(pid: int) -> bool:
    """True if ``pid`` is a live process of this user other than this one (it may still be writing)."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's: the pid was reused, it is not our writer
        return False
    except OSError:  # pragma: no cover
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the ``*.tmp.<pid>`` files in ``folder`` (not recursive) whose writer is gone.

    A temporary is stale when its pid is not a live process, is a process of another user (the pid was
    reused), or is this process (no write of ours is in flight when a run starts). A live process of
    this user may still be writing, so its temporaries stay. Returns the removed paths (logged).
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        match = TEMPORARY.match(name)
        path = os.path.join(folder, name)
        if match is None or not os.path.isfile(path) or _writer_alive(int(match["pid"])):
            continue
        try:
            os.remove(path)
        except FileNotFoundError:  # removed meanwhile
            continue
        removed.append(path)
    if removed:
        logger.warning("removed %d stale temporary file(s) of interrupted writes: %s", len(removed), ", ".join(removed))
    return removed
