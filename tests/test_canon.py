"""canon: the compiled maps agree with CVXPY's own, and canon imports no torch."""

import subprocess
import sys

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
from declarative.canon import NonconvexError, NotDPPError, ProblemError, compile_problem
from helpers import reference_solve

RNG = np.random.default_rng(0)


def test_canon_imports_without_torch():
    code = ("import sys, declarative.canon, declarative.backends.status; "
            "assert 'torch' not in sys.modules, 'canon pulled in torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _theta(compiled, values):
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values] + [[1.0]])


def _cvxpy_data(problem, parameters, values):
    old = [p.value for p in parameters]
    try:
        for p, v in zip(parameters, values):
            p.value = v
        data, _, _ = problem.get_problem_data(cp.DIFFCP)
        return data["c"], data["A"], data["b"]
    finally:
        for p, v in zip(parameters, old):
            p.value = v


def test_cone_data_matches_cvxpy_apply_parameters():
    """θ in row-major user order gives CVXPY's (c, A, b), including a symmetric parameter."""
    n = 3
    X = cp.Variable((n, n), symmetric=True)
    C = cp.Parameter((n, n), symmetric=True)
    W = cp.Parameter((2, n))
    h = cp.Parameter(2, nonneg=True)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X) + cp.sum_squares(W @ x) + h @ x[:2]),
                      [X >> 0, cp.trace(X) == 1, x >= -1, cp.norm(x, 2) <= 3])
    Cv = RNG.standard_normal((n, n))
    Cv = Cv + Cv.T
    Wv = RNG.standard_normal((2, n))
    hv = RNG.random(2)
    compiled = compile_problem(prob, [W, C, h], [X, x])  # user order differs from CVXPY's
    c, A_vals, b = compiled.form("conic").program.data(_theta(compiled, [Wv, Cv, hv])[None, :])
    A = compiled.form("conic").program.matrix(A_vals[0]).toarray()
    c_ref, A_ref, b_ref = _cvxpy_data(prob, [W, C, h], [Wv, Cv, hv])
    np.testing.assert_allclose(c[0], c_ref, atol=1e-12)
    np.testing.assert_allclose(A, sp.csc_array(A_ref).toarray(), atol=1e-12)
    np.testing.assert_allclose(b[0], b_ref, atol=1e-12)


def test_data_adjoint_is_the_transpose():
    x = cp.Variable(4)
    A = cp.Parameter((3, 4))
    b = cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.norm1(A @ x - b) + cp.sum_squares(x)), [x <= 2])
    cone = compile_problem(prob, [A, b], [x]).form("conic").program
    th = RNG.standard_normal((2, 16))
    dc, dA, db = (RNG.standard_normal(s) for s in ((2, cone.n), (2, cone.nnz), (2, cone.m)))
    c, Av, bv = cone.data(th)
    lhs = (c * dc).sum() + (Av * dA).sum() + (bv * db).sum()
    rhs = (th * cone.data_adjoint(dc, dA, db)).sum()
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))


def _solve_compiled(compiled, values):
    """Solve with Clarabel on the compiled data and recover outputs through canon's maps."""
    import clarabel

    cone = compiled.form("conic").program
    c, Av, b = cone.data(_theta(compiled, values)[None, :])
    A = cone.matrix(Av[0])
    from diffcp.cone_program import solve_internal

    res = solve_internal(A, b[0], c[0], cone.cone_dict, solve_method="Clarabel",
                         tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    del clarabel
    out = []
    for rec in compiled.form("conic").outputs:
        v = res["x"] if rec.is_primal else res["y"]
        out.append(rec.apply(v[None, :])[0].reshape(rec.shape))
    return out


def test_recovery_of_primal_and_dual_variables_matches_cvxpy():
    """Every cone kind's dual, a matrix equality's dual and a symmetric variable."""
    n = 3
    X = cp.Variable((n, n), symmetric=True)
    Y = cp.Variable((3, 2))
    t = cp.Variable()
    z = cp.Variable(2)
    C = cp.Parameter((n, n))
    D = cp.Parameter((3, 2))
    cons = [
        X >> 0,
        cp.trace(X) == 1,
        Y == D,
        cp.SOC(t, z),
        z >= -1,
        cp.constraints.ExpCone(z[0], cp.Constant(1.0), t),
    ]
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X) + cp.sum_squares(Y) + t + z[1]), cons)
    Cv = RNG.standard_normal((n, n))
    Dv = RNG.standard_normal((3, 2))
    outputs = [X, Y, t, z] + [dv for con in cons for dv in con.dual_variables]
    compiled = compile_problem(prob, [C, D], outputs)
    got = _solve_compiled(compiled, [Cv, Dv])
    ref = reference_solve(prob, [C, D], [Cv, Dv], outputs)
    for v, g, r in zip(outputs, got, ref):
        np.testing.assert_allclose(g, np.reshape(r, g.shape), atol=1e-4, err_msg=str(v))


def test_nonconvex_is_not_reported_as_not_dpp():
    x = cp.Variable(2)
    p = cp.Parameter(2)
    prob = cp.Problem(cp.Maximize(cp.sum_squares(x - p)), [x <= 1])
    with pytest.raises(NonconvexError, match="nonconvex") as err:
        compile_problem(prob, [p], [x])
    assert "objective" in str(err.value)


def test_not_dpp_names_the_offending_expression():
    x = cp.Variable(2)
    a = cp.Parameter(nonneg=True)
    b = cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(cp.sum(x)), [x >= 0, (a * b) * x <= 1])
    with pytest.raises(NotDPPError, match="must be DPP") as err:
        compile_problem(prob, [a, b], [x])
    assert "constraint 1" in str(err.value).lower()
    assert "param" in str(err.value)


def test_parameter_mismatch_names_missing_and_extra():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    b = cp.Parameter(2)
    other = cp.Parameter(2, name="stray")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + b @ x))
    with pytest.raises(ProblemError, match="must exactly match problem.parameters") as err:
        compile_problem(prob, [a, other], [x])
    assert b.name() in str(err.value) and "stray" in str(err.value)


def test_variable_not_in_problem_is_named():
    x = cp.Variable(2)
    y = cp.Variable(2, name="ghost")
    a = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)))
    with pytest.raises(ProblemError, match="must be a subset of problem.variables") as err:
        compile_problem(prob, [a], [y])
    assert "ghost" in str(err.value)
