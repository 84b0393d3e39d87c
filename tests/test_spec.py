import numpy as np
import pytest

from torchship import IOSpec, SpecError, TensorSpec


def test_parse_round_trip():
    spec = IOSpec.parse(["input_ids:int64[batch,seq]", "x:float32[batch,3,28,28]"])
    assert [str(t) for t in spec.inputs] == ["input_ids:int64[batch,seq]", "x:float32[batch,3,28,28]"]
    assert spec.inputs[1].shape == ("batch", 3, 28, 28)
    assert spec.symbols == ["seq"]
    assert IOSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("text, fragment", [
    ("x", "NAME:DTYPE"), ("x:float32", "NAME:DTYPE"), ("x:float99[batch]", "dtype"),
    ("x:float32[batch,,3]", "empty dimension"), ("x:float32[batch,-3]", "positive int"), ("x:float32[batch,0]", "positive"),
])
def test_parse_errors_say_what_is_wrong(text, fragment):
    with pytest.raises(SpecError, match=fragment):
        TensorSpec.parse(text)


def test_duplicate_and_missing_inputs_rejected():
    with pytest.raises(SpecError, match="repeat"):
        IOSpec.parse(["x:float32[batch]", "x:float32[batch]"])
    with pytest.raises(SpecError, match="at least one"):
        IOSpec.parse([])


def test_check_names_each_problem():
    spec = IOSpec.parse(["ids:int64[batch,seq]", "mask:int64[batch,seq]"])
    ok = {"ids": np.zeros((2, 5), np.int64), "mask": np.ones((2, 5), np.int64)}
    assert spec.check(ok) == 2
    with pytest.raises(SpecError, match="missing \\['mask'\\]"):
        spec.check({"ids": ok["ids"]})
    with pytest.raises(SpecError, match="expected dtype int64, got float32"):
        spec.check({**ok, "ids": ok["ids"].astype(np.float32)})
    with pytest.raises(SpecError, match="'seq' is 5 in one input and 4"):
        spec.check({**ok, "mask": np.ones((2, 4), np.int64)})
    with pytest.raises(SpecError, match="expected 2 dimensions"):
        spec.check({**ok, "ids": np.zeros((2,), np.int64)})


def test_sample_fits_spec_and_masks_are_ones():
    spec = IOSpec.parse(["ids:int64[batch,seq]", "attention_mask:int64[batch,seq]", "x:float32[batch,4]"])
    feeds = spec.sample(3, {"seq": 7})
    assert spec.check(feeds) == 3
    assert (feeds["attention_mask"] == 1).all()
    with pytest.raises(SpecError, match="--dim seq=N"):
        spec.sample(3, {})


def test_integer_ranges_parse_sample_and_check():
    import numpy as np
    t = TensorSpec.parse("ids:int64[batch,seq]{0:50}")
    assert t.range == (0, 50) and str(t) == "ids:int64[batch,seq]{0:50}"
    spec = IOSpec((t,))
    feeds = spec.sample(64, {"seq": 32})
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 50
    spec.check(feeds)
    with pytest.raises(SpecError, match=r"values must lie in \[0, 50\), got 0 to 50"):
        spec.check({"ids": np.array([[0, 50]], np.int64)})
    with pytest.raises(SpecError, match="low < high"):
        TensorSpec.parse("x:float32[batch]{0:5}")
