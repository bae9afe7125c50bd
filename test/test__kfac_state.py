"""Tests for curvlinops._kfac_state: saving and loading KFAC and EKFAC."""

from collections import OrderedDict
from io import BytesIO

import pytest
import torch
from torch import block_diag, eye, float64, kron, manual_seed, rand
from torch.linalg import matrix_norm, qr
from torch.nn import Linear, MSELoss, ReLU, Sequential

from curvlinops import EKFACLinearOperator, KFACLinearOperator, KFACType
from test.cases import Case
from test.faults import (
    assert_same_object_state,
    assert_same_state,
    model_state,
    object_state,
)
from test.kfac_references import block_indices, ekfac_dense, kfac_dense
from test.utils import assert_close, compare_matmat

OPERATORS = pytest.mark.parametrize(
    "cls", [KFACLinearOperator, EKFACLinearOperator], ids=["kfac", "ekfac"]
)


@OPERATORS
@pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])
def test_state_dict_round_trip(cls, separate):
    model, loss_func, params, data = Case("cnn", "ce").make()
    kwargs = {"fisher_type": "mc", "mc_samples": 3, "kfac_approx": "reduce"}
    op = cls(
        model, loss_func, params, data, separate_weight_and_bias=separate, **kwargs
    )
    dense = (kfac_dense if cls is KFACLinearOperator else ekfac_dense)(op)
    buffer = BytesIO()
    torch.save(op.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)

    fresh = cls(model, loss_func, params, data, check_deterministic=False)
    fresh._data_pass = None  # loading must not recompute the factors
    fresh.load_state_dict(state)
    assert fresh._kfac_approx == "reduce" and fresh._mc_samples == 3
    assert fresh._separate_weight_and_bias == separate
    v = rand(op.shape[1], dtype=float64)
    assert_close(fresh @ v, dense @ v)
    loaded = cls.from_state_dict(state, model, params, data)
    assert_close(loaded @ v, dense @ v)


def test_load_state_dict_rejects_other_losses_and_layers():
    model, loss_func, params, data = Case("mlp", "ce").make()
    state = KFACLinearOperator(model, loss_func, params, data).state_dict()
    other_loss = KFACLinearOperator(
        model, MSELoss(), params, data, check_deterministic=False
    )
    with pytest.raises(ValueError, match="CrossEntropyLoss"):
        other_loss.load_state_dict(state)
    first_layer = KFACLinearOperator(model, loss_func, params[:2], data)
    with pytest.raises(ValueError, match="layers|for"):
        first_layer.load_state_dict(state)


# curvlinops 3.0.1's state dict layout (the end of test/compat/curvlinops-3.0.1-api.txt)
LAYOUT_3_0_1 = {
    "model_func_state_dict": OrderedDict,
    "loss_type": str,
    "loss_reduction": str,
    "progressbar": bool,
    "seed": int,
    "fisher_type": str,
    "mc_samples": int,
    "kfac_approx": KFACType,
    "num_per_example_loss_terms": int,
    "separate_weight_and_bias": bool,
    "num_data": int,
    "input_covariances": dict,
    "gradient_covariances": dict,
    "trace": type(None),
    "det": type(None),
    "logdet": type(None),
    "frobenius_norm": type(None),
}
EKFAC_LAYOUT_3_0_1 = LAYOUT_3_0_1 | {
    "input_covariances_eigenvectors": dict,
    "gradient_covariances_eigenvectors": dict,
    "cached_activations": dict,
    "corrected_eigenvalues": dict,
}


def _linear_relu_linear():
    """The model of the listed layout, with square loss on 7 data."""
    manual_seed(0)
    model = Sequential(Linear(4, 3), ReLU(), Linear(3, 2)).to(float64)
    data = [(rand(7, 4, dtype=float64), rand(7, 2, dtype=float64))]
    return model, MSELoss(), list(model.parameters()), data


@OPERATORS
def test_state_dict_has_the_keys_and_types_of_3_0_1(cls):
    model, loss_func, params, data = _linear_relu_linear()
    op = cls(model, loss_func, params, data, fisher_type="type-2")
    layout = LAYOUT_3_0_1 if cls is KFACLinearOperator else EKFAC_LAYOUT_3_0_1
    state = op.state_dict()
    assert list(state) == list(layout)
    assert {key: type(value) for key, value in state.items()} == layout
    for key in ["input_covariances", "gradient_covariances"]:
        assert list(state[key]) == ["0", "2"]  # by module name, also for EKFAC
    if cls is EKFACLinearOperator:
        assert state["cached_activations"] == {}
        eigenvalues = state["corrected_eigenvalues"]
        assert {
            k: {r: v.shape for r, v in d.items()} for k, d in eigenvalues.items()
        } == {
            "0": {"weight": (3, 4), "bias": (3,)},
            "2": {"weight": (2, 3), "bias": (2,)},
        }
    trace = op.trace
    cached = op.state_dict()  # the computed trace is saved, as in 3.0.1
    assert cached["trace"] is trace and cached["det"] is None
    dense = (kfac_dense if cls is KFACLinearOperator else ekfac_dense)(op)
    assert_close(trace, dense.trace())


