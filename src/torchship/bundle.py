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
from .flow import Branch, specialized
from .machine import cores
from .mix import Costs
from .processing import Processing
from .profile import Stats
from .runtimes.base import DESCRIPTORS, MODULES, Artifact, LoadContext
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
    lengths: Costs | None = None  # timed on a mix of lengths: a batch's cost at each (mix.Costs)
    cold_start_s: float | None = None
    artifact_bytes: int | None = None
    machine: dict[str, Any] = {}
    executes: str | None = None  # what loading runs beyond reading data (Python or native code), or None
    notes: tuple[str, ...] = ()  # what optimize noticed about the model as given (training mode, ...)
    processing: Processing | None = None  # raw input (text, images) to tensors and labels out, as data
    control_flow: tuple[Branch, ...] = ()  # where the model branches on its values
    specialized: bool = False  # the artifact keeps one path of that control flow (--allow-specialization)
    files: dict[str, Sha256] = {}

    def pricer(self):
        """(rows, length) -> one call's estimated milliseconds, from the costs timed at several lengths and batch
        sizes (``mix.Costs.pricer``); None where the bundle was not timed so."""
        return self.lengths.pricer(self.profile) if self.lengths else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _problem(path: Path, message: str) -> BundleError:
    return BundleError(f"{path / MANIFEST}: {message}")


MAX_DIM = 1 << 20  # the largest dimension a manifest may give
MAX_WARMUP_BYTES = 8 << 30  # inputs of one batch at max_batch_size: what warm-up allocates


def executes(artifact: Artifact) -> str | None:
    """What loading this artifact runs beyond reading data, in words; None when it runs nothing of the bundle's."""
    arch = artifact.architecture
    if arch is not None and arch.imports:
        return f"imports Python code from the module {arch.imports} ({arch.ref}) to rebuild the model"
    native = DESCRIPTORS[artifact.runtime].native if artifact.runtime in DESCRIPTORS else None
    if native:
        return f"runs native code: {native} " + ", ".join(artifact.files)
    return None


def _sizes(path: Path, m: Manifest) -> None:
    for t in (*m.spec.inputs, *m.spec.outputs):
        big = [d for d in t.shape if isinstance(d, int) and d > MAX_DIM]
        if big:
            raise _problem(path, f"field spec: {t.name} has dimension {big[0]}, over the limit of {MAX_DIM}")
    import numpy as np
    item = sum(int(np.prod([d if isinstance(d, int) else m.dims.get(d, 1) for d in t.shape if d != "batch"]))
               * np.dtype(t.dtype).itemsize for t in m.spec.inputs)
    if item * m.max_batch_size > MAX_WARMUP_BYTES:
        raise _problem(path, f"field max_batch_size: {m.max_batch_size} items of {item:,} bytes each would take "
                             f"{item * m.max_batch_size / 2**30:.0f} GiB of inputs per batch (limit "
                             f"{MAX_WARMUP_BYTES >> 30} GiB); set a smaller max_batch_size")


def _check(path: Path, m: Manifest) -> Manifest:
    """What the types alone do not say: a known runtime and transforms, every path relative and inside the bundle,
    sizes that fit a machine, and an honest ``executes``."""
    if m.runtime not in MODULES or m.artifact.runtime != m.runtime:
        raise _problem(path, f"runtime {m.runtime!r} (artifact: {m.artifact.runtime!r}) is not one torchship knows "
                             f"({', '.join(MODULES)}); the manifest is damaged: build the bundle again")
    for name in m.files:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or name in ("", MANIFEST) or "\\" in name:
            raise _problem(path, f"files lists {name!r}, which is not a relative path inside the bundle")
    unlisted = [f for f in (*m.artifact.files, *(m.processing.files if m.processing else ())) if f not in m.files]
    if unlisted:
        raise _problem(path, f"the artifact's files {unlisted} have no sha256 in 'files'; the runtime would read them "
                             "unchecked: build the bundle again")
    from .transforms import KINDS
    for t in (*m.artifact.options.transforms, *m.transforms):
        if not isinstance(t, dict) or t.get("kind") not in KINDS:
            raise _problem(path, f"field transforms: {t!r} is not a transform torchship knows ({', '.join(sorted(KINDS))})")
    _sizes(path, m)
    if m.executes != executes(m.artifact):
        raise _problem(path, f"field executes: {m.executes!r}, but loading this artifact "
                             f"{executes(m.artifact) or 'runs no code of the bundle'}: the manifest is damaged")
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
        shown = "" if value is None or "got" in text else f", got {msgspec.json.encode(value).decode()[:80]}"
        text = f"field {field}: {text[:found.start()]}{shown}"
    return _problem(path, f"{text} (the manifest is damaged or not torchship's: build the bundle again)")


