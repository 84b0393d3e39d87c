"""Serving under abuse, measured in one run on digits-cnn (single-image binary requests, benchmarks/loadgen.c):

1. Flood: the same server (--max-queue 16) under 64 and under 512 closed-loop connections, in interleaved rounds.
   Goals: accepted throughput at 512 >= 0.8 of it at 64; accepted p99 at 512 <= 2x the p99 at 64; the refusals'
   p99 <= 20 ms; no connection reset.
   And 512 connections that, refused, wait the Retry-After (1 s) before sending again, as polite clients do.
   And Poisson arrivals at twice the capacity, against the most one event loop can accept there: when a refusal
   costs r of a served request's CPU, serving x of capacity and refusing the other k - x (k = 2, or less when the
   generator's 512 connections are all busy) needs x + (k - x) r <= 1, so x <= (1 - kr) / (1 - r). r is measured
   in the same round: the server CPU per 503 (Poisson at 2x) while 16 requests whose bodies never come hold the
   queue full, over the CPU per answer at 64 connections. The bound takes a served request's cost from the closed
   loop; the script also prints what one cost in the Poisson run (its CPU less the 503s at their cost, over the
   requests served there), which says how much of the distance to the bound is the arrivals' shape.
2. Drain: SIGTERM under a continuous load with --drain-timeout 3, of 64 keep-alive connections and of clients that
   open a connection per request: answers, resets (connections that broke with a request written and unanswered),
   connects refused once the port closed, the time to exit.
3. Big JSON: the server's RSS before, at its peak and after a 50 MB JSON request, and the latency of small requests
   sent while a 20 MB JSON request is parsed.

    python benchmarks/overload.py [--duration 5] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

import serving
from serving import Load, Server, cpu_seconds
from torchship import OptimizeOptions, optimize
from torchship.measure import estimate


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spread(values: list[float], fmt: str = "{:,.1f}") -> str:
    return serving.spread(values, fmt)


def refusal_cpu(load: Load, s: Server, rate: float, duration: float) -> float:
    """Server CPU seconds per 503 under Poisson arrivals at ``rate``, every request refused: 16 requests whose headers
    came and whose bodies never do hold the queue (--max-queue 16) full meanwhile."""
    host, port = s.url.split(":")
    head = (b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: 100\r\nContent-Length: 4000\r\n\r\n")
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(16)]
    try:
        for sock in held:
            sock.sendall(head)
        for _ in range(100):
            if httpx.post(f"http://{s.url}/v2/models/digits-cnn/infer", content=b"").status_code == 503:
                break
            time.sleep(0.05)
        used = cpu_seconds(s.proc.pid)
        run = load(s.url, "digits-cnn", "poisson", rate, duration)
        cpu = cpu_seconds(s.proc.pid) - used
        if set(run.statuses) != {503}:
            raise RuntimeError(f"the queue held full still answered {run.statuses}")
        return cpu / sum(run.statuses.values())
    finally:
        for sock in held:
            sock.close()


def flood(load: Load, bundle: Path, duration: float, rounds: int) -> None:
    runs: dict[int, list] = {64: [], 512: []}
    opened, polite, served_cpu, refused_cpu, opened_cpu = [], [], [], [], []
    with Server(bundle, "--max-queue", "16") as s:
        load(s.url, "digits-cnn", "closed", 64, 1.0)  # warm-up
        for _ in range(rounds):
            for conns in (64, 512):
                used = cpu_seconds(s.proc.pid)
                runs[conns].append(load(s.url, "digits-cnn", "closed", conns, duration))
                if conns == 64:
                    served_cpu.append((cpu_seconds(s.proc.pid) - used) / max(1, sum(runs[64][-1].statuses.values())))
            used = cpu_seconds(s.proc.pid)
            opened.append(load(s.url, "digits-cnn", "poisson", 2 * runs[64][-1].throughput, duration))
            opened_cpu.append(cpu_seconds(s.proc.pid) - used)
            refused_cpu.append(refusal_cpu(load, s, 2 * runs[64][-1].throughput, duration))
            polite.append(load(s.url, "digits-cnn", "closed", 512, duration, backoff_ms=1000))
    for conns, rs in runs.items():
        refused = np.concatenate([r.refused_ms for r in rs])
        print(f"{conns:>3} connections, --max-queue 16: accepted {spread([r.throughput for r in rs])} req/s, "
              f"p99 {spread([r.pct(99) for r in rs])} ms; refusals {len(refused):,} "
              f"(p50 {np.percentile(refused, 50) if len(refused) else float('nan'):.1f} ms, p99 "
              f"{np.percentile(refused, 99) if len(refused) else float('nan'):.1f} ms); resets "
              f"{sum(r.statuses.get(0, 0) for r in rs)}")
    thr = [b.throughput / a.throughput for a, b in zip(runs[64], runs[512])]
    p99 = [b.pct(99) / a.pct(99) for a, b in zip(runs[64], runs[512])]
    refused = np.concatenate([r.refused_ms for r in runs[512]])
    resets = sum(r.statuses.get(0, 0) for r in runs[512])
    print(f"  accepted throughput 512 / 64: {spread(thr, '{:.2f}')}  (goal >= 0.8: "
          f"{'met' if min(thr) >= 0.8 else 'not met' if max(thr) < 0.8 else 'met in some rounds'})")
    print(f"  accepted p99 512 / 64:        {spread(p99, '{:.2f}')}  (goal <= 2: "
          f"{'met' if max(p99) <= 2 else 'not met' if min(p99) > 2 else 'met in some rounds'})")
    r99 = float(np.percentile(refused, 99)) if len(refused) else float("nan")
    print(f"  refusals' p99 at 512:         {r99:.1f} ms  (goal <= 20: {'met' if r99 <= 20 else 'not met'}); "
          f"resets {resets} (goal 0)")
    little = [512 / r.throughput * 1e3 for r in runs[512]]
    print(f"  Little's law at 512 closed-loop connections (no think time): {spread(little)} ms a request at the "
          f"served rate, whatever the server; measured p50 {spread([r.pct(50) for r in runs[512]])} ms")
    kept = [p.throughput / r.throughput for p, r in zip(polite, runs[64])]
    p99s = [p.pct(99) / r.pct(99) for p, r in zip(polite, runs[64])]
    print(f"512 connections that wait Retry-After (1 s) after a refusal: accepted {spread(kept, '{:.2f}')} of the "
          f"64-connection throughput, p99 {spread(p99s, '{:.2f}')}x its p99; {', '.join(p.refused() for p in polite)}")
    served = [o.throughput / r.throughput for o, r in zip(opened, runs[64])]
    refused = np.concatenate([o.refused_ms for o in opened])
    print(f"open loop, Poisson at 2x the capacity at 64 connections (up to 512 connections): "
          f"accepted {spread(served, '{:.2f}')} of capacity, p99 {spread([o.pct(99) for o in opened])} ms; refusals "
          f"{len(refused):,}, p99 {np.percentile(refused, 99) if len(refused) else float('nan'):.1f} ms; "
          f"{', '.join(o.refused() for o in opened)}")
    r = [c / a for c, a in zip(refused_cpu, served_cpu)]
    k = [sum(o.statuses.values()) / o.seconds / c.throughput for o, c in zip(opened, runs[64])]  # sent: MAX_OPEN caps it
    bound = [min(1.0, max(0.0, (1 - kk * x) / (1 - x))) for kk, x in zip(k, r)]
    print(f"  a 503 costs the server {spread([c * 1e6 for c in refused_cpu])} us of CPU, a served request at 64 "
          f"connections {spread([a * 1e6 for a in served_cpu])} us: r = {spread(r, '{:.2f}')}; at the "
          f"{spread(k, '{:.2f}')}x of capacity actually sent, one event loop can accept at most (1 - kr) / (1 - r) = "
          f"{spread(bound, '{:.2f}')} of capacity; accepted / that bound "
          f"{spread([a / b if b else float('nan') for a, b in zip(served, bound)], '{:.2f}')} (goal >= 0.8)")
    # the bound takes a served request's cost from the closed loop; what one cost in the Poisson run itself is what
    # its CPU left after the refusals (at their measured cost), over the requests it served
    there = [(cpu - (sum(o.statuses.values()) - o.statuses.get(200, 0)) * c) / max(1, o.statuses.get(200, 0))
             for cpu, o, c in zip(opened_cpu, opened, refused_cpu)]
    print(f"  the server used {spread([c / o.seconds for c, o in zip(opened_cpu, opened)], '{:.2f}')} cores in the "
          f"Poisson run; less the 503s at their cost, a served request cost {spread([t * 1e6 for t in there])} us there, "
          f"{spread([t / a for t, a in zip(there, served_cpu)], '{:.2f}')}x its cost at 64 connections (average batch "
          f"{spread([o.avg_batch or 0.0 for o in opened], '{:.1f}')} against {spread([r.avg_batch or 0.0 for r in runs[64]], '{:.1f}')}; "
          f"arrivals one at a time, each its own wake-up and read)")


def drain(load: Load, bundle: Path, new_connection_rate: float = 4000.0) -> None:
    """SIGTERM 2 s into a load: 64 keep-alive connections, then Poisson arrivals that each open a connection of their
    own (``Connection: close``), whose connects are in the listening socket's backlog at any moment."""
    for label, mode, value, close in (("64 keep-alive connections", "closed", 64, False),
                                      (f"a new connection per request, Poisson {new_connection_rate:,.0f}/s",
                                       "poisson", new_connection_rate, True)):
        with Server(bundle, "--drain-timeout", "3") as s:
            pid, result = s.proc.pid, {}
            request = load.request(s.url, "digits-cnn")
            if close:
                request = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)

            def run():
                result["run"] = load(s.url, "digits-cnn", mode, value, 6.0, request=request)
            t = threading.Thread(target=run)
            t.start()
            time.sleep(2.0)
            start = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            code = s.proc.wait(30)
            exited = time.monotonic() - start
            t.join(60)
        r = result["run"]
        print(f"SIGTERM under {label}, --drain-timeout 3: exited {code} after {exited:.2f} s; "
              f"{r.statuses.get(200, 0):,} answered, other statuses "
              f"{({k: v for k, v in r.statuses.items() if k not in (0, 200)})}, {r.refused_connections:,} connects "
              f"refused after the close (nothing sent), resets {r.statuses.get(0, 0)} (goal 0)")


