"""Tests for curvlinops._execution: products whatever the caller's context.

Also the protection of every computation over model and data: running statistics
restored on interrupts, replaced parameters detected, threads taking turns.
"""

from copy import deepcopy
from threading import Thread

import pytest
from torch import (
    Generator,
    Tensor,
    float64,
    inference_mode,
    manual_seed,
    no_grad,
    rand,
    randint,
    randn,
)
from torch.nn import (
    BatchNorm1d,
    CrossEntropyLoss,
    Identity,
    Linear,
    MSELoss,
    Parameter,
    Sequential,
    Tanh,
)

from curvlinops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
)
from curvlinops._execution import lazy_attribute
from curvlinops.examples.functorch import (
    functorch_empirical_fisher,
    functorch_ggn,
    functorch_hessian,
    functorch_jacobian,
)
from test.cases import Case
from test.faults import (
    INJECTED,
    Faulty,
    FaultyData,
    Rendezvous,
    assert_forward_ad_usable,
    assert_same_state,
    model_state,
)
from test.utils import assert_close, compare_matmat


@pytest.mark.parametrize(
    "make",
    [
        lambda m, f, p, d: HessianLinearOperator(m, f, p, d),
        lambda m, f, p, d: GGNLinearOperator(m, f, p, d),
        lambda m, f, p, d: EFLinearOperator(m, f, p, d),
        lambda m, f, p, d: FisherMCLinearOperator(m, f, p, d),
        lambda m, f, p, d: JacobianLinearOperator(m, p, d),
        lambda m, f, p, d: JacobianLinearOperator(m, p, d).adjoint(),
        lambda m, f, p, d: KFACLinearOperator(m, f, p, d),
        lambda m, f, p, d: EKFACLinearOperator(m, f, p, d),
    ],
    ids=[
        "hessian",
        "ggn",
        "ef",
        "mc_fisher",
        "jacobian",
        "jacobian_t",
        "kfac",
        "ekfac",
    ],
)
def test_products_ignore_the_callers_grad_mode(make):
    """Products under ``no_grad`` or ``inference_mode`` equal normal ones.

    That includes an operator built in inference mode from data created there.
    """
    model, loss_func, params, data = Case("mlp", "ce").make()
    op = make(model, loss_func, params, data)
    v = randn(op.shape[1], dtype=float64)
    expected = op @ v
    for mode in (no_grad, inference_mode):
        with mode():
            assert_close(op @ v, expected)
    with inference_mode():
        inference_data = [(X.clone(), y.clone()) for X, y in data]
        inference_op = make(model, loss_func, params, inference_data)
        assert_close(inference_op @ v, expected)


def test_batchnorm_in_train_mode_uses_batch_statistics_and_is_left_unchanged():
    """Products of a train-mode BatchNorm model are those of batch statistics.

    The reference is the same model with a BatchNorm that keeps no running
    statistics (it always normalizes with the batch's). The running statistics
    of the tracked model are the same before and after the products.
    """
    manual_seed(0)

    def model_with(track: bool):
        manual_seed(1)
        norm = BatchNorm1d(3, track_running_stats=track)
        return Sequential(Linear(4, 3), norm, Tanh(), Linear(3, 2)).to(float64)

    model, stateless = model_with(True).train(), model_with(False)
    data = [(rand(8, 4, dtype=float64), rand(8, 2, dtype=float64)) for _ in range(2)]
    buffers = [b.clone() for b in model.buffers()]
    params, reference_params = list(model.parameters()), list(stateless.parameters())
    for operator, reference in [
        (GGNLinearOperator, functorch_ggn),
        (EFLinearOperator, functorch_empirical_fisher),
        (HessianLinearOperator, functorch_hessian),  # plain autograd inside
    ]:
        op = operator(model, MSELoss(), params, data)
        compare_matmat(op, reference(stateless, MSELoss(), reference_params, data))
    J = JacobianLinearOperator(model, params, data)
    compare_matmat(J, functorch_jacobian(stateless, reference_params, data))
    assert all(b.equal(saved) for b, saved in zip(model.buffers(), buffers))


def test_lazy_attribute_computes_once_and_stores_on_the_instance():
    calls = []

    class Holder:
        @lazy_attribute
        def value(self):
            calls.append(1)
            return len(calls)

    holder = Holder()
    assert holder.value == 1 and holder.value == 1 and calls == [1]
    assert vars(holder)["value"] == 1
    assert isinstance(Holder.value, lazy_attribute)


