"""XDiag under the module path of curvlinops 3.x (the XTrace paper's module).

:func:`~curvlinops.diagonal.epperly2024xdiag.xdiag` lives in
``curvlinops.diagonal.epperly2024xdiag``; 3.x named its module after the paper that
introduced XTrace and XDiag (Epperly, Tropp & Webber, 2024). Both paths give the
same function.
"""

from curvlinops.diagonal.epperly2024xdiag import xdiag

__all__ = ["xdiag"]
