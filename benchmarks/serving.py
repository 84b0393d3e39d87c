"""Serving figures from one run on digits-cnn with single-image requests (binary tensors):

- served throughput at concurrency 64, as a ratio to the offline batched throughput of the same Runner
  and to the same server with batching off (--max-batch-size 1);
- p50 at concurrency 1;
- an open-loop Poisson load at twice the measured capacity with --slo-ms: goodput (answers within the SLO) as a
  fraction of capacity and the p99 of accepted requests against the SLO.

The load comes from benchmarks/loadgen.c (built here with the C compiler that `make system-deps` installs): a
Python generator takes about a core at 10,000 requests/s, which on a 2-core machine is half of what the server
could use. It still runs on the same cores as the server, so served figures here are a floor.

What any server could reach here: benchmarks/ceiling.c, a C server that reads each request and sends a fixed
answer, is measured with the same generator, and each goal is set against it (its rate bounds served / offline;
its CPU a request bounds batching on / off; what refusing costs against serving bounds goodput under overload).

The fronts, on digits-cnn at concurrency 64 in interleaved rounds: one server process (`--procs 1`), two on the
port (`--procs 2`), and one whose batches never wait (`--busy-delay-us 0`, the batcher before it waited for a batch
to fill while the event loop is saturated: gRPC calls reach the batcher one at a time), each over HTTP with binary
and with JSON tensors and over gRPC, beside what grpcio reaches in one Python process (benchmarks/grpc_ceiling.py, a servicer that returns a fixed answer). The gRPC load
comes from h2load (nghttp2's HTTP/2 generator, in C; `make system-deps` installs it), one call in flight on each of
64 connections, like loadgen.c's closed loop; the calls torchship served are counted from its metrics.

digits-cnn costs about 2 us an item offline, so on it an HTTP request is the whole cost. `--minilm` adds the same
figures on MiniLM (single sentences of 64 tokens, ONNX Runtime), a model whose compute dominates, to show what
the batcher itself gives up against offline batching and how SLO mode sheds overload.

    python benchmarks/serving.py [--duration 5] [--slo-ms 50] [--rounds 2] [--minilm] [--minilm-slo-ms 500]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson

from torchship import OptimizeOptions, load_bundle, optimize
from torchship.perf import MAX_OPEN, _counters, make_request
from torchship.profile import median_s
from torchship.serve.protocol import HEADER
from torchship.zoo.digits import dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spread(values, fmt: str = "{:,.2f}") -> str:
    """Median [low-high] of one figure's rounds."""
    return f"{fmt.format(float(np.median(values)))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def wait_ready(port: int, what: str = "server") -> None:
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready")


