r"""Machinery shared by KFAC and EKFAC: arguments, data pass, factors.

:class:`_KFACBase` checks the arguments, groups the parameters into the blocks of
the canonical form (:mod:`curvlinops.kfac_utils`), computes the Kronecker factors
in one pass over the data (forward hooks collect the layers' inputs; one batched
backward pass of the loss-specific vectors gives the gradients w.r.t. the layer
outputs); saving and loading its state comes from :mod:`curvlinops._kfac_state`,
the rest of curvlinops 3.x's interface from :mod:`curvlinops._kfac_interface`.
Subclasses turn the factors into a block-diagonal structured operator on the
canonical blocks (``to_structured``), which gives the products and the closed forms
(:mod:`curvlinops._kfac_structured`; :class:`curvlinops.KFACLinearOperator`,
:class:`curvlinops.EKFACLinearOperator`, :class:`curvlinops.KFOCLinearOperator`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from math import sqrt
from typing import Any

from torch import Generator, Tensor, eye, randn, set_grad_enabled, zeros
from torch.nn import Module

from curvlinops._autodiff import vjp
from curvlinops._checks import check_params
from curvlinops._determinism import DETERMINISM_ATOL, DETERMINISM_RTOL
from curvlinops._distributed import all_reduce_sum
from curvlinops._execution import with_autograd
from curvlinops._functional import bind_params
from curvlinops._kfac_interface import _KFACInterfaceMixin
from curvlinops._kfac_pass import (
    LOSS_AVERAGES,
    SUPPORTED_MODULES,
    backpropagated_vectors,
    canonical_groups,
    check_kfac_arguments,
    input_rows,
    output_grad_rows,
    per_datum_input_rows,
    terms_per_datum,
)
from curvlinops._kfac_state import _KFACStateMixin
from curvlinops._kfac_structured import _KFACStructuredMixin
from curvlinops._kfac_uses import LayerUses
from curvlinops._losses import (
    SUPPORTED_LOSSES,
    check_no_ignored_labels,
    check_output_and_labels,
    reduction_factor,
)
from curvlinops._torch_base import CurvatureLinearOperator
from curvlinops.kfac_utils import (
    FisherType,
    FromCanonicalLinearOperator,
    KFACType,
    ToCanonicalLinearOperator,
)
from curvlinops.structured import BlockDiagonalLinearOperator
from curvlinops.utils import allclose_report


class _KFACBase(
    _KFACInterfaceMixin, _KFACStructuredMixin, _KFACStateMixin, CurvatureLinearOperator
):
    """Kronecker factors of the supported layers, computed in one pass over the data.

    Subclasses implement ``to_structured`` (the operator as a
    :class:`~curvlinops.BlockDiagonalLinearOperator` on the canonical blocks, in
    block order), which gives ``_matmat`` and the matrix-function properties (see
    :mod:`curvlinops._kfac_structured`), may extend
    :meth:`compute_kronecker_factors` (publishing the results with
    ``_publish_factors``), and list further factors to save in ``_EXTRA_STATE``
    (see :class:`~curvlinops._kfac_state._KFACStateMixin`).

    Attributes:
        SELF_ADJOINT: ``True``.
        _SUPPORTED_LOSSES: The supported loss functions.
        _SUPPORTED_MODULES: The supported layers.
        _SUPPORTED_FISHER_TYPE: The supported values of ``fisher_type``.
        _SUPPORTED_KFAC_APPROX: The supported values of ``kfac_approx``.
        _SUPPORTED_LOSS_AVERAGE: The supported values of ``loss_average``.
    """

    SELF_ADJOINT: bool = True
    _SUPPORTED_LOSSES = SUPPORTED_LOSSES
    _SUPPORTED_MODULES = SUPPORTED_MODULES
    _SUPPORTED_FISHER_TYPE: tuple[FisherType, ...] = tuple(FisherType)
    _SUPPORTED_KFAC_APPROX: tuple[KFACType, ...] = tuple(KFACType)
    _SUPPORTED_LOSS_AVERAGE = LOSS_AVERAGES

    def __init__(
        self,
        model_func: Module,
        loss_func: Module,
        params: list[Tensor],
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
        process_group=None,
        shape: tuple[int, int] | None = None,
    ):
        r"""Set up the operator; the factors are computed when first needed.

        The arguments up to ``batch_size_fn`` are those of curvlinops 3.0.1, in its
        order; ``loss_average``, ``process_group`` and ``shape`` are keyword-only
        additions.

        Args:
            model_func: The neural network: a ``torch.nn.Module`` or any callable
                ``X -> prediction``, or ``model_func(params, X)`` if ``params`` is a
                dictionary.
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
            params: Weights and biases of the model's linear maps and 2d
                convolutions (e.g. of its ``Linear`` and ``Conv2d`` layers), a list
                or a ``dict[str, Tensor]`` (see ``model_func``). Layers that the
                modules do not determine (reused or tied weights, functions) are
                found with one forward pass on the first mini-batch.
            data: Mini-batches ``(X, y)``, presented in the same order on every pass.
            progressbar: Show a progress bar during passes over the data.
            check_deterministic: Compute the factors twice at construction and check
                that they, and model and data, are deterministic.
            seed: Seed of the label sampling for ``fisher_type='mc'``.
            fisher_type: ``'type-2'``, ``'mc'``, ``'empirical'`` or
                ``'forward-only'`` (see the class description).
            mc_samples: Labels drawn per loss term for ``'mc'``; must be ``1``
                otherwise.
            kfac_approx: ``'expand'`` or ``'reduce'`` for weight-shared layers.
            num_per_example_loss_terms: Number of loss terms per data point (e.g.
                tokens per sequence). Inferred from the model outputs if ``None``;
                if given, it is checked against them.
            separate_weight_and_bias: Give weight and bias of a layer separate
                blocks instead of one joint block.
            num_data: Number of data points (an integer, also a NumPy one). Inferred
                with one pass if ``None`` (then ``data`` must be finite). Every
                pass over the data counts its points and raises a ``ValueError``
                if they are not ``num_data``; data that yield more (e.g. an
                endless stream) stop with it as soon as they do.
            batch_size_fn: Batch size of a ``MutableMapping`` input.
            loss_average: How the approximation is scaled. ``None`` (default):
                as the loss's reduction implies, like curvlinops 3.0.1 -- for
                ``'sum'`` no averaging, for ``'mean'`` the average over the data
                points and over all loss terms of each (e.g. the tokens of
                sequences), exactly as the loss averages. Explicit values (only
                with ``reduction='mean'``): ``'batch+sequence'`` (the same average)
                or ``'batch'`` (the loss is a mean over data points of per-datum
                losses that *sum* their ``num_per_example_loss_terms`` terms'
                means, which divides the approximation by that number). With one
                loss term per data point, all three coincide.
            process_group: A ``torch.distributed`` process group: each rank passes
                its shard of the data, the factors are summed over the ranks (one
                all-reduce per pass), and every rank holds the operator of all
                ranks' data; products need no communication. For ``'mc'``, rank
                :math:`r` samples labels with seed :math:`(\mathrm{seed} + r \cdot
                \mathtt{0x9E3779B9}) \bmod 2^{64}` (rank 0 with ``seed``). ``None``
                (default): single process.
            shape: Expected shape ``(D, D)`` of the operator (spec 003), checked
                against the parameters' total size :math:`D`. ``None`` (default):
                no check.

        Raises:
            ValueError: If the loss function, ``fisher_type``, ``kfac_approx``,
                ``loss_average``, ``mc_samples`` or ``num_per_example_loss_terms``
                is not supported, or ``loss_average`` averages although the loss's
                reduction is ``'sum'``, or ``shape`` does not match, or a parameter
                is not used.
            NotImplementedError: If a parameter is used in an unsupported way (the
                message names the operation and the parameter).
            RuntimeError: If the determinism check fails.
        """
        hyperparameters = {
            "seed": seed,
            "fisher_type": fisher_type,
            "mc_samples": mc_samples,
            "kfac_approx": kfac_approx,
            "loss_average": loss_average,
            "num_per_example_loss_terms": num_per_example_loss_terms,
            "separate_weight_and_bias": separate_weight_and_bias,
        }
        model_func, params = bind_params(model_func, params)
        check_kfac_arguments(loss_func, hyperparameters, self._supported())
        check_params(params)
        self._mapping = self._mapping_from_modules(params, model_func)
        self._set_hyperparameters(hyperparameters)
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=False,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
            shape=shape,
        )
        if self._mapping is None:
            self._mapping = self._discover_mapping()
        self._setup_canonical_form()
        if check_deterministic:
            self._check_deterministic()

    def _set_hyperparameters(self, hyperparameters: dict[str, Any]):
        """Store the hyperparameters as attributes and forget computed factors.

        Args:
            hyperparameters: Values keyed by argument name.
        """
        for name, value in hyperparameters.items():
            setattr(self, f"_{name}", value)
        self._fisher_type = FisherType(self._fisher_type)
        self._kfac_approx = KFACType(self._kfac_approx)
        self._factors_ready = False
        self._structured_form: BlockDiagonalLinearOperator | None = None
        self._input_covariances: dict[str, Tensor] = {}
        self._gradient_covariances: dict[str, Tensor] = {}
        self._seen_terms_per_datum: set[int] = set()
        self._generator: Generator | None = None
        self._forget_matrix_functions()

    def _setup_canonical_form(self):
        """Group the parameters into blocks and build the canonical converters."""
        joint = [layer for layer in self._mapping if self._has_joint_bias(layer)]
        self._block_keys, shapes, groups = canonical_groups(
            self._mapping, self._params, joint
        )
        args = (shapes, groups, self.device, self.dtype)
        self._to_canonical = ToCanonicalLinearOperator(*args)
        self._from_canonical = FromCanonicalLinearOperator(*args)

    def _has_joint_bias(self, layer: str) -> bool:
        """Return whether a layer's weight and bias share one Kronecker block.

        Args:
            layer: Name of the layer.

        Returns:
            Whether the layer's input rows get a trailing one.
        """
        return not self._separate_weight_and_bias and len(self._mapping[layer]) == 2

    # Factor computation

    @with_autograd
    def compute_kronecker_factors(self):
        """Compute the Kronecker factors with one pass over the data and cache them.

        Fills ``_input_covariances`` and ``_gradient_covariances``, both keyed by
        layer name (the keys of ``_mapping``). Layers whose weight is not among the
        parameters have no input covariance. The cache changes only once the pass
        has succeeded: after an error or interrupt, the operator is as before.
        """
        A, G = self._accumulated_factors()
        self._publish_factors(_input_covariances=A, _gradient_covariances=G)

    def _accumulated_factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Compute the Kronecker factors with one pass over the data.

        Returns:
            Input covariances (keyed by the layers whose weight is a parameter) and
            gradient covariances (keyed by all layers), summed over the ranks.
        """
        A, G = {}, {}  # accumulated lazily; layers the data never reach stay zero

        def accumulate(factors: dict, layer: str, flat: Tensor, alpha: float = 1.0):
            if layer in factors:
                factors[layer].addmm_(flat.T, flat, alpha=alpha)
            else:
                factors[layer] = (flat.T @ flat).mul_(alpha)

        def add_input_covariance(layer: str, rows: Tensor):  # rows [B, P, D_in]
            alpha = 1.0 / (self._num_data * rows.shape[1])
            accumulate(A, layer, rows.flatten(end_dim=1), alpha)

        def add_gradient_covariance(layer: str, rows: Tensor):  # [K, B, P, D_out]
            accumulate(G, layer, rows.flatten(end_dim=2))

        self._data_pass(add_input_covariance, add_gradient_covariance)
        self._complete_factors(A, G)
        forward_only = self._fisher_type == FisherType.FORWARD_ONLY
        self._sum_over_ranks([A] if forward_only else [A, G])  # G = I stays I
        A = {k: A[k] for k in self._factor_keys("weights")}
        return A, {k: G[k] for k in self._mapping}

    def _complete_factors(self, A: dict[str, Tensor], G: dict[str, Tensor]):
        """Add identities for ``'forward-only'`` and zeros for layers never reached.

        Args:
            A: Input covariances by layer name, completed in place.
            G: Gradient covariances by layer name, completed in place.
        """
        for layer, roles in self._mapping.items():
            d_out = len(self._params[roles.get("weight", roles.get("bias"))])
            if self._fisher_type == FisherType.FORWARD_ONLY:
                G[layer] = eye(d_out, device=self.device, dtype=self.dtype)
            if "weight" in roles and layer not in A:
                weight = self._params[roles["weight"]]
                d_in = weight[0].numel() + self._has_joint_bias(layer)
                A[layer] = self._zeros(d_in, d_in)
            G.setdefault(layer, self._zeros(d_out, d_out))

    def _sum_over_ranks(self, factors: list[dict]):
        """Sum factors over the ranks of the process group, in place.

        All factors travel in one collective. Without a group, nothing happens.

        Args:
            factors: Dictionaries of tensors with the same keys and shapes on all
                ranks; their values are replaced by the sums.
        """
        entries = [(d, key) for d in factors for key in sorted(d, key=str)]
        summed = all_reduce_sum([d[key] for d, key in entries], self._process_group)
        for (d, key), total in zip(entries, summed):
            d[key] = total

    def _zeros(self, *shape: int) -> Tensor:
        """Return zeros on the operator's device and with its dtype.

        Args:
            *shape: The shape.

        Returns:
            The zero tensor.
        """
        return zeros(*shape, device=self.device, dtype=self.dtype)

    def _ensure_factors(self):
        """Compute the factors unless they are cached (once, also for threads)."""
        with self._lock:
            if not self._factors_ready:
                self.compute_kronecker_factors()

    def _data_pass(
        self,
        on_input: Callable[[str, Tensor], None],
        on_output_grad: Callable[[str, Tensor], None],
        per_datum: bool = False,
    ):
        """Pass over the data and hand every layer's input and gradient rows over.

        Args:
            on_input: Receives a layer's name and its input rows ``[B, P, D_in]``
                (only for layers whose weight is a parameter). ``P`` spans the
                positions of all uses of the layer in the forward pass (``1`` for
                ``'reduce'``), aligned with the output-gradient rows.
            on_output_grad: Receives a layer's name and its output-gradient rows
                ``[K, B, P, D_out]`` (not called for ``'forward-only'``).
            per_datum: Hand over the rows of the per-datum gradients instead of
                the factors' (all positions, whatever ``kfac_approx``; see
                :func:`~curvlinops._kfac_pass.per_datum_input_rows`).
        """
        self._forget_matrix_functions()
        self._seen_terms_per_datum.clear()
        generator = None
        if self._fisher_type == FisherType.MC:
            generator = self._generator = self._seeded_generator()
        for X, y in self._loop_over_data(desc=type(self).__name__):
            self._batch_pass(X, y, generator, on_input, on_output_grad, per_datum)

    def _batch_pass(self, X, y, generator, on_input, on_output_grad, per_datum):
        """Run the forward and one batched backward pass on a mini-batch.

        Args:
            X: Mini-batch input.
            y: Mini-batch labels.
            generator: Random number generator for label sampling, or ``None``.
            on_input: See :meth:`_data_pass`.
            on_output_grad: See :meth:`_data_pass`.
            per_datum: See :meth:`_data_pass`.
        """
        batch_size = self._batch_size(X)
        approx = KFACType.EXPAND if per_datum else self._kfac_approx
        backward = self._fisher_type != FisherType.FORWARD_ONLY
        labels = self._parameter_labels()
        recorder = LayerUses(self._mapping, self._params, labels, probes=backward)
        with recorder, set_grad_enabled(backward):
            output = self._model_func(X)
        uses = recorder.uses
        for layer, layer_uses in uses.items():
            if "weight" in self._mapping[layer]:
                joint = self._has_joint_bias(layer)
                if per_datum:
                    rows = per_datum_input_rows(layer_uses, batch_size, joint, layer)
                else:
                    rows = input_rows(layer_uses, batch_size, approx, joint, layer)
                on_input(layer, rows)
        check_output_and_labels(self._loss_func, output, y)
        check_no_ignored_labels(self._loss_func, y, type(self).__name__)
        self._seen_terms_per_datum.add(
            terms_per_datum(
                self._loss_func, output, batch_size, self._num_per_example_loss_terms
            )
        )
        if not backward or not uses:
            return
        output_terms, V = self._scaled_vectors(X, output, y, generator)
        probes = [use.probe for layer_uses in uses.values() for use in layer_uses]
        grads = iter(vjp([output_terms], probes, [V], retain_graph=False))
        for layer, layer_uses in uses.items():
            layer_grads = [next(grads) for _ in layer_uses]
            rows = output_grad_rows(layer_uses, layer_grads, batch_size, approx, layer)
            on_output_grad(layer, rows)

    def _scaled_vectors(self, X, output: Tensor, y: Tensor, generator):
        r"""Compute the backpropagated vectors, scaled like the loss's curvature.

        A mini-batch with weight :math:`w` in the empirical risk whose loss divides
        the sum of its terms by :math:`R` contributes :math:`w/R` times the terms'
        outer products (divided by the number of MC samples, and by the number of
        loss terms per data point for ``loss_average='batch'``).

        Args:
            X: Mini-batch input.
            output: Model output on the mini-batch.
            y: Mini-batch labels.
            generator: Random number generator for label sampling, or ``None``.

        Returns:
            Outputs in loss-term rows ``[T, C]`` and vectors ``[K, T, C]``.
        """
        output_terms, V = backpropagated_vectors(
            self._loss_func, self._fisher_type, output, y, self._mc_samples, generator
        )
        scale = self._batch_weight(X) / reduction_factor(self._loss_func, output_terms)
        if self._loss_average == "batch":
            scale *= 1.0 / (output_terms.shape[0] // self._batch_size(X))
        return output_terms, V * sqrt(scale / self._mc_samples)

    def _check_deterministic(self):
        """Check that two factor computations, and model and data, agree.

        Raises:
            RuntimeError: If two computations of the factors lead to different
                products, or the base class's checks fail.
        """
        generator = Generator(device=self.device).manual_seed(1)
        M = randn(self.shape[1], 2, generator=generator, device=self.device)
        M = M.to(self.dtype)
        self.compute_kronecker_factors()
        first = self @ M
        self.compute_kronecker_factors()
        if not allclose_report(first, self @ M, DETERMINISM_RTOL, DETERMINISM_ATOL):
            raise RuntimeError(
                f"Two computations of {type(self).__name__}'s factors differ. Data "
                "and model must be deterministic; use `check_deterministic=False` "
                "only if you know what you are doing."
            )
        super()._check_deterministic()

    def inverse(self, **kwargs):
        """Return the (damped) inverse as :class:`curvlinops.KFACInverseLinearOperator`.

        Args:
            **kwargs: Arguments of :class:`curvlinops.KFACInverseLinearOperator`,
                e.g. ``damping``.

        Returns:
            The inverse operator.
        """
        from curvlinops.inverse import KFACInverseLinearOperator

        return KFACInverseLinearOperator(self, **kwargs)
