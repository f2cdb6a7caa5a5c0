"""The package's layout: subpackages that follow the pipeline, imports that point one way.

Every ``import equipet...`` and ``from equipet... import ...`` in the package is read (also those
inside functions, which are imports all the same). A module may import its own subpackage and
the layers below its own; the core modules (errors, files, device, config, cli, metrics, runs)
import only each other. No module may reach itself through its imports (no import circle).
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "equipet"
BENCHMARKS = PACKAGE.parent / "benchmarks"
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


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _bound_names(node: ast.stmt) -> set[str]:
    """The module-level names one top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.If, ast.Try, ast.With)):
        return {n for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt) for n in _bound_names(child)}
    return set()


def unbound_main_calls(source: str) -> list[str]:
    """Names a ``__main__`` block calls that the module has not bound above it (builtins allowed)."""
    bound = set(dir(builtins))
    missing = []
    for node in ast.parse(source).body:
        if _is_main_guard(node):
            for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                if isinstance(call.func, ast.Name) and call.func.id not in bound:
                    missing.append(call.func.id)
        bound |= _bound_names(node)
    return missing


def test_main_blocks_call_what_the_module_defines():
    files = sorted(PACKAGE.rglob("*.py")) + sorted(BENCHMARKS.glob("*.py"))
    wrong = {str(p.relative_to(PACKAGE.parents[1])): m for p in files if (m := unbound_main_calls(p.read_text()))}
    assert not wrong, f"__main__ blocks that call names not defined above them: {wrong}"


def test_the_main_block_check_can_fail():
    assert unbound_main_calls('if __name__ == "__main__":\n    main()\n\ndef main():\n    pass\n') == ["main"]
    assert unbound_main_calls('from x import main\nif __name__ == "__main__":\n    main()\n') == []
    assert unbound_main_calls('def main():\n    pass\nif __name__ == "__main__":\n    raise SystemExit(main())\n') == []


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
