"""The package's shape holds: imports run one way, no cycle (function-level imports included),
no module named in a string, transforms open no files, and every module says what it is for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

NAME = "tinybeauty_cli"
PACKAGE = ROOT / NAME

#: Which packages each package may import (besides itself). Imports run from the face to the core.
ALLOWED = {
    "core": set(),
    "coreml": {"core"},
    "runtime": {"core", "coreml"},
    "prune": {"core", "runtime"},
    "quantize": {"core", "runtime"},
    "export": {"core", "runtime", "coreml"},
    "measure": {"core", "runtime", "coreml"},
    "flow": {"core", "runtime", "coreml", "prune", "quantize", "export", "measure"},
    "cli": {"core", "runtime", "coreml", "prune", "quantize", "export", "measure", "flow"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package ``name`` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith(NAME):
                continue
            while t and t not in known:  # `from pkg import name`: the module is pkg
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n.endswith("__init__"):
                continue
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_run_one_way():
    wrong = []
    for module, deps in _graph().items():
        pkg = _package(module)
        if pkg not in ALLOWED:
            continue
        for dep in deps:
            other = _package(dep)
            if other and other != pkg and other not in ALLOWED[pkg]:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_reference_executors_import_only_the_spec_reader():
    graph = _graph()
    for module, deps in graph.items():
        if module.startswith(f"{NAME}.coreml.exec"):
            outside = {d for d in deps if not d.startswith((f"{NAME}.coreml.exec", f"{NAME}.core"))}
            assert outside <= {f"{NAME}.coreml.spec"}, f"{module} imports {sorted(outside)}"


def test_no_module_named_in_a_string():
    """No module of the package is imported by name at run time. The one ``importlib`` use allowed is
    ``--arch module:Class``, where the user names their own network's module."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert not [s for s in names if s.startswith(f"{NAME}.")], f"{path.name} names a module in a string"
        if path != PACKAGE / "core" / "artifact.py":
            text = path.read_text()
            for needle in ("importlib", "__import__(", "import_module("):
                assert needle not in text, f"{path.relative_to(PACKAGE.parent)} uses {needle}"


def test_every_module_says_what_it_is_for():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_no_reference_to_documents_outside_the_project():
    for path in list(PACKAGE.rglob("*.py")) + [PACKAGE.parent / "ARCHITECTURE.md"]:
        if path.exists():
            assert "DESIGN.md" not in path.read_text(), f"{path.name} cites a document the project does not have"


# ---------------------------------------------------------------- transforms open no file; flows fit in a head

#: Calls that open, read or write a file (or open a model from one).
FILE_FUNCTIONS = {"open", "io.open", "os.open", "torch.save", "torch.load", "torch.jit.save", "torch.jit.load",
                  "zipfile.ZipFile", "load_spec", "read_coreml", "stored_weights", "load_program", "open_runner",
                  "open_coreml_runner", "load_model", "save_artifact", "write_artifact", "write_file", "atomic_output"}
#: Methods that do the same on a path (``Path.read_bytes``, ``MLModel.save`` ...).
FILE_METHODS = {"save", "read_bytes", "write_bytes", "read_text", "write_text", "open", "unlink", "mkdir"}


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _file_calls(path: Path) -> list[str]:
    """Calls in ``path`` that touch a file. One whose first argument is an ``io.BytesIO`` (made there,
    or a name bound to one) works in memory and is not counted."""
    tree = ast.parse(path.read_text())
    in_memory = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                 and _dotted(n.value.func) == "io.BytesIO" for t in n.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name not in FILE_FUNCTIONS and not (isinstance(node.func, ast.Attribute) and node.func.attr in FILE_METHODS):
            continue
        first = node.args[-1] if name.endswith("save") and len(node.args) > 1 else (node.args[0] if node.args else None)
        if (isinstance(first, ast.Call) and _dotted(first.func) == "io.BytesIO") or \
                (isinstance(first, ast.Name) and first.id in in_memory):
            continue
        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}()")
    return found


def test_transforms_open_no_file():
    """prune/, quantize/ and export/ take a module and give one back: opening, reading and writing
    files is flow/'s."""
    calls = [c for pkg in ("prune", "quantize", "export") for p in sorted((PACKAGE / pkg).rglob("*.py"))
             for c in _file_calls(p)]
    assert not calls, "\n".join(calls)


def test_the_file_scan_sees_file_work():
    """The scan above finds what it looks for (flow/ does file work, and says so)."""
    calls = [c for p in sorted((PACKAGE / "flow").rglob("*.py")) for c in _file_calls(p)]
    assert any("write_file()" in c for c in calls) and any("atomic_output()" in c for c in calls), calls


#: The longest a function in flow/ may be, in lines (docstring and decorators included).
MAX_FLOW_FUNCTION_LINES = 80


def test_flow_functions_fit_in_a_head():
    long = []
    for path in sorted((PACKAGE / "flow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FLOW_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)
