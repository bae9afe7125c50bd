"""GGN eigenvalues through the Gram matrix, computed during backpropagation."""

from __future__ import annotations

from torch import Tensor

from curvlinops.vivit._base import ViViTComputation
from curvlinops.vivit._gram import gram_eigvalsh
from curvlinops.vivit._sqrt_ggn import SqrtGGN


class EigvalshComputation(ViViTComputation):
    r"""BackPACK extension and hook to compute the GGN's eigenvalues.

    For a loss averaged over the :math:`N` samples of a mini-batch, the GGN is
    :math:`\mathbf{G} = \mathbf{V} \mathbf{V}^\top`, where the columns of
    :math:`\mathbf{V} \in \mathbb{R}^{D \times NC}` are the loss Hessian's square
    root backpropagated through the network (:math:`C` is the model's output
    dimension). The eigenvalues of the small Gram matrix :math:`\mathbf{V}^\top
    \mathbf{V} \in \mathbb{R}^{NC \times NC}` are the non-zero eigenvalues of
    :math:`\mathbf{G}`, padded with zeros (Dangel et al., 2022, ViViT: Curvature
    access through the generalized Gauss-Newton's low-rank structure, TMLR).

    Approximations:

    - ``subsampling`` restricts the GGN to the mean over the listed samples,
      :math:`\frac{1}{|\mathcal{S}|} \sum_{n \in \mathcal{S}} \mathbf{G}_n`, and the
      Gram matrix to :math:`|\mathcal{S}| C \times |\mathcal{S}| C`.
    - ``mc_samples = M > 0`` replaces the loss Hessian's square root by a
      Monte-Carlo estimate with :math:`M` samples (Gram matrix
      :math:`NM \times NM`); BackPACK draws them from PyTorch's global random
      number generator.

    The model and the loss function must be extended with :func:`backpack.extend`,
    and the loss function must use ``reduction='mean'`` (else the backward pass
    raises a ``ValueError``). Supported are the layers of BackPACK's second-order
    extensions (``Linear``, ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``, pooling,
    padding, ``Flatten``, ``Dropout``, ``BatchNorm`` in evaluation mode,
    ``Embedding``, ``RNN``, ``LSTM``, element-wise activations, and the custom
    modules of :mod:`backpack.custom_module` for branches, skip connections,
    scaling, slicing, padding and permuting; ``backpack.extend(model,
    use_converter=True)`` inserts them for operations written in ``forward()``) and
    the losses ``MSELoss``, ``CrossEntropyLoss`` and ``BCEWithLogitsLoss``.

    Args:
        subsampling: Indices of the samples that enter the GGN. ``None`` (default)
            uses the whole mini-batch.
        mc_samples: ``0`` (default) for the exact GGN, otherwise the number of
            Monte-Carlo samples of the loss Hessian's square root.
        verbose: Print which parameter groups are computed during the backward
            pass. Default: ``False``.

    Example:
        >>> from backpack import backpack, extend
        >>> from torch import manual_seed, rand, randint
        >>> from torch.linalg import eigvalsh
        >>> from torch.nn import CrossEntropyLoss, Linear, ReLU, Sequential
        >>> from curvlinops.examples.functorch import functorch_ggn
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), ReLU(), Linear(3, 3))
        >>> loss_func = CrossEntropyLoss()
        >>> X, y = rand(6, 4), randint(0, 3, (6,))
        >>> params = list(model.parameters())
        >>> # dense reference (before extension: torch.func ignores BackPACK's hooks)
        >>> G = functorch_ggn(model, loss_func, params, [(X, y)])
        >>> model, loss_func = extend(model), extend(loss_func)
        >>> computation = EigvalshComputation()
        >>> group = {"params": params}  # one block: the full GGN
        >>> hook = computation.get_extension_hook([group])
        >>> with backpack(computation.get_extension(), extension_hook=hook):
        ...     loss_func(model(X), y).backward()
        >>> evals = computation.get_result(group)
        >>> evals.shape  # N * C = 6 * 3 eigenvalues of the Gram matrix
        torch.Size([18])
        >>> evals.allclose(eigvalsh(G)[-18:], atol=1e-6)  # the D = 27 GGN eigenvalues
        True
    """

    _RESULTS = ("_evals",)

    def __init__(
        self,
        subsampling: list[int] | None = None,
        mc_samples: int = 0,
        verbose: bool = False,
    ):
        """Store the GGN approximation."""
        super().__init__(subsampling, mc_samples, verbose)

    def get_extension(self) -> SqrtGGN:
        """Create the BackPACK extension that computes the GGN's factor.

        Returns:
            Extension to pass to :class:`backpack.backpack`.
        """
        return self._sqrt_ggn_extension()

    def get_extension_hook(self, param_groups: list[dict]):
        """Create the hook that computes the GGN eigenvalues of each block.

        Args:
            param_groups: Parameter groups in the format of ``torch.optim``; each
                group's ``'params'`` form one diagonal block of the GGN. One group
                with all parameters gives the full GGN, one group per parameter a
                block-diagonal approximation.

        Returns:
            Hook to pass as ``extension_hook`` to :class:`backpack.backpack`. It stores
            the eigenvalues under ``self._evals`` during the backward pass.
        """
        return super().get_extension_hook(param_groups)

    def get_result(self, group: dict) -> Tensor:
        """Return the eigenvalues of a GGN block after the backward pass.

        Args:
            group: A parameter group passed to :meth:`get_extension_hook`.

        Returns:
            Eigenvalues of the Gram matrix in ascending order, of shape ``[N * C]``
            (``[N * M]`` with Monte-Carlo samples, ``N`` the number of active
            samples).
        """
        return self._lookup(group)[0]

    def _compute(self, group, factors, gradients, batch_size) -> tuple[Tensor]:
        """Compute the Gram matrix eigenvalues of a group.

        Args:
            group: The parameter group.
            factors: The GGN factor of each parameter in the group.
            gradients: ``None``.
            batch_size: Size of the mini-batch.

        Returns:
            The eigenvalues.
        """
        return (gram_eigvalsh(factors),)