class Server:
    def __init__(self, bundle: Path, *args: str, src: Path | None = None, cwd: Path | None = None):
        """``src``: serve with torchship from that source tree (benchmarks/front_ab.py's old and new)."""
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(src)} if src is not None else None
        self.proc = subprocess.Popen([sys.executable, "-m", "torchship.cli", "serve", str(bundle), "--port", str(self.port),
                                      "--trust-code", *args],  # this script's own bundles, whatever runtime won
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
        wait_ready(self.port)

    def __enter__(self):
        return self

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, model: str, dims: dict | None) -> bytes:
        """The whole HTTP response to one single-item request, as bytes."""
        body, headers = single_request(self.url, model, dims)
        r = httpx.post(f"http://{self.url}/v2/models/{model}/infer", content=body, headers=headers)
        head = "".join(f"{k}: {v}\r\n" for k, v in r.headers.items())
        return f"HTTP/1.1 {r.status_code} {r.reason_phrase}\r\n{head}\r\n".encode() + r.content

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class Ceiling:
    """benchmarks/ceiling.c on a free port, one thread a core, answering ``answer`` to every request."""

    def __init__(self, load: "Load", answer: bytes):
        self.port, path = free_port(), load.work / "answer.bin"
        path.write_bytes(answer)
        self.proc = subprocess.Popen([str(load.ceiling_exe), str(self.port), str(os.cpu_count()), str(path)],
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("benchmarks/ceiling.c did not start")

    def __enter__(self):
        return f"127.0.0.1:{self.port}", self.proc.pid

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait(10)


@dataclass
class Run:
    seconds: float
    statuses: dict[int, int]
    ok_ms: np.ndarray  # latency of each 200, from its arrival
    not_sent: int
    avg_batch: float | None
    refused_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # latency of each answer that is not a 200
    refused_connections: int = 0  # connects the server refused (a draining server): nothing sent, nothing lost

    @property
    def throughput(self) -> float:
        return len(self.ok_ms) / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.ok_ms, q)) if len(self.ok_ms) else float("nan")

    def goodput(self, slo_ms: float) -> float:
        return int((self.ok_ms <= slo_ms).sum()) / self.seconds

    def refused(self) -> str:
        parts = [f"{n} x {code}" for code, n in sorted(self.statuses.items()) if code != 200]
        parts += [f"{self.not_sent} not sent (generator at {MAX_OPEN} connections)"] if self.not_sent else []
        return ", ".join(parts) or "none"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process and its descendants (the server processes of --procs, model
    workers) have used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):  # gone meanwhile
        return 0.0
    total = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # its own, and its children's that ended
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(cpu_seconds(int(child)) for child in children)
    return total


def measured(pid: int, load: "Load", url: str, model: str, *args, **kwargs) -> tuple[Run, float]:
    """A load run, and the server process's CPU seconds per answer during it."""
    used = cpu_seconds(pid)
    run = load(url, model, *args, **kwargs)
    return run, (cpu_seconds(pid) - used) / max(1, sum(run.statuses.values()))


def single_request(url: str, model: str, dims: dict | None, binary: bool = True) -> tuple[bytes, dict]:
    """Body and headers of a single-item infer request (binary tensors, or JSON), from the model's metadata."""
    return make_request(httpx.get(f"http://{url}/v2/models/{model}").json(), 1, dims or {}, binary)


class Load:
    """benchmarks/loadgen.c, compiled once, pointed at one model of one server; benchmarks/ceiling.c beside it."""

    def __init__(self, work: Path):
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            sys.exit("benchmarks/serving.py needs a C compiler for its load generator: run `make system-deps` "
                     "(or apt-get install gcc)")
        self.exe, self.ceiling_exe, self.work = work / "loadgen", work / "ceiling", work
        here = Path(__file__).parent
        subprocess.run([cc, "-O2", "-o", str(self.exe), str(here / "loadgen.c"), "-lm"], check=True)
        subprocess.run([cc, "-O2", "-o", str(self.ceiling_exe), str(here / "ceiling.c"), "-lpthread"], check=True)

    def request(self, url: str, model: str, dims: dict | None = None, path: str | None = None,
                binary: bool = True) -> bytes:
        """One single-item infer request for ``model``, as bytes on the wire (sent to ``path`` if given)."""
        body, headers = single_request(url, model, dims, binary)
        head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": len(body)}.items())
        return f"POST {path or f'/v2/models/{model}/infer'} HTTP/1.1\r\nHost: {url}\r\n{head}\r\n".encode() + body

    def __call__(self, url: str, model: str, mode: str, value: float, seconds: float, dims: dict | None = None,
                 request: bytes | None = None, backoff_ms: float = 0) -> Run:
        """``backoff_ms`` (closed loop): after an answer other than 200, a connection waits this long."""
        host, port = url.split(":")
        request_file = self.work / "request.bin"
        request_file.write_bytes(request or self.request(url, model, dims))
        with httpx.Client() as c:
            before = _counters(c, f"http://{url}", model)
            extra = [str(MAX_OPEN), "0"] if mode == "poisson" else [f"{backoff_ms:g}"] if backoff_ms else []
            out = subprocess.run([str(self.exe), host, port, str(request_file), mode, f"{value:g}", str(seconds), *extra],
                                 capture_output=True, text=True, timeout=seconds + 60, check=True).stdout.split("\n")
            after = _counters(c, f"http://{url}", model)
        rows = [line.split() for line in out if line[:1].isdigit()]
        statuses: dict[int, int] = {}
        for status, _ in rows:
            statuses[int(status)] = statuses.get(int(status), 0) + 1
        tail = dict(line.split() for line in out if line[:1].isalpha())
        statuses.update({0: int(tail["failed"])} if int(tail["failed"]) else {})
        batch = (after[0] - before[0]) / (after[1] - before[1]) if before and after and after[1] > before[1] else None
        return Run(seconds, statuses, np.array([int(us) / 1e3 for status, us in rows if status == "200"]),
                   int(tail["not_sent"]), batch, np.array([int(us) / 1e3 for status, us in rows if status != "200"]),
                   int(tail.get("refused", 0)))