# Operators on a model with train-mode BatchNorm; KFAC and EKFAC get the parameters
# of the linear layers only.
PROTECTED = {
    "hessian": lambda m, f, p, d, **kw: HessianLinearOperator(m, f, p, d, **kw),
    "ggn": lambda m, f, p, d, **kw: GGNLinearOperator(m, f, p, d, **kw),
    "ef": lambda m, f, p, d, **kw: EFLinearOperator(m, f, p, d, **kw),
    "mc_fisher": lambda m, f, p, d, **kw: FisherMCLinearOperator(m, f, p, d, **kw),
    "jacobian": lambda m, f, p, d, **kw: JacobianLinearOperator(m, p, d, **kw),
    "jacobian_t": lambda m, f, p, d, **kw: JacobianLinearOperator(
        m, p, d, **kw
    ).adjoint(),
    "kfac": lambda m, f, p, d, **kw: KFACLinearOperator(m, f, _linear(m, p), d, **kw),
    "ekfac": lambda m, f, p, d, **kw: EKFACLinearOperator(m, f, _linear(m, p), d, **kw),
}


OFF = {"check_deterministic": False}  # where construction is not the point


def _linear(model, params):
    """The parameters of a model's linear layers, in model order."""
    linear = {
        id(q) for m in model.modules() if isinstance(m, Linear) for q in m.parameters()
    }
    return [p for p in params if id(p) in linear]


def _problem(layer):
    """A float64 MLP with train-mode BatchNorm and ``layer`` behind it, and data."""
    manual_seed(0)
    model = Sequential(Linear(5, 4), BatchNorm1d(4), layer, Tanh(), Linear(4, 3))
    model = model.to(float64).train()
    X, y = rand(5, 5, dtype=float64), randint(0, 3, (5,))
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    return model, CrossEntropyLoss(), list(model.parameters()), data


def _columns(op, seed: int = 0):
    generator = Generator().manual_seed(seed)
    return randn(op.shape[1], 2, dtype=float64, generator=generator)


@pytest.mark.parametrize("name", PROTECTED)
def test_interrupted_construction_leaves_the_model_unchanged(name):
    """An interrupt in the model during construction restores the statistics.

    The interrupt hits the second forward pass (in the determinism check), while
    the traceback (and a suspended data loop with it) stays alive.
    """
    make = PROTECTED[name]
    model, loss_func, params, data = _problem(Faulty(KeyboardInterrupt()))
    reference = make(*_problem(Identity()), **OFF)  # same values, not interrupted
    before = model_state(model)
    model[2].arm(at=1)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        make(model, loss_func, params, data)
    assert_same_state(before, model_state(model))
    retry = make(model, loss_func, params, data)
    assert_close(retry @ _columns(retry), reference @ _columns(retry))
    del interrupt


@pytest.mark.parametrize("name", PROTECTED)
def test_interrupted_products_leave_the_model_unchanged(name):
    """An interrupt in the model during a product (or factor computation)."""
    make = PROTECTED[name]
    model, loss_func, params, data = _problem(Faulty(KeyboardInterrupt()))
    op = make(model, loss_func, params, data, **OFF)
    M = _columns(op)
    expected = op @ M
    before = model_state(model)
    model[2].arm(at=1)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        _pass_over_data(name, op, M)
    assert_same_state(before, model_state(model))
    assert_close(op @ M, expected)
    assert_close(make(model, loss_func, params, data, **OFF) @ M, expected)
    del interrupt


def _pass_over_data(name: str, op, M):
    """Run a computation of an operator that passes over model and data."""
    if name == "kfac":
        return op.compute_kronecker_factors()
    if name == "ekfac":  # its factors are the EKFAC helper's business
        return op.gradient_and_loss()
    return op @ M


def test_failing_data_leaves_the_model_unchanged():
    """A data loader that raises mid-pass: the same clean state, right retries."""
    model, loss_func, params, batches = _problem(Identity())
    data = FaultyData(batches)
    op = GGNLinearOperator(model, loss_func, params, data, **OFF)
    M = _columns(op)
    expected = op @ M
    before = model_state(model)
    data.arm(at=1)
    with pytest.raises(RuntimeError, match=INJECTED):
        op @ M
    assert_same_state(before, model_state(model))
    assert_close(op @ M, expected)


