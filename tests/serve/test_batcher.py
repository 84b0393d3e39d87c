"""The batcher with a fake runner: no model, no HTTP."""
import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest

from torchship.errors import DeadlineExceeded, QueueFull, ShuttingDown, UsageError, WouldMissSLO
from torchship.profile import Stats
from torchship.serve.batcher import BatchConfig, Batcher, LatencyModel
from torchship.spec import IOSpec


def profile(p50_ms: dict[int, float]) -> dict[int, Stats]:
    """A bundle's latency profile with these medians (ms) per batch size."""
    return {bs: Stats(ms, ms, ms, ms, 10, bs / (ms / 1e3)) for bs, ms in p50_ms.items()}


SPEC = IOSpec.parse(["x:float32[batch,4]"])
SPEC = IOSpec(SPEC.inputs, IOSpec.parse(["y:float32[batch,4]"]).inputs)
SEQ = IOSpec(IOSpec.parse(["input_ids:int64[batch,seq]", "attention_mask:int64[batch,seq]"]).inputs,
             IOSpec.parse(["hidden:float32[batch,seq]", "pooled:float32[batch,2]"]).inputs)


class FakeRunner:
    """Doubles its input; records each batch; can be slow or fail. With ``gated``, each batch waits until the test
    calls ``open()``: the test sets the pace with events, not with this machine's speed."""

    def __init__(self, delay=0.0, fail=None, drop_row=False, gated=False):
        self.batches, self.delay, self.fail, self.drop_row = [], delay, fail, drop_row
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def open(self):
        self.gate.set()

    async def running(self, n=1):
        """Until ``n`` batches have reached the runner (bounded only so that a broken batcher fails, not hangs)."""
        for _ in range(30_000):
            if len(self.batches) >= n:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"{n} batch(es) never reached the runner")

    def __call__(self, feeds):
        self.batches.append({k: v.copy() for k, v in feeds.items()})
        self.gate.wait(60)
        time.sleep(self.delay)
        if self.fail:
            raise self.fail
        if "x" in feeds:
            y = feeds["x"] * 2
            return {"y": y[:-1] if self.drop_row else y}
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        return {"hidden": (ids * mask).astype(np.float32),
                "pooled": np.stack([mask.sum(1), (ids * mask).sum(1)], 1).astype(np.float32)}


def x(n, value=1.0):
    return {"x": np.full((n, 4), value, np.float32)}


def run(coro):
    return asyncio.run(coro)


async def _with(batcher, make):
    batcher.start()
    try:
        return await make()
    finally:
        await batcher.stop()


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    runner = FakeRunner(gated=True)
    b = Batcher(runner, SPEC, BatchConfig(max_batch_size=8, max_queue_delay_s=0.02))

    async def go():
        first = asyncio.ensure_future(b.submit(x(1, 0.0)))
        await runner.running(1)  # held: the other 19 queue behind it
        rest = [asyncio.ensure_future(b.submit(x(1, float(i)))) for i in range(1, 20)]
        await _turns()
        runner.open()
        return await asyncio.gather(first, *rest)
    outs = run(_with(b, go))
    assert [float(o["y"][0, 0]) for o in outs] == [2.0 * i for i in range(20)]
    assert [len(f["x"]) for f in runner.batches] == [1, 8, 8, 3]


def test_a_request_larger_than_max_batch_runs_alone():
    runner = FakeRunner()
    b = Batcher(runner, SPEC, BatchConfig(max_batch_size=4))
    out = run(_with(b, lambda: b.submit(x(10))))
    assert out["y"].shape == (10, 4) and [len(f["x"]) for f in runner.batches] == [10]


def test_expired_requests_are_dropped_before_compute():
    runner = FakeRunner(gated=True)
    b = Batcher(runner, SPEC, BatchConfig(max_batch_size=1, max_queue_delay_s=0))

    async def go():
        first = asyncio.ensure_future(b.submit(x(1, 1.0)))
        await runner.running(1)  # the first holds the runner
        late = asyncio.ensure_future(b.submit(x(1, 7.0), timeout_s=0.02))
        await asyncio.sleep(0.05)  # a minimum, not a race: its 20 ms have passed while the runner is held
        runner.open()
        return await asyncio.gather(first, late, return_exceptions=True)
    first, late = run(_with(b, go))
    assert float(first["y"][0, 0]) == 2.0
    assert isinstance(late, DeadlineExceeded)
    assert all(float(f["x"][0, 0]) != 7.0 for f in runner.batches)  # never ran late


