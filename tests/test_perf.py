import pytest

from torchship import TorchshipError
from torchship.cli import main
from torchship.perf import perf

pytestmark = pytest.mark.slow


def test_closed_and_open_loop_report_what_the_server_did(server, slow_bundle):
    s = server(slow_bundle, "--trust-code", "--max-queue-delay-us", "20000")
    rows = perf(s.url, "slow", concurrency=[1, 4], duration=1.0, max_requests=200)
    one, four = rows
    assert one.mode == "concurrency 1" and one.ok == one.requests > 5 and one.errors == {}
    assert one.avg_batch == pytest.approx(1.0)
    assert four.avg_batch > 1.5  # concurrent clients are batched together
    assert four.ok == four.requests > 5 and four.errors == {}
    assert all(r.p50_ms <= r.p90_ms <= r.p99_ms for r in rows)
    (open_loop,) = perf(s.url, "slow", rate=20, poisson=True, duration=1.0, binary=False)
    assert open_loop.mode == "rate 20/s poisson" and 5 <= open_loop.requests <= 60 and open_loop.ok == open_loop.requests


def test_unreachable_or_unknown_model_is_one_clear_line(server, slow_bundle, capsys):
    with pytest.raises(TorchshipError, match="cannot reach"):
        perf("127.0.0.1:9", "slow", duration=0.1)
    s = server(slow_bundle, "--trust-code")
    assert main(["perf", s.url, "--model", "nope", "--duration", "0.1"]) == 1
    assert "answered 404" in capsys.readouterr().err
