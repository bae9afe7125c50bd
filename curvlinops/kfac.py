r"""Kronecker-factored approximate curvature (KFAC) as a linear operator."""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor, inf
from torch.linalg import matrix_norm, slogdet

from curvlinops._kfac_base import _KFACBase
from curvlinops.kfac_utils import FisherType, KFACType, MetaEnum

__all__ = ["KFACLinearOperator", "FisherType", "KFACType", "MetaEnum", "FactorType"]

#: A Kronecker factor, or a dictionary of them (the type of KFAC's factor caches).
FactorType = TypeVar("FactorType", Tensor, dict[str, Tensor])


class KFACLinearOperator(_KFACBase):
    r"""Kronecker-factored approximation (KFAC) of the Fisher, GGN, or empirical Fisher.

    KFAC approximates the curvature block of each supported layer (``Linear`` and
    ``Conv2d``) with weight :math:`\mathbf{W} \in \mathbb{R}^{D_\text{out} \times
    D_\text{in}}` (Conv2d kernels flattened over input channels and kernel
    positions) by a Kronecker product; blocks of different layers are zero. With the
    layer's inputs :math:`\mathbf{a}_m` and the backpropagated gradients
    :math:`\mathbf{g}_{m,k}` w.r.t. its outputs over the examples :math:`m =
    1, \dots, M` (data points, or data points times shared positions),

    .. math::
        \mathbf{F}_{\mathbf{W}} \approx \mathbf{G} \otimes \mathbf{A},
        \qquad
        \mathbf{A} = \frac{1}{M} \sum_{m=1}^M \mathbf{a}_m \mathbf{a}_m^\top,
        \qquad
        \mathbf{G} = \sum_{m=1}^M \sum_k \mathbf{g}_{m,k} \mathbf{g}_{m,k}^\top

    in the row-major flattening of :math:`\mathbf{W}`, i.e. it maps
    :math:`\mathbf{V} \mapsto \mathbf{G} \mathbf{V} \mathbf{A}`. The vectors
    backpropagated from the model output :math:`\mathbf{f}_t` of each loss term
    :math:`\ell_t` include the loss's scaling and depend on ``fisher_type``:

    - ``'type-2'``: the columns of :math:`\mathbf{S}_t` with
      :math:`\mathbf{S}_t \mathbf{S}_t^\top = \nabla^2_{\mathbf{f}_t} \ell_t`
      (approximates the GGN),
    - ``'mc'``: :math:`\nabla_{\mathbf{f}_t} \ell(\mathbf{f}_t,
      \tilde{\mathbf{y}}_t) / \sqrt{M_\text{MC}}` for ``mc_samples`` labels
      :math:`\tilde{\mathbf{y}}_t` drawn from the model's likelihood (the Fisher),
    - ``'empirical'``: :math:`\nabla_{\mathbf{f}_t} \ell(\mathbf{f}_t,
      \mathbf{y}_t)` (the empirical Fisher),
    - ``'forward-only'``: none; :math:`\mathbf{G} = \mathbf{I}`.

    The vectors carry the loss's normalization, as in curvlinops 3.0.1: with
    ``reduction='sum'`` none, with ``'mean'`` the average over the data points and
    over all loss terms of each (sequence positions; the outputs of ``MSELoss`` and
    ``BCEWithLogitsLoss``), exactly as the loss averages, so that ``'type-2'`` KFAC
    of a deep linear network with square loss equals the GGN's diagonal blocks, at
    the GGN's scale (``loss_average`` chooses another scaling). A bias
    either joins its weight's block (inputs :math:`(\mathbf{a}_m^\top, 1)^\top`)
    or forms a block :math:`\mathbf{G}` of its own
    (``separate_weight_and_bias=True``). For weights shared over positions
    (sequences, pixels), ``kfac_approx='expand'`` treats every position as an
    example while ``'reduce'`` averages the inputs and sums the gradients over the
    positions of each data point first.

    The factors are computed in one pass over the data, when first needed or by
    :meth:`compute_kronecker_factors`, and cached (once, also when threads ask
    at the same time); create a new operator (or call
    :meth:`compute_kronecker_factors` again) after the model changes. If the
    model's parameters were replaced by other tensors (``load_state_dict(...,
    assign=True)``), computing the factors raises an error that names the
    parameter: create a new operator. Products and the properties :attr:`trace`,
    :attr:`det`, :attr:`logdet` and :attr:`frobenius_norm` (cached) only use the
    factors. :meth:`state_dict`, :meth:`load_state_dict` and
    :meth:`from_state_dict` save and restore the operator in curvlinops 3.0.1's
    layout; a state that does not fit (another architecture, loss or layers)
    raises before operator or model change. ``_mapping`` maps the name of every
    layer with parameters to ``{'weight': i, 'bias': j}``, their positions in
    ``params``; ``_input_covariances`` and ``_gradient_covariances`` hold the
    factors :math:`\mathbf{A}` and :math:`\mathbf{G}` by layer name. The
    operator is self-adjoint.

    Data-parallel (``process_group``), each rank passes its shard of the data and
    the factors are summed over the ranks with one all-reduce per pass, so that
    every rank holds the KFAC of all ranks' data (for ``'mc'``, with rank-dependent
    label samples, see ``process_group``).

    References: `Martens & Grosse, 2015 <https://arxiv.org/abs/1503.05671>`_ (MLPs),
    `Grosse & Martens, 2016 <https://arxiv.org/abs/1602.01407>`_ (convolutions),
    `Eschenhagen et al., 2023 <https://arxiv.org/abs/2311.00636>`_ (weight sharing,
    expand and reduce).

    Example:
        >>> from torch import eye, manual_seed, rand
        >>> from torch.nn import Linear, MSELoss, Sequential
        >>> from curvlinops import GGNLinearOperator
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), Linear(3, 2))  # deep linear network
        >>> params, data = list(model.parameters()), [(rand(8, 4), rand(8, 2))]
        >>> K = KFACLinearOperator(model, MSELoss(), params, data, fisher_type="type-2")
        >>> G = GGNLinearOperator(model, MSELoss(), params, data)
        >>> W0 = slice(0, 12)  # first layer's weight
        >>> (K @ eye(K.shape[1]))[W0, W0].allclose((G @ eye(G.shape[1]))[W0, W0])
        True
        >>> K.trace.allclose((K @ eye(K.shape[1])).trace())
        True
        >>> K._mapping
        {'0': {'weight': 0, 'bias': 1}, '1': {'weight': 2, 'bias': 3}}

    Attributes:
        SELF_ADJOINT: ``True``.
        _SUPPORTED_LOSSES: The supported loss functions.
        _SUPPORTED_MODULES: The supported layers.
        _SUPPORTED_FISHER_TYPE: The supported values of ``fisher_type``.
        _SUPPORTED_KFAC_APPROX: The supported values of ``kfac_approx``.
    """

    def _factor_pairs(self) -> list[tuple[Tensor | None, Tensor]]:
        """Return the Kronecker factors of every canonical block.

        Returns:
            Pairs ``(A, G)`` in block order; ``A`` is ``None`` for bias blocks.
        """
        with self._lock:  # a consistent set while another thread may recompute
            self._ensure_factors()
            return [
                (
                    None if role == "b" else self._input_covariances[layer],
                    self._gradient_covariances[layer],
                )
                for layer, role in self._block_keys
            ]

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the block-diagonal Kronecker matrix onto a matrix.

        Args:
            M: Tensors ``[*param.shape, K]``.

        Returns:
            The product, tensors ``[*param.shape, K]``.
        """
        matmats = [
            lambda m, A=A, G=G: _kronecker_matmat(m, G, A)
            for A, G in self._factor_pairs()
        ]
        return self._blockwise(M, matmats)

    @property
    def trace(self) -> Tensor:
        r"""The trace, from the factors (cached until they change).

        Per block, :math:`\mathrm{tr}(\mathbf{G} \otimes \mathbf{A}) =
        \mathrm{tr}(\mathbf{G}) \mathrm{tr}(\mathbf{A})`.

        Returns:
            The trace, a scalar tensor.
        """
        return self._cached(
            "trace",
            lambda: sum(
                G.trace() * (1.0 if A is None else A.trace())
                for A, G in self._factor_pairs()
            ),
        )

    @property
    def logdet(self) -> Tensor:
        r"""The log-determinant, from the factors (cached until they change).

        Per block, :math:`\log\det(\mathbf{G} \otimes \mathbf{A}) = D_\mathbf{A}
        \log\det \mathbf{G} + D_\mathbf{G} \log\det \mathbf{A}`.

        Returns:
            The log-determinant; ``-inf`` if a factor is singular.
        """
        return self._cached("logdet", self._compute_logdet)

    def _compute_logdet(self) -> Tensor:
        """Compute the log-determinant from the factors.

        Returns:
            The log-determinant; ``-inf`` if a factor is singular.
        """
        result = self._zeros(())
        for A, G in self._factor_pairs():
            if A is not None:
                result = result + len(G) * _logdet_psd(A)
            result = result + (1 if A is None else len(A)) * _logdet_psd(G)
        return result

    @property
    def det(self) -> Tensor:
        """The determinant, via :attr:`logdet` (cached until the factors change).

        Returns:
            The determinant, a scalar tensor.
        """
        return self._cached("det", lambda: self.logdet.exp())

    @property
    def frobenius_norm(self) -> Tensor:
        r"""The Frobenius norm, from the factors (cached until they change).

        Per block, :math:`\|\mathbf{G} \otimes \mathbf{A}\|_F = \|\mathbf{G}\|_F
        \|\mathbf{A}\|_F`.

        Returns:
            The Frobenius norm, a scalar tensor.
        """
        return self._cached(
            "frobenius_norm",
            lambda: sum(
                matrix_norm(G) ** 2 * (1.0 if A is None else matrix_norm(A) ** 2)
                for A, G in self._factor_pairs()
            ).sqrt(),
        )


def _logdet_psd(matrix: Tensor) -> Tensor:
    """Compute the log-determinant of a positive semi-definite matrix.

    Args:
        matrix: Symmetric positive semi-definite matrix.

    Returns:
        The log-determinant; ``-inf`` if the matrix is (numerically) singular.
    """
    sign, logabsdet = slogdet(matrix)
    return logabsdet if sign > 0 else logabsdet.new_tensor(-inf)


def _kronecker_matmat(M: Tensor, left: Tensor, right: Tensor | None) -> Tensor:
    r"""Multiply :math:`\mathbf{L} \otimes \mathbf{R}` onto flattened matrices.

    Args:
        M: Columns ``[D_L * D_R, K]``, each a row-major flattened ``[D_L, D_R]``
            matrix :math:`\mathbf{V}`.
        left: :math:`\mathbf{L}`, ``[D_L, D_L]``.
        right: :math:`\mathbf{R}`, ``[D_R, D_R]``, or ``None`` for ``D_R = 1``.

    Returns:
        The columns :math:`\mathbf{L} \mathbf{V} \mathbf{R}^\top`, ``[D_L * D_R, K]``.
    """
    if right is None:
        return left @ M
    num_cols = M.shape[-1]
    V = M.reshape(left.shape[1], right.shape[1], num_cols).permute(2, 0, 1)
    return (left @ V @ right.T).permute(1, 2, 0).reshape(-1, num_cols)


def _eigenbasis_matmat(
    M: Tensor, left: Tensor, right: Tensor | None, eigenvalues: Tensor
) -> Tensor:
    r"""Multiply a matrix with Kronecker-structured eigenvectors onto flattened ones.

    Computes :math:`(\mathbf{Q}_L \otimes \mathbf{Q}_R) \mathrm{diag}(\mathrm{vec}
    \mathbf{\Lambda}) (\mathbf{Q}_L \otimes \mathbf{Q}_R)^\top \mathbf{m}` for each
    column :math:`\mathbf{m}`.

    Args:
        M: Columns ``[D_L * D_R, K]``.
        left: Orthogonal :math:`\mathbf{Q}_L`, ``[D_L, D_L]``.
        right: Orthogonal :math:`\mathbf{Q}_R`, ``[D_R, D_R]``, or ``None`` for
            ``D_R = 1``.
        eigenvalues: :math:`\mathbf{\Lambda}`, ``[D_L, D_R]`` (``[D_L]`` if
            ``right`` is ``None``).

    Returns:
        The product, ``[D_L * D_R, K]``.
    """
    rotated = _kronecker_matmat(M, left.T, None if right is None else right.T)
    rotated = rotated * eigenvalues.reshape(-1, 1)
    return _kronecker_matmat(rotated, left, right)
