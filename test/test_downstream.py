"""Downstream compatibility: how laplace-torch uses curvlinops 3.x keeps working.

laplace-torch builds KFAC on one batch, computes the factors, and reads the two
Kronecker factors of every supported module by its name; it multiplies the other
operators with an identity matrix to materialize them, with ``batch_size_fn`` for
dict inputs.
"""

import pytest
from torch import block_diag, eye, float64, kron, manual_seed, rand, randint
from torch.nn import CrossEntropyLoss, Linear, Module, Sequential, Tanh

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    KFACLinearOperator,
)
from curvlinops.examples.functorch import functorch_ggn
from curvlinops.kfac_utils import FisherType
from test.utils import assert_close


def test_kfac_factors_by_module_name():
    manual_seed(0)
    model = Sequential(Linear(4, 3), Tanh(), Linear(3, 2)).to(float64)
    x, y = rand(1, 4, dtype=float64), randint(0, 2, (1,))
    linop = KFACLinearOperator(
        model,
        CrossEntropyLoss(),
        list(model.parameters()),
        [(x, y)],
        fisher_type=FisherType.TYPE2,
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    linop.compute_kronecker_factors()
    blocks = []
    for name, module in model.named_modules():
        if name not in linop._mapping.keys():
            continue
        A = linop._input_covariances[name]
        B = linop._gradient_covariances[name]
        assert A.shape == (module.in_features,) * 2
        assert B.shape == (module.out_features,) * 2
        blocks += [kron(B, A), B]  # weight block, then bias block
    assert set(linop._mapping) == {"0", "2"}
    dense = linop @ eye(linop.shape[0], dtype=float64)
    assert_close(dense, block_diag(*blocks))
    # one datum and type-2: the weight block of the last layer is exact
    ggn = functorch_ggn(model, CrossEntropyLoss(), list(model.parameters()), [(x, y)])
    last = slice(4 * 3 + 3, 4 * 3 + 3 + 3 * 2)
    assert_close(dense[last, last], ggn[last, last])


class DictModel(Module):
    def __init__(self):
        super().__init__()
        self.net = Sequential(Linear(4, 3), Tanh(), Linear(3, 2))

    def forward(self, batch: dict):
        return self.net(batch["x"])


@pytest.mark.parametrize(
    "cls",
    [
        HessianLinearOperator,
        GGNLinearOperator,
        EFLinearOperator,
        FisherMCLinearOperator,
    ],
)
def test_materialize_with_identity_on_dict_inputs(cls):
    manual_seed(0)
    model = DictModel().to(float64)
    data = [({"x": rand(3, 4, dtype=float64)}, randint(0, 2, (3,))) for _ in range(2)]
    linop = cls(
        model,
        CrossEntropyLoss(),
        list(model.parameters()),
        data,
        batch_size_fn=lambda batch: batch["x"].shape[0],
    )
    dense = linop @ eye(linop.shape[0], dtype=float64)
    assert dense.shape == (linop.shape[0], linop.shape[0])
    assert_close(dense, dense.T)
    v = rand(linop.shape[0], dtype=float64)
    assert_close(dense @ v, linop @ v)
