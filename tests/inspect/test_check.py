"""Each check on a model built to have the mistake and on one without it (no false alarm)."""
import pytest
import torch
from safetensors.torch import save_file

from torchship.cli import main
from torchship.inspect import check as c
from torchship.sources import load_source


def test_training_mode():
    found = c.training_mode(load_source("tests.models:WithDropout"))
    assert found.found and "Dropout" in found.evidence and "eval()" in found.fix
    assert c.training_mode(load_source("tests.models:dropout_in_eval")).found is False
    assert c.training_mode(load_source("tests.models:Tiny")).found is False  # train mode, but nothing changes


def test_autograd():
    found = c.autograd(load_source("tests.models:Tiny"))
    assert found.found and "MiB of tensors saved for backward" in found.evidence and "inference_mode" in found.fix
    assert c.autograd(load_source("tests.models:frozen_tiny")).found is False


def test_batching():
    found = c.batching(load_source("tests.models:frozen_tiny"))
    assert found.found and "items/s" in found.evidence
    assert c.batching(load_source("tests.models:NoBatchGain")).found is False


def test_threads():
    model = load_source("tests.models:frozen_tiny")
    cores = torch.get_num_threads()
    assert c.threads(model, 1).found is False
    found = c.threads(model, cores + 1)
    assert found.found and f"= {cores * (cores + 1)} threads" in found.evidence


def test_trace():
    found = c.trace(load_source("tests.models:Branchy", ["x:float32[batch,8]"]))
    assert found.found and "disagrees with eager" in found.evidence
    assert c.trace(load_source("tests.models:Tiny")).found is False


def test_checkpoint(tmp_path):
    state = load_source("tests.models:Tiny").module.module.state_dict()
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    torch.save(state, tmp_path / "state.pt")
    save_file(state, tmp_path / "state.safetensors")
    found = c.checkpoint(str(tmp_path / "pickled.pt"))
    assert found.found and "unpickling" in found.evidence and "safetensors" in found.fix
    assert c.checkpoint(str(tmp_path / "state.pt")).found is False
    assert c.checkpoint(str(tmp_path / "state.safetensors")).found is False
    assert c.checkpoint(None).found is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_cuda_checks_do_not_apply_without_cuda():
    model = load_source("tests.models:Tiny")
    assert c.cudnn(model, "cpu").found is None and c.cuda_unused(model, "cpu").found is None


def test_cli_exit_code_gates_a_pipeline(capsys):
    assert main(["check", "tests.models:NoBatchGain"]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert main(["check", "tests.models:WithDropout"]) == 1
    out = capsys.readouterr().out
    assert "FOUND training mode at inference" in out and "fix: call model.eval()" in out
