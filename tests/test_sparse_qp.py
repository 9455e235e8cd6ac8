"""The sparse QP engine (`backends.sparse_qp`): qdldl LDLᵀ per sample, threads over the batch.

Problem, per sample: minimize ½ zᵀQz + qᵀz  s.t.  Gz ≤ h,  Az = b, with Q, G, A
given as one sparsity pattern and per-sample value arrays.

Solutions are checked against Clarabel through CVXPY (tight tolerances) and the
dense engine (`backends.qp`); derivatives against central differences of
Clarabel's polished solutions, the dense engine's backward, and per-sample solves.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from declarative.backends.qp import solve_qp
from declarative.backends.sparse_qp import SparsePattern, SparseQPSettings, sparse_qp_solve
from helpers import central_differences, qp_polished_reference, qp_reference, rel_err

from declarative import Status

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("Q_vals", "q", "G_vals", "h", "A_vals", "b")


# ----------------------------------------------------------------------------
# Data: random sparse QPs, CVXPY's QP form, dense views
# ----------------------------------------------------------------------------


def _mask(rng, rows, cols, density):
    """A random pattern with at least one entry in every row."""
    mask = rng.random((rows, cols)) < density
    if cols:
        mask[np.arange(rows), rng.integers(0, cols, rows)] = True
    return mask


def random_sparse_qp(seed, n=12, p=16, m=3, B=3, density=0.2, lp=False, dtype=DT):
    """B feasible QPs sharing one pattern: (pattern, [Q_vals, q, G_vals, h, A_vals, b]).

    Each sample has a Slater point z0 (h = G z0 + s0, s0 ≥ 0.1; b = A z0), so LICQ
    and strict complementarity hold generically; an LP (``lp``) gets a box
    −5 ≤ z ≤ 5 among its rows so that it is bounded.
    """
    rng = np.random.default_rng(seed)
    Lmask = _mask(rng, n, n, density / 2) | np.eye(n, dtype=bool)
    Gmask, Amask = _mask(rng, p, n, density), _mask(rng, m, n, density)
    if lp:
        Gmask = np.vstack([Gmask, np.eye(n, dtype=bool), np.eye(n, dtype=bool)])
    mats = []
    for _ in range(B):
        L = np.where(Lmask, rng.standard_normal((n, n)), 0.0)
        Q = np.zeros((n, n)) if lp else L @ L.T / n + 0.1 * np.eye(n)
        G = np.where(Gmask, rng.standard_normal(Gmask.shape), 0.0)
        if lp:
            G[p:p + n], G[p + n:] = np.eye(n), -np.eye(n)
        A = np.where(Amask, rng.standard_normal((m, n)), 0.0)
        z0 = rng.uniform(-1, 1, n)
        h = G @ z0 + 0.1 + rng.random(G.shape[0])
        if lp:
            h[p:] = 5.0
        mats.append((Q, 3.0 * rng.standard_normal(n), G, h, A, A @ z0))
    Qpat = np.zeros((n, n), dtype=bool) if lp else (Lmask.astype(int) @ Lmask.T.astype(int)) > 0
    pattern, _ = SparsePattern.from_matrices(sp.csc_array(Qpat.astype(float)),
                                             sp.csc_array(Gmask.astype(float)),
                                             sp.csc_array(Amask.astype(float)))
    return pattern, values_of(pattern, mats, dtype)


def values_of(pattern: SparsePattern, mats, dtype=DT):
    """Per-sample dense (Q, q, G, h, A, b) -> the value tensors (B, ·) of ``pattern``."""
    out = []
    for k, blk in enumerate(("Q", "q", "G", "h", "A", "b")):
        if blk in "QGA":
            rows, cols = pattern.rows(blk), pattern.cols(blk)
            out.append(np.stack([M[k][rows, cols] for M in mats]))
        else:
            out.append(np.stack([M[k] for M in mats]))
    return [torch.tensor(v, dtype=dtype) for v in out]


def dense(pattern: SparsePattern, values, i: int):
    """Sample i as dense numpy (Q, q, G, h, A, b); Q as the symmetric matrix it stands for."""
    n, p, m = pattern.n, pattern.p, pattern.m
    arrays = [v[i].detach().double().numpy() if v.dim() == 2 else v.detach().double().numpy()
              for v in values]

    def mat(blk, vals, shape):
        M = np.zeros(shape)
        np.add.at(M, (pattern.rows(blk), pattern.cols(blk)), vals)
        return M

    Q = mat("Q", arrays[0], (n, n))
    Q = Q + Q.T - np.diag(np.diag(Q)) if pattern.Q_part == "upper" else 0.5 * (Q + Q.T)
    return (Q, arrays[1], mat("G", arrays[2], (p, n)), arrays[3], mat("A", arrays[4], (m, n)),
            arrays[5])


def dense_batch(pattern, values):
    B = max(v.shape[0] if v.dim() == 2 else 1 for v in values)
    samples = [dense(pattern, values, i) for i in range(B)]
    return [torch.tensor(np.stack(t)) for t in zip(*samples)], B


def cvxpy_qp(problem: cp.Problem, params, values_list, dtype=DT):
    """CVXPY's QP form of ``problem`` for each parameter setting: (pattern, values, columns).

    The data come from ``problem.get_problem_data(cp.CLARABEL)``'s parametric
    program with explicit zeros kept (one pattern for every setting). CVXPY
    writes constraints as Ax + b ∈ K (zero cone first): Az = −b there,
    −Az ≤ b for the nonnegative rows. ``columns``: each variable's first column.
    """
    data, _, _ = problem.get_problem_data(cp.CLARABEL)
    prog, zero = data["param_prob"], data["dims"].zero
    mats = []
    for values in values_list:
        for par, v in zip(params, values):
            par.value = v
        if prog.P is None:  # an LP
            q, _, A, b = prog.apply_parameters(keep_zeros=True)
            P = sp.csc_array((q.size, q.size))
        else:
            P, q, _, A, b = prog.apply_parameters(keep_zeros=True, quad_obj=True)
        A = sp.csr_array(A)
        mats.append((sp.csc_array(P), q, sp.csc_array(-A[zero:]), b[zero:],
                     sp.csc_array(A[:zero]), -b[:zero]))
    first = mats[0]
    pattern, _ = SparsePattern.from_matrices(first[0], first[2], first[4], Q_part="full")
    for M in mats[1:]:
        for k in (0, 2, 4):
            assert np.array_equal(M[k].indices, first[k].indices)
    stack = [np.stack([M[k].data if k in (0, 2, 4) else M[k] for M in mats]) for k in range(6)]
    return pattern, [torch.tensor(v, dtype=dtype) for v in stack], prog.var_id_to_col


def relu_projection(n, B, seed=0):
    """min ‖x − y‖² s.t. x ≥ 0 in CVXPY (its QP form has an auxiliary x − y)."""
    rng = np.random.default_rng(seed)
    y, x = cp.Parameter(n), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0])
    ys = [rng.standard_normal(n) for _ in range(B)]
    pattern, values, cols = cvxpy_qp(problem, [y], [[v] for v in ys])
    return pattern, values, cols[x.id], ys


def lasso(rows, k, B, seed=0, alpha=0.1):
    """min ‖Fx − g‖² + α‖x‖₁ in CVXPY (auxiliary residual and |x| bound variables)."""
    rng = np.random.default_rng(seed)
    F, g, x = cp.Parameter((rows, k)), cp.Parameter(rows), cp.Variable(k)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(F @ x - g) + alpha * cp.norm1(x)))
    settings = [[rng.standard_normal((rows, k)), rng.standard_normal(rows)] for _ in range(B)]
    pattern, values, cols = cvxpy_qp(problem, [F, g], settings)
    return pattern, values, cols[x.id], (problem, [F, g], settings, x)


def _solve(pattern, values, **settings):
    return sparse_qp_solve(pattern, *values, settings=SparseQPSettings(**settings))


def _assert_matches_reference(pattern, values, z, lam, nu, tol=1e-6):
    for i in range(z.shape[0]):
        ref = qp_reference(*dense(pattern, values, i))
        for got, want, name in zip((z[i], lam[i], nu[i]), ref, ("z", "λ", "ν")):
            assert rel_err(got, want) < tol, (i, name, rel_err(got, want))


# ----------------------------------------------------------------------------
# Solutions
# ----------------------------------------------------------------------------


KINDS = {
    "qp": dict(n=12, p=16, m=3),
    "lp": dict(n=8, p=6, m=2, lp=True),
    "equality_only": dict(n=10, p=0, m=4),
    "inequality_only": dict(n=10, p=14, m=0),
    "unconstrained": dict(n=6, p=0, m=0),
}


@pytest.mark.parametrize("kind", KINDS)
def test_matches_clarabel_and_the_dense_engine(kind):
    pattern, values = random_sparse_qp(1, B=3, **KINDS[kind])
    (z, lam, nu), res = _solve(pattern, values)
    assert res.status == [Status.OPTIMAL] * 3
    assert float(res.residuals.max()) <= 1e-10
    _assert_matches_reference(pattern, values, z, lam, nu)
    dense_values, B = dense_batch(pattern, values)
    (zd, lamd, nud), _ = solve_qp(*dense_values, batch=B)
    assert rel_err(z, zd) < 1e-8 and rel_err(lam, lamd) < 1e-8 and rel_err(nu, nud) < 1e-8
    if kind == "lp":  # a vertex: as many active rows as variables, generically
        active = (lam > 1e-8).sum(-1) + pattern.m
        assert (active == pattern.n).all()


def test_cvxpy_forms_with_auxiliary_variables_match_clarabel():
    pattern, values, col, ys = relu_projection(30, B=2)
    assert pattern.n == 60 and pattern.m == 30  # x and the auxiliary x − y
    (z, lam, nu), res = _solve(pattern, values)
    assert res.status == [Status.OPTIMAL] * 2
    for i, y in enumerate(ys):
        assert np.abs(z[i, col:col + 30].numpy() - np.maximum(y, 0)).max() < 1e-9
    _assert_matches_reference(pattern, values, z, lam, nu)

    pattern, values, col, (problem, params, settings, x) = lasso(20, 8, B=2, alpha=3.0)
    (z, lam, nu), res = _solve(pattern, values)
    assert res.status == [Status.OPTIMAL] * 2
    for i, setting in enumerate(settings):
        for par, v in zip(params, setting):
            par.value = v
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11,
                      tol_feas=1e-11)
        assert np.abs(z[i, col:col + 8].numpy() - x.value).max() < 1e-6
        assert (np.abs(x.value) < 1e-6).any()  # the ℓ₁ term zeroes some entries
    _assert_matches_reference(pattern, values, z, lam, nu)


def test_degenerate_lp_reaches_the_strict_test_when_the_polish_cannot():
    """An assignment LP with tied costs: the optimal face is not a vertex, so the
    polish on the interior point's active set fails (the active rows leave z free
    along the face) and the iteration must go on to the strict per-row test rather
    than stop at the looser round that asked for the polish."""
    rng = np.random.default_rng(0)
    k = 6
    C, X = cp.Parameter((k, k)), cp.Variable((k, k))
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(C, X))),
                         [X >= 0, cp.sum(X, 0) == 1, cp.sum(X, 1) == 1])
    costs = [rng.integers(0, 3, (k, k)).astype(float) for _ in range(3)]
    pattern, values, _ = cvxpy_qp(problem, [C], [[c] for c in costs])
    (z, lam, nu), res = _solve(pattern, values)
    assert res.status == [Status.OPTIMAL] * 3
    assert float(res.residuals.max()) <= 1e-10
    for i, c in enumerate(costs):
        C.value = c
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        assert abs(float(values[1][i] @ z[i]) - problem.value) < 1e-9


def _infeasible_and_unbounded_batch():
    """Sample 0: feasible; 1: infeasible (z₀ ≤ −1 and z₀ ≥ 1); 2: an LP unbounded
    along z₁ (min −z₁ s.t. only bounds on z₀): one pattern for all three."""
    Q = [np.diag([1.0, 1.0]), np.diag([1.0, 1.0]), np.zeros((2, 2))]
    G = np.array([[1.0, 0.0], [-1.0, 0.0]])
    h = [np.array([1.0, 1.0]), np.array([-1.0, -1.0]), np.array([1.0, 1.0])]
    q = [np.array([-3.0, 1.0]), np.zeros(2), np.array([0.0, -1.0])]
    mats = [(Q[i], q[i], G, h[i], np.zeros((0, 2)), np.zeros(0)) for i in range(3)]
    pattern, _ = SparsePattern.from_matrices(sp.eye(2), sp.csc_array(G), sp.csc_array((0, 2)))
    return pattern, values_of(pattern, mats)


def test_infeasible_and_unbounded_samples_get_their_status_and_zero_gradients():
    pattern, values = _infeasible_and_unbounded_batch()
    inputs = [v.clone().requires_grad_() for v in values]
    (z, lam, nu), res = sparse_qp_solve(pattern, *inputs)
    assert res.status == [Status.OPTIMAL, Status.INFEASIBLE, Status.UNBOUNDED]
    assert torch.allclose(z[0].detach(), torch.tensor([1.0, -1.0], dtype=DT), atol=1e-9)
    grads = torch.autograd.grad(z[0].sum() + lam[0].sum(), inputs)
    assert grads[1][0].abs().max() > 0.1
    for g in grads:
        assert torch.isfinite(g).all() and g[1:].abs().sum() == 0


def test_inconsistent_equalities_are_infeasible():
    A = sp.csc_array(np.array([[1.0, 1.0], [1.0, 1.0]]))
    pattern, (Qv, Gv, Av) = SparsePattern.from_matrices(sp.eye(2), sp.csc_array((0, 2)), A)
    values = [torch.tensor(Qv), torch.zeros(2, dtype=DT), torch.tensor(Gv),
              torch.zeros(0, dtype=DT), torch.tensor(Av), torch.tensor([0.0, 1.0], dtype=DT)]
    _, res = sparse_qp_solve(pattern, *values)
    assert res.status == [Status.INFEASIBLE]


def test_infinite_h_rows_equal_dropping_them():
    pattern, values = random_sparse_qp(3, n=10, p=12, m=2, B=2)
    free = np.zeros((2, 12), dtype=bool)
    free[0, [1, 4, 5]] = free[1, [0, 11]] = True
    h = values[3].clone()
    h[torch.from_numpy(free)] = float("inf")
    inputs = [v.clone().requires_grad_() for v in values[:3]] + [h.requires_grad_()] + \
        [v.clone().requires_grad_() for v in values[4:]]
    (z, lam, nu), res = sparse_qp_solve(pattern, *inputs)
    assert res.status == [Status.OPTIMAL] * 2
    assert torch.isinf(res.s[torch.from_numpy(free)]).all()
    assert (lam[torch.from_numpy(free)] == 0).all()
    grads = torch.autograd.grad(z.sum() + (lam * lam).sum(), inputs)
    assert (grads[3][torch.from_numpy(free)] == 0).all()
    g_rows = pattern.rows("G")
    for i in range(2):
        assert (grads[2][i, free[i][g_rows]] == 0).all()
        ref = qp_reference(*dense(pattern, [inputs[k].detach() for k in range(6)], i))
        assert rel_err(z[i].detach(), ref[0]) < 1e-6 and rel_err(lam[i].detach(), ref[1]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_dtype_is_kept_and_float32_is_close_to_float64(dtype):
    pattern, values = random_sparse_qp(4, B=2)
    inputs = [v.to(dtype).clone().requires_grad_() for v in values]
    (z, lam, nu), res = sparse_qp_solve(pattern, *inputs)
    assert z.dtype == lam.dtype == nu.dtype == dtype
    grads = torch.autograd.grad(z.sum(), inputs)
    assert all(g.dtype == dtype for g in grads)
    (z64, _, _), _ = sparse_qp_solve(pattern, *[v.to(dtype).double() for v in values])
    assert rel_err(z.detach(), z64) < (1e-6 if dtype == torch.float32 else 1e-14)


def test_batch_of_64_in_threads_equals_one_at_a_time_and_shared_inputs_sum():
    pattern, values = random_sparse_qp(5, n=10, p=12, m=2, B=64)
    shared_q = values[1][0]  # a shared (unbatched) input
    inputs = [values[0], shared_q, *values[2:]]
    inputs = [v.clone().requires_grad_() for v in inputs]
    (z, lam, nu), res = sparse_qp_solve(pattern, *inputs,
                                        settings=SparseQPSettings(threads=2))
    assert res.status == [Status.OPTIMAL] * 64 and z.shape == (64, 10)
    w = torch.randn(64, 10, dtype=DT)
    grads = torch.autograd.grad((w * z).sum(), inputs)
    assert grads[1].shape == (10,)
    total = torch.zeros(10, dtype=DT)
    for i in (0, 17, 63):
        solo = [v[i:i + 1].clone().requires_grad_() if v.dim() == 2 else
                v.clone().requires_grad_() for v in inputs]
        (zi, _, _), _ = sparse_qp_solve(pattern, *solo, settings=SparseQPSettings(threads=1))
        assert torch.equal(zi[0], z[i])  # samples never see each other
        gi = torch.autograd.grad((w[i] * zi[0]).sum(), solo)
        assert torch.allclose(gi[0][0], grads[0][i], rtol=0, atol=1e-12)
    for i in range(64):
        solo = [v[i:i + 1] if v.dim() == 2 else v for v in inputs]
        solo = [t.detach().clone().requires_grad_() for t in solo]
        (zi, _, _), _ = sparse_qp_solve(pattern, *solo, settings=SparseQPSettings(threads=1))
        total += torch.autograd.grad((w[i] * zi[0]).sum(), solo[1])[0]
    assert torch.allclose(grads[1], total, rtol=1e-12, atol=1e-12)


def test_badly_scaled_rows_and_cost_give_the_same_solution():
    pattern, values = random_sparse_qp(6, B=2)
    Qv, q, Gv, h, Av, b = values
    row_scale = torch.tensor(np.logspace(-4, 6, pattern.p))
    eq_scale = torch.tensor(np.logspace(3, -3, pattern.m))
    g_rows, a_rows = pattern.rows("G"), pattern.rows("A")
    scaled = [Qv * 1e-4, q * 1e-4, Gv * row_scale[g_rows], h * row_scale,
              Av * eq_scale[a_rows], b * eq_scale]
    (z, lam, _), res = _solve(pattern, values)
    (zs, lams, _), res_s = _solve(pattern, scaled)
    assert res_s.status == [Status.OPTIMAL] * 2
    assert rel_err(zs, z) < 1e-9
    assert rel_err(lams * row_scale / 1e-4, lam) < 1e-8


def test_warm_start_gives_the_cold_answer_in_fewer_iterations():
    pattern, values = random_sparse_qp(7, n=30, p=40, m=4, B=4)
    _, res = _solve(pattern, values)
    moved = list(values)
    moved[1] = values[1] + 0.01 * torch.randn_like(values[1])
    (zc, _, _), cold = _solve(pattern, moved)
    (zw, _, _), warm = sparse_qp_solve(pattern, *moved, warm=res.warm_start())
    assert warm.status == [Status.OPTIMAL] * 4
    assert rel_err(zw, zc) < 1e-9
    assert float(warm.iterations.double().mean()) < float(cold.iterations.double().mean())
    with pytest.raises(ValueError, match=r"warm\['z'\] must have shape \(2, 30\)"):
        sparse_qp_solve(pattern, *[v[:2] for v in moved], warm=res.warm_start())


def test_max_iter_and_unsettled_samples_report_it():
    pattern, values = random_sparse_qp(8, B=2)
    (z, _, _), res = _solve(pattern, values, max_iter=2)
    assert all(s in (Status.MAX_ITER, Status.NUMERICAL_ERROR) for s in res.status)
    assert (res.iterations <= 2).all()


# ----------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------


def _reference_outputs(pattern, B):
    """Central-difference function: Clarabel's polished (z, λ, ν) for each sample."""
    def fn(*values):
        outs = [qp_polished_reference(*dense(pattern, values, i)) for i in range(B)]
        return [torch.tensor(np.stack(t)) for t in zip(*outs)]
    return fn


