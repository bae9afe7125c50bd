"""ViViT: GGN eigen-decomposition through the Gram matrix, on BackPACK.

The computations run during a BackPACK backward pass of a model and loss function
extended with :func:`backpack.extend` (``reduction='mean'``)::

    computation = EighComputation()
    hook = computation.get_extension_hook(param_groups)
    with backpack(computation.get_extension(), extension_hook=hook):
        loss.backward()
    evals, evecs = computation.get_result(param_groups[0])

Reference: Dangel, Tatzel, Hennig (2022), ViViT: Curvature access through the
generalized Gauss-Newton's low-rank structure, Transactions on Machine Learning
Research.
"""

from curvlinops.vivit.damped_newton import DirectionalDampedNewtonComputation
from curvlinops.vivit.directional_derivatives import DirectionalDerivativesComputation
from curvlinops.vivit.eigh import EighComputation
from curvlinops.vivit.eigvalsh import EigvalshComputation

__all__ = [
    # GGN spectrum: eigenvalues, eigenpairs
    "EigvalshComputation",
    "EighComputation",
    # Along GGN eigenvectors: 1st/2nd-order directional derivatives, Newton steps
    "DirectionalDerivativesComputation",
    "DirectionalDampedNewtonComputation",
]
