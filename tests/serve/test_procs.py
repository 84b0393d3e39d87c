"""serve --procs: several server processes on one port, one server to its clients (answers, metrics, repository
changes, restarts and drain)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from tests._server import ROOT, free_port, models_importable
from tests.serve.test_server import _workers, images

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token-of-sixteen"


def listening(port: int) -> int:
    """Sockets listening on ``port`` (every server process has its own)."""
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for row in open(table).read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                found += int(local.rsplit(":", 1)[1], 16) == port and state == "0A"
    return found


def settle(s, count: int = 2) -> list[int]:
    """Wait (bounded) until ``count`` server processes listen; their pids."""
    for _ in range(300):
        procs = _workers(s.proc.pid)
        if len(procs) == count and listening(s.port) == count:
            return procs
        time.sleep(0.1)
    raise AssertionError(f"{count} server processes did not come up: {_workers(s.proc.pid)}, {listening(s.port)} listening")


def fresh_versions(s, n: int = 24) -> list:
    """The model version answering each of ``n`` requests, each on a new connection (the kernel spreads new
    connections over the processes, so both answer some: all on one has odds of 2**-23)."""
    body = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    out = []
    for _ in range(n):
        r = httpx.post(f"http://{s.url}/v2/models/digits-cnn/infer", json=body, timeout=30)
        out.append(r.json().get("model_version") if r.status_code == 200 else r.status_code)
    return out


def test_procs_answer_as_one_server_and_restart_and_drain(server, digits_bundle):
    from torchship import load_bundle
    gport = free_port()
    s = server(digits_bundle, "--procs", "2", "--grpc-port", gport)
    procs = settle(s)
    x = images(3)
    want = load_bundle(digits_bundle)({"image": x})["logits"]
    for _ in range(10):  # new clients: new connections, over both processes
        http, grpc = thttp.InferenceServerClient(s.url), tgrpc.InferenceServerClient(f"127.0.0.1:{gport}")
        for client, mod in ((http, thttp), (grpc, tgrpc)):
            inp = mod.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer("digits-cnn", [inp]).as_numpy("logits"), want, atol=1e-5)
        grpc.close()
    # /metrics, from either process, counts every request of both
    assert [s.metric("torchship_request_success_total") for _ in range(6)] == [20.0] * 6
    assert s.metric("torchship_inference_count_total") == 60.0
    os.kill(procs[0], signal.SIGKILL)  # a server process dies: the other serves on, the supervisor starts another
    assert set(fresh_versions(s, 8)) == {"1"}
    again = settle(s)
    assert procs[0] not in again and procs[1] in again
    assert set(fresh_versions(s)) == {"1"}
    assert "server process 0 exited with code -9; starting it again" in s.log.read_text()
    assert s.metric("torchship_request_success_total") == 20.0 + 8 + 24  # the dead process's count is kept
    assert s.stop() == 0
    assert not [p for p in again if os.path.exists(f"/proc/{p}")]


def test_procs_repository_changes_reach_every_process(server, repository):
    s = server(repository, "--procs", "2", "--repository", repository, env={"TORCHSHIP_ADMIN_TOKEN": TOKEN})
    settle(s)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    assert set(fresh_versions(s)) == {"1"}
    shutil.copytree(repository / "digits-cnn" / "1", repository / "digits-cnn" / "2")
    r = s.http("POST", "/v2/repository/models/digits-cnn/load", headers=admin)
    assert r.status_code == 200 and r.json()["versions"] == ["1", "2"]
    assert set(fresh_versions(s)) == {"2"}
    procs = settle(s)
    os.kill(procs[1], signal.SIGKILL)  # the one started in its place replays the change before it listens
    settle(s)
    assert set(fresh_versions(s)) == {"2"}
    shutil.rmtree(repository / "digits-cnn" / "2")
    r = s.http("POST", "/v2/repository/models/digits-cnn/load", headers=admin)
    assert r.status_code == 200 and r.json()["unloaded"] == ["2"]
    assert set(fresh_versions(s)) == {"1"}
    r = s.http("POST", "/v2/repository/models/digits-cnn/unload", headers=admin)
    assert r.status_code == 200
    assert set(fresh_versions(s)) == {404}
    r = s.http("POST", "/v2/repository/models/no-such/unload", headers=admin)
    assert r.status_code == 404 and "unknown model 'no-such'" in r.json()["error"]
    assert s.stop() == 0


def test_procs_port_held_by_another_program_is_one_line(digits_bundle, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "torchship.cli", "serve", str(digits_bundle), "--procs", "2",
                               "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **models_importable()})
    assert done.returncode != 0
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr
