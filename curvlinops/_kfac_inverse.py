r"""Inverse of KFAC and EKFAC, block by block from their Kronecker factors.

Public as :class:`curvlinops.inverse.KFACInverseLinearOperator`.
"""

from __future__ import annotations

from collections.abc import Callable
from math import sqrt

from torch import Tensor, eye, float64
from torch.linalg import cholesky_ex, eigh

from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.kfac import KFACLinearOperator, _eigenbasis_matmat, _kronecker_matmat


class KFACInverseLinearOperator(PyTorchLinearOperator):
    r"""Inverse of a damped KFAC or EKFAC approximation, block by block.

    For a KFAC block :math:`\mathbf{G} \otimes \mathbf{A}` (see
    :class:`curvlinops.KFACLinearOperator`) and damping :math:`\delta \ge 0`, the
    operator applies

    - by default, :math:`(\mathbf{G} + \delta \mathbf{I})^{-1} \otimes
      (\mathbf{A} + \delta \mathbf{I})^{-1}` (damping added to each factor),
    - with ``use_heuristic_damping``, :math:`(\mathbf{G} + \delta_\mathbf{G}
      \mathbf{I})^{-1} \otimes (\mathbf{A} + \delta_\mathbf{A} \mathbf{I})^{-1}`
      with :math:`\delta_\mathbf{A} = \max(\pi \sqrt{\delta}, \delta_{\min})`,
      :math:`\delta_\mathbf{G} = \max(\sqrt{\delta} / \pi, \delta_{\min})` and
      :math:`\pi^2 = \frac{\mathrm{tr}(\mathbf{A}) / D_\mathbf{A}}
      {\mathrm{tr}(\mathbf{G}) / D_\mathbf{G}}` (`Martens & Grosse, 2015
      <https://arxiv.org/abs/1503.05671>`_, Section 6.3),
    - with ``use_exact_damping``, :math:`(\mathbf{G} \otimes \mathbf{A} + \delta
      \mathbf{I})^{-1}`, through the factors' eigendecompositions.

    Bias blocks :math:`\mathbf{G}` become :math:`(\mathbf{G} + \delta
    \mathbf{I})^{-1}`. For EKFAC, :math:`(\mathbf{Q}_\mathbf{G} \otimes
    \mathbf{Q}_\mathbf{A}) \mathrm{diag}(\mathrm{vec}\,\mathbf{\Lambda} +
    \delta)^{-1} (\mathbf{Q}_\mathbf{G} \otimes \mathbf{Q}_\mathbf{A})^\top`,
    which is exact damping. Factors are inverted with Cholesky decompositions; the
    inverted factors are cached unless ``cache=False`` (create a new inverse after
    recomputing the factors of ``A``). The operator is self-adjoint.

    Example:
        >>> from torch import manual_seed, rand, randint
        >>> from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh
        >>> from curvlinops import KFACLinearOperator
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), Tanh(), Linear(3, 2))
        >>> params, data = list(model.parameters()), [(rand(6, 4), randint(2, (6,)))]
        >>> K = KFACLinearOperator(model, CrossEntropyLoss(), params, data)
        >>> K_inv = KFACInverseLinearOperator(K, damping=1e-2, use_exact_damping=True)
        >>> v = rand(K.shape[1])
        >>> (K_inv @ (K @ v + 1e-2 * v)).allclose(v, atol=1e-4)
        True

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        A: KFACLinearOperator | EKFACLinearOperator,
        damping: float = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        cache: bool = True,
        retry_double_precision: bool = True,
    ):
        r"""Store the operator to invert and how to damp it.

        Args:
            A: The KFAC or EKFAC operator.
            damping: Damping :math:`\delta \ge 0`.
            use_heuristic_damping: Distribute the damping over the two factors
                with the :math:`\pi`-heuristic (KFAC only).
            min_damping: Lower bound of each factor's damping with the heuristic.
            use_exact_damping: Add the damping to the Kronecker product instead of
                its factors (KFAC; EKFAC is always damped exactly).
            cache: Keep the inverted factors after their first use.
            retry_double_precision: If a Cholesky decomposition fails, retry it in
                float64 (for lower-precision factors).

        Raises:
            TypeError: If ``A`` is neither a KFAC nor an EKFAC operator.
            ValueError: If a damping is negative or the damping options conflict.
        """
        if not isinstance(A, (KFACLinearOperator, EKFACLinearOperator)):
            raise TypeError(
                "Expected a KFACLinearOperator or EKFACLinearOperator, got "
                f"{type(A).__name__}."
            )
        if damping < 0 or min_damping < 0:
            raise ValueError(
                f"Dampings must be non-negative, got {damping=} and {min_damping=}."
            )
        if use_heuristic_damping and (
            use_exact_damping or isinstance(A, EKFACLinearOperator)
        ):
            raise ValueError(
                "Heuristic damping applies to KFAC's two factors; it cannot be "
                "combined with exact damping or EKFAC."
            )
        self._A, self._damping, self._min_damping = A, damping, min_damping
        self._use_heuristic_damping = use_heuristic_damping
        self._use_exact_damping = use_exact_damping
        self._cache, self._retry = cache, retry_double_precision
        self._cached_matmats: list[Callable[[Tensor], Tensor]] | None = None
        super().__init__(A._in_shape, A._out_shape, A.device, A.dtype)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the block-diagonal inverse onto a matrix.

        Args:
            M: Tensors ``[*param.shape, K]``.

        Returns:
            The product, tensors ``[*param.shape, K]``.
        """
        matmats = self._cached_matmats or self._inverse_block_matmats()
        if self._cache:
            self._cached_matmats = matmats
        return self._A._blockwise(M, matmats)

    def _inverse_block_matmats(self) -> list[Callable[[Tensor], Tensor]]:
        """Invert every block and return the functions that apply the inverses.

        Returns:
            One function per canonical block.
        """
        if isinstance(self._A, EKFACLinearOperator):
            return [
                _eigen_inverse(QG, QA, E, self._damping)
                for QA, QG, E in self._A._eigen_blocks()
            ]
        if self._use_exact_damping:
            return [
                self._exact_inverse(A_factor, G)
                for A_factor, G in self._A._factor_pairs()
            ]
        return [
            self._factor_inverse(A_factor, G) for A_factor, G in self._A._factor_pairs()
        ]

    def _factor_dampings(self, A: Tensor | None, G: Tensor) -> tuple[float, float]:
        """Return the dampings of the two factors of a block.

        Args:
            A: Input covariance, or ``None`` for bias blocks.
            G: Gradient covariance.

        Returns:
            Dampings of ``A`` and ``G``.
        """
        if A is None or not self._use_heuristic_damping:
            return self._damping, self._damping
        mean_A = (A.trace() / len(A)).item()
        mean_G = (G.trace() / len(G)).item()
        pi = sqrt(mean_A / mean_G) if mean_A > 0 and mean_G > 0 else 1.0
        root = sqrt(self._damping)
        return max(pi * root, self._min_damping), max(root / pi, self._min_damping)

    def _factor_inverse(self, A: Tensor | None, G: Tensor):
        """Invert a block's damped factors.

        Args:
            A: Input covariance, or ``None`` for bias blocks.
            G: Gradient covariance.

        Returns:
            Function that applies the block's inverse.
        """
        damping_A, damping_G = self._factor_dampings(A, G)
        A_inv = None if A is None else self._damped_inverse(A, damping_A)
        G_inv = self._damped_inverse(G, damping_G)
        return lambda m: _kronecker_matmat(m, G_inv, A_inv)

    def _exact_inverse(self, A: Tensor | None, G: Tensor):
        """Invert a block's Kronecker product plus damping exactly.

        Args:
            A: Input covariance, or ``None`` for bias blocks.
            G: Gradient covariance.

        Returns:
            Function that applies the block's inverse.
        """
        eigenvalues_G, QG = eigh(G)
        eigenvalues = eigenvalues_G.clamp(min=0)
        QA = None
        if A is not None:
            eigenvalues_A, QA = eigh(A)
            eigenvalues = eigenvalues.outer(eigenvalues_A.clamp(min=0))
        return _eigen_inverse(QG, QA, eigenvalues, self._damping)

    def _damped_inverse(self, factor: Tensor, damping: float) -> Tensor:
        """Invert a damped symmetric factor via its Cholesky decomposition.

        Args:
            factor: Symmetric positive semi-definite matrix.
            damping: Damping added to its diagonal.

        Returns:
            The inverse of ``factor + damping * I``.

        Raises:
            RuntimeError: If the Cholesky decomposition fails (also in float64,
                if retried).
        """
        dtypes = [factor.dtype]
        if self._retry and factor.dtype != float64:
            dtypes.append(float64)
        for dtype in dtypes:  # damp in the working precision, where it is resolved
            identity = eye(len(factor), dtype=dtype, device=factor.device)
            L, info = cholesky_ex(factor.to(dtype) + damping * identity)
            if info.item() == 0:
                return L.cholesky_inverse().to(factor.dtype)
        raise RuntimeError(
            f"Cholesky decomposition of a damped Kronecker factor ({len(factor)}x"
            f"{len(factor)}, damping {damping}) failed in {dtypes}. Increase the "
            "damping or use `retry_double_precision=True`."
        )


def _eigen_inverse(QG: Tensor, QA: Tensor | None, eigenvalues: Tensor, damping: float):
    """Return the function that applies an eigen-decomposed block's damped inverse.

    Args:
        QG: Eigenvectors of the output side.
        QA: Eigenvectors of the input side, or ``None`` for bias blocks.
        eigenvalues: Eigenvalues ``[D_G, D_A]`` (``[D_G]`` for bias blocks).
        damping: Damping added to the eigenvalues.

    Returns:
        Function that applies the block's inverse.
    """
    inverse_eigenvalues = 1.0 / (eigenvalues + damping)
    return lambda m: _eigenbasis_matmat(m, QG, QA, inverse_eigenvalues)