def _spd(dim: int):
    M = rand(dim, dim, dtype=float64)
    return M @ M.T + eye(dim, dtype=float64)


def _state_3_0_1(model, **factors) -> dict:
    """A state dict in 3.0.1's layout, built by hand, with the given factors."""
    state = {
        "model_func_state_dict": model.state_dict(),
        "loss_type": "MSELoss",
        "loss_reduction": "mean",
        "progressbar": False,
        "seed": 2147483647,
        "fisher_type": "type-2",
        "mc_samples": 1,
        "kfac_approx": KFACType.EXPAND,
        "num_per_example_loss_terms": 1,
        "separate_weight_and_bias": True,
        "num_data": 7,
        "trace": None,
        "det": None,
        "logdet": None,
        "frobenius_norm": None,
    }
    return state | factors


def _saved_and_loaded(state: dict) -> dict:
    buffer = BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # the enums may be loaded safely


def test_loads_a_kfac_state_dict_saved_by_3_0_1():
    model, _, _, data = _linear_relu_linear()
    manual_seed(1)
    A = {"0": _spd(4), "2": _spd(3)}
    G = {"0": _spd(3), "2": _spd(2)}
    state = _state_3_0_1(model, input_covariances=A, gradient_covariances=G)
    state = _saved_and_loaded(state | {"trace": torch.tensor(42.0, dtype=float64)})
    other, _, params, _ = _linear_relu_linear()
    with torch.no_grad():
        other[0].weight.add_(1.0)  # the saved model state replaces this
    K = KFACLinearOperator.from_state_dict(state, other, params, data)
    assert_close(other[0].weight, model[0].weight)
    assert isinstance(K._loss_func, MSELoss) and K._loss_func.reduction == "mean"
    assert K._num_data == 7 and K._fisher_type == "type-2"
    blocks = [kron(G["0"], A["0"]), G["0"], kron(G["2"], A["2"]), G["2"]]
    compare_matmat(K, block_diag(*blocks))
    assert K.trace.item() == 42.0  # the cached value was loaded
    assert_close(K.frobenius_norm, matrix_norm(block_diag(*blocks)))


@pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])
def test_loads_an_ekfac_state_dict_saved_by_3_0_1(separate):
    model, _, params, data = _linear_relu_linear()
    manual_seed(1)
    dims = {"0": (3, 4), "2": (2, 3)}  # (D_out, D_in)
    d_in = {k: d + (not separate) for k, (_, d) in dims.items()}
    QA = {k: qr(rand(d, d, dtype=float64)).Q for k, d in d_in.items()}
    QG = {k: qr(rand(d, d, dtype=float64)).Q for k, (d, _) in dims.items()}
    if separate:
        eigenvalues = {
            k: {"weight": rand(o, i, dtype=float64), "bias": rand(o, dtype=float64)}
            for k, (o, i) in dims.items()
        }
    else:
        eigenvalues = {k: rand(o, d_in[k], dtype=float64) for k, (o, _) in dims.items()}
    state = _state_3_0_1(
        model,
        separate_weight_and_bias=separate,
        input_covariances={k: _spd(d) for k, d in d_in.items()},
        gradient_covariances={k: _spd(d) for k, (d, _) in dims.items()},
        input_covariances_eigenvectors=QA,
        gradient_covariances_eigenvectors=QG,
        cached_activations={},
        corrected_eigenvalues=eigenvalues,
    )
    E = EKFACLinearOperator.from_state_dict(
        _saved_and_loaded(state), model, params, data
    )
    dense = torch.zeros(E.shape, dtype=float64)
    for layer, kind, idx in block_indices(E):
        if kind == "b":
            Q, values = QG[layer], eigenvalues[layer]["bias"]
        else:
            Q = kron(QG[layer], QA[layer])
            values = eigenvalues[layer]["weight"] if separate else eigenvalues[layer]
        dense[idx.unsqueeze(1), idx.unsqueeze(0)] = Q @ values.flatten().diag() @ Q.T
    compare_matmat(E, dense)
    assert_close(E._input_covariances["0"], state["input_covariances"]["0"])


