"""The server end to end: tritonclient unchanged, bad input, full queues, deadlines, SIGTERM, reloads, workers."""
import json
import os
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from torchship import load_bundle
from torchship.zoo.digits import dataset
from tests._server import wait_for

pytestmark = pytest.mark.slow


def images(n):
    return dataset()["test"][0][:n]


def triton_infer(url, x, binary, model="digits-cnn"):
    client = triton.InferenceServerClient(url)
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return client.infer(model, [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)]).as_numpy("logits")


def test_tritonclient_json_and_binary(server, digits_bundle):
    s = server(digits_bundle)
    client = triton.InferenceServerClient(s.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits-cnn")
    meta = client.get_model_metadata("digits-cnn")
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    x = images(5)
    want = load_bundle(digits_bundle)({"image": x})["logits"]
    for binary in (False, True):
        np.testing.assert_allclose(triton_infer(s.url, x, binary), want, rtol=1e-5, atol=1e-5)
    assert s.http("GET", "/v2/models/digits-cnn/versions/1").status_code == 200
    wrong = s.http("GET", "/v2/models/digits-cnn/infer")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "POST" in wrong.json()["error"]
    assert s.metric("torchship_request_success_total") == 2
    assert s.metric("torchship_inference_count_total") == 10


def _body(**inp):
    base = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    return json.dumps({"inputs": [{**base, **inp}]})


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/v2/models/nope/infer", _body(), 404, "unknown model 'nope'"),
    ("/v2/models/digits-cnn/versions/7/infer", _body(), 404, "no version '7'"),
    ("/v2/models/digits-cnn/infer", _body(name="pixels"), 400, "unknown input 'pixels'"),
    ("/v2/models/digits-cnn/infer", json.dumps({"inputs": []}), 400, "missing ['image']"),
    ("/v2/models/digits-cnn/infer", _body(datatype="INT64", data=[0] * 784), 400, "datatype INT64"),
    ("/v2/models/digits-cnn/infer", _body(shape=[1, 1, 28, 27], data=[0.0] * 756), 400, "dimension 3 must be 28"),
    ("/v2/models/digits-cnn/infer", _body(data=[0.0] * 10), 400, "10 values do not fill"),
    ("/v2/models/digits-cnn/infer", _body(data=[float("nan")] * 784), 400, "NaN and Infinity are not JSON"),
    ("/v2/models/digits-cnn/infer", "{broken", 400, "not valid JSON"),
    ("/v2/models/digits-cnn/infer", "x" * 300_000, 413, "over the"),
])
def test_bad_requests_get_their_status_and_harm_nobody(server, digits_bundle, path, body, status, fragment):
    s = server(digits_bundle, "--max-body-mb", "0.25")
    r = s.http("POST", path, content=body)
    assert r.status_code == status and fragment in r.json()["error"]
    assert triton_infer(s.url, images(2), True).shape == (2, 10)  # the server still answers


X = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def _status(r):
    """A response's status, or -1 for a 200 with the wrong answer (the Slow model doubles its input)."""
    return r.status_code if r.status_code != 200 or r.json()["outputs"][0]["data"] == [2, 4, 6, 8] else -1


def _send(s, answered, body=X, path="/v2/models/slow/infer"):
    """One request on a thread of its own; its response (or the error that lost it) is appended to ``answered``."""
    def one():
        try:
            answered.append(httpx.post(f"http://{s.url}{path}", json=body, timeout=60))
        except httpx.HTTPError as exc:
            answered.append(exc)
    t = threading.Thread(target=one)
    t.start()
    return t


def _hammer(s, n_threads, n_each, results, path="/v2/models/slow/infer"):
    """``n_threads`` clients, each sending ``n_each`` requests one after the other (a count, not a duration)."""
    def loop():
        with httpx.Client(timeout=60) as c:
            for _ in range(n_each):
                try:
                    results.append(_status(c.post(f"http://{s.url}{path}", json=X)))
                except httpx.ConnectError:
                    results.append("refused")  # never accepted: nothing lost
                except httpx.HTTPError as exc:
                    results.append(f"lost: {type(exc).__name__}")
    threads = [threading.Thread(target=loop) for _ in range(n_threads)]
    for t in threads:
        t.start()
    return threads


def _queued(s, n):
    wait_for(lambda: s.metric("torchship_queue_depth") == n, f"{n} request(s) waiting in the queue")


def _refuses_connections(s) -> bool:
    try:
        httpx.get(f"http://{s.url}/v2/health/live", timeout=5)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        pass
    return False


def test_full_queue_gets_503_at_once_with_retry_after(server, slow_bundle, gate):
    s = server(slow_bundle, "--trust-code", "--max-queue", "2", "--max-batch-size", "1", env=gate.env)
    gate.close()
    answered = []
    threads = [_send(s, answered)]
    gate.wait_held(1)  # the first runs, held in the model
    for n in (1, 2):  # two wait in the queue
        threads.append(_send(s, answered))
        _queued(s, n)
    refused = [s.http("POST", "/v2/models/slow/infer", json=X) for _ in range(3)]
    # refused at once: answered while nothing accepted could have finished
    assert [r.status_code for r in refused] == [503] * 3 and answered == []
    assert all(r.headers["retry-after"] == "1" and "queue full: --max-queue 2 reached" in r.json()["error"]
               for r in refused)
    gate.open()
    for t in threads:
        t.join(60)
    assert [_status(r) for r in answered] == [200] * 3  # every accepted one answered, rightly
    assert s.metric("torchship_rejected_total") == 3


