"""Models that reuse weights, and KFAC's factors computed from their definition.

The models are written as functions whose linear maps and convolutions go through a
:class:`Taps` object. KFAC sees plain ``torch.nn.functional`` calls (``Taps()``
with no shifts). :func:`reference_factors` instead records every call's input and
adds a zero *shift* to its output, differentiates the model output w.r.t. the
shifts with :func:`torch.func.jacrev`, and assembles type-2 KFAC's factors for
``MSELoss(reduction='sum')`` on one mini-batch by their definition: every use of a
weight adds its positions to the weight's shared axis (expand), or all positions of
all uses are averaged (inputs) and summed (gradients) per data point (reduce).
Convolution patches come from :func:`torch.nn.functional.unfold`. This is
independent of the torch function mode and the probes that KFAC uses.
"""

from __future__ import annotations

from collections.abc import Callable
from math import sqrt

from torch import Tensor, cat, float64, manual_seed, randint, randn, tanh, zeros
from torch.func import jacrev
from torch.nn import Embedding, LayerNorm, Linear, Module
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import (
    conv2d,
    embedding,
    gelu,
    linear,
    scaled_dot_product_attention,
    unfold,
)


class Taps:
    """The linear maps and convolutions of a test model, optionally observed.

    Attributes:
        calls: ``(weight, input rows [B, P, D_in], output)`` per call.
    """

    def __init__(self, shifts: list[Tensor] | None = None):
        """Prepare a forward pass.

        Args:
            shifts: Tensors added to the outputs of the calls, in call order
                (``None``: plain calls).
        """
        self.shifts, self.calls = shifts, []

    def _observe(self, weight: Tensor, rows: Tensor, output: Tensor) -> Tensor:
        if self.shifts is not None:
            output = output + self.shifts[len(self.calls)]
        self.calls.append((weight, rows, output))
        return output

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return self._observe(weight, rows, linear(x, weight, bias))

    def conv2d(self, x: Tensor, weight: Tensor, bias=None, stride=1, padding=0):
        patches = unfold(x, weight.shape[2:], padding=padding, stride=stride)
        output = conv2d(x, weight, bias, stride, padding)
        return self._observe(weight, patches.transpose(1, 2), output)


def _rows(output_grad: Tensor, conv: bool) -> Tensor:
    """``[C, *output.shape]`` -> ``[C, B, P, D_out]``."""
    if conv:
        output_grad = output_grad.flatten(start_dim=3).transpose(2, 3)
    return output_grad.reshape(*output_grad.shape[:2], -1, output_grad.shape[-1])


def reference_factors(
    run: Callable[[Taps], Tensor], approx: str
) -> dict[int, tuple[Tensor, Tensor]]:
    """Type-2 KFAC factors of every weight for square loss (sum), by definition.

    Args:
        run: Evaluates the model on one mini-batch with the given taps; outputs
            ``[B, *, C]``.
        approx: ``'expand'`` or ``'reduce'``.

    Returns:
        ``id(weight)`` mapped to the input and gradient factors ``(A, G)``.
    """
    taps = Taps()
    with sdpa_kernel(SDPBackend.MATH):
        run(taps)
        shifts = [zeros(out.shape, dtype=float64) for _, _, out in taps.calls]

        def summed(*s: Tensor) -> Tensor:  # [C]: one backpropagated vector per c
            return run(Taps(list(s))).flatten(end_dim=-2).sum(0)

        jacobians = jacrev(summed, argnums=tuple(range(len(shifts))))(*shifts)
    per_weight: dict[int, list] = {}
    for (weight, rows, _), J in zip(taps.calls, jacobians):
        grads = sqrt(2) * _rows(J, conv=weight.ndim == 4)  # loss Hessian 2 I
        per_weight.setdefault(id(weight), []).append((rows.detach(), grads))
    return {key: _factors(uses, approx) for key, uses in per_weight.items()}