@pytest.mark.parametrize("Q_part", ["full", "upper"])
def test_gradients_of_all_six_inputs_match_central_differences(Q_part):
    pattern, values = random_sparse_qp(9, n=5, p=6, m=2, B=2, density=0.4)
    if Q_part == "upper":  # the same Q as its upper triangle
        Qd = [dense(pattern, values, i)[0] for i in range(2)]
        upper = sp.csc_array(np.triu(np.ones((5, 5))))
        pattern = SparsePattern(5, 6, 2, (upper.indptr, upper.indices), pattern.G, pattern.A,
                                Q_part="upper")
        values[0] = torch.tensor(np.stack([Q[pattern.rows("Q"), pattern.cols("Q")]
                                           for Q in Qd]))
    inputs = [v.clone().requires_grad_() for v in values]
    (z, lam, nu), res = sparse_qp_solve(pattern, *inputs)
    assert res.status == [Status.OPTIMAL] * 2
    assert int((lam > 1e-6).sum()) >= 2  # some rows active: their derivatives are exercised
    rng = np.random.default_rng(0)
    weights = [torch.tensor(rng.standard_normal(t.shape)) for t in (z, lam, nu)]
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, (z, lam, nu))),
                                inputs)
    fd = central_differences(_reference_outputs(pattern, 2), values, weights, eps=1e-6)
    for name, g, f in zip(NAMES, grads, fd):
        assert f.abs().max() > 1e-3, name  # the reference is not trivially zero
        assert rel_err(g, f) < 1e-5, (name, rel_err(g, f))


