r"""A parameter's block of the GGN factor :math:`\mathbf{V}`, dense or structured.

The rows of :math:`\mathbf{V}^\top` that belong to one parameter are indexed by
``(v, n)`` (``V`` columns per sample, ``N`` active samples; flat index
``v * N + n``). The Gram matrix, the combination of rows into parameter-space
vectors, and the projection of per-sample gradients onto the rows are all that the
ViViT computations need, so each factor class implements exactly these.

For a ``Linear`` layer on inputs :math:`\mathbf{a}_n \in \mathbb{R}^{d_\text{in}}`,
the weight's row is the outer product :math:`\mathbf{b}_{vn} \mathbf{a}_n^\top` with
:math:`\mathbf{b}_{vn} \in \mathbb{R}^{d_\text{out}}` the factor w.r.t. the layer
output. Then :math:`\langle \mathbf{b}_{vn} \mathbf{a}_n^\top,
\mathbf{b}_{v'n'} \mathbf{a}_{n'}^\top \rangle = (\mathbf{b}_{vn}^\top
\mathbf{b}_{v'n'}) (\mathbf{a}_n^\top \mathbf{a}_{n'})`, so its Gram matrix costs
:math:`\mathcal{O}((VN)^2 (d_\text{in} + d_\text{out}))` instead of
:math:`\mathcal{O}((VN)^2 d_\text{in} d_\text{out})`, and the rows are never stored.
"""

from __future__ import annotations

from torch import Tensor, einsum


class DenseFactor:
    """Rows stored explicitly, as a tensor of shape ``[V, N, *param.shape]``.

    Args:
        tensor: The rows.
    """

    def __init__(self, tensor: Tensor):
        """Store the rows."""
        self.tensor = tensor
        self.num_columns = tensor.shape[0]

    def _matrix(self) -> Tensor:
        """Return the rows as a ``[V * N, param.numel()]`` matrix.

        Returns:
            The rows as matrix.
        """
        return self.tensor.flatten(end_dim=1).flatten(start_dim=1)

    def to_tensor(self) -> Tensor:
        """Return the rows as tensor.

        Returns:
            Tensor of shape ``[V, N, *param.shape]``.
        """
        return self.tensor

    def gram(self) -> Tensor:
        """Compute the inner products of all rows.

        Returns:
            Gram matrix of shape ``[V * N, V * N]``.
        """
        matrix = self._matrix()
        return matrix @ matrix.T

    def combine(self, coefficients: Tensor) -> Tensor:
        """Form linear combinations of the rows.

        Args:
            coefficients: Coefficients of shape ``[V * N, K]``.

        Returns:
            The combinations, of shape ``[K, *param.shape]``.
        """
        C = coefficients.reshape(*self.tensor.shape[:2], -1)
        return einsum("vn...,vnk->k...", self.tensor, C)

    def project(self, vectors: Tensor) -> Tensor:
        """Compute inner products of vectors with the rows.

        Args:
            vectors: Parameter-space vectors of shape ``[M, *param.shape]``.

        Returns:
            Inner products of shape ``[M, V * N]``.
        """
        return vectors.flatten(start_dim=1) @ self._matrix().T


class LinearWeightFactor:
    r"""Rows :math:`\mathbf{b}_{vn} \mathbf{a}_n^\top` of a ``Linear`` layer's weight.

    Args:
        output_factor: The factor w.r.t. the layer output, ``[V, N, d_out]``.
        inputs: The layer inputs of the active samples, ``[N, d_in]``.
    """

    def __init__(self, output_factor: Tensor, inputs: Tensor):
        """Store the two parts of the outer products."""
        self.output_factor = output_factor
        self.inputs = inputs
        self.num_columns = output_factor.shape[0]

    def to_tensor(self) -> Tensor:
        """Return the rows as tensor.

        Returns:
            Tensor of shape ``[V, N, d_out, d_in]``.
        """
        return einsum("vno,ni->vnoi", self.output_factor, self.inputs)

    def gram(self) -> Tensor:
        """Compute the inner products of all rows as a Hadamard product.

        Returns:
            Gram matrix of shape ``[V * N, V * N]``.
        """
        B = self.output_factor.flatten(end_dim=1)
        input_gram = self.inputs @ self.inputs.T
        return (B @ B.T) * input_gram.repeat(self.num_columns, self.num_columns)

    def combine(self, coefficients: Tensor) -> Tensor:
        """Form linear combinations of the rows.

        Args:
            coefficients: Coefficients of shape ``[V * N, K]``.

        Returns:
            The combinations, of shape ``[K, d_out, d_in]``.
        """
        C = coefficients.reshape(*self.output_factor.shape[:2], -1)
        weighted = einsum("vno,vnk->kon", self.output_factor, C)
        return weighted @ self.inputs

    def project(self, vectors: Tensor) -> Tensor:
        """Compute inner products of vectors with the rows.

        Args:
            vectors: Parameter-space vectors of shape ``[M, d_out, d_in]``.

        Returns:
            Inner products of shape ``[M, V * N]``.
        """
        on_inputs = vectors @ self.inputs.T  # [M, d_out, N]
        return einsum("mon,vno->mvn", on_inputs, self.output_factor).flatten(1)
