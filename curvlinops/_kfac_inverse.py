r"""Inverse of KFAC and EKFAC, block by block from their Kronecker factors.

Public as :class:`curvlinops.inverse.KFACInverseLinearOperator`.
"""

from __future__ import annotations

from math import sqrt
from threading import RLock
from typing import Any, TypeVar

from torch import Tensor, eye, float64
from torch.linalg import cholesky_ex, eigh

from curvlinops._kfac_validation import check_state_keys, inverted_factors_fit
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.kfac import KFACLinearOperator
from curvlinops.structured import (
    BlockDiagonalLinearOperator,
    EighDecomposedLinearOperator,
    KroneckerProductLinearOperator,
)

_OPTIONS = (
    "damping",
    "use_heuristic_damping",
    "min_damping",
    "use_exact_damping",
    "cache",
    "retry_double_precision",
)

#: The type of a cached inverted Kronecker factor (curvlinops 3.x's name).
KFACInvType = TypeVar("KFACInvType", Tensor, dict[str, Tensor])


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
    recomputing the factors of ``A``). Products from several threads take turns;
    copies and pickles rebuild the functions that apply the inverse on first use.
    The operator is self-adjoint.

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
    # Rebuilt after copying: the lock and the structured inverse.
    _TRANSIENT = ("_lock", "_cached_structured")

    def __init__(
        self,
        A: KFACLinearOperator | EKFACLinearOperator,
        damping: float | tuple[float, float] = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        cache: bool = True,
        retry_double_precision: bool = True,
    ):
        r"""Store the operator to invert and how to damp it.

        Args:
            A: The KFAC or EKFAC operator.
            damping: Damping :math:`\delta \ge 0`, or a pair
                :math:`(\delta_\mathbf{A}, \delta_\mathbf{G})` of dampings for the
                two factors (factor damping of KFAC only; bias blocks take
                :math:`\delta_\mathbf{G}`).
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
        """
        if not isinstance(A, (KFACLinearOperator, EKFACLinearOperator)):
            raise TypeError(
                "Expected a KFACLinearOperator or EKFACLinearOperator, got "
                f"{type(A).__name__}."
            )
        self._A = A
        self._lock = RLock()
        self._configure(
            damping,
            use_heuristic_damping,
            min_damping,
            use_exact_damping,
            cache,
            retry_double_precision,
        )
        super().__init__(A._in_shape, A._out_shape, A.device, A.dtype)

    def _configure(
        self,
        damping: float | tuple[float, float],
        use_heuristic_damping: bool,
        min_damping: float,
        use_exact_damping: bool,
        cache: bool,
        retry_double_precision: bool,
    ):
        """Check and store the damping options; forget inverted factors.

        Args:
            damping: See the constructor.
            use_heuristic_damping: See the constructor.
            min_damping: See the constructor.
            use_exact_damping: See the constructor.
            cache: See the constructor.
            retry_double_precision: See the constructor.
        """
        dampings = self._check_options(
            damping, use_heuristic_damping, min_damping, use_exact_damping
        )
        self._damping, self._min_damping = damping, min_damping
        self._damping_A, self._damping_G = dampings
        self._use_heuristic_damping = use_heuristic_damping
        self._use_exact_damping = use_exact_damping
        self._cache, self._retry = cache, retry_double_precision
        self._cached_structured: BlockDiagonalLinearOperator | None = None
        self._inverse_input_covariances: dict[str, Tensor] = {}
        self._inverse_gradient_covariances: dict[str, Tensor] = {}

    def _check_options(
        self,
        damping: float | tuple[float, float],
        use_heuristic_damping: bool,
        min_damping: float,
        use_exact_damping: bool,
    ) -> tuple[float, float]:
        """Check the damping options.

        Args:
            damping: See the constructor.
            use_heuristic_damping: See the constructor.
            min_damping: See the constructor.
            use_exact_damping: See the constructor.

        Returns:
            The dampings of the two factors.

        Raises:
            ValueError: If a damping is negative or the damping options conflict.
        """
        pair = isinstance(damping, (tuple, list))
        dampings = tuple(damping) if pair else (damping, damping)
        if len(dampings) != 2 or min(*dampings, min_damping) < 0:
            raise ValueError(
                "Dampings must be a non-negative number or pair, got "
                f"{damping=} and {min_damping=}."
            )
        ekfac = isinstance(self._A, EKFACLinearOperator)
        if use_heuristic_damping and (use_exact_damping or ekfac):
            raise ValueError(
                "Heuristic damping applies to KFAC's two factors; it cannot be "
                "combined with exact damping or EKFAC."
            )
        if pair and (use_heuristic_damping or use_exact_damping or ekfac):
            raise ValueError(
                "A pair of dampings applies to KFAC's two factors; it cannot be "
                "combined with heuristic or exact damping or EKFAC."
            )
        return dampings

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        """Multiply the block-diagonal inverse onto a matrix.

        Args:
            X: Tensors ``[*param.shape, K]``.

        Returns:
            The product, tensors ``[*param.shape, K]``.
        """
        return self._A._blockwise(X, self.to_structured().blocks)

    def to_structured(self) -> BlockDiagonalLinearOperator:
        r"""Return the inverse as a block-diagonal structured operator.

        It acts on the canonical form, like ``A.to_structured()``: the inverse is
        :math:`\mathbf{P}^\top \mathbf{B} \mathbf{P}` with the orthogonal
        permutation :math:`\mathbf{P}` into it
        (:class:`~curvlinops.kfac_utils.ToCanonicalLinearOperator`). Cached if
        ``cache``.

        Returns:
            A :class:`~curvlinops.BlockDiagonalLinearOperator` with one block per
            canonical block: the :class:`~curvlinops.KroneckerProductLinearOperator`
            of the inverted damped factors (a matrix for a separate bias), or an
            :class:`~curvlinops.EighDecomposedLinearOperator` for exact damping and
            EKFAC.
        """
        with self._lock:  # threads share the cached inverses
            inverse = self._cached_structured or BlockDiagonalLinearOperator(
                self._inverted_blocks()
            )
            if self._cache:
                self._cached_structured = inverse
            return inverse

    def _damps_factors(self) -> bool:
        """Return whether the damping goes to KFAC's two factors.

        Returns:
            Whether the inverse is built from inverted (damped) factors.
        """
        return not (self._use_exact_damping or isinstance(self._A, EKFACLinearOperator))

    def _inverted_blocks(self) -> list[PyTorchLinearOperator]:
        """Invert every block.

        Returns:
            One operator per canonical block.
        """
        if isinstance(self._A, EKFACLinearOperator):
            return [
                _eigen_inverse(block.eigenvalues, block.eigenvectors, self._damping)
                for block in self._A._structured().blocks
            ]
        if self._use_exact_damping:
            return [
                self._exact_inverse(A_factor, G)
                for A_factor, G in self._A._factor_pairs()
            ]
        A_inv, G_inv = self._kept_inverse_factors()
        blocks = []
        for layer, kind in self._A._block_keys:
            left = G_inv[layer]
            if kind == "b" and self._use_heuristic_damping and layer in A_inv:
                # the heuristic damped the weight's G; a bias block takes `damping`
                G = self._A._gradient_covariances[layer]
                left = self._damped_inverse(G, self._damping_G)
            blocks.append(
                left
                if kind == "b"
                else KroneckerProductLinearOperator(left, A_inv[layer])
            )
        return blocks

    def _kept_inverse_factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Return the cached or loaded inverted factors, else compute them.

        Computed factors are kept if ``cache``.

        Returns:
            See :meth:`_inverse_factors`.
        """
        if self._inverse_gradient_covariances:
            return self._inverse_input_covariances, self._inverse_gradient_covariances
        A_inv, G_inv = self._inverse_factors()  # kept only once all are inverted
        if self._cache:
            self._inverse_input_covariances = A_inv
            self._inverse_gradient_covariances = G_inv
        return A_inv, G_inv

    def _inverse_factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Invert the damped factors of every layer.

        The factors of a layer's weight (or joint weight and bias) block; a
        separate bias block shares the inverted gradient covariance, except with
        the heuristic, whose damping applies to weight blocks only.

        Returns:
            Inverted input covariances (layers whose weight is a parameter) and
            inverted gradient covariances (all layers), by layer name.
        """
        self._A._ensure_factors()
        A_inv, G_inv = {}, {}
        for layer in self._A._mapping:
            A = self._A._input_covariances.get(layer)
            G = self._A._gradient_covariances[layer]
            damping_A, damping_G = self._factor_dampings(A, G)
            if A is not None:
                A_inv[layer] = self._damped_inverse(A, damping_A)
            G_inv[layer] = self._damped_inverse(G, damping_G)
        return A_inv, G_inv

    def state_dict(self) -> dict[str, Any]:
        """Return the state of ``A``, the damping options and the inverted factors.

        The layout is that of curvlinops 3.0.1: ``A`` (the state dict of the
        operator), ``damping``, ``use_heuristic_damping``, ``min_damping``,
        ``use_exact_damping``, ``cache``, ``retry_double_precision``, and
        ``inverse_input_covariances``, ``inverse_gradient_covariances`` (the
        inverted damped factors by layer name, computed unless ``cache=False``;
        empty for exact damping and EKFAC, whose inverses come from
        eigendecompositions that are recomputed after loading).

        Returns:
            A dictionary for :meth:`load_state_dict` (and ``torch.save``).
        """
        inverses = ({}, {})
        if self._damps_factors() and self._cache:
            with self._lock:
                inverses = self._kept_inverse_factors()
        return {
            "A": self._A.state_dict(),
            "damping": self._damping,
            "use_heuristic_damping": self._use_heuristic_damping,
            "min_damping": self._min_damping,
            "use_exact_damping": self._use_exact_damping,
            "cache": self._cache,
            "retry_double_precision": self._retry,
            "inverse_input_covariances": dict(inverses[0]),
            "inverse_gradient_covariances": dict(inverses[1]),
        }

    def load_state_dict(self, state_dict: dict[str, Any]):
        """Load ``A``'s state, the damping options and the inverted factors.

        Accepts the state dicts of :meth:`state_dict` and of curvlinops 3.0.1.
        Options and ``A``'s state are checked before anything is loaded, so that
        a state that does not fit changes neither the inverse nor ``A`` (nor its
        model). Inverted factors that do not fit ``A``'s layers, or that exact
        damping and EKFAC do not use, are ignored and recomputed when needed.

        Args:
            state_dict: The dictionary to load.

        Raises:
            ValueError: If keys are missing, the damping options are invalid, or
                ``A``'s state does not fit ``A`` (see its ``load_state_dict``).
        """
        inverses = ["inverse_input_covariances", "inverse_gradient_covariances"]
        check_state_keys(state_dict, ["A", *_OPTIONS, *inverses])
        options = [state_dict[name] for name in _OPTIONS]
        self._check_options(*options[:4])
        with self._lock:
            self._A.load_state_dict(state_dict["A"])
            self._configure(*options)
            A_inv, G_inv = (state_dict[key] for key in inverses)
            fit = inverted_factors_fit(self._A, A_inv, G_inv)
            if self._damps_factors() and self._cache and fit:
                move = self._A._to_operator
                self._inverse_input_covariances = {k: move(v) for k, v in A_inv.items()}
                self._inverse_gradient_covariances = {
                    k: move(v) for k, v in G_inv.items()
                }

    def __setstate__(self, state: dict):
        """Restore a copied or unpickled state, with a new lock.

        Args:
            state: The state from :meth:`__getstate__`.
        """
        super().__setstate__(state)
        self._lock = RLock()

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, Any], A: KFACLinearOperator | EKFACLinearOperator
    ) -> KFACInverseLinearOperator:
        """Create the inverse from a state dict, loading ``A``'s state into ``A``.

        Args:
            state_dict: A state dict of :meth:`state_dict` or of curvlinops 3.0.1.
            A: The KFAC or EKFAC operator (its state is loaded from the dict).

        Returns:
            The inverse operator.
        """
        inverse = cls(A, *(state_dict[name] for name in _OPTIONS))
        inverse.load_state_dict(state_dict)
        return inverse

    def _factor_dampings(self, A: Tensor | None, G: Tensor) -> tuple[float, float]:
        """Return the dampings of the two factors of a block.

        Args:
            A: Input covariance, or ``None`` for bias blocks.
            G: Gradient covariance.

        Returns:
            Dampings of ``A`` and ``G``.
        """
        if A is None or not self._use_heuristic_damping:
            return self._damping_A, self._damping_G
        mean_A = (A.trace() / len(A)).item()
        mean_G = (G.trace() / len(G)).item()
        pi = sqrt(mean_A / mean_G) if mean_A > 0 and mean_G > 0 else 1.0
        root = sqrt(self._damping)
        return max(pi * root, self._min_damping), max(root / pi, self._min_damping)

    def _exact_inverse(self, A: Tensor | None, G: Tensor) -> PyTorchLinearOperator:
        """Invert a block's Kronecker product plus damping exactly.

        Args:
            A: Input covariance, or ``None`` for bias blocks.
            G: Gradient covariance.

        Returns:
            The block's inverse, through the factors' eigendecompositions (their
            eigenvalues clipped at zero, as positive semi-definite matrices).
        """
        eigenvalues_G, QG = eigh(G)
        eigenvalues = eigenvalues_G.clamp(min=0)
        if A is None:
            return _eigen_inverse(eigenvalues, QG, self._damping)
        eigenvalues_A, QA = eigh(A)
        eigenvalues = eigenvalues.outer(eigenvalues_A.clamp(min=0))
        Q = KroneckerProductLinearOperator(QG, QA)
        return _eigen_inverse(eigenvalues, Q, self._damping)

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


def _eigen_inverse(
    eigenvalues: Tensor,
    eigenvectors: Tensor | KroneckerProductLinearOperator,
    damping: float,
) -> EighDecomposedLinearOperator:
    """Return the damped inverse of an eigendecomposed block.

    Unlike ``EighDecomposedLinearOperator.inverse``, a zero damped eigenvalue (for
    ``damping=0``) gives an infinite inverse eigenvalue, not an error, as the
    inverse always has.

    Args:
        eigenvalues: Eigenvalues ``[D_G, D_A]`` (``[D_G]`` for bias blocks).
        eigenvectors: ``Q_G ⊗ Q_A`` as Kronecker product (``Q_G`` for bias blocks).
        damping: Damping added to the eigenvalues.

    Returns:
        The block's inverse.
    """
    return EighDecomposedLinearOperator(
        1.0 / (eigenvalues + damping), eigenvectors, check_orthonormal=False
    )
