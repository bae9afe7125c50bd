"""Run every tutorial in docs/examples so that the documentation cannot rot.

Tutorials check their claims with ``assert`` statements (e.g. a product against a
dense reference), so running one verifies what it teaches. They see
``CURVLINOPS_FAST_TUTORIALS=1`` and may shrink their problem sizes.
"""

import runpy
from pathlib import Path

import matplotlib
import pytest

TUTORIALS = sorted(
    (Path(__file__).parents[1] / "docs" / "examples").glob("example_*.py")
)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path, monkeypatch, tmp_path):
    matplotlib.use("Agg")
    monkeypatch.setenv("CURVLINOPS_FAST_TUTORIALS", "1")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="__main__")  # raises if an assertion fails
