"""The package has no module-level import cycle, and every module imports on its own.

The graph is read from the source (ast), so a cycle fails here even when import order happens to
hide it at run time: an edge a -> b for every module-level `import` / `from ... import` of a's (those
inside functions and `if TYPE_CHECKING:` blocks run later or never, and do not count), to the
module named or, for `from package import name`, to the submodule `name` when there is one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each package's source lives (kernels/ is installed as rectok.kernels).
PACKAGE_DIRS = {"rectok": ROOT / "rectok", "rectok.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            found.setdefault(name, path)
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module):
    """import / from-import statements that run when the module is imported."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
        elif isinstance(node, ast.With):
            stack += node.body


def _edges(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        for target in targets:
            while target and target not in MODULES:  # `import rectok.x.y` names a module or a package
                target = target.rpartition(".")[0]
            # A module may import its own package (already importing, never a cycle of its making).
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_level_import_cycle():
    graph = {name: _edges(name, path) for name, path in MODULES.items()}
    assert len(graph) > 40 and sum(map(len, graph.values())) > 60  # the walk really read the package
    cycle = _find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    """The check above can fail: a cycle two edges deep is reported with its path."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    tree_with_cycle = ast.parse("from rectok.training import config\n")
    assert [n.module for n in _module_level_imports(tree_with_cycle)] == ["rectok.training"]


# Each module imported first: in one fresh interpreter (torch and the other libraries load once), every
# rectok module except the kernels (their torch.library ops register once per process) is dropped
# from sys.modules before the next one is imported on its own.
IMPORT_EACH_FIRST = """
import importlib, sys, traceback
failed = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.startswith("rectok") and not m.startswith("rectok.kernels")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(failed or "ok")
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_on_its_own():
    names = [n for n in MODULES if not n.endswith("__main__")]
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST, *names],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