def test_explicit_loss_average_is_saved_and_restored():
    """Our one extra key; absent by default, so 3.0.1 sees its own layout."""
    model, loss_func, params, data = Case("sequence", "mse").make()
    default = KFACLinearOperator(model, loss_func, params, data).state_dict()
    assert "loss_average" not in default
    K = KFACLinearOperator(model, loss_func, params, data, loss_average="batch")
    state = K.state_dict()
    assert state["loss_average"] == "batch"
    assert state["num_per_example_loss_terms"] == 2  # as seen in the data
    loaded = KFACLinearOperator.from_state_dict(state, model, params, data)
    assert loaded._loss_average == "batch"
    loaded.compute_kronecker_factors()  # recomputing keeps the scaling
    assert_close(kfac_dense(loaded), kfac_dense(K))


@OPERATORS
def test_state_without_factors_computes_them_when_needed(cls):
    model, loss_func, params, data = _linear_relu_linear()
    op = cls(model, loss_func, params, data, fisher_type="type-2")
    state = op.state_dict()
    for key in state:
        if key.endswith(("covariances", "eigenvectors", "eigenvalues")):
            state[key] = {}
    loaded = cls.from_state_dict(state, model, params, data, check_deterministic=False)
    assert not loaded._factors_ready
    compare_matmat(
        loaded, (kfac_dense if cls is KFACLinearOperator else ekfac_dense)(op)
    )


def _mlp(hidden: int, seed: int):
    manual_seed(seed)
    return Sequential(Linear(5, hidden), ReLU(), Linear(hidden, 3)).to(float64)


def _unfitting_states(cls) -> dict:
    """States that do not fit an operator on ``_mlp(4, 0)``, by what differs."""
    X, y = rand(6, 5, dtype=float64), rand(6, 3, dtype=float64)
    states = {}
    for name, hidden, kwargs in [
        ("architecture", 6, {}),
        ("fitting", 4, {}),
        ("joint", 4, {"separate_weight_and_bias": False}),
    ]:
        model = _mlp(hidden, seed=1)
        op = cls(model, MSELoss(), list(model.parameters()), [(X, y)], **kwargs)
        states[name] = op.state_dict()
    fitting, model_state = states.pop("fitting"), states["architecture"]
    states["factor shape"] = {**model_state, **_model_of(fitting)}
    states["factor keys"] = {**fitting, "gradient_covariances": {"0": eye(4)}}
    states["separate_weight_and_bias"] = {
        **states.pop("joint"),
        "separate_weight_and_bias": True,
    }
    states["loss"] = {**fitting, "loss_type": "BCEWithLogitsLoss"}
    states["missing key"] = {k: v for k, v in fitting.items() if k != "seed"}
    states["num_data"] = {**fitting, "num_data": 0}
    return states


MATCHES = {
    "architecture": r"model_func_state_dict\['0.weight'\] is \[6, 5\]",
    "factor shape": r"input_covariances\['2'\] is a torch.float64 tensor of shape",
    "factor keys": r"gradient_covariances are for \['0'\]",
    "separate_weight_and_bias": r"input_covariances\['0'\] is .* shape \[6, 6\]",
    "loss": "BCEWithLogitsLoss",
    "missing key": r"lacks the keys \['seed'\]",
    "num_data": "num_data`? must be",
}


def _model_of(state: dict) -> dict:
    return {"model_func_state_dict": state["model_func_state_dict"]}


@OPERATORS
def test_state_that_does_not_fit_changes_nothing(cls):
    """Another architecture, factor shapes, keys, loss or hyperparameters raise.

    Before the error, nothing of the operator or its model changed; the operator
    multiplies as before, like a fresh one.
    """
    model = _mlp(4, seed=0)
    params = list(model.parameters())
    data = [(rand(6, 5, dtype=float64), rand(6, 3, dtype=float64))]
    op = cls(model, MSELoss(), params, data)
    v = rand(op.shape[1], dtype=float64)
    expected = op @ v
    for what, state in _unfitting_states(cls).items():
        before_model, before_op = model_state(model), object_state(op)
        with pytest.raises(ValueError, match=MATCHES[what]):
            op.load_state_dict(state)
        assert_same_state(before_model, model_state(model))
        assert_same_object_state(before_op, object_state(op))
        assert torch.equal(op @ v, expected), what
        if what == "loss":  # from_state_dict builds the state's loss
            continue
        with pytest.raises(ValueError, match=MATCHES[what]):
            cls.from_state_dict(state, model, params, data)
        assert_same_state(before_model, model_state(model))
    assert_close(cls(model, MSELoss(), params, data) @ v, expected)
