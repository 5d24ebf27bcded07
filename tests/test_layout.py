"""The code's shape that docs/layout.md describes: the crnn modules import one another along a
ladder, never in a circle."""

import ast

from tests.helpers import REPO


def imported_crnn_modules(path, modules) -> set[str]:
    """The crnn modules that `path` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from crnn.data import synthetic` imports the submodule; `from crnn.data import Vocab`, the package
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_no_two_modules_import_each_other():
    paths = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
             for path in (REPO / "crnn").rglob("*.py")}
    graph = {module: imported_crnn_modules(path, paths) - {module} for module, path in paths.items()}
    assert graph["crnn.trainer"] >= {"crnn.engine", "crnn.config"}  # the graph is read, not empty

    def reaches(start, goal, seen):
        for module in graph[start] - seen:
            seen.add(module)
            if module == goal or reaches(module, goal, seen):
                return True
        return False

    circles = sorted(module for module in graph if reaches(module, module, set()))
    assert circles == [], f"modules on an import circle: {circles}"
