"""The rules' conda environments (envs/*.yaml, built by `snakemake --sdm conda`), checked without conda.

This machine cannot reach conda channels, so nothing is built here. Instead, for every rule of the real workflow
(loaded with Snakemake's API, once per config variant so that rules behind `if` are seen too):

* its env file exists and is valid YAML with channels (conda-forge, never `defaults`) and dependencies;
* every package its script imports is in the env: the script's imports and, transitively, those of every
  radstudy module it reaches (module level and inside functions), plus pyarrow where pandas writes or reads
  parquet; import names map to distributions with the tested virtualenv's `packages_distributions()`;
* every pinned version equals the version installed in the tested virtualenv (and requirements/constraints.txt);
* every pip package's own requirements are in the env too, so pip resolves nothing unpinned;
* the script puts workflow/ on sys.path before importing radstudy (the one way radstudy is found in the envs:
  Snakemake removes PYTHONPATH when it activates a conda env, and radstudy is not installed there).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflow"
PACKAGE = "radstudy"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"

# Config overrides under which the workflow is loaded: together they must define every rule declared in the
# .smk files (rules inside `if DEMO:` / `if SEG["model_folder"]:` exist under one config only).
CONFIG_VARIANTS = {
    "default": {},
    "trained model given, deep features and robustness on": {
        "segmentation": {"model_folder": "resources/nnunet/given-model"},
        "features": {"deep": {"enabled": True}, "robustness": {"enabled": True}}},
}
# conda-forge names that differ from the distribution name the virtualenv knows (after normalisation)
CONDA_TO_DIST = {
    "pytorch": "torch",
    "matplotlib-base": "matplotlib",
    "seaborn-base": "seaborn",
    "python-graphviz": "graphviz",
    "python-blosc2": "blosc2",
}
UNPINNED_OK = {"pip"}  # the installer itself
# Packages used without an import statement: pandas' parquet engine.
IMPLICIT = {"to_parquet": "pyarrow", "read_parquet": "pyarrow"}


def _shown(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------- env files
@dataclass
class Env:
    path: Path
    channels: list[str] = field(default_factory=list)
    python: str | None = None
    conda: dict[str, str | None] = field(default_factory=dict)  # distribution (normalised) -> pinned version
    pip: dict[str, Requirement] = field(default_factory=dict)  # distribution (normalised) -> requirement
    problems: list[str] = field(default_factory=list)

    @property
    def packages(self) -> set[str]:
        return set(self.conda) | set(self.pip)


CONDA_SPEC = re.compile(r"^(?:[\w.-]+::)?(?P<name>[A-Za-z0-9_.-]+)\s*(?:(?P<op>==?|[<>!~]=?)\s*(?P<version>[^\s=,|]+)"
                        r"(?:=\S+)?)?$")


def read_env(path: Path) -> Env:
    """Parse an env file; everything wrong with its form goes into `problems` (nothing raises)."""
    env = Env(path)
    if not path.is_file():
        env.problems.append(f"{_shown(path)} does not exist")
        return env
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        env.problems.append(f"{_shown(path)} is not valid YAML: {error}")
        return env
    if not isinstance(data, dict) or not isinstance(data.get("dependencies"), list):
        env.problems.append(f"{_shown(path)}: no `dependencies:` list")
        return env
    env.channels = list(data.get("channels") or [])
    if "conda-forge" not in env.channels or "defaults" in env.channels:
        env.problems.append(f"{_shown(path)}: channels must include conda-forge and not defaults, got {env.channels}")
    for dep in data["dependencies"]:
        if isinstance(dep, dict) and set(dep) == {"pip"}:
            for line in dep["pip"] or []:
                line = str(line).strip()
                if line.startswith("-"):
                    env.problems.append(f"{_shown(path)}: pip option {line!r}: pip installs from PyPI only here")
                    continue
                try:
                    req = Requirement(line)
                except InvalidRequirement as error:
                    env.problems.append(f"{_shown(path)}: pip entry {line!r}: {error}")
                    continue
                env.pip[_norm(req.name)] = req
                if len(req.specifier) != 1 or next(iter(req.specifier)).operator != "==":
                    env.problems.append(f"{_shown(path)}: pip {line!r} is not pinned (name==version)")
            continue
        match = CONDA_SPEC.match(str(dep).strip())
        if not match:
            env.problems.append(f"{_shown(path)}: cannot read dependency {dep!r}")
            continue
        name, op, version = match["name"], match["op"], match["version"]
        if op not in (None, "=", "=="):
            env.problems.append(f"{_shown(path)}: {dep!r} is a range, pin one version (name=version)")
        if name == "python":
            env.python = version
            continue
        dist = _norm(CONDA_TO_DIST.get(name, name))
        env.conda[dist] = version
        if version is None and name not in UNPINNED_OK:
            env.problems.append(f"{_shown(path)}: {dep!r} is not pinned (name=version)")
    if env.pip and "pip" not in env.conda:
        env.problems.append(f"{_shown(path)}: has a pip section but does not list pip")
    tested = f"{sys.version_info.major}.{sys.version_info.minor}"
    if env.python is None or not (env.python == tested or env.python.startswith(f"{tested}.")):
        env.problems.append(f"{_shown(path)}: python must be pinned to the tested {tested}, got {env.python}")
    return env


@cache
def _constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[_norm(req.name)] = next(iter(req.specifier)).version
    return pins


@cache
def _import_dists() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cache
def _installed(dist: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None


def _same_version(pinned: str, installed: str) -> bool:
    try:
        return Version(pinned) == Version(Version(installed).public)  # 2.13.0 == 2.13.0+cpu
    except InvalidVersion:
        return pinned == installed


def version_problems(env: Env) -> list[str]:
    """Pins that differ from the tested virtualenv or requirements/constraints.txt."""
    problems = []
    pins = {d: v for d, v in env.conda.items() if v is not None}
    pins |= {d: next(iter(r.specifier)).version for d, r in env.pip.items() if len(r.specifier) == 1}
    for dist, pinned in sorted(pins.items()):
        installed = _installed(dist)
        if installed is None:
            problems.append(f"{_shown(env.path)}: {dist}={pinned} is not installed in the tested virtualenv")
        elif not _same_version(pinned, installed.version):
            problems.append(f"{_shown(env.path)}: {dist}={pinned}, the tested virtualenv has {installed.version}")
        elif dist in _constraints() and not _same_version(pinned, _constraints()[dist]):
            problems.append(f"{_shown(env.path)}: {dist}={pinned}, requirements/constraints.txt has "
                            f"{_constraints()[dist]}")
    return problems


def pip_closure_problems(env: Env) -> list[str]:
    """Requirements of the env's pip packages (as the tested virtualenv's metadata states them) missing from the
    env: pip would resolve them unpinned. Requirements of conda packages are conda's business."""
    problems = []
    marker_env = default_environment()
    for dist, req in sorted(env.pip.items()):
        installed = _installed(dist)
        if installed is None:
            continue  # version_problems says it
        extras = {""} | set(req.extras)
        for line in installed.requires or []:
            dep = Requirement(line)
            if dep.marker and not any(dep.marker.evaluate({**marker_env, "extra": e}) for e in extras):
                continue
            if _norm(dep.name) not in env.packages:
                problems.append(f"{_shown(env.path)}: pip package {req.name} requires {dep}, which the env does not "
                                f"list (pin it, from conda-forge if it is there)")
    return problems


