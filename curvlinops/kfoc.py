r"""The Frobenius-optimal Kronecker approximation (KFOC) of layers' curvature blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from math import isfinite
from numbers import Real
from typing import Any

from torch import Tensor
from torch.nn import Module

from curvlinops._checks import check_integer
from curvlinops._execution import with_autograd
from curvlinops._kfac_base import _KFACBase
from curvlinops._kfoc_pass import _KFOCPassMixin
from curvlinops._kfoc_rearrangement import power_iteration
from curvlinops.kfac_utils import FisherType, KFACType
from curvlinops.structured import (
    BlockDiagonalLinearOperator,
    KroneckerProductLinearOperator,
)

#: A block's key ``(layer, 'W' | 'b' | 'Wb')`` and factors ``(S1, S2 or None)``.
Factors = dict[tuple[str, str], tuple[Tensor, Tensor | None]]


class KFOCLinearOperator(_KFOCPassMixin, _KFACBase):
    r"""Frobenius-optimal Kronecker approximation (KFOC) of the GGN or Fisher.

    Like :class:`~curvlinops.KFACLinearOperator`, KFOC approximates the curvature
    block of every supported layer (``Linear``, ``Conv2d``) by a Kronecker product
    :math:`\mathbf{S}_1 \otimes \mathbf{S}_2` (:math:`\mathbf{S}_1` on the
    :math:`D_\text{out}` output features, :math:`\mathbf{S}_2` on the
    :math:`D_\text{in}` inputs, in KFAC's row-major layout of the weight, blocks of
    different layers zero), but with the best one in Frobenius norm. With the
    per-datum gradients :math:`\mathbf{J}_{n,k} = \sum_p \mathbf{g}_{n,k,p}
    \mathbf{a}_{n,p}^\top \in \mathbb{R}^{D_\text{out} \times D_\text{in}}` of the
    layer's weight (inputs :math:`\mathbf{a}`, output gradients :math:`\mathbf{g}`
    of the backpropagated vector :math:`k`, summed over the positions :math:`p` of
    a shared weight), the block and its approximation are

    .. math::
        \mathbf{B} = \sum_{n,k} \mathrm{vec}(\mathbf{J}_{n,k})
        \mathrm{vec}(\mathbf{J}_{n,k})^\top,
        \qquad
        \mathbf{S}_1 \otimes \mathbf{S}_2 = \arg\min_{\mathbf{S}_1, \mathbf{S}_2}
        \lVert \mathbf{B} - \mathbf{S}_1 \otimes \mathbf{S}_2 \rVert_F .

    The vectors :math:`k` are those of KFAC's ``fisher_type``, with the loss's
    scaling: ``'type-2'`` backpropagates the columns of KFAC's square roots
    :math:`\mathbf{S}_t \mathbf{S}_t^\top = \nabla^2_{\mathbf{f}_t} \ell_t` of the
    loss terms' Hessians (any such factor gives the same :math:`\mathbf{B}`), each
    term's separately (:math:`TC` vectors for :math:`T` loss terms of :math:`C`
    outputs per datum), so that :math:`\mathbf{B}` is the exact GGN block;
    ``'mc'`` backpropagates ``mc_samples`` gradients at labels drawn from the
    model (stacked over a datum's terms), whose
    :math:`\mathbf{B}` is an unbiased estimate of it (the Fisher block). Scaling
    follows ``loss_func.reduction`` as in KFAC.

    Van Loan's rearrangement :math:`\mathcal{R}(\mathbf{B})_{(i,k),(j,l)} =
    B_{(i,j),(k,l)}` maps :math:`\mathbf{S}_1 \otimes \mathbf{S}_2` to
    :math:`\mathrm{vec}(\mathbf{S}_1) \mathrm{vec}(\mathbf{S}_2)^\top`, so the
    optimum is the top singular pair :math:`\sigma, \mathbf{u}, \mathbf{v}` of
    :math:`\mathcal{R}(\mathbf{B}) = \sum_{n,k} \mathbf{J}_{n,k} \otimes
    \mathbf{J}_{n,k}` (`Van Loan & Pitsianis, 1993
    <https://doi.org/10.1007/978-94-015-8196-7_17>`_), with the error
    :math:`\lVert \mathbf{B} - \mathbf{S}_1 \otimes \mathbf{S}_2 \rVert_F^2 =
    \lVert \mathbf{B} \rVert_F^2 - \sigma^2`, no larger than that of any other
    Kronecker product (KFAC's included). Power iteration finds
    it without forming the block, from the products

    .. math::
        \mathcal{R}(\mathbf{B})\, \mathbf{X} = \sum_{n,k} \mathbf{J}_{n,k}
        \mathbf{X} \mathbf{J}_{n,k}^\top,
        \qquad
        \mathcal{R}(\mathbf{B})^\top \mathbf{Y} = \sum_{n,k}
        \mathbf{J}_{n,k}^\top \mathbf{Y} \mathbf{J}_{n,k},

    alternating :math:`\mathbf{u} \propto \mathcal{R}\mathbf{v}`, :math:`\mathbf{v}
    \propto \mathcal{R}^\top \mathbf{u}` from :math:`\mathbf{v}_0 = \mathbf{I} /
    \sqrt{D_\text{in}}` until :math:`\mathbf{u}` (unit Frobenius norm) changes by at
    most ``tol``; the result pairs the final :math:`\mathbf{v}` with its best
    partner :math:`\mathcal{R}\mathbf{v}`. Non-convergence within ``max_iter``
    iterations raises a ``RuntimeWarning``.

    **Symmetry and definiteness.** Both products map positive semi-definite (PSD)
    matrices to PSD matrices (:math:`\mathbf{J} \mathbf{X} \mathbf{J}^\top \succeq
    0` for :math:`\mathbf{X} \succeq 0`), so every iterate from the PSD start lies in
    the (closed, convex) PSD cone, and so does the limit: the top singular vectors
    are PSD, with the sign fixed such that both are. The factors are symmetrized
    in every step, hence exactly symmetric, and PSD up to round-off: where the
    block is singular (e.g. fewer data than :math:`D_\text{in}`), eigenvalues of
    order :math:`\varepsilon \lVert \mathbf{S} \rVert` of either sign may appear.
    Add damping (``inverse(damping=...)``) or clip the factors' eigenvalues at zero
    before taking logarithms or inverses of singular factors. The scale is split
    evenly, :math:`\lVert \mathbf{S}_1 \rVert_F = \lVert \mathbf{S}_2 \rVert_F =
    \sqrt{\sigma}`.

    A weight used several times in the forward pass (a reused layer, an unrolled
    recurrent cell) has one block, whose per-datum gradients sum over the
    positions of all its uses; a lookup of a weight tied to a linear use (tied
    embedding and unembedding) is left out, as in KFAC.

    A bias forms its own block (``separate_weight_and_bias=True``), which KFOC
    represents exactly (:math:`\mathbf{S}_1 = \sum_{n,k} (\sum_p
    \mathbf{g}_{n,k,p})(\sum_p \mathbf{g}_{n,k,p})^\top`), or joins its weight's
    (inputs :math:`(\mathbf{a}^\top, 1)^\top`).

    **Cost.** One pass over the data (a forward and one batched backward pass per
    mini-batch, as KFAC's) records every mini-batch's share of
    :math:`\mathcal{R}(\mathbf{B})`, as rows :math:`\mathbf{a}, \mathbf{g}`
    (evaluating :math:`\mathbf{J} \mathbf{X} \mathbf{J}^\top` as
    :math:`\mathbf{G}^\top (\mathbf{A} \mathbf{X} \mathbf{A}^\top) \mathbf{G}` with
    the rows stacked over positions) or as per-datum gradients, whichever
    multiplies with fewer operations (rows for few positions, gradients for
    convolutions with many output pixels, and for grouped ones). If they take at most
    ``max_cache_bytes``, the iterations run on them in memory at a small fraction of
    a pass each; otherwise every product takes another pass over the data (two per
    iteration), with the same labels for ``'mc'``. The factors are computed when
    first needed (or by :meth:`compute_kronecker_factors`) and cached.

    The operator is self-adjoint. :attr:`kronecker_factors` holds the factors,
    :meth:`to_structured` turns them into a
    :class:`~curvlinops.BlockDiagonalLinearOperator` of
    :class:`~curvlinops.KroneckerProductLinearOperator` blocks, and ``trace``,
    ``det``, ``logdet``, ``frobenius_norm`` and :meth:`inverse` use its closed
    forms. Data-parallel (``process_group``), every product is summed over the
    ranks.

    Example:
        >>> from torch import eye, kron, manual_seed, rand, randint
        >>> from torch.linalg import matrix_norm
        >>> from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh
        >>> from curvlinops import GGNLinearOperator, KFACLinearOperator
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), Tanh(), Linear(3, 2))
        >>> params = [model[0].weight]
        >>> data = [(rand(8, 4), randint(2, (8,)))]
        >>> args = (model, CrossEntropyLoss(), params, data)
        >>> K = KFOCLinearOperator(*args, fisher_type="type-2", tol=1e-6)
        >>> S1, S2 = K.kronecker_factors["0", "W"]
        >>> S1.shape, S2.shape
        (torch.Size([3, 3]), torch.Size([4, 4]))
        >>> bool(matrix_norm(S1).isclose(matrix_norm(S2)))  # balanced scales
        True
        >>> ggn = GGNLinearOperator(*args) @ eye(12)
        >>> kfac = KFACLinearOperator(*args, fisher_type="type-2") @ eye(12)
        >>> bool(matrix_norm(ggn - kron(S1, S2)) < matrix_norm(ggn - kfac))
        True

    Attributes:
        SELF_ADJOINT: ``True``.
        _SUPPORTED_FISHER_TYPE: ``'type-2'`` and ``'mc'``.
        _SUPPORTED_KFAC_APPROX: ``'expand'`` only (positions always enter through
            the per-datum gradients).
    """

    _SUPPORTED_FISHER_TYPE = (FisherType.TYPE2, FisherType.MC)
    _SUPPORTED_KFAC_APPROX = (KFACType.EXPAND,)

    def __init__(
        self,
        model_func: Module | Callable,
        loss_func: Module,
        params: list[Tensor] | dict[str, Tensor],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = 2147483647,
        fisher_type: str = FisherType.MC,
        mc_samples: int = 1,
        kfac_approx: str = KFACType.EXPAND,
        num_per_example_loss_terms: int | None = None,
        separate_weight_and_bias: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[MutableMapping | Tensor], int] | None = None,
        *,
        loss_average: str | None = None,
        tol: float = 1e-5,
        max_iter: int = 100,
        max_cache_bytes: int = 2**30,
        process_group=None,
        shape: tuple[int, int] | None = None,
    ):
        """Set up the operator; the factors are computed when first needed.

        The arguments are those of :class:`~curvlinops.KFACLinearOperator`, in its
        order, plus the keyword-only ``tol``, ``max_iter`` and ``max_cache_bytes``.

        Args:
            model_func: The neural network: a ``torch.nn.Module`` or any callable
                ``X -> prediction``, or ``model_func(params, X)`` if ``params`` is a
                dictionary (as for KFAC).
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
            params: Weights and biases of the model's linear maps and 2d
                convolutions, a list or a ``dict[str, Tensor]``; layers are found
                as for KFAC (reused and tied weights included).
            data: Mini-batches ``(X, y)``, presented in the same order on every pass.
            progressbar: Show a progress bar during passes over the data.
            check_deterministic: Compute the factors twice at construction and check
                that they, and model and data, are deterministic.
            seed: Seed of the label sampling for ``fisher_type='mc'``.
            fisher_type: ``'type-2'`` (the GGN) or ``'mc'`` (the Monte-Carlo
                Fisher); see the class description.
            mc_samples: Labels drawn per loss term for ``'mc'``; must be ``1``
                otherwise.
            kfac_approx: Only ``'expand'`` (accepted for KFAC's signature).
            num_per_example_loss_terms: Number of loss terms per data point, as
                for KFAC (inferred if ``None``).
            separate_weight_and_bias: Give weight and bias of a layer separate
                blocks instead of one joint block.
            num_data: Number of data points, as for KFAC (inferred if ``None``).
            batch_size_fn: Batch size of a ``MutableMapping`` input.
            loss_average: The scaling, as for KFAC (default: follow the loss's
                reduction).
            tol: Convergence tolerance of the power iteration, on the change of the
                unit-norm output factor in Frobenius norm, per iteration (the
                approximation's excess error is of second order in the factors'
                error). Default: ``1e-5``, above the round-off floor of float32.
            max_iter: Maximum number of power iterations. Default: ``100``.
            max_cache_bytes: Memory (on the operator's device) for the recorded
                shares of the rearranged blocks; more data are iterated with passes
                over the data. Default: ``2**30`` (1 GiB).
            process_group: A ``torch.distributed`` process group for data-parallel
                computation (see KFAC). ``None`` (default): single process.
            shape: Expected shape ``(D, D)`` (checked). ``None``: no check.

        Raises:
            ValueError: If ``tol``, ``max_iter`` or ``max_cache_bytes`` is invalid,
                or for the reasons of :class:`~curvlinops.KFACLinearOperator`
                (e.g. an unsupported ``fisher_type``).
        """
        self._tol = _check_tolerance(tol)
        self._max_iter = check_integer(max_iter, "max_iter", 1)
        self._max_cache_bytes = check_integer(max_cache_bytes, "max_cache_bytes", 0)
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar,
            check_deterministic,
            seed,
            fisher_type,
            mc_samples,
            kfac_approx,
            num_per_example_loss_terms,
            separate_weight_and_bias,
            num_data,
            batch_size_fn,
            loss_average=loss_average,
            process_group=process_group,
            shape=shape,
        )

    def _set_hyperparameters(self, hyperparameters: dict[str, Any]):
        """Store the hyperparameters and forget computed factors.

        Args:
            hyperparameters: Values keyed by hyperparameter name.
        """
        super()._set_hyperparameters(hyperparameters)
        self._factors: Factors = {}
        self._iterations, self._iterated_in_memory = 0, False

    @property
    def kronecker_factors(self) -> Factors:
        """The factors of every block (computed when first needed).

        Returns:
            Block keys ``(layer, 'W' | 'b' | 'Wb')`` (weight, separate bias, joint
            weight and bias) mapped to ``(S1, S2)``: ``S1`` ``[D_out, D_out]``,
            ``S2`` ``[D_in, D_in]`` (``[D_in + 1, D_in + 1]`` for ``'Wb'``), and
            ``S2 = None`` for bias blocks; in block order.
        """
        self._ensure_factors()
        return self._factors

    @with_autograd
    def compute_kronecker_factors(self):
        """Compute the factors of all blocks and cache them.

        Takes one pass over the data if the recorded shares of the rearranged blocks
        fit into ``max_cache_bytes``, else one more pass per product. The cache
        changes only once the computation has succeeded.
        """
        first, biases, cache = self._recording_pass()
        products = self._products(cache)
        weights, iterations = power_iteration(
            products, first, self._tol, self._max_iter
        )
        factors = {}
        for layer, kind in self._block_keys:
            key = (layer, kind)
            factors[key] = (biases[layer], None) if kind == "b" else weights[layer]
        self._publish_factors(
            _factors=factors,
            _iterations=iterations,
            _iterated_in_memory=cache is not None,
        )

    def to_structured(self) -> BlockDiagonalLinearOperator:
        """Return the approximation as a structured operator on the blocks.

        Returns:
            A :class:`~curvlinops.BlockDiagonalLinearOperator` with one block per
            entry of :attr:`kronecker_factors`, in block order: a
            :class:`~curvlinops.KroneckerProductLinearOperator` ``S1 ⊗ S2`` on a
            ``[D_out, D_in]`` matrix (a weight flattened into rows, with the bias
            as last column for joint blocks), or ``S1`` for a bias. It equals this
            operator up to the orthogonal permutation into KFAC's canonical form
            (:class:`~curvlinops.kfac_utils.ToCanonicalLinearOperator`), so both
            have the same trace, determinant, Frobenius norm and spectrum.
        """
        return BlockDiagonalLinearOperator(
            [
                S1 if S2 is None else KroneckerProductLinearOperator(S1, S2)
                for S1, S2 in self.kronecker_factors.values()
            ]
        )

    def inverse(self, damping: float = 0.0):
        r"""Return the damped inverse :math:`(\mathbf{K} + \delta \mathbf{I})^{-1}`.

        It is block-diagonal: per block the inverse Kronecker product (``damping=0``)
        or, through the factors' eigendecompositions, exactly
        :math:`(\mathbf{S}_1 \otimes \mathbf{S}_2 + \delta \mathbf{I})^{-1}`.

        Args:
            damping: :math:`\delta \ge 0`. Default: ``0``.

        Returns:
            The inverse, an operator on the parameters (``to_structured()
            .inverse(damping)`` between the permutations into and out of the
            canonical form).
        """
        blocks = self._structured().inverse(damping)
        return self._from_canonical @ blocks @ self._to_canonical

    def state_dict(self):
        """Not supported: KFOC's factors do not fit KFAC's state layout.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(_NO_STATE)

    def load_state_dict(self, state_dict: dict[str, Any]):
        """Not supported: KFOC's factors do not fit KFAC's state layout.

        Args:
            state_dict: Ignored.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(_NO_STATE)

    @classmethod
    def from_state_dict(cls, *args, **kwargs):
        """Not supported: KFOC's factors do not fit KFAC's state layout.

        Args:
            *args: Ignored.
            **kwargs: Ignored.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(_NO_STATE)


_NO_STATE = (
    "KFOCLinearOperator has no state dict; save the operator with torch.save or "
    "its `kronecker_factors`, or recompute them with `compute_kronecker_factors()`."
)


def _check_tolerance(tol) -> float:
    """Verify that the tolerance is a finite positive real number.

    Args:
        tol: Candidate tolerance.

    Returns:
        The tolerance as float.

    Raises:
        ValueError: If it is not a finite positive real number.
    """
    if (
        isinstance(tol, bool)
        or not isinstance(tol, Real)
        or not (isfinite(tol) and tol > 0)
    ):
        raise ValueError(f"`tol` must be a finite positive number, got {tol!r}.")
    return float(tol)
