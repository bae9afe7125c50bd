"""Monte-Carlo approximation of the Fisher information matrix as a linear operator."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping

from torch import Generator, Tensor

from curvlinops._checks import check_integer, check_supported_loss
from curvlinops._distributed import rank_seed
from curvlinops._losses import (
    SUPPORTED_LOSSES,
    ignored_terms,
    loss_terms,
    sample_labels,
    term_gradients,
)
from curvlinops.ggn import _JacobianSandwichLinearOperator
from curvlinops.gradient_moments import _gradient_outer_product_matmat


class FisherMCLinearOperator(_JacobianSandwichLinearOperator):
    r"""Monte-Carlo approximation of the Fisher information matrix, as linear operator.

    For the empirical risk

    .. math::
        \mathcal{L}(\mathbf{\theta})
        = c \sum_{n=1}^N \ell(f_{\mathbf{\theta}}(\mathbf{x}_n), \mathbf{y}_n)

    with :math:`c = 1/N` (``reduction='mean'``) or :math:`c = 1` (``'sum'``) and a
    negative log-likelihood loss :math:`\ell(\mathbf{f}, \mathbf{y}) = -\log
    q(\mathbf{y} \mid \mathbf{f})`, the Fisher replaces the labels by samples
    :math:`\tilde{\mathbf{y}}_n \sim q(\cdot \mid \mathbf{f}_n)` of the model's
    predictive distribution, :math:`\mathbf{f}_n = f_{\mathbf{\theta}}
    (\mathbf{x}_n)`. This operator estimates the expectation with :math:`M`
    (``mc_samples``) samples per datum:

    .. math::
        \mathbf{F}
        = c \sum_{n=1}^N \mathbf{J}_n^\top
        \mathbb{E}_{\tilde{\mathbf{y}}_n}\left[
        \nabla_{\mathbf{f}_n} \ell(\mathbf{f}_n, \tilde{\mathbf{y}}_n)
        \nabla_{\mathbf{f}_n} \ell(\mathbf{f}_n, \tilde{\mathbf{y}}_n)^\top
        \right] \mathbf{J}_n
        \approx c \sum_{n=1}^N \mathbf{J}_n^\top \frac{1}{M} \sum_{m=1}^M
        \nabla_{\mathbf{f}_n} \ell(\mathbf{f}_n, \tilde{\mathbf{y}}_n^{(m)})
        \nabla_{\mathbf{f}_n} \ell(\mathbf{f}_n, \tilde{\mathbf{y}}_n^{(m)})^\top
        \mathbf{J}_n

    with :math:`\mathbf{J}_n` the Jacobian of :math:`\mathbf{f}_n` w.r.t. the
    parameters. Extra output axes (sequence, spatial) become loss terms of their own,
    scaled as for :class:`~curvlinops.EFLinearOperator` (cross-entropy terms
    labeled ``ignore_index`` are left out). For the supported losses (``MSELoss``,
    ``CrossEntropyLoss``, ``BCEWithLogitsLoss``, without weights or label
    smoothing) the exact Fisher equals the generalized Gauss-Newton matrix, to
    which the estimate converges as :math:`M` grows.

    One operator is *one* deterministic sample of the estimator: a generator seeded
    with ``seed`` at the start of every product draws the labels batch by batch, so
    repeated products agree and data must come in the same order on every pass.
    Create operators with different seeds for independent samples. A product costs
    about one GGN product. The operator is self-adjoint.

    Data-parallel (``process_group``), rank :math:`r` seeds its generator with
    :math:`(\mathrm{seed} + r \cdot \mathtt{0x9E3779B9}) \bmod 2^{64}`: rank 0
    uses the single-process generator, the other ranks independent ones. The
    estimate is reproducible for a fixed number of ranks and split of the data, and
    has the expectation of the single-process estimate, but it is a different
    sample (it changes with the number of ranks).

    See Martens, J. (2020). New insights and perspectives on the natural gradient
    method. JMLR, and Martens, J., & Grosse, R. (2015). Optimizing neural networks
    with Kronecker-factored approximate curvature. ICML.

    Example:
        >>> from torch import eye, manual_seed, rand, randint
        >>> from torch.linalg import matrix_norm
        >>> from torch.nn import CrossEntropyLoss, Linear
        >>> from curvlinops import GGNLinearOperator
        >>> _ = manual_seed(0)
        >>> model, loss_func = Linear(3, 4), CrossEntropyLoss()
        >>> params = list(model.parameters())
        >>> data = [(rand(8, 3), randint(0, 4, (8,)))]
        >>> F = FisherMCLinearOperator(model, loss_func, params, data)
        >>> F.shape
        (16, 16)
        >>> v = rand(F.shape[1])
        >>> (F @ v).allclose(F @ v)  # the same sample in every product
        True
        >>> # many samples approach the GGN (= Fisher for these losses)
        >>> G = GGNLinearOperator(model, loss_func, params, data)
        >>> F_many = FisherMCLinearOperator(model, loss_func, params, data,
        ...                                 mc_samples=10_000)
        >>> def error(A):  # distance to the GGN in Frobenius norm
        ...     return matrix_norm(A @ eye(16) - G @ eye(16)).item()
        >>> error(F_many) < 0.1 * error(F)
        True

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    def __init__(
        self,
        model_func: Callable[[Tensor | MutableMapping], Tensor],
        loss_func: Callable[[Tensor, Tensor], Tensor],
        params: list[Tensor],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = 2147483647,
        mc_samples: int = 1,
        num_data: int | None = None,
        batch_size_fn: Callable[[MutableMapping], int] | None = None,
        process_group=None,
    ):
        """Set up the Monte-Carlo Fisher and, by default, probe determinism.

        Args:
            model_func: Maps a mini-batch input ``X`` to predictions, usually a
                ``torch.nn.Module``; outputs are ``[B, C]``, or ``[B, C, *]`` for
                cross-entropy and ``[B, *, C]`` otherwise.
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
                with ``reduction`` ``'mean'`` or ``'sum'``.
            params: Parameters that define the matrix's rows and columns.
            data: Mini-batches ``(X, y)``, in the same order on every pass (labels
                are sampled batch by batch). ``X`` may be a ``MutableMapping``;
                then ``batch_size_fn`` is required.
            progressbar: Show a progress bar during the passes over the data.
            check_deterministic: Probe at construction that two passes over data and
                model agree.
            seed: Seed of the generator that draws the labels, re-seeded at the
                start of every product. Default: ``2147483647``.
            mc_samples: Number :math:`M` of sampled labels per loss term.
                Default: ``1``.
            num_data: Number of data points. Inferred with one pass if ``None``.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
            process_group: A ``torch.distributed`` process group for data-parallel
                products over the union of all ranks' shards (see
                :class:`~curvlinops.CurvatureLinearOperator`). Each rank draws the
                labels of its shard from its own generator, seeded from ``seed``
                and its rank (rank 0 with ``seed`` itself, see the class
                description). ``None`` (default): single process.

        Raises:
            NotImplementedError: If the loss function is not supported.
            ValueError: If ``mc_samples`` is not a positive integer or ``seed`` not
                an integer.
        """
        check_supported_loss(loss_func, SUPPORTED_LOSSES, type(self).__name__)
        mc_samples = check_integer(mc_samples, "mc_samples", minimum=1)
        seed = check_integer(seed, "seed")
        self._seed, self._mc_samples = seed, mc_samples
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
        )

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Re-seed the label generator, then accumulate over the data.

        Args:
            M: Matrix in tensor-list format with trailing column axis.

        Returns:
            The product in tensor-list format.
        """
        seed = rank_seed(self._seed, self._process_group)
        self._generator = Generator(device=self.device).manual_seed(seed)
        return super()._matmat(M)

    def _matmat_batch(
        self, X: Tensor | MutableMapping, y: Tensor, M: list[Tensor]
    ) -> list[Tensor]:
        """Remember the generator's state, then multiply the mini-batch matrix.

        Args:
            X: Mini-batch input.
            y: Mini-batch labels.
            M: Tensors of shape ``[*param.shape, K]``.

        Returns:
            The product, tensors of shape ``[*param.shape, K]``.
        """
        self._batch_state = self._generator.get_state()
        return super()._matmat_batch(X, y, M)

    def _output_matmat(self, output: Tensor, y: Tensor, M: Tensor) -> Tensor:
        """Multiply the sampled gradients' outer products onto columns.

        Args:
            output: Detached model output on the mini-batch.
            y: Mini-batch labels (only used for their layout).
            M: Columns ``[K, *output.shape]``.

        Returns:
            The product, of shape ``[K, *output.shape]``.
        """
        # Should a fallback differentiation mode re-run this batch, it must draw the
        # same labels, so that the first product equals all later ones.
        self._generator.set_state(self._batch_state)
        output_terms, y_terms = loss_terms(self._loss_func, output, y)
        labels = sample_labels(
            self._loss_func, output_terms, self._mc_samples, self._generator
        )
        gradients = term_gradients(self._loss_func, output_terms, labels)
        ignored = ignored_terms(self._loss_func, y_terms)
        if ignored is not None:  # terms that cross-entropy ignores do not count
            gradients = gradients.masked_fill(ignored.unsqueeze(-1), 0.0)
        return _gradient_outer_product_matmat(self._loss_func, y, gradients, M)