# ----------------------------------------------------------------------------- imports
def _module_file(module: str) -> Path | None:
    """The source file of a radstudy module, None for other modules or names that are not modules."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = WORKFLOW.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@cache
def file_imports(path: Path, module: str | None = None) -> list[tuple[str, int]]:
    """(module, line) of every import anywhere in the file (functions included; `if TYPE_CHECKING:` skipped).
    `from a import b` gives a.b when that is a radstudy module, else a. Relative imports are resolved against
    `module` (the file's dotted name). Pandas parquet I/O counts as an import of pyarrow."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if module and path.name == "__init__.py" else (module or "").rpartition(".")[0]
    found = []

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            if base == "__future__":
                return
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if _module_file(sub) else base, node.lineno))
        elif isinstance(node, ast.Attribute) and node.attr in IMPLICIT:
            found.append((IMPLICIT[node.attr], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def script_imports(script: Path) -> dict[str, str]:
    """Top-level names of the third-party modules a script can import, directly or through the radstudy modules
    it reaches (followed transitively), each with where it is first imported (path:line)."""
    result: dict[str, str] = {}
    seen: set[str] = set()
    queue: list[tuple[Path, str | None]] = [(script, None)]
    while queue:
        path, module = queue.pop()
        for name, line in file_imports(path, module):
            top = name.split(".")[0]
            if top == PACKAGE:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, a/b/c
                    sub = ".".join(parts[:i])
                    sub_file = _module_file(sub)
                    if sub_file and sub not in seen:
                        seen.add(sub)
                        queue.append((sub_file, sub))
            elif top not in sys.stdlib_module_names:
                result.setdefault(top, f"{_shown(path)}:{line}")
    return result


def env_problems(rule: str, env_file: Path, script: Path | None) -> list[str]:
    """Everything wrong with a rule's env, each problem naming the rule, the env and the package."""
    env = read_env(env_file)
    problems = list(env.problems)
    if not problems:
        problems += version_problems(env) + pip_closure_problems(env)
        if script is not None:
            for name, where in sorted(script_imports(script).items()):
                candidates = _import_dists().get(name)
                if not candidates:
                    problems.append(f"`import {name}` ({where}) is not installed in the tested virtualenv")
                elif not {_norm(c) for c in candidates} & env.packages:
                    problems.append(f"{_shown(env_file)} lacks {' or '.join(sorted(set(candidates)))} "
                                    f"(`import {name}` at {where})")
    return [f"rule {rule}: {p}" for p in problems]


# ----------------------------------------------------------------------------- the workflow's rules
@dataclass(frozen=True)
class RuleEnv:
    name: str
    env: Path | None
    script: Path | None


def _load_rules(overrides: dict) -> dict[str, RuleEnv]:
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    cwd = os.getcwd()
    try:
        with SnakemakeApi(OutputSettings(enable_file_logging=False)) as api:
            workflow = api.workflow(resource_settings=ResourceSettings(cores=1),
                                    config_settings=ConfigSettings(config=overrides),
                                    snakefile=REPO / "Snakefile", workdir=REPO)._workflow
            rules = {}
            for rule in workflow.rules:
                base = Path(rule.snakefile).parent
                rules[rule.name] = RuleEnv(
                    rule.name,
                    (base / rule.conda_env).resolve() if isinstance(rule.conda_env, str) else None,
                    (base / rule.script).resolve() if rule.script else None,
                )
            return rules
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def rules() -> dict[str, RuleEnv]:
    found: dict[str, RuleEnv] = {}
    for overrides in CONFIG_VARIANTS.values():
        found |= _load_rules(overrides)
    return found


def _declared_rules() -> dict[str, str]:
    declared = {}
    for smk in [REPO / "Snakefile", *sorted((WORKFLOW / "rules").glob("*.smk"))]:
        for match in re.finditer(r"^\s*(?:rule|checkpoint)\s+(\w+)\s*:", smk.read_text(), re.M):
            declared[match[1]] = smk.relative_to(REPO).as_posix()
    return declared


def test_every_declared_rule_is_checked(rules):
    missing = {name: smk for name, smk in _declared_rules().items() if name not in rules}
    assert not missing, (f"rules {missing} are not defined under any config of CONFIG_VARIANTS in {__file__}: "
                         "add a variant that enables them, so that their conda env is checked")


def test_every_script_rule_names_a_kind_env(rules):
    bad = [f"rule {r.name} ({r.script.relative_to(REPO)}) has no `conda:` env file in envs/"
           for r in rules.values() if r.script and (r.env is None or r.env.parent != REPO / "envs")]
    assert not bad, "\n".join(bad)


def test_rule_envs_are_complete_and_pinned_as_tested(rules):
    problems = []
    for rule in sorted(rules.values(), key=lambda r: r.name):
        if rule.env is not None:
            problems += env_problems(rule.name, rule.env, rule.script)
    assert not problems, "\n".join(problems)


def test_every_env_file_is_used_and_valid(rules):
    used = {r.env for r in rules.values()}
    for path in sorted((REPO / "envs").glob("*.y*ml")):
        assert path.resolve() in used, f"{path.relative_to(REPO)} is used by no rule (remove it, or use it)"
        env = read_env(path)
        problems = env.problems + version_problems(env) + pip_closure_problems(env)
        assert not problems, "\n".join(problems)


def _bootstrap_prefix(script: Path) -> str:
    """The script's statements before its first radstudy import."""
    tree = ast.parse(script.read_text())
    prefix = []
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n.split(".")[0] == PACKAGE for n in names):
            return "\n".join(ast.unparse(n) for n in prefix)
        prefix.append(node)
    raise AssertionError(f"{script} does not import {PACKAGE} at module level")


def test_scripts_find_radstudy_without_installation(rules):
    """Each script's own first lines make radstudy importable in an interpreter without site-packages
    (`python -S -I`: no PYTHONPATH, no .pth of an installed radstudy), as in a rule's conda env."""
    scripts = sorted({r.script for r in rules.values() if r.script})
    for script in scripts:
        code = (f"__file__ = {str(script)!r}\n{_bootstrap_prefix(script)}\n"
                f"import {PACKAGE}; print({PACKAGE}.__file__)")
        result = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True,
                                cwd="/", timeout=60)
        assert result.returncode == 0, f"{script.relative_to(REPO)}: {result.stderr[-2000:]}"
        assert Path(result.stdout.strip()) == WORKFLOW / PACKAGE / "__init__.py", script


