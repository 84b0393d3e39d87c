"""The CLI: one line that says what is wrong, exit 2 for usage errors and 1 for failures, no traceback."""
import os

import pytest

from torchship.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, code, fragment", [
    (["optimize", "zoo:nothing"], 1, "choose one of: zoo:digits-cnn"),
    (["optimize", "tests.models:Tiny", "--input", "x:float32"], 2, "write NAME:DTYPE[DIM,...]"),
    (["optimize", "tests.models:Tiny", "--budget", "speed=9"], 2, "--budget"),
    (["optimize", "tests.models:Tiny", "--batch-sizes", "1,x"], 2, "comma-separated integers"),
    (["optimize", "tests.models:Tiny", "--runtimes", "tensorrt"], 2, "unknown runtime"),
    (["optimize", "tests.models:Broken", "--input", "x:float32[batch,8]"], 1, "fails on an example input"),
    (["optimize", "tests.models:Tiny", "--dim", "seq"], 2, "NAME=SIZE"),
    (["optimize", "tests.models:Tiny", "--train-epochs", "0"], 2, "--train-epochs must be at least 1"),
    (["optimize"], 2, "Missing argument"),
    (["bundle", "verify", "/nonexistent/b"], 2, "not a bundle"),
    (["optimize", "tests.models:Tiny", "--batch-sizes", "0"], 2, "--batch-sizes '0': give at least one positive integer"),
    (["optimize", "tests.models:Tiny", "--time-budget", "0"], 2, "--time-budget must be a positive number of seconds"),
    (["optimize", "tests.models:Tiny", "--lengths", "seq"], 2, "--lengths 'seq': write DIM=N,N,..."),
    (["optimize", "tests.models:Tiny", "--lengths", "seq=16,32"], 2, "'seq' is not a dynamic dimension of the model's inputs"),
    (["check", "tests.models:Tiny", "--workers", "0"], 2, "--workers must be at least 1, got 0"),
    (["perf", "127.0.0.1:9", "-m", "x", "--rate", "0"], 2, "--rate must be positive, got 0"),
    (["perf", "127.0.0.1:9", "-m", "x", "--duration", "0"], 2, "--duration must be between 0 and 3600 seconds"),
    (["perf", "127.0.0.1:9", "-m", "x", "--duration", "99999"], 2, "--duration must be between 0 and 3600 seconds"),
    # serve's settings are checked before any bundle is read or any port bound
    (["serve", "/nonexistent/b", "--workers", "0"], 2, "--workers and --procs must be at least 1, got 0 and 1"),
    (["serve", "/nonexistent/b", "--procs", "0"], 2, "--workers and --procs must be at least 1, got 1 and 0"),
    (["serve", "/nonexistent/b", "--max-body-mb", "0"], 2, "--max-body-mb and --max-json-mb must be positive"),
    (["serve", "/nonexistent/b", "--max-batch-size", "0"], 2, "--max-batch-size must be at least 1, got 0"),
    (["serve", "/nonexistent/b", "--max-queue", "0"], 2, "--max-queue must be at least 1, got 0"),
    (["serve", "/nonexistent/b", "--slo-ms", "0"], 2, "--slo-ms must be positive, got 0"),
    (["serve", "/nonexistent/b", "--timeout-ms", "-5"], 2, "--timeout-ms must be positive, got -5"),
    (["serve", "/nonexistent/b", "--drain-timeout", "0"], 2, "--drain-timeout must be a positive number of seconds"),
    (["serve", "/nonexistent/b", "--preferred-batch-sizes", "0"], 2, "--preferred-batch-sizes '0': give at least one"),
    (["serve", "/nonexistent/b", "--preferred-batch-sizes", "x"], 2, "write comma-separated integers, e.g. 1,8,32"),
    (["serve", "/nonexistent/b", "--max-items", "0"], 2, "--max-items, --max-item-kb and --max-image-mb must be positive"),
    (["serve", "/nonexistent/b", "--admin-token-file", "/nonexistent/token"], 2, "cannot read --admin-token-file"),
    (["serve", "/nonexistent/b", "--ray", "--procs", "2"], 2, "--procs is for one machine; on Ray Serve, scale with --replicas"),
    (["serve", os.path.dirname(__file__)], 2, "is neither a bundle nor a model repository"),
])
def test_errors_are_one_clear_line(capsys, args, code, fragment):
    import sys
    path = list(sys.path)
    got, out, err = run(capsys, *args)
    assert got == code
    # serve drops the current directory from the import path for its own process; a caller in Python keeps its own
    # (it once left this test process unable to start a variant of tests.models: "No module named 'tests'")
    assert sys.path == path
    assert fragment in " ".join((out + err).split())
    assert "Traceback" not in out + err


@pytest.mark.parametrize("command, text", [
    (["train"], "x_train/y_train/x_val/y_val[/x_test/y_test]"),
    (["serve"], "pip install 'torchship[ray]'"),
    (["optimize"], "x:float32[batch,3,28,28]"),
    (["inspect"], "NAME:DTYPE[DIMS]"),
    (["check"], "NAME:DTYPE[DIMS]"),
    (["perf"], "--concurrency"),
    (["bundle", "verify"], "bundle directory"),
])
def test_every_help_renders_as_written(capsys, command, text):
    """Help text is shown as written: rich markup once ate '[ray]' and crashed on '[/x_test/y_test]'."""
    code, out, err = run(capsys, *command, "--help")
    assert code == 0, err
    assert text in " ".join(out.split())


