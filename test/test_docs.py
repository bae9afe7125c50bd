"""Check that the API reference documents every public name.

A name added to ``curvlinops.__all__`` must also be added to ``docs/api.rst``;
this test fails until it is, so the reference cannot silently fall behind.
"""

import re
from importlib import import_module
from pathlib import Path

import pytest

import curvlinops

API_RST = Path(__file__).parents[1] / "docs" / "api.rst"
DIRECTIVE = re.compile(r"^\.\. auto(?:class|function|data|module):: (\S+)\s*$", re.M)


def documented_targets() -> list[str]:
    """Return the dotted paths of all autodoc directives in the API reference."""
    return DIRECTIVE.findall(API_RST.read_text())


@pytest.mark.parametrize("name", curvlinops.__all__)
def test_public_name_in_api_reference(name: str):
    assert f"curvlinops.{name}" in documented_targets(), (
        f"curvlinops.{name} is in curvlinops.__all__ but not documented in "
        f"{API_RST.relative_to(API_RST.parents[1])}: add an autodoc directive."
    )


@pytest.mark.parametrize("target", documented_targets())
def test_documented_target_exists(target: str):
    module_path, _, attribute = target.rpartition(".")
    try:
        import_module(target)
    except ModuleNotFoundError:
        assert hasattr(import_module(module_path), attribute), target


def test_api_reference_has_no_duplicates():
    targets = documented_targets()
    duplicates = {t for t in targets if targets.count(t) > 1}
    assert not duplicates, f"Documented more than once: {sorted(duplicates)}"
