"""The QP route's presolve (`canon.presolve`) on problems written as users write them.

CVXPY's QP form defines auxiliary variables by equalities (sum_squares, norm1,
huber, hinge, a dynamics recursion); the route substitutes them away at each call
and solves the smaller QP, in closed form when a box QP is left. Checked here
against Clarabel at tight tolerance through CVXPY (values, duals of eliminated
rows) and central differences through that reference (gradients), plus the
closed form against the interior point on the same blocks.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from declarative.backends.qp import solve_qp
from declarative.canon import presolve
from helpers import as_tensor, reference_solve

from declarative import CvxpyLayer, Status
from declarative.routes.presolved import box_solve

DT = torch.float64


def _box_ls():
    A, b, x = cp.Parameter((10, 4), name="A"), cp.Parameter(10, name="b"), cp.Variable(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= -0.3, x <= 0.3])
    return prob, [A, b], [x]


def _lasso():
    A, b, x = cp.Parameter((12, 5), name="A"), cp.Parameter(12, name="b"), cp.Variable(5)
    return cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.5 * cp.norm1(x))), [A, b], [x]


def _elastic_net():
    A, b, x = cp.Parameter((12, 5), name="A"), cp.Parameter(12, name="b"), cp.Variable(5)
    obj = cp.sum_squares(A @ x - b) / 12 + 0.1 * cp.norm1(x) + 0.1 * cp.sum_squares(x)
    return cp.Problem(cp.Minimize(obj)), [A, b], [x]


def _huber():
    X = np.random.default_rng(7).standard_normal((15, 3))
    b, w = cp.Parameter(15, name="b"), cp.Variable(3)
    return cp.Problem(cp.Minimize(cp.sum(cp.huber(X @ w - b, 0.5)))), [b], [w]


def _svm():
    X = np.random.default_rng(8).standard_normal((14, 3))
    y, w, c = cp.Parameter(14, name="y"), cp.Variable(3), cp.Variable()
    hinge = cp.sum(cp.pos(1 - cp.multiply(y, X @ w + c)))
    # A small weight on the intercept too: with the hinge alone it may not be unique.
    obj = hinge / 14 + 0.5 * cp.sum_squares(w) + 0.01 * cp.square(c)
    return cp.Problem(cp.Minimize(obj)), [y], [w, c]


def _markowitz():
    F = np.random.default_rng(9).standard_normal((3, 6)) / 2
    mu, w = cp.Parameter(6, name="mu"), cp.Variable(6)
    budget = cp.sum(w) == 1
    prob = cp.Problem(cp.Minimize(cp.sum_squares(F @ w) + 0.05 * cp.sum_squares(w) - mu @ w),
                      [budget, w >= 0])
    return prob, [mu], [w, budget.dual_variables[0]]


def _mpc():
    F = np.array([[1.0, 0.1], [0.0, 1.0]])
    G = np.array([[0.0], [0.1]])
    T, x0 = 8, cp.Parameter(2, name="x0")
    X, U = cp.Variable((2, T + 1)), cp.Variable((1, T))
    start = X[:, 0] == x0
    dynamics = [X[:, t + 1] == F @ X[:, t] + G @ U[:, t] for t in range(T)]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X) + 0.1 * cp.sum_squares(U)),
                      [start, cp.abs(U) <= 0.5, *dynamics])
    return prob, [x0], [U, X, start.dual_variables[0], dynamics[2].dual_variables[0]]


def _relu():
    y, x = cp.Parameter(6, name="y"), cp.Variable(6)
    return cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0]), [y], [x]


def _normal(*shape):
    return lambda rng, B: rng.standard_normal((B, *shape))


def _labels(rng, B):
    return np.sign(rng.standard_normal((B, 14)) + 0.2)


# name: (build, value makers per parameter)
FAMILIES = {
    "box-least-squares": (_box_ls, [_normal(10, 4), _normal(10)]),
    "lasso": (_lasso, [_normal(12, 5), _normal(12)]),
    "elastic-net": (_elastic_net, [_normal(12, 5), _normal(12)]),
    "huber": (_huber, [_normal(15)]),
    "svm-hinge": (_svm, [_labels]),
    "markowitz": (_markowitz, [_normal(6)]),
    "mpc": (_mpc, [lambda rng, B: 3 * rng.standard_normal((B, 2))]),
    "relu-projection": (_relu, [_normal(6)]),
}


def _layer_and_values(name, B, seed=0):
    build, makers = FAMILIES[name]
    prob, params, outs = build()
    layer = CvxpyLayer(prob, params, outs)
    rng = np.random.default_rng(seed)
    values = [m(rng, B) for m in makers]
    return prob, params, outs, layer, values


def _reference(prob, params, outs, values):
    """Clarabel at tight tolerance, sample by sample: a list per output of (B, ...) arrays."""
    B = values[0].shape[0]
    per = [reference_solve(prob, params, [v[i] for v in values], outs) for i in range(B)]
    return [np.stack([p[k] for p in per]) for k in range(len(outs))]


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("B", [1, 5])
def test_presolved_solutions_and_duals_match_the_reference(name, B):
    prob, params, outs, layer, values = _layer_and_values(name, B, seed=B)
    assert layer.backend == "qp"
    got, info = layer(*[as_tensor(v) for v in values], return_info=True)
    assert all(s == Status.OPTIMAL for s in info.status)
    ref = _reference(prob, params, outs, values)
    for g, r in zip(got, ref):
        scale = 1 + np.abs(r).max()
        assert np.abs(g.numpy().reshape(r.shape) - r).max() <= 1e-7 * scale


@pytest.mark.parametrize("name", list(FAMILIES))
def test_presolved_gradients_match_central_differences_of_the_reference(name):
    prob, params, outs, layer, values = _layer_and_values(name, 2, seed=11)
    args = [as_tensor(v, grad=True) for v in values]
    got = layer(*args)
    gen = torch.Generator().manual_seed(3)
    w = [torch.randn(o.shape, dtype=DT, generator=gen) for o in got]
    grads = torch.autograd.grad(sum((a * o).sum() for a, o in zip(w, got)), args)
    d = [torch.randn(a.shape, dtype=DT, generator=gen).numpy() for a in args]
    if name == "svm-hinge":  # labels are ±1 data: move only one of them a little
        d = [0.0 * d[0] + np.eye(1, d[0].size, 4).reshape(d[0].shape)]
    ours = sum(float((g.numpy() * v).sum()) for g, v in zip(grads, d))

    def loss(step):
        ref = _reference(prob, params, outs, [v + step * dv for v, dv in zip(values, d)])
        return sum(float((wi.numpy() * r.reshape(wi.shape)).sum()) for wi, r in zip(w, ref))

    h = 1e-5
    fd = (loss(h) - loss(-h)) / (2 * h)
    assert abs(fd) > 1e-3  # the direction moves the loss: the check compares something
    assert abs(ours - fd) <= 1e-4 * (1 + abs(fd))


@pytest.mark.parametrize("name", ["lasso", "mpc", "relu-projection"])
def test_float32_presolved_matches_float64(name):
    _, _, _, layer, values = _layer_and_values(name, 4, seed=2)
    x64 = layer(*[as_tensor(v) for v in values])
    x32 = layer(*[as_tensor(v, dtype=torch.float32) for v in values])
    assert all(a.dtype == torch.float32 for a in x32)
    for a, b in zip(x32, x64):
        assert torch.allclose(a.double(), b, atol=1e-4, rtol=1e-4)


def _compiled(name):
    build = FAMILIES[name][0]
    prob, params, outs = build()
    return CvxpyLayer(prob, params, outs).compiled.forms["qp"]


def test_elimination_removes_what_cvxpy_defines():
    """LASSO: the sum_squares residual is defined by equalities and goes; MPC: every
    state is defined by the start or the dynamics and goes, the inputs stay."""
    lasso = _compiled("lasso").program
    elim = presolve.find(lasso)
    assert elim.pivots.size >= 12 and elim.rest_rows.size == 0 and not elim.box
    mpc = _compiled("mpc").program
    elim = presolve.find(mpc)
    assert elim.pivots.size == 2 * 9 and elim.rest_rows.size == 0
    relu = presolve.find(_compiled("relu-projection").program)
    assert relu.box and relu.keep.size == 6


def test_nothing_to_eliminate_leaves_the_problem_as_it_is():
    x, p = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum(cp.square(x)) + p @ x), [cp.sum(x) <= 1])
    elim = presolve.find(CvxpyLayer(prob, [p], [x]).compiled.forms["qp"].program)
    assert elim.empty and elim.keep.size == 3


def _random_box(seed, B=6, n=5):
    """Diagonal Q, rows of G on single variables: upper and lower bounds, a duplicate
    row, a scaled row, and a row with no variable (0 ≤ h, satisfied)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(B, n, generator=g, dtype=DT) + 0.1
    Q = torch.diag_embed(d)
    q = torch.randn(B, n, generator=g, dtype=DT)
    rows = [(0, 1.0, 0.5), (0, -1.0, 0.5), (1, 2.0, 0.4), (1, 1.0, 0.2), (2, -3.0, 0.3),
            (3, 1.0, 0.1), (3, 1.0, 0.1), (4, 0.0, 1.0)]
    G = torch.zeros(len(rows), n, dtype=DT)
    h = torch.zeros(len(rows), dtype=DT)
    for i, (j, gj, hj) in enumerate(rows):
        G[i, j], h[i] = gj, hj
    return Q, q, G.expand(B, -1, -1).clone(), h.expand(B, -1).clone()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_closed_form_matches_the_interior_point(seed):
    Q, q, G, h = _random_box(seed)
    B = q.shape[0]
    e = torch.zeros(B, 0, 5, dtype=DT), torch.zeros(B, 0, dtype=DT)
    (x_ref, lam_ref, _), res = solve_qp(Q, q, G, h, *e, batch=B)
    (x, lam, _), sol = box_solve(Q, q, G, h, B)
    assert (sol.codes == 0).all() and res.status == [Status.OPTIMAL] * B
    assert torch.allclose(x, x_ref, atol=1e-9)
    # Duplicate active rows share their multiplier; stationarity fixes only the sum,
    # so compare Gᵀλ, and λ ≥ 0 with complementarity.
    assert torch.allclose((G.mT @ lam.unsqueeze(-1)), (G.mT @ lam_ref.unsqueeze(-1)), atol=1e-8)
    assert (lam >= 0).all()
    slack = h - (G @ x.unsqueeze(-1)).squeeze(-1)
    assert (lam * slack).abs().max() <= 1e-12


