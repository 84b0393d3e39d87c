"""The house: no import cycle between files or packages, every module imports alone in dependency order, the
serving path imports no torch, and install hints name extras that exist."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "torchship"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> torchship modules it imports, anywhere in the file (imports inside functions count)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` names the submodule; `from pkg import name` names pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `from .x import name` names an attribute, not a module
                    t = t.rpartition(".")[0]
                if t.startswith("torchship") and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _packages(graph):
    """The graph between torchship's top-level packages and modules; the package face (torchship/__init__.py),
    which only hands names on, is left out."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        if m == "torchship":
            continue
        out.setdefault(top(m), set()).update(top(d) for d in deps if d != "torchship" and top(d) != top(m))
    return out


def test_no_import_cycle_between_files():
    cycle = find_cycle({m: d - {"torchship"} for m, d in import_graph().items() if m != "torchship"})
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    cycle = find_cycle(_packages(import_graph()))
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _order(graph):
    done, order = set(), []

    def visit(n):
        if n in done:
            return
        done.add(n)
        for m in sorted(graph.get(n, ())):
            visit(m)
        order.append(n)
    for n in sorted(graph):
        visit(n)
    return order


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    """Leaves first: each import finds what it needs already importable, and no module needs one above it."""
    graph = {m: d - {"torchship"} for m, d in import_graph().items() if m != "torchship"}
    optional = {"torchship.serve.ray"}  # imports ray only when called; the module itself is light
    order = [m for m in _order(graph) if m not in optional]
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % order
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_serving_path_and_help_import_no_torch():
    code = ("import sys, torchship, torchship.bundle, torchship.serve, torchship.runtimes.onnxrt, torchship.cli\n"
            "from torchship.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'lightning', 'sklearn', 'matplotlib') if m in sys.modules]\n"
            "print(heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_install_hints_name_extras_that_exist():
    from torchship.errors import EXTRAS, MissingExtra
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert set(EXTRAS) <= declared
    named = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MissingExtra":
                extra = node.args[1] if len(node.args) > 1 else None
                if isinstance(extra, ast.Constant):
                    named.add(extra.value)
    assert named and named <= set(EXTRAS), named - set(EXTRAS)
    with pytest.raises(ValueError, match="does not define"):
        MissingExtra("onnxruntime", "onnx")


def test_a_missing_package_is_the_line_naming_its_extra_and_every_extra_it_names_installs_it():
    from torchship.errors import PACKAGE_EXTRAS, MissingExtra, missing_extra
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    found = missing_extra(ModuleNotFoundError("No module named 'torch.nn'", name="torch.nn"), "the eager runtime")
    assert isinstance(found, MissingExtra) and str(found) == (
        "torch (for the eager runtime) is not installed; install it with: pip install 'torchship[torch]'")
    other = ModuleNotFoundError("No module named 'mypkg'", name="mypkg")
    assert missing_extra(other, "x") is other  # the user's own module missing: not an extra's
    pip_names = {"sklearn": "scikit-learn", "torch_pruning": "torch-pruning", "ray": "ray[serve]",
                 "tritonclient": "tritonclient[grpc]", "grpc": "grpcio"}
    for module, extra in PACKAGE_EXTRAS.items():
        wanted = pip_names.get(module, module)
        assert any(req.split(">")[0].split(";")[0] == wanted for req in extras[extra]), (module, extra)


def test_library_code_never_prints():
    """Library code reports through its return values, errors, progress callbacks and the 'torchship' logger:
    a print would corrupt `optimize --json` on stdout."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_readme_architecture_names_every_module():
    """Every top-level module and package of src/torchship has its line in the README's architecture table, and
    the table names nothing that does not exist."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    import re
    listed = set(re.findall(r"^\| `([a-z_]+(?:\.py|/))` \|", section, re.M))
    present = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert listed == present