def grpc_request(url: str, model: str, dims: dict | None) -> bytes:
    """One single-item ModelInfer call as h2load sends it: the gRPC frame (flag, length, message) of the request
    whose tensors travel in raw_input_contents, the same tensors as the binary HTTP request's."""
    from tritonclient.grpc import service_pb2 as pb
    body, headers = single_request(url, model, dims)
    n = int(headers[HEADER])
    head, raw, at = orjson.loads(body[:n]), body[n:], 0
    request = pb.ModelInferRequest(model_name=model)
    for i in head["inputs"]:
        request.inputs.add(name=i["name"], datatype=i["datatype"], shape=i["shape"])
        size = i["parameters"]["binary_data_size"]
        request.raw_input_contents.append(raw[at:at + size])
        at += size
    message = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(message)) + message


def served(url: str, model: str) -> float:
    """torchship_request_success_total of ``model``, all versions (every server process's, summed)."""
    rows = httpx.get(f"http://{url}/metrics").text.splitlines()
    return sum(float(r.rsplit(" ", 1)[1]) for r in rows
               if r.startswith("torchship_request_success_total{") and f'model="{model}"' in r)


class GrpcLoad:
    """h2load, a closed loop of ``conns`` connections with one call in flight each, sending the same gRPC call."""

    def __init__(self, work: Path):
        self.exe, self.work = shutil.which("h2load"), work

    def __call__(self, grpc_url: str, call: bytes, conns: int, seconds: float, http_url: str | None = None,
                 model: str = "") -> Run:
        """With ``http_url`` (torchship's), the calls it served come from its metrics (gRPC errors travel in an HTTP
        200); without (the ceiling), every HTTP 200 counts."""
        body, log = self.work / "grpc-call.bin", self.work / "h2load.log"
        body.write_bytes(call)
        log.unlink(missing_ok=True)  # h2load appends to its log
        before = served(http_url, model) if http_url else 0.0
        with httpx.Client() as c:
            counts = _counters(c, f"http://{http_url}", model) if http_url else None
        subprocess.run([self.exe, "-D", f"{seconds:g}", "-c", str(conns), "-m", "1", "-t", "1", "-d", str(body),
                        "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
                        f"http://{grpc_url}/inference.GRPCInferenceService/ModelInfer"],
                       capture_output=True, text=True, timeout=seconds + 60, check=True)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
        ok = np.array([int(us) / 1e3 for _, status, us in rows if status == "200"])
        answered = int(served(http_url, model) - before) if http_url else len(ok)
        statuses = {200: answered, **({0: len(rows) - answered} if len(rows) > answered else {})}
        batch = None
        if counts:
            with httpx.Client() as c:
                after = _counters(c, f"http://{http_url}", model)
            batch = (after[0] - counts[0]) / (after[1] - counts[1]) if after and after[1] > counts[1] else None
        # a failed call's latency cannot be told from a served one's: with failures, the first ``answered`` stand in
        return Run(seconds, statuses, ok[:answered], 0, batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the fronts' comparison")
    p.add_argument("--minilm", action="store_true", help="also serve MiniLM (needs the nlp extra)")
    p.add_argument("--minilm-slo-ms", type=float, default=500.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="torchship-bench-"))
    load = Load(work)
    res = optimize("zoo:digits-cnn", OptimizeOptions(batch_sizes=(1, 8, 64), seconds_per_size=0.5), out=work / "bundle")
    runner = load_bundle(res.bundle, trust_code=True)
    x = dataset()["test"][0]
    offline = 64 / (median_s(runner, {"image": x[:64]}, seconds=2.0))
    single = 1 / (median_s(runner, {"image": x[:1]}, seconds=2.0))
    print(f"digits-cnn bundle: {res.chosen.name}; offline batched throughput at batch 64: {offline:,.0f} items/s, "
          f"at batch 1: {single:,.0f} ({os.cpu_count()} cores, server and load generator share them)")
    figures(load, res.bundle, "digits-cnn", offline, single, args.duration, args.slo_ms, batch=64)
    fronts(load, GrpcLoad(work), res.bundle, "digits-cnn", args.duration, args.rounds)
    if args.minilm:
        minilm(load, work, args.duration, args.minilm_slo_ms)