def big_json(bundle: Path) -> None:
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    small = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                    "data": x.reshape(-1).tolist()}]})

    def body(mb: float) -> str:
        n = int(mb * 2**20 / (784 * 20)) + 1
        data = np.random.default_rng(1).random(n * 784).astype(np.float32).tolist()
        return json.dumps({"inputs": [{"name": "image", "shape": [n, 1, 28, 28], "datatype": "FP32", "data": data}]})
    with Server(bundle, "--max-json-mb", "64", "--max-body-mb", "128") as s:
        url, pid = f"http://{s.url}/v2/models/digits-cnn/infer", s.proc.pid
        with httpx.Client(timeout=120) as c:
            for _ in range(20):
                c.post(url, content=small)
            big = body(50)
            before = rss_mb(pid)
            start = time.perf_counter()
            status = c.post(url, content=big).status_code
            took = time.perf_counter() - start
            del big
            time.sleep(1.0)
            for _ in range(20):
                c.post(url, content=small)
            print(f"50 MB JSON request ({status}) in {took:.2f} s: server RSS {before:,.0f} MB before, peak "
                  f"{rss_mb(pid, 'VmHWM'):,.0f} MB, {rss_mb(pid):,.0f} MB after")
            medium, lat, done = body(20), [], threading.Event()

            def send_big():
                with httpx.Client(timeout=120) as b:
                    b.post(url, content=medium)
                done.set()
            t = threading.Thread(target=send_big)
            t.start()
            while not done.is_set():
                start = time.perf_counter()
                c.post(url, content=small)
                lat.append((time.perf_counter() - start) * 1e3)
                time.sleep(0.01)
            t.join()
            quiet = [(lambda t0: (c.post(url, content=small), (time.perf_counter() - t0) * 1e3)[1])(time.perf_counter())
                     for _ in range(50)]
    q = estimate([quiet])  # one round: the interquartile range
    print(f"small requests while a 20 MB JSON request was parsed and run: {len(lat)} sent, p50 "
          f"{np.percentile(lat, 50):.1f} ms, max {max(lat):.1f} ms (alone: p50 {q.median:.1f} ms [{q.lo:.1f}-{q.hi:.1f}])")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="torchship-overload-"))
    load = Load(work)
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(1, 8, 64), seconds_per_size=0.3),
                   out=work / "bundle")
    print(f"digits-cnn bundle: {res.chosen.name}, max batch {res.chosen_batch_size}; {os.cpu_count()} cores shared "
          "by the server and the load generator")
    flood(load, res.bundle, args.duration, args.rounds)
    drain(load, res.bundle)
    big_json(res.bundle)


if __name__ == "__main__":
    main()
