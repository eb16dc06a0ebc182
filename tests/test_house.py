"""House rules of the package (issue 14), checked on the source: short functions, no module using
another's private names, plotting only in layerscope.plotting, the layout the README describes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "layerscope"
MODULES = sorted(SRC.rglob("*.py"))
STAGES = ["data", "engine", "analysis", "interventions", "plotting", "jobs"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, imported name, line) of every ``from X import name``, relative ones resolved."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    package = package or module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
    return found


def test_no_function_over_100_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > 100:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long, long


def test_no_module_imports_private_names_of_another():
    bad = [
        f"{path.relative_to(REPO)}:{line} {module}.{name}"
        for path in MODULES
        for module, name, line in imports(path)
        if module.startswith("layerscope") and name.startswith("_") and name != "__version__"
    ]
    assert not bad, bad


def test_only_the_plotting_package_draws():
    """matplotlib is imported under layerscope.plotting alone: compute modules return arrays."""
    drawing = [
        f"{path.relative_to(REPO)}:{line}"
        for path in MODULES
        for module, _, line in imports(path)
        if module.split(".")[0] == "matplotlib" and "plotting" not in path.relative_to(SRC).parts
    ]
    assert not drawing, drawing


@pytest.mark.parametrize("stage", STAGES)
def test_readme_stage_table_names_each_subpackage_and_its_modules(stage):
    """The README's stage table and the layout say the same thing: every subpackage is a row, and
    the modules the row names exist in it."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Stages") :].split("```")[1]
    rows = [line for line in table.splitlines() if f"{stage}/" in line]
    assert rows, f"no row for {stage}/ in the README's stage table"
    named = set(re.findall(r"\b([a-z_]+)\b", rows[0].split(f"{stage}/", 1)[1].split("  ")[1]))
    have = {p.stem for p in (SRC / stage).glob("*.py")}
    assert named and named <= have, (stage, named, have)


def test_every_subpackage_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert packages == set(STAGES)
    assert all(f"{p}/" in readme for p in packages)


def test_test_and_demo_helpers_are_not_in_the_package():
    for name in ("tiny_models", "testing", "vocab", "demo_model", "demo_data"):
        assert not list(SRC.rglob(f"{name}.py")), name