def figures(load: Load, bundle: Path, model: str, offline: float, single: float, duration: float, slo_ms: float,
            batch: int, dims: dict | None = None) -> None:
    rows, cost = {}, {}  # cost: the server's CPU seconds per answer
    for label, size in (("on", batch), ("off", 1)):
        with Server(bundle, "--max-batch-size", str(size)) as s:
            rows[label], cost[label] = measured(s.proc.pid, load, s.url, model, "closed", 64, duration, dims)
            if label == "on":
                rows["c1"] = load(s.url, model, "closed", 1, duration, dims)
                as_json = load.request(s.url, model, dims, binary=False)
                rows["json"] = load(s.url, model, "closed", 64, duration, dims, request=as_json)
                request, answer = load.request(s.url, model, dims), s.answer(model, dims)
                missing = load.request(s.url, model, dims, path="/v2/models/no-such-model/infer")
                _, cost["refusal"] = measured(s.proc.pid, load, s.url, model, "closed", 64, duration, request=missing)
    on, off, c1 = rows["on"], rows["off"], rows["c1"]
    print(f"concurrency 64, batching on : {on.throughput:,.1f} req/s, p50 {on.pct(50):.1f} ms, p99 {on.pct(99):.1f} ms, "
          f"avg batch {on.avg_batch or 0:.1f}, refused {on.refused()}")
    print(f"concurrency 64, batching off: {off.throughput:,.1f} req/s, p99 {off.pct(99):.1f} ms, refused {off.refused()}")
    print(f"  served / offline batched throughput: {on.throughput / offline:.3f}  (goal >= 0.8)")
    print(f"  batching on / off:                   {on.throughput / off.throughput:.2f}x  (goal >= 3; offline, batch "
          f"{batch} / batch 1: {offline / single:.1f}x)")
    print(f"concurrency 1: p50 {c1.pct(50):.2f} ms, {c1.throughput:,.1f} req/s")
    js, kb = rows["json"], len(as_json.split(b"\r\n\r\n", 1)[1]) / 1024
    print(f"concurrency 64, JSON requests ({kb:.0f} KB body, JSON "
          f"answers): {js.throughput:,.1f} req/s, p99 {js.pct(99):.1f} ms, refused {js.refused()}")
    capacity = on.throughput
    with Server(bundle, "--max-batch-size", str(batch), "--slo-ms", f"{slo_ms:g}") as s:
        over = load(s.url, model, "poisson", 2 * capacity, duration, dims)
    print(f"open loop, Poisson at 2x capacity ({2 * capacity:,.1f} req/s offered) with --slo-ms {slo_ms:g}: goodput "
          f"{over.goodput(slo_ms):,.1f} req/s = {over.goodput(slo_ms) / capacity:.2f} of capacity (goal >= 0.9); p99 "
          f"of accepted {over.pct(99):.1f} ms (SLO {slo_ms:g} ms); avg batch {over.avg_batch or 0:.1f}; "
          f"refused {over.refused()}")
    bounds(load, model, request, answer, offline, single, batch, duration, cost, on)


