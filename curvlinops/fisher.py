"""Monte-Carlo approximation of the Fisher information matrix as a linear operator."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from functools import partial

from torch import Generator, Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops._autodiff import unpack_columns
from curvlinops._checks import check_integer, check_supported_loss
from curvlinops._distributed import rank_seed
from curvlinops._execution import with_autograd
from curvlinops._losses import (
    SUPPORTED_LOSSES,
    label_rows,
    output_rows,
    sample_labels,
    scale_by_label_mass,
    terms_to_output,
)
from curvlinops.ggn import _JacobianSandwichLinearOperator, _make_batch_sandwich_product
from curvlinops.gradient_moments import (
    gradient_outer_product_matmat,
    scaled_term_gradients,
)


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
    which the estimate converges as :math:`M` grows. Cross-entropy labels that are
    class probabilities of mass :math:`m_n = \sum_c y_{n,c} \ne 1` make the loss
    :math:`m_n` times that of normalized probabilities; like :math:`c`, this
    weight scales the term's Fisher (the gradients at sampled class indices are
    scaled by :math:`\sqrt{m_n}`), so the estimate still converges to the GGN.
    Masses must not be negative.

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
        FIXED_DATA_ORDER: ``True``: labels are drawn batch by batch in data order.
        supported_losses: The supported loss classes.
    """

    FIXED_DATA_ORDER: bool = True
    SUPPORTS_BLOCKS: bool = False
    supported_losses = SUPPORTED_LOSSES
    # The label generator of the running product.
    _TRANSIENT = ("_generator", "_batch_state")

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
        shape: tuple[int, int] | None = None,
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
            num_data: Number of data points (an integer, also a NumPy one). Inferred
                with one pass if ``None`` (then ``data`` must be finite). Every
                pass over the data counts its points and raises a ``ValueError``
                if they are not ``num_data``; data that yield more (e.g. an
                endless stream) stop with it as soon as they do.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
            process_group: A ``torch.distributed`` process group for data-parallel
                products over the union of all ranks' shards (see
                :class:`~curvlinops.CurvatureLinearOperator`). Each rank draws the
                labels of its shard from its own generator, seeded from ``seed``
                and its rank (rank 0 with ``seed`` itself, see the class
                description). ``None`` (default): single process.
            shape: Expected shape of the matrix (checked). ``None``: no check.

        Raises:
            NotImplementedError: If the loss function is not supported.
            ValueError: If ``mc_samples`` is not a positive integer or ``seed`` not
                an integer.
        """
        check_supported_loss(loss_func, self.supported_losses, type(self).__name__)
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
            shape=shape,
        )

    def _make_mp(self) -> Callable[..., tuple[Tensor, ...]]:
        """Build the per-batch product with :func:`make_batch_fmc_matrix_product`.

        Returns:
            ``mp(X, y, *M, mc_samples, generator) -> tuple``.
        """
        return make_batch_fmc_matrix_product(
            self._model_func, self._loss_func, self._params
        )

    @with_autograd  # protected: threads must not share the generator
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
        """Multiply the mini-batch's MC Fisher, drawing labels from the generator.

        Args:
            X: Mini-batch input.
            y: Mini-batch labels.
            M: Tensors of shape ``[*param.shape, K]``.

        Returns:
            The product, tensors of shape ``[*param.shape, K]``.
        """
        return list(self._mp(X, y, *M, self._mc_samples, self._generator))


def make_grad_output_sampler(
    loss_func: MSELoss | CrossEntropyLoss | BCEWithLogitsLoss,
) -> Callable[[Tensor, int, Tensor, Generator], Tensor]:
    r"""Build a sampler of loss gradients w.r.t. the model output at sampled labels.

    For a mini-batch loss :math:`\frac{1}{R} \sum_t \ell_t(\mathbf{f}_t,
    \mathbf{y}_t)` with reduction factor :math:`R` (``1`` for ``'sum'``; terms are
    data points and positions of extra output axes), the sampler draws labels
    :math:`\tilde{\mathbf{y}}_t \sim q(\cdot \mid \mathbf{f}_t)` from the model's
    predictive distribution and returns :math:`\mathbf{g}_t = \nabla_{\mathbf{f}_t}
    \ell_t(\mathbf{f}_t, \tilde{\mathbf{y}}_t) / \sqrt{R}`, laid out like the
    output. Then :math:`\mathbb{E}[\mathbf{g}_t \mathbf{g}_t^\top] =
    \nabla^2_{\mathbf{f}_t} \ell_t / R`: the outer products of the sampled gradients
    of each term estimate the loss's Hessian w.r.t. that term's output (the Fisher
    in output space). Cross-entropy terms labeled ``ignore_index`` get zero; terms
    labeled with class probabilities of mass :math:`m_t = \sum_c y_{t,c}` (whose
    Hessian is :math:`m_t` times that of a class index) draw class indices and
    scale their gradients by :math:`\sqrt{m_t}`, as the reduction factor scales
    them, so the estimate stays that of the Hessian.

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.

    Returns:
        ``sample(output, num_samples, y, generator) -> [num_samples, *output.shape]``
        for a model output (``[B, C, *]`` for cross-entropy, else ``[B, *, C]``),
        the number of samples per term, the true labels (only for their layout,
        ignored terms and the mass of class probabilities; may be ``None``) and
        a random number generator (or ``None`` for PyTorch's global one).

    Raises:
        NotImplementedError: If the loss function is not supported.

    Example:
        >>> from torch import Generator, eye, float64, manual_seed, rand
        >>> from torch.nn import MSELoss
        >>> _ = manual_seed(0)
        >>> sample = make_grad_output_sampler(MSELoss(reduction="sum"))
        >>> output = rand(1, 3, dtype=float64)
        >>> g = sample(output, 100_000, None, Generator().manual_seed(0))
        >>> g.shape
        torch.Size([100000, 1, 3])
        >>> fisher = (g[:, 0].T @ g[:, 0]) / 100_000  # ≈ Hessian 2 I of the loss
        >>> bool((fisher - 2 * eye(3, dtype=float64)).abs().max() < 0.05)
        True
    """
    check_supported_loss(loss_func, SUPPORTED_LOSSES, "make_grad_output_sampler")

    def sample_grad_output(
        output: Tensor, num_samples: int, y: Tensor | None, generator: Generator
    ) -> Tensor:
        num_samples = check_integer(num_samples, "mc_samples", minimum=1)
        output_terms = output_rows(loss_func, output.detach())
        y_terms = None if y is None else label_rows(loss_func, y)
        labels = sample_labels(loss_func, output_terms, num_samples, generator)
        gradients = scaled_term_gradients(loss_func, output_terms, labels, y_terms)
        gradients = scale_by_label_mass(loss_func, gradients, y_terms)
        return terms_to_output(loss_func, gradients, output.shape)

    return sample_grad_output


def make_batch_fmc_matrix_product(
    model_func: Callable[[Tensor | MutableMapping], Tensor],
    loss_func: MSELoss | CrossEntropyLoss | BCEWithLogitsLoss,
    params: tuple[Tensor, ...],
) -> Callable[..., tuple[Tensor, ...]]:
    r"""Build the function that multiplies a mini-batch's MC Fisher onto a matrix.

    The function draws ``mc_samples`` labels per loss term with
    :func:`make_grad_output_sampler` from ``generator`` and computes
    :math:`\mathbf{J}^\top (\frac{1}{S} \sum_{s} \sum_t \mathbf{g}_{s,t}
    \mathbf{g}_{s,t}^\top) \mathbf{J} \mathbf{M}` for the mini-batch (per-term
    outer products of the sampled output gradients :math:`\mathbf{g}_{s,t}`, which
    already carry the loss's reduction): one forward pass carrying the columns as
    tangents and one batched backward pass. It is the per-batch product of
    :class:`FisherMCLinearOperator`, which seeds one generator per product and
    passes the batches in order. Should a differentiation mode fall back, the
    labels are drawn again from the same generator state.

    Args:
        model_func: Maps a mini-batch input to predictions (a module or a function).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: Parameters (requiring grad) that define the rows and columns.
            A ``dict[str, Tensor]`` goes with ``model_func(params, X)``.

    Returns:
        ``mp(X, y, *M, mc_samples, generator) -> tuple`` that takes the matrix as
        one tensor per parameter of shape ``[*param.shape, K]`` (or as one tuple of
        them), the number of samples and the generator (also as keywords), and
        returns the product in the matrix's format. Autograd is switched on inside.

    Raises:
        NotImplementedError: If the loss function is not supported.

    Example:
        >>> from torch import Generator, manual_seed, rand, randint
        >>> from torch.nn import CrossEntropyLoss, Linear
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 4)
        >>> X, y = rand(6, 3), randint(0, 4, (6,))
        >>> mp = make_batch_fmc_matrix_product(
        ...     model, CrossEntropyLoss(), tuple(model.parameters()))
        >>> M = [rand(4, 3, 2), rand(4, 2)]  # two columns
        >>> FM = mp(X, y, *M, 1, Generator().manual_seed(0))
        >>> FM_again = mp(X, y, M, mc_samples=1, generator=Generator().manual_seed(0))
        >>> [tuple(t.shape) for t in FM], FM[0].allclose(FM_again[0])
        ([(4, 3, 2), (4, 2)], True)
    """
    sample = make_grad_output_sampler(loss_func)
    product = _make_batch_sandwich_product(
        model_func, loss_func, params, partial(_fmc_output_matmat, loss_func, sample)
    )

    def batch_fmc_matrix_product(
        X, y, *args, mc_samples: int | None = None, generator: Generator | None = None
    ) -> tuple[Tensor, ...]:
        if mc_samples is None:
            *args, mc_samples, generator = args
        state = None if generator is None else generator.get_state()
        return product(X, y, unpack_columns(args), mc_samples, generator, state)

    batch_fmc_matrix_product.modes = product.modes
    return batch_fmc_matrix_product


def _fmc_output_matmat(
    loss_func,
    sample: Callable,
    output: Tensor,
    y: Tensor,
    M: Tensor,
    mc_samples: int,
    generator: Generator | None,
    state: Tensor | None,
) -> Tensor:
    """Multiply the sampled gradients' per-term outer products onto columns.

    Args:
        loss_func: The loss function.
        sample: The sampler from :func:`make_grad_output_sampler`.
        output: Detached model output on the mini-batch.
        y: Mini-batch labels (for their layout and ignored terms).
        M: Columns ``[K, *output.shape]``.
        mc_samples: Number of sampled labels per term.
        generator: Random number generator.
        state: The generator's state when the batch started; restored so that a
            retried batch draws the same labels.

    Returns:
        The product, of shape ``[K, *output.shape]``.
    """
    if state is not None:
        generator.set_state(state)
    gradients = sample(output, mc_samples, y, generator)  # [S, *output.shape]
    rows = output_rows(loss_func, gradients.flatten(end_dim=1))
    gradients = rows.reshape(mc_samples, -1, rows.shape[-1])
    return gradient_outer_product_matmat(loss_func, gradients, M)
