"""Output directories (bundles, training runs): checked before minutes of work, written whole or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def cache_dir(kind: str) -> Path:
    """``$TORCHSHIP_CACHE/KIND`` (default ``~/.cache/torchship/KIND``), created on first use."""
    root = os.environ.get("TORCHSHIP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchship"
    path = Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(out: Path, *, marker: str | None = None, option: str = "--out") -> None:
    """Fail early when ``out`` cannot be written. An existing non-empty directory may be replaced only when it
    holds ``marker`` (a previous bundle's manifest); without a marker it must be empty."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another {option}")
    if out.is_dir() and any(out.iterdir()) and not (marker and (out / marker).exists()):
        what = "a bundle" if marker else "empty"
        raise OutputError(f"{out} is a non-empty directory that is not {what}; refusing to overwrite it: choose another {option}")
    parent = out.resolve().parent
    if not parent.exists():
        raise OutputError(f"{parent} does not exist; create it or choose another {option}")
    if not parent.is_dir():
        raise OutputError(f"cannot write to {parent}: it is a file, not a directory; choose another {option}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}; choose another {option}")


@contextmanager
def staged(out: Path, *, marker: str | None = None) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; on success it is renamed over ``out`` (a previous directory is
    replaced only once the new one is complete), on failure it is removed and ``out`` is untouched."""
    out = Path(out)
    check_writable(out, marker=marker)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
