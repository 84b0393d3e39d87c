"""Quantization-aware training with torchao's PT2E flow and the x86 inductor quantizer.

prepare (export, insert fake quantization) -> train as usual -> convert (int8 quantize/dequantize pairs) ->
``model_int8.pt2``, a torch.export program that ``torchship optimize`` takes as a source: inductor (compile,
aoti) lowers its quantize/dequantize pairs to int8 kernels.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..modules import inner


def _torchao():
    from ..transforms.pt2e import torchao
    return torchao()


def export_program(module: nn.Module, example: torch.Tensor):
    """A torch.export program of the user's module (batch dimension dynamic): what ``optimize FILE.pt2`` takes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


class QATModel(nn.Module):
    """A prepared (fake-quantized) exported model whose train()/eval() switch batch norm and dropout the PT2E way."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, x):
        return self.graph(x)

    def train(self, mode: bool = True):
        pt2e, _, _ = _torchao()
        (pt2e.move_exported_model_to_train if mode else pt2e.move_exported_model_to_eval)(self.graph)
        self.training = mode
        return self


def prepare(model: nn.Module, example: torch.Tensor) -> QATModel:
    """Export ``model`` in training mode and insert the x86 inductor quantizer's fake quantization (int8, QAT)."""
    import copy

    from ..transforms.pt2e import without_dead_code, x86_quantizer
    _, quantize_pt2e, _ = _torchao()
    module = copy.deepcopy(inner(model)).train()  # the exported graph would share (and train) the caller's tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_pt2e.prepare_qat_pt2e(without_dead_code(export_program(module, example).module()),
                                                   x86_quantizer(qat=True))
    return QATModel(prepared).train()


def convert(model: QATModel) -> QATModel:
    """Fake quantization -> int8 quantize/dequantize with the learned scales (eval mode)."""
    _, quantize_pt2e, _ = _torchao()
    model.eval()
    with warnings.catch_warnings(), _folding_only_present_convolutions(model.graph):
        warnings.simplefilter("ignore")
        return QATModel(quantize_pt2e.convert_pt2e(model.graph)).eval()


@contextmanager
def _folding_only_present_convolutions(graph):
    """torchao's ``convert_pt2e`` folds batch norm into the convolutions by exporting 24 patterns (per channel or
    not, bias or not, ...) for each of conv1d, conv2d, conv_transpose1d and conv_transpose2d: 96 torch.export runs,
    20 s of a 23 s QAT on digits-cnn, which has only conv2d. A pattern of a convolution the graph does not hold can
    match nothing, so those kinds are passed over (torchao 0.18's ``_fold_conv_bn_qat_helper``, called per kind;
    ``tests/test_upstream.py`` holds its text)."""
    from torchao.quantization.pt2e import qat_utils
    fold = qat_utils._fold_conv_bn_qat_helper
    present = {str(getattr(n.target, "__name__", "")).split(".")[0] for n in graph.graph.nodes
               if n.op == "call_function"}

    def only_present(m, conv_fn, *args, **kwargs):
        return fold(m, conv_fn, *args, **kwargs) if conv_fn.__name__ in present else m
    qat_utils._fold_conv_bn_qat_helper = only_present
    try:
        yield
    finally:
        qat_utils._fold_conv_bn_qat_helper = fold


def save(model: QATModel, example: torch.Tensor, path: Path) -> None:
    """The converted model as a torch.export program (``.pt2``, nothing pickled), batch dimension dynamic."""
    save_program(export_program(model.graph, example), path)


def save_program(program, path: Path) -> None:
    """``torch.export.save``, then the same check every reader makes: a program torchship writes never needs
    unpickling to be read (a tensor torch would pickle is refused here, with the reason)."""
    from ..safety import check_pt2
    torch.export.save(program, str(path))
    try:
        check_pt2(path)
    except Exception:
        Path(path).unlink(missing_ok=True)
        raise
