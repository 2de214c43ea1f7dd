"""The import graph keeps the layout's rooms apart (docs/architecture.md, "Layout").

Every import in ``baton/``, ``supervisor/``, ``helper/`` and ``manager/`` is read with ``ast``, at module level
and inside functions (the lazy imports that keep start-up fast are imports all the same): ``baton`` imports none
of the other three, and ``helper``, ``supervisor`` and ``manager`` import one another without a cycle. A failure
names each import that breaks the rule, as ``file:line imports module``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from manager.build.release import CHECKOUT, PACKAGES

SHARED = "baton"
PROCESSES = tuple(p for p in PACKAGES if p != SHARED)
GENERATED = Path("baton") / "pb"  # protoc's output imports only itself and protobuf

Edges = dict[tuple[str, str], list[str]]


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in ``path``; relative ones stay in their package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def package_edges(root: Path, packages: tuple[str, ...]) -> Edges:
    """For each (importing package, imported package) of ``packages``, the imports that make it."""
    edges: Edges = defaultdict(list)
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            if rel.is_relative_to(GENERATED):
                continue
            for module, line in imports_of(path):
                target = module.split(".")[0]
                if target in packages and target != pkg:
                    edges[pkg, target].append(f"{rel}:{line} imports {module}")
    return edges


def cycle_imports(edges: Edges) -> list[str]:
    """The imports on any cycle between packages: an edge a -> b where b reaches a again."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        return False

    return [imp for (a, b), imps in sorted(edges.items()) if reaches(b, a) for imp in imps]


def test_baton_imports_none_of_helper_supervisor_and_manager():
    edges = package_edges(CHECKOUT, PACKAGES)
    offending = [imp for (a, _), imps in sorted(edges.items()) if a == SHARED for imp in imps]
    assert not offending, "baton/ is shared by every process and imports none of them:\n" + "\n".join(offending)


def test_helper_supervisor_and_manager_import_one_another_without_a_cycle():
    edges = package_edges(CHECKOUT, PACKAGES)
    between = {k: v for k, v in edges.items() if k[0] in PROCESSES and k[1] in PROCESSES}
    offending = cycle_imports(between)
    assert not offending, "a cycle between packages; move what both need into baton/:\n" + "\n".join(offending)


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_a_function_level_import_that_closes_a_cycle_is_named_with_its_file_and_line(tmp_path):
    _tree(tmp_path, {
        "helper/bridge.py": "import os\n\n\ndef serve():\n    from supervisor.front import Front\n",
        "supervisor/cli.py": "from helper.self_update import restart\n",
        "manager/cli.py": "from baton.config import Config\n",
        "baton/config.py": "",
    })
    offending = cycle_imports(package_edges(tmp_path, PACKAGES))
    assert offending == ["helper/bridge.py:5 imports supervisor.front",
                         "supervisor/cli.py:1 imports helper.self_update"]


def test_imports_in_one_direction_are_no_cycle(tmp_path):
    _tree(tmp_path, {
        "supervisor/cli.py": "import helper.self_update\nfrom manager.build import release\n",
        "helper/cli.py": "from baton import layout\n",
        "manager/cli.py": "",
        "baton/layout.py": "",
    })
    edges = package_edges(tmp_path, PACKAGES)
    assert set(edges) == {("supervisor", "helper"), ("supervisor", "manager"), ("helper", "baton")}
    assert cycle_imports(edges) == []
