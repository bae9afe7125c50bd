"""The version of curvlinops, read by ``pyproject.toml`` and ``curvlinops.__version__``.

Our releases follow semantic versioning (``MAJOR.MINOR.PATCH``) of their own. The
version number says nothing about curvlinops 3.x, whose public API (3.0.1) this
package provides unchanged under the same import name.
"""

__version__ = "1.0.0"
