"""The layout holds: every module imports on its own, nothing imports upward, no cycles."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones; packages within one layer do not import each other.
LAYERS = {
    "pipeline.device": -1,  # the one device decision, below everything that places tensors
    "pipeline.config": 0, "pipeline.checkpoint": 0, "pipeline.guards": 0, "pipeline.interrupts": 0,
    "pipeline.data": 1,
    "pipeline.models": 2,
    "pipeline.train": 3,
    "pipeline.tracking": 4,
    "pipeline.stage1": 5, "pipeline.stage2": 5, "pipeline.gate": 5, "pipeline.evaluate": 5,
    "pipeline.pyfunc_models": 6,
    "steps": 7,
}


def _modules() -> dict[str, Path]:
    files = sorted(ROOT.glob("pipeline/**/*.py")) + sorted(ROOT.glob("steps/*.py"))
    names = {}
    for path in files:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        names[name.removesuffix(".__init__")] = path
    return names


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules `name` imports, at module or function level."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
                break
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> tuple[str, int]:
    room = next(r for r in sorted(LAYERS, key=len, reverse=True)
                if name == r or name.startswith(r + "."))
    return room, LAYERS[room]


def test_every_module_has_a_layer():
    for name in MODULES:
        if name not in ("pipeline",):
            assert _layer(name)


def test_nothing_imports_upward_or_sideways():
    bad = []
    for name, targets in GRAPH.items():
        if name == "pipeline":
            continue
        room, layer = _layer(name)
        for target in targets:
            if target == "pipeline":
                continue
            target_room, target_layer = _layer(target)
            if target_room != room and target_layer >= layer:
                bad.append(f"{name} (layer {layer}) imports {target} (layer {target_layer})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_steps_never_import_mlflow():
    for path in sorted(ROOT.glob("steps/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "mlflow" for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "mlflow", path


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    # The models-from-code files call mlflow.models.set_model: MLflow loads them by path.
    names = sorted(n for n in MODULES if ".pyfunc_models." not in n)
    if order == "reversed":
        names.reverse()
    code = "import importlib\nfor name in %r:\n    importlib.import_module(name)\n" % names
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
