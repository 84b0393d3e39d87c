"""The build cache: a variant built once for the same model, weights, data, options, versions and CPU is copied from
``TORCHSHIP_CACHE/builds`` the next time (``key``: where; ``get`` and ``put``: both sides of a worker's build)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Mapping

import msgspec
import numpy as np

from ..runtimes.base import Artifact

# the build recipes' revision, part of every cache key: raise it when a runtime builds something else from the same
# model and options (3: int8 weights in 7 bits, ONNX Runtime's and PT2E's; 4: typed build options; 5: OpenVINO's int8
# with accuracy control), so that no cached build of an old recipe is used
BUILD_RECIPES = 5
LIMIT = 4 * 2**30  # bytes of cached builds kept; the least recently used go first


def key(vp, ref, threads: int, arrays: tuple[Mapping[str, np.ndarray], ...], digests: dict[Path, bytes]) -> str:
    """The cache's directory for what a build depends on: the model (architecture and weights, or its file), its
    example and calibration inputs (``arrays``), the variant's plan, and the versions and CPU it is built on.
    ``digests`` keeps each file's digest for the next variant of the same run."""
    from ..machine import cpu
    from ..outdir import cache_dir
    h = hashlib.sha256()
    h.update(msgspec.msgpack.encode([_version(), cpu()[0], sorted(cpu()[1]), threads, vp,
                                     msgspec.structs.replace(ref, weights=None, file=None, name="")]))
    for path in (ref.weights, ref.file):
        if path:
            path = Path(path)
            if path not in digests:
                digests[path] = (_file_digest(path) if path.suffix != ".safetensors" else _tensor_digest(path)).encode()
            h.update(digests[path])
    for found in arrays:
        for k in sorted(found):
            a = np.ascontiguousarray(found[k])
            h.update(f"{k}{a.dtype}{a.shape}".encode() + a.tobytes())
    return str(cache_dir("builds") / h.hexdigest()[:32])


class _Cached(msgspec.Struct):
    artifact: Artifact
    build_s: float
    extra: dict


def get(cache: str | None, workdir: Path):
    """(artifact, build seconds, extras) copied from the build cache into ``workdir``, or None."""
    if not cache or not (Path(cache) / "build.json").exists():
        return None
    root = Path(cache)
    try:
        entry = msgspec.json.decode((root / "build.json").read_bytes(), type=_Cached)
        for name in entry.artifact.files:
            shutil.copyfile(root / name, workdir / name)
        os.utime(root)  # recently used
    except (OSError, msgspec.DecodeError):
        return None
    return entry.artifact, entry.build_s, entry.extra


def put(cache: str | None, workdir: Path, artifact: Artifact, build_s: float, extra: dict) -> None:
    """Keep the build (written whole, then renamed into place); never fails the variant."""
    if not cache:
        return
    root = Path(cache)
    tmp = root.with_name(f".{root.name}.{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        for name in artifact.files:
            shutil.copyfile(workdir / name, tmp / name)
        (tmp / "build.json").write_bytes(msgspec.json.encode(_Cached(artifact, build_s, extra)))
        tmp.rename(root)
        _prune(root.parent, LIMIT)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(builds: Path, limit: int) -> None:
    entries = sorted((p for p in builds.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in entries}
    total = sum(sizes.values())
    for p in entries:
        if total <= limit:
            break
        shutil.rmtree(p, ignore_errors=True)
        total -= sizes[p]


def _version() -> list[str]:
    from .. import __version__
    from ..machine import info
    return [__version__, str(BUILD_RECIPES), *info()["versions"].values()]


def _file_digest(path: Path) -> str:
    from ..bundle import sha256
    return sha256(path)


def _tensor_digest(path: Path) -> str:
    """The weights' content (names, dtypes, shapes, values), whatever order and metadata the file was written with."""
    from safetensors.numpy import load_file
    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path)).items()):
        h.update(f"{k}{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v).tobytes())
    return h.hexdigest()
