"""Private temporary directories that do not outlive their process, however it ends.

Each holds an exclusive ``flock`` on its ``.held`` file for as long as the process that made it runs; the kernel lets
go of the lock when that process ends, SIGKILL and the OOM killer included, and making a directory first removes
those whose lock nobody holds. A server's snapshots are hard links of its bundles' files: before this, a server
killed without its ``finally`` kept a copy of every bundle it served in /tmp, deleted bundles' bytes included (the
suite's servers, stopped with SIGKILL, left 56 directories a run). Directories without a ``.held`` file (made by
anything else) are never touched.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "torchship-"
HELD = ".held"
_held: dict[str, int] = {}  # directory -> the descriptor that holds its lock


def make(kind: str) -> Path:
    """A new directory ``<tmp>/torchship-<kind>-XXXXXXXX``, held by this process until ``remove`` or its end."""
    sweep()
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))
    fd = os.open(path / f"{HELD}.new", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a filesystem without locks: an ordinary temporary directory, never swept
        os.close(fd)
        os.unlink(path / f"{HELD}.new")
        return path
    os.rename(path / f"{HELD}.new", path / HELD)  # a sweep sees .held only once it is locked
    _held[str(path)] = fd
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def sweep(root: str | Path | None = None) -> list[Path]:
    """Removes this user's held directories under ``root`` (the temporary directory) whose holder has ended."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
            fd = os.open(path / HELD, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # not ours, not held, or gone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its process runs
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
