"""Tests for curvlinops.demo, the quick tour of the README."""

import subprocess
import sys
from pathlib import Path

from curvlinops.demo import main

ROOT = Path(__file__).parents[1]


def test_demo_results_match_dense_references(capsys, tmp_path):
    picture = tmp_path / "demo.png"
    errors = main(k=2, picture=picture)
    for quantity in ["Hessian matvec", "GGN matvec", "Hessian eigenvalues"]:
        assert errors[quantity] < 1e-4, quantity
    assert errors["GGN eigenvalues"] < 1e-4
    assert errors["Hessian trace"] < 0.05  # Hutch++, seeded
    printed = capsys.readouterr().out
    assert "Top-2 GGN eigenvalues" in printed and "trace" in printed
    # the tour ends with a picture and says where it is
    assert printed.rstrip().endswith(str(picture))
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert picture.stat().st_size > 10_000  # two panels with plots, not a blank


def test_importing_curvlinops_does_not_import_matplotlib():
    """The demo imports matplotlib only to draw its picture, an extra."""
    code = "import sys, curvlinops, curvlinops.demo; print('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_demo_runs_without_a_picture(capsys):
    """``python -m curvlinops.demo`` (as from a bare wheel) draws nothing."""
    main(k=1)
    assert "Picture" not in capsys.readouterr().out
