"""serve --ray: the same protocol, batcher and errors on Ray Serve, inside a network namespace the test creates
(Ray binds every interface it finds; in the namespace there is only loopback)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._server import models_importable

from torchship import MissingExtra, ServeConfig, UsageError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def netns():
    import ray.serve  # noqa: F401  (the dev install has the ray extra: a broken one fails here, never skips)
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip netns` (apt-get install iproute2)")
    name = f"torchship-test-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot create a network namespace ({made.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        _kill_namespace(name)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def _kill_namespace(name):
    """Every process left in the namespace is one this test started (the servers and Ray's own daemons)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _serve(netns, log, *args, env=None):
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "torchship.cli", "serve", *map(str, args)],
                            cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                                 **models_importable(), **(env or {})})


def test_ray_replicas_answer_like_the_local_server(netns, digits_bundle, slow_bundle, tmp_path, gate):
    common = [digits_bundle, slow_bundle, "--trust-code", "--max-queue", "4", "--max-batch-size", "2"]
    local = _serve(netns, tmp_path / "local.log", *common, "--port", "8000", env=gate.env)
    ray = _serve(netns, tmp_path / "ray.log", *common, "--port", "8001", "--ray", "--replicas", "2", env=gate.env)
    try:  # the probe closes the slow model's gate for its flood (both servers' models read the same gate)
        probe = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(ROOT / "tests/serve/_ns_probe.py"), "240",
                                "127.0.0.1:8000", "127.0.0.1:8001"], capture_output=True, text=True, timeout=420, cwd=ROOT,
                               env={**os.environ, **gate.env})
        assert probe.returncode == 0, probe.stderr[-3000:]
        report = json.loads(probe.stdout.strip().splitlines()[-1])
        a, b = report["127.0.0.1:8000"], report["127.0.0.1:8001"]
        assert a["ready"] and b["ready"], (tmp_path / "ray.log").read_text()[-3000:]
        for key in ("root", "metadata", "json", "binary", "errors"):
            assert a[key] == b[key], key
        assert [s for s, _ in b["errors"].values()] == [404, 400, 400, 400, 400, 404, 400]
        for side in (a, b):  # both bounded: some served, the rest 503 with the same message and Retry-After
            codes = [r[0] for r in side["flood"]]
            assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, side["flood"]
        full = {(r[1].split(":")[0], r[2]) for r in a["flood"] + b["flood"] if r[0] == 503}  # the counts vary
        assert full == {("queue full", "1")}, full
        ray.send_signal(signal.SIGTERM)  # drains and stops Ray Serve and the cluster it started
        assert ray.wait(120) == 0, (tmp_path / "ray.log").read_text()[-3000:]
    finally:
        for p in (local, ray):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_settings_that_do_not_apply_to_ray_are_one_line(digits_bundle):
    from torchship.serve.ray import RayConfig, application
    import ray.serve  # noqa: F401  (the dev install has the ray extra: a broken one fails here, never skips)
    with pytest.raises(UsageError, match="deploying again"):
        application([digits_bundle], ServeConfig(admin_token="x"))
    with pytest.raises(UsageError, match="--max-replicas"):
        RayConfig(replicas=3, max_replicas=2)


def test_without_ray_the_flag_names_the_extra(monkeypatch, digits_bundle):
    import builtins
    real = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    from torchship.serve.ray import application
    with pytest.raises(MissingExtra, match=r"torchship\[ray\]"):
        application([digits_bundle])
