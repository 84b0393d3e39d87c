"""Model files: TorchScript, torch.export ``.pt2``, ONNX."""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import SourceError, UsageError
from ..spec import BATCH, IOSpec, TensorSpec


def load_file(path: Path, inputs, dims, outputs):
    if path.suffix in (".pth", ".ckpt", ".safetensors"):
        raise UsageError(f"{path} holds weights, not a model: give the architecture as package.module:attr "
                         f"and pass this file with --weights {path}")
    if path.suffix == ".onnx":
        return _load_onnx(path, inputs, dims)
    from .model import finish
    if path.suffix == ".pt2":
        from ..errors import UnsafeFile
        from ..modules import Exported, read_program
        try:
            ep = read_program(path)
        except UnsafeFile:
            raise
        except Exception as exc:
            raise SourceError(f"{path} is not a torch.export program ({str(exc).splitlines()[0]})") from exc
        spec = IOSpec.parse(inputs) if inputs else _spec_from_program(ep)
        return replace(finish(path.stem, Exported(ep.module()), spec, dims, outputs=outputs), file=path)
    if _is_checkpoint(path):
        raise UsageError(f"{path} is a torch.save checkpoint, not a TorchScript model: give the architecture as "
                         f"package.module:attr and pass this file with --weights {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise SourceError(f"{path} is not a TorchScript file ({str(exc).splitlines()[0]}); a pickled checkpoint "
                          "is a state dict: give the architecture as package.module:attr with --weights") from exc
    if not inputs:
        raise UsageError(f"{path}: a TorchScript file does not record its input shapes; give them with --input")
    return replace(finish(path.stem, module, IOSpec.parse(inputs), dims, outputs=outputs), file=path)


def _is_checkpoint(path: Path) -> bool:
    """A torch.save zip (pickled data.pkl, no TorchScript constants.pkl)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/data.pkl") for n in names) and not any(n.endswith("/constants.pkl") for n in names)


def _dim_names(dims) -> tuple:
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(BATCH if i == 0 else (str(d) if str(d).isidentifier() else f"dim{i}"))
    return tuple(out)


def _spec_from_program(ep) -> IOSpec:
    specs = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            val = node.meta["val"]
            dims = [int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape]
            specs.append(TensorSpec(node.name, str(val.dtype).removeprefix("torch."), _dim_names(dims)))
    return IOSpec(tuple(specs))


_ONNX_TYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


def onnx_spec(path: Path) -> IOSpec:
    import onnx
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        raise SourceError(f"{path} is not a readable ONNX model ({exc})") from exc
    initializers = {i.name for i in graph.initializer}

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "dyn") for d in t.shape.dim]
        return TensorSpec(v.name, _ONNX_TYPES.get(t.elem_type, "float32"), _dim_names(dims))

    return IOSpec(tuple(spec(v) for v in graph.input if v.name not in initializers), tuple(spec(v) for v in graph.output))


def _load_onnx(path: Path, inputs, dims):
    from .model import Model, guess_task
    spec = onnx_spec(path)
    if inputs:
        spec = IOSpec(IOSpec.parse(inputs).inputs, spec.outputs)
    return Model(path.stem, None, spec, task=guess_task(spec.outputs), onnx_path=path, dims={s: int(dims.get(s, 16)) for s in spec.symbols})
