"""Reading order of the tutorials in the gallery (``docs/examples``).

A tutorial that is not listed here comes after the listed ones, sorted by file
name; ``test/test_docs.py`` checks that the list names every tutorial.
"""

TUTORIALS = [
    "example_basic_usage.py",
    "example_visual_tour.py",
    "example_eigenvalues.py",
    "example_inverses.py",
    "example_kfac_preconditioning.py",
    "example_structured.py",
    "example_weight_tying.py",
    "example_fisher_monte_carlo.py",
    "example_trace_diagonal.py",
    "example_spectral_density.py",
    "example_submatrices.py",
    "example_vivit.py",
    "example_dict_inputs.py",
    "example_distributed.py",
]


class TutorialOrder:
    """Sort key of sphinx-gallery's ``within_subsection_order``."""

    def __init__(self, src_dir: str):
        """Accept the gallery's source directory, which the order ignores."""

    def __call__(self, filename: str) -> tuple[int, str]:
        """Return the position of a tutorial, unlisted ones last by name."""
        position = (
            TUTORIALS.index(filename) if filename in TUTORIALS else len(TUTORIALS)
        )
        return position, filename

    def __repr__(self) -> str:
        """Return a stable representation, so Sphinx sees an unchanged config."""
        return "TutorialOrder"
