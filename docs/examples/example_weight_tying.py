r"""KFAC on reused layers, tied embeddings and functional models
=============================================================

Kronecker-factored curvature (:class:`~curvlinops.KFACLinearOperator`,
:class:`~curvlinops.EKFACLinearOperator`) needs the inputs and output gradients of
every linear map that uses a weight. Real models use weights in more than one
place: a recurrent cell runs once per time step, a language model ties its
unembedding to the token embedding, and JAX-style code writes a model as a function
``model_func(params, X)`` of a parameter dictionary. KFAC watches every call of
:func:`torch.nn.functional.linear` and :func:`~torch.nn.functional.conv2d` in the
forward pass, so all of these work without changes to the model.

This tutorial shows

- that the uses of a layer add to its *shared axis*: looping over positions gives
  the same factors as one call on the whole sequence,
- a functional model with a parameter dictionary, on which every curvature operator
  works (and KFAC-expand is exact for a deep linear network),
- a tiny language model with tied embedding and unembedding,
- the error for a use of a parameter that KFAC does not support.
"""

import matplotlib.pyplot as plt
from torch import eye, float64, manual_seed, rand, randint, randn, stack
from torch.nn import Embedding, Linear, Module, MSELoss, Sequential, Tanh
from torch.nn.functional import embedding, linear

from curvlinops import GGNLinearOperator, KFACLinearOperator
from curvlinops.examples.functorch import functorch_ggn

# %%
# A layer used at every position
# ------------------------------
#
# The same small network applied to each of the ``R = 4`` positions of a sequence,
# once in a Python loop (every layer is called four times) and once on the whole
# ``[B, R, D]`` tensor (every layer is called once and shares its weight over the
# positions). KFAC treats the uses of a layer like more positions, so both give the
# same Kronecker factors, for ``kfac_approx='expand'`` and ``'reduce'``.

manual_seed(0)
net = Sequential(Linear(3, 5), Tanh(), Linear(5, 2)).to(float64)


class Looped(Module):
    """Apply a network to every position of a sequence, one call per position."""

    def __init__(self, net: Module):
        """Store the network."""
        super().__init__()
        self.net = net

    def forward(self, X):
        """Map ``[B, R, D_in]`` to ``[B, R, D_out]`` position by position."""
        return stack([self.net(X[:, r]) for r in range(X.shape[1])], dim=1)


X = rand(8, 4, 3, dtype=float64)
data = [(X, randn(8, 4, 2, dtype=float64))]
params = list(net.parameters())
for approx in ["expand", "reduce"]:
    kwargs = {"fisher_type": "type-2", "kfac_approx": approx}
    K_once = KFACLinearOperator(net, MSELoss(), params, data, **kwargs)
    K_loop = KFACLinearOperator(Looped(net), MSELoss(), params, data, **kwargs)
    identity = eye(K_once.shape[1], dtype=float64)
    assert (K_loop @ identity).allclose(K_once @ identity)
    print(f"{approx}: the loop gives the factors of one call on the sequence")

# %%
# A functional model
# ------------------
#
# Parameters can be passed as a dictionary together with a function of the
# dictionary and the input. The operators then act on the tensors in the
# dictionary's order. Here, a deep linear network written with
# :func:`torch.nn.functional.linear`: for such networks with square loss, type-2
# KFAC-expand equals the diagonal blocks of the GGN (one per weight, one per bias).

params = {
    "w1": randn(4, 3, dtype=float64, requires_grad=True),
    "b1": randn(4, dtype=float64, requires_grad=True),
    "w2": randn(2, 4, dtype=float64, requires_grad=True),
}


def model_func(p: dict, X):
    """A deep linear network on a parameter dictionary."""
    return linear(linear(X, p["w1"], p["b1"]), p["w2"])


data = [(rand(16, 3, dtype=float64), randn(16, 2, dtype=float64))]
K = KFACLinearOperator(model_func, MSELoss(), params, data, fisher_type="type-2")
G = GGNLinearOperator(model_func, MSELoss(), params, data)
print("layers:", K._mapping)
ggn = functorch_ggn(model_func, MSELoss(), params, data)
assert (G @ eye(G.shape[1], dtype=float64)).allclose(ggn)
K_dense = K @ eye(K.shape[1], dtype=float64)
for block in [slice(0, 12), slice(12, 16), slice(16, 24)]:  # w1, b1, w2
    assert K_dense[block, block].allclose(ggn[block, block])
