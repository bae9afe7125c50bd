r"""KFOC's passes over the data: the adapter to KFAC's pass, and the products.

:class:`_KFOCPassMixin` is the only coupling of
:class:`~curvlinops.KFOCLinearOperator` to the internals of KFAC's pass over the
data: :meth:`_KFOCPassMixin._per_datum_pass` calls ``_data_pass(...,
per_datum=True)`` of :class:`~curvlinops._kfac_base._KFACBase` (which hands over
every layer's input rows and output-gradient rows per mini-batch) and
:meth:`_KFOCPassMixin._scaled_vectors` extends KFAC's backpropagated vectors. On
top, it records each mini-batch's share of the rearranged blocks (one pass) and
multiplies with them, in memory or with further passes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, einsum, eye

from curvlinops._distributed import sum_over_ranks
from curvlinops._kfoc_rearrangement import RearrangedTerms, bias_block
from curvlinops.kfac_utils import FisherType


class _KFOCPassMixin:
    """The passes over the data of KFOC, on top of ``_KFACBase``'s.

    The operator provides ``_data_pass``, ``_scaled_vectors``, ``_block_keys``,
    ``_mapping``, ``_params``, ``_fisher_type``, ``_batch_size``, ``_zeros``,
    ``_sum_over_ranks``, ``_process_group``, ``device``, ``dtype`` and
    ``_max_cache_bytes``.
    """

    def _per_datum_pass(self, on_rows: Callable[[str, Tensor | None, Tensor], None]):
        """Pass over the data and hand each layer's per-datum rows over.

        The adapter to KFAC's data pass: the only place that calls it.

        Args:
            on_rows: Receives, per mini-batch and layer, the layer's name, its input
                rows ``[N, P, D_in]`` (``[N, groups, P, D_in]`` for grouped
                convolutions; ``None`` if its weight is no parameter) and its
                output-gradient rows ``[K, N, P, D_out]``.
        """
        inputs = {}

        def on_input(layer: str, rows: Tensor):
            inputs[layer] = rows

        def on_output_grad(layer: str, rows: Tensor):
            on_rows(layer, inputs.pop(layer, None), rows)

        self._data_pass(on_input, on_output_grad, per_datum=True)

    def _recording_pass(self) -> tuple[dict, dict, dict | None]:
        r"""Record the rearranged blocks' shares and the first product in one pass.

        Returns:
            Per layer with a weight block, the start :math:`\mathbf{I} /
            \sqrt{D_\text{in}}` and its product with the rearranged block; per
            layer with a bias block, that block; and the recorded shares per layer
            (``None`` if they exceed ``max_cache_bytes`` on any rank).
        """
        dims = self._weight_dims()
        products = {
            layer: self._zeros(d_out, d_out) for layer, (d_out, _) in dims.items()
        }
        biases = {
            layer: self._zeros(*self._out_dims(layer))
            for layer, kind in self._block_keys
            if kind == "b"
        }
        cache, size = {layer: [] for layer in dims}, 0

        def on_rows(layer: str, a: Tensor | None, g: Tensor):
            nonlocal cache, size
            if layer in biases:
                biases[layer].add_(bias_block(g))
            if layer in dims:
                terms = RearrangedTerms(a, g)
                products[layer].add_(terms.matmat(None))  # the identity's
                size += terms.nbytes
                if cache is not None and size <= self._max_cache_bytes:
                    cache[layer].append(terms)
                else:
                    cache = None

        self._per_datum_pass(on_rows)
        self._sum_over_ranks([products, biases])
        dropped = sum_over_ranks(float(cache is None), self._process_group, self.device)
        first = {}
        for layer, (_, d_in) in dims.items():
            scale = d_in**-0.5
            start = eye(d_in, device=self.device, dtype=self.dtype) * scale
            first[layer] = (start, products[layer] * scale)
        return first, biases, None if dropped else cache

    def _products(self, cache: dict[str, list[RearrangedTerms]] | None) -> Callable:
        """Build the products with the rearranged blocks (and their transposes).

        Args:
            cache: The recorded shares per layer, or ``None`` to pass over the data.

        Returns:
            A function that maps ``(operands, adjoint)``, square matrices keyed by
            layer, to the products of the layers' rearranged blocks
            (``adjoint=False``) or their transposes with them, summed over ranks.
        """
        dims = self._weight_dims()

        def products(operands: dict[str, Tensor], adjoint: bool) -> dict[str, Tensor]:
            results = {
                layer: self._zeros(*([dims[layer][adjoint]] * 2)) for layer in operands
            }

            def add(layer: str, terms: RearrangedTerms):
                X = operands[layer]
                results[layer].add_(terms.rmatmat(X) if adjoint else terms.matmat(X))

            def on_rows(layer: str, a: Tensor | None, g: Tensor):
                if layer in operands:
                    add(layer, RearrangedTerms(a, g))

            if cache is None:
                self._per_datum_pass(on_rows)
            else:
                for layer in operands:
                    for terms in cache[layer]:
                        add(layer, terms)
            self._sum_over_ranks([results])
            return results

        return products

    def _weight_dims(self) -> dict[str, tuple[int, int]]:
        """Return the dimensions of every weight (or joint weight-and-bias) block.

        Returns:
            Layer names mapped to ``(D_out, D_in)`` (``D_in`` includes the joint
            bias's one), in block order.
        """
        dims = {}
        for layer, kind in self._block_keys:
            if kind != "b":
                weight = self._params[self._mapping[layer]["weight"]]
                dims[layer] = (len(weight), weight[0].numel() + (kind == "Wb"))
        return dims

    def _out_dims(self, layer: str) -> tuple[int, int]:
        """Return the shape of a layer's output factor.

        Args:
            layer: The layer's name (a key of ``_mapping``).

        Returns:
            ``(D_out, D_out)``.
        """
        d_out = len(self._params[self._mapping[layer]["bias"]])
        return (d_out, d_out)

    def _scaled_vectors(self, X, output: Tensor, y: Tensor, generator):
        """Compute the backpropagated vectors; for ``'type-2'``, one set per term.

        Args:
            X: Mini-batch input.
            output: Model output on the mini-batch.
            y: Mini-batch labels.
            generator: Random number generator for label sampling, or ``None``.

        Returns:
            Outputs in loss-term rows ``[N T, C]`` and vectors ``[K', N T, C]``;
            for ``'type-2'``, ``K' = T C``: vector ``(t, c)`` is column :math:`c`
            of the Hessian root of term :math:`t` of every datum, zero elsewhere.
        """
        output_terms, V = super()._scaled_vectors(X, output, y, generator)
        if self._fisher_type == FisherType.TYPE2:
            V = _separate_terms(V, self._batch_size(X))
        return output_terms, V


def _separate_terms(V: Tensor, batch_size: int) -> Tensor:
    """Give every loss term of a datum its own backpropagated vectors.

    Args:
        V: Vectors ``[K, N T, C]`` over the terms of ``N`` data (datum-major).
        batch_size: ``N``.

    Returns:
        ``[T K, N T, C]``: vector ``(t, k)`` is vector ``k`` at the terms ``t`` of
        every datum and zero at the others. ``V`` itself if ``T = 1``.
    """
    num_terms = V.shape[1] // batch_size
    if num_terms == 1:
        return V
    V = V.unflatten(1, (batch_size, num_terms))
    positions = eye(num_terms, device=V.device, dtype=V.dtype)
    separated = einsum("tu,knuc->tknuc", positions, V)
    return separated.flatten(end_dim=1).flatten(1, 2)