def test_timeout_may_only_lower_the_server_default():
    runner = FakeRunner(gated=True)
    b = Batcher(runner, SPEC, BatchConfig(max_batch_size=1, max_queue_delay_s=0, timeout_s=0.01))

    async def go():
        first = asyncio.ensure_future(b.submit(x(1)))
        await runner.running(1)
        second = asyncio.ensure_future(b.submit(x(1), timeout_s=60))  # asks for more than the server's 10 ms
        await asyncio.sleep(0.05)
        runner.open()
        return await asyncio.gather(first, second, return_exceptions=True)
    _, second = run(_with(b, go))
    assert isinstance(second, DeadlineExceeded)


def test_full_queue_rejects_at_once():
    runner = FakeRunner(gated=True)
    b = Batcher(runner, SPEC, BatchConfig(max_batch_size=1, max_queue_delay_s=0, max_queue_requests=2))

    async def go():
        first = asyncio.ensure_future(b.submit(x(1)))
        await runner.running(1)
        queued = [asyncio.ensure_future(b.submit(x(1))) for _ in range(2)]
        refused = [asyncio.ensure_future(b.submit(x(1))) for _ in range(3)]
        await _turns()
        at_once = [t.done() for t in refused] + [t.done() for t in queued]  # while the runner is still held
        runner.open()
        return at_once, await asyncio.gather(first, *queued, *refused, return_exceptions=True)
    at_once, results = run(_with(b, go))
    assert at_once == [True] * 3 + [False] * 2
    assert all(isinstance(r, dict) for r in results[:3])
    assert all(isinstance(r, QueueFull) and "queue full" in str(r) for r in results[3:])


def test_errors_reach_every_waiting_request():
    for runner, fragment in ((FakeRunner(fail=ValueError("boom")), "boom"), (FakeRunner(drop_row=True), "rows for")):
        b = Batcher(runner, SPEC, BatchConfig(max_batch_size=8, max_queue_delay_s=0.02))
        results = run(_with(b, lambda: asyncio.gather(*(b.submit(x(1)) for _ in range(5)), return_exceptions=True)))
        assert len(results) == 5 and all(fragment in str(r) for r in results)


def test_other_shapes_never_mix_but_paddable_dims_are_padded_and_cut_back():
    runner = FakeRunner()
    b = Batcher(runner, SEQ, BatchConfig(max_batch_size=8, max_queue_delay_s=0.03), paddable=("seq",))

    def req(n, seq):
        ids = np.arange(1, seq + 1, dtype=np.int64)[None].repeat(n, 0)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    outs = run(_with(b, lambda: asyncio.gather(b.submit(req(1, 3)), b.submit(req(2, 5)))))
    assert len(runner.batches) == 1 and runner.batches[0]["input_ids"].shape == (3, 5)
    assert outs[0]["hidden"].shape == (1, 3) and outs[1]["hidden"].shape == (2, 5)
    np.testing.assert_array_equal(outs[0]["hidden"][0], [1, 2, 3])
    assert outs[0]["pooled"][0].tolist() == [3, 6]  # the padding was masked out
    unpadded = FakeRunner()
    b = Batcher(unpadded, SEQ, BatchConfig(max_batch_size=8, max_queue_delay_s=0.03))
    run(_with(b, lambda: asyncio.gather(b.submit(req(1, 3)), b.submit(req(2, 5)))))
    assert sorted(f["input_ids"].shape for f in unpadded.batches) == [(1, 3), (2, 5)]


def test_slo_mode_sheds_what_cannot_make_it():
    b = Batcher(FakeRunner(delay=0.02), SPEC, BatchConfig(max_batch_size=8, slo_s=0.05),
                latency=LatencyModel(profile({1: 20.0, 8: 60.0})))

    async def go():
        return await asyncio.gather(*(b.submit(x(1)) for _ in range(12)), return_exceptions=True)
    results = run(_with(b, go))
    assert any(isinstance(r, WouldMissSLO) and "SLO" in str(r) for r in results)
    assert any(isinstance(r, dict) for r in results)


def test_latency_model_interpolates_and_learns():
    m = LatencyModel(profile({1: 10.0, 8: 24.0}))
    assert m.predict(1) == pytest.approx(0.010) and m.predict(8) == pytest.approx(0.024)
    assert 0.010 < m.predict(4) < 0.024 and m.predict(16) == pytest.approx(0.048)
    for _ in range(50):
        m.observe(8, 0.050)
    assert m.predict(8) == pytest.approx(0.050, rel=0.01)
    m.observe(8, 5.0)  # one slow run (a new shape, a preempted thread) barely moves it
    assert m.predict(8) == pytest.approx(0.060, rel=0.01)
    m.observe(3, 1.0)  # a first run at a new size starts from the interpolated prediction
    assert m.predict(3) < 0.03


