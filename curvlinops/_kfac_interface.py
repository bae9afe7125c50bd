r"""The part of KFAC's interface beyond products that curvlinops 3.x users rely on.

:class:`_KFACInterfaceMixin` gives KFAC-type operators the parameter mapping
(``compute_parameter_mapping``, saved as ``_mapping``), label sampling
(``draw_label``) and the number of loss terms per datum seen in the data; the
matrix-function properties come from :mod:`curvlinops._kfac_structured`.
"""

from __future__ import annotations

from contextlib import closing

from torch import Generator, Tensor
from torch.nn import CrossEntropyLoss, Module

from curvlinops._distributed import first_over_ranks, rank_seed
from curvlinops._execution import lazy_attribute
from curvlinops._functional import parameter_labels
from curvlinops._kfac_discovery import discover_mapping
from curvlinops._kfac_pass import supported_layer_mapping
from curvlinops._losses import loss_terms, sample_labels


class _KFACInterfaceMixin:
    """Parameter mapping and label sampling of KFAC.

    The operator provides ``_loss_func``, ``_seed``, ``_process_group``, ``device``,
    ``_lock`` (reentrant), ``_num_per_example_loss_terms`` and
    ``_seen_terms_per_datum`` (the numbers of loss terms per datum seen in the last
    pass), and sets ``_generator``.
    """

    @classmethod
    def compute_parameter_mapping(
        cls, params: list[Tensor], model_func: Module
    ) -> dict[str, dict[str, int]]:
        """Find the supported layer of every parameter, from the modules.

        This is curvlinops 3.0.1's mapping: every parameter must be the weight or
        bias of one ``Linear`` or ``Conv2d`` module. The operators fall back to
        finding the layers with one forward pass (:meth:`_discover_mapping`) for
        other models: layers used several times or shared by modules, custom
        modules, functions ``model_func(params, X)``.

        Args:
            params: Parameters of ``Linear`` and ``Conv2d`` layers of the model.
            model_func: The neural network.

        Returns:
            Layer names mapped to ``{'weight': i, 'bias': j}`` (the roles present),
            with the parameters' positions in ``params``; layers in the order of
            ``model_func.named_modules()``. Saved as ``_mapping``.

        Raises:
            TypeError: If ``model_func`` is not a ``torch.nn.Module``.
            NotImplementedError: If a parameter lives in an unsupported layer.
            ValueError: If a parameter is not part of the model or listed twice.
        """
        return supported_layer_mapping(model_func, params)

    def _mapping_from_modules(
        self, params: list[Tensor], model_func
    ) -> dict[str, dict[str, int]] | None:
        """Return curvlinops 3.0.1's mapping if the modules determine the layers.

        Args:
            params: The parameters.
            model_func: The (bound) model.

        Returns:
            The mapping of :meth:`compute_parameter_mapping` if every parameter is
            the weight or bias of one ``Linear`` or ``Conv2d`` module, else ``None``
            (the layers are then found by :meth:`_discover_mapping`).
        """
        if not isinstance(model_func, Module):
            return None
        try:
            return self.compute_parameter_mapping(params, model_func)
        except NotImplementedError:
            return None

    def _discover_mapping(self) -> dict[str, dict[str, int]]:
        """Find the layers with one forward pass on the first mini-batch.

        Data-parallel, the lowest rank with data discovers the layers and shares
        them, so that all ranks (also those without data) agree.

        Returns:
            Layer names mapped to ``{'weight': i, 'bias': j}``.

        Raises:
            NotImplementedError: If a parameter is used in an unsupported way.
            ValueError: If a parameter is unused, or no rank has data.
        """
        result = None
        with self._protected():
            batches = self._loop_over_data("discover layers", check_count=False)
            with closing(batches):
                for X, _ in batches:
                    result = self._discover_on(X)
                    break
            result = first_over_ranks(result, self._process_group, self.device)
        if result is None:
            raise ValueError("`data` is empty: expected at least one batch (X, y).")
        if result[1] is not None:
            raise result[1]
        return result[0]

    def _discover_on(self, X) -> tuple:
        """Find the layers with a forward pass on one mini-batch input.

        Args:
            X: The mini-batch input.

        Returns:
            ``(mapping, None)``, or ``(None, error)`` if a parameter is unused or
            used in an unsupported way (shared with the other ranks).
        """
        labels = self._parameter_labels()
        try:
            return discover_mapping(self._model_func, self._params, labels, X), None
        except (NotImplementedError, ValueError) as error:
            return None, error

    @lazy_attribute
    def _labels(self) -> list[str]:
        """Names of the parameters, for messages (see :meth:`_parameter_labels`).

        Returns:
            One name per parameter.
        """
        return parameter_labels(self._model_func, self._params)

    def _parameter_labels(self) -> list[str]:
        """Return the names of the parameters: dictionary keys or qualified names.

        Returns:
            One name per parameter.
        """
        return self._labels

    def _observed_terms_per_datum(self) -> int | None:
        """Return the number of loss terms per data point, given or seen in the data.

        Returns:
            ``num_per_example_loss_terms`` if given, else the number seen in the
            last pass over the data if it was the same for all batches, else
            ``None``.
        """
        if self._num_per_example_loss_terms is not None:
            return self._num_per_example_loss_terms
        seen = self._seen_terms_per_datum
        return next(iter(seen)) if len(seen) == 1 else None

    def _seeded_generator(self) -> Generator:
        """Return a new random number generator seeded with this rank's seed.

        Returns:
            The generator, on the operator's device.
        """
        seed = rank_seed(self._seed, self._process_group)
        return Generator(device=self.device).manual_seed(seed)

    def draw_label(self, output: Tensor) -> Tensor:
        r"""Draw a label for every loss term from the model's predictive distribution.

        The distributions are :math:`\mathcal{N}(\mathbf{f}, \frac{1}{2}
        \mathbf{I})` (square loss), :math:`\mathrm{Cat}(\mathrm{softmax}(
        \mathbf{f}))` (cross-entropy) and :math:`\mathrm{Bernoulli}(\sigma(
        \mathbf{f}))` (BCE), as for ``fisher_type='mc'``. Uses the operator's
        generator, seeded with ``seed`` at the start of every pass over the data
        with ``'mc'`` (or on first use).

        Args:
            output: Model output on a mini-batch (``[B, C, *]`` for cross-entropy,
                else ``[B, *, C]``).

        Returns:
            Labels: class indices ``[B, *]`` for cross-entropy, else of the
            output's shape.
        """
        output = output.detach()
        output_terms, _ = loss_terms(self._loss_func, output, output)  # labels unused
        with self._lock:  # threads draw one after another
            if self._generator is None:
                self._generator = self._seeded_generator()
            labels = sample_labels(self._loss_func, output_terms, 1, self._generator)
        labels = labels[0]
        if isinstance(self._loss_func, CrossEntropyLoss):
            return labels.reshape(output.movedim(1, -1).shape[:-1])
        return labels.reshape(output.shape)
