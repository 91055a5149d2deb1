"""The package's shape: imports point one way, modules and functions stay small enough to read.

These are the restructuring's rules (docs/design.md), checked on the source so a change that breaks
one fails here with the module and line to look at.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import yaml

import raytl.trial

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "raytl"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LAZY_IMPORTS_ALLOWED = {
    "raytl.cli"
}  # one short function per command; imports kept lazy for start-up
LONG_FUNCTIONS_ALLOWED = {("raytl.cli", "build_parser")}  # an argparse builder: one line per flag


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def raytl_imports(tree: ast.AST) -> list[tuple[ast.ImportFrom | ast.Import, str]]:
    """Every import of one of raytl's modules in ``tree``, with the module it names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raytl"):
            targets = [f"{node.module}.{a.name}" for a in node.names]
            found += [(node, t) for t in targets if t in MODULES] or [(node, node.module)]
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names if a.name.startswith("raytl")]
    return found


def test_no_import_cycles():
    graph = {
        name: {t for _, t in raytl_imports(tree) if t in MODULES and t not in (name, "raytl")}
        for name, tree in MODULES.items()
    }
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_modules_and_functions_are_short():
    lines = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}
    long_functions = [
        (name, node.name, node.end_lineno - node.lineno + 1)
        for name, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and (name, node.name) not in LONG_FUNCTIONS_ALLOWED
    ]
    assert long_functions == []


def test_no_module_imports_another_modules_private_names():
    private = [
        (name, node.lineno, alias.name)
        for name, tree in MODULES.items()
        for node, _ in raytl_imports(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert private == []


def test_raytl_imports_are_at_module_top():
    lazy = [
        (name, node.lineno)
        for name, tree in MODULES.items()
        if name not in LAZY_IMPORTS_ALLOWED
        for node, _ in raytl_imports(tree)
        if node.col_offset > 0
    ]
    assert lazy == []


def test_readme_space_example_is_the_shipped_quickstart():
    """The README shows search_spaces/quickstart.yaml itself, not a sketch that drifted from it."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### The space file", 1)[1]
    example = section.split("```yaml", 1)[1].split("```", 1)[0]
    shipped = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    assert yaml.safe_load(example) == shipped


def test_the_one_import_by_name_names_the_train_loop():
    """raytl.trial imports the module that trains a trial's units by name, when a trial first
    trains (so the Tune trial's process of a worker-group trial never imports timm): the name
    must stay that module's, with the two functions it calls there."""
    module = MODULES[raytl.trial.TRAIN_LOOP]
    functions = {n.name for n in module.body if isinstance(n, ast.FunctionDef)}
    assert {"train_loop_per_worker", "run_lean_trial"} <= functions