FRONTS = {"--procs 1": [], "--procs 2": ["--procs", "2"], "--busy-delay-us 0": ["--busy-delay-us", "0"]}


def fronts(load: Load, grpc: GrpcLoad, bundle: Path, model: str, duration: float, rounds: int) -> None:
    """One server process, two on the port, and one whose batches never wait for more requests (HTTP binary, HTTP
    JSON, gRPC at concurrency 64; concurrency 1 p50), and grpcio's own ceiling, in interleaved rounds; each ratio is
    taken within a round."""
    if grpc.exe is None:
        print("fronts: skipped, h2load is not installed (`make system-deps`, or apt-get install nghttp2-client)")
        return
    rows = {(front, kind): [] for front in FRONTS for kind in ("binary", "json", "grpc", "c1", "grpc batch")}
    ceiling = []
    for _ in range(rounds):
        for front, args in FRONTS.items():
            gport = free_port()
            with Server(bundle, *args, "--grpc-port", str(gport)) as s:
                time.sleep(1.0)  # every server process listening (the first ready one answered the health check)
                rows[front, "binary"].append(load(s.url, model, "closed", 64, duration).throughput)
                as_json = load.request(s.url, model, binary=False)
                rows[front, "json"].append(load(s.url, model, "closed", 64, duration, request=as_json).throughput)
                call = grpc_request(s.url, model, None)
                over_grpc = grpc(f"127.0.0.1:{gport}", call, 64, duration, s.url, model)
                rows[front, "grpc"].append(over_grpc.throughput)
                rows[front, "grpc batch"].append(over_grpc.avg_batch or 0.0)
                rows[front, "c1"].append(load(s.url, model, "closed", 1, duration / 2).pct(50))
        port = free_port()
        top = subprocess.Popen([sys.executable, str(Path(__file__).with_name("grpc_ceiling.py")), str(port)],
                               stdout=subprocess.PIPE, text=True)
        try:
            if top.stdout.readline().strip() != "ready":
                raise RuntimeError("benchmarks/grpc_ceiling.py did not start")
            ceiling.append(grpc(f"127.0.0.1:{port}", call, 64, duration).throughput)
        finally:
            top.kill()
            top.wait(10)

    def counts(values) -> str:
        return spread(values, "{:,.0f}")

    def ratio(a, b) -> str:
        return spread([x / y for x, y in zip(a, b)])
    print(f"fronts, {model} at concurrency 64, {rounds} interleaved rounds (median [low-high]); {os.cpu_count()} cores "
          "shared with the load generators:")
    for front in FRONTS:
        print(f"  {front:<26}: HTTP binary {counts(rows[front, 'binary'])} req/s, HTTP JSON (16 KB) "
              f"{counts(rows[front, 'json'])}, gRPC {counts(rows[front, 'grpc'])} (average batch "
              f"{spread(rows[front, 'grpc batch'], '{:.1f}')}); concurrency 1 p50 "
              f"{spread(rows[front, 'c1'], '{:.2f}')} ms")
    print(f"  grpcio's own ceiling (a servicer answering a fixed ModelInferResponse, one process): {counts(ceiling)} req/s")
    print("  --procs 2 / --procs 1: " + ", ".join(
        f"{label} {ratio(rows['--procs 2', k], rows['--procs 1', k])}"
        for label, k in (("HTTP binary", "binary"), ("JSON", "json"), ("gRPC", "grpc"), ("concurrency 1 p50", "c1"))))
    print("  --procs 1 (batches wait up to 2 ms while the loop is saturated) / --busy-delay-us 0: " + ", ".join(
        f"{label} {ratio(rows['--procs 1', k], rows['--busy-delay-us 0', k])}"
        for label, k in (("HTTP binary", "binary"), ("JSON", "json"), ("gRPC", "grpc"), ("concurrency 1 p50", "c1"))))
    print(f"  gRPC / HTTP binary: --procs 1 {ratio(rows['--procs 1', 'grpc'], rows['--procs 1', 'binary'])}, --procs 2 "
          f"{ratio(rows['--procs 2', 'grpc'], rows['--procs 2', 'binary'])}; torchship's gRPC / grpcio's ceiling "
          f"{ratio(rows['--procs 1', 'grpc'], ceiling)} (goal >= 0.8; with --busy-delay-us 0: "
          f"{ratio(rows['--busy-delay-us 0', 'grpc'], ceiling)}); the ceiling / torchship's HTTP binary "
          f"{ratio(ceiling, rows['--procs 1', 'binary'])}")


