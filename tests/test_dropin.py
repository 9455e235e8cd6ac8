"""Code written for cvxpylayers and qpth runs unchanged: the habits such code has.

Each test writes the peer's idiom (in-place edits of outputs, pickling a model,
positional constructor arguments, the peer's solver names and module paths)
and checks it works with the same results it has with the peer.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import cvxpy as cp
import numpy as np
import pytest
import torch
from helpers import SCS_TIGHT, as_tensor

from declarative import QPFunction
from declarative.torch import CvxpyLayer

DT = torch.float64


def _projection(backend):
    x, y = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0])
    args = {"solver_args": SCS_TIGHT} if backend == "conic" else {}
    return CvxpyLayer(prob, [y], [x], backend=backend, **args)


@pytest.mark.parametrize("backend", ["qp", "conic"])
def test_editing_an_output_in_place_keeps_its_gradient(backend):
    """x[:, 0] = 0 after the layer: the loss no longer sees entry 0, the rest is the
    projection's gradient (1 where y > 0)."""
    layer = _projection(backend)
    y = as_tensor([[0.5, -1.0, 2.0], [1.0, 0.3, -0.2]], grad=True)
    (x,) = layer(y)
    x[:, 0] = 0
    x.sum().backward()
    expected = (y.detach() > 0).to(DT)
    expected[:, 0] = 0
    assert torch.allclose(y.grad, expected, atol=1e-6)


@pytest.mark.parametrize("backend", ["qp", "conic"])
def test_outputs_are_row_major(backend):
    """A matrix variable comes back C-contiguous, so .view() and rand_like match the peer."""
    A, X = cp.Parameter((3, 2)), cp.Variable((3, 2))
    kwargs = {"solver_args": SCS_TIGHT} if backend == "conic" else {}
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - A)), [X >= 0]), [A], [X],
                       backend=backend, **kwargs)
    (out,) = layer(torch.randn(4, 3, 2, dtype=DT))
    assert out.is_contiguous() and out.stride() == (6, 2, 1)
    assert out.view(4, 6).shape == (4, 6)


@pytest.mark.parametrize("backend", ["qp", "conic"])
def test_layers_copy_pickle_and_average(backend):
    layer = _projection(backend)
    y = as_tensor([0.5, -1.0, 2.0])
    (expected,) = layer(y)
    model = torch.nn.Sequential(layer)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)),
                  pickle.loads(pickle.dumps(layer.export()))):
        assert torch.allclose(clone(y)[0], expected, atol=1e-9)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.allclose(torch.load(buf, weights_only=False)[0](y)[0], expected, atol=1e-9)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    assert torch.allclose(averaged(y)[0], expected, atol=1e-9)


def test_constructor_takes_the_peers_positional_arguments():
    """CvxpyLayer(problem, parameters, variables, solver, gp, verbose, canon_backend,
    solver_args), as cvxpylayers 1.2 orders them."""
    x, y = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0])
    layer = CvxpyLayer(prob, [y], [x], "SCS", False, False, "SCIPY", {"eps": 1e-9})
    assert layer.backend == "conic" and layer.canon_backend == "SCIPY"
    (out,) = layer(as_tensor([1.0, -1.0, 2.0]))
    assert torch.allclose(out, as_tensor([1.0, 0.0, 2.0]), atol=1e-6)


@pytest.mark.parametrize("name", ["MOREAU", "CUCLARABEL", "MPAX"])
def test_the_peers_batched_solvers_run_the_torch_route(name):
    x, y = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0])
    layer = CvxpyLayer(prob, [y], [x], solver=name)
    assert layer.backend == "qp" and layer.solver is None
    x, t = cp.Variable(2), cp.Parameter(2)
    socp = cp.Problem(cp.Minimize(cp.norm(x - t, 2)), [cp.sum(x) == 1])
    assert CvxpyLayer(socp, [t], [x], solver=name).backend == "cone"
    X, C = cp.Variable((2, 2), PSD=True), cp.Parameter((2, 2))
    sdp = cp.Problem(cp.Minimize(cp.trace(C @ X)), [cp.trace(X) == 1])
    with pytest.raises(ValueError, match=f"solver='{name}' is a batched solver"):
        CvxpyLayer(sdp, [C], [X], solver=name)