def test_gradients_match_the_dense_engine_on_cvxpy_forms():
    for pattern, values, _, _ in (relu_projection(15, B=3), lasso(12, 5, B=3)):
        inputs = [v.clone().requires_grad_() for v in values]
        (z, lam, nu), res = sparse_qp_solve(pattern, *inputs)
        dense_values, B = dense_batch(pattern, [v.detach() for v in values])
        dense_inputs = [t.clone().requires_grad_() for t in dense_values]
        (zd, lamd, nud), _ = solve_qp(*dense_inputs, batch=B)
        weights = [torch.randn_like(t) for t in (z, lam, nu)]
        grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, (z, lam, nu))),
                                    inputs)
        gd = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, (zd, lamd, nud))),
                                 dense_inputs)
        for k, blk in ((0, "Q"), (2, "G"), (4, "A")):  # the dense gradient at the entries
            rows, cols = pattern.rows(blk), pattern.cols(blk)
            at_entries = gd[k][:, rows, cols]
            if blk == "Q":  # a "full" Q's entry (i, j) is ½ of both Q_ij and Q_ji
                at_entries = 0.5 * (gd[k][:, rows, cols] + gd[k][:, cols, rows])
            assert rel_err(grads[k], at_entries) < 1e-7, blk
        for k in (1, 3, 5):
            assert rel_err(grads[k], gd[k]) < 1e-7, NAMES[k]


