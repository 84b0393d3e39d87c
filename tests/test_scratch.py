"""Temporary directories that do not outlive their process: a server's snapshots (hard links of its bundles) and an
optimize's workspace are removed by the next one made after their process was killed, never while it runs."""
import os
import signal
import subprocess
import sys
import tempfile

from torchship import scratch

HOLD = "from torchship import scratch; import sys; print(scratch.make(sys.argv[1]), flush=True); sys.stdin.read()"


def _holder(tmp_path, kind):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    path = proc.stdout.readline().strip()
    assert path.startswith(str(tmp_path)), path
    return proc, path


def test_a_killed_process_leaves_nothing_for_long_and_a_running_one_keeps_its_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed, left = _holder(tmp_path, "serve")
    running, kept = _holder(tmp_path, "serve-0")
    (tmp_path / "torchship-tests-mine").mkdir()  # not made here (no .held): never touched
    open(os.path.join(left, "model.onnx"), "w").close()
    try:
        killed.send_signal(signal.SIGKILL)  # no finally runs: the directory stays, its lock goes with the process
        killed.wait()
        assert os.path.isdir(left)
        mine = scratch.make("optimize")
        assert not os.path.exists(left) and os.path.isdir(kept) and (tmp_path / "torchship-tests-mine").is_dir()
        assert scratch.sweep() == []  # this process's own and the running one's are held
        scratch.remove(mine)
        assert not mine.exists()
    finally:
        running.communicate("")  # it ends without removing its directory: the next sweep does
    assert scratch.sweep() == [type(mine)(kept)] and not os.path.exists(kept)


def test_on_a_filesystem_without_locks_it_is_an_ordinary_temporary_directory(tmp_path, monkeypatch):
    import fcntl
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def no_locks(fd, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    made = scratch.make("serve")
    assert made.is_dir() and list(made.iterdir()) == [] and scratch.sweep() == []  # nothing to hold, nothing swept
    scratch.remove(made)
    assert not made.exists()
