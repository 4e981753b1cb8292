"""Thin entry points: the command lines import the library, never each other, and only they
(and the decorator they share) turn errors into exits."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "entityseg"

#: The command-line modules (``python -m ...``).
ENTRY_POINTS = {
    "entityseg.train",
    "entityseg.evaluate",
    "entityseg.predict",
    "entityseg.export",
    "entityseg.demo",
    "entityseg.convert_release",
    "entityseg.app.__main__",
    "entityseg.data.preview",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST) -> set[str]:
    """Every ``entityseg`` module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("entityseg")}


MODULES = {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def test_the_entry_points_exist():
    assert set(MODULES) >= ENTRY_POINTS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_an_entry_point(name):
    tree = ast.parse(MODULES[name].read_text())
    imported = imported_modules(tree) & (ENTRY_POINTS - {name})
    assert not imported, f"{name} imports the entry point(s) {sorted(imported)}"


def raised_exits(tree: ast.AST) -> list[int]:
    """Lines that raise SystemExit outside ``if __name__ == "__main__":``."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            guarded |= {id(child) for child in ast.walk(node)}
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Raise)
        and node.exc is not None
        and "SystemExit" in ast.unparse(node.exc)
        and id(node) not in guarded
    ]


@pytest.mark.parametrize("name", sorted(set(MODULES) - ENTRY_POINTS))
def test_libraries_raise_and_never_exit(name):
    lines = raised_exits(ast.parse(MODULES[name].read_text()))
    if name == "entityseg.config":  # exits_on_config_error: the entry points' decorator
        assert len(lines) == 2
        return
    assert not lines, f"{name} raises SystemExit at line(s) {lines}: raise an error instead"
