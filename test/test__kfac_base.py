"""Tests for curvlinops._kfac_base: arguments, laziness, determinism, factors."""

import pytest
import torch
from torch import eye, float64, rand
from torch.nn import CrossEntropyLoss, L1Loss, Linear, Sequential

from curvlinops import EKFACLinearOperator, KFACLinearOperator
from test.cases import Case
from test.kfac_references import kfac_dense
from test.utils import assert_close

OPERATORS = pytest.mark.parametrize(
    "cls", [KFACLinearOperator, EKFACLinearOperator], ids=["kfac", "ekfac"]
)


def _mlp(loss="ce", reduction="mean"):
    return Case("mlp", loss, reduction).make()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fisher_type": "type-3"}, "fisher_type"),
        ({"kfac_approx": "shrink"}, "kfac_approx"),
        ({"loss_average": "sequence"}, "loss_average"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"fisher_type": "type-2", "mc_samples": 2}, "mc_samples"),
        ({"num_per_example_loss_terms": 0}, "num_per_example_loss_terms"),
    ],
)
def test_invalid_arguments_raise_early(kwargs, match):
    model, loss_func, params, data = _mlp()
    with pytest.raises(ValueError, match=match):
        KFACLinearOperator(model, loss_func, params, data, **kwargs)


@pytest.mark.parametrize("average", ["batch", "batch+sequence"])
def test_sum_reduction_rejects_an_average(average):
    model, _, params, data = _mlp()
    loss_func = CrossEntropyLoss(reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        KFACLinearOperator(model, loss_func, params, data, loss_average=average)


def test_unsupported_loss_raises_and_plain_callables_work():
    """A callable that hides the module gives the same KFAC (layers discovered)."""
    model, _, params, data = _mlp()
    with pytest.raises(ValueError, match="L1Loss"):
        KFACLinearOperator(model, L1Loss(), params, data)
    K = KFACLinearOperator(model, CrossEntropyLoss(), params, data)
    K_callable = KFACLinearOperator(
        lambda X: model(X), CrossEntropyLoss(), params, data
    )
    assert list(K_callable._mapping) == ["params[0]", "params[2]"]
    identity = eye(K.shape[1], dtype=float64)
    assert_close(K_callable @ identity, K @ identity)


def test_ekfac_rejects_forward_only():
    model, loss_func, params, data = _mlp()
    with pytest.raises(ValueError, match="forward-only"):
        EKFACLinearOperator(model, loss_func, params, data, fisher_type="forward-only")


def test_num_per_example_loss_terms_is_checked_against_the_outputs():
    model, loss_func, params, data = Case("sequence", "mse").make()  # 2 terms each
    kwargs = {"loss_average": "batch+sequence", "check_deterministic": False}
    K = KFACLinearOperator(
        model, loss_func, params, data, num_per_example_loss_terms=2, **kwargs
    )
    K.compute_kronecker_factors()
    K = KFACLinearOperator(
        model, loss_func, params, data, num_per_example_loss_terms=3, **kwargs
    )
    with pytest.raises(ValueError, match="num_per_example_loss_terms"):
        K.compute_kronecker_factors()


@OPERATORS
def test_factors_are_computed_lazily_and_once(cls, monkeypatch):
    model, loss_func, params, data = _mlp()
    op = cls(model, loss_func, params, data, check_deterministic=False)
    calls = []
    original = op._data_pass
    monkeypatch.setattr(op, "_data_pass", lambda *a: calls.append(1) or original(*a))
    assert not calls
    v = rand(op.shape[1], dtype=float64)
    op @ v
    op @ v
    assert op.trace.isfinite()
    assert len(calls) == (1 if cls is KFACLinearOperator else 2)


def test_determinism_check_catches_changing_data():
    model, loss_func, params, data = _mlp()

    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(data if self.calls % 2 else data[::-1])

    KFACLinearOperator(model, loss_func, params, data)  # deterministic: no error
    with pytest.raises(RuntimeError, match="differ"):
        KFACLinearOperator(model, loss_func, params, Shuffled(), num_data=5)


def test_laplace_style_access_to_factors():
    """Downstream code reads ``_mapping`` and the factors keyed by layer name."""
    model = Sequential(Linear(5, 4), Linear(4, 3)).to(float64)
    _, _, _, data = _mlp()
    X, y = data[0]
    K = KFACLinearOperator(
        model,
        CrossEntropyLoss(reduction="sum"),
        list(model.parameters()),
        [(X, y)],
        fisher_type="type-2",
        loss_average=None,
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    K.compute_kronecker_factors()
    assert list(K._mapping) == ["0", "1"]
    for name, (d_in, d_out) in zip(K._mapping, [(5, 4), (4, 3)]):
        assert K._input_covariances[name].shape == (d_in, d_in)
        assert K._gradient_covariances[name].shape == (d_out, d_out)
    A, G = K._input_covariances["0"], K._gradient_covariances["0"]
    assert_close(kfac_dense(K)[:20, :20], torch.kron(G, A))
    assert_close(A, X.T @ X / len(X))


def test_parameter_order_is_free():
    """Parameters may come in any order; blocks follow the layers."""
    model, loss_func, params, data = _mlp()
    order = [3, 0, 2, 1]
    K = KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    K_perm = KFACLinearOperator(
        model, loss_func, [params[i] for i in order], data, fisher_type="type-2"
    )
    sizes = [p.numel() for p in params]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    perm = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in order])
    dense = kfac_dense(K)
    assert_close(kfac_dense(K_perm), dense[perm][:, perm])


def test_shape_is_checked():
    """Spec 003's ``shape`` keyword: the expected ``(D, D)``."""
    model, loss_func, params, data = _mlp()
    num_params = sum(p.numel() for p in params)
    K = KFACLinearOperator(model, loss_func, params, data, shape=(num_params,) * 2)
    assert K.shape == (num_params, num_params)
    with pytest.raises(ValueError, match="shape"):
        KFACLinearOperator(model, loss_func, params, data, shape=(num_params, 1))
