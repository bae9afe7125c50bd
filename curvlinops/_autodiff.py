"""Batched Jacobian and Hessian products that fall back when derivatives are missing.

Every curvature product is built from three primitives, each batched over ``K``
columns in one call (leading column axis here, unlike the trailing axis of the
public tensor-list format):

- :func:`vjp`: transposed-Jacobian products ``J^T V`` by one (batched) backward pass,
- :func:`jvp`: Jacobian products ``J M``, by forward-mode AD through
  :func:`torch.func.jvp`, or by the reverse-over-reverse trick
  ``J M = d/du <J^T u, M>``,
- :func:`hvp`: Hessian products by reverse-over-reverse differentiation.

Some operations lack forward-mode derivatives (user-defined ``autograd.Function``
without ``jvp``) or second derivatives (the fused CPU/GPU kernels of
``scaled_dot_product_attention``). :class:`DifferentiationModes` tries the fast mode
first and, when PyTorch reports a missing derivative, retries with reverse mode and
with the composite (``MATH``) attention kernel, remembering what worked.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from torch import Tensor, zeros, zeros_like
from torch.autograd import forward_ad, grad
from torch.func import jvp as func_jvp
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel


def vjp(
    outputs: list[Tensor],
    inputs: list[Tensor],
    V: list[Tensor],
    retain_graph: bool = True,
) -> list[Tensor]:
    """Multiply the transposed Jacobian of ``outputs`` onto ``K`` columns.

    Args:
        outputs: Tensors that depend differentiably on ``inputs``.
        inputs: Tensors to differentiate with respect to.
        V: One tensor per output, of shape ``[K, *output.shape]``.
        retain_graph: Keep the graph for further backward passes.

    Returns:
        One tensor per input, of shape ``[K, *input.shape]``; zeros for inputs the
        outputs do not depend on.
    """
    num_cols = V[0].shape[0]
    pairs = [(o, v) for o, v in zip(outputs, V) if o.requires_grad]
    if not pairs:
        return [
            zeros(num_cols, *x.shape, dtype=x.dtype, device=x.device) for x in inputs
        ]
    outs, vs = zip(*pairs)
    batched = num_cols > 1
    result = grad(
        outs,
        inputs,
        vs if batched else [v.squeeze(0) for v in vs],
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
        is_grads_batched=batched,
    )
    return list(result) if batched else [r.unsqueeze(0) for r in result]


def hvp(loss: Tensor, param_blocks: list[list[Tensor]], M_blocks: list[list[Tensor]]):
    """Multiply the (block-diagonal) Hessian of a scalar onto ``K`` columns.

    One backward pass with ``create_graph=True`` gives the gradient; a second one per
    block differentiates the gradient's inner product with the columns.

    Args:
        loss: Scalar to differentiate twice.
        param_blocks: Parameters, grouped into the diagonal blocks.
        M_blocks: Columns per block, tensors of shape ``[K, *param.shape]``.

    Returns:
        Hessian-matrix products, one tensor ``[K, *param.shape]`` per parameter.
    """
    params = [p for block in param_blocks for p in block]
    gradient = grad(
        loss, params, create_graph=True, allow_unused=True, materialize_grads=True
    )
    result, start = [], 0
    for ps, ms in zip(param_blocks, M_blocks):
        result.extend(vjp(gradient[start : start + len(ps)], ps, ms))
        start += len(ps)
    return result


def jvp(
    f: Callable[..., Tensor],
    params: list[Tensor],
    M: list[Tensor],
    forward_mode: bool,
) -> tuple[Tensor, Tensor]:
    """Evaluate ``f(*params)`` and multiply its Jacobian onto ``K`` columns.

    Args:
        f: Function of the parameters, e.g. a functional model call.
        params: Parameters at which to linearize; they require grad.
        M: One tensor ``[K, *param.shape]`` per parameter.
        forward_mode: Use forward-mode AD (one forward pass that carries tangents)
            instead of the reverse-over-reverse trick.

    Returns:
        The output of ``f`` (still attached to the parameters' autograd graph) and the
        Jacobian-matrix product ``[K, *output.shape]``.
    """
    if not forward_mode:
        output = f(*params)
        return output, _jvp_reverse(output, params, M)
    if M[0].shape[0] == 1:  # dual tensors: less overhead than func_jvp for one column
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, m.squeeze(0)) for p, m in zip(params, M)]
            output, JM = forward_ad.unpack_dual(f(*duals))
        return output, (zeros_like(output) if JM is None else JM).unsqueeze(0)
    return vmap(lambda *ms: func_jvp(f, tuple(params), ms), out_dims=(None, 0))(*M)


def _jvp_reverse(output: Tensor, params: list[Tensor], M: list[Tensor]) -> Tensor:
    """Jacobian-matrix product with reverse mode only: ``J M = d/du <J^T u, M>``.

    Args:
        output: Function value, attached to the parameters' graph.
        params: Parameters.
        M: One tensor ``[K, *param.shape]`` per parameter.

    Returns:
        ``[K, *output.shape]``.
    """
    if not output.requires_grad:
        return zeros(
            M[0].shape[0], *output.shape, dtype=output.dtype, device=output.device
        )
    u = zeros_like(output, requires_grad=True)
    JTu = grad(
        output, params, u, create_graph=True, allow_unused=True, materialize_grads=True
    )
    (JM,) = vjp(list(JTu), [u], M)
    return JM


def is_missing_derivative(error: Exception) -> bool:
    """Return whether an error reports a derivative PyTorch has not implemented.

    Args:
        error: Error raised during differentiation.

    Returns:
        Whether a different differentiation mode may succeed.
    """
    message = str(error).lower()
    return (
        isinstance(error, NotImplementedError)
        or ("derivative" in message and "not implemented" in message)
        or "forward ad" in message
    )


@dataclass(frozen=True)
class _Mode:
    """A way to differentiate: forward or reverse mode, fused or composite attention."""

    forward: bool
    composite_attention: bool

    def context(self):
        """Return the context manager that selects the attention kernels.

        Returns:
            Context manager.
        """
        return (
            sdpa_kernel(SDPBackend.MATH) if self.composite_attention else nullcontext()
        )


class DifferentiationModes:
    """Run a computation in the fastest differentiation mode that works; remember it.

    The candidate modes, in order: forward mode (only if allowed), reverse mode, and
    both again with the composite attention kernel, whose operations all have
    forward and second derivatives.
    """

    def __init__(self, forward_mode_allowed: bool):
        """Set up the candidate modes.

        Args:
            forward_mode_allowed: Whether forward-mode AD may be tried at all (it
                needs a functional model, i.e. a ``torch.nn.Module``).
        """
        directions = [True, False] if forward_mode_allowed else [False]
        self._modes = [_Mode(d, c) for c in (False, True) for d in directions]
        self._current = 0

    def __call__(self, computation: Callable[[bool], object]):
        """Run ``computation(forward_mode)`` in the first mode that succeeds.

        Args:
            computation: Function of a flag that selects forward mode.

        Returns:
            The computation's result.

        Raises:
            RuntimeError: Re-raised if the error is not a missing derivative.
            NotImplementedError: Re-raised if no mode succeeds.
        """
        while True:
            mode = self._modes[self._current]
            try:
                with mode.context():
                    return computation(mode.forward)
            except (RuntimeError, NotImplementedError) as error:
                last = self._current == len(self._modes) - 1
                if last or not is_missing_derivative(error):
                    raise
                self._current += 1
