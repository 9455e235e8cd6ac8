"""backend="auto" with several exact routes: each call takes the one predicted fastest.

The choice is made from stored constants (`declarative.routes.cost`), so these
tests install their own constants to make a known route the cheapest at a known
batch size, and check that the calls then run it, that the answers agree with
the route forced by name and with a reference solver, and that inputs inside
torch.func transforms only reach routes that support them.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from helpers import reference_solve

from declarative import CvxpyLayer
from declarative.routes import cost

DT = torch.float64


def _lasso():
    A, b, x = cp.Parameter((8, 4)), cp.Parameter(8), cp.Variable(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.3 * cp.norm1(x)))
    return prob, [A, b], [x]


def _socp():
    F, g, x = cp.Parameter((4, 3)), cp.Parameter(4), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.norm(F @ x - g, 2) + 0.1 * cp.norm1(x)),
                      [cp.norm(x, 2) <= 1])
    return prob, [F, g], [x]


def _values(shapes, B, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.standard_normal((B,) + s), dtype=DT) for s in shapes]


LASSO_SHAPES = [(8, 4), (8,)]
SOCP_SHAPES = [(4, 3), (4,)]


def _constants(**per_route):
    """Constants under which each named route costs (call, per sample) seconds."""
    zero = {"shared": 0.0, "work": 0.0, "size": 0.0}
    table = {key: {"call": 1.0, "sample": 1.0, **zero} for key in cost.constants()}
    for key, (call, sample) in per_route.items():
        table[key] = {"call": call, "sample": sample, **zero}
    return table


@pytest.fixture
def costs(monkeypatch):
    """Install constants: ``costs(qp=(call, sample), ...)``."""
    def install(**per_route):
        table = _constants(**per_route)
        monkeypatch.setattr(cost, "constants", lambda: table)
    return install


def test_the_candidates_are_the_exact_routes_of_one_form():
    prob, params, variables = _lasso()
    layer = CvxpyLayer(prob, params, variables)
    assert [c.kind for c in layer._choice.candidates] == ["qp", "sparse_qp"]
    prob, params, variables = _socp()
    layer = CvxpyLayer(prob, params, variables)
    assert [c.kind for c in layer._choice.candidates] == ["cone", "conic"]
    # Entropic optimal transport with the temperature a Parameter (cvxpylayers'
    # example): not the entropy route's structure; both cone-program routes compete.
    C, a, b = cp.Parameter((3, 3)), cp.Parameter(3), cp.Parameter(3)
    eps, P = cp.Parameter(1, nonneg=True), cp.Variable((3, 3))
    ot = cp.Problem(cp.Minimize(cp.trace(P.T @ C) - eps * (cp.sum(cp.entr(P)) + cp.sum(P))),
                    [P @ np.ones(3) == a, P.T @ np.ones(3) == b, P >= 0])
    layer = CvxpyLayer(ot, [C, a, b, eps], [P])
    assert [c.kind for c in layer._choice.candidates] == ["cone", "conic"]
    # A softmax has one exact route: nothing to choose.
    th, z = cp.Parameter(4), cp.Variable(4)
    prob = cp.Problem(cp.Maximize(th @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1])
    layer = CvxpyLayer(prob, [th], [z])
    assert layer._choice is None and layer.backend == "entropy"


def test_each_call_takes_the_route_predicted_fastest_for_its_batch(costs):
    # sparse_qp: cheap call, dear samples; qp: the reverse. They cross at B = 9.
    # (Seconds-scale constants: no call runs slower than predicted, which would
    # correct the prediction; that is the next test's.)
    costs(qp=(10.0, 0.1), sparse_qp=(1.0, 1.1))
    prob, params, variables = _lasso()
    layer = CvxpyLayer(prob, params, variables)
    assert layer.backend == "qp"  # the nominal batch (16) is past the crossing
    forced = {k: CvxpyLayer(prob, params, variables, backend=k) for k in ("qp", "sparse_qp")}
    for B, expected in ((1, "sparse_qp"), (4, "sparse_qp"), (32, "qp")):
        values = _values(LASSO_SHAPES, B, seed=B)
        (x,), info = layer(*values, return_info=True)
        assert info.backend == expected and info.ok
        (x_forced,), _ = forced[expected](*values, return_info=True)
        assert torch.equal(x, x_forced)
        for i in (0, B - 1):
            ref = reference_solve(prob, params, [v[i].numpy() for v in values], variables)[0]
            np.testing.assert_allclose(x[i].numpy(), ref, atol=1e-6)
    # The other cost ordering flips the choices.
    costs(qp=(1.0, 1.1), sparse_qp=(10.0, 0.1))
    layer = CvxpyLayer(prob, params, variables)
    assert layer.backend == "sparse_qp"
    (_,), info = layer(*_values(LASSO_SHAPES, 1), return_info=True)
    assert info.backend == "qp"


def test_a_route_measured_slower_than_predicted_loses_the_next_call(costs):
    """Predictions far below what the calls take (as for a sparse factorization
    that meets ties): once a call measures it, the next call goes to the other
    route. The first call of a route (its caches built) does not count."""
    costs(qp=(1e-4, 1e-5), sparse_qp=(1e-6, 1e-6))
    prob, params, variables = _lasso()
    layer = CvxpyLayer(prob, params, variables)
    values = _values(LASSO_SHAPES, 4)
    taken = [layer(*values, return_info=True)[1].backend for _ in range(3)]
    assert taken[:2] == ["sparse_qp", "sparse_qp"] and taken[2] == "qp"
    assert str(layer.routes).count("measured on this layer") == 1  # the correction shown


def test_a_warm_start_keeps_the_call_on_its_route(costs):
    """A SolveInfo of this layer's earlier call is that route's state: the call
    stays there (and starts warm) even where another route is now predicted
    cheaper; the answers agree with a cold solve."""
    costs(qp=(10.0, 0.1), sparse_qp=(1.0, 1.1))  # batch 4: the sparse engine
    prob, params, variables = _lasso()
    layer = CvxpyLayer(prob, params, variables)
    values = _values(LASSO_SHAPES, 4, seed=11)
    (x_sparse,), first = layer(*values, return_info=True)
    assert first.backend == "sparse_qp"
    costs(qp=(1.0, 0.1), sparse_qp=(10.0, 1.1))  # now the dense engine
    layer._choice._picked.clear()  # forget the choice made under the old constants
    (x_dense,), cold = layer(*values, return_info=True)
    assert cold.backend == "qp"
    moved = [v + 1e-3 for v in values]
    (x_warm,), warm = layer(*moved, return_info=True, warm_start=first)
    assert warm.backend == "sparse_qp" and warm.ok
    (x_ref,), _ = CvxpyLayer(prob, params, variables, backend="qp")(*moved, return_info=True)
    np.testing.assert_allclose(x_warm.numpy(), x_ref.numpy(), atol=1e-7)
    np.testing.assert_allclose(x_sparse.numpy(), x_dense.numpy(), atol=1e-7)
    (_,), again = layer(*moved, return_info=True, warm_start=cold)
    assert again.backend == "qp"


def test_gradients_follow_the_chosen_route(costs):
    """Each route's gradient against central differences of the layer itself."""
    prob, params, variables = _lasso()
    for cheap in ("qp", "sparse_qp"):
        other = "sparse_qp" if cheap == "qp" else "qp"
        costs(**{cheap: (0.001, 0.001), other: (1.0, 1.0)})
        layer = CvxpyLayer(prob, params, variables)
        values = _values(LASSO_SHAPES, 2, seed=3)
        ins = [v.clone().requires_grad_(True) for v in values]
        (x,), info = layer(*ins, return_info=True)
        assert info.backend == cheap
        w = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((w * x).sum(), ins)
        direction = [torch.randn(v.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
                     for v in values]
        h = 1e-6

        def f(t, layer=layer, values=values, direction=direction, w=w):
            (xt,) = layer(*[v + t * d for v, d in zip(values, direction)])
            return float((w * xt).sum())

        fd = (f(h) - f(-h)) / (2 * h)
        ours = sum(float((g * d).sum()) for g, d in zip(grads, direction))
        assert abs(ours - fd) <= 1e-4 * max(1.0, abs(fd))


def test_inside_torch_func_only_routes_that_support_it_are_taken(costs):
    costs(cone=(1.0, 1.0), conic=(0.0001, 0.0001))  # diffcp "cheapest"
    prob, params, variables = _socp()
    layer = CvxpyLayer(prob, params, variables)
    assert layer.backend == "conic"
    values = _values(SOCP_SHAPES, 3, seed=5)
    (x,), info = layer(*values, return_info=True)
    assert info.backend == "conic"

    def first(F, g):
        return layer(F.unsqueeze(0), g.unsqueeze(0))[0][0]

    xs = torch.func.vmap(first)(*values)  # diffcp cannot run here; the cone route can
    cone = CvxpyLayer(prob, params, variables, backend="cone")
    (x_cone,), info = cone(*values, return_info=True)
    np.testing.assert_allclose(xs.numpy(), x_cone.numpy(), atol=1e-8)
    np.testing.assert_allclose(x.numpy(), x_cone.numpy(), atol=1e-3)  # SCS's default eps
    jac = torch.func.jacrev(first, argnums=1)(values[0][0], values[1][0])
    g0 = values[1][0].clone().requires_grad_(True)
    rows = [torch.autograd.grad(cone(values[0][:1], g0.unsqueeze(0))[0][0][k], g0)[0]
            for k in range(3)]
    np.testing.assert_allclose(jac.numpy(), torch.stack(rows).numpy(), atol=1e-6)


def test_under_torch_compile_the_batched_route_is_taken(costs):
    costs(qp=(1.0, 1.0), sparse_qp=(0.0001, 0.0001))  # the sparse engine "cheapest"
    prob, params, variables = _lasso()
    layer = CvxpyLayer(prob, params, variables)
    values = _values(LASSO_SHAPES, 3, seed=7)
    assert layer(*values, return_info=True)[1].backend == "sparse_qp"
    compiled = torch.compile(lambda A, b: layer(A, b)[0])
    (x_qp,) = CvxpyLayer(prob, params, variables, backend="qp")(*values)
    assert torch.allclose(compiled(*values), x_qp, atol=1e-12, rtol=0)


def test_the_routes_report_names_the_candidates_and_the_routes_that_refuse():
    prob, params, variables = _lasso()
    report = str(CvxpyLayer(prob, params, variables).routes)
    assert "backend='auto'" in report and "sparse_qp" in report and "qp" in report
    assert "entropy: not this problem's" in report
    forced = str(CvxpyLayer(prob, params, variables, backend="sparse_qp").routes)
    assert "backend='sparse_qp' was requested" in forced


def test_stored_constants_cover_every_route_cost_key():
    """A route whose key has no stored constants would fail at construction."""
    keys = set(cost.constants())
    assert {"qp", "qp:box", "sparse_qp", "cone", "cone:exp", "conic", "conic:exp"} <= keys
    for c in cost.constants().values():
        assert all(c[k] >= 0 for k in ("call", "shared", "sample", "work", "size"))


def test_a_substitution_rebuilt_per_sample_counts_as_work():
    """cvxpylayers' ReLU-layer formulation ties a variable to the weight Parameter
    and multiplies it by the input Parameter: the presolve's pivot block then
    depends on θ and is rebuilt per sample, which the cost must count (a ReLU
    written as a plain projection rebuilds nothing)."""
    n = 5
    W, b, x = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter(n)
    z, Wt = cp.Variable(n), cp.Variable((n, n))
    tied = cp.Problem(cp.Minimize(cp.sum_squares(z - Wt @ x - b)), [z >= 0, Wt == W])
    key, work, _ = CvxpyLayer(tied, [W, b, x], [z], backend="qp").route("qp").cost()
    assert key == "qp:box" and work > 0
    y = cp.Parameter(n)
    plain = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [z >= 0])
    key, work, _ = CvxpyLayer(plain, [y], [z], backend="qp").route("qp").cost()
    assert key == "qp:box" and work == 0
    # Both are ReLUs: the same answer as torch.relu.
    values = _values([(n, n), (n,), (n,)], 3, seed=4)
    (z_t,) = CvxpyLayer(tied, [W, b, x], [z], backend="qp")(*values)
    expected = torch.relu(torch.einsum("bij,bj->bi", values[0], values[2]) + values[1])
    assert torch.allclose(z_t, expected, atol=1e-10)
