import pytest
import torch
from safetensors.torch import load_file

from torchship import SourceError, UsageError
from torchship.cli import main
from torchship.errors import ModelError
from torchship.inspect import inspect, watch
from tests.models import Overflow, Tiny


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_watch_reports_each_leaf_and_removes_its_hooks():
    model = Tiny().eval()
    with watch(model) as w:
        model(torch.ones(3, 8))
    assert list(w.layers) == ["net.0", "net.1", "net.2"]
    lin = w.layers["net.0"]
    assert lin.type == "Linear" and lin.params == 8 * 16 + 16 and lin.shapes == [[3, 16]] and lin.dtypes == ["float32"]
    assert lin.flops == 2 * 3 * 16 * 8 and lin.ms >= 0
    relu = w.layers["net.1"].stats
    assert relu["min"] >= 0 and 0 <= relu["zeros"] <= 1 and relu["nonfinite"] == 0
    assert _hooks(model) == 0
    with pytest.raises(UsageError, match="no module name matches"):
        with watch(model, include="encoder.*"):
            pass
    assert _hooks(model) == 0


def test_a_watch_that_only_times_takes_no_statistics(monkeypatch):
    """What the search's Linear-share measurement uses: each leaf's type, shapes and time, without a pass over its
    outputs for statistics or NaN (which made a MiniLM pass at 32 x 128 4.5x slower, 14 s of every search)."""
    def no(*a):
        raise AssertionError("statistics taken")
    monkeypatch.setattr("torchship.hooks.stats", no)
    monkeypatch.setattr("torchship.hooks.torch.isfinite", no)
    model = Overflow().eval()
    with watch(model, with_stats=False) as w:
        model(torch.ones(1, 4))  # overflows in square: not looked for
    assert list(w.layers) == ["lin", "amp", "square", "head"] and w.layers["square"].stats == {}
    assert w.layers["lin"].type == "Linear" and w.layers["lin"].shapes == [[1, 4]] and w.layers["lin"].ms >= 0
    assert w.first_nonfinite is None and _hooks(model) == 0


def test_nan_tracer_names_the_first_overflowing_module():
    w = inspect("tests.models:Overflow")
    assert w.first_nonfinite["module"] == "square" and w.first_nonfinite["type"] == "Square"
    assert w.first_nonfinite["inputs"][0]["nonfinite"] == 0 and w.first_nonfinite["inputs"][0]["max"] > 1e20
    assert w.layers["amp"].stats["nonfinite"] == 0 and w.layers["square"].stats["nonfinite"] > 0


def test_a_model_that_raises_names_the_module_and_leaves_no_hooks(monkeypatch):
    model = Overflow().eval()

    def boom(self, x):
        raise RuntimeError("kaboom")
    monkeypatch.setattr("tests.models.Square.forward", boom)
    with pytest.raises((ModelError, SourceError), match="in module 'square': RuntimeError: kaboom"):
        inspect("tests.models:Overflow")
    with pytest.raises(RuntimeError):
        with watch(model):
            model(torch.ones(1, 4))
    assert _hooks(model) == 0


def test_dump_saves_one_entry_per_module(tmp_path):
    inspect("zoo:digits-cnn", dump=str(tmp_path / "acts"))
    saved = load_file(str(tmp_path / "acts" / "activations.safetensors"))
    assert set(saved) == {"conv", "bn", "pool", "fc1", "fc2"} and saved["conv"].shape == (2, 16, 28, 28)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="--dump"):
        inspect("zoo:digits-cnn", dump=str(blocker))
    assert blocker.read_text() == "not a directory"


def test_cli_inspect_exit_codes(capsys):
    assert main(["inspect", "zoo:digits-cnn", "--json"]) == 0
    assert '"fc1"' in capsys.readouterr().out
    assert main(["inspect", "tests.models:Overflow"]) == 1
    assert "first non-finite output: square" in capsys.readouterr().err