@pytest.mark.parametrize("p50_ms, on_loop", [(0.1, True), (20.0, False), (None, False)])
def test_batches_predicted_fast_run_on_the_loop_thread(p50_ms, on_loop):
    """With no profile the first batch runs on a thread; its measured time decides for the next ones."""
    seen = []

    class Where(FakeRunner):
        def __call__(self, feeds):
            seen.append(threading.get_ident())
            return super().__call__(feeds)
    b = Batcher(Where(), SPEC, BatchConfig(max_batch_size=4), latency=LatencyModel(profile({4: p50_ms}) if p50_ms else None))

    async def go():
        outs = await asyncio.gather(*(b.submit(x(1, i)) for i in range(8)))
        return outs, threading.get_ident()
    outs, loop_thread = run(_with(b, go))
    assert [o["y"][0, 0] for o in outs] == [2.0 * i for i in range(8)]
    assert seen and all((t == loop_thread) == on_loop for t in (seen if p50_ms else seen[:1]))


def test_stop_runs_what_is_queued_and_refuses_new_work():
    runner = FakeRunner(delay=0.01)
    b = Batcher(runner, SPEC, BatchConfig(max_batch_size=2, max_queue_delay_s=0))

    async def go():
        b.start()
        tasks = [asyncio.ensure_future(b.submit(x(1))) for _ in range(6)]
        await asyncio.sleep(0)
        await b.stop()
        with pytest.raises(ShuttingDown):
            await b.submit(x(1))
        return await asyncio.gather(*tasks)
    assert len(run(go())) == 6


@pytest.mark.parametrize("inline_ms, threads, spin", [(1.0, 1, "0"), (0.0, 1, "1"), (1.0, None, "0"), (1.0, 2, "0"),
                                                     (0.0, None, "1")])
def test_a_model_run_on_the_loop_gets_one_thread_that_does_not_spin(digits_bundle, inline_ms, threads, spin):
    """digits-cnn's batches run on the event loop's thread: ONNX Runtime threads spinning between them would take
    the loop's core, and by default it gets one thread; a model whose batches go to a thread keeps spinning threads,
    one a core. --threads reaches ONNX Runtime."""
    from torchship.bundle import read
    from torchship.machine import cores
    from torchship.serve.metrics import Metrics
    from torchship.serve.registry import load_entry

    async def main():
        entry = await load_entry("digits-cnn", "1", read(digits_bundle), BatchConfig(max_batch_size=8, inline_s=inline_ms / 1e3),
                                 Metrics(), threads=threads)
        opts = entry.batcher.run.runner.sess.get_session_options()
        await entry.stop()
        return opts.intra_op_num_threads, opts.get_session_config_entry("session.intra_op.allow_spinning")
    default = 1 if inline_ms else cores()
    assert asyncio.run(main()) == (threads or default, spin)


def test_a_full_batch_of_an_inline_model_goes_from_the_request_that_filled_it_unless_the_loop_lags():
    """Decided on the loop lag the batcher holds (set here), not on a clock."""
    async def scenario(lag):
        runner = FakeRunner()
        b = Batcher(runner, SPEC, BatchConfig(max_batch_size=4, max_queue_requests=64), latency=LatencyModel(profile({1: 0.01, 4: 0.02})))
        # not started: only the request that fills the batch can run it (the batcher's own loop never turns)
        b.loop_lag.lag = lag
        tasks = [asyncio.ensure_future(b.submit(x(1))) for _ in range(4)]
        await asyncio.sleep(0)  # each submit runs up to its first await
        ran = [len(bt["x"]) for bt in runner.batches]
        for t in tasks:
            t.cancel()
        return ran
    assert run(scenario(0.0)) == [4]
    assert run(scenario(0.05)) == []  # the loop lags: the queue fills and sheds instead


def test_a_request_whose_model_never_answers_gets_a_504():
    runner = FakeRunner(gated=True)  # never answers until the test opens it, after the request's answer

    async def scenario():
        b = Batcher(runner, SPEC, BatchConfig(timeout_s=0.1))

        async def answered():
            try:
                return await b.submit(x(1))
            finally:
                runner.open()  # after the answer: the batch itself could not have ended it
        return await _with(b, answered)
    with pytest.raises(DeadlineExceeded, match="gave no answer within 0.2 s"):
        run(scenario())


