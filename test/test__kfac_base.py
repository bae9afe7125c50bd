"""Tests for curvlinops._kfac_base: arguments, laziness, determinism, factors."""

import pytest
import torch
from torch import equal, eye, float64, rand
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
    monkeypatch.setattr(
        op, "_data_pass", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
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


# Transactional caching: a fault leaves the operator as before


class FaultyData:
    """Mini-batches that raise ``error`` on the ``fail_at``-th batch drawn."""

    def __init__(self, batches: list, error: BaseException):
        self.batches, self.error = batches, error
        self.drawn, self.fail_at = 0, None

    def arm(self, fail_at: int | None):
        self.drawn, self.fail_at = 0, fail_at

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            if self.drawn == self.fail_at:
                raise self.error
            yield batch


_CACHE = (
    "_factors_ready",
    "_input_covariances",
    "_gradient_covariances",
    "_input_covariances_eigenvectors",
    "_gradient_covariances_eigenvectors",
    "_corrected_eigenvalues",
)


def _cache(op) -> dict:
    """Copies of the operator's cached factors (and whether they are ready)."""
    state = {}
    for name in _CACHE:
        value = getattr(op, name, None)
        is_dict = isinstance(value, dict)
        state[name] = {k: v.clone() for k, v in value.items()} if is_dict else value
    return state


def _assert_same_cache(op, expected: dict):
    for name, value in _cache(op).items():
        if isinstance(value, dict):
            assert value.keys() == expected[name].keys(), name
            assert all(equal(v, expected[name][k]) for k, v in value.items()), name
        else:
            assert value == expected[name], name


def _faulty_operator(cls, error: BaseException):
    model, loss_func, params, batches = Case("sequence", "ce").make()
    data = FaultyData(batches, error)
    kwargs = {"fisher_type": "mc", "mc_samples": 2, "check_deterministic": False}
    op = cls(model, loss_func, params, data, **kwargs)
    fresh = cls(model, loss_func, params, batches, **kwargs)
    fresh._ensure_factors()
    return op, data, fresh


# batches 1, 2: the factors' pass; 3, 4: EKFAC's correction pass
FAULTS = [(KFACLinearOperator, 1), (KFACLinearOperator, 2)] + [
    (EKFACLinearOperator, k) for k in (1, 2, 3, 4)
]


@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "cached"])
@pytest.mark.parametrize(
    "error", [RuntimeError("disk"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
@pytest.mark.parametrize(
    "cls,fail_at", FAULTS, ids=[f"{c.__name__[:5]}-{k}" for c, k in FAULTS]
)
def test_a_fault_in_the_factor_computation_changes_nothing(cls, fail_at, error, cached):
    op, data, fresh = _faulty_operator(cls, error)
    if cached:
        op._ensure_factors()
    before = _cache(op)
    data.arm(fail_at)
    with pytest.raises(type(error)):
        op.compute_kronecker_factors() if cached else op @ rand(
            op.shape[1], dtype=float64
        )
    _assert_same_cache(op, before)
    assert all(not m._forward_hooks for m in op._model_func.modules())
    assert all(p.grad is None for p in op._params)
    data.arm(None)
    v = rand(op.shape[1], dtype=float64)
    op.compute_kronecker_factors()  # retry
    assert equal(op @ v, fresh @ v)
    _assert_same_cache(op, _cache(fresh))


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_fault_in_the_explicit_eigenvalue_correction_changes_nothing(fail_at):
    E, data, fresh = _faulty_operator(EKFACLinearOperator, RuntimeError("disk"))
    E._ensure_factors()
    before = _cache(E)
    data.arm(fail_at)
    with pytest.raises(RuntimeError, match="disk"):
        E.compute_eigenvalue_correction()
    _assert_same_cache(E, before)
    data.arm(None)
    E.compute_eigenvalue_correction()  # retry
    _assert_same_cache(E, _cache(fresh))
