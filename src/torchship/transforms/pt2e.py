"""int8 through torchao's PT2E flow with the x86 inductor quantizer: static (calibrated) and QAT.

A program quantized here holds quantize/dequantize pairs around int8 weights and activations; inductor
(torch.compile, AOTInductor) lowers them to int8 kernels.
"""
from __future__ import annotations

import warnings

from ..errors import MissingExtra


def torchao():
    """(pt2e, quantize_pt2e, x86_inductor_quantizer) from torchao, or a line naming the extra."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import pt2e
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as exc:
        raise MissingExtra("torchao (for PT2E int8 and quantization-aware training)", "compress") from exc
    return pt2e, quantize_pt2e, x86


def x86_quantizer(qat: bool = False):
    """The x86 inductor quantizer's default config, with the weights in 7 bits ([-64, 63], per channel).

    int8 kernels on an x86 CPU without VNNI (oneDNN's and ONNX Runtime's alike) sum uint8 x int8 products in pairs
    into int16, which saturates when both take their full range (QAT on digits-cnn, run by ONNX Runtime on AVX2
    only: cosine 0.956 to fp32). A program verified on one machine is served on others, so one side keeps to 7
    bits. The weights rather than the activations (torchao's ``reduce_range``): weights are constants, so their
    range holds in an ONNX export too, whose QuantizeLinear knows no 7-bit clamp for activations (ONNX Runtime
    against the torch program on inputs past the calibrated range: cosine 0.985 with 7-bit activations)."""
    from dataclasses import replace
    _, _, x86 = torchao()
    config = x86.get_default_x86_inductor_quantization_config(is_qat=qat)
    config = replace(config, weight=replace(config.weight, quant_min=-64, quant_max=63))
    return x86.X86InductorQuantizer().set_global(config)


def without_dead_code(graph):
    """An exported program's module without the operations nothing reads. A Hugging Face encoder computes its pooler
    (a Linear and a tanh) whether or not the model's output uses it; the x86 quantizer's Linear + activation pattern
    then finds a partition with no output and fails (``IndexError: list index out of range`` in torchao 0.18, on
    every BERT-family embedding model)."""
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


def quantize_static(graph, batches):
    """Post-training static int8 of an exported program's module: observe ``batches`` (tuples of inputs), convert."""
    import torch
    pt2e, quantize_pt2e, _ = torchao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_pt2e.prepare_pt2e(without_dead_code(graph), x86_quantizer())
        with torch.no_grad():
            for args in batches:
                prepared(*args)
        return quantize_pt2e.convert_pt2e(prepared)