def test_duplicated_active_row_is_a_tie_with_finite_gradients_like_the_dense_engine():
    """Row 1 of G repeats row 0 (both active): the multipliers are not unique; both
    engines return the least-norm generalized derivative, which splits h's
    sensitivity evenly between the two copies (the dense engine's shifted
    factorization to about 1e-7)."""
    Q = np.diag([2.0, 1.0, 3.0])
    G = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mats = [(Q, np.array([-4.0, -4.0, 1.0]), G, np.array([1.0, 1.0, 2.0]),
             np.zeros((0, 3)), np.zeros(0))]
    pattern, _ = SparsePattern.from_matrices(sp.csc_array(Q), sp.csc_array(G),
                                             sp.csc_array((0, 3)))
    values = values_of(pattern, mats)
    inputs = [v.clone().requires_grad_() for v in values]
    (z, lam, nu), res = sparse_qp_solve(pattern, *inputs)
    assert res.status == [Status.OPTIMAL]
    assert float(lam[0, 0].detach() + lam[0, 1].detach()) > 0.1
    grads = torch.autograd.grad(z.sum(), inputs)
    dense_inputs = [torch.tensor(t)[None].requires_grad_() for t in mats[0]]
    (zd, _, _), _ = solve_qp(*dense_inputs, batch=1)
    gd = torch.autograd.grad(zd.sum(), dense_inputs)
    assert rel_err(z.detach(), zd.detach()) < 1e-9
    assert rel_err(grads[1], gd[1]) < 1e-8 and rel_err(grads[3], gd[3]) < 1e-6
    assert grads[3].abs().max() > 0.1
    assert abs(float(grads[3][0, 0] - grads[3][0, 1])) < 1e-12


