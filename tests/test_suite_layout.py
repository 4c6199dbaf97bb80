"""The test suite's own layout: tests/ mirrors the package, and no folder shadows a shared fixture.

A folder's conftest.py that defines a fixture of the same name as tests/conftest.py silently changes what
the session-scoped fixtures built on it return for every later test (a tokenizer shadowed this way once
gave the shared tiny model another vocabulary, the cause of a CI failure). Read from the source (ast).
"""

from __future__ import annotations

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "megatron_solopo"
OUTSIDE_THE_PACKAGE = {"examples", "reliability"}
"""Test folders that mirror no package folder: the SLURM scripts under examples/, and the cross-room
failure drills (kills, full disks, bad input)."""


def fixture_names(conftest: pathlib.Path) -> set[str]:
    """Names of the functions decorated with `pytest.fixture` (called or not) in a conftest file."""
    names = set()
    for node in ast.parse(conftest.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if isinstance(target, ast.Attribute) and target.attr == "fixture":
                    names.add(node.name)
    return names


def test_no_folder_redefines_a_shared_fixture():
    shared = fixture_names(TESTS / "conftest.py")
    assert shared, "tests/conftest.py defines no fixture: the parser is wrong"
    for conftest in sorted(TESTS.glob("*/conftest.py")):
        again = fixture_names(conftest) & shared
        assert not again, f"{conftest.relative_to(TESTS.parent)} redefines {sorted(again)}: give them their own names"


def test_test_folders_mirror_the_package():
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert not folders - rooms - OUTSIDE_THE_PACKAGE, f"test folders with no package folder: {folders - rooms}"


def test_test_file_names_are_unique():
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
