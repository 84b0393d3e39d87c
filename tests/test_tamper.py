"""Hostile bundles and files, built here, refused with one line from every entry point (load_bundle, `bundle verify`,
`serve`, and `inspect` for a source); no payload runs and nothing outside the bundle is read."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import msgspec
import numpy as np
import pytest

from torchship import BundleError, OptimizeOptions, load_bundle, optimize
from torchship.bundle import sha256
from torchship.cli import main
from torchship.errors import UnsafeFile, UntrustedCode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = tmp_path_factory.mktemp("tamper") / "good"
    res = optimize("tests.models:Tiny", OptimizeOptions(runtimes=("onnxrt",), batch_sizes=(2,), seconds_per_size=0.02,
                                                        transforms=()), out=out)
    assert res.bundle == out, (res.message, [(v.name, v.status, v.reason) for v in res.variants])
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit(bundle: Path, change) -> Path:
    """Change the manifest as an attacker would (a dict in, a dict out), checksums recomputed where files exist."""
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    for name in list(m.get("files", {})) if isinstance(m.get("files"), dict) else []:
        f = bundle / name
        if f.is_file() and not f.is_symlink():
            m["files"][name] = sha256(f)
    (bundle / "manifest.json").write_text(json.dumps(m))
    return bundle


class Touch:
    """Unpickling this creates ``path``: the payload's effect, for the test to look for."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def hostile_pt2(tmp_path: Path, marker: Path, where: str) -> Path:
    """A torch.export program whose weight (``where="weight"``), sample inputs (``"sample"``) or a constant
    (``"opaque"``) is a pickle that creates ``marker`` when torch's reader unpickles it."""
    import torch
    src = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(2, 4),)), str(src))
    out = tmp_path / f"hostile-{where}.pt2"
    payload = pickle.dumps(Touch(marker))
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if where == "weight" and item.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                cfg["config"]["weight"]["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif where == "weight" and item.filename.endswith("data/weights/weight_0"):
                data = payload
            elif where == "sample" and item.filename.endswith("data/sample_inputs/model.pt"):
                data = payload  # fails weights_only=True, and torch then retries without it
            elif where == "opaque" and item.filename.endswith("model_constants_config.json"):
                data = json.dumps({"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False,
                                                        "use_pickle": True, "tensor_meta": None}}}).encode()
            zout.writestr(item, data)
        if where == "opaque":
            root = zin.namelist()[0].split("/")[0]
            zout.writestr(f"{root}/data/constants/opaque_obj_0", payload)
    return out


def torch_reads_it(path: Path) -> None:
    """torch.export.load on the file, in a child process: what the attack does to a reader that trusts the file."""
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(path)!r})"], capture_output=True, timeout=120)


@pytest.mark.parametrize("where", ["weight", "sample", "opaque"])
def test_a_pt2_with_a_pickle_payload_runs_in_torch_and_never_in_torchship(where, tmp_path, good, capsys):
    marker = tmp_path / "payload-ran"
    pt2 = hostile_pt2(tmp_path, marker, where)
    torch_reads_it(pt2)
    assert marker.exists(), "the payload is real: torch's own reader runs it"
    marker.unlink()
    # as a source: inspect and optimize refuse it before torch reads it
    assert main(["inspect", str(pt2)]) == 2
    assert "refusing to read it" in capsys.readouterr().err
    with pytest.raises(UnsafeFile, match="refusing to read it"):
        optimize(str(pt2))
    # as a bundle's AOTInductor package, checksums and all
    b = copy(good, tmp_path / "b")
    shutil.copyfile(pt2, b / "model.pt2")
    (b / "model.onnx").unlink()

    def to_aoti(m):
        m.update(runtime="aoti", executes="runs native code: the shared library AOTInductor compiled into model.pt2")
        m["artifact"].update(runtime="aoti", files=["model.pt2"])
        m["files"] = {k: v for k, v in m["files"].items() if k != "model.onnx"} | {"model.pt2": ""}
    edit(b, to_aoti)
    for call in (lambda: load_bundle(b, trust_code=True), lambda: load_bundle(b)):
        with pytest.raises(UnsafeFile, match="refusing to read it"):
            call()
    assert main(["bundle", "verify", str(b)]) == 2 and "refusing to read it" in capsys.readouterr().err
    code, err = serve(b, "--trust-code")
    assert code == 2 and "refusing to read it" in err
    assert not marker.exists(), "the payload ran"