def test_past_the_queue_503_before_the_body_is_read(server, digits_bundle):
    """Requests admitted to the queue hold their place while their bodies are read: one past --max-queue is refused
    on its headers alone, and every admitted one is answered."""
    s = server(digits_bundle, "--max-queue", "4")
    host, port = s.url.split(":")
    body = _body().encode()
    head = b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    held = [socket.create_connection((host, int(port)), timeout=20) for _ in range(4)]
    try:
        for sock in held:  # headers only: each request is admitted while its body is awaited
            sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        for _ in range(50):
            r = s.http("POST", "/v2/models/digits-cnn/infer", content=body)
            if r.status_code == 503:
                break
            time.sleep(0.1)
        assert r.status_code == 503 and "queue full: --max-queue 4 reached" in r.json()["error"]
        assert r.headers["retry-after"] == "1"
        statuses = []
        for sock in held:
            sock.sendall(body)
            statuses.append(int(sock.recv(65536).split()[1]))
        assert statuses == [200] * 4
    finally:
        for sock in held:
            sock.close()
    assert s.http("POST", "/v2/models/digits-cnn/infer", content=body).status_code == 200
    assert s.metric('torchship_rejected_total{model="digits-cnn",reason="queue_full",version="1"}') >= 1


def test_deadline_passed_in_queue_gets_504(server, slow_bundle, gate):
    s = server(slow_bundle, "--trust-code", "--max-batch-size", "1", env=gate.env)
    gate.close()
    first, late = [], []
    threads = [_send(s, first)]
    gate.wait_held(1)
    threads.append(_send(s, late, X | {"parameters": {"timeout": 200_000}}))  # 200 ms
    _queued(s, 1)
    time.sleep(0.3)  # not a race: however slow this machine, its 200 ms have passed while the model is held
    gate.open()
    for t in threads:
        t.join(60)
    assert _status(first[0]) == 200
    assert late[0].status_code == 504 and "deadline" in late[0].json()["error"]
    assert _status(s.http("POST", "/v2/models/slow/infer", json=X | {"parameters": {"timeout": 60_000_000}})) == 200


def test_sigterm_during_load_loses_no_accepted_request(server, slow_bundle, gate):
    s = server(slow_bundle, "--trust-code", "--drain-timeout", "60", "--max-batch-size", "1", env=gate.env)
    gate.close()
    answered = []
    threads = [_send(s, answered)]
    gate.wait_held(1)
    for n in (1, 2, 3):
        threads.append(_send(s, answered))
        _queued(s, n)
    s.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: _refuses_connections(s), "new connections refused after SIGTERM")
    assert answered == [] and s.proc.poll() is None  # draining: the accepted four still wait for the model
    gate.open()
    for t in threads:
        t.join(60)
    assert [_status(r) for r in answered] == [200] * 4
    assert s.proc.wait(60) == 0


def test_reload_during_load_fails_nothing(server, repository):
    token = "s3cret-token-of-sixteen"
    s = server(repository, "--repository", repository, env={"TORCHSHIP_ADMIN_TOKEN": token})
    for given in (None, "Bearer wrong", token, f"Basic {token}"):  # only 'Bearer TOKEN' is the token
        r = s.http("POST", "/v2/repository/models/digits-cnn/load", headers={"Authorization": given} if given else {})
        assert r.status_code == 403 and "Authorization: Bearer TOKEN" in r.json()["error"]
    results = []
    body = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    done = threading.Event()

    def loop():  # until both reloads have answered, and at least 5 requests each
        with httpx.Client(timeout=60) as c:
            for i in range(100_000):
                if done.is_set() and i >= 5:
                    return
                results.append(c.post(f"http://{s.url}/v2/models/digits-cnn/infer", json=body).status_code)
    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for n in (20, 40):  # each reload while requests are being answered
        wait_for(lambda: len(results) >= n, f"{n} answers")
        r = s.http("POST", "/v2/repository/models/digits-cnn/load", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    done.set()
    for t in threads:
        t.join(60)
    assert len(results) >= 40 and set(results) == {200}
    r = s.http("POST", "/v2/repository/models/digits-cnn/unload", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and s.http("POST", "/v2/models/digits-cnn/infer", content=json.dumps(body)).status_code == 404


def _workers(pid):
    """Model worker processes of the server: its spawned children, whichever thread started them."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                cmd = open(f"/proc/{child}/cmdline").read()
                if "spawn_main" in cmd and "resource_tracker" not in cmd:
                    found.append(child)
    return found


def test_a_dead_worker_fails_only_its_batch_and_is_restarted(server, slow_bundle, gate):
    s = server(slow_bundle, "--trust-code", "--workers", "2", "--max-batch-size", "1", env=gate.env)
    workers = _workers(s.proc.pid)
    assert len(workers) == 2
    gate.close()
    answered = []
    threads = [_send(s, answered) for _ in range(2)]
    held = gate.wait_held(2)
    assert sorted(pid for pid, _ in held) == sorted(workers)  # one batch held in each worker
    os.kill(held[0][0], signal.SIGKILL)
    wait_for(lambda: answered, "the dead worker's request answered")
    assert answered[0].status_code == 500 and "worker" in answered[0].json()["error"], answered[0].text
    gate.open()
    for t in threads:
        t.join(60)
    assert _status(answered[1]) == 200  # the other worker's batch was not harmed
    wait_for(lambda: len(_workers(s.proc.pid)) == 2 and held[0][0] not in _workers(s.proc.pid), "a worker restarted")
    after = []
    for t in _hammer(s, 2, 4, after):
        t.join(60)
    assert after == [200] * 8
