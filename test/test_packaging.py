"""Packaging: the metadata tells the truth, and a built wheel installs and runs.

The wheel test builds an sdist and a wheel with ``python -m build``, installs the
wheel (not editable) into a fresh virtual environment and runs ``wheel_smoke.py``
and the demo there, from a directory outside the repository. It takes a few
minutes, so it runs in CI (``CI=true``) or when ``CURVLINOPS_TEST_WHEEL=1``.
"""

import os
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import metadata
from pathlib import Path

import pytest
import tomllib

import curvlinops

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUN_WHEEL_TEST = (
    os.environ.get("CI") == "true" or os.environ.get("CURVLINOPS_TEST_WHEEL") == "1"
)


def test_version_has_one_source():
    """``pyproject.toml`` reads the version that ``curvlinops.__version__`` has."""
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attribute = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, _, name = attribute.rpartition(".")
    assert module == "curvlinops._version" and name == "__version__"
    assert curvlinops.__version__ == curvlinops._version.__version__
    major, minor, patch = curvlinops.__version__.split(".")
    assert all(part.isdigit() for part in (major, minor, patch))


def test_changelog_lists_the_current_version():
    """``CHANGELOG.md`` keeps an *Unreleased* section and one for this version."""
    headings = [
        line.removeprefix("## ").split(" - ")[0]
        for line in (ROOT / "CHANGELOG.md").read_text().splitlines()
        if line.startswith("## ")
    ]
    assert headings[0] == "[Unreleased]"
    assert f"[{curvlinops.__version__}]" in headings


def test_metadata_names_no_foreign_project():
    """No URL or author of another project (such as the original curvlinops)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert "f-dangel" not in text and "github.com" not in text
    assert "urls" not in PYPROJECT["project"]
    installed = metadata("curvlinops")
    assert installed["Version"] == curvlinops.__version__
    assert not installed.get_all("Project-URL")


def _build(outdir: Path) -> tuple[Path, Path]:
    """Build an sdist and a wheel into ``outdir``; return their paths."""
    command = [sys.executable, "-m", "build", "--outdir", str(outdir), str(ROOT)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    (sdist,) = outdir.glob("*.tar.gz")
    (wheel,) = outdir.glob("*.whl")
    return sdist, wheel


def _package_files() -> set[str]:
    """Relative paths of the package's Python files in the repository."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "curvlinops").rglob("*.py")
    }


def _run(command: list, cwd: Path, timeout: int = 900) -> str:
    """Run a command, failing with its output if it fails."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.skipif(not RUN_WHEEL_TEST, reason="set CI=true or CURVLINOPS_TEST_WHEEL=1")
def test_wheel_installs_into_fresh_environment_and_runs(tmp_path: Path):
    """Build, check the archives' contents, install the wheel, run the smoke test."""
    sdist, wheel = _build(tmp_path / "dist")
    assert wheel.name.startswith(f"curvlinops-{curvlinops.__version__}-")
    assert sdist.name == f"curvlinops-{curvlinops.__version__}.tar.gz"
    assert _package_files() <= set(zipfile.ZipFile(wheel).namelist())
    prefix = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as archive:
        in_sdist = {name.removeprefix(prefix + "/") for name in archive.getnames()}
    assert _package_files() | {"pyproject.toml", "README.md", "LICENSE"} <= in_sdist

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    # torch pinned in the same command, as the README says (BackPACK pulls torchvision)
    _run([python, "-m", "pip", "install", "-q", "torch==2.13.0", str(wheel)], tmp_path)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    smoke = _run([python, str(ROOT / "test" / "wheel_smoke.py"), str(ROOT)], workdir)
    assert "wheel smoke test passed" in smoke
    demo = _run([python, "-m", "curvlinops.demo"], workdir)
    assert "eigenvalues" in demo
