"""The package's structure: no import cycles, and each layer imports only what it may.

The import graph is read from the source with ``ast`` (module-level and function-level imports
alike: a lazy import is still a dependency), so these tests need nothing installed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "image_classifier"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {
    _module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))
}


def _imports(module: str) -> Iterator[str]:
    """Every module of the package that ``module`` imports, anywhere in its code."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from package import submodule` depends on the submodule itself.
                candidate = f"{base}.{alias.name}"
                yield candidate if candidate in MODULES else base


def graph() -> dict[str, set[str]]:
    return {
        module: {name for name in _imports(module) if name in MODULES and name != module}
        for module in MODULES
    }


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_is_read() -> None:
    edges = graph()
    # Not vacuous: known dependencies are seen, lazy ones included.
    assert "image_classifier.preprocess" in edges["image_classifier.gateway.pipeline"]
    assert "image_classifier.servable" in edges["image_classifier.gateway.backends.local"]
    assert "image_classifier.cli.serve" in edges["image_classifier.cli"]


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    assert _cycle(graph()) is None


def _under(prefix: str) -> list[str]:
    return [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        # The protocol is a vocabulary: it knows no server, client or command line.
        (
            "image_classifier.tfserving",
            ("image_classifier.gateway", "image_classifier.model_server", "image_classifier.cli"),
        ),
        # Servers serve; the CLI and the supervisor start them, never the reverse.
        ("image_classifier.gateway", ("image_classifier.cli", "image_classifier.supervisor")),
        ("image_classifier.model_server", ("image_classifier.cli", "image_classifier.gateway")),
        # Serving does not depend on training.
        (
            "image_classifier.servable",
            ("image_classifier.export", "image_classifier.train", "image_classifier.model"),
        ),
    ],
)
def test_layers_import_only_downwards(layer: str, forbidden: tuple[str, ...]) -> None:
    edges = graph()
    offending = sorted(
        f"{module} -> {target}"
        for module in _under(layer)
        for target in edges[module]
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )
    assert not offending


@pytest.mark.parametrize("layer", ["image_classifier.gateway", "image_classifier.model_server"])
def test_servers_neither_parse_arguments_nor_start_processes(layer: str) -> None:
    offending = sorted(
        f"{module} imports {name}"
        for module in _under(layer)
        for name in _imports(module)
        if name.split(".")[0] in ("argparse", "subprocess", "multiprocessing")
    )
    assert not offending


def test_gateway_never_imports_tensorflow_at_module_level() -> None:
    # The local backend imports it inside a function, through servable; nothing else may.
    offending = []
    for module in _under("image_classifier.gateway"):
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        for node in tree.body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offending += [
                f"{module}: {n}" for n in names if n.split(".")[0] in ("tensorflow", "keras")
            ]
    assert not offending
