import os
import shutil
import tempfile

# before torch loads OpenMP: the suite runs two test processes on two cores, each with torch's threads on every core,
# and an OpenMP thread waiting at a barrier spins on the core the other process needs (two digits-cnn tests at once:
# 40 s spinning, 24 s passive). Set for the suite and what it starts; the product keeps OpenMP's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# a cache of its own for each test process (zoo weights, builds): what a fresh machine does, every time. The process
# that makes it (pytest; under xdist the controller and each worker) removes it at the end: a run left 30-300 MB in /tmp.
if "TORCHSHIP_CACHE" not in os.environ:
    os.environ["TORCHSHIP_CACHE"] = tempfile.mkdtemp(prefix="torchship-tests-")
    os.environ["TORCHSHIP_TESTS_CACHE_OWNER"] = str(os.getpid())


def pytest_unconfigure(config):
    if os.environ.get("TORCHSHIP_TESTS_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["TORCHSHIP_CACHE"], ignore_errors=True)
    from torchship import scratch
    scratch.sweep()  # what the servers the tests killed left (a running torchship's own are held, and stay)


SLOW_TIMEOUT_S = 1200  # pyproject's timeout (600 s) for the rest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; none here")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One full optimize of zoo:digits-cnn with every runtime, shared by the tests that inspect it (the compression
    variants have their own tests in test_transforms.py)."""
    from torchship import OptimizeOptions, optimize
    out = tmp_path_factory.mktemp("digits") / "bundle"
    return optimize("zoo:digits-cnn", OptimizeOptions(batch_sizes=(1, 8), seconds_per_size=0.2, transforms=()), out=out)


from tests._server import digits_bundle, gate, repository, server, slow_bundle  # noqa: E402,F401  (shared fixtures)
from tests._text import st_bundle, st_dir, vit_bundle  # noqa: E402,F401