def serve(bundle: Path, *args, cwd: Path = ROOT, env: dict | None = None) -> tuple[int, str]:
    """`torchship serve` on the bundle: its exit code and stderr when it refuses to start (it must, within 60 s)."""
    done = subprocess.run([sys.executable, "-m", "torchship.cli", "serve", str(bundle), "--port", "9", *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd, env={**os.environ, **(env or {})})
    return done.returncode, done.stderr


def _set(path, value):
    def change(m):
        *head, last = path
        target = m
        for k in head:
            target = target[k]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


CASES = [
    ("a file outside the bundle", lambda m: m["files"].update({"../outside": "0" * 64}), "not a relative path inside"),
    ("an absolute path", lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "not a relative path inside"),
    ("an artifact file not listed", lambda m: m["files"].pop("model.onnx"), "have no sha256 in 'files'"),
    ("a negative batch size", _set(["max_batch_size"], -1), "field max_batch_size: Expected `int` >= 1, got -1"),
    ("a huge batch size", _set(["max_batch_size"], 10**9), "field max_batch_size: Expected `int` <= 65536"),
    ("a huge dimension", _set(["spec", "inputs", 0, "shape"], ["batch", 10**12]), "over the limit of 1048576"),
    ("a batch that would take petabytes", lambda m: (m["spec"]["inputs"][0].update(shape=["batch", 1 << 20]),
                                                     m.update(max_batch_size=65536)), "GiB of inputs per batch"),
    ("an unknown runtime", lambda m: (m.update(runtime="tensorrt"), m["artifact"].update(runtime="tensorrt")),
     "is not one torchship knows"),
    ("no artifact", _set(["artifact"], KeyError), "missing required field `artifact`"),
    ("no spec", _set(["spec"], KeyError), "missing required field `spec`"),
    ("a list where an object belongs", _set(["spec"], []), "field spec: Expected `object`, got `array`"),
    ("absurd threads", _set(["threads"], 10**6), "field threads"),
    ("an old format", _set(["format_version"], 1), "bundle format 1"),
    ("an unknown transform", _set(["transforms"], [{"kind": "rm -rf"}]), "is not a transform torchship knows"),
    ("a silenced executes field", lambda m: (m["artifact"].update(architecture={"kind": "python", "inputs": ["x"],
                                                                                   "ref": "evil:make"}),
                                             m.update(runtime="eager", executes=None), m["artifact"].update(runtime="eager")),
     "field executes"),
]


@pytest.mark.parametrize("what, change, fragment", CASES, ids=[c[0] for c in CASES])
def test_a_bad_manifest_is_one_line_from_every_entry_point(what, change, fragment, good, tmp_path, capsys):
    outside = tmp_path / "outside"
    os.mkfifo(outside)  # anything that opened it for reading would hang: the test would time out
    b = edit(copy(good, tmp_path / "b" / "b"), change)
    with pytest.raises(BundleError, match=fragment.replace("[", r"\[").replace("$", r"\$")):
        load_bundle(b)
    assert main(["bundle", "verify", str(b)]) == 2
    err = capsys.readouterr().err
    assert fragment in " ".join(err.split()) and "Traceback" not in err
    code, err = serve(b)
    assert code == 2 and fragment in " ".join(err.split()) and "Traceback" not in err


def test_symlinks_out_of_the_bundle_are_refused(good, tmp_path, capsys):
    secret = tmp_path / "secret.onnx"
    shutil.copyfile(good / "model.onnx", secret)
    b = copy(good, tmp_path / "b")
    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to(secret)  # same bytes, same checksum: only the link gives it away
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(b)
    assert main(["bundle", "verify", str(b)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    code, err = serve(b)
    assert code == 2 and "symbolic link" in err


def test_unlisted_files_are_reported_and_never_read(good, tmp_path, capsys):
    b = copy(good, tmp_path / "b")
    os.mkfifo(b / "extra.bin")  # never opened: reading it would hang
    assert main(["bundle", "verify", str(b)]) == 0
    out = capsys.readouterr().out
    assert "unlisted: extra.bin" in out and "never read" in out
    assert load_bundle(b)({"x": np.ones((2, 8), np.float32)})["output"].shape == (2, 4)


def _external(b, location):
    """The bundle's ONNX model with its weights in an external file named ``location`` (written as an attacker would,
    straight into the protobuf: onnx refuses to write '..'); the manifest's checksums recomputed."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data
    model = onnx.load(str(b / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.data", size_threshold=0)
    onnx.save_model(model, str(b / "model.onnx"))
    model = onnx.load(str(b / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (b / "model.onnx").write_bytes(model.SerializeToString())
    return b / "weights.data"


@pytest.mark.parametrize("location, fragment", [
    ("../stolen.data", "outside the model's directory"),
    ("unlisted.data", "which the bundle's manifest does not list with a checksum"),
])
def test_onnx_external_data_outside_the_bundle_or_its_manifest_is_refused(good, tmp_path, capsys, location, fragment):
    b = copy(good, tmp_path / "b" / "b")
    data = _external(b, location)
    data.rename(b / location)  # where the model points: beside the bundle, or inside it but not in the manifest
    edit(b, lambda m: None)
    with pytest.raises(UnsafeFile, match=fragment):
        load_bundle(b)
    assert main(["bundle", "verify", str(b)]) == 2
    err = capsys.readouterr().err
    assert fragment in " ".join(err.split()) and "Traceback" not in err
    code, err = serve(b)
    assert code == 2 and fragment in " ".join(err.split())


def test_keygen_never_overwrites_a_key_and_a_damaged_signature_is_one_line(good, tmp_path, capsys):
    assert main(["bundle", "keygen", "--out", str(tmp_path / "ours")]) == 0
    key = (tmp_path / "ours").read_bytes()
    assert main(["bundle", "keygen", "--out", str(tmp_path / "ours")]) != 0
    err = capsys.readouterr().err
    assert "exists" in err and "Traceback" not in err and (tmp_path / "ours").read_bytes() == key
    b = copy(good, tmp_path / "b")
    assert main(["bundle", "sign", str(b), "--key", str(tmp_path / "ours")]) == 0
    capsys.readouterr()
    for damage in (b"{not json", b'{"algorithm": "rsa", "signature": "AAAA"}', b'{"algorithm": "ed25519"}'):
        (b / "signature.json").write_bytes(damage)
        with pytest.raises(BundleError):
            load_bundle(b, verify_key=tmp_path / "ours.pub")
        assert main(["bundle", "verify", str(b), "--key", str(tmp_path / "ours.pub")]) == 2
        err = capsys.readouterr().err
        assert "signature.json" in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def evil_bundle(tmp_path_factory):
    """An eager bundle whose architecture is `evil:make`, with evil.py beside it: importing evil creates a marker."""
    work = tmp_path_factory.mktemp("evil")
    out = work / "tiny"
    optimize("tests.models:Tiny", OptimizeOptions(runtimes=("eager",), batch_sizes=(2,), seconds_per_size=0.02, transforms=()),
             out=out)
    edit(out, lambda m: m["artifact"]["architecture"].update(ref="evil:make") or m.update(
        executes="imports Python code from the module evil (evil:make) to rebuild the model"))
    (out / "evil.py").write_text(f"import pathlib\npathlib.Path({str(work / 'imported')!r}).touch()\n"
                                 "from tests.models import Tiny as make\n")
    return out, work / "imported"


def test_code_named_by_a_bundle_runs_only_with_consent(evil_bundle, capsys):
    bundle, marker = evil_bundle
    with pytest.raises(UntrustedCode, match="imports Python code from the module evil"):
        load_bundle(bundle)
    assert main(["bundle", "info", str(bundle)]) == 0 and "imports Python code from the module evil" in capsys.readouterr().out
    code, err = serve(bundle, cwd=bundle)  # served from the bundle's own directory: still refused
    assert code == 2 and "--trust-code" in err
    code, err = serve(bundle, "--trust-code", cwd=bundle)  # consent, but the directory is never put on sys.path
    assert code != 0 and "cannot import 'evil'" in err
    assert not marker.exists(), "the bundle's code ran without consent"
    # consent, and the code put on the path on purpose: it runs (the mechanism is real)
    subprocess.run([sys.executable, "-c", f"import torchship; torchship.load_bundle({str(bundle)!r}, trust_code=True)"],
                   env={**os.environ, "PYTHONPATH": f"{bundle}:{ROOT}"}, capture_output=True, timeout=120)
    assert marker.exists()


def test_a_signed_bundle_and_a_wrong_signature(good, tmp_path, capsys):
    b = copy(good, tmp_path / "b")
    assert main(["bundle", "keygen", "--out", str(tmp_path / "ours")]) == 0
    assert main(["bundle", "keygen", "--out", str(tmp_path / "theirs")]) == 0
    assert oct((tmp_path / "ours").stat().st_mode & 0o777) == "0o600"
    capsys.readouterr()
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(b, verify_key=tmp_path / "ours.pub")
    assert main(["bundle", "sign", str(b), "--key", str(tmp_path / "ours")]) == 0
    assert main(["bundle", "verify", str(b), "--key", str(tmp_path / "ours.pub")]) == 0
    assert "signed by key" in capsys.readouterr().out
    assert load_bundle(b, verify_key=tmp_path / "ours.pub")({"x": np.ones((1, 8), np.float32)})["output"].shape == (1, 4)
    with pytest.raises(BundleError, match="not by"):
        load_bundle(b, verify_key=tmp_path / "theirs.pub")
    code, err = serve(b, "--verify-key", str(tmp_path / "theirs.pub"))
    assert code == 2 and "not by" in err
    edit(b, lambda m: m.update(name="swapped"))  # anyone can recompute the checksums; nobody else can sign
    with pytest.raises(BundleError, match="does not match manifest.json"):
        load_bundle(b, verify_key=tmp_path / "ours.pub")
    assert main(["bundle", "verify", str(b), "--key", str(tmp_path / "ours.pub")]) == 2


def test_a_signature_from_your_key_is_consent_to_run_the_bundles_code(evil_bundle, tmp_path):
    from torchship.bundle import sign
    from torchship.signing import keygen
    bundle, _ = evil_bundle
    b = copy(bundle, tmp_path / "b")
    (b / "evil.py").unlink()
    edit(b, lambda m: m["artifact"]["architecture"].update(ref="tests.models:Tiny") or m.update(
        executes="imports Python code from the module tests.models (tests.models:Tiny) to rebuild the model"))
    private, public = keygen(tmp_path / "k")
    sign(b, private)
    assert load_bundle(b, verify_key=public).manifest.executes.startswith("imports Python code")
    with pytest.raises(UntrustedCode):
        load_bundle(b)
    assert msgspec.json.decode((b / "signature.json").read_bytes())["algorithm"] == "ed25519"
