"""The private upstream APIs torchship leans on, held to the shape it was written against. When `make constraints`
moves a pin and one of these fails, read the upstream change before changing the expected text here: the code that
copies or overrides it (named in each test) must change with it."""
import hashlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pinned(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _digest(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("package", ["uvicorn", "httptools", "onnx", "msgspec", "torchao"])
def test_the_packages_with_private_apis_run_at_their_pinned_versions(package):
    from importlib.metadata import version
    assert version(package) == pinned(package), f"{package} {version(package)} is installed, {pinned(package)} was tested"


def test_uvicorn_httptools_protocol_is_the_one_serve_extends():
    """serve/server.py's Shedding protocol overrides on_response_complete and _unset_keepalive_if_required (its
    keep-alive timer), calls on_headers_complete/connection_lost/_start_asgi_task/timeout_keep_alive_handler and reads
    cycle, parser, url, pipeline, flow, server_state, timeout_keep_alive(_task). uvicorn 0.55.0's text of the methods
    it replaces or wraps, by digest."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    digests = {name: _digest(getattr(HttpToolsProtocol, name)) for name in (
        "on_response_complete", "_unset_keepalive_if_required", "on_headers_complete", "connection_lost",
        "timeout_keep_alive_handler", "_start_asgi_task")}
    assert digests == {
        "on_response_complete": "64e254f28e389e76", "_unset_keepalive_if_required": "00a6a4e47214e68e",
        "on_headers_complete": "1ea8589acfad92d8", "connection_lost": "c91a4c9bf2e29c55",
        "timeout_keep_alive_handler": "8b53bf5f2e202970", "_start_asgi_task": "8d0189e65525db42"}
    whole = inspect.getsource(HttpToolsProtocol)
    for attr in ("self.cycle =", "self.parser =", "self.url =", "self.pipeline", "self.flow =", "self.server_state =",
                 "self.timeout_keep_alive_task =", "self.timeout_keep_alive =", "self.transport ="):
        assert attr in whole, attr


def test_onnx_lists_every_tensor_with_its_external_data_reference():
    """safety.py reads an ONNX file's external-data references with onnx's private _get_all_tensors before ONNX
    Runtime opens it (a reference outside the bundle is refused)."""
    import onnx
    from onnx import helper
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    assert list(inspect.signature(_get_all_tensors).parameters) == ["onnx_model_proto"]
    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [1.0])
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../outside.bin")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], [weight])
    found = list(_get_all_tensors(helper.make_model(graph)))
    assert [t.name for t in found] == ["w"] and uses_external_data(found[0])
    assert {e.key: e.value for e in found[0].external_data}["location"] == "../outside.bin"


def test_msgspec_states_a_bad_field_as_the_manifest_errors_show_it():
    """A damaged manifest's error is msgspec's own text (tests/test_tamper.py asserts it, and users read it)."""
    import msgspec

    class Manifest(msgspec.Struct, forbid_unknown_fields=True):
        max_batch_size: int = msgspec.field(default=1)
    with pytest.raises(msgspec.ValidationError, match=r"Expected `int`, got `str` - at `\$.max_batch_size`"):
        msgspec.json.decode(b'{"max_batch_size": "x"}', type=Manifest)
    with pytest.raises(msgspec.ValidationError, match=r"Object contains unknown field `extra`"):
        msgspec.json.decode(b'{"extra": 1}', type=Manifest)


def test_torchao_folds_batch_norm_one_convolution_kind_at_a_time():
    """train/qat.py's convert passes over the convolution kinds a QAT graph lacks by replacing torchao's
    _fold_conv_bn_qat_helper, which _fold_conv_bn_qat calls once per kind (F.conv1d, F.conv2d, ...) with the kind as
    conv_fn and looks up by its module global. torchao 0.18.0's text of both, by digest."""
    from torchao.quantization.pt2e import qat_utils
    assert list(inspect.signature(qat_utils._fold_conv_bn_qat_helper).parameters) == [
        "m", "conv_fn", "example_inputs", "is_cuda"]
    assert {f.__name__: _digest(f) for f in (qat_utils._fold_conv_bn_qat, qat_utils._fold_conv_bn_qat_helper)} == {
        "_fold_conv_bn_qat": "3454a434fefddb02", "_fold_conv_bn_qat_helper": "a7f715d1f9f169b0"}
