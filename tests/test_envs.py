"""The per-rule conda environments (envs/*.yaml) hold what each rule's script needs, pinned.

conda cannot be installed on our machines, so ``snakemake --use-conda`` is never run here; these
tests check statically what would otherwise only fail on a user's machine:

* every rule that runs a script names a conda env file that exists;
* for each rule, the third-party distributions its script can reach are pinned in that rule's env.
  "Reach" is an AST walk, not a guess from file names: the script's imports, then for every
  ``layerscope`` function, class or module-level name it uses, that definition's own imports
  (imports inside functions included) and the ``layerscope`` names it uses, transitively; loading a
  module also counts its module-level imports and code. So a core rule that uses
  ``analysis.activation_stats_table`` is not charged with the torch import inside
  ``analysis.patching_experiment``, but would be the moment any function it calls imports torch.
  Imports under ``try: ... except ImportError`` are optional and not required. Limits: names
  reached only through ``getattr``/strings are not followed, and method calls are covered by
  charging a class with all of its methods.
* the rule is strict: a distribution counts only if the env file pins it itself (conda
  ``name=version`` or pip ``name==version``). Being pulled in by another package, or by the
  project's own pyproject dependencies through the env's ``pip: -e`` line, does not count: that is
  how an unpinned version would slip in;
* every env pins exact versions, the pins satisfy pyproject's ranges, and every pyproject
  requirement that the env's ``-e`` install asks for is pinned in the env (so pip only installs the
  project itself, plus whatever the pinned packages depend on);
* the ``model`` extra (torch stack) is really optional: no layerscope module imports it at import
  time, and the ``test`` extra still brings it in for ``pip install -e ".[test]"``.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PKG = "layerscope"
SRC = ROOT / "src" / PKG
ENVS = ROOT / "envs"
RULE_FILES = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]
# Snakemake copies an env file to <conda prefix>/<hash>.yaml before `conda env create`, and conda
# runs
# pip from that file's folder; with the default prefix that is .snakemake/conda/ under the working
# directory (the repo root, where the Snakefile is).
SNAKEMAKE_ENV_COPY_DIR = ROOT / ".snakemake" / "conda"

# Top-level import name -> PyPI distribution. Every third-party import must be listed here, so a new
# dependency is a conscious decision (add it here, to pyproject, and to the env of each rule using
# it).
IMPORT_TO_DIST = {
    "cycler": "cycler",
    "h5py": "h5py",
    "jsonschema": "jsonschema",
    "matplotlib": "matplotlib",
    "numpy": "numpy",
    "pandas": "pandas",
    "psutil": "psutil",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "snakemake": "snakemake",
    "threadpoolctl": "threadpoolctl",
    "tokenizers": "tokenizers",
    "torch": "torch",
    "transformer_lens": "transformer-lens",
    "transformers": "transformers",
    "yaml": "pyyaml",
}
# conda-forge package name -> the PyPI distribution it installs (same name unless listed).
CONDA_TO_DIST = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "matplotlib-base": "matplotlib",
}
# Conda packages that are not Python distributions of the project's dependencies.
CONDA_TOOLING = {"python", "pip"}
MODEL_EXTRA = "model"


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    name: str
    file: Path
    conda: str | None
    script: str | None

    @property
    def env_path(self) -> Path | None:
        # Snakemake resolves conda: and script: paths relative to the file that defines the rule.
        return (self.file.parent / self.conda).resolve() if self.conda else None

    @property
    def script_path(self) -> Path | None:
        return (self.file.parent / self.script).resolve() if self.script else None


_RULE_START = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:", re.M)
# `use rule A as B with:` -> B inherits A's conda: and script: unless its block overrides them.
_USE_RULE = re.compile(r"^use\s+rule\s+(\w+)\s+as\s+(\w+)(?:\s+with)?\s*:?", re.M)


def _directive(block: str, name: str) -> str | None:
    """The string argument of ``name:`` in a rule block (same line or the next indented line)."""
    m = re.search(rf"^\s+{name}:\s*(?:\n\s+)?(['\"])(.+?)\1\s*,?\s*$", block, re.M)
    if m:
        return m.group(2)
    if re.search(rf"^\s+{name}:", block, re.M):
        raise AssertionError(f"{name}: is not a plain string literal in\n{block}")
    return None


def _block(text: str, pos: int) -> str:
    """A rule body: its indented lines, up to the next unindented non-empty line."""
    rest = text[pos:]
    end = re.search(r"^\S", rest, re.M)
    return rest[: end.start()] if end else rest


def parse_rules(text: str, file: Path) -> list[Rule]:
    rules = {}
    for m in _RULE_START.finditer(text):
        block = _block(text, m.end())
        rules[m.group(1)] = Rule(
            m.group(1), file, _directive(block, "conda"), _directive(block, "script")
        )
    for m in _USE_RULE.finditer(text):
        base, name = m.group(1), m.group(2)
        assert base in rules, (
            f"{file}: use rule {base} as {name}: {base} is not defined in the same file"
        )
        block = _block(text, m.end())
        rules[name] = Rule(
            name,
            file,
            _directive(block, "conda") or rules[base].conda,
            _directive(block, "script") or rules[base].script,
        )
    return list(rules.values())


@cache
def workflow_rules() -> tuple[Rule, ...]:
    return tuple(r for f in RULE_FILES for r in parse_rules(f.read_text(), f))


def script_rules() -> list[Rule]:
    return [r for r in workflow_rules() if r.script]


# --------------------------------------------------------------------------- env files


@dataclass
class Env:
    path: Path
    conda: dict[str, str] = field(default_factory=dict)  # conda package -> pinned version
    pip: dict[str, str] = field(default_factory=dict)  # canonical dist -> pinned version
    editables: list[str] = field(default_factory=list)  # the -e targets, verbatim
    problems: list[str] = field(default_factory=list)  # unpinned or unparsable entries

    def pinned_dists(self) -> dict[str, str]:
        """Canonical PyPI distribution -> pinned version, from both sections."""
        out = {
            canonicalize_name(CONDA_TO_DIST.get(n, n)): v
            for n, v in self.conda.items()
            if n not in CONDA_TOOLING
        }
        out.update(self.pip)
        return out


_CONDA_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)\s*==?\s*([0-9][A-Za-z0-9_.+]*)$")


def parse_env(spec: dict, path: Path) -> Env:
    env = Env(path)
    for dep in spec.get("dependencies") or []:
        if isinstance(dep, dict):
            for line in dep.get("pip", []):
                line = str(line).strip()
                if line.startswith("-e"):
                    env.editables.append(line[2:].strip())
                    continue
                try:
                    req = Requirement(line)
                except Exception:
                    env.problems.append(f"pip entry {line!r} is not a requirement")
                    continue
                specs = list(req.specifier)
                if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
                    env.problems.append(f"pip entry {line!r} is not pinned with ==")
                    continue
                env.pip[canonicalize_name(req.name)] = specs[0].version
            continue
        m = _CONDA_PIN.match(str(dep).strip())
        if not m:
            env.problems.append(f"conda entry {dep!r} is not pinned as name=version")
            continue
        env.conda[m.group(1).lower()] = m.group(2)
    return env


@cache
def load_env(path: Path) -> Env:
    return parse_env(yaml.safe_load(path.read_text()), path)


# --------------------------------------------------------------------------- pyproject


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def project_requirements(extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """What `pip install <project>[extras]` asks for (self-references to the project expanded)."""
    proj = pyproject()
    reqs, todo, seen = [], [Requirement(r) for r in proj["dependencies"]], set()
    for extra in extras:
        todo += [Requirement(r) for r in proj.get("optional-dependencies", {})[extra]]
    while todo:
        req = todo.pop()
        if canonicalize_name(req.name) == canonicalize_name(proj["name"]):
            for extra in req.extras - seen:
                seen.add(extra)
                todo += [Requirement(r) for r in proj["optional-dependencies"][extra]]
            continue
        reqs.append(req)
    return reqs


def declared_dists() -> set[str]:
    proj = pyproject()
    reqs = [
        *proj["dependencies"],
        *(r for rs in proj.get("optional-dependencies", {}).values() for r in rs),
    ]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


# --------------------------------------------------------------------------- reachability


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


class _Scan(ast.NodeVisitor):
    """Imports, loaded names and dotted attribute chains of a piece of code (annotations
    skipped)."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.third_party: set[str] = set()
        self.optional: set[str] = set()  # imported inside `try: ... except ImportError:`
        self._guarded = 0
        self.loads: set[str] = set()  # package modules whose import this code triggers
        self.bindings: dict[
            str, tuple[str, str | None]
        ] = {}  # local name -> (module, attr or None)
        self.chains: set[tuple[str, ...]] = set()

    # imports
    def _package_base(self, level: int, module: str | None) -> str:
        parts = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
        if level > 1:
            parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([module] if module else []))

    def _third_party(self, name: str) -> None:
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top != "__future__":
            (self.optional if self._guarded else self.third_party).add(top)

    def visit_Try(self, node: ast.Try) -> None:
        caught = {
            n.id
            for h in node.handlers
            if h.type is not None
            for n in ast.walk(h.type)
            if isinstance(n, ast.Name)
        }
        guarded = bool(caught & {"ImportError", "ModuleNotFoundError"})
        self._guarded += guarded
        for stmt in node.body:
            self.visit(stmt)
        self._guarded -= guarded
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    visit_TryStar = visit_Try

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == PKG:
                self.loads.add(alias.name)
                if alias.asname:
                    self.bindings[alias.asname] = (alias.name, None)
                else:
                    self.bindings[PKG] = (PKG, None)
            else:
                self._third_party(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._package_base(node.level, node.module) if node.level else (node.module or "")
        if base.split(".")[0] != PKG:
            self._third_party(base)
            return
        self.loads.add(base)
        for alias in node.names:
            local = alias.asname or alias.name
            if f"{base}.{alias.name}" in package_modules():
                self.loads.add(f"{base}.{alias.name}")
                self.bindings[local] = (f"{base}.{alias.name}", None)
            else:
                self.bindings[local] = (base, alias.name)

    # names
    def visit_Name(self, node: ast.Name) -> None:
        self.chains.add((node.id,))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name):
            self.chains.add((cur.id, *reversed(chain)))
        else:
            self.generic_visit(node)

    # things that are not executed
    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node):
            self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:  # annotations of parameters
        pass

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        for child in (node.target, node.value):
            if child is not None:
                self.visit(child)

    def _visit_def(self, node) -> None:
        for child in [
            *node.decorator_list,
            *node.args.defaults,
            *node.args.kw_defaults,
            *node.body,
        ]:
            if child is not None:
                self.visit(child)

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_def


