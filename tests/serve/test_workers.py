"""The worker pool's dispatch, with fake workers (no processes): which batches fail when a worker dies."""
from __future__ import annotations

import os

import numpy as np
import pytest

from torchship.errors import WorkerDied
from torchship.serve import workers


class Fake:
    """A worker as the pool sees it. ``gone``: it looks alive (as a dead one does in the instant before it is reaped)
    but was gone before the batch reached it; ``dies``: it dies while running the batch."""
    made: list["Fake"] = []

    def __init__(self, gone: bool = False, dies: bool = False):
        self.gone, self.dies, self.pid, self.ran = gone, dies, 1000 + len(Fake.made), 0
        self._r, self._w = os.pipe()  # a sentinel that never fires: the watcher sees no death of its own
        self.proc = type("P", (), {"sentinel": self._r})()
        Fake.made.append(self)

    alive = True

    def call(self, feeds, timeout_s):
        if self.gone:
            raise workers.NotSent(f"worker process {self.pid} was gone before it got this batch")
        if self.dies:
            raise WorkerDied(f"worker process {self.pid} died while running this batch")
        self.ran += 1
        return {"y": feeds["x"] * 2}

    def close(self):
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pool(monkeypatch):
    def make(*kinds: dict):
        Fake.made = []
        kinds = list(kinds)
        monkeypatch.setattr(workers.ProcessPool, "_new", lambda self: Fake(**(kinds.pop(0) if kinds else {})))
        p = workers.ProcessPool(verified=None, workers=2)
        made.append(p)
        return p
    made: list = []
    yield make
    for p in made:
        p.close()


def test_a_batch_no_worker_received_runs_on_the_next_worker(pool):
    p = pool({"gone": True}, {})  # the first worker taken is gone; the second is fine
    out = p({"x": np.ones(3)})
    np.testing.assert_array_equal(out["y"], np.full(3, 2.0))
    assert Fake.made[1].ran == 1 and p.restarts == 1  # the gone one is replaced


def test_a_worker_that_dies_running_a_batch_fails_that_batch_alone(pool):
    p = pool({"dies": True}, {})
    with pytest.raises(WorkerDied, match="died while running"):
        p({"x": np.ones(3)})
    out = p({"x": np.ones(3)})  # the next batch goes to the other worker
    np.testing.assert_array_equal(out["y"], np.full(3, 2.0))
    assert p.restarts == 1
