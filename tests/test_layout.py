"""The map of source modules to their tests in docs/development.md cannot drift: every module
under src/entityseg/ has a row, every row names a module that exists, and every test file a row
names exists."""

import ast
import re

from conftest import REPO

SRC = REPO / "src"
PAGE = REPO / "docs" / "development.md"
#: A table row: | `entityseg/x.py` | `tests/...py`, ... |
ROW = re.compile(r"^\|\s*`(entityseg/[\w/]+\.py)`\s*\|(.*)\|\s*$")
TEST_FILE = re.compile(r"`(tests/[\w/]+\.py)`")


def source_modules() -> set[str]:
    """``entityseg/...py`` of every module, less the packages' ``__init__.py`` files that hold a
    docstring and nothing else (the page says so)."""
    modules = set()
    for path in SRC.joinpath("entityseg").rglob("*.py"):
        body = ast.parse(path.read_text()).body
        docstring_only = all(
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body
        )
        if not (path.name == "__init__.py" and docstring_only):
            modules.add(path.relative_to(SRC).as_posix())
    return modules


def mapped() -> dict[str, list[str]]:
    """Module -> the test files its row names, from the page's table."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        if match := ROW.match(line):
            module, cells = match.groups()
            assert module not in rows, f"{module}: two rows"
            rows[module] = TEST_FILE.findall(cells)
    return rows


def test_every_source_module_has_a_row_and_every_row_a_module():
    rows, modules = mapped(), source_modules()
    assert not modules - rows.keys(), f"add rows to {PAGE.name} for these modules"
    assert not rows.keys() - modules, f"rows of {PAGE.name} for modules that do not exist"


def test_every_named_test_file_exists():
    for module, tests in mapped().items():
        assert tests, f"{module}: its row names no test file"
        missing = [name for name in tests if not (REPO / name).is_file()]
        assert not missing, f"{module}: {missing} do not exist"