@dataclass
class _Module:
    name: str
    defs: dict[str, list[ast.AST]]  # top-level def/class/assigned name -> the code that defines it
    on_load: list[ast.AST]  # module-level code run at import (def/class bodies excluded)
    is_package: bool


def _targets(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def _parse_module(name: str, path: Path) -> _Module:
    tree = ast.parse(path.read_text(), str(path))
    defs: dict[str, list[ast.AST]] = {}
    on_load: list[ast.AST] = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.setdefault(stmt.name, []).append(stmt)
            # Decorators, defaults, base classes and class-level statements run at import.
            on_load += stmt.decorator_list
            if isinstance(stmt, ast.ClassDef):
                on_load += stmt.bases + [
                    s
                    for s in stmt.body
                    if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
                ]
            else:
                on_load += [
                    d for d in (*stmt.args.defaults, *stmt.args.kw_defaults) if d is not None
                ]
        else:
            on_load.append(stmt)
            for target in _targets(stmt):
                defs.setdefault(target, []).append(stmt)
    return _Module(name, defs, on_load, path.name == "__init__.py")


@cache
def _module(name: str) -> _Module:
    return _parse_module(name, package_modules()[name])


def _scan(nodes: list[ast.AST], module: str, is_package: bool) -> _Scan:
    scan = _Scan(module, is_package)
    for node in nodes:
        scan.visit(node)
    return scan


def reachable_imports(script: Path) -> dict[str, set[str]]:
    """Third-party top-level import name -> the places (module:def) that import it, for one
    script."""
    found: dict[str, set[str]] = {}
    done: set[tuple[str, str | None]] = set()
    # Work items: (module, None) = load a package module; (module, name) = use one of its
    # definitions;
    # ("<script>", None) = the script itself.
    todo: list[tuple[str, str | None]] = [("<script>", None)]
    module_bindings: dict[str, dict[str, tuple[str, str | None]]] = {}

    def module_scan(mod: str) -> _Scan:
        m = _module(mod)
        scan = _scan(m.on_load, mod, m.is_package)
        module_bindings[mod] = scan.bindings
        return scan

    while todo:
        item = todo.pop()
        if item in done:
            continue
        done.add(item)
        mod, name = item
        if mod == "<script>":
            scan = _scan(ast.parse(script.read_text(), str(script)).body, PKG, True)
            where, bindings, local_defs = script.name, scan.bindings, set()
        elif name is None:
            # Importing a.b.c imports a, a.b and a.b.c first.
            parts = mod.split(".")
            todo += [
                (".".join(parts[:i]), None)
                for i in range(1, len(parts))
                if ".".join(parts[:i]) in package_modules()
            ]
            scan = module_scan(mod)
            where, bindings, local_defs = mod, scan.bindings, set(_module(mod).defs)
        else:
            todo.append((mod, None))
            m = _module(mod)
            if name not in m.defs:
                if f"{mod}.{name}" in package_modules():
                    todo.append((f"{mod}.{name}", None))
                    continue
                # A name the module itself imported (re-export): follow it through the module's
                # bindings.
                if mod not in module_bindings:
                    module_scan(mod)
                target = module_bindings[mod].get(name)
                if target is None:
                    raise AssertionError(
                        f"{mod} has no definition of {name!r} (used by {script.name})"
                    )
                todo.append(target)
                continue
            scan = _scan(m.defs[name], mod, m.is_package)
            if mod not in module_bindings:
                module_scan(mod)
            where = f"{mod}:{name}"
            bindings = {**module_bindings[mod], **scan.bindings}
            local_defs = set(m.defs)
        for top in scan.third_party:
            found.setdefault(top, set()).add(where)
        todo += [(m_, None) for m_ in scan.loads]
        for chain in scan.chains:
            head = chain[0]
            if head in bindings:
                target_mod, attr = bindings[head]
                rest = list(chain[1:])
                if attr is not None:
                    todo.append((target_mod, attr))
                    continue
                # Walk a dotted chain through package modules: pkg.sub.func -> (pkg.sub, func).
                while rest and f"{target_mod}.{rest[0]}" in package_modules():
                    target_mod = f"{target_mod}.{rest.pop(0)}"
                    todo.append((target_mod, None))
                if rest:
                    todo.append((target_mod, rest[0]))
            elif head in local_defs and mod != "<script>":
                todo.append((mod, head))
    return found


def missing_dists(imports: dict[str, set[str]], env: Env) -> list[str]:
    """The checker: one message per reachable third-party import that ``env`` does not pin
    itself."""
    pinned = env.pinned_dists()
    problems = []
    for top, where in sorted(imports.items()):
        dist = IMPORT_TO_DIST.get(top)
        if dist is None:
            problems.append(
                f"import {top!r} (in {', '.join(sorted(where))}) is not in IMPORT_TO_DIST"
            )
        elif canonicalize_name(dist) not in pinned:
            problems.append(
                f"{dist} (import {top} in {', '.join(sorted(where))}) "
                f"is not pinned in {env.path.name}"
            )
    return problems


def _editable_extras(target: str) -> tuple[str, frozenset[str]]:
    m = re.fullmatch(r"(.+?)(?:\[([\w,\s-]+)\])?", target.strip().strip("'\""))
    extras = frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
    return m.group(1), extras


# --------------------------------------------------------------------------- tests


def test_rules_are_parsed():
    names = [r.name for r in workflow_rules()]
    assert len(names) == len(set(names)), names
    assert {"all", "cache_activations", "extract_layer", "train_probe", "patching"} <= set(names)
    assert len(script_rules()) >= 10


@pytest.mark.parametrize("rule", script_rules(), ids=lambda r: r.name)
def test_rule_names_existing_env_and_script(rule):
    assert rule.conda, f"rule {rule.name} ({rule.file.name}) runs a script but has no conda: env"
    assert rule.env_path.is_file(), f"rule {rule.name}: {rule.conda} does not exist"
    assert rule.env_path.parent == ENVS, f"rule {rule.name}: env {rule.conda} is not in envs/"
    assert rule.script_path.is_file(), f"rule {rule.name}: script {rule.script} does not exist"


@pytest.mark.parametrize("rule", script_rules(), ids=lambda r: r.name)
def test_rule_env_pins_everything_its_script_imports(rule):
    imports = reachable_imports(rule.script_path)
    problems = missing_dists(imports, load_env(rule.env_path))
    assert not problems, f"rule {rule.name}:\n" + "\n".join(problems)


def test_core_rules_do_not_reach_the_model_stack():
    """The split is the point of two envs: CPU rules must not need torch, and core.yaml must not
    ship it."""
    model = {
        canonicalize_name(Requirement(r).name)
        for r in pyproject()["optional-dependencies"][MODEL_EXTRA]
    }
    for rule in script_rules():
        if rule.env_path == ENVS / "core.yaml":
            reached = {
                canonicalize_name(IMPORT_TO_DIST.get(t, t))
                for t in reachable_imports(rule.script_path)
            }
            assert not reached & model, f"core rule {rule.name} reaches {sorted(reached & model)}"
    assert not set(load_env(ENVS / "core.yaml").pinned_dists()) & model


def test_checker_catches_missing_package():
    """The checker must fail when a rule's env lacks a package its code imports."""
    rule = next(r for r in script_rules() if r.name == "extract_layer")
    imports = reachable_imports(rule.script_path)
    assert "h5py" in imports, imports  # extract_layer writes HDF5 through h5cache
    spec = yaml.safe_load((ENVS / "core.yaml").read_text())
    spec["dependencies"] = [d for d in spec["dependencies"] if not str(d).startswith("h5py")]
    problems = missing_dists(imports, parse_env(spec, ENVS / "synthetic.yaml"))
    assert len(problems) == 1 and problems[0].startswith("h5py "), problems
    # A package that only the project's own pyproject would pull in (via `pip: -e`) does not count.
    spec["dependencies"] = [d for d in spec["dependencies"] if not isinstance(d, dict)] + [
        {"pip": ["-e ../..", "h5py"]}
    ]
    env = parse_env(spec, ENVS / "synthetic.yaml")
    assert env.problems == ["pip entry 'h5py' is not pinned with =="]
    assert any(p.startswith("h5py ") for p in missing_dists(imports, env))
    # An import nobody mapped to a distribution is reported, not skipped.
    assert missing_dists({"somethingnew": {"x.py"}}, env) == [
        "import 'somethingnew' (in x.py) is not in IMPORT_TO_DIST"
    ]


def test_reachability_follows_function_level_imports(tmp_path):
    """A script charged with a function's import only when it uses that function (directly or
    not)."""
    rule = next(r for r in script_rules() if r.name == "patching")
    assert {"torch", "transformer_lens", "matplotlib"} <= set(reachable_imports(rule.script_path))
    uses_patching = tmp_path / "s.py"
    uses_patching.write_text(
        "from layerscope.jobs.stages import patching_experiment\npatching_experiment()\n"
    )
    assert "torch" in reachable_imports(uses_patching)
    no_torch = tmp_path / "t.py"
    no_torch.write_text(
        "import json\nfrom layerscope.jobs import stages as analysis\nanalysis.best_layer(None)\n"
    )
    found = reachable_imports(no_torch)
    assert "torch" not in found and "pandas" in found, found


@pytest.mark.parametrize("path", sorted(ENVS.glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_are_exact_and_agree_with_pyproject(path):
    env = load_env(path)
    assert not env.problems, "\n".join(env.problems)
    spec = yaml.safe_load(path.read_text())
    assert spec.get("channels") == ["conda-forge", "nodefaults"], spec.get("channels")
    python = Version(env.conda["python"])
    assert python in Requirement(f"python{pyproject()['requires-python']}").specifier
    # Every pyproject requirement the env's -e install asks for is pinned here, inside its range.
    assert len(env.editables) == 1, f"{path.name} must install the project exactly once via pip -e"
    _, extras = _editable_extras(env.editables[0])
    pinned = env.pinned_dists()
    for req in project_requirements(extras):
        name = canonicalize_name(req.name)
        assert name in pinned, (
            f"{path.name}: {req} (from pyproject) is not pinned, pip would pick any version"
        )
        assert Version(pinned[name]) in req.specifier, (
            f"{path.name}: {name}=={pinned[name]} violates {req}"
        )
    # And nothing pinned is outside a range pyproject declares anywhere.
    all_reqs = {
        canonicalize_name(r.name): r
        for r in project_requirements(frozenset(pyproject()["optional-dependencies"]))
    }
    for name, version in pinned.items():
        if name in all_reqs:
            assert Version(version) in all_reqs[name].specifier, (
                f"{path.name}: {name}={version} violates {all_reqs[name]}"
            )


@pytest.mark.parametrize("path", sorted(ENVS.glob("*.yaml")), ids=lambda p: p.name)
def test_env_installs_this_checkout(path):
    """`-e` is resolved by pip from the folder of the env file conda is given, which under Snakemake
    is its copy in .snakemake/conda/, not envs/."""
    target, extras = _editable_extras(load_env(path).editables[0])
    resolved = (SNAKEMAKE_ENV_COPY_DIR / target).resolve()
    assert resolved == ROOT, (
        f"{path.name}: -e {target} resolves to {resolved} from {SNAKEMAKE_ENV_COPY_DIR}"
    )
    assert extras <= set(pyproject().get("optional-dependencies", {})), extras


def test_env_extras():
    """torch.yaml installs the project with the model extra, core.yaml without any extra."""
    env = load_env(ENVS / "torch.yaml")
    _, extras = _editable_extras(env.editables[0])
    assert MODEL_EXTRA in extras
    assert _editable_extras(load_env(ENVS / "core.yaml").editables[0])[1] == frozenset()


def test_every_package_import_is_declared_in_pyproject():
    """Each third-party import in src/layerscope maps to a distribution pyproject declares."""
    declared = declared_dists()
    problems = []
    for mod, path in package_modules().items():
        scan = _scan(ast.parse(path.read_text()).body, mod, path.name == "__init__.py")
        for top in sorted(scan.third_party):
            dist = IMPORT_TO_DIST.get(top)
            if dist is None or canonicalize_name(dist) not in declared:
                problems.append(
                    f"{mod} imports {top} ({dist or 'unmapped'}), not declared in pyproject"
                )
    assert not problems, "\n".join(problems)


def test_model_extra_is_optional_and_in_test_extra():
    """Nothing in the package imports the model stack at import time, so it can be an extra; the
    test
    extra includes it, so `pip install -e ".[test]"` (README, CI) still installs everything."""
    opt = pyproject()["optional-dependencies"]
    model = {canonicalize_name(Requirement(r).name) for r in opt[MODEL_EXTRA]}
    core = {canonicalize_name(Requirement(r).name) for r in pyproject()["dependencies"]}
    assert not model & core
    model_reqs = {
        canonicalize_name(Requirement(r).name): Requirement(r).specifier for r in opt[MODEL_EXTRA]
    }
    test_reqs = {
        canonicalize_name(r.name): r.specifier for r in project_requirements(frozenset({"test"}))
    }
    assert {n: test_reqs.get(n) for n in model_reqs} == model_reqs, (
        "the test extra must include the model extra"
    )
    for mod in package_modules():
        m = _module(mod)
        top = _scan(m.on_load, mod, m.is_package).third_party
        reached = {canonicalize_name(IMPORT_TO_DIST.get(t, t)) for t in top}
        assert not reached & model, f"{mod} imports {sorted(reached & model)} at import time"
