"""The conda recipe and environment file agree with setup.py: every pip requirement has its
conda package with the same version bounds, and nothing else is required. (No conda channel
is reachable where the tests run, so building the recipe is not tested here.)"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]

#: pip distribution → conda-forge package, where the names differ.
CONDA_NAMES = {"torch": "pytorch", "acellera-openmmtorch-cu13": "openmm-torch", "matplotlib": "matplotlib-base",
               "openmmml": "openmm-ml"}
#: conda-only entries (the interpreter and the installer).
CONDA_ONLY = {"python", "pip"}


def _setup_keywords() -> dict:
    """The literal keyword arguments of the ``setup(...)`` call in setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"]
    assert len(calls) == 1
    keywords = {}
    for keyword in calls[0].keywords:
        try:
            keywords[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            pass  # computed values (version, README text)
    return keywords


def _pip_requirements(extras: tuple[str, ...] = ()) -> dict[str, SpecifierSet]:
    keywords = _setup_keywords()
    lines = list(keywords["install_requires"])
    for extra in extras:
        lines += keywords["extras_require"][extra]
    requirements = [Requirement(line) for line in lines]
    return {CONDA_NAMES.get(r.name, r.name): r.specifier for r in requirements}


def _conda_requirements(entries: list) -> dict[str, SpecifierSet]:
    out = {}
    for entry in entries:
        if not isinstance(entry, str):
            continue  # the pip: section of an environment file
        name, _, spec = entry.partition(" ")
        out[name] = SpecifierSet(spec.replace(" ", ""))
    return out


def test_recipe_parses_is_noarch_and_its_run_requirements_are_setup_pys():
    recipe = yaml.safe_load((ROOT / "conda" / "recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["build"]["noarch"] == "python"
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (ROOT / "openmm_flowforce" / "_version.py").read_text())
    assert recipe["context"]["version"] == version.group(1)
    run = _conda_requirements(recipe["requirements"]["run"])
    python_bound = _setup_keywords()["python_requires"]
    assert run.pop("python") == SpecifierSet(python_bound)
    assert run == _pip_requirements()
    assert _conda_requirements(recipe["requirements"]["run_constraints"]) == \
        {k: v for k, v in _pip_requirements(("openmmml",)).items() if k not in _pip_requirements()}
    tests = recipe["tests"]
    assert "openmm_flowforce" in tests[0]["python"]["imports"]
    assert "flowforce doctor" in tests[1]["script"]
    entry_points = recipe["build"]["python"]["entry_points"]
    assert entry_points == _setup_keywords()["entry_points"]["console_scripts"]


def test_environment_file_has_setup_pys_requirements_and_extras():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    assert environment["channels"] == ["conda-forge"]
    conda = _conda_requirements(environment["dependencies"])
    assert conda.pop("python") == SpecifierSet(_setup_keywords()["python_requires"])
    assert conda.pop("pip") == SpecifierSet()
    assert conda == _pip_requirements(("openmmml", "test"))


@pytest.mark.parametrize("name", ["torch", "acellera-openmmtorch-cu13"])
def test_the_abi_pins_have_upper_bounds(name):
    """openmm-torch loads only with the torch it was built for: both ranges stay closed."""
    specifier = {r.name: r.specifier for r in map(Requirement, _setup_keywords()["install_requires"])}[name]
    assert any(s.operator == "<" for s in specifier)