def read_manifest(path: Path) -> Manifest:
    """The manifest, validated (format, types, ranges, paths); files are not hashed here (``read`` does)."""
    return parse(Path(path), _raw(Path(path)))


def _raw(path: Path) -> bytes:
    f = path / MANIFEST
    if not f.is_file() or f.is_symlink():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST} (make one with `torchship optimize`)")
    return f.read_bytes()


def parse(path: Path, raw: bytes) -> Manifest:
    """The manifest from its bytes, validated."""
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
    signer: str | None = None  # the key id of a signature checked against the key given
    unlisted: tuple[str, ...] = ()  # files in the directory the manifest does not list: never read


def _listed(path: Path, name: str) -> Path:
    """The listed file, refused if missing or reached through a symbolic link (``..`` is refused by ``_check``)."""
    f = path
    for part in PurePosixPath(name).parts:
        f = f / part
        if f.is_symlink():
            raise BundleError(f"{path}: {name} is reached through a symbolic link ({f.name}); a bundle holds its own "
                              "files: refusing it")
    if not f.is_file():
        raise BundleError(f"{path}: file {name} is missing")
    return f


def _unlisted(path: Path, m: Manifest) -> tuple[str, ...]:
    """Every entry that is not a directory and not in the manifest (links are listed, never followed)."""
    import os
    from .signing import SIGNATURE
    known = set(m.files) | {MANIFEST, SIGNATURE}
    found = []
    for folder, dirs, names in os.walk(path, followlinks=False):
        for name in names + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            rel = str((Path(folder) / name).relative_to(path))
            if rel not in known:
                found.append(rel)
    return tuple(sorted(found))


def _content(path: Path, m: Manifest, listed: set[str]) -> None:
    """What a runtime reads inside its files, checked before it reads them."""
    from .safety import check_onnx, check_pt2
    for name in m.artifact.files:
        if name.endswith(".pt2"):
            check_pt2(path / name)
        elif name.endswith(".onnx"):
            check_onnx(path / name, listed)


def _signed(path: Path, raw: bytes, key: Path | None) -> str | None:
    if key is None:
        return None
    from .signing import check
    return check(path, raw, key)


def read(path: Path, key: Path | None = None) -> Bundle:
    """Read and validate the manifest (and, with ``key``, its signature), and verify every file against it, once."""
    path = Path(path)
    raw = _raw(path)
    signer = _signed(path, raw, key)
    manifest = parse(path, raw)
    for name, digest in manifest.files.items():
        if sha256(_listed(path, name)) != digest:
            raise BundleError(f"{path}: file {name} fails its checksum (changed or truncated since it was written)")
    _content(path, manifest, set(manifest.files))
    return Bundle(path, manifest, path, signer, _unlisted(path, manifest))


def verify(path: Path, key: Path | None = None) -> Manifest:
    """Check every file against its sha256 (and, with ``key``, the signature); return the manifest."""
    return read(path, key).manifest


def snapshot(path: Path, into: Path, key: Path | None = None) -> Bundle:
    """Copy the bundle's listed files into ``into`` (a new private directory), hashing each as it is copied: one read
    of every file, and the copy is exactly what was verified (unlisted files are never copied, nor read)."""
    path, into = Path(path), Path(into)
    raw = _raw(path)
    signer = _signed(path, raw, key)
    manifest = parse(path, raw)
    into.mkdir(mode=0o700, parents=True)
    try:
        for name, digest in manifest.files.items():
            src, dst = _listed(path, name), into / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with src.open("rb") as fin, dst.open("wb") as fout:
                for block in iter(lambda: fin.read(1 << 20), b""):
                    h.update(block)
                    fout.write(block)
            if h.hexdigest() != digest:
                raise BundleError(f"{path}: file {name} fails its checksum (changed or truncated since it was written)")
        _content(into, manifest, set(manifest.files))
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return Bundle(into, manifest, path, signer)


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
                    lengths=Costs(result.mix, result.options.target, {s: v.p50_ms for s, v in c.by_length.items()})
                    if result.mix is not None and c.by_length else None,
                    artifact_bytes=c.artifact_bytes, machine=result.machine, executes=executes(c.artifact),
                    notes=result.notes, processing=result.processing, control_flow=result.branches,
                    specialized=bool(result.branches) and specialized(c))


