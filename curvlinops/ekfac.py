r"""Eigenvalue-corrected KFAC (EKFAC) as a linear operator."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.linalg import eigh

from curvlinops._ekfac_correction import (
    bias_corrected_eigenvalues,
    compute_eigenvalue_correction_linear_weight_sharing,  # noqa: F401 (3.0.1 name)
    corrected_eigenvalues,
)
from curvlinops._execution import with_autograd
from curvlinops._kfac_base import _KFACBase
from curvlinops.kfac_utils import (
    FisherType,
    KFACType,  # noqa: F401 (importable here, as in 3.x)
)
from curvlinops.structured import (
    BlockDiagonalLinearOperator,
    EighDecomposedLinearOperator,
    KroneckerProductLinearOperator,
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
    second moments of the per-datum gradients in that basis (`George et al., 2018
    <https://arxiv.org/abs/1806.03884>`_). For datum :math:`n` and backpropagated
    vector :math:`k` (see KFAC's ``fisher_type``), a weight shared over the
    positions :math:`p` of the datum (sequence positions, output pixels; one
    position without sharing) has the gradient :math:`\nabla_{n,k} = \sum_p
    \mathbf{g}_{n,p,k} \mathbf{a}_{n,p}^\top`, and

    .. math::
        \mathbf{F}_{\mathbf{W}} \approx
        (\mathbf{Q}_\mathbf{G} \otimes \mathbf{Q}_\mathbf{A})\,
        \mathrm{diag}(\mathrm{vec}\,\mathbf{\Lambda})\,
        (\mathbf{Q}_\mathbf{G} \otimes \mathbf{Q}_\mathbf{A})^\top,
        \qquad
        \Lambda_{ij} = \sum_{n, k}
        \left(\mathbf{Q}_\mathbf{G}^\top \nabla_{n,k}\,
        \mathbf{Q}_\mathbf{A}\right)_{ij}^2\,,

    for ``kfac_approx='expand'`` and ``'reduce'`` alike (they differ in the
    eigenbasis only). These are the diagonal entries of :math:`\sum_{n,k}
    \mathrm{vec}(\nabla_{n,k}) \mathrm{vec}(\nabla_{n,k})^\top` in KFAC's
    eigenbasis, the best diagonal there in Frobenius norm. With one loss term per
    data point, that sum is the exact curvature block (``'type-2'``: the GGN,
    ``'empirical'``: the empirical Fisher), and where KFAC is exact, EKFAC equals
    KFAC. With several loss terms per data point (e.g. one per token), the vectors
    of all terms of a datum are backpropagated together, so :math:`\nabla_{n,k}`
    also carries products between the datum's terms (zero in expectation for
    ``'mc'``). The computation never forms per-datum gradients where rotating the
    rows into the eigenbasis first is cheaper (it picks the contraction order with
    the fewest operations); grouped convolutions use each group's own input
    patches.

    Computing EKFAC takes two passes over the data: one for KFAC's factors, one
    for the corrected eigenvalues (with the same MC samples). ``'forward-only'`` is
    not supported. The operator is self-adjoint; its inverse is
    ``(Q_G ⊗ Q_A) diag(1 / (Λ + δ)) (Q_G ⊗ Q_A)ᵀ`` (:meth:`inverse`).
    :meth:`to_structured` gives EKFAC as a
    :class:`~curvlinops.BlockDiagonalLinearOperator` of
    :class:`~curvlinops.EighDecomposedLinearOperator` blocks on the canonical form,
    whose closed forms give ``trace``, ``det``, ``logdet`` and ``frobenius_norm``.

    The eigenbasis and eigenvalues are computed when first needed and cached; they
    go stale when the model's parameters (or the data) change. Refresh both with
    :meth:`compute_kronecker_factors`, or only the eigenvalues in the cached basis
    with :meth:`compute_eigenvalue_correction` (one pass; as in the paper, between
    less frequent basis updates). Both publish their results only once their
    passes have succeeded: after an error or interrupt (e.g. in the data), the
    operator is as before and a retry computes the right values.

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
        ``_gradient_covariances``. The cache changes only
        once both passes have succeeded: after an error or interrupt, the operator
        is as before.
        """
        A, G = self._accumulated_factors()
        QA = {layer: eigh(C).eigenvectors for layer, C in A.items()}
        QG = {layer: eigh(C).eigenvectors for layer, C in G.items()}
        self._publish_factors(
            _corrected_eigenvalues=self._corrected_eigenvalues_pass(QA, QG),
            _input_covariances_eigenvectors=QA,
            _gradient_covariances_eigenvectors=QG,
            _input_covariances=A,
            _gradient_covariances=G,
        )

    @with_autograd
    def compute_eigenvalue_correction(self):
        """Compute the corrected eigenvalues in the cached eigenbasis (one pass).

        Computes the eigenbasis first (:meth:`compute_kronecker_factors`) if it is
        not cached. The cache changes only once the pass has succeeded.
        """
        if not self._factors_ready:
            self.compute_kronecker_factors()
            return
        self._publish_factors(
            _corrected_eigenvalues=self._corrected_eigenvalues_pass(
                self._input_covariances_eigenvectors,
                self._gradient_covariances_eigenvectors,
            )
        )

    def _corrected_eigenvalues_pass(
        self, QA: dict[str, Tensor], QG: dict[str, Tensor]
    ) -> dict[tuple[str, str], Tensor]:
        """Sum the squared per-datum gradients in the eigenbasis over the data.

        Args:
            QA: Eigenvectors of the input covariances, by layer name.
            QG: Eigenvectors of the gradient covariances, by layer name.

        Returns:
            The corrected eigenvalues by block key, summed over the ranks.
        """
        eigenvalues = {}
        for layer, kind in self._block_keys:
            in_dim = () if kind == "b" else (len(QA[layer]),)
            eigenvalues[(layer, kind)] = self._zeros(len(QG[layer]), *in_dim)
        inputs = {}

        def on_input(layer: str, rows: Tensor):
            inputs[layer] = rows

        def on_output_grad(layer: str, rows: Tensor):
            for kind in ("W", "b", "Wb"):
                if (layer, kind) not in eigenvalues:
                    continue
                if kind == "b":
                    value = bias_corrected_eigenvalues(rows, QG[layer])
                else:
                    value = corrected_eigenvalues(
                        rows, QG[layer], inputs[layer], QA[layer]
                    )
                eigenvalues[(layer, kind)].add_(value)

        self._data_pass(on_input, on_output_grad, per_datum=True)
        self._sum_over_ranks([eigenvalues])
        return eigenvalues

    def to_structured(self) -> BlockDiagonalLinearOperator:
        r"""Return EKFAC as a block-diagonal operator of eigendecompositions.

        Its products, closed forms and ``inverse(damping)`` are those of EKFAC,
        for which the operator is :math:`\mathbf{P}^\top \mathbf{B} \mathbf{P}`
        with the orthogonal permutation :math:`\mathbf{P}` into the canonical form
        (:class:`~curvlinops.kfac_utils.ToCanonicalLinearOperator`).

        Returns:
            A :class:`~curvlinops.BlockDiagonalLinearOperator` with one
            :class:`~curvlinops.EighDecomposedLinearOperator` per canonical block,
            in block order: eigenvalues :math:`\mathbf{\Lambda}` ``[D_out,
            D_in]`` with the eigenvectors :math:`\mathbf{Q}_\mathbf{G} \otimes
            \mathbf{Q}_\mathbf{A}` (a
            :class:`~curvlinops.KroneckerProductLinearOperator`) on a ``[D_out,
            D_in]`` matrix (a weight flattened into rows, with the bias as last
            column for joint blocks), or eigenvalues ``[D_out]`` with the matrix
            :math:`\mathbf{Q}_\mathbf{G}` for a separate bias.

        Example:
            >>> from torch import eye, manual_seed, rand
            >>> from torch.nn import Linear, MSELoss, Sequential
            >>> _ = manual_seed(0)
            >>> model = Sequential(Linear(3, 2), Linear(2, 2))
            >>> params, data = list(model.parameters()), [(rand(8, 3), rand(8, 2))]
            >>> E = EKFACLinearOperator(model, MSELoss(), params, data)
            >>> B = E.to_structured()
            >>> B.blocks[0].eigenvalues.shape  # first layer's weight
            torch.Size([2, 3])
            >>> P = E._to_canonical @ eye(E.shape[1])
            >>> (P.T @ (B @ P)).allclose(E @ eye(E.shape[1]))
            True
        """
        self._ensure_factors()
        blocks = []
        for layer, kind in self._block_keys:
            Q = self._gradient_covariances_eigenvectors[layer]
            if kind != "b":
                QA = self._input_covariances_eigenvectors[layer]
                Q = KroneckerProductLinearOperator(Q, QA)
            E = self._corrected_eigenvalues[(layer, kind)]
            blocks.append(EighDecomposedLinearOperator(E, Q, check_orthonormal=False))
        return BlockDiagonalLinearOperator(blocks)
