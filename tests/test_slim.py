"""The slim install: `pip install torchship` without extras, in a fresh virtual environment with no torch, serves an
ONNX Runtime bundle built by the full install (tritonclient, JSON and binary; metrics; drain), and a torch bundle
fails with one line naming the extra."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests._server import ROOT, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slim(tmp_path_factory) -> Path:
    """A virtual environment holding torchship from this source tree and its core dependencies only."""
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           str(ROOT)], capture_output=True, text=True, timeout=1200, cwd=venv.parent, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(slim: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(slim / "bin" / "torchship"), *args], capture_output=True, text=True, timeout=300,
                          cwd=slim.parent, env=_env(), **kw)


def test_the_slim_install_has_no_torch_and_its_cli_answers(slim):
    probe = subprocess.run([str(slim / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True,
                           cwd=slim.parent, env=_env())
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    assert _run(slim, "--help").returncode == 0 and "serve" in _run(slim, "--help").stdout
    assert _run(slim, "serve", "--help").returncode == 0
    optimize = _run(slim, "optimize", "zoo:digits-cnn")
    assert optimize.returncode == 1 and "pip install 'torchship[torch]'" in optimize.stderr, optimize.stderr
    assert "Traceback" not in optimize.stderr


def test_the_slim_install_serves_an_onnx_runtime_bundle(slim, digits_bundle):
    from torchship import load_bundle
    from torchship.zoo.digits import dataset
    assert _run(slim, "bundle", "verify", str(digits_bundle)).returncode == 0
    port = free_port()
    log = slim.parent / "serve.log"
    proc = subprocess.Popen([str(slim / "bin" / "torchship"), "serve", str(digits_bundle), "--port", str(port)],
                            cwd=slim.parent, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        x = dataset()["test"][0][:6]
        want = load_bundle(digits_bundle)({"image": x})["logits"]
        for binary in (False, True):
            inp = triton.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            got = client.infer("digits-cnn", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
            np.testing.assert_allclose(got.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
        bad = httpx.post(f"http://127.0.0.1:{port}/v2/models/digits-cnn/infer", content=b'{"inputs": "x"}')
        assert bad.status_code == 400
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'torchship_request_success_total{model="digits-cnn",version="1"} 2.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_torch_bundle_on_the_slim_install_is_one_line_naming_the_extra(slim, slow_bundle):
    done = _run(slim, "serve", str(slow_bundle), "--trust-code", "--port", str(free_port()))
    assert done.returncode == 1, done.stderr
    assert "error: torch (for the eager runtime) is not installed; install it with: pip install 'torchship[torch]'" \
        in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
