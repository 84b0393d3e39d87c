"""What a model file could make this process execute, checked before anything reads it.

- ``.pt2`` (torch.export programs, AOTInductor packages): torch's reader unpickles an entry whose payload config says
  ``use_pickle``, any ``custom_obj_``/``opaque_obj_`` constant, the legacy ``<model>.pt`` weight and constant files,
  and sample inputs that fail to load with ``weights_only=True`` (it retries without). ``check_pt2`` opens the archive
  itself and refuses every one of them, and any entry whose name would land outside the directory it is unpacked in.
  An AOTInductor package also holds a compiled shared library: loading it runs that native code (``native`` says so).
- ONNX: protobuf, no code; external data files are read from the paths the model names, so ``check_onnx`` refuses
  any that is absolute, leaves the model's directory or is not in the given list.
- safetensors, ``.npz`` with ``allow_pickle=False``: no code. TorchScript: read by torch's C++ unpickler (no Python
  objects are built, no Python code runs) and then interpreted; it can call any registered torch operator.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UnsafeFile


@dataclass(frozen=True)
class Pt2:
    native: bool  # an AOTInductor package: loading it runs the compiled shared library inside
    entries: int


def _refuse(path: Path, name: str, why: str) -> UnsafeFile:
    return UnsafeFile(f"{path}: refusing to read it: entry {name!r} {why}; nothing from the file was loaded "
                      "(build the program again with torch.export.save or torchship, which write none)")


def check_pt2(path: Path) -> Pt2:
    """Refuse a .pt2 with anything torch's reader would unpickle; say whether it carries native code."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeFile(f"{path} is not a .pt2 archive ({exc})") from None
    with archive:
        names = archive.namelist()
        native = False
        for name in names:
            p = PurePosixPath(name)
            if p.is_absolute() or ".." in p.parts or "\\" in name:
                raise _refuse(path, name, "would be unpacked outside the archive's directory")
            inner = "/".join(p.parts[1:])  # under the archive's root folder
            if name.endswith(".pkl"):
                raise _refuse(path, name, "is a pickle")
            if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt") and inner.count("/") == 2:
                raise _refuse(path, name, "is a legacy pickled weights or constants file")
            if inner.startswith("data/aotinductor/") and name.endswith(".so"):
                native = True
            if inner.endswith(("_weights_config.json", "_constants_config.json")):
                _check_config(path, name, archive.read(name))
            if inner.startswith("data/sample_inputs/") and inner.endswith(".pt"):
                _check_weights_only(path, name, archive.read(name))
        return Pt2(native, len(names))


def _check_config(path: Path, name: str, raw: bytes) -> None:
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError):
        raise _refuse(path, name, "is not a valid payload config") from None
    for key, meta in config.items():
        if not isinstance(meta, dict):
            raise _refuse(path, name, f"has a malformed entry for {key!r}")
        if meta.get("use_pickle"):
            raise _refuse(path, name, f"marks {key!r} to be unpickled (use_pickle)")
        if str(meta.get("path_name", "")).startswith(("custom_obj_", "opaque_obj_")):
            raise _refuse(path, name, f"holds {key!r} as a pickled object ({meta.get('path_name')})")


def _check_weights_only(path: Path, name: str, raw: bytes) -> None:
    """torch retries a failed weights_only load without it: what fails here is refused before torch sees it."""
    import warnings

    import torch
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the load is all that matters here
            torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as exc:
        raise _refuse(path, name, f"loads only by unpickling ({str(exc).splitlines()[0][:120]})") from None


def check_onnx(path: Path, listed: set[str] | None = None) -> None:
    """Refuse an ONNX model whose external data lies outside its directory (or outside ``listed``, names relative
    to that directory)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UnsafeFile(f"{path} is not a readable ONNX model ({str(exc).splitlines()[0][:160]})") from None
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        p = PurePosixPath(location)
        if not location or p.is_absolute() or ".." in p.parts or "\\" in location:
            raise UnsafeFile(f"{path}: tensor {tensor.name!r} reads its data from {location!r}, outside the model's "
                             "directory; refusing to load it")
        if listed is not None and str(p) not in listed:
            raise UnsafeFile(f"{path}: tensor {tensor.name!r} reads its data from {location!r}, which the bundle's "
                             "manifest does not list with a checksum; refusing to load it")
