r"""Models with several inputs: dictionaries as mini-batches
=========================================================

Many models take more than one tensor: an image and tabular features, token
ids and an attention mask, or the ``BatchEncoding`` of a tokenizer. The
operators in ``curvlinops`` accept mini-batches whose input ``X`` is a
dictionary (any :class:`~collections.abc.MutableMapping`) and pass it to the
model unchanged. The only thing they need in addition is a ``batch_size_fn``
that tells them the batch size of such an input, to weight the mini-batches of
a loss with ``reduction='mean'``.

This tutorial builds a two-branch network on a dictionary of image, tabular
features and a mask of missing features, feeds it from a
:class:`torch.utils.data.DataLoader`, and checks the Hessian, GGN, empirical
Fisher, Monte-Carlo Fisher, Jacobian, KFAC and EKFAC against dense references
and against the same network with a single tensor input.

We start with the imports.
"""

import matplotlib.pyplot as plt
from matplotlib.colors import SymLogNorm
from torch import cat, eye, float64, manual_seed, rand, randint
from torch.nn import Conv2d, CrossEntropyLoss, Linear, Module
from torch.utils.data import DataLoader

from curvlinops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
)
from curvlinops.examples.functorch import (
    functorch_empirical_fisher,
    functorch_ggn,
    functorch_gradient_and_loss,
    functorch_hessian,
    functorch_jacobian,
)

# %%
# A model with a dictionary input
# -------------------------------
#
# The network has a convolutional branch for a small image and a linear branch
# for five tabular features, of which some are missing (a mask sets them to
# zero). A linear layer on the concatenated features predicts one of three
# classes.


class TwoBranchNet(Module):
    """Classifier of an image and tabular features with missing entries."""

    def __init__(self):
        """Create the layers of both branches and the head."""
        super().__init__()
        self.conv = Conv2d(1, 2, kernel_size=3)
        self.tabular = Linear(5, 4)
        self.head = Linear(2 * 4 * 4 + 4, 3)

    def forward(self, X: dict):
        """Map a dictionary with image, tabular features and mask to logits."""
        image_features = self.conv(X["image"]).tanh().flatten(start_dim=1)
        tabular_features = self.tabular(X["tabular"] * X["mask"]).tanh()
        return self.head(cat([image_features, tabular_features], dim=1))


manual_seed(0)
model = TwoBranchNet().to(float64)
loss_func = CrossEntropyLoss()
params = list(model.parameters())
num_params = sum(p.numel() for p in params)
print(f"{num_params} parameters")

# %%
# A data loader of dictionaries
# -----------------------------
#
# A data set whose items are pairs ``(dictionary, label)`` gives a
# :class:`~torch.utils.data.DataLoader` that yields mini-batches of the same
# form: PyTorch's default collation stacks each entry of the dictionaries. (A
# list is a valid data set.) The loader must not shuffle, because the operators
# expect the same mini-batches on every pass over the data.

num_data = 20
samples = [
    (
        {
            "image": rand(1, 6, 6, dtype=float64),
            "tabular": rand(5, dtype=float64),
            "mask": (rand(5) > 0.3).to(float64),
        },
        randint(0, 3, ()),
    )
    for _ in range(num_data)
]
loader = DataLoader(samples, batch_size=8, shuffle=False)
X, y = next(iter(loader))
print({key: tuple(value.shape) for key, value in X.items()}, tuple(y.shape))

# %%
# The last mini-batch has only four samples, so the mini-batches have different
# weights in the mean loss. The operators find a dictionary's batch size with
# ``batch_size_fn``:


def batch_size_fn(X: dict) -> int:
    """Return the number of samples in a dictionary mini-batch."""
    return X["image"].shape[0]


# %%
# Without it, an operator refuses dictionary inputs with a clear error:

try:
    GGNLinearOperator(model, loss_func, params, loader)
except ValueError as error:
    print(error)

# %%
# Curvature operators
# -------------------
#
# With ``batch_size_fn``, every operator works as with tensor inputs. We check
# them against the dense references in :mod:`curvlinops.examples.functorch`,
# which need to know the dictionary entry with the batch axis (``input_key``).

kwargs = {"batch_size_fn": batch_size_fn}
identity = eye(num_params, dtype=float64)
data = list(loader)  # the references take any iterable of mini-batches
references = [
    (HessianLinearOperator, functorch_hessian),
    (GGNLinearOperator, functorch_ggn),
    (EFLinearOperator, functorch_empirical_fisher),
]
for operator_class, reference in references:
    A = operator_class(model, loss_func, params, loader, **kwargs)
    dense = reference(model, loss_func, params, data, input_key="image")
    assert (A @ identity).allclose(dense)
    print(f"{operator_class.__name__}: {A.shape}, matches the reference")