def test_torch_func_jacrev_and_vmap_agree_with_autograd():
    pattern, values = random_sparse_qp(10, n=6, p=8, m=2, B=3)
    Qv, q, Gv, h, Av, b = values

    def solution(qq):
        return sparse_qp_solve(pattern, Qv, qq, Gv, h, Av, b)[0][0]

    J = torch.func.jacrev(solution)(q)  # (B, n, B, n)
    qq = q.clone().requires_grad_()
    z = solution(qq)
    for k in range(6):
        row = torch.autograd.grad(z[:, k].sum(), qq, retain_graph=True)[0]
        assert torch.allclose(J[:, k].sum(1), row, atol=1e-12)

    def one(qi):
        return sparse_qp_solve(pattern, Qv[0], qi, Gv[0], h[0], Av[0], b[0])[0][0].sum()

    per_sample = torch.func.vmap(torch.func.grad(one))(q)
    for i in range(3):
        qi = q[i].clone().requires_grad_()
        assert torch.allclose(per_sample[i], torch.autograd.grad(one(qi), qi)[0], atol=1e-12)


# ----------------------------------------------------------------------------
# Patterns and inputs
# ----------------------------------------------------------------------------


def test_csr_patterns_and_duplicated_entries_mean_the_same_problem():
    pattern, values = random_sparse_qp(11, B=2)
    Qd, q, Gd, h, Ad, b = zip(*[dense(pattern, values, i) for i in range(2)])
    (z, lam, nu), _ = _solve(pattern, values)
    # The same G in CSR order, each entry split in two halves stored twice.
    csr = sp.csr_array(np.where(Gd[0] != 0, 1.0, 0.0))
    indptr = np.concatenate([[0], np.cumsum(2 * np.diff(csr.indptr))])
    indices = np.concatenate([np.repeat(csr.indices[a:b_], 2)
                              for a, b_ in zip(csr.indptr[:-1], csr.indptr[1:])])
    Qc = sp.csr_array(np.where(Qd[0] != 0, 1.0, 0.0))
    Ac = sp.csr_array(np.where(Ad[0] != 0, 1.0, 0.0))
    other = SparsePattern(pattern.n, pattern.p, pattern.m, (Qc.indptr, Qc.indices),
                          (indptr, indices), (Ac.indptr, Ac.indices), format="csr")
    Gv = torch.tensor(np.stack([0.5 * G[other.rows("G"), other.cols("G")] for G in Gd]))
    Qv = torch.tensor(np.stack([Q[other.rows("Q"), other.cols("Q")] for Q in Qd]))
    Av = torch.tensor(np.stack([A[other.rows("A"), other.cols("A")] for A in Ad]))
    inputs = [Qv, values[1], Gv.requires_grad_(), values[3], Av, values[5]]
    (z2, lam2, nu2), _ = sparse_qp_solve(other, *inputs)
    assert rel_err(z2.detach(), z) < 1e-10 and rel_err(lam2.detach(), lam) < 1e-10
    g = torch.autograd.grad(z2.sum(), inputs[2])[0]
    assert torch.allclose(g[:, 0::2], g[:, 1::2], atol=1e-14)  # both halves alike