def info(manifest: Manifest) -> bytes:
    """The manifest as indented JSON, for people."""
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2)


@dataclass
class Loaded:
    """A loaded bundle: ``loaded({name: array})`` runs a whole batch; a bundle with processing also takes raw items
    (``loaded(["a sentence", ...])``, ``loaded([jpeg_bytes, ...])``) through its own pipeline."""

    manifest: Manifest
    spec: IOSpec
    runner: object
    pipeline: Any = None  # processing's TextPipeline or ImagePipeline, where the bundle has one

    def __call__(self, feeds, top_k: int = 1):
        """``{name: array}`` -> ``{name: array}`` for a whole batch; a bundle with processing also takes raw items
        (a list of strings, or of images: encoded files' bytes or Pillow images). A classifier's answer has ``label``
        and ``score`` (softmax) beside its logits, the ``top_k`` best of each item."""
        run = self.runner
        if not isinstance(feeds, dict):
            from .processing.lengths import by_length
            feeds = self.encode([feeds] if isinstance(feeds, (str, bytes)) else list(feeds))
            # raw items: in batches of at most the bundle's batch size, similar lengths together
            run = by_length(run, self.spec, max_rows=self.manifest.max_batch_size, cost=self.manifest.pricer())
        outputs = run(feeds)
        labels = self.manifest.processing.labels if self.manifest.processing else None
        if labels is None:
            return outputs
        from .processing.labels import answer
        return {**outputs, **answer(labels, outputs, top_k)}

    def encode(self, items: list) -> dict:
        """The model's input tensors for raw ``items`` (texts or images), by the bundle's own pipeline."""
        from .errors import UsageError
        if self.pipeline is None:
            raise UsageError(f"bundle {self.manifest.name!r} has no processing: give it {{name: array}} for "
                             f"{self.spec.input_names}")
        if self.pipeline.kind == "text" and not all(isinstance(t, str) for t in items):
            raise UsageError("give text as a list of str")
        return self.pipeline.encode(items)


def load(source: Path | Bundle, device: str | None = None, threads: int | None = None, spin: bool = True,
         trust_code: bool = False, verify_key: Path | None = None) -> Loaded:
    """Verify (unless given a verified ``Bundle``) and load; the result maps {name: array} to {name: array} for a
    whole batch.

    ``threads``: intra-op threads (default: what the bundle was optimized with, at most this machine's cores).
    ``spin=False`` keeps ONNX Runtime's idle threads from spinning between calls, for a process that has other work
    between them (a server's event loop). A bundle whose loading runs code (it imports Python code from outside
    torchship, or an AOTInductor package's native code) loads only with consent: ``trust_code=True``, or a signature
    that ``verify_key`` (a public key's PEM file) verifies."""
    from .runtimes import get
    b = source if isinstance(source, Bundle) else read(Path(source), verify_key)
    m = b.manifest
    consent(b, trust_code)
    threads = int(threads or min(m.threads or cores(), cores()))
    ctx = LoadContext(device or m.device, threads, spin, trust_code or b.signer is not None)
    from .processing import pipeline
    return Loaded(m, m.spec, get(m.runtime).load(m.artifact, b.path, m.spec, ctx), pipeline(m.processing, b.path))


def sign(path: Path, private_key: Path):
    """Verify the bundle, then sign its manifest (``signature.json``); returns the Signature."""
    from .signing import sign as sign_manifest
    read(Path(path))
    return sign_manifest(Path(path) / MANIFEST, private_key)


def consent(b: Bundle, trust_code: bool) -> None:
    """Refuse a bundle whose loading runs code, unless trusted or signed by the key given."""
    what = executes(b.manifest.artifact)
    if what and not trust_code and b.signer is None:
        from .errors import UntrustedCode
        raise UntrustedCode(f"{b.origin}: this bundle {what}; load it only if you trust where it came from: "
                            "--trust-code (serve), trust_code=True (Python), or sign it in your pipeline "
                            "(torchship bundle sign) and give the public key (--verify-key)")


def remove(b: Bundle) -> None:
    """Delete a snapshot (never the directory it was read from)."""
    if b.path != b.origin:
        shutil.rmtree(b.path, ignore_errors=True)


def exists(path: Path) -> bool:
    return (Path(path) / MANIFEST).exists()