# %%
# Every operator also evaluates the loss and gradient on the whole data set:

gradient, loss = GGNLinearOperator(
    model, loss_func, params, loader, **kwargs
).gradient_and_loss()
gradient_ref, loss_ref = functorch_gradient_and_loss(
    model, loss_func, params, data, input_key="image"
)
assert loss.allclose(loss_ref)
assert all(g.allclose(g_ref) for g, g_ref in zip(gradient, gradient_ref))

# %%
# The Jacobian takes no loss function; its rows are the logits of all 20
# samples:

J = JacobianLinearOperator(model, params, loader, **kwargs)
print(f"Jacobian: {J.shape}")
assert (J @ identity).allclose(functorch_jacobian(model, params, data))

# %%
# The same network with one tensor input
# --------------------------------------
#
# There are no dense references for the Monte-Carlo Fisher, KFAC and EKFAC, so
# we compare them with the same operators on the same network, wrapped to take
# all inputs concatenated into one tensor. The wrapper holds the same layers, and
# therefore the same parameters.


class Concatenated(Module):
    """``TwoBranchNet`` with image, tabular features and mask in one tensor."""

    def __init__(self, net: TwoBranchNet):
        """Hold the network."""
        super().__init__()
        self.net = net

    def forward(self, Z):
        """Split the columns of ``Z`` into the dictionary and call the network."""
        image, tabular, mask = Z.split([36, 5, 5], dim=1)
        X = {"image": image.reshape(-1, 1, 6, 6), "tabular": tabular, "mask": mask}
        return self.net(X)


def concatenate(X: dict):
    """Concatenate a dictionary mini-batch into the input of ``Concatenated``."""
    return cat([X["image"].flatten(start_dim=1), X["tabular"], X["mask"]], dim=1)


tensor_model = Concatenated(model)
tensor_data = [(concatenate(X), y) for X, y in loader]
assert tensor_model(tensor_data[0][0]).allclose(model(data[0][0]))

# %%
# The Monte-Carlo Fisher draws the same labels from the same seed, and KFAC and
# EKFAC compute the same Kronecker factors, here of the Fisher (the default
# ``fisher_type='mc'``), with two sampled labels per datum. Note that KFAC
# supports the two linear layers and the convolution alike.

for operator_class, extra in [
    (FisherMCLinearOperator, {"mc_samples": 2}),
    (KFACLinearOperator, {"mc_samples": 2}),
    (EKFACLinearOperator, {"mc_samples": 2}),
]:
    A = operator_class(model, loss_func, params, loader, **kwargs, **extra)
    A_tensor = operator_class(tensor_model, loss_func, params, tensor_data, **extra)
    assert (A @ identity).allclose(A_tensor @ identity)
    print(f"{operator_class.__name__}: dictionary and tensor inputs agree")

# %%
# Finally, the Monte-Carlo Fisher converges to the GGN, because the Fisher
# equals the GGN for the cross-entropy loss; KFAC with ``fisher_type='type-2'``
# approximates the GGN's diagonal blocks directly:

G = GGNLinearOperator(model, loss_func, params, loader, **kwargs) @ identity
F = FisherMCLinearOperator(model, loss_func, params, loader, mc_samples=2000, **kwargs)
error = ((F @ identity - G).norm() / G.norm()).item()
print(f"MC Fisher with 2000 samples: relative distance to the GGN {error:.3f}")
assert error < 0.05

K = KFACLinearOperator(model, loss_func, params, loader, fisher_type="type-2", **kwargs)
K_dense = K @ identity
print(f"trace of KFAC: {K.trace:.4f}, of the GGN: {G.trace():.4f}")

# %%
# For the bias of a linear layer, whose "input" is always one, the Kronecker
# factor :math:`\mathbf{A}` is one and KFAC's block is exact. (Not so for the
# convolution's bias, which is shared over the pixels.)

start = 0
for name, p in model.named_parameters():
    block = slice(start, start + p.numel())
    start += p.numel()
    if name in ["tabular.bias", "head.bias"]:
        assert K_dense[block, block].allclose(G[block, block])
    if name == "conv.bias":
        assert not K_dense[block, block].allclose(G[block, block])

# %%
# The two matrices side by side: KFAC approximates the GGN's diagonal blocks of
# the six parameters (weight and bias of each of the three layers) and drops
# everything between them.

fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), layout="constrained")
norm = SymLogNorm(linthresh=1e-4, vmin=-0.1, vmax=0.1)
for ax, matrix, title in [(axes[0], G, "GGN"), (axes[1], K_dense, "KFAC (type-2)")]:
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", norm=norm)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes).set_label("entry (symmetric log scale)")
