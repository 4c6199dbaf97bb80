"""Layers by construction: no module of megatron_solopo imports a module of a higher layer.

The layer table is docs/architecture.md's ("Rooms and their imports"); this test reads it from there, so
the doc and the check cannot drift apart: a package folder or top-level module missing from the table (or
a name in the table that no longer exists) fails here, and so does any upward import. Imports are found by
reading the source (ast, nothing is imported, no torch): module level and inside functions alike; only
imports under `if TYPE_CHECKING:` are skipped (annotations, never executed). Imports by a name computed at
run time (cli.py's command table, `importlib.import_module(name)`) are not seen.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_solopo"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@dataclasses.dataclass(frozen=True)
class UpwardImport:
    path: str
    """The importing file, relative to the package's parent, e.g. megatron_solopo/checkpoint/loader.py."""
    line: int
    imported: str
    """The imported module (dotted)."""
    layer: int
    imported_layer: int

    def __str__(self) -> str:
        return (f"{self.path}:{self.line}: layer {self.layer} imports {self.imported} "
                f"(layer {self.imported_layer})")


def layers_from_doc(text: str, section: str = "## Rooms and their imports") -> list[list[str]]:
    """The layer table of `section`: rows `| N | `name`, `name` | ... |`, lowest first, as lists of the names
    in backticks of the second cell (`room/`, `module.py`)."""
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", body, flags=re.MULTILINE)
    assert rows, f"no layer table under {section!r}"
    numbers = [int(number) for number, _ in rows]
    assert numbers == list(range(1, len(rows) + 1)), f"layer rows must be numbered 1..n in order: {numbers}"
    return [re.findall(r"`([^`]+)`", cell) for _, cell in rows]


def package_units(package: pathlib.Path) -> set[str]:
    """What the table must name: every folder holding Python files (`room/`) and top-level module
    (`module.py`) of the package."""
    units = {p.name for p in package.glob("*.py")}
    return units | {f"{d.name}/" for d in package.iterdir() if d.is_dir() and any(d.rglob("*.py"))}


def _unit(relative: pathlib.PurePath) -> str:
    """The table name a file belongs to (relative to the package folder): its top folder, or itself."""
    return relative.name if len(relative.parts) == 1 else relative.parts[0] + "/"


