"""Bundles: a directory with ``manifest.json`` and the artifact files; loading never unpickles.

Every file's sha256 is in the manifest; a changed, missing or truncated file fails with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import BundleError, OutputError
from .machine import cores
from .spec import IOSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(out: Path) -> None:
    """Fail early (before minutes of work) when ``out`` cannot become a bundle."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise OutputError(f"{out} is a non-empty directory that is not a bundle; refusing to overwrite it: choose another --out")
    parent = out.resolve().parent
    if not parent.exists():
        raise OutputError(f"{parent} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}; choose another --out")


def write(out: Path, manifest: dict, files: Iterable[tuple[Path, str]]) -> Path:
    """Write a bundle atomically: into a temporary sibling, then renamed over ``out``.

    ``files`` are (source path, name inside the bundle). A previous bundle at ``out`` is replaced
    only once the new one is complete.
    """
    out = Path(out)
    check_writable(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    tmp.chmod(0o755)
    try:
        sums = {}
        for src, name in files:
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            sums[name] = sha256(dst)
        manifest = {"format_version": FORMAT_VERSION, **manifest, "files": sums}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
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
    return out


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST} (make one with `torchship optimize`)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path / MANIFEST} is not valid JSON ({exc})") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format_version')!r}, this torchship reads {FORMAT_VERSION}")
    return manifest


def verify(path: Path) -> dict:
    """Check every file against its sha256; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{path}: file {name} is missing")
        if sha256(f) != digest:
            raise BundleError(f"{path}: file {name} fails its checksum (changed or truncated since it was written)")
    return manifest


@dataclass
class Loaded:
    manifest: dict
    spec: IOSpec
    runner: object

    def __call__(self, feeds):
        return self.runner(feeds)


def load(path: Path, device: str | None = None, threads: int | None = None, spin: bool = True) -> Loaded:
    """Verify and load a bundle; the result maps {name: array} to {name: array} for a whole batch.

    ``threads``: intra-op threads (default: what the bundle was optimized with, at most this machine's cores).
    ``spin=False`` keeps ONNX Runtime's idle threads from spinning between calls, for a process that has other
    work between them (a server's event loop)."""
    from . import runtimes
    from .runtimes import Artifact
    path = Path(path)
    manifest = verify(path)
    artifact = Artifact.from_dict(manifest["artifact"])
    spec = IOSpec.from_dict(manifest["spec"])
    device = device or manifest.get("device", "cpu")
    threads = int(threads or min(artifact.options.get("threads") or cores(), cores()))
    artifact.options.update(threads=threads, spin=spin)
    import torch
    torch.set_num_threads(threads)
    runner = runtimes.get(artifact.runtime).load(artifact, path, spec, device)
    return Loaded(manifest, spec, runner)