def test_symbolic_analysis_counts_the_factor():
    n = 4
    pattern, _ = SparsePattern.from_matrices(sp.csc_array(np.ones((n, n))),
                                             sp.csc_array((0, n)), sp.csc_array((0, n)))
    info = pattern.symbolic()
    assert info["kkt_dim"] == n and info["kkt_nnz"] == n * (n + 1) // 2
    assert info["factor_nnz"] == n * (n - 1) // 2  # a dense n×n: the strict lower triangle
    diagonal, _ = SparsePattern.from_matrices(sp.eye(n), sp.csc_array((0, n)),
                                              sp.csc_array((0, n)))
    assert diagonal.symbolic()["factor_nnz"] == 0
    assert pattern.symbolic() is pattern.symbolic()  # computed once per pattern


def _bad(index, fn):
    pattern, values = random_sparse_qp(12, n=4, p=5, m=1, B=2)
    values = [v.clone() for v in values]
    values[index] = fn(values[index])
    return pattern, values


BAD_INPUTS = {
    "wrong nnz": (0, lambda t: t[:, :-1], ValueError, r"^Q_vals must have shape \(\d+,\) or"),
    "batch mismatch": (1, lambda t: t[:1], ValueError, r"^q has batch size 1, an earlier input 2"),
    "nan q": (1, lambda t: t.index_fill(1, torch.tensor([0]), float("nan")), ValueError,
              r"^q contains NaN"),
    "-inf h": (3, lambda t: t.index_fill(1, torch.tensor([0]), -float("inf")), ValueError,
               r"^h contains NaN or -inf"),
    "int b": (5, lambda t: t.long(), TypeError, r"^b must be a floating-point"),
    "3-d G": (2, lambda t: t[None], ValueError, r"^G_vals must have shape"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_input_errors_name_the_argument(case):
    index, fn, error, match = BAD_INPUTS[case]
    pattern, values = _bad(index, fn)
    with pytest.raises(error, match=match):
        sparse_qp_solve(pattern, *values)


def test_pattern_errors_name_the_block():
    eye = (np.arange(4), np.arange(3))
    with pytest.raises(ValueError, match=r"^G indices must lie in \[0, 2\)"):
        SparsePattern(3, 2, 0, eye, (np.array([0, 1, 1, 2]), np.array([0, 5])),
                      (np.zeros(4, dtype=int), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError, match=r"^Q_part='upper' needs entries on or above"):
        SparsePattern(2, 0, 0, (np.array([0, 2, 2]), np.array([0, 1])),
                      (np.zeros(3, dtype=int), np.zeros(0, dtype=int)),
                      (np.zeros(3, dtype=int), np.zeros(0, dtype=int)), Q_part="upper")
    with pytest.raises(ValueError, match=r"^A indptr must have 4 entries"):
        SparsePattern(3, 0, 1, eye, (np.zeros(4, dtype=int), np.zeros(0, dtype=int)),
                      (np.zeros(2, dtype=int), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError, match=r"^static_regularization must be positive"):
        SparseQPSettings(static_regularization=0.0)


def test_settings_shared_with_the_dense_engine_carry_over():
    from declarative.backends.qp import QPSettings

    s = SparseQPSettings.from_qp(QPSettings(eps=1e-8, max_iter=30, regularization=1e-3),
                                 threads=1)
    assert (s.eps, s.max_iter, s.threads) == (1e-8, 30, 1)
    assert s.static_regularization == SparseQPSettings().static_regularization  # not shared
    assert s.tolerance() == 1e-8
    assert s.with_(eps_tightens=True).tolerance() == 1e-10
