r"""Kronecker-factored approximate curvature (KFAC) as a linear operator."""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor, inf
from torch.linalg import slogdet

from curvlinops._kfac_base import _KFACBase
from curvlinops.kfac_utils import FisherType, KFACType, MetaEnum
from curvlinops.structured import (
    BlockDiagonalLinearOperator,
    KroneckerProductLinearOperator,
)

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

    **Any model.** A layer is a weight used by linear maps or 2d convolutions
    (:func:`torch.nn.functional.linear`, :func:`~torch.nn.functional.conv2d`, as in
    ``Linear`` and ``Conv2d`` modules, or called directly; also ``x @ W.T`` and
    the two linear maps of ``RNNCell``, ``LSTMCell`` and ``GRUCell``), with the
    bias those calls add. KFAC watches every such call in the forward pass (see
    ``docs/internals.rst``), so a layer may be called several times (recurrent
    cells, reused blocks), a weight may be shared by several modules, and
    ``model_func`` may be any callable, or a function ``model_func(params, X)`` of
    a parameter dictionary ``params`` (layers named after the dictionary keys). If
    layer :math:`\mathbf{W}` is used by calls :math:`u = 1, \dots, U` with
    :math:`P_u` positions per data point each (sequence positions, output pixels;
    one for vectors), its uses add to the shared axis, of length :math:`R =
    \sum_u P_u`. With inputs :math:`\mathbf{a}_{n,u,p}` and gradients
    :math:`\mathbf{g}_{n,u,p,k}` of data point :math:`n`,

    .. math::
        \text{expand:}\quad
        \mathbf{A} = \frac{1}{NR} \sum_{n,u,p} \mathbf{a}_{n,u,p}
        \mathbf{a}_{n,u,p}^\top, \quad
        \mathbf{G} = \sum_{n,u,p,k} \mathbf{g}_{n,u,p,k}
        \mathbf{g}_{n,u,p,k}^\top;
        \qquad
        \text{reduce:}\quad
        \mathbf{A} = \frac{1}{N} \sum_n \hat{\mathbf{a}}_n
        \hat{\mathbf{a}}_n^\top, \quad
        \mathbf{G} = \sum_{n,k} \hat{\mathbf{g}}_{n,k}
        \hat{\mathbf{g}}_{n,k}^\top,

    with :math:`\hat{\mathbf{a}}_n = \frac{1}{R} \sum_{u,p}
    \mathbf{a}_{n,u,p}` and :math:`\hat{\mathbf{g}}_{n,k} = \sum_{u,p}
    \mathbf{g}_{n,u,p,k}`. Calling a layer once on ``[B, R, D]`` or :math:`R` times
    on ``[B, D]`` slices therefore gives the same factors (EKFAC follows). Reduce
    sums over *all* uses first, not per use: the gradient of a data point is
    :math:`\sum_{u,p} \mathbf{g}_{n,u,p,k} \mathbf{a}_{n,u,p}^\top`, which
    reduce replaces by :math:`\hat{\mathbf{g}}_{n,k} \hat{\mathbf{a}}_n^\top`;
    this is exact if the inputs agree along the whole shared axis, whereas reducing
    each use separately and expanding over the uses would count the uses of one
    data point as independent examples. For type-2 and a loss Hessian
    :math:`\mathbf{H}` w.r.t. each term's output that is the same for all terms
    (square loss), and a network that is linear after the layer, the two are exact
    in the settings of `Eschenhagen et al., 2023
    <https://arxiv.org/abs/2311.00636>`_ (tested for layers used several times):

    - *expand* equals the GGN's block if every loss term depends on the layer
      through exactly one (use, position), every (use, position) feeds exactly one
      term, and :math:`\mathbf{J}^\top \mathbf{H} \mathbf{J}` (Jacobian of the
      term's output w.r.t. the layer output) is the same for all terms, e.g. deep
      linear networks applied position-wise with a loss per position;
    - *reduce* equals it if each data point's loss depends on the layer only
      through the average of its outputs over the shared axis, with the same
      :math:`\mathbf{J}^\top \mathbf{H} \mathbf{J}` for all data points, e.g.
      deep linear networks applied position-wise, then mean-pooled.

    Each is wrong in the other's setting as soon as :math:`R > 1` (expand treats
    the positions of a pooled output as independent examples; reduce mixes the
    gradients of independent terms).

    **Tied embeddings.** A matrix :math:`\mathbf{W} \in \mathbb{R}^{V \times D}`
    that is looked up (:func:`~torch.nn.functional.embedding`, or ``W[idx]`` with
    an integer tensor) and is the weight of linear maps (a tied unembedding) gets
    the factors of its linear uses, :math:`\mathbf{G} \in \mathbb{R}^{V \times
    V}` and :math:`\mathbf{A} \in \mathbb{R}^{D \times D}`; the lookups are left
    out (the matrix counts as a constant there). A lookup :math:`\mathbf{e} =
    \mathbf{W}^\top \mathbf{o}` of a one-hot :math:`\mathbf{o}` has the
    per-example gradient :math:`\mathbf{o} \mathbf{g}_\mathbf{e}^\top`, i.e.
    Kronecker factors :math:`\mathbf{o}\mathbf{o}^\top` (diagonal: token counts)
    on the vocabulary axis and :math:`\mathbf{g}_\mathbf{e}
    \mathbf{g}_\mathbf{e}^\top` on the feature axis, the roles of the two axes
    swapped w.r.t. the unembedding. Their sum is not a Kronecker product, which
    inverse, eigenbasis (EKFAC) and saved factors rely on, and mixing both into one
    pair of factors would create cross terms without curvature scale (token counts
    times input covariances). The result is exactly the KFAC of the model whose
    lookup reads a constant copy of the matrix (tested against the dense GGN). A
    matrix that is only looked up is not supported.

    Parameters in any other operation (e.g. ``x @ W``, ``x + b``, ``layer_norm``)
    raise an error that names the operation and the parameter.

    The factors are computed in one pass over the data, when first needed or by
    :meth:`compute_kronecker_factors`, and cached (once, also when threads ask
    at the same time); create a new operator (or call
    :meth:`compute_kronecker_factors` again) after the model changes. If the
    model's parameters were replaced by other tensors (``load_state_dict(...,
    assign=True)``), computing the factors raises an error that names the
    parameter: create a new operator. Products and the properties :attr:`trace`,
    :attr:`det`, :attr:`logdet` and :attr:`frobenius_norm` (cached) only use the
    factors, through :meth:`to_structured`: KFAC as a
    :class:`~curvlinops.BlockDiagonalLinearOperator` of
    :class:`~curvlinops.KroneckerProductLinearOperator` blocks on the canonical
    form. :meth:`state_dict`, :meth:`load_state_dict` and
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
        >>> # a function of a parameter dictionary that uses one layer twice
        >>> from torch.nn.functional import linear
        >>> def f(p, X):
        ...     return linear(linear(X, p["w"], p["b"]).tanh(), p["w"], p["b"])
        >>> p = {"w": rand(3, 3, requires_grad=True), "b": rand(3, requires_grad=True)}
        >>> K = KFACLinearOperator(f, MSELoss(), p, [(rand(8, 3), rand(8, 3))])
        >>> K._mapping, K.shape
        ({'w': {'weight': 0, 'bias': 1}}, (12, 12))

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

    def to_structured(self) -> BlockDiagonalLinearOperator:
        r"""Return KFAC as a block-diagonal operator of Kronecker products.

        Its products, ``trace``, ``frobenius_norm`` and ``inverse(damping)``
        (exact damping, :math:`(\mathbf{G} \otimes \mathbf{A} + \delta
        \mathbf{I})^{-1}`) are those of KFAC, for which the operator is
        :math:`\mathbf{P}^\top \mathbf{B} \mathbf{P}` with the orthogonal
        permutation :math:`\mathbf{P}` into the canonical form
        (:class:`~curvlinops.kfac_utils.ToCanonicalLinearOperator`).

        Returns:
            A :class:`~curvlinops.BlockDiagonalLinearOperator` with one block per
            canonical block, in block order: the
            :class:`~curvlinops.KroneckerProductLinearOperator` :math:`\mathbf{G}
            \otimes \mathbf{A}` on a ``[D_out, D_in]`` matrix (a weight flattened
            into rows, with the bias as last column for joint blocks), or the
            matrix :math:`\mathbf{G}` for a separate bias. The blocks hold the
            cached factors (computed if needed).

        Example:
            >>> from torch import eye, manual_seed, rand
            >>> from torch.nn import Linear, MSELoss, Sequential
            >>> _ = manual_seed(0)
            >>> model = Sequential(Linear(3, 2), Linear(2, 2))
            >>> params, data = list(model.parameters()), [(rand(8, 3), rand(8, 2))]
            >>> K = KFACLinearOperator(model, MSELoss(), params, data)
            >>> B = K.to_structured()
            >>> [type(block).__name__ for block in B.blocks[:2]]
            ['KroneckerProductLinearOperator', 'TensorLinearOperator']
            >>> P = K._to_canonical @ eye(K.shape[1])
            >>> (P.T @ (B @ P)).allclose(K @ eye(K.shape[1]))
            True
            >>> bool(B.logdet.isclose(K.logdet))
            True
        """
        return BlockDiagonalLinearOperator(
            [
                G if A is None else KroneckerProductLinearOperator(G, A)
                for A, G in self._factor_pairs()
            ]
        )

    @property
    def logdet(self) -> Tensor:
        r"""The log-determinant, from the factors (cached until they change).

        Per block, :math:`\log\det(\mathbf{G} \otimes \mathbf{A}) = D_\mathbf{A}
        \log\det \mathbf{G} + D_\mathbf{G} \log\det \mathbf{A}`, for
        positive semi-definite factors (a factor with a non-positive determinant
        counts as singular, whatever the sign that round-off gives it).

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


def _logdet_psd(matrix: Tensor) -> Tensor:
    """Compute the log-determinant of a positive semi-definite matrix.

    Args:
        matrix: Symmetric positive semi-definite matrix.

    Returns:
        The log-determinant; ``-inf`` if the matrix is (numerically) singular.
    """
    sign, logabsdet = slogdet(matrix)
    return logabsdet if sign > 0 else logabsdet.new_tensor(-inf)