def _inline() -> LatencyModel:
    """A profile whose batches run on the loop: no thread to wait for (a new one each time: it learns)."""
    return LatencyModel(profile({1: 0.01, 8: 0.02}))


@contextlib.asynccontextmanager
async def _seeing(b: Batcher, busy: float):
    """The batcher started, with its view of the event loop set by the test (the probe stopped); stopped after."""
    b.start()
    b.loop_lag.stop()
    b.loop_lag.busy, b.loop_lag.lag = busy, 0.0
    try:
        yield b
    finally:
        await b.stop()


async def _turns(n: int = 20) -> None:
    """Turns of the event loop: the batcher has had its chance to run what it would run."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.parametrize("busy", [0.2, 1.0])
def test_while_the_loop_is_saturated_a_batch_waits_to_fill_else_it_goes_at_once(busy):
    """gRPC calls reach the batcher one turn of the loop at a time; with max_queue_delay 0, a saturated loop (the
    busy fraction set here) lets the batch fill for busy_delay_s (long here: only a full batch ends it), a loop with
    time to spare runs the first request alone."""
    async def scenario():
        runner = FakeRunner()
        b = Batcher(runner, SPEC, BatchConfig(max_batch_size=4, busy_delay_s=30.0), latency=_inline())
        async with _seeing(b, busy):
            first = asyncio.ensure_future(b.submit(x(1, 0.0)))
            await _turns()
            waited = not first.done()
            rest = [b.submit(x(1, float(i))) for i in range(1, 4)]
            outs = await asyncio.wait_for(asyncio.gather(first, *rest), 5)
        return waited, [len(bt["x"]) for bt in runner.batches], [o["y"][0, 0] for o in outs]
    waited, batches, ys = run(scenario())
    assert ys == [0.0, 2.0, 4.0, 6.0]
    if busy == 1.0:
        assert waited and batches == [4]
    else:
        assert not waited and batches[0] == 1


def test_the_batcher_goes_on_after_a_full_batch_left_from_submit_during_its_wait():
    """A full batch of an inline model runs from the request that filled it while the batcher waits on the oldest
    request's timer; when the timer fires there is nothing left to take, and the next request is still served."""
    async def scenario():
        runner = FakeRunner()
        b = Batcher(runner, SPEC, BatchConfig(max_batch_size=4, max_queue_delay_s=0.01), latency=_inline())
        async with _seeing(b, 0.0):
            first = asyncio.ensure_future(b.submit(x(1)))
            await _turns(5)  # the batcher waits on the first request's timer
            await asyncio.wait_for(asyncio.gather(first, *[b.submit(x(1)) for _ in range(3)]), 5)
            await asyncio.sleep(0.05)  # past the batcher's 10 ms timer (timers fire in order)
            out = await asyncio.wait_for(b.submit(x(1, 3.0)), 5)
        return [len(bt["x"]) for bt in runner.batches], out["y"][0, 0]
    assert run(scenario()) == ([4, 1], 6.0)


def test_a_saturated_loop_does_not_wait_on_a_full_queue():
    """No request can join a batch once the queue is full: the batch goes without waiting busy_delay_s (30 s here)."""
    async def scenario():
        runner = FakeRunner()
        b = Batcher(runner, SPEC, BatchConfig(max_batch_size=8, max_queue_requests=2, busy_delay_s=30.0))
        async with _seeing(b, 1.0):
            first = asyncio.ensure_future(b.submit(x(1)))
            await _turns(5)
            await asyncio.wait_for(asyncio.gather(first, b.submit(x(1))), 5)
        return [len(bt["x"]) for bt in runner.batches]
    assert run(scenario()) == [2]


def test_after_a_wait_that_gathered_no_one_batches_go_at_once():
    """One client keeping the loop busy: its request waited busy_delay_s alone, so the next ones do not wait."""
    async def scenario():
        runner = FakeRunner()
        b = Batcher(runner, SPEC, BatchConfig(max_batch_size=4, busy_delay_s=0.05), latency=_inline())
        async with _seeing(b, 1.0):
            await asyncio.wait_for(b.submit(x(1)), 5)  # waits out its 50 ms alone
            went = []
            for _ in range(3):
                nxt = asyncio.ensure_future(b.submit(x(1)))
                await _turns()
                went.append(nxt.done())
                await asyncio.wait_for(nxt, 5)
        return went, [len(bt["x"]) for bt in runner.batches]
    assert run(scenario()) == ([True, True, True], [1, 1, 1, 1])