def bounds(load: Load, model: str, request: bytes, answer: bytes, offline: float, single: float, batch: int,
           duration: float, cost: dict, on: Run) -> None:
    """What the goals ask of any server here: the ceiling server's rate and CPU a request against each goal."""
    with Ceiling(load, answer) as (url, pid):
        top, top_cost = measured(pid, load, url, model, "closed", 64, duration, request=request)
    us = lambda seconds: f"{seconds * 1e6:,.1f} us"  # noqa: E731
    print(f"what any server could do here: benchmarks/ceiling.c (C, epoll, {os.cpu_count()} threads; reads each "
          f"request, sends a fixed answer) serves {top.throughput:,.0f} req/s at concurrency 64 with {us(top_cost)} of "
          f"CPU a request; torchship {us(cost['on'])} (batching on), {us(cost['off'])} (off), {us(cost['refusal'])} "
          f"to refuse (404)")
    print(f"  served / offline can be at most {min(1.0, top.throughput / offline):.3f} here (the ceiling's rate / offline); "
          f"torchship serves at {on.throughput / top.throughput:.2f} of the ceiling")
    http = (1 / single - 3 / offline) / 2  # (h + t1) / (h + t_batch) >= 3  <=>  h <= (t1 - 3 t_batch) / 2
    need = f"under {us(http)} of HTTP work a request" if http > 0 else "an HTTP request that costs nothing, and more"
    print(f"  batching on / off >= 3 needs {need} (batch 1 runs in {us(1 / single)}, batch {batch} in "
          f"{us(1 / offline)} an item); the ceiling server spends {us(top_cost)}")
    r = cost["refusal"] / cost["on"]
    print(f"  goodput at 2x capacity is at most {max(0.0, (1 - 2 * r) / (1 - r)):.2f} when refusing costs {r:.2f} of "
          f"serving (torchship, measured above); 0.9 needs refusals under 0.09 of a served request's cost")


def minilm(load: Load, work: Path, duration: float, slo_ms: float, seq: int = 64, batch: int = 16) -> None:
    res = optimize("zoo:minilm", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(1, batch), seconds_per_size=1.0,
                                                 transforms=()), dims={"seq": seq}, out=work / "minilm")
    runner = load_bundle(res.bundle, trust_code=True)
    feeds = runner.spec.sample(batch, {"seq": seq}, seed=0)
    offline = batch / (median_s(runner, feeds, seconds=3.0))
    single = 1 / (median_s(runner, {k: v[:1] for k, v in feeds.items()}, seconds=3.0))
    print(f"MiniLM, one sentence of {seq} tokens per request; offline at batch {batch}: {offline:,.1f} items/s, "
          f"at batch 1: {single:,.1f} items/s")
    figures(load, res.bundle, "minilm", offline, single, duration, slo_ms, batch, {"seq": seq})


if __name__ == "__main__":
    main()