print("KFAC equals the GGN's diagonal blocks")

# %%
# A language model with tied embedding and unembedding
# ----------------------------------------------------
#
# The unembedding of this small language model is the token embedding's matrix
# :math:`\mathbf{W} \in \mathbb{R}^{V \times D}`. KFAC gives :math:`\mathbf{W}` the
# Kronecker factors of its linear use (the unembedding, named after the ``Linear``
# head) and leaves the lookup out: its per-example gradient has the vocabulary on
# the other Kronecker factor, so the sum of both would not be a Kronecker product.
# The result is the KFAC of the same model whose lookup reads a constant copy of
# :math:`\mathbf{W}`.


class TiedLM(Module):
    """Embedding, a hidden layer and the embedding's matrix as unembedding."""

    def __init__(self, vocab: int = 6, dim: int = 4, constant_lookup: bool = False):
        """Create the layers and tie the unembedding to the embedding."""
        super().__init__()
        self.embed = Embedding(vocab, dim)
        self.hidden = Linear(dim, dim)
        self.head = Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.constant_lookup = constant_lookup

    def forward(self, tokens):
        """Map token ids ``[B, T]`` to scores ``[B, T, V]``."""
        table = self.embed.weight
        table = table.detach() if self.constant_lookup else table
        return self.head(self.hidden(embedding(tokens, table)).tanh())


lm = TiedLM().to(float64)
tokens = randint(0, 6, (8, 5))
data = [(tokens, randn(8, 5, 6, dtype=float64))]
params = list(lm.parameters())  # the tied matrix, then the hidden layer
K = KFACLinearOperator(lm, MSELoss(), params, data, fisher_type="type-2")
print("layers:", K._mapping)
lm.constant_lookup = True
K_constant = KFACLinearOperator(lm, MSELoss(), params, data, fisher_type="type-2")
identity = eye(K.shape[1], dtype=float64)
assert (K @ identity).allclose(K_constant @ identity)

# %%
# How much of the curvature does the lookup carry? The dense GGN block of
# :math:`\mathbf{W}` with and without it (a small model, so we can afford it). The
# share can be large, as here: for a tied matrix, KFAC approximates the curvature
# of the unembedding, not of the lookup. The picture shows the three blocks.

W = slice(0, lm.embed.weight.numel())
ggn_constant = functorch_ggn(lm, MSELoss(), params, data)[W, W]
lm.constant_lookup = False
ggn = functorch_ggn(lm, MSELoss(), params, data)[W, W]
share = (ggn - ggn_constant).norm() / ggn.norm()
print(f"lookup's share of the GGN block of W (Frobenius norm): {share:.2f}")

blocks = {
    "GGN": ggn,
    "GGN, constant lookup": ggn_constant,
    "KFAC": (K @ identity)[W, W],
}
limit = max(block.abs().max().item() for block in blocks.values())
fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
for ax, (title, block) in zip(axes, blocks.items()):
    image = ax.imshow(block, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes).set_label("entry of the block of $\\mathbf{W}$")

# %%
# Unsupported uses
# ----------------
#
# Linear maps may also be written as ``X @ W.T``. A parameter that enters any other
# operation, here a bias added with ``+`` instead of through ``linear``, raises an
# error that names the operation and the parameter.

weights = {
    "w": randn(2, 3, dtype=float64, requires_grad=True),
    "b": randn(2, dtype=float64, requires_grad=True),
}
data = [(rand(4, 3, dtype=float64), rand(4, 2, dtype=float64))]
try:
    KFACLinearOperator(lambda p, X: X @ p["w"].T + p["b"], MSELoss(), weights, data)
except NotImplementedError as error:
    print(str(error).split(":")[0])

# %%
# Written as ``linear(X, p["w"], p["b"])``, the same model works.

K = KFACLinearOperator(lambda p, X: linear(X, p["w"], p["b"]), MSELoss(), weights, data)
print("layers:", K._mapping)