def _factors(uses: list[tuple[Tensor, Tensor]], approx: str) -> tuple[Tensor, Tensor]:
    a = cat([rows for rows, _ in uses], dim=1)  # [B, R, D_in]
    g = cat([grads for _, grads in uses], dim=2)  # [C, B, R, D_out]
    if approx == "reduce":
        a, g = a.mean(1, keepdim=True), g.sum(2, keepdim=True)
    a_flat, g_flat = a.flatten(end_dim=1), g.flatten(end_dim=2)
    return a_flat.T @ a_flat / len(a_flat), g_flat.T @ g_flat


# Models


def twice(params: dict[str, Tensor], X: Tensor, taps: Taps | None = None) -> Tensor:
    """One linear layer applied twice, with a tanh in between."""
    taps = taps or Taps()
    hidden = tanh(taps.linear(X, params["w"], params["b"]))
    return taps.linear(hidden, params["w"], params["b"])


def rnn(params: dict[str, Tensor], X: Tensor, taps: Taps | None = None) -> Tensor:
    """An Elman cell unrolled over the sequence ``X [B, T, D_in]``; outputs per step."""
    taps = taps or Taps()
    h = zeros(X.shape[0], params["w_hh"].shape[0], dtype=X.dtype)
    outputs = []
    for t in range(X.shape[1]):
        h = tanh(
            taps.linear(X[:, t], params["w_ih"], params["b_ih"])
            + taps.linear(h, params["w_hh"], params["b_hh"])
        )
        outputs.append(taps.linear(h, params["w_out"]))
    return cat([o.unsqueeze(1) for o in outputs], dim=1)


def mlp(params: dict[str, Tensor], X: Tensor, taps: Taps | None = None) -> Tensor:
    """Two linear layers with a tanh, written with ``torch.nn.functional``."""
    taps = taps or Taps()
    hidden = tanh(taps.linear(X, params["w1"], params["b1"]))
    return taps.linear(hidden, params["w2"], params["b2"])


def cnn(params: dict[str, Tensor], X: Tensor, taps: Taps | None = None) -> Tensor:
    """Two 2d convolutions and a linear layer, written with ``torch.nn.functional``."""
    taps = taps or Taps()
    hidden = tanh(taps.conv2d(X, params["c1"], params["cb1"], stride=2, padding=1))
    hidden = tanh(taps.conv2d(hidden, params["c2"], None, padding=1))
    return taps.linear(hidden.flatten(start_dim=1), params["w"], params["b"])


def random_params(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """Float64 parameters (requiring grad) of the given shapes, scaled by fan-in."""
    manual_seed(seed)
    return {
        name: (randn(*shape, dtype=float64) / sqrt(shape[-1])).requires_grad_()
        for name, shape in shapes.items()
    }


class TinyGPT(Module):
    """A one-block causal transformer whose unembedding is the token embedding."""

    def __init__(self, vocab: int = 7, dim: int = 4, heads: int = 2, length: int = 5):
        super().__init__()
        self.heads = heads
        self.wte = Embedding(vocab, dim)
        self.wpe = Embedding(length, dim)
        self.ln1, self.ln2, self.ln_f = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.qkv, self.proj = Linear(dim, 3 * dim), Linear(dim, dim)
        self.fc, self.fc_out = Linear(dim, 2 * dim), Linear(2 * dim, dim)
        self.lm_head = Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, tokens: Tensor, taps: Taps | None = None) -> Tensor:
        taps = taps or Taps()
        batch, length = tokens.shape
        h = embedding(tokens, self.wte.weight) + self.wpe.weight[:length]
        qkv = taps.linear(self.ln1(h), self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = scaled_dot_product_attention(q, k, v, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, length, -1)
        h = h + taps.linear(attended, self.proj.weight, self.proj.bias)
        hidden = gelu(taps.linear(self.ln2(h), self.fc.weight, self.fc.bias))
        h = h + taps.linear(hidden, self.fc_out.weight, self.fc_out.bias)
        return taps.linear(self.ln_f(h), self.lm_head.weight)


def token_batch(vocab: int = 7, batch: int = 3, length: int = 5, seed: int = 0):
    """Random tokens and square-loss targets for :class:`TinyGPT`."""
    manual_seed(seed)
    tokens = randint(0, vocab, (batch, length))
    return tokens, randn(batch, length, vocab, dtype=float64)
