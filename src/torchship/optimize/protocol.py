"""What crosses between optimize and a variant's worker process: typed messages, length-prefixed msgpack."""
from __future__ import annotations

import socket
import struct
from typing import Any, Literal

import msgspec

from ..arch import Architecture
from ..mix import Mix
from ..plan import VariantPlan
from ..runtimes.base import Artifact
from ..spec import IOSpec


class ModelRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a worker gets the parent's model back without running it again: an architecture and its weights
    (safetensors), a program or TorchScript file, or an ONNX file. The spec travels as it was inferred."""

    name: str
    spec: IOSpec
    task: str
    dims: dict[str, int]
    kind: Literal["arch", "program", "torchscript", "onnx"]
    arch: Architecture | None = None
    weights: str | None = None
    file: str | None = None
    keys: tuple[str, ...] | None = None
    by_keyword: bool = False


class Job(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    variant: VariantPlan
    model: ModelRef
    workdir: str
    pool: str  # .npz of the verification inputs
    calibration: str | None  # .npz of representative inputs for static int8
    chunk: int  # the batch size the verification inputs are run in
    threads: int
    sys_path: tuple[str, ...]  # as the parent had it: a user's module imports the same way in the worker
    cache: str | None = None  # the build cache's directory for this job's content hash (None: no cache)
    converted: str | None = None  # the plain variant's conversion to start from (``Descriptor.converted``)
    extra: str | None = None  # .npz of the inputs beyond the example ("CASE|NAME" keys) to run after the build
    raw: str | None = None  # .npz of raw input through the bundle's pipeline (one batch), to run after the build


class Built(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: Literal["ok", "skipped", "failed"]
    reason: str = ""
    artifact: Artifact | None = None
    build_s: float | None = None
    cold_start_s: float | None = None
    artifact_bytes: int | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    outputs: str | None = None  # .npz of the outputs on the verification inputs
    sparsity: float | None = None
    cached: bool = False
    extra_outputs: str | None = None  # .npz of the outputs on those inputs ("CASE|NAME")
    extra_errors: dict[int, str] = {}  # the cases it raised on
    raw_outputs: str | None = None  # .npz of the outputs on the raw input's tensors
    raw_error: str | None = None  # why it raised on them


class TimeBatch(msgspec.Struct, frozen=True, tag=True):
    batch: int
    runs: int  # at least this many timed calls ...
    seconds: float = 0.0  # ... and more, up to max_runs, while this much time has not passed
    max_runs: int = 0
    warmup: int = 1  # untimed calls first ...
    warmup_s: float = 0.0  # ... for at least this long
    pause_s: float = 0.0  # idle this long first, so that other processes' spinning threads go to sleep
    mix: Mix | None = None  # a timed call is one batch at each size of the mix; its time the weighed sum


class Stop(msgspec.Struct, frozen=True, tag=True):
    pass


class Samples(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch: int
    seconds: tuple[float, ...]  # one per timed call
    error: str | None = None  # the batch size cannot run: why
    by_size: dict[int, tuple[float, ...]] = {}  # with a mix: each size's seconds, call by call


_LENGTH = struct.Struct("<I")
_ENCODER = msgspec.msgpack.Encoder()


def send(conn: socket.socket, message: Any) -> None:
    data = _ENCODER.encode(message)
    conn.sendall(_LENGTH.pack(len(data)) + data)


def _exactly(conn: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(conn: socket.socket, kind) -> Any | None:
    """The next message, decoded as ``kind``; None when the other side has closed the connection."""
    head = _exactly(conn, _LENGTH.size)
    if head is None:
        return None
    body = _exactly(conn, _LENGTH.unpack(head)[0])
    return None if body is None else msgspec.msgpack.decode(body, type=kind)
