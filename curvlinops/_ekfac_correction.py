r"""EKFAC's eigenvalue correction: per-datum gradients' second moments in an eigenbasis.

A layer with weight :math:`\mathbf{W} \in \mathbb{R}^{D_\text{out} \times
D_\text{in}}`, shared over :math:`P` positions of every datum (sequence positions,
output pixels), has, for datum :math:`n` and backpropagated vector :math:`k`, the
weight gradient :math:`\nabla_{n,k} = \sum_p \mathbf{g}_{k,n,p}
\mathbf{a}_{n,p}^\top` with output gradients :math:`\mathbf{g}` and inputs
:math:`\mathbf{a}`. In the eigenbasis :math:`\mathbf{Q}_\mathbf{G} \otimes
\mathbf{Q}_\mathbf{A}`, EKFAC's corrected eigenvalues are

.. math::
    \Lambda_{ij} = \sum_{k, n} \left(\mathbf{q}_{\mathbf{G}, i}^\top \nabla_{n,k}\,
    \mathbf{q}_{\mathbf{A}, j}\right)^2
    = \sum_{k, n} \left[\left(\mathbf{Q}_\mathbf{G}^\top \nabla_{n,k}
    \mathbf{Q}_\mathbf{A}\right)_{ij}\right]^2 .

Three contraction orders compute them; :func:`choose_strategy` picks the one with
the fewest floating-point operations:

- ``'gram'``: rotate the rows, :math:`\tilde{\mathbf{g}} = \mathbf{Q}_\mathbf{G}^\top
  \mathbf{g}`, :math:`\tilde{\mathbf{a}} = \mathbf{Q}_\mathbf{A}^\top \mathbf{a}`, and
  sum :math:`\tilde g_{k,n,p,i} \tilde g_{k,n,q,i} \tilde a_{n,p,j} \tilde a_{n,q,j}`
  over all pairs of positions :math:`(p, q)`. Never forms a per-datum matrix, but
  costs :math:`P^2` products per entry: the cheapest for :math:`P = 1`, where it is
  the product of the squared rotated rows.
- ``'direct'``: rotate the rows, then form the rotated per-datum gradients
  :math:`\sum_p \tilde{\mathbf{g}}_{k,n,p} \tilde{\mathbf{a}}_{n,p}^\top` and square
  them. Cheapest for short shared axes (:math:`P` below the dimensions).
- ``'gradients'``: form the per-datum gradients :math:`\nabla_{n,k}` first, then
  rotate and square them. Cheapest for long shared axes (:math:`P` above the
  dimensions), where rotating every position's rows costs more than rotating one
  :math:`D_\text{out} \times D_\text{in}` matrix per datum.

Per-datum matrices are formed in chunks of data so that they never take more memory
than the rows themselves. Grouped convolutions multiply the output channels of each
group only with that group's input patches; their inputs come as ``[N, groups, P,
D_in]`` and the positions of every group count as positions of the sum.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, einsum

STRATEGIES = ("gram", "direct", "gradients")
_MIN_CHUNK_ELEMENTS = 2**20


def choose_strategy(
    K: int,
    N: int,
    P: int,
    D_out: int,
    D_in: int,
    groups: int = 1,
    rotate_a: bool = True,
) -> str:
    """Return the contraction order with the fewest floating-point operations.

    Args:
        K: Number of backpropagated vectors.
        N: Number of data.
        P: Number of positions that share the weight (per channel group).
        D_out: Output dimension (rows of the weight).
        D_in: Input dimension (columns of the weight).
        groups: Number of channel groups of a grouped convolution.
        rotate_a: Whether the inputs are rotated (``False``: identity basis).

    Returns:
        One of :data:`STRATEGIES`; ties go to the first.
    """
    rotation = K * N * P * D_out**2 + rotate_a * groups * N * P * D_in**2
    positions = groups * P
    products = K * N * D_out * D_in
    costs = {
        "gram": rotation + products * positions**2,
        "direct": rotation + products * (positions + 1),
        "gradients": products * (P + 1 + D_out + rotate_a * D_in),
    }
    return min(STRATEGIES, key=costs.__getitem__)


def corrected_eigenvalues(
    g: Tensor,
    QG: Tensor,
    a: Tensor,
    QA: Tensor | None,
    strategy: str | None = None,
) -> Tensor:
    r"""Sum the squared per-datum gradients, rotated into the eigenbasis.

    Args:
        g: Output gradients ``[K, N, P, D_out]`` (``K`` backpropagated vectors).
        QG: Orthogonal :math:`\mathbf{Q}_\mathbf{G}`, ``[D_out, D_out]``.
        a: Inputs ``[N, P, D_in]``, or ``[N, groups, P, D_in]`` for a grouped
            convolution (output channels split evenly into the groups).
        QA: Orthogonal :math:`\mathbf{Q}_\mathbf{A}`, ``[D_in, D_in]``, or ``None``
            to leave the inputs unrotated.
        strategy: One of :data:`STRATEGIES`, or ``None`` to choose by flop count.

    Returns:
        :math:`\mathbf{\Lambda}`, ``[D_out, D_in]``.

    Raises:
        ValueError: If ``strategy`` is unknown or the shapes do not fit.
    """
    grouped = a.ndim == 4
    _check_shapes(g, QG, a, QA, grouped)
    K, N, P, D_out = g.shape
    groups, D_in = (a.shape[1] if grouped else 1), a.shape[-1]
    if strategy is None:
        strategy = choose_strategy(K, N, P, D_out, D_in, groups, QA is not None)
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "gradients":
        per_datum = K * D_out * D_in
        return _chunked(_squared_rotated_gradients, g, a, per_datum, QG, QA)
    g, a = _rotated_rows(g, QG, a, QA, grouped)  # the groups' positions join P
    if strategy == "direct":
        return _chunked(_squared_products, g, a, K * D_out * D_in)
    if g.shape[2] == 1:  # the pairs of one position are its squares
        return einsum("kbpo,bpi->oi", g**2, a**2)
    return _chunked(_pair_products, g, a, g.shape[2] ** 2 * (K * D_out + D_in))


def _check_shapes(g: Tensor, QG: Tensor, a: Tensor, QA: Tensor | None, grouped: bool):
    """Verify that rows and eigenvectors fit together.

    Args:
        g: Output gradients ``[K, N, P, D_out]``.
        QG: ``[D_out, D_out]``.
        a: Inputs ``[N, P, D_in]`` or ``[N, groups, P, D_in]``.
        QA: ``[D_in, D_in]`` or ``None``.
        grouped: Whether ``a`` has a group axis.

    Raises:
        ValueError: If a shape does not fit.
    """
    K, N, P, D_out = g.shape if g.ndim == 4 else (None,) * 4
    D_in = a.shape[-1]
    groups = a.shape[1] if grouped else 1
    expected_a = (N, groups, P, D_in) if grouped else (N, P, D_in)
    fits = (
        g.ndim == 4
        and tuple(a.shape) == expected_a
        and tuple(QG.shape) == (D_out, D_out)
        and (QA is None or tuple(QA.shape) == (D_in, D_in))
        and D_out % groups == 0
    )
    if not fits:
        raise ValueError(
            "Expected g [K, N, P, D_out], QG [D_out, D_out], a [N, P, D_in] (or "
            "[N, groups, P, D_in] with groups dividing D_out) and QA [D_in, D_in] or "
            f"None; got {list(g.shape)}, {list(QG.shape)}, {list(a.shape)}, "
            f"{None if QA is None else list(QA.shape)}."
        )


def _rotated_rows(
    g: Tensor, QG: Tensor, a: Tensor, QA: Tensor | None, grouped: bool
) -> tuple[Tensor, Tensor]:
    """Rotate the rows into the eigenbasis; a grouped layer's groups become positions.

    Args:
        g: Output gradients ``[K, N, P, D_out]``.
        QG: ``[D_out, D_out]``.
        a: Inputs ``[N, P, D_in]`` or ``[N, groups, P, D_in]``.
        QA: ``[D_in, D_in]`` or ``None``.
        grouped: Whether ``a`` has a group axis.

    Returns:
        Rotated rows ``[K, N, P', D_out]`` and ``[N, P', D_in]`` with ``P' =
        groups * P``: position ``(c, p)`` holds group ``c``'s channels only.
    """
    a = a if QA is None else a @ QA
    if not grouped:
        return g @ QG, a
    groups = a.shape[1]
    g = g.unflatten(-1, (groups, -1))  # [K, N, P, groups, D_out / groups]
    g = einsum("knpgc,gcd->kngpd", g, QG.unflatten(0, (groups, -1)))
    return g.flatten(2, 3), a.flatten(1, 2)


def _chunked(contract: Callable, g: Tensor, a: Tensor, per_datum: int, *args) -> Tensor:
    """Sum a contraction over chunks of data, with bounded intermediate memory.

    The chunks are as large as possible while their intermediates take no more
    memory than the rows (or :data:`_MIN_CHUNK_ELEMENTS` elements).

    Args:
        contract: Maps ``(g, a, *args)``, restricted to a chunk of data, to the
            chunk's ``[D_out, D_in]`` contribution.
        g: Output gradients ``[K, N, ...]``.
        a: Inputs ``[N, ...]``.
        per_datum: Elements of the contraction's intermediates per datum.
        *args: Further arguments of the contraction.

    Returns:
        The sum of the chunks' contributions.
    """
    num_data = a.shape[0]
    budget = max(_MIN_CHUNK_ELEMENTS, g.numel() + a.numel())
    size = max(1, budget // per_datum)
    total = None
    for start in range(0, num_data, size):
        chunk = slice(start, start + size)
        part = contract(g[:, chunk], a[chunk], *args)
        total = part if total is None else total.add_(part)
    return total


def _squared_products(g: Tensor, a: Tensor) -> Tensor:
    """Sum the squares of the per-datum products of rotated rows.

    Args:
        g: Rotated output gradients ``[K, N, P, D_out]``.
        a: Rotated inputs ``[N, P, D_in]``.

    Returns:
        ``[D_out, D_in]``.
    """
    return einsum("knpo,npi->knoi", g, a).square_().sum((0, 1))


def _pair_products(g: Tensor, a: Tensor) -> Tensor:
    """Sum the products over pairs of positions of rotated rows.

    Args:
        g: Rotated output gradients ``[K, N, P, D_out]``.
        a: Rotated inputs ``[N, P, D_in]``.

    Returns:
        ``[D_out, D_in]``.
    """
    g_pairs = (g.unsqueeze(2) * g.unsqueeze(3)).flatten(2, 3)  # [K, N, P * P, D_out]
    a_pairs = (a.unsqueeze(1) * a.unsqueeze(2)).flatten(1, 2)
    return einsum("kbpo,bpi->oi", g_pairs, a_pairs)


def _squared_rotated_gradients(
    g: Tensor, a: Tensor, QG: Tensor, QA: Tensor | None
) -> Tensor:
    """Form the per-datum gradients, rotate them, and sum their squares.

    Args:
        g: Output gradients ``[K, N, P, D_out]``.
        a: Inputs ``[N, P, D_in]`` or ``[N, groups, P, D_in]``.
        QG: ``[D_out, D_out]``.
        QA: ``[D_in, D_in]`` or ``None``.

    Returns:
        ``[D_out, D_in]``.
    """
    rotated = QG.T @ per_datum_gradients(g, a)
    rotated = rotated if QA is None else rotated @ QA
    return rotated.square_().sum((0, 1))


def per_datum_gradients(g: Tensor, a: Tensor) -> Tensor:
    r"""Form the per-datum weight gradients of a layer.

    That is :math:`\sum_p \mathbf{g}_{k,n,p} \mathbf{a}_{n,p}^\top` for every
    datum :math:`n` and backpropagated vector :math:`k`.

    Args:
        g: Output gradients ``[K, N, P, D_out]``.
        a: Inputs ``[N, P, D_in]``, or ``[N, groups, P, D_in]`` for a grouped
            convolution, whose output channels (split evenly into the groups) see
            only their group's inputs.

    Returns:
        The gradients ``[K, N, D_out, D_in]``.
    """
    if a.ndim == 4:
        g = g.unflatten(-1, (a.shape[1], -1))
        return einsum("knpgc,ngpi->kngci", g, a).flatten(2, 3)
    return einsum("knpo,npi->knoi", g, a)


def bias_corrected_eigenvalues(g: Tensor, QG: Tensor) -> Tensor:
    r"""Sum the squared per-datum bias gradients, rotated into the eigenbasis.

    Args:
        g: Output gradients ``[K, N, P, D_out]``.
        QG: Orthogonal :math:`\mathbf{Q}_\mathbf{G}`, ``[D_out, D_out]``.

    Returns:
        :math:`\sum_{k,n} (\mathbf{Q}_\mathbf{G}^\top \sum_p
        \mathbf{g}_{k,n,p})^2`, ``[D_out]``.
    """
    return ((g.sum(2, keepdim=True) @ QG) ** 2).sum((0, 1, 2))


def compute_eigenvalue_correction_linear_weight_sharing(
    g: Tensor,
    ggT_eigvecs: Tensor,
    a: Tensor,
    aaT_eigvecs: Tensor | None,
    _force_strategy: str | None = None,
) -> Tensor:
    r"""Compute EKFAC's corrected eigenvalues of a layer with a shared weight.

    Sums the squared per-datum weight gradients :math:`\nabla_n = \sum_p
    \mathbf{g}_{n,p} \mathbf{a}_{n,p}^\top` in the Kronecker eigenbasis:

    .. math::
        \Lambda_{ij} = \sum_n \left(\mathbf{q}_{\mathbf{G}, i}^\top \nabla_n\,
        \mathbf{q}_{\mathbf{A}, j}\right)^2 .

    The rows carry the loss's scaling (as the rows of KFAC's factors do), so no
    further factor applies; for several backpropagated vectors (or MC samples)
    per datum, stack them along the data axis. Of three contraction orders, the
    one with the fewest operations is used: ``'gram'`` sums over pairs of
    positions (for ``P = 1``), ``'direct'`` rotates the rows into the eigenbasis
    and then forms the rotated per-datum gradients (short shared axes), and
    ``'gradients'`` forms the per-datum gradients and then rotates them (long
    shared axes); intermediates are chunked over the data.

    Args:
        g: Gradients w.r.t. the layer output, ``[N, P, D_out]`` (``P`` positions
            that share the weight).
        ggT_eigvecs: Eigenvectors :math:`\mathbf{Q}_\mathbf{G}` (columns) of the
            gradient covariance, ``[D_out, D_out]``.
        a: Layer inputs (e.g. unfolded patches), ``[N, P, D_in]``.
        aaT_eigvecs: Eigenvectors :math:`\mathbf{Q}_\mathbf{A}` of the input
            covariance, ``[D_in, D_in]``, or ``None`` to keep the inputs' basis.
        _force_strategy: ``'gram'``, ``'direct'`` or ``'gradients'`` to fix the
            contraction order (for tests); ``None`` chooses by flop count.

    Returns:
        The corrected eigenvalues :math:`\mathbf{\Lambda}`, ``[D_out, D_in]``.

    Example:
        >>> from torch import einsum, manual_seed, rand
        >>> from torch.linalg import qr
        >>> _ = manual_seed(0)
        >>> g, a = rand(4, 3, 2), rand(4, 3, 5)
        >>> QG, QA = qr(rand(2, 2)).Q, qr(rand(5, 5)).Q
        >>> gradients = einsum("npo,npi->noi", g, a)  # per datum
        >>> expected = ((QG.T @ gradients @ QA) ** 2).sum(0)
        >>> result = compute_eigenvalue_correction_linear_weight_sharing(g, QG, a, QA)
        >>> result.shape, result.allclose(expected)
        (torch.Size([2, 5]), True)
    """
    return corrected_eigenvalues(
        g.unsqueeze(0), ggT_eigvecs, a, aaT_eigvecs, _force_strategy
    )
