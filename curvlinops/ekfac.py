r"""Eigenvalue-corrected KFAC (EKFAC) as a linear operator."""

from __future__ import annotations

from typing import Any

from torch import Tensor, einsum
from torch.linalg import eigh

from curvlinops._execution import with_autograd
from curvlinops._kfac_base import _KFACBase
from curvlinops.kfac import _eigenbasis_matmat
from curvlinops.kfac_utils import (
    FisherType,
    KFACType,  # noqa: F401 (importable here, as in 3.x)
)


class EKFACLinearOperator(_KFACBase):
    r"""Eigenvalue-corrected KFAC (EKFAC) of the Fisher, GGN, or empirical Fisher.

    KFAC approximates a layer's curvature block by :math:`\mathbf{G} \otimes
    \mathbf{A}`; see :class:`curvlinops.KFACLinearOperator` for the factors and all
    arguments. With the eigendecompositions :math:`\mathbf{A} = \mathbf{Q}_\mathbf{A}
    \mathbf{\Lambda}_\mathbf{A} \mathbf{Q}_\mathbf{A}^\top` and :math:`\mathbf{G} =
    \mathbf{Q}_\mathbf{G} \mathbf{\Lambda}_\mathbf{G} \mathbf{Q}_\mathbf{G}^\top`,
    EKFAC keeps KFAC's eigenbasis but replaces the eigenvalues
    :math:`\mathbf{\Lambda}_\mathbf{G} \otimes \mathbf{\Lambda}_\mathbf{A}` by the
    second moments of the per-example gradients
    :math:`\mathbf{g}_{m,k} \mathbf{a}_m^\top` in that basis (`George et al., 2018
    <https://arxiv.org/abs/1806.03884>`_),

    .. math::
        \mathbf{F}_{\mathbf{W}} \approx
        (\mathbf{Q}_\mathbf{G} \otimes \mathbf{Q}_\mathbf{A})\,
        \mathrm{diag}(\mathrm{vec}\,\mathbf{\Lambda})\,
        (\mathbf{Q}_\mathbf{G} \otimes \mathbf{Q}_\mathbf{A})^\top,
        \qquad
        \Lambda_{ij} = \sum_{m, k}
        \left(\mathbf{Q}_\mathbf{G}^\top \mathbf{g}_{m,k}\right)_i^2
        \left(\mathbf{Q}_\mathbf{A}^\top \mathbf{a}_m\right)_j^2\,.

    These are the diagonal entries of the per-example outer-product sum
    :math:`\sum_{m,k} \mathrm{vec}(\mathbf{g}_{m,k} \mathbf{a}_m^\top)
    \mathrm{vec}(\cdot)^\top` in KFAC's eigenbasis, the best diagonal there in
    Frobenius norm. Without weight sharing and with one loss term per data point,
    that sum is the exact curvature block (``'type-2'``: the GGN,
    ``'empirical'``: the empirical Fisher). Where KFAC is exact, EKFAC equals KFAC.

    Computing EKFAC takes two passes over the data: one for KFAC's factors, one
    for the corrected eigenvalues (with the same MC samples). ``'forward-only'`` is
    not supported. The operator is self-adjoint; its inverse is
    ``(Q_G ⊗ Q_A) diag(1 / (Λ + δ)) (Q_G ⊗ Q_A)ᵀ`` (:meth:`inverse`).

    Data-parallel (``process_group``), both passes sum their results (KFAC's
    factors, then the corrected eigenvalues) over the ranks with one all-reduce
    each; every rank computes the eigenbasis from the same summed factors (ranks
    must therefore use the same hardware and libraries to agree bit by bit).

    Example:
        >>> from torch import eye, manual_seed, rand, randint
        >>> from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh
        >>> from curvlinops import KFACLinearOperator
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), Tanh(), Linear(3, 2))
        >>> params, data = list(model.parameters()), [(rand(6, 4), randint(2, (6,)))]
        >>> kwargs = {"fisher_type": "type-2"}
        >>> E = EKFACLinearOperator(model, CrossEntropyLoss(), params, data, **kwargs)
        >>> K = KFACLinearOperator(model, CrossEntropyLoss(), params, data, **kwargs)
        >>> E.shape == K.shape
        True
        >>> # same eigenbasis, different eigenvalues: the traces differ
        >>> bool((E.trace - K.trace).abs() > 1e-6)
        True
        >>> E.trace.allclose((E @ eye(E.shape[1])).trace())
        True

    Attributes:
        SELF_ADJOINT: ``True``.
        _SUPPORTED_FISHER_TYPE: The supported values of ``fisher_type`` (all but
            ``'forward-only'``).
    """

    _SUPPORTED_FISHER_TYPE = tuple(
        f for f in FisherType if f != FisherType.FORWARD_ONLY
    )
    _EXTRA_STATE = {
        "input_covariances_eigenvectors": (
            "_input_covariances_eigenvectors",
            "weights",
        ),
        "gradient_covariances_eigenvectors": (
            "_gradient_covariances_eigenvectors",
            "layers",
        ),
        "cached_activations": ("", "empty"),  # 3.0.1's key; nothing to cache here
        "corrected_eigenvalues": ("_corrected_eigenvalues", "blocks"),
    }

    def _set_hyperparameters(self, hyperparameters: dict[str, Any]):
        """Store the hyperparameters and forget computed factors.

        Args:
            hyperparameters: Values keyed by hyperparameter name.
        """
        super()._set_hyperparameters(hyperparameters)
        self._input_covariances_eigenvectors: dict[str, Tensor] = {}
        self._gradient_covariances_eigenvectors: dict[str, Tensor] = {}
        self._corrected_eigenvalues: dict[tuple[str, str], Tensor] = {}

    @with_autograd
    def compute_kronecker_factors(self):
        """Compute KFAC's eigenbases and the corrected eigenvalues (two passes).

        Fills ``_input_covariances_eigenvectors`` and
        ``_gradient_covariances_eigenvectors`` (keyed by layer name) and
        ``_corrected_eigenvalues`` (keyed by ``(layer, block)`` with block ``'W'``,
        ``'b'`` or ``'Wb'``), and keeps KFAC's ``_input_covariances`` and
        ``_gradient_covariances``.
        """
        super().compute_kronecker_factors()
        for source, target in [
            (self._input_covariances, self._input_covariances_eigenvectors),
            (self._gradient_covariances, self._gradient_covariances_eigenvectors),
        ]:
            target.clear()
            target.update({layer: eigh(C).eigenvectors for layer, C in source.items()})
        self.compute_eigenvalue_correction()

    @with_autograd
    def compute_eigenvalue_correction(self):
        """Compute the corrected eigenvalues in the cached eigenbasis (one pass).

        Computes the eigenbasis first (:meth:`compute_kronecker_factors`) if it is
        not cached.
        """
        QA, QG = (
            self._input_covariances_eigenvectors,
            self._gradient_covariances_eigenvectors,
        )
        if not QG:
            self.compute_kronecker_factors()
            return
        self._corrected_eigenvalues = {}
        for layer, kind in self._block_keys:
            in_dim = () if kind == "b" else (len(QA[layer]),)
            self._corrected_eigenvalues[(layer, kind)] = self._zeros(
                len(QG[layer]), *in_dim
            )
        squared_inputs = {}

        def on_input(layer: str, rows: Tensor):
            squared_inputs[layer] = (rows @ QA[layer]) ** 2

        def on_output_grad(layer: str, rows: Tensor):
            squared_grads = (rows @ QG[layer]) ** 2
            for kind in ("W", "b", "Wb"):
                eigenvalues = self._corrected_eigenvalues.get((layer, kind))
                if eigenvalues is None:
                    continue
                if kind == "b":
                    eigenvalues.add_(squared_grads.sum((0, 1, 2)))
                else:
                    a2 = squared_inputs[layer]
                    eigenvalues.add_(einsum("kbpo,bpi->oi", squared_grads, a2))

        self._data_pass(on_input, on_output_grad)
        self._sum_over_ranks([self._corrected_eigenvalues])

    def _eigen_blocks(self) -> list[tuple[Tensor | None, Tensor, Tensor]]:
        """Return the eigenvectors and corrected eigenvalues of every block.

        Returns:
            Tuples ``(Q_A, Q_G, Λ)`` in block order; ``Q_A`` is ``None`` for bias
            blocks.
        """
        self._ensure_factors()
        return [
            (
                None if kind == "b" else self._input_covariances_eigenvectors[layer],
                self._gradient_covariances_eigenvectors[layer],
                self._corrected_eigenvalues[(layer, kind)],
            )
            for layer, kind in self._block_keys
        ]

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the block-diagonal EKFAC matrix onto a matrix.

        Args:
            M: Tensors ``[*param.shape, K]``.

        Returns:
            The product, tensors ``[*param.shape, K]``.
        """
        matmats = [
            lambda m, QA=QA, QG=QG, E=E: _eigenbasis_matmat(m, QG, QA, E)
            for QA, QG, E in self._eigen_blocks()
        ]
        return self._blockwise(M, matmats)

    @property
    def trace(self) -> Tensor:
        """The trace, the sum of the corrected eigenvalues (cached).

        Returns:
            The trace, a scalar tensor.
        """
        return self._cached(
            "trace", lambda: sum(E.sum() for _, _, E in self._eigen_blocks())
        )

    @property
    def logdet(self) -> Tensor:
        """The log-determinant, from the corrected eigenvalues (cached).

        Returns:
            The log-determinant; ``-inf`` if an eigenvalue is zero.
        """
        return self._cached(
            "logdet", lambda: sum(E.log().sum() for _, _, E in self._eigen_blocks())
        )

    @property
    def det(self) -> Tensor:
        """The determinant, via :attr:`logdet` (cached).

        Returns:
            The determinant, a scalar tensor.
        """
        return self._cached("det", lambda: self.logdet.exp())

    @property
    def frobenius_norm(self) -> Tensor:
        """The Frobenius norm, from the corrected eigenvalues (cached).

        Returns:
            The Frobenius norm, a scalar tensor.
        """
        return self._cached(
            "frobenius_norm",
            lambda: sum((E**2).sum() for _, _, E in self._eigen_blocks()).sqrt(),
        )
