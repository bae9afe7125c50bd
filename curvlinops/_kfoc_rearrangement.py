r"""The rearranged curvature block of a layer and its top singular pair, never formed.

A layer with weight :math:`\mathbf{W} \in \mathbb{R}^{D_\text{out} \times
D_\text{in}}` has the curvature block :math:`\mathbf{B} = \sum_m
\mathrm{vec}(\mathbf{J}_m) \mathrm{vec}(\mathbf{J}_m)^\top` (row-major
:math:`\mathrm{vec}`) with one matrix :math:`\mathbf{J}_m = \sum_p
\mathbf{g}_{m,p} \mathbf{a}_{n,p}^\top` per datum :math:`n` and backpropagated
vector :math:`k` (:math:`m = (k, n)`; output gradients :math:`\mathbf{g}` and inputs
:math:`\mathbf{a}` at the positions :math:`p` that share the weight). The
rearrangement of `Van Loan & Pitsianis, 1993
<https://doi.org/10.1007/978-94-015-8196-7_17>`_,
:math:`\mathcal{R}(\mathbf{B})_{(i,k),(j,l)} = B_{(i,j),(k,l)}`, turns Kronecker
products into outer products, :math:`\mathcal{R}(\mathbf{S}_1 \otimes \mathbf{S}_2)
= \mathrm{vec}(\mathbf{S}_1) \mathrm{vec}(\mathbf{S}_2)^\top`, and the block into a
sum of Kronecker products, :math:`\mathcal{R}(\mathbf{B}) = \sum_m \mathbf{J}_m
\otimes \mathbf{J}_m`. Hence its products with (flattened) square matrices are

.. math::
    \mathcal{R}(\mathbf{B})\, \mathbf{X} = \sum_m \mathbf{J}_m \mathbf{X}
    \mathbf{J}_m^\top \in \mathbb{R}^{D_\text{out} \times D_\text{out}},
    \qquad
    \mathcal{R}(\mathbf{B})^\top \mathbf{Y} = \sum_m \mathbf{J}_m^\top \mathbf{Y}
    \mathbf{J}_m \in \mathbb{R}^{D_\text{in} \times D_\text{in}},

and :func:`power_iteration` finds the top singular pair of :math:`\mathcal{R}(
\mathbf{B})` with them. A mini-batch's share, :class:`RearrangedTerms`, keeps either
the *rows* :math:`\mathbf{a}, \mathbf{g}` and evaluates
:math:`\mathbf{J}_m \mathbf{X} \mathbf{J}_m^\top = \mathbf{G}_m^\top (\mathbf{A}_n
\mathbf{X} \mathbf{A}_n^\top) \mathbf{G}_m` (rows stacked into :math:`\mathbf{A}_n
\in \mathbb{R}^{P \times D_\text{in}}`, :math:`\mathbf{G}_m \in \mathbb{R}^{P \times
D_\text{out}}`; cheap for few positions :math:`P`), or the *gradients*
:math:`\mathbf{J}_m` themselves (cheap for many positions, e.g. convolutions, and
needed for grouped convolutions), whichever needs fewer operations per product.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor
from torch.linalg import matrix_norm

from curvlinops._ekfac_correction import per_datum_gradients


class RearrangedTerms:
    r"""One mini-batch's share of a layer's rearranged block, as rows or gradients.

    Products cost, per datum and per vector :math:`k` (of :math:`K`), about
    :math:`P D_\text{out}^2 + P^2 D_\text{out}` operations plus :math:`(P
    D_\text{in}^2 + P^2 D_\text{in}) / K` for the rows, and :math:`D_\text{out}
    D_\text{in} (D_\text{out} + D_\text{in})` for the gradients; the cheaper one
    is kept.

    Attributes:
        rows: Whether the rows (``True``) or the per-datum gradients are kept.
    """

    def __init__(self, a: Tensor, g: Tensor, rows: bool | None = None):
        """Keep the mini-batch's rows or form its per-datum gradients.

        Args:
            a: Input rows ``[N, P, D_in]``, or ``[N, groups, P, D_in]`` for a
                grouped convolution (output channels split evenly into groups).
            g: Output-gradient rows ``[K, N, P, D_out]``.
            rows: Keep the rows (``True``) or the gradients (``False``); ``None``
                (default) chooses the cheaper. Grouped convolutions keep gradients.
        """
        K, N, P, D_out = g.shape
        D_in = a.shape[-1]
        if rows is None:
            row_cost = K * (P * D_out**2 + P**2 * D_out) + P * D_in**2 + P**2 * D_in
            rows = row_cost <= K * D_out * D_in * (D_out + D_in)
        self.rows = a.ndim == 3 and rows
        if self.rows:
            self._a, self._g = a.contiguous(), g.contiguous()
        else:
            self._J = per_datum_gradients(g, a).flatten(end_dim=1)  # [K * N, o, i]

    @property
    def nbytes(self) -> int:
        """The memory the kept tensors take.

        Returns:
            Number of bytes.
        """
        kept = [self._a, self._g] if self.rows else [self._J]
        return sum(t.numel() * t.element_size() for t in kept)

    def matmat(self, X: Tensor | None) -> Tensor:
        r"""Multiply the share of :math:`\mathcal{R}(\mathbf{B})` onto a matrix.

        Args:
            X: :math:`\mathbf{X}`, ``[D_in, D_in]``; ``None`` for the identity
                (then no product with :math:`\mathbf{X}` is formed).

        Returns:
            :math:`\sum_m \mathbf{J}_m \mathbf{X} \mathbf{J}_m^\top`, ``[D_out,
            D_out]``.
        """
        if not self.rows:
            JX = self._J if X is None else self._J @ X
            return _contract(self._J.transpose(1, 2), JX.transpose(1, 2))
        aX = self._a if X is None else self._a @ X
        inner = aX @ self._a.mT  # [N, P, P]
        return _contract(self._g, inner @ self._g)

    def rmatmat(self, Y: Tensor) -> Tensor:
        r"""Multiply the share of :math:`\mathcal{R}(\mathbf{B})^\top` onto a matrix.

        Args:
            Y: :math:`\mathbf{Y}`, ``[D_out, D_out]``.

        Returns:
            :math:`\sum_m \mathbf{J}_m^\top \mathbf{Y} \mathbf{J}_m`, ``[D_in,
            D_in]``.
        """
        if not self.rows:
            return _contract(self._J, Y @ self._J)
        inner = (self._g @ Y @ self._g.mT).sum(0)  # [N, P, P]
        return _contract(self._a, inner @ self._a)


def _contract(left: Tensor, right: Tensor) -> Tensor:
    """Sum the products of matching matrices' columns over all leading axes.

    Args:
        left: Tensor ``[..., R, D_1]``.
        right: Tensor ``[..., R, D_2]`` with the same leading axes.

    Returns:
        The sum of ``left[...].T @ right[...]``, ``[D_1, D_2]`` (one matrix product,
        which beats :func:`torch.tensordot` on small matrices).
    """
    return left.reshape(-1, left.shape[-1]).T @ right.reshape(-1, right.shape[-1])


def bias_block(g: Tensor) -> Tensor:
    r"""Sum the outer products of the per-datum bias gradients.

    Args:
        g: Output-gradient rows ``[K, N, P, D_out]``.

    Returns:
        :math:`\sum_{k,n} (\sum_p \mathbf{g}_{k,n,p}) (\sum_p
        \mathbf{g}_{k,n,p})^\top`, ``[D_out, D_out]``.
    """
    summed = g.sum(2).flatten(end_dim=1)
    return summed.T @ summed


def power_iteration(
    products: Callable[[dict, bool], dict],
    first: dict[str, tuple[Tensor, Tensor]],
    tol: float,
    max_iter: int,
) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    r"""Find the top singular pairs of rearranged blocks by alternating products.

    Starting from :math:`\mathbf{v}_0` (PSD), it alternates :math:`\mathbf{u}
    \propto \mathcal{R} \mathbf{v}` and :math:`\mathbf{v} \propto \mathcal{R}^\top
    \mathbf{u}` (unit Frobenius norm, symmetrized against round-off) until
    :math:`\mathbf{u}` changes by at most ``tol`` in Frobenius norm. It ends with a
    product :math:`\mathcal{R} \mathbf{v}`, the best partner of the final
    :math:`\mathbf{v}`, and splits :math:`\sigma = \lVert \mathcal{R} \mathbf{v}
    \rVert_F` evenly: :math:`\mathbf{S}_1 = \mathcal{R}\mathbf{v} / \sqrt{\sigma}`,
    :math:`\mathbf{S}_2 = \sqrt{\sigma}\,\mathbf{v}` (both of norm
    :math:`\sqrt{\sigma}`). Blocks with :math:`\mathcal{R}\mathbf{v}_0 = \mathbf{0}`
    get zero factors.

    Args:
        products: Maps ``(operands, adjoint)``, operands keyed by block, to the
            products with :math:`\mathcal{R}` (``adjoint=False``) or
            :math:`\mathcal{R}^\top` of every block in ``operands``.
        first: Per block, the start :math:`\mathbf{v}_0` and
            :math:`\mathcal{R}\mathbf{v}_0`.
        tol: Convergence tolerance on the change of :math:`\mathbf{u}`.
        max_iter: Maximum number of iterations (each one product with
            :math:`\mathcal{R}^\top` and one with :math:`\mathcal{R}`).

    Returns:
        Per block, the factors :math:`(\mathbf{S}_1, \mathbf{S}_2)`; and the
        number of iterations run.
    """
    v = {key: v0 for key, (v0, _) in first.items()}
    Rv = {key: _symmetrized(Rv0) for key, (_, Rv0) in first.items()}
    u = {key: Rv[key] / matrix_norm(Rv[key]) for key in Rv if Rv[key].any()}
    active, changes, iterations = set(u), {}, 0
    while active and iterations < max_iter:
        iterations += 1
        RTu = products({key: u[key] for key in active}, True)
        for key, value in RTu.items():
            v[key] = _normalized(value)
        for key, value in products({key: v[key] for key in active}, False).items():
            Rv[key] = _symmetrized(value)
            u_new = _normalized(value)
            changes[key] = matrix_norm(u_new - u[key]).item()
            u[key] = u_new
            if changes[key] <= tol:
                active.discard(key)
    if active:
        worst = max(active, key=changes.__getitem__)
        warnings.warn(
            f"KFOC's power iteration did not converge within max_iter={max_iter} "
            f"iterations for {sorted(active, key=str)} (largest change "
            f"{changes[worst]:.1e} > tol={tol:.1e}); increase `max_iter` or `tol`.",
            RuntimeWarning,
            stacklevel=4,
        )
    return {key: _split(Rv[key], v[key]) for key in first}, iterations


def _symmetrized(X: Tensor) -> Tensor:
    r"""Return the symmetric part of a square matrix.

    Args:
        X: Square matrix.

    Returns:
        :math:`(\mathbf{X} + \mathbf{X}^\top) / 2`.
    """
    return (X + X.T) / 2


def _normalized(X: Tensor) -> Tensor:
    """Return the symmetric part of a matrix, scaled to unit Frobenius norm.

    Args:
        X: Non-zero square matrix.

    Returns:
        The scaled symmetric part.
    """
    X = _symmetrized(X)
    return X / matrix_norm(X)


def _split(Rv: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    r"""Split the singular value evenly over the two factors.

    Args:
        Rv: :math:`\mathcal{R}\mathbf{v}`, symmetric.
        v: :math:`\mathbf{v}`, of unit norm.

    Returns:
        :math:`(\mathcal{R}\mathbf{v} / \sqrt{\sigma}, \sqrt{\sigma}\,\mathbf{v})`
        with :math:`\sigma = \lVert \mathcal{R}\mathbf{v} \rVert_F`; zeros if
        :math:`\sigma = 0`.
    """
    root = matrix_norm(Rv).sqrt()
    if root == 0:
        return Rv.clone(), v * 0
    return Rv / root, v * root