def _module_name(package: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, is_package: bool, package_name: str):
    """(line, imported module) for every import of the package's own modules, TYPE_CHECKING blocks skipped.
    `from a.b import c` yields a.b.c when c is a module (resolved later against the files), else a.b."""
    base = module if is_package else module.rpartition(".")[0]

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield node.lineno, alias.name, ()
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parent = base.split(".")[: len(base.split(".")) - node.level + 1]
                    target = ".".join(parent + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                yield node.lineno, target, tuple(alias.name for alias in node.names)
            yield from visit(ast.iter_child_nodes(node))

    for line, target, names in visit(tree.body):
        if target == package_name or target.startswith(package_name + "."):
            yield line, target, names


def upward_imports(package: pathlib.Path, layers: list[list[str]]) -> list[UpwardImport]:
    """Every import in `package` (a folder) of one of its modules that sits in a higher layer than the
    importer. Imports within one layer are allowed; a file whose unit no layer lists is an error."""
    layer_of = {name: number for number, names in enumerate(layers, start=1) for name in names}
    files = {_module_name(package, path): path for path in sorted(package.rglob("*.py"))}

    def layer(module: str) -> int:
        while module not in files:  # an attribute of a module (from pkg.mod import name): the module's layer
            assert "." in module, f"{module}: no such module in {package}"
            module = module.rpartition(".")[0]
        unit = _unit(files[module].relative_to(package))
        assert unit in layer_of, f"{files[module]}: {unit} is in no layer of the table"
        return layer_of[unit]

    found = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own = layer(module)
        for line, target, names in _imports(tree, module, path.name == "__init__.py", package.name):
            targets = [f"{target}.{name}" if f"{target}.{name}" in files else target for name in names] or [target]
            for imported in dict.fromkeys(targets):
                if layer(imported) > own:
                    found.append(UpwardImport(str(path.relative_to(package.parent)), line, imported, own,
                                              layer(imported)))
    return found


def folder_cycles(package: pathlib.Path) -> list[list[str]]:
    """Groups of two or more units (top folders, top-level modules) of `package` that import each other,
    directly or through others: the strongly connected components of the unit import graph, sorted."""
    files = {_module_name(package, path): path for path in sorted(package.rglob("*.py"))}

    def unit(module: str) -> str:
        while module not in files:
            module = module.rpartition(".")[0]
        return _unit(files[module].relative_to(package))

    edges: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for _, target, _ in _imports(tree, module, path.name == "__init__.py", package.name):
            edges.setdefault(unit(module), set()).add(unit(target))

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reach = {name: reachable(name) for name in edges}
    groups = {tuple(sorted(n for n in reach if n in reach[name] and name in reach[n])) for name in reach}
    return sorted(list(group) for group in groups if len(group) > 1)


# ------------------------------------------------------------------------------------------ the package
def test_the_doc_table_names_every_room_and_module_once():
    layers = layers_from_doc(ARCHITECTURE.read_text())
    listed = [name for names in layers for name in names]
    duplicates = sorted({name for name in listed if listed.count(name) > 1})
    assert not duplicates, f"docs/architecture.md lists these in more than one layer: {duplicates}"
    actual = package_units(PACKAGE)
    assert not actual - set(listed), f"add to the layer table of docs/architecture.md: {sorted(actual - set(listed))}"
    assert not set(listed) - actual, f"the layer table names what does not exist: {sorted(set(listed) - actual)}"


def test_no_module_imports_a_higher_layer():
    found = upward_imports(PACKAGE, layers_from_doc(ARCHITECTURE.read_text()))
    assert not found, "upward imports (docs/architecture.md, Rooms and their imports):\n" + "\n".join(map(str, found))


def test_no_import_cycle_between_folders():
    assert folder_cycles(PACKAGE) == []


LIGHT_MODULES = ("megatron_solopo.cli", "megatron_solopo.data", "megatron_solopo.plan",
                 "megatron_solopo.model.families", "megatron_solopo.versions", "megatron_solopo.bench.gpu_session",
                 "megatron_solopo.bench.gpu_session_sim", "megatron_solopo.bench.gpu_session_report",
                 "megatron_solopo.bench.probes", "megatron_solopo.bench.junit_live")
"""Imported without torch: `solopo --help` and command dispatch, the data package (docs/data.md), `solopo plan`'s
package (its heavy parts load on use), the architecture tables, and the GPU session's modules (started on the
GPU machine before megatron-core is installed: bench/__init__.py). Imports at the top of a file may not change
that."""


def test_light_modules_import_without_torch_or_megatron():
    code = (f"import sys\nimport {', '.join(LIGHT_MODULES)}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"{LIGHT_MODULES} now import {out.stdout.strip()}"


# ------------------------------------------------------------------------------------------ the checker
SYNTHETIC_DOC = """
## Rooms and their imports

| layer | rooms and modules | what |
| --- | --- | --- |
| 1 | `base.py` | foundation |
| 2 | `low/` | lower room |
| 3 | `high/`, `cmd/` | higher room, commands |

## Next
"""

SYNTHETIC_FILES = {
    "__init__.py": "",  # a top-level module the table does not name
    "base.py": "X = 1\n",
    "low/__init__.py": "",
    "low/a.py": """
        from typing import TYPE_CHECKING

        from pkg import base
        from pkg.low import b

        if TYPE_CHECKING:
            from pkg.high.c import C  # annotations only: allowed


        def late():
            from pkg.high import c  # the one upward import
            return c
        """,
    "low/b.py": "from . import a\nfrom ..base import X\n",
    "high/__init__.py": "",
    "high/c.py": "import pkg.low.a\nfrom pkg.low.b import name\nfrom ..low import a\nC = 1\n",
    "high/d.py": "from pkg.cmd import run  # same layer: allowed by the table, but a cycle with cmd/\n",
    "cmd/__init__.py": "from pkg.high import c\nrun = c\n",
}


def _write_package(tmp_path: pathlib.Path) -> pathlib.Path:
    package = tmp_path / "pkg"
    for name, text in SYNTHETIC_FILES.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(textwrap.dedent(text))
    return package


def test_checker_reports_exactly_the_upward_import(tmp_path):
    package = _write_package(tmp_path)
    (package / "__init__.py").unlink()  # a namespace package: every unit is in the table
    layers = layers_from_doc(SYNTHETIC_DOC)
    assert layers == [["base.py"], ["low/"], ["high/", "cmd/"]]
    assert package_units(package) == {"base.py", "low/", "high/", "cmd/"}
    found = upward_imports(package, layers)
    assert [(f.path, f.line, f.imported, f.layer, f.imported_layer) for f in found] == [
        ("pkg/low/a.py", 12, "pkg.high.c", 2, 3)]


def test_cycle_finder_reports_the_same_layer_cycle(tmp_path):
    # cmd/ <-> high/ (same layer), and low/ joins them through its upward import of pkg.high.c
    assert folder_cycles(_write_package(tmp_path)) == [["cmd/", "high/", "low/"]]


def test_checker_refuses_a_module_missing_from_the_table(tmp_path):
    package = _write_package(tmp_path)  # with pkg/__init__.py, which the table does not name
    assert "__init__.py" in package_units(package)
    with pytest.raises(AssertionError, match=r"__init__\.py is in no layer"):
        upward_imports(package, layers_from_doc(SYNTHETIC_DOC))
