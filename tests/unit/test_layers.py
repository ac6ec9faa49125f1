"""The structure keeps its shape: no import circle, and no import from a lower layer to a higher one.

The layer order is written down here, once (docs/architecture.md shows it; a test checks the two
agree). A module belongs to the first layer one of whose prefixes it starts with. Within a layer
any module may import any other, as long as no circle forms; across layers, only downwards.
Every import counts, also one inside a function or an `if TYPE_CHECKING:` block: a lazy import
is a dependency all the same.
"""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

from tests.helpers.cli import REPO

# Top to bottom. A module's layer is the first whose prefixes match its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("bpfs.__main__", "bpfs.cli", "broker.__main__", "broker.cli")),
    ("programs", ("bpfs.daemon", "bpfs.runtime", "broker")),
    ("partners", ("bpfs.peering",)),
    ("mount", ("bpfs.fs", "bpfs.snapview", "bpfs.fuseloop")),
    ("rendezvous", ("bpfs.rendezvous",)),
    ("snapshots", ("bpfs.snapshot", "bpfs.verify", "bpfs.history")),
    ("file data", ("bpfs.data", "bpfs.lanes", "bpfs.store", "bpfs.outbox")),
    ("transport", ("bpfs.net",)),
    ("storage", ("bpfs.index", "bpfs.packs", "bpfs.chunkmap", "bpfs.redolog", "bpfs.keyfile", "bpfs.config",
                 "bpfs.passphrase")),
    ("foundations", ("bpfs.crypto", "bpfs.packtree", "bpfs.chunker", "bpfs.identity", "bpfs.checked",
                     "bpfs.errors", "bpfs.fsutil", "bpfs")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("bpfs", "broker"):
        for path in (REPO / top).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from package import module` depends on the module, not on the package's face
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target not in ("bpfs", "broker"):
                    deps.add(target)
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/unit/test_layers.py")


def test_every_module_has_a_layer():
    for name in _modules():
        layer_of(name)


def test_no_import_circle():
    graph = _imports(_modules())
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


def test_no_import_runs_up_the_layers():
    graph = _imports(_modules())
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, deps in sorted(graph.items()) for b in sorted(deps) if layer_of(b) < layer_of(a)]
    assert not upward, "imports that run up the layers:\n  " + "\n  ".join(upward)


def test_the_architecture_document_shows_this_order():
    doc = (REPO / "docs" / "architecture.md").read_text()
    shown = re.findall(r"^\d+\. \*\*(.+?)\*\*", doc, flags=re.M)
    assert shown == [name for name, _ in LAYERS], f"docs/architecture.md lists {shown}"