def test_a_solver_object_is_refused_with_the_names_we_take():
    x, y = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)))
    with pytest.raises(TypeError, match="solver must be a solver name"):
        CvxpyLayer(prob, [y], [x], solver=object())


def test_warm_starts_are_per_thread_and_only_where_asked():
    # A projection onto {x ≥ 0, Σx ≤ 1}: solved by the interior point (a box alone is
    # solved in closed form and leaves nothing to start from).
    x, y = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0, cp.sum(x) <= 1])
    layer = CvxpyLayer(prob, [y], [x], backend="qp")
    y = as_tensor([[0.5, -1.0, 2.0]])
    layer(y)
    assert getattr(layer._warm, "state", None) is None  # no warm start asked: no state
    (x1,), info = layer(y, warm_start=True, return_info=True)  # starts cold, keeps it
    assert layer._warm.state is not None
    seen = {}

    def other():
        seen["state"] = getattr(layer._warm, "state", None)
        seen["out"] = layer(y + 0.1, warm_start=True)[0]

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["state"] is None  # another thread does not start from this one's
    assert torch.allclose(seen["out"], layer(y + 0.1)[0], atol=1e-9)


def test_qpfunction_under_vmap_without_equalities():
    Q, G, h = torch.eye(3, dtype=DT), -torch.eye(3, dtype=DT), torch.zeros(3, dtype=DT)
    e = torch.empty(0, dtype=DT)
    f = QPFunction(verbose=-1)
    p = torch.randn(5, 3, dtype=DT)
    mapped = torch.func.vmap(lambda pp: f(Q, pp, G, h, e, e))(p)
    assert mapped.shape == (5, 1, 3)
    assert torch.allclose(mapped[:, 0], (-p).clamp_min(0), atol=1e-9)


def test_qpth_module_path():
    from declarative.qp import QPFunction as Q2
    from declarative.qp import QPSolvers

    assert Q2 is QPFunction and QPSolvers.PDIPM_BATCHED.value == 1


def test_soc_dual_gradient_at_default_settings_in_float32():
    """The dual of ‖x‖ ≤ t at SCS's default tolerance, float32 inputs: gradcheck's
    tolerances of the peer's own test (atol 1e-4, rtol 1e-3) against central
    differences in float64."""
    x, c, t = cp.Variable(3), cp.Parameter(3), cp.Parameter()
    con = cp.norm(x, 2) <= t
    prob = cp.Problem(cp.Minimize(c @ x + 0.1 * cp.sum_squares(x)), [con])
    layer = CvxpyLayer(prob, [c, t], [con.dual_variables[0]])
    c0, t0 = np.array([0.5, 0.3, -0.2]), 2.0
    ct, tt = as_tensor(c0, grad=True, dtype=torch.float32), as_tensor(t0, grad=True,
                                                                      dtype=torch.float32)
    (lam,) = layer(ct, tt)
    g_c, g_t = torch.autograd.grad(lam.sum(), (ct, tt))

    def dual(cv, tv):
        return float(layer(as_tensor(cv), as_tensor(tv))[0].sum())

    h = 1e-4
    fd_t = (dual(c0, t0 + h) - dual(c0, t0 - h)) / (2 * h)
    assert abs(float(g_t) - fd_t) <= 1e-4 + 1e-3 * abs(fd_t)
    for i in range(3):
        e = np.eye(3)[i] * h
        fd = (dual(c0 + e, t0) - dual(c0 - e, t0)) / (2 * h)
        assert abs(float(g_c[i]) - fd) <= 1e-4 + 1e-3 * abs(fd)