def test_an_error_with_brackets_is_printed_whole(capsys, tmp_path):
    code, out, err = run(capsys, "bundle", "verify", str(tmp_path / "b[nlp]"))
    assert code == 2 and "b[nlp]" in err and "Traceback" not in err


def test_unwritable_or_occupied_output_fails_before_any_work(capsys, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.tex").write_text("precious")
    code, out, err = run(capsys, "optimize", "tests.models:Tiny", "--out", str(occupied))
    assert code == 1 and "refusing to overwrite" in err and "loading" not in err
    assert (occupied / "thesis.tex").read_text() == "precious"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    code, out, err = run(capsys, "optimize", "tests.models:Tiny", "--out", str(a_file))
    assert code == 1 and "exists and is not a directory" in err and a_file.read_text() == "precious"
    code, out, err = run(capsys, "optimize", "tests.models:Tiny", "--out", str(a_file / "b"))  # root cannot either
    assert code == 1 and "cannot write to" in err and "it is a file" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root can write into a read-only directory; the case above holds for everyone
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, out, err = run(capsys, "optimize", "tests.models:Tiny", "--out", str(locked / "b"))
        assert code == 1 and "cannot write" in err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="not a built-in model"):
        main(["optimize", "zoo:nothing", "--debug"])


@pytest.mark.slow
def test_optimize_writes_bundle_then_verify_and_info(capsys, tmp_path):
    out = tmp_path / "b"
    code, stdout, err = run(capsys, "optimize", "tests.models:Tiny", "--runtimes", "eager,onnxrt",
                            "--batch-sizes", "1,4", "--out", str(out))
    assert code == 0, err
    assert "chose" in stdout and "onnxrt" in stdout and str(out) in stdout
    code, stdout, _ = run(capsys, "bundle", "verify", str(out))
    assert code == 0 and "ok" in stdout
    code, stdout, _ = run(capsys, "bundle", "info", str(out))
    assert code == 0 and '"runtime"' in stdout
    with open(out / "manifest.json", "a") as f:
        f.write(" ")
    (out / "report" / "report.md").write_text("tampered")
    code, stdout, err = run(capsys, "bundle", "verify", str(out))
    assert code == 2 and "report/report.md fails its checksum" in err


@pytest.mark.slow
def test_a_budget_nothing_meets_names_the_closest_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "b"
    code, stdout, err = run(capsys, "optimize", "tests.models:Noisy", "--runtimes", "eager,onnxrt", "--transforms", "none",
                            "--batch-sizes", "2", "--out", str(out))
    assert code == 1
    assert "no variant met the budget; closest:" in stdout and "no bundle was written" in err
    assert not out.exists()


@pytest.mark.slow
def test_training_data_adds_trained_variants_from_the_cli(capsys, tmp_path):
    code, stdout, err = run(capsys, "optimize", "zoo:digits-cnn", "--runtimes", "onnxrt", "--transforms", "channels",
                            "--train-data", "zoo:digits", "--train-epochs", "2", "--budget", "accuracy_drop=0.05",
                            "--batch-sizes", "8", "--out", str(tmp_path / "b"), "--json")
    assert code == 0, err
    import json
    rows = {v["name"]: v for v in json.loads(stdout)["variants"]}
    assert rows["onnxrt+channels30"]["training"]["epochs"] == 2 and rows["onnxrt+channels30"]["status"] == "ok"


def test_help_imports_no_torch(tmp_path):
    """`--help` of every command answers without importing torch (a slim install has none; it costs 2 s)."""
    import subprocess
    import sys
    script = ("import sys\nfrom torchship.cli import main\n"
              "for cmd in ([], ['optimize'], ['serve'], ['train'], ['inspect'], ['check'], ['perf'], ['demo'],\n"
              "            ['bundle'], ['bundle', 'verify'], ['bundle', 'info'], ['bundle', 'sign'], ['bundle', 'keygen']):\n"
              "    assert main([*cmd, '--help']) == 0, cmd\n"
              "    assert 'torch' not in sys.modules, cmd\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_the_train_cli_writes_weights_that_optimize_takes(capsys, tmp_path):
    code, out, err = run(capsys, "train", "zoo:digits-cnn", "--data", "zoo:digits", "--epochs", "2", "--patience", "0",
                         "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"model.safetensors", "metrics.csv", "summary.json"}
    assert "test_acc" in out + err and str(tmp_path / "run") in " ".join((out + err).split())
    code, out, err = run(capsys, "train", "zoo:digits-cnn", "--data", "zoo:digits", "--epochs", "0")
    assert code == 2 and "Traceback" not in err


@pytest.mark.slow
def test_the_demo_trains_optimizes_and_answers(capsys, tmp_path, monkeypatch):
    """`torchship demo` end to end, its search narrowed to one runtime (the full one is optimize's own tests)."""
    import sys
    opt = sys.modules["torchship.optimize"]  # the package (torchship.optimize is also the function's name)
    full = opt.OptimizeOptions
    monkeypatch.setattr(opt, "OptimizeOptions", lambda: full(runtimes=("onnxrt",), transforms=(), batch_sizes=(8,),
                                                             seconds_per_size=0.05))
    code, out, err = run(capsys, "demo", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    text = " ".join(out.split())
    predicted = [int(v) for v in text.split("predicts [")[1].split("]")[0].split(",")]
    labels = [int(v) for v in text.split("labels [")[1].split("]")[0].split(",")]
    assert len(predicted) == len(labels) == 16 and sum(p == y for p, y in zip(predicted, labels)) >= 14
    assert (tmp_path / "demo" / "manifest.json").exists() and "report:" in text
