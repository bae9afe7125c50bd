"""Tests for curvlinops.demo, the quick tour of the README."""

from curvlinops.demo import main


def test_demo_results_match_dense_references(capsys):
    errors = main(k=2)
    for quantity in ["Hessian matvec", "GGN matvec", "Hessian eigenvalues"]:
        assert errors[quantity] < 1e-4, quantity
    assert errors["GGN eigenvalues"] < 1e-4
    assert errors["Hessian trace"] < 0.05  # Hutch++, seeded
    printed = capsys.readouterr().out
    assert "Top-2 GGN eigenvalues" in printed and "trace" in printed
