"""One registry of small problems, one or more per route, for the property tests.

Each `Case` builds a CVXPY problem, the layer's arguments and a batch of valid
parameter values; `tests/test_routes.py` crosses every case with every
property (export round trip, warm start, float32, batch versus one at a time,
failure masking, torch.func, gradients against central differences), so a
property added there runs on every route, and a route added here gets every
property.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
from helpers import SCS_EXP, SCS_TIGHT


@dataclass(frozen=True)
class Case:
    name: str
    # The route the case runs: the one backend="auto" must take where it has no
    # choice, else forced by kwargs (auto's choice by cost: tests/test_route_choice.py).
    route: str
    build: object  # () -> (problem, parameters, variables)
    values: object  # (rng, B) -> list of arrays, each (B, *shape)
    kwargs: dict = field(default_factory=dict)  # CvxpyLayer keyword arguments
    tol: float = 1e-7  # agreement expected between two solves of the same values
    warm: bool = False  # the route takes a warm start


def _simplex():
    y, z = cp.Parameter(5, name="y"), cp.Variable(5)
    return cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == 1, z >= 0]), [y], [z]


def _softmax():
    th, z = cp.Parameter(4, name="theta"), cp.Variable(4)
    return cp.Problem(cp.Maximize(th @ z + 0.5 * cp.sum(cp.entr(z))), [cp.sum(z) == 1]), [th], [z]


def _entropy_general():
    th, beta, z = cp.Parameter(4, name="theta"), cp.Parameter(name="beta"), cp.Variable(4)
    a = np.array([1.0, -1.0, 0.0, 2.0])
    prob = cp.Problem(cp.Maximize(th @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1, a @ z == beta])
    return prob, [th, beta], [z]


def _transport():
    C, P = cp.Parameter((3, 4), name="C"), cp.Variable((3, 4))
    marginals = [cp.sum(P, axis=1) == np.full(3, 1 / 3), cp.sum(P, axis=0) == np.full(4, 1 / 4)]
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(C, P)) - 0.5 * cp.sum(cp.entr(P))),
                      marginals)
    return prob, [C], [P]


def _qp_duals():
    A, b, x = cp.Parameter((6, 3), name="A"), cp.Parameter(6, name="b"), cp.Variable(3)
    box = x <= 0.4
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)),
                      [box, x >= -1])
    return prob, [A, b], [x, box.dual_variables[0]]


def _lasso():
    # CVXPY's QP form: t = A x − b for sum_squares, x = u − v style splits for norm1;
    # the route substitutes the defined variables away (`canon.presolve`).
    A, b, x = cp.Parameter((8, 4), name="A"), cp.Parameter(8, name="b"), cp.Variable(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.3 * cp.norm1(x)))
    return prob, [A, b], [x]


def _relu():
    # A projection onto x ≥ 0: after the substitution a box QP, solved in closed form.
    y, x = cp.Parameter(5, name="y"), cp.Variable(5)
    return cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0]), [y], [x]


def _mpc():
    # A dynamics chain: every state is defined by an equality (a pivot row), and the
    # dynamics' duals are read back from stationarity on the eliminated states.
    F = np.array([[1.0, 0.1], [0.0, 1.0]])
    G = np.array([[0.0], [0.1]])
    T, x0 = 5, cp.Parameter(2, name="x0")
    X, U = cp.Variable((2, T + 1)), cp.Variable((1, T))
    dynamics = [X[:, t + 1] == F @ X[:, t] + G @ U[:, t] for t in range(T)]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X) + 0.1 * cp.sum_squares(U)),
                      [X[:, 0] == x0, cp.abs(U) <= 0.5, *dynamics])
    return prob, [x0], [U, dynamics[0].dual_variables[0]]


def _socp():
    F, g, x = cp.Parameter((4, 3), name="F"), cp.Parameter(4, name="g"), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.norm(F @ x - g, 2) + 0.1 * cp.sum_squares(x)),
                      [cp.norm(x, 2) <= 1])
    return prob, [F, g], [x]


def _logistic():
    X, w = cp.Parameter((6, 2), name="X"), cp.Variable(2)
    y = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    prob = cp.Problem(cp.Minimize(cp.sum(cp.logistic(-cp.multiply(y, X @ w))) / 6
                                  + 0.1 * cp.sum_squares(w)))
    return prob, [X], [w]


def _gp():
    a, x, y = cp.Parameter(pos=True, name="a"), cp.Variable(pos=True), cp.Variable(pos=True)
    prob = cp.Problem(cp.Minimize(x * y + a / x), [y >= 0.5, x <= 4 * a])
    return prob, [a], [x, y]


def _rand(shape):
    return lambda rng, B: [rng.standard_normal((B,) + shape)]


def _qp_cases(route):
    """The QP families on the dense batched engine ("qp") or the sparse one."""
    suffix = "" if route == "qp" else "-sparse"
    forced = {"backend": route}
    return [
        Case("qp-with-duals" + suffix, route, _qp_duals,
             lambda rng, B: [rng.standard_normal((B, 6, 3)), 2.0 * rng.standard_normal((B, 6))],
             kwargs=forced, warm=True),
        Case("lasso" + suffix, route, _lasso,
             lambda rng, B: [rng.standard_normal((B, 8, 4)), rng.standard_normal((B, 8))],
             kwargs=forced, warm=True),
        # Values keep entries away from 0, where the projection has a kink.
        Case("relu-projection" + suffix, route, _relu,
             lambda rng, B: [np.sign(v) * (0.2 + np.abs(v)) for v in
                             [rng.standard_normal((B, 5))]], kwargs=forced),
        # x0 large enough that the input bound is active on the first steps.
        Case("mpc" + suffix, route, _mpc, lambda rng, B: [3.0 * rng.standard_normal((B, 2))],
             kwargs=forced, warm=True),
    ]


CASES = [
    # Values of size 0.3: the projection keeps several entries (a one-hot point has
    # a zero derivative, which would compare nothing).
    Case("sparsemax", "simplex", _simplex, lambda rng, B: [0.3 * rng.standard_normal((B, 5))]),
    Case("softmax", "entropy", _softmax, _rand((4,))),
    Case("entropy-general", "entropy", _entropy_general,
         lambda rng, B: [rng.standard_normal((B, 4)), 0.2 + 0.3 * rng.random((B,))], warm=True),
    Case("transport", "entropy", _transport, _rand((3, 4)), warm=True),
    *[case for route in ("qp", "sparse_qp") for case in _qp_cases(route)],
    # Zero, nonnegative, second-order and exponential cones: the batched torch
    # interior point by default; diffcp's solvers when asked (backend="conic").
    Case("socp", "cone", _socp,
         lambda rng, B: [rng.standard_normal((B, 4, 3)), rng.standard_normal((B, 4))],
         kwargs={"backend": "cone"}, warm=True),
    Case("socp-diffcp", "conic", _socp,
         lambda rng, B: [rng.standard_normal((B, 4, 3)), rng.standard_normal((B, 4))],
         kwargs={"backend": "conic", "solver_args": SCS_TIGHT}, tol=1e-6),
    Case("logistic", "cone", _logistic, _rand((6, 2)), kwargs={"backend": "cone"}, warm=True),
    # Exponential cones on diffcp: SCS at 1e-10 (central differences through Clarabel's
    # points, accurate to ~1e-8, miss the derivative by 20 % at a step of 1e-5).
    Case("logistic-diffcp", "conic", _logistic, _rand((6, 2)),
         kwargs={"backend": "conic", "solver_args": SCS_EXP}, tol=1e-6),
    Case("geometric", "cone", _gp, lambda rng, B: [0.5 + rng.random((B,))],
         kwargs={"gp": True, "backend": "cone"}, warm=True),
    Case("geometric-diffcp", "conic", _gp, lambda rng, B: [0.5 + rng.random((B,))],
         kwargs={"gp": True, "backend": "conic", "solver_args": SCS_EXP}, tol=1e-6),
]
