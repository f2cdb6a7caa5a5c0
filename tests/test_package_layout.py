"""The package's layout: subpackages that follow the pipeline, imports that point one way.

Every ``import equipet...`` and ``from equipet... import ...`` in the package is read (also those
inside functions, which are imports all the same). A module may import its own subpackage and
the layers below its own; the core modules (errors, files, device, config, cli, metrics, runs)
import only each other. No module may reach itself through its imports (no import circle).
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "equipet"
#: the layers, lowest first; a module imports only from its own subpackage or lower layers
LAYERS = {"": 0, "simulation": 1, "networks": 1, "reconstruction": 2, "brain": 2, "assisted": 3, "study": 4,
          "commands": 5}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from equipet.x import y`` counts y when y is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "equipet":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    out.discard("equipet")
    return out & modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = sorted(package.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in files}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of another subpackage that is not in a lower layer."""
    wrong = []
    for mod, deps in graph.items():
        own = subpackage(mod)
        for dep in deps:
            other = subpackage(dep)
            if other != own and not LAYERS[other] < LAYERS[own]:
                wrong.append(f"{mod} -> {dep}")
    return sorted(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a closed path of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_subpackage_has_a_layer():
    assert {subpackage(m) for m in import_graph()} == set(LAYERS)


def test_imports_point_down_the_layers():
    wrong = upward_imports(import_graph())
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """Both checks on made-up graphs: a circle is found, an upward import is named."""
    assert find_cycle({"equipet.a": {"equipet.b"}, "equipet.b": {"equipet.a"}}) == ["equipet.a", "equipet.b", "equipet.a"]
    assert find_cycle({"equipet.a": {"equipet.b"}, "equipet.b": set()}) is None
    up = {"equipet.simulation.scanner": {"equipet.study.claims"}, "equipet.study.claims": set()}
    assert upward_imports(up) == ["equipet.simulation.scanner -> equipet.study.claims"]
    assert upward_imports({"equipet.study.claims": {"equipet.simulation.scanner"}}) == []
