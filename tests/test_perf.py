import threading

import numpy as np
import pytest

from torchship import TorchshipError
from torchship.cli import main
from tests._server import wait_for
from torchship.perf import arrivals, perf

pytestmark = pytest.mark.slow


def test_closed_and_open_loop_report_what_the_server_did(server, slow_bundle, gate):
    s = server(slow_bundle, "--trust-code", "--max-batch-size", "4", env=gate.env)
    (one,) = perf(s.url, "slow", concurrency=[1], duration=60, max_requests=6)
    assert one.mode == "concurrency 1" and one.requests == one.ok == 6 and one.errors == {}
    assert one.avg_batch == pytest.approx(1.0)  # one client: nothing to batch with
    gate.close()
    rows = []
    run = threading.Thread(target=lambda: rows.extend(perf(s.url, "slow", concurrency=[4], duration=60, max_requests=8)))
    run.start()
    gate.wait_held(1)  # the first batch is held in the model (one request, or more that arrived together) ...
    wait_for(lambda: sum(size for _, size in gate.held()) + s.metric("torchship_queue_depth") == 4,
             "all four clients' requests held or queued")  # ... so the others' requests must queue behind it
    gate.open()
    run.join(60)
    (four,) = rows
    # the queued ones ran as one batch: 8 requests in at most 1 + 1 + 4 executions
    assert four.ok == four.requests == 8 and four.errors == {} and four.avg_batch >= 8 / 6
    assert all(r.p50_ms <= r.p90_ms <= r.p99_ms for r in (one, four))
    (open_loop,) = perf(s.url, "slow", rate=20, poisson=True, duration=60, max_requests=10, binary=False)
    assert open_loop.mode == "rate 20/s poisson" and open_loop.requests == open_loop.ok == 10
    assert open_loop.throughput > 0


def test_the_open_loop_sends_on_its_schedule():
    """The open loop's schedule, without a clock: every 1/rate, or Poisson gaps of mean 1/rate from a fixed seed."""
    assert arrivals(4, False, 1.0, 100) == [0.0, 0.25, 0.5, 0.75]
    assert len(arrivals(4, False, 10.0, 7)) == 7  # max_requests ends it first
    times = arrivals(100, True, 100.0, 100_000)
    gaps = np.diff(times)
    assert 9_500 < len(times) < 10_500 and gaps.mean() == pytest.approx(0.01, rel=0.05)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.1)  # exponential: the spread equals the mean
    assert times == arrivals(100, True, 100.0, 100_000)  # the same schedule every run


def test_unreachable_or_unknown_model_is_one_clear_line(server, slow_bundle, capsys):
    with pytest.raises(TorchshipError, match="cannot reach"):
        perf("127.0.0.1:9", "slow", duration=0.1)
    s = server(slow_bundle, "--trust-code")
    assert main(["perf", s.url, "--model", "nope", "--duration", "0.1"]) == 1
    assert "answered 404" in capsys.readouterr().err