# ----------------------------------------------------------------------------- the checker itself
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_checker_detects_a_broken_env(tmp_path):
    numpy, yaml_version = metadata.version("numpy"), metadata.version("PyYAML")
    module = _write(tmp_path / "script.py", "import os\nimport numpy as np\n\ndef f():\n    import yaml\n"
                                            "    return np.zeros(1), yaml, os\n")
    good = _write(tmp_path / "good.yaml", f"channels: [conda-forge, nodefaults]\ndependencies:\n"
                                          f"  - python=3.11\n  - numpy={numpy}\n  - pyyaml={yaml_version}\n")
    assert env_problems("demo", good, module) == []

    missing = _write(tmp_path / "missing.yaml", f"channels: [conda-forge]\ndependencies:\n"
                                                f"  - python=3.11\n  - numpy={numpy}\n")
    assert env_problems("demo", missing, module) == [
        f"rule demo: {missing} lacks PyYAML (`import yaml` at {module}:5)"]

    wrong = _write(tmp_path / "wrong.yaml", "channels: [conda-forge]\ndependencies:\n  - python=3.11\n"
                                            "  - numpy=1.0.0\n  - pyyaml\n")
    problems = env_problems("demo", wrong, module)
    assert any("'pyyaml' is not pinned" in p for p in problems), problems
    _write(wrong, f"channels: [conda-forge]\ndependencies:\n  - python=3.11\n  - numpy=1.0.0\n"
                  f"  - pyyaml={yaml_version}\n")
    assert env_problems("demo", wrong, module) == [
        f"rule demo: {wrong}: numpy=1.0.0, the tested virtualenv has {numpy}"]

    assert "not valid YAML" in env_problems("demo", _write(tmp_path / "bad.yaml", "dependencies: [a\n"), module)[0]
    assert "does not exist" in env_problems("demo", tmp_path / "absent.yaml", module)[0]


def test_checker_follows_radstudy_imports_and_pip_requirements(tmp_path):
    script = _write(tmp_path / "script.py", "from radstudy import tables\n")
    imports = script_imports(script)
    assert set(imports) == {"pandas", "pyarrow"}  # tables.py: pandas, and read_parquet -> pyarrow
    assert imports["pyarrow"].startswith("workflow/radstudy/tables.py:")
    # pip package whose requirement is not in the env: pyradiomics-bhklab needs PyWavelets, pykwalify, ...
    radiomics = metadata.version("pyradiomics-bhklab")
    env = _write(tmp_path / "env.yaml", f"channels: [conda-forge]\ndependencies:\n  - python=3.11\n  - pip\n"
                                        f"  - pip:\n    - pyradiomics-bhklab=={radiomics}\n")
    problems = env_problems("demo", env, None)
    assert problems and all("pip package pyradiomics-bhklab requires" in p for p in problems), problems
