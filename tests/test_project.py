"""The project's promises about itself: install files, README commands, architecture."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def test_distribution_name_is_not_the_taken_one() -> None:
    assert PYPROJECT["project"]["name"] != "gradviz"
    assert (ROOT / "gradviz" / "__init__.py").exists()


def test_runtime_dependencies_as_designed() -> None:
    deps = PYPROJECT["project"]["dependencies"]
    names = {_name(d) for d in deps}
    assert {"torch", "networkx", "pyvis", "flask", "orjson"} <= names
    assert "pyvis==0.3.2" in deps
    torch_req = next(d for d in deps if _name(d) == "torch")
    assert ">=" in torch_req and "<" not in torch_req  # no upper pin
    assert {"pytest", "ruff", "mypy"} <= {_name(d) for d in
                                          PYPROJECT["project"]["optional-dependencies"]["dev"]}


def test_environment_yml_names_what_pyproject_needs() -> None:
    text = (ROOT / "environment.yml").read_text()
    entries = [line.strip()[2:].strip() for line in text.splitlines()
               if line.strip().startswith("- ")]
    assert any(e.startswith("python=3.1") for e in entries)
    assert "pip" in entries
    assert "-e .[dev]" in entries  # the project itself
    listed = {_name(e) for e in entries}
    for dep in PYPROJECT["project"]["dependencies"]:
        assert _name(dep) in listed, dep
    assert "pyvis==0.3.2" in entries  # the same pin


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    return [line for line in blocks[0].splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_second() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    install_and_run, install_and_test = commands
    assert "extract.py" in install_and_run and "visualize.py" in install_and_run
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()


def test_viewing_half_never_imports_torch() -> None:
    code = ("import sys, gradviz, gradviz.store, gradviz.schema; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
