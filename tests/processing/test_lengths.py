"""A padded batch run as runs of similar lengths: the same answer as one padded run, fewer padded tokens computed,
every row back in its place (a fake model records what it was given)."""
import numpy as np

from torchship.processing.lengths import by_length, runs
from torchship.spec import IOSpec

SPEC = IOSpec.parse(["input_ids:int64[batch,seq]", "attention_mask:int64[batch,seq]"],
                    ["pooled:float32[batch,4]", "hidden:float32[batch,seq,2]"])


def padded(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n, longest = len(lengths), max(lengths)
    ids = np.zeros((n, longest), np.int64)
    mask = np.zeros((n, longest), np.int64)
    for i, n_i in enumerate(lengths):
        ids[i, :n_i] = rng.integers(1, 100, n_i)
        mask[i, :n_i] = 1
    return {"input_ids": ids, "attention_mask": mask}


class Model:
    """Answers from the real tokens only (as a masked model does); counts the padded tokens it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, feeds):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        self.calls.append(ids.shape)
        x = (ids * mask).astype(np.float32)
        pooled = np.stack([x.sum(1), x.max(1), mask.sum(1), x[:, 0]], 1).astype(np.float32)
        hidden = np.stack([x, x * 2], -1).astype(np.float32)
        return {"pooled": pooled, "hidden": hidden}


def test_runs_of_similar_lengths_give_the_one_padded_answer_with_less_padding():
    lengths = [5, 30, 6, 7, 29, 8, 5, 31, 12, 13, 14, 6, 7, 9, 10, 11]
    feeds = padded(lengths)
    one, many = Model(), Model()
    want = one(feeds)
    got = by_length(many, SPEC)(feeds)
    np.testing.assert_array_equal(got["pooled"], want["pooled"])
    np.testing.assert_array_equal(got["hidden"], want["hidden"])  # per-token outputs padded back to the batch's length
    computed = sum(r * s for r, s in many.calls)
    assert len(many.calls) > 1 and computed < 0.6 * len(lengths) * max(lengths)
    assert all(r >= 4 for r, _ in many.calls)  # each run still batches


def test_short_batches_and_models_without_a_mask_run_as_they_are():
    model = Model()
    feeds = padded([3, 9, 4])
    by_length(model, SPEC)(feeds)
    assert model.calls == [(3, 9)]
    plain = IOSpec.parse(["x:float32[batch,8]"])
    run = lambda feeds: feeds  # noqa: E731
    assert by_length(run, plain) is run


def test_max_rows_cuts_a_long_list_into_batches():
    lengths = np.array([4] * 10 + [9] * 7)
    parts = runs(lengths, min_rows=1, max_rows=4)
    assert all(len(p) <= 4 for p in parts) and sorted(np.concatenate(parts)) == list(range(17))
    assert all(len(p) * lengths[p].max() <= 1.25 * lengths[p].sum() for p in parts)  # within the slack of padding


def test_measured_costs_decide_the_cuts():
    """Where the bundle says what a call costs (``mix.Costs.pricer``), the batch is cut where the calls add up to
    least: a fixed cost per call that outweighs the padding keeps one run; a long item among short ones is cut off
    when padding the short ones to it costs more than a call; the answers stay those of one padded run."""
    from torchship.processing.lengths import priced
    lengths = np.array([128] + [16] * 31)

    def cost(per_call):
        return lambda rows, length: per_call + rows * length * 0.001  # ms: a fixed cost, then per padded token
    assert [len(r) for r in priced(lengths, cost(100.0))] == [32]  # the call costs more than all the padding
    cheap = priced(lengths, cost(0.5))
    assert [len(r) for r in cheap] == [1, 31] and cheap[0][0] == 0  # the long item alone, the rest at 16
    capped = priced(lengths, cost(0.5), max_rows=8)  # within the batch limit: the long item alone, four calls at 16
    assert len(capped) == 5 and len(capped[0]) == 1 and all(len(r) <= 8 for r in capped)
    feeds = padded([40, 3, 4, 5, 39, 6, 3, 4])
    one, many = Model(), Model()
    want = one(feeds)
    got = by_length(many, SPEC, cost=cost(0.01))(feeds)
    np.testing.assert_array_equal(got["hidden"], want["hidden"])
    np.testing.assert_array_equal(got["pooled"], want["pooled"])
    assert sorted(s for _, s in many.calls) == [6, 40]  # two runs: the two long items, the six short ones
