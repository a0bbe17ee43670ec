"""The package's layering (docs/architecture.md) holds in the code: every import in aqua_cli, including the
ones inside functions, goes to the importer's layer or a lower one, and no modules import in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aqua_cli"


def layers() -> dict[str, int]:
    """Top-level module or subpackage -> layer, from the table in docs/architecture.md."""
    table: dict[str, int] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            for name in re.findall(r"`([\w.]+)`", match.group(2)):
                table[name] = int(match.group(1))
    return table


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Modules of aqua_cli that ``path`` imports (relative imports, resolved; ``from . import x`` of a
    module counts as that module, of a name as the package)."""
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" and me != ["__init__"] else me[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if node.module:
                found.add(".".join(target))
            else:
                for alias in node.names:
                    candidate = ".".join([*target, alias.name])
                    as_module = PACKAGE.joinpath(*candidate.split(".")).with_suffix(".py")
                    found.add(candidate if as_module.exists() else ".".join(target) or "__init__")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aqua_cli"):
            found.add(node.module.removeprefix("aqua_cli").lstrip(".") or "__init__")
    return {f for f in found if f != module_name(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def top(name: str) -> str:
    return name.split(".")[0] or "__init__"


def test_the_table_names_every_module():
    table = layers()
    names = {top(m) for m in graph()}
    assert names - set(table) == set(), "modules missing from docs/architecture.md's layer table"
    assert set(table) - names == set(), "the layer table names modules that do not exist"


def upward_imports(g: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    return [
        f"{src} (layer {table[top(src)]}) imports {dst} (layer {table[top(dst)]})"
        for src, targets in g.items()
        for dst in targets
        if table[top(dst)] > table[top(src)]
    ]


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Import circles between files (a package's ``__init__`` re-exporting its own modules is not one)."""
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if nxt not in g or nxt == node.rsplit(".", 1)[0]:
                continue
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_goes_up_a_layer():
    assert upward_imports(graph(), layers()) == []


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_checks_see_a_circle_and_an_upward_import():
    """The two checks can fail: the format importing the registry, which imports the format back."""
    fake = {"artifact": {"registry", "errors"}, "registry": {"artifact"}, "errors": set()}
    assert upward_imports(fake, layers()) == ["artifact (layer 3) imports registry (layer 5)"]
    assert circles(fake) == [["artifact", "registry", "artifact"]]
