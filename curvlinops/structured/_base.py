r"""What the structured operators share: determinants from signs and logarithms.

Each structured operator computes its determinant as a sign and the logarithm of
the absolute value (like :func:`torch.linalg.slogdet`), which does not overflow for
large matrices, and its squared Frobenius norm (which sums over blocks without
rounding the blocks' norms); :class:`_ClosedFormMixin` turns them into the public
``det``, ``logdet`` and ``frobenius_norm`` properties. The module also holds the
checks of factors, eigenvectors and dampings.
"""

from __future__ import annotations

from math import isfinite, sqrt
from numbers import Real

from torch import Tensor, eye, finfo, inf, nan
from torch.linalg import LinAlgError

from curvlinops._checks import check_same_device_and_dtype

#: The scalar functions that each structured operator computes in closed form.
CLOSED_FORMS = ("trace", "det", "logdet", "frobenius_norm")


class _ClosedFormMixin:
    """``det``, ``logdet`` and ``frobenius_norm`` of structured operators.

    Subclasses implement ``_slogdet() -> (sign, logabsdet)``,
    ``_squared_frobenius_norm()``, the property ``trace``, and
    ``inverse(damping)``.
    """

    def _squared_frobenius_norm(self) -> Tensor:
        """Return the squared Frobenius norm.

        Raises:
            NotImplementedError: Must be implemented by the subclass.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `_squared_frobenius_norm`."
        )

    @property
    def frobenius_norm(self) -> Tensor:
        r"""The Frobenius norm :math:`\lVert \mathbf{A} \rVert_F`, in closed form.

        Returns:
            A scalar tensor.
        """
        return self._squared_frobenius_norm().sqrt()

    def _slogdet(self) -> tuple[Tensor, Tensor]:
        """Return the sign and the log-absolute value of the determinant.

        Raises:
            NotImplementedError: Must be implemented by the subclass.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `_slogdet`.")

    @property
    def det(self) -> Tensor:
        r"""The determinant :math:`\det \mathbf{A}`, in closed form.

        Returns:
            The determinant, a scalar tensor (it over- or underflows where
            :attr:`logdet` does not).
        """
        sign, logabsdet = self._slogdet()
        return sign * logabsdet.exp()

    @property
    def logdet(self) -> Tensor:
        r"""The log-determinant :math:`\log \det \mathbf{A}`, in closed form.

        As :func:`torch.logdet`: ``-inf`` for a singular matrix and ``nan`` for a
        negative determinant.

        Returns:
            The log-determinant, a scalar tensor.
        """
        return logdet_from_slogdet(*self._slogdet())


def logdet_from_slogdet(sign: Tensor, logabsdet: Tensor) -> Tensor:
    """Turn sign and log-absolute value of a determinant into its logarithm.

    Args:
        sign: Sign of the determinant (``-1``, ``0`` or ``1``), a scalar tensor.
        logabsdet: Logarithm of the determinant's absolute value.

    Returns:
        ``logabsdet`` for a positive determinant, ``-inf`` for zero, ``nan`` for a
        negative one.
    """
    if sign > 0:
        return logabsdet
    return logabsdet.new_tensor(-inf if sign == 0 else nan)


def slogdet_of_eigenvalues(eigenvalues: Tensor) -> tuple[Tensor, Tensor]:
    """Return sign and log-absolute value of the product of numbers.

    Args:
        eigenvalues: The numbers (eigenvalues, diagonal entries), any shape.

    Returns:
        The sign (``-1``, ``0`` or ``1``) and the sum of the logarithms of the
        absolute values, both scalar tensors.
    """
    negative = (eigenvalues < 0).sum() % 2
    sign = (1 - 2 * negative).to(eigenvalues.dtype) * (eigenvalues != 0).all()
    return sign, eigenvalues.abs().log().sum()


def check_damping(damping: float) -> float:
    """Verify that a damping is a finite non-negative real number.

    Args:
        damping: Candidate damping (Python or NumPy number).

    Returns:
        The damping as float.

    Raises:
        ValueError: If it is not a finite non-negative real number.
    """
    if (
        isinstance(damping, bool)
        or not isinstance(damping, Real)
        or not isfinite(damping)
    ):
        raise ValueError(f"`damping` must be a finite real number, got {damping!r}.")
    if damping < 0:
        raise ValueError(f"`damping` must be non-negative, got {damping}.")
    return float(damping)


def check_square_matrices(matrices: tuple[Tensor, ...], what: str):
    """Verify that tensors are square floating-point matrices on one device, one dtype.

    Args:
        matrices: Candidate matrices.
        what: Their name in error messages, e.g. ``'factors'``.

    Raises:
        ValueError: If there is none, one is not a square matrix, or dtypes or
            devices differ or are not floating point.
        TypeError: If one is not a tensor.
    """
    if len(matrices) == 0:
        raise ValueError(f"Expected at least one of the {what}, got none.")
    for idx, A in enumerate(matrices):
        if not isinstance(A, Tensor):
            raise TypeError(f"{what}[{idx}] must be a tensor, got {type(A).__name__}.")
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(
                f"{what}[{idx}] must be a square matrix, got shape {list(A.shape)}."
            )
    check_same_device_and_dtype(list(matrices), what)


def check_orthonormal(Q: Tensor, what: str):
    r"""Verify that a square matrix has orthonormal columns, up to rounding.

    The check costs one product :math:`\mathbf{Q}^\top \mathbf{Q}` and tolerates
    entries of :math:`\mathbf{Q}^\top \mathbf{Q} - \mathbf{I}` up to
    :math:`\max(\sqrt{\varepsilon}, 10 n \varepsilon)` (:math:`\varepsilon` the
    dtype's machine precision, :math:`n` the size), which eigenvectors from
    :func:`torch.linalg.eigh` meet.

    Args:
        Q: Square matrix.
        what: Its name in error messages.

    Raises:
        ValueError: If the columns are not orthonormal.
    """
    eps = finfo(Q.dtype).eps
    tolerance = max(sqrt(eps), 10 * len(Q) * eps)
    error = (Q.mT @ Q - eye(len(Q), device=Q.device, dtype=Q.dtype)).abs().max()
    if not error <= tolerance:
        raise ValueError(
            f"The columns of {what} must be orthonormal: max |QᵀQ - I| = "
            f"{error.item():.2e} exceeds {tolerance:.1e}. Pass eigenvectors, e.g. "
            "from torch.linalg.eigh."
        )


def raise_singular(what: str):
    """Raise the error for an inverse that does not exist.

    Args:
        what: Description of the singular matrix.

    Raises:
        LinAlgError: Always.
    """
    raise LinAlgError(
        f"{what} is singular, so its inverse does not exist; pass `damping > 0` to "
        "invert A + damping * I."
    )