def test_requests_that_arrive_together_do_not_wait_even_on_a_saturated_loop():
    """HTTP requests reach the batcher many a turn: a batch that has company at the batcher's turn goes at once."""
    async def scenario():
        runner = FakeRunner()
        b = Batcher(runner, SPEC, BatchConfig(max_batch_size=8, busy_delay_s=30.0), latency=_inline())
        async with _seeing(b, 1.0):
            both = asyncio.ensure_future(asyncio.gather(b.submit(x(1)), b.submit(x(1))))
            await _turns()
            went = both.done()
            await asyncio.wait_for(both, 5)
        return went, [len(bt["x"]) for bt in runner.batches]
    assert run(scenario()) == (True, [2])


def test_a_preferred_batch_size_goes_at_once_instead_of_waiting_out_the_delay():
    """--preferred-batch-sizes 2 with a 30 s --max-queue-delay: one request waits for company; the second makes a
    preferred size and both go at once (without it they would wait the 30 s)."""
    async def scenario():
        runner = FakeRunner()
        b = Batcher(runner, SPEC, BatchConfig(max_batch_size=8, max_queue_delay_s=30.0, preferred_batch_sizes=(2,)))
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(x(1, 1.0)))
            await _turns()
            waited = not first.done() and not runner.batches
            outs = await asyncio.wait_for(asyncio.gather(first, b.submit(x(1, 2.0))), 5)
        finally:
            await b.stop()
        return waited, [len(bt["x"]) for bt in runner.batches], [o["y"][0, 0] for o in outs]
    assert run(scenario()) == (True, [2], [2.0, 4.0])


def _text(lengths: list[int], width: int | None = None) -> dict[str, np.ndarray]:
    """One request of token inputs: an item per length, padded to the longest (or ``width``), ids 1..n."""
    width = width or max(lengths)
    mask = np.array([[1] * n + [0] * (width - n) for n in lengths], np.int64)
    return {"input_ids": mask * np.arange(1, width + 1), "attention_mask": mask}


def test_max_batch_tokens_bounds_a_batch_by_its_real_tokens_oldest_first():
    """--max-batch-tokens 40, items unbounded (64): requests of 10, 10, 30, 10, 5 (padded to 30) and 60 real tokens,
    queued behind a held batch, go as [10, 10, 10, 5] (the 30 would pass 40 and waits; the 5's padding is not
    counted), [30] (the oldest left goes first) and [60] (over the budget alone: it still runs); every request gets
    its own rows."""
    async def scenario():
        runner = FakeRunner(gated=True)
        b = Batcher(runner, SEQ, BatchConfig(max_batch_size=64, max_batch_tokens=40), paddable=("seq",))
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(_text([1])))
            await runner.running(1)  # held: the rest queue behind it
            sizes = [[10], [10], [30], [10], [5], [60]]
            rest = [asyncio.ensure_future(b.submit(_text(s, 30 if s == [5] else None))) for s in sizes]
            await _turns()
            runner.open()
            outs = await asyncio.wait_for(asyncio.gather(first, *rest), 5)
        finally:
            await b.stop()
        return [f["attention_mask"].sum(1).tolist() for f in runner.batches], [int(o["pooled"][0, 0]) for o in outs]
    batches, real = run(scenario())
    assert batches == [[1], [10, 10, 10, 5], [30], [60]]
    assert real == [1, 10, 10, 30, 10, 5, 60]


def test_a_batch_whose_tokens_reach_the_budget_goes_without_waiting_out_the_delay():
    """With a 30 s --max-queue-delay, a batch waits for company until its tokens reach --max-batch-tokens; without
    the budget the same two requests would wait the 30 s."""
    async def scenario():
        runner = FakeRunner()
        b = Batcher(runner, SEQ, BatchConfig(max_batch_size=64, max_batch_tokens=32, max_queue_delay_s=30.0),
                    paddable=("seq",))
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(_text([16])))
            await _turns()
            waited = not first.done() and not runner.batches
            await asyncio.wait_for(asyncio.gather(first, b.submit(_text([8, 8]))), 5)
        finally:
            await b.stop()
        return waited, [f["attention_mask"].sum(1).tolist() for f in runner.batches]
    assert run(scenario()) == (True, [[16, 8, 8]])


def test_max_batch_tokens_must_be_positive():
    with pytest.raises(UsageError, match="--max-batch-tokens must be at least 1, got 0"):
        BatchConfig(max_batch_tokens=0)
