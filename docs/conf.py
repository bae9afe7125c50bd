"""Sphinx configuration of the curvlinops documentation."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _inventories import write_inventories  # noqa: E402
from _mathjax import ENTRY_POINT, ensure_mathjax  # noqa: E402
from _torchvision import import_torchvision_for_laplace  # noqa: E402

import curvlinops  # noqa: E402

project = "curvlinops"
author = "The curvlinops developers"
copyright = "2026, The curvlinops developers"
release = curvlinops.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

# The build machines are offline: link to torch/numpy/scipy via local inventories.
intersphinx_mapping = write_inventories(HERE / "_build" / "_intersphinx")

# No default "members": with it, Sphinx ignores the explicit member lists of the
# directives in api.rst (and drops inherited or private members named there).
autodoc_default_options = {"show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False


def is_public(cls: type) -> bool:
    """Return whether a class is public: not private, nor only in a private module."""
    if cls.__name__.startswith("_"):
        return False
    modules = cls.__module__.split(".")
    if not any(module.startswith("_") for module in modules):
        return True
    package = sys.modules.get(modules[0])  # e.g. re-exported as curvlinops.<name>
    return getattr(package, cls.__name__, None) is cls


def public_bases(app, name, obj, options, bases):
    """Show the nearest public ancestor instead of a private base class."""
    for i, base in enumerate(bases):
        while not is_public(base) and base.__bases__:
            base = base.__bases__[0]
        bases[i] = base


def setup(app):
    """Connect the event handlers of this configuration."""
    app.connect("autodoc-process-bases", public_bases)


# Furo: responsive, with a light, a dark and an automatic (system) color scheme.
html_theme = "furo"
html_title = f"curvlinops {release}"
html_static_path = ["_static", str(ensure_mathjax())]
html_css_files = ["custom.css"]
exclude_patterns = ["_build", "examples"]

# Formulas render offline: MathJax is served from _static (see _mathjax.py).
mathjax_path = ENTRY_POINT

# Tutorials: run every docs/examples/example_*.py and render its figures.
os.environ.setdefault("CURVLINOPS_DOCS_BUILD", "1")
import_torchvision_for_laplace()  # example_laplace.py imports laplace-torch
sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": "example_",
    "ignore_pattern": r"__init__\.py|_helpers\.py",
    "download_all_examples": False,
    # the pages of execution times load scripts from CDNs, and offline readers
    # would get an unstyled table; the times are of no use to readers anyway
    "write_computation_times": False,
    "remove_config_comments": True,
    "within_subsection_order": "_gallery_order.TutorialOrder",  # reading order
    # link names in the tutorials' code to the API reference
    "doc_module": ("curvlinops",),
    "reference_url": {"curvlinops": None},
}
