"""Bundles: a directory with ``manifest.json`` and the artifact files; loading never unpickles.

The manifest is one typed schema (``Manifest``), written and read only here and validated on every read. Every file
is listed with its sha256; a changed, missing or truncated file fails with a clear error. ``read`` verifies a bundle
once; ``snapshot`` verifies it while copying it somewhere private, so that what is loaded later (a worker restarted,
a reload) is what was verified, whatever happens to the directory it came from.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Iterable

import msgspec

from .errors import BundleError
from .machine import cores
from .profile import Stats
from .runtimes.base import MODULES, Artifact, LoadContext
from .spec import IOSpec
from .verify import Fidelity

FORMAT_VERSION = 2
MANIFEST = "manifest.json"

Positive = Annotated[int, msgspec.Meta(ge=1)]
Sha256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format_version: int
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    version: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,9}$")] = "1"
    created: str = ""
    torchship: str = ""
    torch: str | None = None
    spec: IOSpec
    task: str = "other"
    dims: dict[str, Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]] = {}
    variant: str
    runtime: str
    transforms: tuple[dict[str, Any], ...] = ()
    device: str = "cpu"
    threads: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    artifact: Artifact
    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 1
    budget: dict[str, float] = {}
    fidelity: Fidelity | None = None
    profile: dict[Positive, Stats] = {}
    cold_start_s: float | None = None
    artifact_bytes: int | None = None
    machine: dict[str, Any] = {}
    files: dict[str, Sha256] = {}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _problem(path: Path, message: str) -> BundleError:
    return BundleError(f"{path / MANIFEST}: {message}")


def _check(path: Path, m: Manifest) -> Manifest:
    """What the types alone do not say: a known runtime, and every path relative and inside the bundle."""
    if m.runtime not in MODULES or m.artifact.runtime != m.runtime:
        raise _problem(path, f"runtime {m.runtime!r} (artifact: {m.artifact.runtime!r}) is not one torchship knows "
                             f"({', '.join(MODULES)}); the manifest is damaged: build the bundle again")
    for name in m.files:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or name in ("", MANIFEST) or "\\" in name:
            raise _problem(path, f"files lists {name!r}, which is not a relative path inside the bundle")
    unlisted = [f for f in m.artifact.files if f not in m.files]
    if unlisted:
        raise _problem(path, f"the artifact's files {unlisted} have no sha256 in 'files'; the runtime would read them "
                             "unchecked: build the bundle again")
    return m


_AT = re.compile(r" - at `\$(.*)`$")


def _value_at(obj, where: str):
    """The value a validation error points at (``.artifact.files[0]``), for the message."""
    for key, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", where):
        try:
            obj = obj[key] if key else obj[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def _invalid(path: Path, obj, exc: msgspec.ValidationError) -> BundleError:
    text = str(exc)
    found = _AT.search(text)
    if found:
        field = found.group(1).lstrip(".") or "the manifest"
        value = _value_at(obj, found.group(1))
        shown = "" if value is None else f", got {msgspec.json.encode(value).decode()[:80]}"
        text = f"field {field}: {text[:found.start()]}{shown}"
    return _problem(path, f"{text} (the manifest is damaged or not torchship's: build the bundle again)")


def read_manifest(path: Path) -> Manifest:
    """The manifest, validated (format, types, ranges, paths); files are not hashed here (``read`` does)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST} (make one with `torchship optimize`)")
    raw = (path / MANIFEST).read_bytes()
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BundleError(f"{path / MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _problem(path, f"a manifest is a JSON object, got {type(obj).__name__}")
    if obj.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {obj.get('format_version')!r}, this torchship reads {FORMAT_VERSION} "
                          "(build it again with `torchship optimize`)")
    try:
        return _check(path, msgspec.json.decode(raw, type=Manifest))
    except msgspec.ValidationError as exc:
        raise _invalid(path, obj, exc) from None
    except BundleError:
        raise
    except Exception as exc:  # a spec that does not parse, and the like
        raise _problem(path, str(exc)) from None


@dataclass(frozen=True)
class Bundle:
    """A bundle whose files were checked against its manifest (at ``path``, which may be a private snapshot)."""

    path: Path
    manifest: Manifest
    origin: Path  # where it was read from


