r"""The diagonal of the generalized Gauss-Newton matrix, exact or Monte-Carlo."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from math import sqrt

from torch import Generator, Tensor, einsum, eye
from torch.nn import Module

from curvlinops._checks import check_integer, check_supported_loss
from curvlinops._determinism import DETERMINISM_ATOL, DETERMINISM_RTOL
from curvlinops._distributed import all_reduce_sum, rank_seed
from curvlinops._execution import lazy_attribute, with_autograd
from curvlinops._functional import bind_params
from curvlinops._losses import (
    SUPPORTED_LOSSES,
    check_output_and_labels,
    hessian_sqrt,
    ignored_terms,
    loss_terms,
    reduction_factor,
    terms_to_output,
)
from curvlinops._per_sample import SquaredGradientSums
from curvlinops._torch_base import CurvatureLinearOperator
from curvlinops.fisher import make_grad_output_sampler
from curvlinops.structured import DiagonalLinearOperator
from curvlinops.utils import allclose_report


class GGNDiagonalLinearOperator(DiagonalLinearOperator, CurvatureLinearOperator):
    r"""Diagonal of the generalized Gauss-Newton matrix, exact or Monte-Carlo.

    For the GGN :math:`\mathbf{G} = c \sum_n \mathbf{J}_n^\top \mathbf{H}_n
    \mathbf{J}_n` (see :class:`~curvlinops.GGNLinearOperator`; :math:`\mathbf{J}_n`
    the Jacobian of datum :math:`n`'s output, :math:`\mathbf{H}_n` its loss
    Hessian, :math:`c` the reduction's scale), factorize :math:`c\mathbf{H}_n =
    \mathbf{S}_n \mathbf{S}_n^\top`. Then

    .. math::
        \mathrm{diag}(\mathbf{G})
        = \sum_n \sum_k \left(\mathbf{J}_n^\top \mathbf{s}_{n,k}\right)^{\odot 2}:

    the columns :math:`\mathbf{s}_{n,k}` of the square root are backpropagated, and
    the per-datum gradients squared and summed (`Dangel et al., 2020
    <https://arxiv.org/abs/1912.10985>`_, `Martens et al., 2012
    <https://arxiv.org/abs/1206.6464>`_). With ``mc_samples=0`` the square roots are
    exact: :math:`\sqrt{2}\mathbf{I}` (``MSELoss``),
    :math:`\mathrm{diag}(\sqrt{\mathbf{p}}) - \mathbf{p}\sqrt{\mathbf{p}}^\top`
    (``CrossEntropyLoss``), :math:`\mathrm{diag}(\sqrt{\mathbf{p}(1-\mathbf{p})})`
    (``BCEWithLogitsLoss``) per loss term, i.e. :math:`K = TC` columns per datum
    with :math:`C` outputs per term and :math:`T` terms per datum (sequence
    positions). With ``mc_samples=M > 0`` they are :math:`M` loss gradients at
    labels drawn from the model's predictive distribution, scaled by
    :math:`1/\sqrt{M}` (as :class:`~curvlinops.FisherMCLinearOperator` draws them),
    whose outer products estimate :math:`c\mathbf{H}_n` without bias; each column
    stacks the sampled gradients of all of a datum's terms, so that :math:`K = M`
    whatever :math:`T` and :math:`C` (the cross terms between positions vanish in
    expectation). With one term per datum, the estimate equals the diagonal of the
    ``FisherMCLinearOperator`` of the same seed and ``mc_samples``.

    Cost per mini-batch: one forward pass and one backward pass batched over the
    :math:`K` columns. Weights and biases of linear maps and 2d convolutions (of
    ``Linear`` and ``Conv2d`` layers, also called several times or tied, and of
    ``torch.nn.functional.linear``/``conv2d`` calls in any function; found in every
    forward pass by a torch function mode) need just one more matrix product per
    weight used once without extra input axes (far less than :math:`K` gradients
    for small :math:`K`); convolutions, sequence inputs and several uses form
    per-datum gradients in chunks, other parameters get them from
    :func:`torch.func.vmap` (see :mod:`curvlinops._per_sample`). The data points
    must not interact: the model is a ``torch.nn.Module`` (or a function
    ``model_func(params, X)`` of a parameter dictionary) whose layers carry the
    batch axis first, with BatchNorm in eval mode. Supported losses: ``MSELoss``,
    ``CrossEntropyLoss`` (also ``ignore_index`` and class probabilities) and
    ``BCEWithLogitsLoss``, without weights or label smoothing.

    The diagonal is computed with one pass over the data when first needed (and
    twice at construction with ``check_deterministic``), then cached; it is
    available as :attr:`diagonal` (one tensor per parameter), and
    :meth:`compute_diagonal` recomputes it after the model changed. As a
    :class:`~curvlinops.DiagonalLinearOperator`, the operator multiplies in
    :math:`\mathcal{O}(D)` and has closed-form ``trace``, ``logdet``, ...,
    ``inverse(damping)``. Data-parallel (``process_group``), the ranks' diagonals
    are summed with one all-reduce; for ``mc_samples > 0``, rank :math:`r` draws
    its labels with seed :math:`(\mathrm{seed} + r \cdot \mathtt{0x9E3779B9})
    \bmod 2^{64}`, as the Monte-Carlo Fisher does.

    Example:
        >>> from torch import eye, manual_seed, rand, randint
        >>> from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh
        >>> from curvlinops import GGNLinearOperator
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), Tanh(), Linear(3, 5))
        >>> params = list(model.parameters())
        >>> data = [(rand(8, 4), randint(0, 5, (8,)))]
        >>> D = GGNDiagonalLinearOperator(model, CrossEntropyLoss(), params, data)
        >>> [tuple(d.shape) for d in D.diagonal]
        [(3, 4), (3,), (5, 3), (5,)]
        >>> G = GGNLinearOperator(model, CrossEntropyLoss(), params, data)
        >>> exact = (G @ eye(G.shape[1])).diag()
        >>> (D @ eye(D.shape[1])).diag().allclose(exact, atol=1e-7)
        True
        >>> D_mc = GGNDiagonalLinearOperator(model, CrossEntropyLoss(), params,
        ...                                  data, mc_samples=1000)
        >>> error = (D_mc @ eye(D.shape[1])).diag() - exact
        >>> bool(error.norm() < 0.1 * exact.norm())
        True

    Attributes:
        SELF_ADJOINT: ``True``.
        supported_losses: The supported loss classes.
    """

    supported_losses = SUPPORTED_LOSSES

    def __init__(
        self,
        model_func: Module | Callable,
        loss_func: Module,
        params: list[Tensor] | dict[str, Tensor],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[MutableMapping], int] | None = None,
        *,
        mc_samples: int = 0,
        seed: int = 2147483647,
        process_group=None,
        shape: tuple[int, int] | None = None,
    ):
        """Set up the operator; the diagonal is computed when first needed.

        Args:
            model_func: The neural network, a ``torch.nn.Module`` (BatchNorm in
                eval mode), or ``model_func(params, X)`` if ``params`` is a
                dictionary; outputs ``[B, C]``, or ``[B, C, *]`` for cross-entropy
                and ``[B, *, C]`` otherwise.
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
                with ``reduction`` ``'mean'`` or ``'sum'``.
            params: Parameters of the model whose diagonal entries to compute, a
                list or a ``dict[str, Tensor]`` (then in dictionary order).
            data: Mini-batches ``(X, y)``. ``X`` may be a ``MutableMapping`` (then
                ``batch_size_fn`` is required); its tensors whose leading axis has
                the batch size are split into data points, the others are shared.
            progressbar: Show a progress bar during passes over the data.
            check_deterministic: Compute the diagonal twice at construction and
                probe that data and model are deterministic.
            num_data: Number of data points (an integer, also a NumPy one). Inferred
                with one pass if ``None`` (then ``data`` must be finite). Every
                pass over the data counts its points and raises a ``ValueError``
                if they are not ``num_data``; data that yield more (e.g. an
                endless stream) stop with it as soon as they do.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
            mc_samples: ``0`` (default) for the exact diagonal, else the number of
                sampled labels per datum of the Monte-Carlo estimate.
            seed: Seed of the label sampling (``mc_samples > 0``), re-seeded at the
                start of every computation of the diagonal. Default:
                ``2147483647``.
            process_group: A ``torch.distributed`` process group for data-parallel
                computation over the union of all ranks' shards (see the class
                description). ``None`` (default): single process.
            shape: Expected shape of the matrix (checked). ``None``: no check.

        Raises:
            NotImplementedError: If the loss function is not supported.
            TypeError: If the model is not a ``torch.nn.Module`` (with a list of
                parameters).
            ValueError: If ``mc_samples`` is not a non-negative integer, ``seed``
                not an integer, or a BatchNorm layer is in train mode.
        """
        check_supported_loss(loss_func, self.supported_losses, type(self).__name__)
        mc_samples = check_integer(mc_samples, "mc_samples", minimum=0)
        seed = check_integer(seed, "seed")
        self._mc_samples, self._seed = mc_samples, seed
        model_func, params = bind_params(model_func, params)
        # checks the model now; copies rebuild it (see the lazy attribute)
        self._squared_gradient_sums = SquaredGradientSums(model_func, params)
        self._diagonal = None
        CurvatureLinearOperator.__init__(
            self,
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
            shape=shape,
        )

    @lazy_attribute
    def _squared_gradient_sums(self) -> SquaredGradientSums:
        """The per-datum squared gradient sums (closures over the model).

        Built in ``__init__``; left out of copies and pickles, which rebuild it
        with their own model.

        Returns:
            The sums of squared per-datum gradients of model and parameters.
        """
        return SquaredGradientSums(self._model_func, self._params)

    @lazy_attribute
    def _sample(self) -> Callable:
        """The sampler of loss gradients at drawn labels (``mc_samples > 0``).

        Returns:
            See :func:`~curvlinops.fisher.make_grad_output_sampler`.
        """
        return make_grad_output_sampler(self._loss_func)

    @property
    def diagonal(self) -> list[Tensor]:
        """The GGN's diagonal (computed with one pass over the data when first needed).

        Returns:
            One tensor per parameter, of its shape.
        """
        if self._diagonal is None:
            self.compute_diagonal()
        return self._diagonal

    @with_autograd
    def compute_diagonal(self) -> list[Tensor]:
        """Compute the diagonal with one pass over the data and cache it.

        Call it again after the model changed (or create a new operator).

        Returns:
            One tensor per parameter, of its shape.
        """
        generator = None
        if self._mc_samples > 0:
            seed = rank_seed(self._seed, self._process_group)
            generator = Generator(device=self.device).manual_seed(seed)
        result = [p.new_zeros(p.shape) for p in self._params]
        for X, y in self._loop_over_data(desc=type(self).__name__):
            weight = self._get_normalization_factor(X, y)

            def columns(output: Tensor, y=y) -> Tensor:
                check_output_and_labels(self._loss_func, output, y)
                return self._loss_hessian_sqrt_columns(output.detach(), y, generator)

            sums = self._squared_gradient_sums(X, self._batch_size(X), columns)
            for r, s in zip(result, sums):  # detached: no graph kept in the cache
                r.add_(s.detach(), alpha=weight)
        self._diagonal = all_reduce_sum(result, self._process_group)
        return self._diagonal

    def _loss_hessian_sqrt_columns(
        self, output: Tensor, y: Tensor, generator: Generator | None
    ) -> Tensor:
        """Return the columns of the mini-batch loss Hessian's square roots.

        Args:
            output: Detached model output.
            y: Labels.
            generator: Random number generator for ``mc_samples > 0``.

        Returns:
            ``[K, *output.shape]``: column ``k`` of every datum's square root, at
            that datum.
        """
        if self._mc_samples > 0:
            samples = self._sample(output, self._mc_samples, y, generator)
            return samples / sqrt(self._mc_samples)
        return exact_sqrt_columns(self._loss_func, output, y)

    def _check_deterministic(self):
        """Check that two computations of the diagonal agree, then probe the data.

        Raises:
            RuntimeError: If the two diagonals differ, or the base class's probe
                fails.
        """
        first = self.compute_diagonal()
        self.compute_diagonal()
        if not allclose_report(
            first, self._diagonal, DETERMINISM_RTOL, DETERMINISM_ATOL
        ):
            raise RuntimeError(
                f"Two computations of {type(self).__name__}'s diagonal differ. Data "
                "and model must be deterministic; use `check_deterministic=False` "
                "only if you know what you are doing."
            )
        super()._check_deterministic()


def exact_sqrt_columns(loss_func, output: Tensor, y: Tensor) -> Tensor:
    r"""Lay out the columns of every datum's loss Hessian square root.

    Datum :math:`n` with :math:`T` terms of :math:`C` outputs has the square root
    :math:`\mathrm{blockdiag}_t(\mathbf{S}_{n,t}) / \sqrt{R}` (:math:`R` the
    reduction factor; terms that cross-entropy ignores are zero; soft labels of
    mass :math:`m` scale the Hessian by :math:`m`), with :math:`TC` columns.

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        output: Detached model output ``[B, ...]``.
        y: Labels.

    Returns:
        Columns ``[T * C, *output.shape]``; column :math:`(t, c)` holds column
        :math:`c` of :math:`\mathbf{S}_{n,t}` at term :math:`t` of every datum.
    """
    output_terms, y_terms = loss_terms(loss_func, output, y)
    ignored = ignored_terms(loss_func, y_terms)
    S = hessian_sqrt(loss_func, output_terms, y_terms)  # [B * T, C, C]
    scale = reduction_factor(loss_func, output_terms, ignored) ** -0.5
    if ignored is not None:
        S = S.masked_fill(ignored[:, None, None], 0.0)
    num_terms, num_outputs = output_terms.shape
    per_datum = num_terms // len(output)
    S = S.reshape(len(output), per_datum, num_outputs, num_outputs) * scale
    positions = eye(per_datum, dtype=S.dtype, device=S.device)
    columns = einsum("pq,npcd->qdnpc", positions, S)
    return terms_to_output(
        loss_func, columns.reshape(-1, num_terms, num_outputs), output.shape
    )
