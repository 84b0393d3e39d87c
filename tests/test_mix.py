"""The lengths a model is timed at (torchship.mix): parsed, found in the data, cut to, and timed as one weighed call,
with the clock injected."""
import numpy as np
import pytest

from torchship.errors import UsageError
from torchship.mix import Costs, Mix, cut, parse, served_mix
from torchship.optimize.job import timed_calls
from torchship.optimize.protocol import TimeBatch
from torchship.spec import IOSpec

TEXT = IOSpec.parse(["input_ids:int64[batch,seq]{0:100}", "attention_mask:int64[batch,seq]"])


def masks(lengths, width=64):
    return {"input_ids": np.ones((len(lengths), width), np.int64),
            "attention_mask": (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)}


def test_lengths_are_parsed_as_lists_ranges_or_the_example():
    assert parse("seq=64,16,32,16") == {"seq": (16, 32, 64)}
    assert parse("seq=16..128") == {"seq": (16, 32, 64, 128)}
    assert parse("seq=16..100") == {"seq": (16, 32, 64, 100)}
    assert parse("example") == {} and parse(None) is None
    for bad in ("seq", "seq=", "seq=a,b", "16,32", "seq=0..8", "seq=0"):
        with pytest.raises(UsageError, match="--lengths"):
            parse(bad)


def test_the_mix_comes_from_the_attention_masks_in_groups_of_as_many_items():
    got = served_mix(TEXT, masks([3, 5, 9, 12, 20, 30, 31, 40]), None)
    # rounded up to 8: 8 8 16 16 24 32 32 40, five lengths in four groups: the one item at 24 pads least up to 32
    assert (got.dim, got.sizes, got.weights) == ("seq", (8, 16, 32, 40), (0.25, 0.25, 0.375, 0.125))
    assert "8 verification items (attention_mask)" in got.source
    # a long tail keeps a group of its own rather than padding a big group to its length
    tail = served_mix(TEXT, masks([10] * 60 + [20] * 30 + [35] * 5 + [40] * 4 + [128], 128), None)
    assert tail.sizes == (16, 24, 40, 128) and tail.weights == pytest.approx((0.6, 0.3, 0.09, 0.01))
    merged = served_mix(TEXT, masks([3, 4, 5, 6, 7, 8, 30, 31]), None)
    assert (merged.sizes, merged.weights) == ((8, 32), (0.75, 0.25))  # three groups round to 8: one size, 3/4


def test_no_mix_where_there_is_nothing_to_learn_or_the_user_said_so():
    assert served_mix(TEXT, masks([64] * 5), None) is None  # no padding: the example's length is served
    assert served_mix(TEXT, {}, None) is None  # no held-out data: generated masks say nothing
    image = IOSpec.parse(["x:float32[batch,3,32,32]"])
    assert served_mix(image, {"x": np.zeros((4, 3, 32, 32), np.float32)}, None) is None
    assert served_mix(TEXT, masks([3, 40]), {}) is None  # --lengths example
    given = served_mix(TEXT, {}, {"seq": (16, 128)})
    assert given.sizes == (16, 128) and given.weights == (0.5, 0.5) and "--lengths" in given.source
    with pytest.raises(UsageError, match="'tokens' is not a dynamic dimension.*they have seq"):
        served_mix(TEXT, {}, {"tokens": (16,)})
    with pytest.raises(UsageError, match="one dimension"):
        served_mix(TEXT, {}, {"seq": (16,), "other": (8,)})


def test_a_batch_is_cut_or_repeated_to_each_size_and_a_tied_range_kept_valid():
    feeds = masks([3, 10], width=12)
    short = cut(TEXT, feeds, "seq", 5)
    assert short["input_ids"].shape == (2, 5) and short["attention_mask"][1].tolist() == [1] * 5
    long = cut(TEXT, feeds, "seq", 30)
    assert long["attention_mask"].shape == (2, 30) and long["attention_mask"][0, 12:15].tolist() == [1, 1, 1]
    packed = IOSpec.parse(["x:float32[batch,seq,4]", "lengths:int64[batch]{1:seq+1}"])
    out = cut(packed, {"x": np.zeros((2, 12, 4), np.float32), "lengths": np.array([12, 3])}, "seq", 5)
    assert out["x"].shape == (2, 5, 4) and out["lengths"].tolist() == [5, 3]  # a length past the new size is cut too


class Clock:
    """A fake clock: a runner call advances it by 1 ms per position of the batch it runs (nothing is measured)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def run(self, feeds):
        self.now += feeds["input_ids"].shape[1] * 1e-3


def test_a_timed_call_on_a_mix_is_the_weighed_sum_of_a_batch_at_each_size():
    clock, mix = Clock(), Mix("seq", (16, 64), (0.75, 0.25), "given")
    base = masks([10, 20])
    runs = [(w, cut(TEXT, base, "seq", s)) for s, w in zip(mix.sizes, mix.weights)]
    s = timed_calls(clock.run, runs, TimeBatch(2, runs=3, mix=mix), lambda: None, clock)
    assert len(s.seconds) == 3 and s.seconds[0] == pytest.approx(0.75 * 0.016 + 0.25 * 0.064)
    assert s.by_size == {16: (pytest.approx(0.016),) * 3, 64: (pytest.approx(0.064),) * 3}
    plain = timed_calls(clock.run, [(1.0, base)], TimeBatch(2, runs=2), lambda: None, clock)
    assert plain.seconds == (pytest.approx(0.064),) * 2 and plain.by_size == {}


def test_the_costs_a_bundle_keeps_give_a_cost_per_token():
    costs = Costs(Mix("seq", (16, 64), (0.5, 0.5), "given"), batch=8, ms={16: 2.0, 64: 8.0})
    assert costs.per_token_ms == pytest.approx(6.0 / 48 / 8)
    assert Costs(Mix("seq", (16,), (1.0,), "given"), 8, {16: 2.0}).per_token_ms is None


def test_the_costs_a_bundle_keeps_price_a_call_by_its_rows_and_length():
    """The batcher's estimate of one call (``Costs.pricer``): the timed cost at the length (linear between the sizes
    timed, proportional past the longest), scaled by what the rows cost in the per-batch-size profile; None where
    either was timed at one size only (a call's fixed cost cannot be told from its rows' then)."""
    from types import SimpleNamespace
    costs = Costs(Mix("seq", (16, 64), (0.5, 0.5), "given"), batch=8, ms={16: 2.0, 64: 8.0})
    assert [costs.at(n) for n in (8, 16, 40, 64, 128)] == [2.0, 2.0, pytest.approx(5.0), 8.0, 16.0]
    profile = {1: SimpleNamespace(p50_ms=1.0), 8: SimpleNamespace(p50_ms=4.0)}  # 1 row: a quarter of 8 rows' time
    price = costs.pricer(profile)
    assert price(8, 64) == pytest.approx(8.0) and price(1, 64) == pytest.approx(2.0) and price(16, 16) == pytest.approx(4.0)
    assert costs.pricer({8: SimpleNamespace(p50_ms=4.0)}) is None
    assert Costs(Mix("seq", (16,), (1.0,), "given"), 8, {16: 2.0}).pricer(profile) is None