def read(path: Path) -> Bundle:
    """Read and validate the manifest, and verify every file against it, once."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, digest in manifest.files.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{path}: file {name} is missing")
        if sha256(f) != digest:
            raise BundleError(f"{path}: file {name} fails its checksum (changed or truncated since it was written)")
    return Bundle(path, manifest, path)


def verify(path: Path) -> Manifest:
    """Check every file against its sha256; return the manifest."""
    return read(path).manifest


def snapshot(path: Path, into: Path) -> Bundle:
    """Copy the bundle's listed files into ``into`` (a new private directory), hashing each as it is copied: one read
    of every file, and the copy is exactly what was verified."""
    path, into = Path(path), Path(into)
    manifest = read_manifest(path)
    into.mkdir(mode=0o700, parents=True)
    try:
        for name, digest in manifest.files.items():
            src, dst = path / name, into / name
            if not src.is_file():
                raise BundleError(f"{path}: file {name} is missing")
            dst.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with src.open("rb") as fin, dst.open("wb") as fout:
                for block in iter(lambda: fin.read(1 << 20), b""):
                    h.update(block)
                    fout.write(block)
            if h.hexdigest() != digest:
                raise BundleError(f"{path}: file {name} fails its checksum (changed or truncated since it was written)")
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return Bundle(into, manifest, path)


def write(out: Path, manifest: Manifest, files: Iterable[tuple[Path, str]]) -> Path:
    """Write a bundle atomically (a temporary sibling renamed over ``out``); ``files`` are (source, name inside)."""
    from msgspec.structs import replace

    from .outdir import staged
    with staged(Path(out), marker=MANIFEST) as tmp:
        sums = {}
        for src, name in files:
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            sums[name] = sha256(dst)
        manifest = replace(manifest, format_version=FORMAT_VERSION, files=sums)
        _check(tmp, manifest)
        (tmp / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2))
    return Path(out)


def manifest_for(result) -> Manifest:
    """The manifest of an optimize result's chosen variant (``files`` are filled in by ``write``)."""
    from . import __version__
    c = result.chosen
    return Manifest(format_version=FORMAT_VERSION, name=result.model, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    torchship=__version__, torch=result.machine["versions"].get("torch"), spec=result.spec,
                    task=result.task, dims=result.dims, variant=c.name, runtime=c.runtime, transforms=c.transforms,
                    device=result.options.device, threads=result.machine["threads"], artifact=c.artifact,
                    max_batch_size=result.chosen_batch_size, budget=result.budget,
                    fidelity=c.fidelity, profile=c.profile, cold_start_s=c.cold_start_s,
                    artifact_bytes=c.artifact_bytes, machine=result.machine)


def info(manifest: Manifest) -> bytes:
    """The manifest as indented JSON, for people."""
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2)


@dataclass
class Loaded:
    manifest: Manifest
    spec: IOSpec
    runner: object

    def __call__(self, feeds):
        return self.runner(feeds)


def load(source: Path | Bundle, device: str | None = None, threads: int | None = None, spin: bool = True,
         trust_code: bool = False) -> Loaded:
    """Verify (unless given a verified ``Bundle``) and load; the result maps {name: array} to {name: array} for a
    whole batch.

    ``threads``: intra-op threads (default: what the bundle was optimized with, at most this machine's cores).
    ``spin=False`` keeps ONNX Runtime's idle threads from spinning between calls, for a process that has other work
    between them (a server's event loop). ``trust_code``: a bundle that rebuilds its model by importing Python code
    from outside torchship loads only with it."""
    from .runtimes import get
    b = source if isinstance(source, Bundle) else read(Path(source))
    m = b.manifest
    threads = int(threads or min(m.threads or cores(), cores()))
    ctx = LoadContext(device or m.device, threads, spin, trust_code)
    return Loaded(m, m.spec, get(m.runtime).load(m.artifact, b.path, m.spec, ctx))


def remove(b: Bundle) -> None:
    """Delete a snapshot (never the directory it was read from)."""
    if b.path != b.origin:
        shutil.rmtree(b.path, ignore_errors=True)


def exists(path: Path) -> bool:
    return (Path(path) / MANIFEST).exists()