@pytest.mark.parametrize("name", ["hessian", "ggn", "jacobian", "kfac"])
@pytest.mark.parametrize("how", ["load_state_dict", "assign"])
def test_replaced_parameters_raise(name, how):
    """Products after the model's parameters were replaced name the parameter."""
    make = PROTECTED[name]
    model, loss_func, params, data = _problem(Identity())
    op = make(model, loss_func, params, data, **OFF)
    M = _columns(op)
    expected = op @ M
    with no_grad():  # changing values in place is fine
        model[4].weight.mul_(1.0)
    assert_close(op @ M, expected)
    if how == "assign":
        model[4].weight = Parameter(model[4].weight.detach().clone())
    else:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    # the first replaced parameter is reported: all for `load_state_dict`
    position = next(i for i, p in enumerate(op._params) if p.shape == (3, 4))
    position, layer = (position, 4) if how == "assign" else (0, 0)
    match = rf"params\[{position}\] is no longer the model's parameter '{layer}.weight'"
    with pytest.raises(RuntimeError, match=match):
        _pass_over_data(name, op, M)


def test_functional_models_keep_working():
    """A plain function of explicit parameters has nothing to check."""
    manual_seed(0)
    W = rand(3, 5, dtype=float64, requires_grad=True)
    X, y = rand(4, 5, dtype=float64), rand(4, 3, dtype=float64)
    model = Linear(5, 3, bias=False).to(float64)
    with no_grad():
        model.weight.copy_(W)
    op = GGNLinearOperator(lambda X: X @ W.T, MSELoss(), [W], [(X, y)])
    reference = GGNLinearOperator(model, MSELoss(), [model.weight], [(X, y)])
    assert_close(op @ _columns(op), reference @ _columns(op))


@pytest.mark.parametrize("name", ["hessian", "ggn", "mc_fisher", "jacobian", "kfac"])
def test_threads_take_turns(name):
    """Two threads multiply with one operator at once: both get the right result.

    A layer holds the first thread in the forward pass until the second arrives
    (or a timeout passes), so that without turns the passes overlap for sure.
    Forward-mode AD, the parameters, the running statistics and KFAC's factors
    (computed in one pass) survive.
    """
    make = PROTECTED[name]
    model, loss_func, params, batches = _problem(Rendezvous(timeout=0.3))
    copy = deepcopy(model)
    reference = make(copy, loss_func, list(copy.parameters()), batches, **OFF)
    data = FaultyData(batches)  # counts the passes
    op = make(model, loss_func, params, data, **OFF)
    v = _columns(op)[:, 0]
    expected, results = reference @ v, [None, None]
    model[2].arm()
    before, passes = model_state(model), data.passes

    def multiply(idx: int):
        try:
            results[idx] = op @ v
        except Exception as error:  # noqa: BLE001 (reported below)
            results[idx] = error

    threads = [Thread(target=multiply, args=(idx,)) for idx in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        assert isinstance(result, Tensor), result
        assert_close(result, expected)
    if name == "kfac":
        assert data.passes - passes == 1
    assert_same_state(before, model_state(model))


def test_threads_with_operators_on_different_models_take_turns_in_forward_mode():
    """Forward-mode AD is global to the process: GGNs of two models take turns.

    Both models share the layer that holds the first thread until a second one
    arrives, so that without turns the forward passes overlap.
    """
    rendezvous = Rendezvous(timeout=0.3)
    problems = [_problem(rendezvous), _problem(rendezvous)]
    ops = [GGNLinearOperator(m, f, p, d, **OFF) for m, f, p, d in problems]
    v = _columns(ops[0])[:, 0]
    expected = [op @ v for op in ops]
    results = [None, None]

    def multiply(idx: int):
        try:
            results[idx] = ops[idx] @ v
        except Exception as error:  # noqa: BLE001 (reported below)
            results[idx] = error

    rendezvous.arm()
    threads = [Thread(target=multiply, args=(idx,)) for idx in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result, reference in zip(results, expected):
        assert isinstance(result, Tensor), result
        assert_close(result, reference)
    assert_forward_ad_usable()
