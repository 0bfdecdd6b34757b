"""The pinned environment: requirements.txt, environment.yml, constraints.txt, pyproject.toml agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} pinned twice"
        pins[name] = specs[0].version
    return pins


def requirements() -> dict[str, str]:
    return _pins((ROOT / "requirements.txt").read_text().splitlines())


def test_requirements_are_exact_pins_of_the_tools_the_book_needs():
    pins = requirements()
    for name in ["torch", "transformers", "tokenizers", "reasoning-gym", "matplotlib", "tqdm", "pyyaml",
                 "jupyter-book", "papermill", "nbval", "pytest", "jupyterlab", "ipykernel"]:
        assert name in pins, f"{name} is not pinned in requirements.txt"
    jb = Version(pins["jupyter-book"])
    assert Version("1.0.4") <= jb < Version("2"), "Jupyter Book 2 cannot build offline (DESIGN.md)"
    assert Version(pins["transformers"]).major >= 5


def test_environment_yml_mirrors_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_lists = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs exactly one pip: section"
    assert _pins(pip_lists[0]) == requirements()


def test_constraints_keep_torch_on_the_cpu_wheel():
    pins = _pins((ROOT / "constraints.txt").read_text().splitlines())
    assert pins == {"torch": "2.13.0"}
    assert requirements()["torch"] == "2.13.0"


def test_pyproject_ranges_admit_the_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = requirements()
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not pinned in requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
    # the ranges are ranges: a user can satisfy them anywhere, not only with our pins
    assert all(not re.search(r"==", spec) for spec in project["dependencies"])


def test_parity_and_nodeps_requirements_are_exact_pins_not_repeated():
    base = requirements()
    parity = _pins((ROOT / "requirements-parity.txt").read_text().splitlines())
    nodeps = _pins((ROOT / "requirements-nodeps.txt").read_text().splitlines())
    assert {"trl", "verl"} <= set(parity) | set(nodeps)
    assert not (set(parity) & set(base)) and not (set(nodeps) & set(base)) and not (set(parity) & set(nodeps)), \
        "a package pinned in two requirements files"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["parity"]
    for spec in extras:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert req.specifier.contains((parity | nodeps)[name]), f"extra [parity] {spec} disagrees with the pins"
