"""cpp/torchship-run: a bundle run without Python, checked against the Python Runner."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from torchship import OptimizeOptions, load_bundle, optimize
from torchship.zoo.digits import dataset

pytestmark = pytest.mark.slow
CPP = Path(__file__).resolve().parents[1] / "cpp"


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (CI installs them: apt-get install cmake g++)")
    build = tmp_path_factory.mktemp("cpp")
    import openvino
    openvino_dir = Path(openvino.__file__).parent / "cmake"  # the wheel's own CMake config
    subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DOpenVINO_DIR={openvino_dir}"], check=True, capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, timeout=600)
    return build / "torchship-run"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("cpp-io") / "inputs.safetensors"
    save_file({"image": dataset()["test"][0][:16]}, str(path))
    return path


@pytest.mark.parametrize("runtime", ["aoti", "torchscript", "openvino"])
def test_runs_a_bundle_without_python_and_matches_the_runner(binary, inputs, runtime, tmp_path):
    bundle = tmp_path / "bundle"
    optimize("zoo:digits-cnn", OptimizeOptions(runtimes=(runtime,), batch_sizes=(8,), seconds_per_size=0.05, transforms=()),
             out=bundle)
    out = tmp_path / "outputs.safetensors"
    done = subprocess.run([str(binary), str(bundle), str(inputs), str(out), "--repeat", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{runtime}: 16 items" in done.stdout
    got = load_file(str(out))
    expected = load_bundle(bundle, trust_code=True).runner({"image": load_file(str(inputs))["image"]})  # aoti: native code
    assert set(got) == set(expected) == {"logits"} and got["logits"].shape == (16, 10)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-4, atol=1e-4)


def test_bad_input_and_unsupported_bundle_are_one_line(binary, inputs, tmp_path, digits_bundle):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"pixels": np.zeros((2, 1, 28, 28), np.float32)}, str(wrong))
    bundle = tmp_path / "ts"
    optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("torchscript",), batch_sizes=(8,), seconds_per_size=0.05,
                                               transforms=()), out=bundle)
    out = tmp_path / "out.safetensors"
    done = subprocess.run([str(binary), str(bundle), str(wrong), str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and 'no tensor named "image"' in done.stderr and not out.exists()
    done = subprocess.run([str(binary), str(digits_bundle), str(inputs), str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--runtimes aoti" in done.stderr and not out.exists()
    done = subprocess.run([str(binary), str(bundle)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
