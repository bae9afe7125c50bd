"""Downstream compatibility: how laplace-torch uses curvlinops 3.x keeps working.

laplace-torch builds KFAC on one batch, computes the factors, and reads the two
Kronecker factors of every supported module by its name; it multiplies the other
operators with an identity matrix to materialize them, with ``batch_size_fn`` for
dict inputs.
"""

import pytest
from torch import block_diag, eye, float64, kron, manual_seed, rand, randint
from torch.nn import CrossEntropyLoss, Linear, Module, MSELoss, Sequential, Tanh

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    FisherType,
    GGNLinearOperator,
    HessianLinearOperator,
    KFACLinearOperator,
)
from curvlinops.examples.functorch import functorch_ggn
from test.kfac_references import exact_case, functorch_ef
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


def laplace_kron(model, loss_func, x, y, fisher_type, **kwargs):
    """What laplace-torch 0.3's ``CurvlinopsInterface.kron`` computes.

    It builds KFAC on one batch and reads the factors of every module by name;
    returns the dense block diagonal of its Kronecker blocks (per module: weight,
    then bias), laplace's ``Kron`` materialized.
    """
    if isinstance(x, dict):
        kwargs["batch_size_fn"] = lambda x: x["x"].shape[0]
    linop = KFACLinearOperator(
        model,
        loss_func,
        list(model.parameters()),
        [(x, y)],
        fisher_type=fisher_type,
        separate_weight_and_bias=True,
        check_deterministic=False,
        **kwargs,
    )
    linop.compute_kronecker_factors()
    blocks = []
    for name, module in model.named_modules():
        if name not in linop._mapping.keys():
            continue
        A, B = linop._input_covariances[name], linop._gradient_covariances[name]
        blocks += [kron(B, A), B] if module.bias is not None else [kron(B, A)]
    return block_diag(*blocks)


@pytest.mark.parametrize(
    "fisher_type,reference",
    [(FisherType.TYPE2, functorch_ggn), (FisherType.EMPIRICAL, functorch_ef)],
    ids=["ggn", "ef"],
)
def test_laplace_kron_with_sum_reduction_is_exact_on_one_datum(fisher_type, reference):
    """laplace-torch's losses sum (``reduction='sum'``); one datum: KFAC is exact."""
    manual_seed(0)
    model = Sequential(Linear(4, 3), Tanh(), Linear(3, 2)).to(float64)
    x, y = rand(1, 4, dtype=float64), randint(0, 2, (1,))
    loss_func = CrossEntropyLoss(reduction="sum")
    dense = laplace_kron(model, loss_func, x, y, fisher_type)
    exact = reference(model, loss_func, list(model.parameters()), [(x, y)])
    assert_close(dense, exact * (dense != 0))
    assert_close(dense.trace(), exact.trace())  # no diagonal block is missed


def test_laplace_kron_regression_with_sum_reduction():
    """Square loss summed over 5 data: type-2 KFAC of a deep linear net is exact."""
    model, _, params, data = exact_case("mlp", "sum", (5,))
    loss_func = MSELoss(reduction="sum")
    ((x, y),) = data
    dense = laplace_kron(model, loss_func, x, y, FisherType.TYPE2)
    ggn = functorch_ggn(model, loss_func, params, data)
    assert_close(dense, ggn * (dense != 0))


def test_laplace_kron_with_dict_inputs_and_its_keyword_arguments():
    """laplace-torch passes `batch_size_fn` (dicts), `mc_samples`, `kfac_approx`."""
    manual_seed(0)
    model = DictModel().to(float64)
    x, y = rand(6, 4, dtype=float64), randint(0, 2, (6,))
    loss_func = CrossEntropyLoss(reduction="sum")
    kwargs = {"mc_samples": 3, "kfac_approx": "expand"}
    on_dict = laplace_kron(model, loss_func, {"x": x}, y, FisherType.MC, **kwargs)
    on_tensor = laplace_kron(model.net, loss_func, x, y, FisherType.MC, **kwargs)
    assert_close(on_dict, on_tensor)
