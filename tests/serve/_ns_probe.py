"""Run inside the test's network namespace: wait for the servers, send each the same requests, print JSON.

    python _ns_probe.py WAIT_S URL [URL ...]
"""
import json
import sys
import threading
import time

import httpx
import numpy as np
import tritonclient.http as triton

from torchship.zoo.digits import dataset


def wait(url, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{url}/v2/health/ready", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def infer(url, binary):
    client = triton.InferenceServerClient(url)
    x = dataset()["test"][0][:4]
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = client.infer("digits-cnn", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    return np.round(out.as_numpy("logits"), 4).tolist()


def bad(url):
    good = {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}
    cases = {
        "unknown model": ("/v2/models/nope/infer", {"inputs": [good]}),
        "missing input": ("/v2/models/digits-cnn/infer", {"inputs": []}),
        "wrong datatype": ("/v2/models/digits-cnn/infer", {"inputs": [{**good, "datatype": "INT64", "data": [0] * 784}]}),
        "bad shape": ("/v2/models/digits-cnn/infer", {"inputs": [{**good, "shape": [1, 1, 27, 28], "data": [0.0] * 756}]}),
        "short data": ("/v2/models/digits-cnn/infer", {"inputs": [{**good, "data": [0.0] * 10}]}),
        "unknown version": ("/v2/models/digits-cnn/versions/9/infer", {"inputs": [good]}),
    }
    out = {}
    for name, (path, body) in cases.items():
        r = httpx.post(f"http://{url}{path}", json=body, timeout=30)
        out[name] = [r.status_code, r.json()]
    r = httpx.post(f"http://{url}/v2/models/digits-cnn/infer", content=b"{not json", timeout=30)
    out["not json"] = [r.status_code, r.json()]
    return out


def flood(url, n=64):
    """Many requests at once at the slow model while its gate (tests._server.Gate, named by $TORCHSHIP_TEST_GATE) is
    closed: nothing can finish, so the bounded queue must answer the rest 503 with Retry-After; once one has, the gate
    opens and the accepted ones are answered. Decided by events, not by how fast this machine is."""
    import os
    from pathlib import Path
    gate = Path(os.environ["TORCHSHIP_TEST_GATE"])
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]}
    results = []

    def one():
        try:
            r = httpx.post(f"http://{url}/v2/models/slow/infer", json=body, timeout=120)
            results.append([r.status_code, r.json().get("error"), r.headers.get("retry-after")])
        except httpx.HTTPError as exc:
            results.append([0, type(exc).__name__, None])
    gate.touch()
    try:
        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60  # a bound against a hang only: the first 503 comes at once
        while not any(r[0] == 503 for r in results) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gate.unlink(missing_ok=True)
    for t in threads:
        t.join(120)
    return results


def main():
    seconds, urls = float(sys.argv[1]), sys.argv[2:]
    report = {}
    for url in urls:
        if not wait(url, seconds):
            report[url] = {"ready": False}
            continue
        report[url] = {
            "ready": True,
            "root": httpx.get(f"http://{url}/v2").json(),
            "metadata": httpx.get(f"http://{url}/v2/models/digits-cnn").json(),
            "json": infer(url, False), "binary": infer(url, True),
            "errors": bad(url), "flood": flood(url),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