def test_box_closed_form_gradients_match_gradcheck():
    Q, q, G, h = _random_box(4, B=2)
    d = Q.diagonal(dim1=-2, dim2=-1).clone().requires_grad_(True)
    q = q.clone().requires_grad_(True)
    h = h.clone().requires_grad_(True)

    def f(d, q, h):
        return box_solve(torch.diag_embed(d), q, G, h, 2)[0][0]

    assert torch.autograd.gradcheck(f, (d, q, h))


def test_box_closed_form_reports_an_empty_box_and_a_violated_empty_row():
    Q, q, G, h = _random_box(5, B=3)
    h = h.clone()
    h[0, 0], h[0, 1] = -1.0, -1.0  # x₀ ≤ −1 and x₀ ≥ 1
    h[1, 7] = -0.5  # the row with no variable: 0 ≤ −0.5
    (_, _, _), sol = box_solve(Q, q, G, h, 3)
    assert sol.status == [Status.INFEASIBLE, Status.INFEASIBLE, Status.OPTIMAL]


def test_an_infeasible_box_through_the_layer_is_a_failure_not_a_point():
    x, lo, hi = cp.Variable(3), cp.Parameter(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, x <= hi])
    layer = CvxpyLayer(prob, [lo, hi], [x])
    lo_v = as_tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    hi_v = as_tensor([[1.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    (out,), info = layer(lo_v, hi_v, on_failure="mask", return_info=True)
    assert list(info.status) == [Status.OPTIMAL, Status.INFEASIBLE]
    assert torch.isnan(out[1]).all() and torch.allclose(out[0], torch.zeros(3, dtype=DT))


def test_equalities_that_fix_every_variable_leave_an_empty_box():
    """min ‖x‖² s.t. x = b: the presolve substitutes every variable; what is left has
    no variables and no bounds (cvxpylayers' own gradcheck of this problem)."""
    n = 4
    x, b = cp.Variable(n), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [np.eye(n) @ x == b])
    layer = CvxpyLayer(prob, [b], [x], backend="qp")
    b_t = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    (x_t,), info = layer(b_t, return_info=True)
    assert info.ok and torch.allclose(x_t, b_t, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: layer(v)[0], (b_t,))
