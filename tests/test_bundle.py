import json
from pathlib import Path

import numpy as np
import pytest

from torchship import BundleError, OptimizeOptions, load_bundle, optimize, verify_bundle
import msgspec

from torchship.bundle import Manifest, read_manifest, sha256, write
from torchship.errors import OutputError


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    optimize("tests.models:Tiny", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(4,), seconds_per_size=0.05), out=out)
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_manifest_holds_what_the_design_names(tiny_bundle):
    m = verify_bundle(tiny_bundle)
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    for key in ("format_version", "name", "version", "spec", "runtime", "transforms", "device", "threads",
                "fidelity", "profile", "files", "artifact"):
        assert key in raw
    assert set(m.files) >= {"model.onnx", "report/report.json"} and m.runtime == "onnxrt" and m.threads >= 1
    out = load_bundle(tiny_bundle)({"x": np.ones((3, 8), np.float32)})
    assert out["output"].shape == (3, 4)


def test_changed_truncated_or_missing_file_fails_its_checksum(tiny_bundle, tmp_path):
    changed = _copy(tiny_bundle, tmp_path / "changed")
    data = bytearray((changed / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (changed / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx fails its checksum"):
        load_bundle(changed)
    truncated = _copy(tiny_bundle, tmp_path / "truncated")
    (truncated / "model.onnx").write_bytes((truncated / "model.onnx").read_bytes()[:100])
    with pytest.raises(BundleError, match="fails its checksum"):
        verify_bundle(truncated)
    missing = _copy(tiny_bundle, tmp_path / "missing")
    (missing / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(missing)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(BundleError, match="format 99"):
        verify_bundle(tmp_path)


def _manifest(name="m", files=("a.bin",)):
    from torchship import IOSpec
    from torchship.runtimes import Artifact
    return Manifest(format_version=2, name=name, spec=IOSpec.parse(["x:float32[batch,8]"]), variant="onnxrt",
                    runtime="onnxrt", artifact=Artifact("onnxrt", tuple(files)))


def test_manifest_round_trips_through_its_file(tiny_bundle, tmp_path):
    """Written and read in one place: what read_manifest returns is what write was given, field for field."""
    m = read_manifest(tiny_bundle)
    src = tmp_path / "a.bin"
    src.write_bytes(b"x")
    out = write(tmp_path / "copy", msgspec.structs.replace(m, artifact=msgspec.structs.replace(m.artifact, files=("a.bin",))),
                [(src, "a.bin")])
    again = read_manifest(out)
    assert again.files == {"a.bin": sha256(src)}
    assert msgspec.structs.replace(again, files=m.files, artifact=m.artifact) == m


def test_write_is_atomic_and_never_clobbers_other_data(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 10)
    out = write(tmp_path / "b", _manifest(), [(src, "a.bin")])
    assert verify_bundle(out).files["a.bin"]
    before = (out / "manifest.json").read_text()
    with pytest.raises(FileNotFoundError):  # a failure half-way leaves the previous bundle as it was
        write(out, _manifest("m2"), [(src, "a.bin"), (tmp_path / "nope", "nope")])
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a bundle"):
        write(other, _manifest(), [(src, "a.bin")])
    assert (other / "keep.txt").read_text() == "mine"


def test_threads_are_what_this_machine_has(tiny_bundle, tmp_path):
    """A bundle optimized on a bigger machine starts no more threads than this one may use; an explicit count
    wins; spin=False stops ONNX Runtime's idle threads from spinning."""
    from torchship.machine import cores
    big = _copy(tiny_bundle, tmp_path / "big")
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["threads"] = 512
    (big / "manifest.json").write_text(json.dumps(manifest))
    opts = load_bundle(big).runner.sess.get_session_options()
    assert opts.intra_op_num_threads == cores()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    opts = load_bundle(big, threads=1, spin=False).runner.sess.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


OLD = Path(__file__).parent / "data" / "bundles-741dd9a"  # made by commit 741dd9a, before options were typed


@pytest.mark.parametrize("runtime", sorted(p.name for p in OLD.iterdir()))
def test_a_bundle_made_before_typed_options_still_verifies_loads_and_answers(runtime):
    import torch

    from tests.models import Tiny
    m = verify_bundle(OLD / runtime)
    assert m.runtime == runtime and m.artifact.options.device == "cpu" and m.artifact.options.threads == 2
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    with torch.inference_mode():
        want = Tiny()(torch.from_numpy(x)).numpy()
    got = load_bundle(OLD / runtime, trust_code=True)({"x": x})["output"]  # eager and compile import tests.models
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if runtime == "torchscript":
        assert m.artifact.options.mode == "trace"
    if runtime == "openvino":
        assert m.artifact.options.converted_from == "the torch.export program"


def test_build_options_are_typed_and_a_misspelt_one_is_refused():
    from torchship.runtimes.base import BuildOptions
    assert msgspec.json.encode(BuildOptions()) == b"{}"  # a manifest says only what differs from plain fp32
    assert msgspec.json.decode(b'{"precision": "bf16", "dim_ranges": {"seq": [2, 64]}}', type=BuildOptions) == \
        BuildOptions(precision="bf16", dim_ranges={"seq": (2, 64)})
    with pytest.raises(msgspec.ValidationError, match="precision"):
        msgspec.json.decode(b'{"precision": "int4"}', type=BuildOptions)
    with pytest.raises(msgspec.ValidationError, match="quantise"):
        msgspec.json.decode(b'{"quantise": "int8"}', type=BuildOptions)
