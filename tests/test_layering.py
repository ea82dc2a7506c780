"""Imports point one way, down the layers of ../shared/DESIGN.md, checked on the source with `ast`.

layout may use config; kernels layout and config; mesh config only; algorithms kernels, layout, config and mesh.
Only integrations/ (and the entry points __main__.py, demo.py) may import the training libraries.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_seqpar"
HEAVY = {"transformers", "accelerate", "peft", "trl", "datasets"}
ANY = None  # may import any layer
ALLOWED = {  # layer -> layers of hf_seqpar it may import
    "config": set(),
    "layout": {"config"},
    "kernels": {"kernels", "layout", "config"},
    "mesh": {"config"},
    "algorithms": {"algorithms", "kernels", "layout", "config", "mesh"},
    "memory": {"memory"},  # plain-torch memory savings (chunked loss, tiled MLP, offload), beside the attention stack
    "integrations": ANY,
    "__init__": ANY,
    "__main__": ANY,
    "demo": ANY,
    "estimate": {"estimate"},  # hf-seqpar estimate: arithmetic on a model config, imports nothing else of ours
}
MAY_IMPORT_HEAVY = {"integrations", "__main__", "demo"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module `source` imports (top level and inside functions); relative ones resolved."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            if node.module:
                found.add(base)
            else:  # `from .. import layout` imports the submodule hf_seqpar.layout
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")


def test_relative_imports_resolve():
    assert imported_modules("from ..layout import Segment", "hf_seqpar.kernels.mask", False) == {"hf_seqpar.layout"}
    assert imported_modules("from . import _compat", "hf_seqpar.kernels.blocks", False) == {
        "hf_seqpar.kernels._compat"
    }
    assert imported_modules("from .. import layout", "hf_seqpar.algorithms.api", False) == {"hf_seqpar.layout"}
    assert imported_modules("from .blocks import f", "hf_seqpar.kernels", True) == {"hf_seqpar.kernels.blocks"}
    assert imported_modules("def f():\n    import peft.tuners\n", "hf_seqpar.mesh", False) == {"peft.tuners"}


def test_the_scan_sees_the_package():
    found = dict(_sources())
    assert "hf_seqpar.layout" in found[PACKAGE / "kernels" / "plan.py"]
    assert "hf_seqpar.config" in found[PACKAGE / "mesh.py"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    module = _module_name(path)
    layer = _layer(module)
    assert layer in ALLOWED, f"{module} is in no layer of DESIGN.md; add its layer to ALLOWED in this test"
    imports = imported_modules(path.read_text(), module, path.name == "__init__.py")
    ours = {_layer(m) for m in imports if m.split(".")[0] == "hf_seqpar"}
    if ALLOWED[layer] is not ANY:
        assert ours <= ALLOWED[layer], f"{module} imports layers {sorted(ours - ALLOWED[layer])}"
    if layer not in MAY_IMPORT_HEAVY:
        heavy = sorted(m for m in imports if m.split(".")[0] in HEAVY)
        assert heavy == [], f"{module} imports {heavy}; only integrations/ may"


def _integration_imports() -> dict[str, set[str]]:
    """hf_seqpar.integrations.* -> the modules of hf_seqpar.integrations it imports (inside functions too)."""
    graph = {}
    for path, imports in _sources():
        module = _module_name(path)
        if module.startswith("hf_seqpar.integrations"):
            graph[module] = {m for m in imports if m.startswith("hf_seqpar.integrations") and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (a list that starts and ends with the same module), or None."""
    done, stack = set(), []

    def visit(node):
        if node in stack:
            return [*stack[stack.index(node) :], node]
        if node in done:
            return None
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt)
            if cycle:
                return cycle
        stack.pop()
        done.add(node)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_the_cycle_check_finds_a_function_level_circle():
    source = "def f():\n    from .b import x\n"
    graph = {"a": {m.rpartition(".")[2] for m in imported_modules(source, "p.a", False)}, "b": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]


def test_no_import_circles_in_integrations():
    graph = _integration_imports()
    assert "hf_seqpar.integrations.patches" in graph
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
