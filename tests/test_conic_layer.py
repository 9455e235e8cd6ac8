"""CvxpyLayer on the conic (diffcp) path: solutions and derivatives against references.

Every derivative is checked against something the layer does not compute: a
closed form differentiated by torch autograd, central finite differences by
re-solving, or ``torch.autograd.gradcheck`` in float64.
"""

import functools
import os
import signal
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from declarative.backends import conic
from declarative.backends.cone_derivative import power_projection
from helpers import (
    CLARABEL_ARGS,
    SCS_EXP,
    SCS_TIGHT,
    as_tensor,
    central_differences,
    conic_layer,
    reference_solve,
    rel_err,
    weighted_grads,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from references import simplex_projection

from declarative import SolverError, Status

DT = torch.float64





# ----------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------


def test_least_squares_matches_closed_form_and_its_gradient():
    m, n = 6, 3
    rng = np.random.default_rng(1)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)))
    layer = conic_layer(prob, [A, b], [x], solver_args=SCS_TIGHT)

    At = as_tensor(rng.standard_normal((m, n)), grad=True)
    bt = as_tensor(rng.standard_normal(m), grad=True)
    (x_star,) = layer(At, bt)
    x_ref = torch.linalg.lstsq(At, bt).solution
    assert rel_err(x_star.detach(), x_ref.detach()) < 1e-8

    w = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(0))
    got = weighted_grads([x_star], [At, bt], [w])
    ref = weighted_grads([x_ref], [At, bt], [w])
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-6


def test_ridge_matches_closed_form_and_its_gradient():
    """x = (AᵀA + λI)⁻¹ Aᵀb, with the gradient in A, b and λ."""
    m, n = 6, 3
    rng = np.random.default_rng(1)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    lam = cp.Parameter(nonneg=True)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + lam * cp.sum_squares(x)))
    layer = conic_layer(prob, [A, b, lam], [x], solver_args=SCS_TIGHT)

    At = as_tensor(rng.standard_normal((m, n)), grad=True)
    bt = as_tensor(rng.standard_normal(m), grad=True)
    lt = as_tensor(0.7, grad=True)
    (x_star,) = layer(At, bt, lt)
    x_ref = torch.linalg.solve(At.T @ At + lt * torch.eye(n, dtype=DT), At.T @ bt)
    assert rel_err(x_star.detach(), x_ref.detach()) < 1e-8

    w = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(0))
    got = weighted_grads([x_star], [At, bt, lt], [w])
    ref = weighted_grads([x_ref], [At, bt, lt], [w])
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-6


def test_box_projection_matches_clamp():
    n, B = 6, 3
    y = cp.Parameter(n)
    lo = cp.Parameter(n)
    hi = cp.Parameter(n)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= lo, x <= hi])
    layer = conic_layer(prob, [y, lo, hi], [x], solver_args=SCS_TIGHT)

    rng = np.random.default_rng(2)
    lo_v = -0.5 - rng.random((B, n))
    hi_v = 0.5 + rng.random((B, n))
    y_v = 2.0 * rng.standard_normal((B, n))
    # Keep every entry clearly inside or outside the box: the projection is
    # differentiable there and the test is not decided by a kink.
    margin = np.minimum(np.abs(y_v - lo_v), np.abs(y_v - hi_v))
    assert margin.min() > 0.05
    inside = (y_v > lo_v) & (y_v < hi_v)
    assert inside.any() and (~inside).any()

    yt, lot, hit = (as_tensor(v, grad=True) for v in (y_v, lo_v, hi_v))
    (x_star,) = layer(yt, lot, hit)
    x_ref = torch.clamp(yt, lot, hit)
    assert (x_star - x_ref).abs().max() < 1e-7

    w = torch.randn(B, n, dtype=DT, generator=torch.Generator().manual_seed(1))
    got = weighted_grads([x_star], [yt, lot, hit], [w])
    ref = weighted_grads([x_ref], [yt, lot, hit], [w])
    for g, r in zip(got, ref):
        assert (g - r).abs().max() < 1e-6


@functools.cache
def _box_layer(n):
    y, lo, hi = cp.Parameter(n), cp.Parameter(n), cp.Parameter(n)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= lo, x <= hi])
    return conic_layer(prob, [y, lo, hi], [x], solver_args=SCS_TIGHT)


_coord = st.tuples(st.floats(-3, 3), st.floats(0.05, 1.5), st.floats(0.05, 1.5))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.lists(_coord, min_size=1, max_size=5))
def test_box_projection_property(coords):
    """Random boxes around 0: the layer is torch.clamp, value and gradient."""
    y_v = np.array([c[0] for c in coords])
    lo_v = -np.array([c[1] for c in coords])
    hi_v = np.array([c[2] for c in coords])
    assume(np.minimum(np.abs(y_v - lo_v), np.abs(y_v - hi_v)).min() > 1e-3)
    layer = _box_layer(len(coords))
    yt, lot, hit = (as_tensor(v, grad=True) for v in (y_v, lo_v, hi_v))
    (x_star,) = layer(yt, lot, hit)
    x_ref = torch.clamp(yt, lot, hit)
    assert (x_star - x_ref).abs().max() < 1e-7
    w = torch.linspace(-1, 2, len(coords), dtype=DT)
    got = weighted_grads([x_star], [yt, lot, hit], [w])
    ref = weighted_grads([x_ref], [yt, lot, hit], [w])
    for g, r in zip(got, ref):
        assert (g - r).abs().max() < 1e-5


def _lp_at_vertex(seed, m=5, n=2):
    """A, b, c with a unique, non-degenerate optimal vertex on rows 0..n-1 of Ax <= b."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, n))
    x0 = rng.standard_normal(n)
    b = A @ x0
    b[n:] += 0.5 + rng.random(m - n)  # inactive rows: strictly slack
    lam = 0.5 + rng.random(n)  # active rows: strictly positive multipliers
    c = -A[:n].T @ lam
    return A, b, c


def test_lp_vertex_sensitivity():
    """x = A_B⁻¹ b_B and λ_B = -A_B⁻ᵀ c, so dx/dc = 0 and dx/db_N = 0 exactly."""
    m, n = 5, 2
    A_v, b_v, c_v = _lp_at_vertex(3, m, n)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    c = cp.Parameter(n)
    x = cp.Variable(n)
    con = A @ x <= b
    prob = cp.Problem(cp.Minimize(c @ x), [con])
    layer = conic_layer(prob, [A, b, c], [x, con.dual_variables[0]], solver_args=SCS_TIGHT)

    At, bt, ct = (as_tensor(v, grad=True) for v in (A_v, b_v, c_v))
    x_star, lam_star = layer(At, bt, ct)
    x_ref = torch.linalg.solve(At[:n], bt[:n])
    lam_ref = torch.cat([-torch.linalg.solve(At[:n].T, ct), torch.zeros(m - n, dtype=DT)])
    assert (x_star - x_ref).abs().max() < 1e-7
    assert (lam_star - lam_ref).abs().max() < 1e-7

    # One output at a time, so a wrong dual gradient cannot hide behind the primal's.
    gen = torch.Generator().manual_seed(2)
    wx, wl = torch.randn(n, dtype=DT, generator=gen), torch.randn(m, dtype=DT, generator=gen)
    for out, ref, w in ((x_star, x_ref, wx), (lam_star, lam_ref, wl)):
        got = torch.autograd.grad((w * out).sum(), [At, bt, ct], retain_graph=True,
                                  allow_unused=True)
        exp = torch.autograd.grad((w * ref).sum(), [At, bt, ct], retain_graph=True,
                                  allow_unused=True)
        for g, e, inp in zip(got, exp, (At, bt, ct)):
            e = torch.zeros_like(inp) if e is None else e
            assert (g - e).abs().max() < 1e-6
    # The known zeros, stated outright.
    gA, gb, gc = torch.autograd.grad((wx * x_star).sum(), [At, bt, ct], retain_graph=True)
    assert gc.abs().max() < 1e-7
    assert gb[n:].abs().max() < 1e-7 and gA[n:].abs().max() < 1e-7
    assert gb[:n].abs().max() > 1e-2  # and the non-zero part is really there


def _softmax_problem(n):
    theta = cp.Parameter(n)
    z = cp.Variable(n)
    prob = cp.Problem(cp.Maximize(theta @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1])
    return prob, theta, z


def test_softmax_via_entropy_matches_torch_softmax_and_its_jacobian():
    n = 4
    prob, theta, z = _softmax_problem(n)
    layer = conic_layer(prob, [theta], [z], solver_args=SCS_EXP)
    th = as_tensor(np.random.default_rng(4).standard_normal(n), grad=True)
    (z_star,) = layer(th)
    s = torch.softmax(th.detach(), 0)
    assert (z_star.detach() - s).abs().max() < 1e-6

    J = torch.autograd.functional.jacobian(lambda t: layer(t)[0], th)
    J_ref = torch.diag(s) - torch.outer(s, s)
    assert (J - J_ref).abs().max() < 1e-5


def test_softmax_batched_matches_torch_softmax():
    n, B = 3, 4
    prob, theta, z = _softmax_problem(n)
    layer = conic_layer(prob, [theta], [z], solver_args=SCS_EXP)
    th = as_tensor(np.random.default_rng(5).standard_normal((B, n)), grad=True)
    (z_star,) = layer(th)
    s = torch.softmax(th, -1)
    assert (z_star - s).abs().max() < 1e-6
    w = torch.randn(B, n, dtype=DT, generator=torch.Generator().manual_seed(3))
    (g,) = weighted_grads([z_star], [th], [w])
    (g_ref,) = weighted_grads([s], [th], [w])
    assert (g - g_ref).abs().max() < 1e-5


def test_sparsemax_matches_sort_based_closed_form_and_jacobian():
    n = 5
    theta = cp.Parameter(n)
    z = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - theta)), [cp.sum(z) == 1, z >= 0])
    layer = conic_layer(prob, [theta], [z], solver_args=SCS_TIGHT)

    th = as_tensor([1.2, 0.9, 0.1, -0.4, 0.7], grad=True)
    z_ref, tau, _ = simplex_projection(th.detach().numpy())
    z_ref = torch.from_numpy(z_ref)
    assert (th.detach() - tau).abs().min() > 0.05  # no entry at the support's edge
    support = (z_ref > 0).to(DT)
    assert 1 < int(support.sum()) < n  # a genuinely sparse answer

    (z_star,) = layer(th)
    assert (z_star.detach() - z_ref).abs().max() < 1e-7
    J = torch.autograd.functional.jacobian(lambda t: layer(t)[0], th)
    J_ref = torch.diag(support) - torch.outer(support, support) / support.sum()
    assert (J - J_ref).abs().max() < 1e-6


# ----------------------------------------------------------------------------
# gradcheck on each cone kind
# ----------------------------------------------------------------------------

GRADCHECK = dict(eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_logistic_regression_exponential_cone():
    m, n = 6, 2
    rng = np.random.default_rng(6)
    X = cp.Parameter((m, n))
    y = np.where(rng.random(m) > 0.5, 1.0, -1.0)
    y[:2] = [1.0, -1.0]
    w = cp.Variable(n)
    loss = cp.sum(cp.logistic(-cp.multiply(y, X @ w))) / m
    prob = cp.Problem(cp.Minimize(loss + 0.1 * cp.sum_squares(w)))
    layer = conic_layer(prob, [X], [w], solver_args=SCS_TIGHT)
    Xt = as_tensor(rng.standard_normal((m, n)), grad=True)
    assert torch.autograd.gradcheck(lambda X_: layer(X_)[0], (Xt,), **GRADCHECK)


def test_gradcheck_socp():
    n = 3
    rng = np.random.default_rng(7)
    F = cp.Parameter((4, n))
    g = cp.Parameter(4)
    p = cp.Parameter(n)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(p @ x + cp.norm(F @ x - g, 2)), [cp.norm(x, 2) <= 1])
    layer = conic_layer(prob, [F, g, p], [x], solver_args=SCS_TIGHT)
    inputs = (as_tensor(rng.standard_normal((4, n)), grad=True),
              as_tensor(rng.standard_normal(4), grad=True),
              as_tensor(rng.standard_normal(n), grad=True))
    assert torch.autograd.gradcheck(lambda *a: layer(*a)[0], inputs, **GRADCHECK)


def _psd_projection_problem(n):
    P = cp.Parameter((n, n))  # not declared symmetric: gradcheck perturbs single entries
    X = cp.Variable((n, n), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - (P + P.T) / 2)), [X >> 0])
    return prob, P, X


def test_gradcheck_sdp_psd_projection():
    n = 3
    prob, P, X = _psd_projection_problem(n)
    layer = conic_layer(prob, [P], [X], solver_args=SCS_TIGHT)
    M = torch.tensor([[1.0, 0.3, -0.5], [0.2, -1.5, 0.4], [-0.7, 0.6, 0.8]], dtype=DT)
    Pt = M.clone().requires_grad_(True)

    # The solution is the eigenvalue clamp of sym(P) (a closed form); the
    # eigenvalues stay away from 0 so the projection is differentiable there.
    S = (M + M.T) / 2
    evals, evecs = torch.linalg.eigh(S)
    assert evals.abs().min() > 0.1 and (evals < 0).any()
    X_ref = evecs @ torch.diag(evals.clamp(min=0)) @ evecs.T
    (X_star,) = layer(Pt)
    assert (X_star.detach() - X_ref).abs().max() < 1e-7
    assert torch.autograd.gradcheck(lambda P_: layer(P_)[0], (Pt,), **GRADCHECK)


def test_symmetric_parameter_is_its_upper_triangle_with_the_closed_form_gradient():
    """A ``symmetric=True`` Parameter is read from its upper triangle (as cvxpylayers does)."""
    n = 3
    P = cp.Parameter((n, n), symmetric=True)
    X = cp.Variable((n, n), PSD=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - P)))
    layer = conic_layer(prob, [P], [X], solver_args=SCS_TIGHT)
    M = torch.tensor([[1.0, 0.3, -0.5], [0.3, -1.5, 0.4], [-0.5, 0.4, 0.8]], dtype=DT)
    Pt = M.clone().requires_grad_(True)

    def closed_form(P_):
        evals, evecs = torch.linalg.eigh(torch.triu(P_) + torch.triu(P_, 1).T)
        return evecs @ torch.diag(evals.clamp(min=0)) @ evecs.T

    (X_star,) = layer(Pt)
    X_ref = closed_form(Pt)
    assert (X_star - X_ref).abs().max() < 1e-8
    W = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(7))
    (g,) = torch.autograd.grad((W * X_star).sum(), [Pt])
    (g_ref,) = torch.autograd.grad((W * X_ref).sum(), [Pt])
    assert (g.tril(-1) == 0).all()  # the strictly lower triangle is not read
    assert (g - g_ref).abs().max() < 1e-6


def test_sdp_clarabel_agrees_with_scs_including_the_psd_dual():
    """Clarabel stores PSD blocks upper-triangular, SCS lower: both must reach one answer."""
    n = 3
    prob, P, X = _psd_projection_problem(n)
    con = prob.constraints[0]
    prob = cp.Problem(cp.Minimize(prob.objective.args[0] + cp.trace(X)), [con, X[0, 1] >= 0.1])
    outputs = [X, con.dual_variables[0]]
    M = torch.tensor([[1.0, 0.3, -0.5], [0.2, -1.5, 0.4], [-0.7, 0.6, 0.8]], dtype=DT,
                     requires_grad=True)
    scs = conic_layer(prob, [P], outputs, solver_args=SCS_TIGHT)
    cla = conic_layer(prob, [P], outputs, solver_args=CLARABEL_ARGS)
    W = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(8))
    res = []
    for layer in (scs, cla):
        Xs, Ys = layer(M)
        (g,) = torch.autograd.grad((W * Xs).sum() + (W.T * Ys).sum(), [M])
        res.append((Xs.detach(), Ys.detach(), g))
    ref = reference_solve(prob, [P], [M.detach().numpy()], outputs)
    for got, r in zip(res[0][:2], ref):
        assert np.abs(got.numpy() - r).max() < 1e-4  # the reference reaches ~1e-5 on SDPs
    for u, v in zip(res[0], res[1]):
        assert (u - v).abs().max() < 1e-5
    assert res[0][1].abs().max() > 1e-2  # the PSD constraint is active


def _power_projection_problem(alpha):
    """Projection onto the power cone x₀^α x₁^(1−α) ≥ |x₂|: its solution is Π(p)."""
    p = cp.Parameter(3)
    x = cp.Variable(3)
    con = cp.PowCone3D(x[0], x[1], x[2], alpha)
    return cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [con]), p, x, con


def _power_projection_reference(alpha, v):
    """x and the duals at Π(v), by CVXPY + SCS at tight tolerance (SCS projects onto the
    power cone exactly; Clarabel's barrier stops near 1e-6 by the cone's edge)."""
    prob, p, x, con = _power_projection_problem(alpha)
    p.value = np.asarray(v, dtype=np.float64)
    prob.solve(solver=cp.SCS, eps=1e-12, max_iters=100_000)
    assert prob.status == "optimal"
    return [np.asarray(o.value, dtype=np.float64) for o in [x] + list(con.dual_variables)]


def _in_power_cone(p, alpha, dual=False, tol=1e-12):
    a, b = (alpha, 1 - alpha)
    x, y = (p[0] / a, p[1] / b) if dual else (p[0], p[1])
    return x >= -tol and y >= -tol and max(x, 0) ** a * max(y, 0) ** b >= abs(p[2]) - tol


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_power_cone_projection_and_jacobian_match_central_differences(alpha):
    """`power_projection`: Moreau's characterization, SCS, central differences.

    p = Π(v) exactly when p ∈ K, q = p − v ∈ K* and pᵀq = 0.
    """
    rng = np.random.default_rng(int(10 * alpha))
    v = np.vstack([rng.standard_normal((6, 3)), [[0.5, 0.5, 2.0], [-1.0, 2.0, 0.3]]])
    p, D = power_projection(v, np.full(len(v), alpha))
    h = 1e-6
    for vi, pi, Di in zip(v, p, D):
        q = pi - vi
        assert _in_power_cone(pi, alpha) and _in_power_cone(q, alpha, dual=True)
        assert abs(pi @ q) < 1e-12
        assert np.abs(pi - _power_projection_reference(alpha, vi)[0]).max() < 1e-8
        fd = np.stack([(power_projection(vi + h * e, [alpha])[0][0]
                        - power_projection(vi - h * e, [alpha])[0][0]) / (2 * h)
                       for e in np.eye(3)], axis=1)
        assert np.abs(Di - fd).max() < 1e-6
    assert np.abs(D - np.eye(3)).max() > 0.1  # some points lie outside the cone


def test_dual_power_cone_projection_is_moreaus_complement():
    """SCS's α < 0 (the dual cone K_α*): Π_K*(v) = v + Π_K(−v), checked by Moreau too."""
    from declarative.backends.cone_derivative import _dual_power_blocks

    rng = np.random.default_rng(5)
    v = rng.standard_normal((8, 3))
    alpha = 0.35
    for signed in (alpha, -alpha):  # K_α (its dual K_α*), or K_α* (its dual K_α)
        proj, D = _dual_power_blocks(v, np.full(len(v), signed))
        for vi, pi in zip(v, proj):
            q = pi - vi  # in the dual of the projection's cone, orthogonal to pi
            assert _in_power_cone(pi, alpha, dual=signed > 0)
            assert _in_power_cone(q, alpha, dual=signed < 0) and abs(pi @ q) < 1e-12
        h = 1e-6
        for vi, Di in zip(v, D):
            fd = np.stack([(_dual_power_blocks((vi + h * e)[None], [signed])[0][0]
                            - _dual_power_blocks((vi - h * e)[None], [signed])[0][0]) / (2 * h)
                           for e in np.eye(3)], axis=1)
            assert np.abs(Di - fd).max() < 1e-6


def test_power_cone_layer_values_duals_and_gradients():
    """Power cones (SCS): values and duals are CVXPY's, gradients central differences'."""
    alpha = 0.3
    prob, p, x, con = _power_projection_problem(alpha)
    outputs = [x] + list(con.dual_variables)
    layer = conic_layer(prob, [p], outputs, solver_args=SCS_TIGHT)
    rng = np.random.default_rng(3)
    v = np.array([[0.5, -0.3, 1.2], [1.0, 2.0, -3.0], [-0.4, 0.9, 0.2]])  # outside K and K°
    vt = as_tensor(v, grad=True)
    out = layer(vt)
    for i in range(len(v)):
        ref = _power_projection_reference(alpha, v[i])
        for got, r in zip(out, ref):
            assert np.abs(got[i].detach().numpy() - r).max() < 1e-6
    weights = [torch.tensor(rng.standard_normal(o.shape), dtype=DT) for o in out]
    (g,) = weighted_grads(out, [vt], weights)

    def solve(v_):
        return _power_projection_reference(alpha, v_)

    fd = np.zeros_like(v)
    h = 1e-6
    for i in range(len(v)):
        for j in range(3):
            e = np.zeros(3)
            e[j] = h
            fp, fm = solve(v[i] + e), solve(v[i] - e)
            fd[i, j] = sum(float((w[i].numpy() * (a - b)).sum())
                           for w, a, b in zip(weights, fp, fm)) / (2 * h)
    assert np.abs(g.numpy() - fd).max() < 1e-5
    assert np.abs(fd).max() > 0.1


def test_power_cone_gradient_at_default_settings_and_in_float32():
    """The closed-form Jacobian of the projection, at SCS's default tolerance."""
    alpha = 0.6
    prob, p, x, _ = _power_projection_problem(alpha)
    layer = conic_layer(prob, [p], [x])
    v = np.array([0.5, -0.3, 1.2])
    _, D = power_projection(v, [alpha])
    for dtype in (torch.float64, torch.float32):
        vt = as_tensor(v, grad=True, dtype=dtype)
        (xs,) = layer(vt)
        assert xs.dtype == dtype
        J = torch.stack([torch.autograd.grad(xs[k], vt, retain_graph=True)[0]
                         for k in range(3)])
        assert np.abs(J.double().numpy() - D[0]).max() < 1e-3
    assert np.abs(D[0] - np.eye(3)).max() > 0.1


def test_power_cones_are_refused_by_solvers_that_drop_them():
    prob, p, x, _ = _power_projection_problem(0.5)
    for solver in ("CLARABEL", "ECOS"):
        with pytest.raises(ValueError, match="power"):
            conic_layer(prob, [p], [x], solver=solver)


# ----------------------------------------------------------------------------
# Dual variables
# ----------------------------------------------------------------------------


def test_dual_variable_gradients_match_central_differences():
    n = 3
    rng = np.random.default_rng(8)
    G = rng.standard_normal((4, n))
    p = cp.Parameter(n)
    h = cp.Parameter(4)
    x = cp.Variable(n)
    ineq = G @ x <= h
    eq = cp.sum(x) == 1
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [ineq, eq])
    outputs = [x, ineq.dual_variables[0], eq.dual_variables[0]]
    layer = conic_layer(prob, [p, h], outputs, solver_args=SCS_TIGHT)

    p_v = 2.0 * rng.standard_normal(n)
    h_v = G @ np.full(n, 1 / 3) + 0.3 * rng.random(4)  # feasible: x = 1/3 fits
    pt, ht = as_tensor(p_v, grad=True), as_tensor(h_v, grad=True)
    x_s, lam, nu = layer(pt, ht)

    # The layer's duals are CVXPY's own.
    ref = reference_solve(prob, [p, h], [p_v, h_v], outputs)
    for got, r in zip((x_s, lam, nu), ref):
        assert np.abs(got.detach().numpy() - r).max() < 1e-7
    # Strict complementarity: every row clearly active or clearly slack.
    slack = h_v - G @ ref[0]
    assert np.all((ref[1] > 1e-3) | (slack > 1e-3))
    assert (ref[1] > 1e-3).any()

    gen = torch.Generator().manual_seed(4)
    w_lam, w_nu = torch.randn(4, dtype=DT, generator=gen), torch.randn((), dtype=DT,
                                                                          generator=gen)
    got = weighted_grads([lam, nu], [pt, ht], [w_lam, w_nu])

    def duals(p_, h_):
        return layer(p_, h_)[1:]

    fd = central_differences(duals, [pt.detach(), ht.detach()], [w_lam, w_nu], eps=1e-5)
    for g, f in zip(got, fd):
        assert (g - f).abs().max() < 1e-4
    assert max(float(g.abs().max()) for g in got) > 1e-2


# ----------------------------------------------------------------------------
# Derivatives at the solver's default tolerance
# ----------------------------------------------------------------------------


def _soc_dual_problem():
    """min cᵀx + 0.1‖x‖² s.t. ‖x‖ ≤ t. With ‖c‖ > 0.2t the ball is active:
    x = −t c/‖c‖ and its dual λ = ‖c‖ − 0.2t, so dλ/dt = −0.2 and dλ/dc = c/‖c‖."""
    n = 3
    c, t, x = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Variable(n)
    ball = cp.norm(x) <= t
    prob = cp.Problem(cp.Minimize(c @ x + 0.1 * cp.sum_squares(x)), [ball])
    return prob, [c, t], [x, ball.dual_variables[0]]


@pytest.mark.parametrize("mode", ["auto", "dense", "lsqr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["unit", "c-1e3"])
def test_soc_dual_derivative_at_default_tolerance_matches_the_closed_form(mode, dtype, scale):
    """SCS at its default 1e-4: the dual's derivative within 1e-3 (relative) of the closed
    form. An exact solve of diffcp's singular residual-map system gave dλ/dt = −0.08."""
    prob, params, outputs = _soc_dual_problem()
    layer = conic_layer(prob, params, outputs, solver_args={"mode": mode})
    c = scale * np.array([[0.5, 0.3, -0.2], [-0.4, 0.9, 0.1], [0.2, 0.2, 0.7]])
    t = np.array([2.0, 1.5, 0.5])
    ct, tt = as_tensor(c, grad=True, dtype=dtype), as_tensor(t, grad=True, dtype=dtype)
    x, lam = layer(ct, tt)
    norm = np.linalg.norm(c, axis=1)
    assert (norm > 0.2 * t).all()
    assert np.abs(lam.detach().double().numpy() - (norm - 0.2 * t)).max() < 1e-3 * norm.max()
    gc, gt = torch.autograd.grad(lam.sum(), [ct, tt], retain_graph=True)
    assert np.abs(gt.double().numpy() + 0.2).max() < 1e-3
    assert np.abs(gc.double().numpy() - c / norm[:, None]).max() < 1e-3
    gc, gt = torch.autograd.grad(x.sum(), [ct, tt])  # x = −t c/‖c‖
    assert np.abs(gt.double().numpy() + c.sum(1) / norm).max() < 1e-3


def _isotonic(y):
    """Pool-adjacent-violators: the isotonic regression of y and its Jacobian."""
    blocks = []
    for i, v in enumerate(y):
        blocks.append([v, 1, [i]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count, idx = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
            blocks[-1][2] += idx
    x, J = np.zeros(len(y)), np.zeros((len(y), len(y)))
    for total, count, idx in blocks:
        x[idx] = total / count
        J[np.ix_(idx, idx)] = 1.0 / count
    return x, J


def test_isotonic_regression_gradient_at_default_tolerance_is_as_good_as_lsqr():
    """Default settings against the closed form (PAVA), and no worse than diffcp's LSQR
    adjoint (cvxpylayers' method) on the same forward solve."""
    n, B = 20, 4
    y, x = cp.Parameter(n), cp.Variable(n)
    layer = conic_layer(cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.diff(x) >= 0]),
                        [y], [x])
    rng = np.random.default_rng(0)
    yv = np.cumsum(rng.standard_normal((B, n)), axis=1) * 0.3 + rng.standard_normal((B, n))
    w = rng.standard_normal((B, n))
    refs = [_isotonic(v) for v in yv]
    assert max(np.count_nonzero(np.diag(J) < 1) for _, J in refs) > 3  # pooled blocks
    errs = {}
    for mode in ("auto", "lsqr"):
        yt = as_tensor(yv, grad=True)
        (xs,) = layer(yt, solver_args={"mode": mode})
        (g,) = torch.autograd.grad(xs, yt, torch.from_numpy(w))
        errs[mode] = max(np.abs(g[i].numpy() - J.T @ w[i]).max() for i, (_, J) in enumerate(refs))
    assert errs["auto"] < 1e-3
    assert errs["auto"] <= 1.01 * errs["lsqr"] + 1e-9


def test_lp_point_inside_a_nearly_optimal_face_gives_a_bounded_gradient():
    """c₃ = −1 + 1e-6: the vertex x = (1, 1, 0.5, 0) is optimal and x is locally constant
    in c, but SCS stops inside the nearly optimal face (x₃ ≈ 0.83). The residual map is
    singular there; its unresolved direction is dropped, not divided by ~1e-16."""
    n = 4
    c, x = cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(c @ x), [x >= 0, x <= 1, cp.sum(x) <= 2.5])
    layer = conic_layer(prob, [c], [x])
    ct = as_tensor([-1.0, -1.0, -1.0 + 1e-6, 0.5], grad=True)
    (xs,), info = layer(ct, return_info=True)
    assert info.ok and abs(float(xs[2]) - 0.5) > 0.1  # SCS's point is not the vertex
    (g,) = torch.autograd.grad(xs @ torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT), ct)
    assert torch.isfinite(g).all() and g.abs().max() < 1e-3


def test_adjoint_methods_agree_with_each_other_and_with_diffcp_at_tight_tolerance():
    """Dense (deflated LU), LSQR and LSMR (deflated operator) give one adjoint; at an
    accurate point it is diffcp's own (its dense mode is exact there)."""
    from declarative.backends.cone_derivative import ConeAdjoint
    from diffcp.cone_program import solve_and_derivative_internal

    prob, params, _ = _soc_dual_problem()
    params[0].value, params[1].value = np.array([0.5, 0.3, -0.2]), 2.0
    data, _, _ = prob.get_problem_data(cp.DIFFCP)
    from cvxpy.reductions.solvers.conic_solvers.scs_conif import dims_to_solver_dict

    A, b, c = data["A"].tocsc(), data["b"], data["c"]
    cone_dict = dims_to_solver_dict(data["dims"])
    ref = solve_and_derivative_internal(A.copy(), b, c, cone_dict, solve_method="SCS",
                                        mode="dense", eps_abs=1e-12, eps_rel=1e-12,
                                        max_iters=100_000)
    x, y, s = ref["x"], ref["y"], ref["s"]
    rows, cols = A.indices, np.repeat(np.arange(A.shape[1]), np.diff(A.indptr))
    rng = np.random.default_rng(2)
    dx, dy = rng.standard_normal(x.size), rng.standard_normal(y.size)
    gA, gb, gc = ref["DT"](dx, dy, np.zeros(y.size))
    for method in ("dense", "lsqr", "lsmr"):
        adjoint = ConeAdjoint.at(A, b, c, cone_dict, x, y, s, rows, cols, method)
        dA, db, dc = adjoint(dx, dy, np.zeros(y.size))
        assert np.abs(dA - gA.toarray()[rows, cols]).max() < 1e-6, method
        assert np.abs(db - gb).max() < 1e-6 and np.abs(dc - gc).max() < 1e-6, method
    assert np.abs(gb).max() > 1e-2


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------


def _qp_layer(**kw):
    n, m = 3, 4
    Q = cp.Parameter((m, n))
    q = cp.Parameter(m)
    x = cp.Variable(n)
    con = x >= -0.5
    prob = cp.Problem(cp.Minimize(cp.sum_squares(Q @ x - q) + 0.1 * cp.sum(x)), [con])
    return conic_layer(prob, [Q, q], [x, con.dual_variables[0]], **kw), (m, n)


def test_batch_matches_one_at_a_time():
    layer, (m, n) = _qp_layer(solver_args=SCS_TIGHT)
    B = 3
    rng = np.random.default_rng(9)
    Qb = as_tensor(rng.standard_normal((B, m, n)), grad=True)
    qb = as_tensor(2 * rng.standard_normal((B, m)), grad=True)
    gen = torch.Generator().manual_seed(5)
    wx, wl = torch.randn(B, n, dtype=DT, generator=gen), torch.randn(B, n, dtype=DT,
                                                                       generator=gen)
    xb, lb = layer(Qb, qb)
    gQ, gq = weighted_grads([xb, lb], [Qb, qb], [wx, wl])
    assert xb.shape == (B, n) and lb.shape == (B, n)
    for i in range(B):
        Qi = Qb[i].detach().clone().requires_grad_(True)
        qi = qb[i].detach().clone().requires_grad_(True)
        xi, li = layer(Qi, qi)
        gQi, gqi = weighted_grads([xi, li], [Qi, qi], [wx[i], wl[i]])
        assert (xb[i] - xi).abs().max() < 1e-9
        assert (lb[i] - li).abs().max() < 1e-9
        assert (gQ[i] - gQi).abs().max() < 1e-8
        assert (gq[i] - gqi).abs().max() < 1e-8


def test_broadcast_parameter_gradient_is_sum_over_batch():
    layer, (m, n) = _qp_layer(solver_args=SCS_TIGHT)
    B = 3
    rng = np.random.default_rng(10)
    Q = as_tensor(rng.standard_normal((m, n)), grad=True)  # unbatched: shared by every sample
    qb = as_tensor(2 * rng.standard_normal((B, m)), grad=True)
    w = torch.randn(B, n, dtype=DT, generator=torch.Generator().manual_seed(6))
    (xb, _) = layer(Q, qb)
    (gQ,) = torch.autograd.grad((w * xb).sum(), [Q])
    total = torch.zeros_like(Q)
    for i in range(B):
        Qi = Q.detach().clone().requires_grad_(True)
        xi, _ = layer(Qi, qb[i].detach())
        assert (xb[i] - xi).abs().max() < 1e-9
        total += torch.autograd.grad((w[i] * xi).sum(), [Qi])[0]
    assert (gQ - total).abs().max() < 1e-8
    assert gQ.abs().max() > 1e-3


def test_batch_of_one_keeps_dimension_and_unbatched_stays_unbatched():
    layer, (m, n) = _qp_layer()
    rng = np.random.default_rng(11)
    Q, q = rng.standard_normal((m, n)), rng.standard_normal(m)
    x1, l1 = layer(as_tensor(Q[None]), as_tensor(q[None]))
    assert x1.shape == (1, n) and l1.shape == (1, n)
    x0, l0 = layer(as_tensor(Q), as_tensor(q))
    assert x0.shape == (n,) and l0.shape == (n,)
    # Only one input batched: the batch dimension still comes back.
    xm, _ = layer(as_tensor(Q), as_tensor(q[None]))
    assert xm.shape == (1, n)
    assert torch.allclose(x1[0], x0, atol=1e-6) and torch.allclose(xm[0], x0, atol=1e-6)


def test_scalar_parameter_and_scalar_variable_shapes():
    a = cp.Parameter()
    t = cp.Variable()
    prob = cp.Problem(cp.Minimize(cp.square(t - a)), [t >= 0])
    layer = conic_layer(prob, [a], [t], solver_args=SCS_TIGHT)
    (ts,) = layer(as_tensor(1.5))
    assert ts.shape == () and abs(float(ts) - 1.5) < 1e-7
    at = as_tensor([1.5, -2.0, 0.25], grad=True)
    (tb,) = layer(at)
    assert tb.shape == (3,)
    assert torch.allclose(tb, torch.clamp(at, min=0).detach(), atol=1e-7)
    (g,) = torch.autograd.grad(tb.sum(), [at])
    assert torch.allclose(g, torch.tensor([1.0, 0.0, 1.0], dtype=DT), atol=1e-6)


# ----------------------------------------------------------------------------
# dtype, autograd mode, statelessness
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype):
    layer, (m, n) = _qp_layer()
    rng = np.random.default_rng(12)
    Q = as_tensor(rng.standard_normal((m, n)), grad=True, dtype=dtype)
    q = as_tensor(rng.standard_normal(m), grad=True, dtype=dtype)
    x, lam = layer(Q, q)
    assert x.dtype == dtype and lam.dtype == dtype
    gQ, gq = torch.autograd.grad(x.sum() + lam.sum(), [Q, q])
    assert gQ.dtype == dtype and gq.dtype == dtype


def test_mixed_precision_promotes_to_float64():
    layer, (m, n) = _qp_layer(solver_args=SCS_TIGHT)
    rng = np.random.default_rng(13)
    Q = as_tensor(rng.standard_normal((m, n)), grad=True, dtype=torch.float32)
    q = as_tensor(rng.standard_normal(m), grad=True, dtype=torch.float64)
    x, lam = layer(Q, q)
    assert x.dtype == torch.float64 and lam.dtype == torch.float64
    gQ, gq = torch.autograd.grad(x.sum(), [Q, q])
    assert gQ.dtype == torch.float32 and gq.dtype == torch.float64
    # Same answer as all-float64 with Q's float32 value.
    x64, _ = layer(Q.detach().double(), q.detach())
    assert (x.detach() - x64).abs().max() < 1e-9


def test_no_grad_outputs_do_not_require_grad():
    layer, (m, n) = _qp_layer(solver_args=SCS_TIGHT)
    rng = np.random.default_rng(14)
    Q = as_tensor(rng.standard_normal((m, n)), grad=True)
    q = as_tensor(rng.standard_normal(m), grad=True)
    with torch.no_grad():
        x, lam = layer(Q, q)
    assert not x.requires_grad and not lam.requires_grad
    x2, _ = layer(Q, q)
    assert x2.requires_grad
    assert (x - x2.detach()).abs().max() < 1e-12


def test_layer_never_writes_parameter_values_and_is_repeatable():
    n = 3
    a = cp.Parameter(n)
    b = cp.Parameter(n, value=np.full(n, 7.0))  # a stale value the layer must ignore
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + b @ x), [x >= -1, x <= 1])
    layer = conic_layer(prob, [a, b], [x], solver_args=SCS_TIGHT)
    at = as_tensor([0.3, -0.2, 2.0], grad=True)
    bt = as_tensor([0.1, 0.2, -0.3], grad=True)
    x1 = layer(at, bt)[0]
    g1 = torch.autograd.grad(x1.sum(), [at, bt])
    x2 = layer(at, bt)[0]
    g2 = torch.autograd.grad(x2.sum(), [at, bt])
    assert a.value is None
    np.testing.assert_array_equal(b.value, np.full(n, 7.0))
    assert torch.equal(x1, x2)
    assert all(torch.equal(u, v) for u, v in zip(g1, g2))
    # The tensors were used, not the stale value: x = clamp(a - b/2, -1, 1).
    assert (x1.detach() - torch.clamp(at - bt / 2, -1, 1).detach()).abs().max() < 1e-7


def test_two_layers_sharing_parameters_do_not_interfere():
    n = 3
    a = cp.Parameter(n)
    b = cp.Parameter(n)
    x = cp.Variable(n)
    prob1 = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + b @ x))
    prob2 = cp.Problem(cp.Minimize(cp.sum_squares(x - b)), [x >= a])
    l1 = conic_layer(prob1, [a, b], [x], solver_args=SCS_TIGHT)
    l2 = conic_layer(prob2, [b, a], [x], solver_args=SCS_TIGHT)  # other order, too
    rng = np.random.default_rng(15)
    av, bv = as_tensor(rng.standard_normal(n)), as_tensor(rng.standard_normal(n))
    ref1 = av - bv / 2
    ref2 = torch.maximum(bv, av)
    for _ in range(2):
        (x1,) = l1(av, bv)
        (x2,) = l2(bv, av)
        assert (x1 - ref1).abs().max() < 1e-7
        assert (x2 - ref2).abs().max() < 1e-7
    assert a.value is None and b.value is None


def test_layer_shared_across_threads_gives_the_sequential_answers():
    n = 3
    x = cp.Variable(n)
    p = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= 0, cp.sum(x) <= 1])
    args = dict(SCS_TIGHT)
    layer = conic_layer(prob, [p], [x], solver_args=args)
    rng = np.random.default_rng(18)
    batches = [as_tensor(rng.standard_normal((3, n)), grad=True) for _ in range(8)]

    def run(t):
        (xs,) = layer(t)
        (g,) = torch.autograd.grad((xs * xs).sum(), [t])
        return xs.detach(), g

    sequential = [run(t) for t in batches]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, batches))
    for (xa, ga), (xb, gb) in zip(sequential, parallel):
        assert torch.equal(xa, xb) and torch.equal(ga, gb)
    assert args == SCS_TIGHT  # the caller's solver_args are not edited (diffcp pops "eps")


# ----------------------------------------------------------------------------
# Geometric programs
# ----------------------------------------------------------------------------


def _gp_problem():
    x, y, z = (cp.Variable(pos=True) for _ in range(3))
    a, b, c = (cp.Parameter(pos=True) for _ in range(3))
    prob = cp.Problem(cp.Maximize(x * y * z),
                      [a * (x * y + x * z + y * z) <= b, x <= c * y, y <= 2 * x, z >= 0.5])
    assert prob.is_dgp(dpp=True)
    return prob, [a, b, c], [x, y, z]


def _check_gp_gradients(prob, params, outputs, vals, ts, got):
    """Gradients of w·outputs against central differences through `_gp_reference`."""
    w = np.array([0.7, -1.1, 0.9])
    grads = torch.autograd.grad((torch.from_numpy(w) * got).sum(), ts)
    h = 1e-5
    for k in range(len(vals)):
        e = np.zeros(len(vals))
        e[k] = h
        fd = (w @ _gp_reference(prob, params, outputs, vals + e)
              - w @ _gp_reference(prob, params, outputs, vals - e)) / (2 * h)
        assert abs(float(grads[k]) - fd) < 1e-4 * max(1.0, abs(fd)), (k, float(grads[k]), fd)


def _gp_reference(prob, params, variables, values):
    old = [p.value for p in params]
    try:
        for p, v in zip(params, values):
            p.value = float(v)
        # SCS's exact cone projections reach ~1e-12 here; Clarabel's exponential
        # cone stops near 1e-7, too coarse for finite differences.
        prob.solve(gp=True, solver=cp.SCS, **SCS_EXP)
        assert prob.status == "optimal"
        return np.array([v.value for v in variables], dtype=np.float64)
    finally:
        for p, v in zip(params, old):
            p.value = v


def test_geometric_program_matches_cvxpy_and_finite_differences():
    prob, params, variables = _gp_problem()
    layer = conic_layer(prob, params, variables, gp=True, solver_args=SCS_EXP)
    vals = np.array([2.0, 3.0, 0.8])  # c < 1: x <= c*y is active, the optimum asymmetric
    ts = [as_tensor(v, grad=True) for v in vals]
    out = layer(*ts)
    got = torch.stack(out)
    ref = _gp_reference(prob, params, variables, vals)
    assert np.abs(got.detach().numpy() - ref).max() < 1e-6
    assert all(p.value is None for p in params)

    _check_gp_gradients(prob, params, variables, vals, ts, got)


def test_geometric_program_parameter_as_exponent():
    """cvxpylayers' own GP example: ``c`` enters as an exponent, not in log space."""
    x, y, z = (cp.Variable(pos=True) for _ in range(3))
    a, b = cp.Parameter(pos=True), cp.Parameter(pos=True)
    c = cp.Parameter()
    prob = cp.Problem(cp.Minimize(1 / (x * y * z)),
                      [a * (x * y + x * z + y * z) <= b, x >= y ** c])
    layer = conic_layer(prob, [a, b, c], [x, y, z], gp=True, solver_args=SCS_EXP)
    vals = np.array([2.0, 1.0, 0.5])
    ts = [as_tensor(v, grad=True) for v in vals]
    got = torch.stack(layer(*ts))
    ref = _gp_reference(prob, [a, b, c], [x, y, z], vals)
    assert np.abs(got.detach().numpy() - ref).max() < 1e-6
    (gc,) = torch.autograd.grad(got.sum(), [ts[2]])
    h = 1e-5
    fd = (_gp_reference(prob, [a, b, c], [x, y, z], vals + [0, 0, h]).sum()
          - _gp_reference(prob, [a, b, c], [x, y, z], vals - [0, 0, h]).sum()) / (2 * h)
    assert abs(float(gc) - fd) < 1e-4 * max(1.0, abs(fd))


def test_geometric_program_parameter_as_coefficient_and_exponent():
    x, y, z = (cp.Variable(pos=True) for _ in range(3))
    a, b, c = (cp.Parameter(pos=True) for _ in range(3))
    prob = cp.Problem(cp.Minimize(1 / (x * y * z)),
                      [a * (x * y + x * z + y * z) <= b, x >= y ** c, c * x <= 3 * z])
    assert prob.is_dgp(dpp=True)
    layer = conic_layer(prob, [a, b, c], [x, y, z], gp=True, solver_args=SCS_EXP)
    vals = np.array([2.0, 1.0, 0.5])
    got = torch.stack(layer(*[as_tensor(v) for v in vals]))
    ref = _gp_reference(prob, [a, b, c], [x, y, z], vals)
    assert np.abs(got.numpy() - ref).max() < 1e-6


def _gp_dual_problem():
    """Two active constraints, so both duals are nonzero."""
    x, y, z = (cp.Variable(pos=True) for _ in range(3))
    a, b, c = (cp.Parameter(pos=True) for _ in range(3))
    area = a * (x * y + x * z + y * z) <= b
    ratio = x <= c * y
    prob = cp.Problem(cp.Minimize(1 / (x * y * z)), [area, ratio, z <= 2 * x])
    assert prob.is_dgp(dpp=True)
    return prob, [a, b, c], [x, area.dual_variables[0], ratio.dual_variables[0]]


def test_geometric_program_duals_are_cvxpys_and_their_gradients_central_differences():
    """A GP's dual variables are, as CVXPY defines them, its log-space problem's duals."""
    prob, params, outputs = _gp_dual_problem()
    layer = conic_layer(prob, params, outputs, gp=True, solver_args=SCS_EXP)
    vals = np.array([2.0, 3.0, 0.8])
    ts = [as_tensor(v, grad=True) for v in vals]
    got = torch.stack(layer(*ts))
    ref = _gp_reference(prob, params, outputs, vals)
    assert np.abs(got.detach().numpy() - ref).max() < 1e-6
    assert (np.abs(ref[1:]) > 0.05).all()  # both constraints active
    _check_gp_gradients(prob, params, outputs, vals, ts, got)


def test_geometric_program_duals_with_auxiliary_log_space_constraints():
    """pf_eigenvalue adds a constraint in log space: the duals still line up."""
    X = cp.Variable((2, 2), pos=True)
    a = cp.Parameter(pos=True)
    cons = [X[0, 0] >= a, X[0, 1] * X[1, 0] >= 0.5, X[1, 1] >= 0.3 * a]
    prob = cp.Problem(cp.Minimize(cp.pf_eigenvalue(X)), cons)
    target, _ = cp.reductions.Dgp2Dcp(prob).apply(prob)
    assert len(target.constraints) > len(cons)
    outputs = [X] + [con.dual_variables[0] for con in cons]
    layer = conic_layer(prob, [a], outputs, gp=True, solver_args=SCS_EXP)
    got = layer(as_tensor(1.5))
    a.value = 1.5
    try:
        prob.solve(gp=True, solver=cp.SCS, **SCS_EXP)
        ref = [X.value] + [con.dual_value for con in cons]
    finally:
        a.value = None
    for g, r in zip(got, ref):
        assert np.abs(g.numpy() - r).max() < 1e-6
    assert min(abs(float(con.dual_value)) for con in cons) > 1e-2


def test_geometric_program_batched_duals_at_default_settings():
    prob, params, outputs = _gp_dual_problem()
    layer = conic_layer(prob, params, outputs, gp=True)
    vals = np.array([[2.0, 3.0, 0.8], [1.0, 4.0, 0.5], [3.0, 2.0, 0.9]])
    got = torch.stack(layer(*[as_tensor(vals[:, k]) for k in range(3)]), dim=1)
    for i in range(3):
        ref = _gp_reference(prob, params, outputs, vals[i])
        assert np.abs(got[i].numpy() - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


# ----------------------------------------------------------------------------
# Solver choice
# ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Solved/Inaccurate")  # diffcp's own, beside ours
def test_call_solver_args_override_the_layer_defaults():
    layer, (m, n) = _qp_layer(solver_args=SCS_TIGHT)
    rng = np.random.default_rng(17)
    Q, q = as_tensor(rng.standard_normal((m, n))), as_tensor(3 * rng.standard_normal(m))
    (x_full, _), info = layer(Q, q, return_info=True)
    assert info.status == (Status.OPTIMAL,) and info.iterations[0] > 3
    # 175 of SCS's 200 iterations: an iterate within max_iter's limits.
    with pytest.warns(UserWarning, match="max_iter"):
        (x_cut, _), info = layer(Q, q, solver_args={"max_iters": 175}, return_info=True)
    assert info.status == (Status.MAX_ITER,) and info.iterations[0] == 175
    assert (x_cut - x_full).abs().max() > 1e-6  # the cut-short iterate really differs
    (x_again, _) = layer(Q, q)  # the override did not stick to the layer
    assert torch.equal(x_again, x_full)


def _mixed_cone_problem():
    """LP rows, a second-order cone and exponential cones in one problem."""
    n = 3
    A = cp.Parameter((4, n))
    b = cp.Parameter(4)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.norm(A @ x - b, 2) + cp.sum(cp.exp(x)) - x[0]),
                      [x <= 1, cp.sum(x) >= -2])
    return prob, [A, b], x


ECOS_TIGHT = {"abstol": 1e-10, "reltol": 1e-10, "feastol": 1e-10}


@pytest.mark.parametrize("kw", [
    dict(solver="ECOS", solver_args=ECOS_TIGHT),
    dict(solver="CLARABEL", solver_args={k: v for k, v in CLARABEL_ARGS.items()
                                         if k != "solve_method"}),
    dict(solver_args=CLARABEL_ARGS),
    dict(solver_args={"solve_method": "ECOS", **ECOS_TIGHT}),
], ids=["ECOS", "CLARABEL", "solve_method=Clarabel", "solve_method=ECOS"])
def test_solvers_agree_with_scs(kw):
    prob, params, x = _mixed_cone_problem()
    rng = np.random.default_rng(16)
    vals = [as_tensor(rng.standard_normal((4, 3)), grad=True),
            as_tensor(rng.standard_normal(4), grad=True)]
    scs = conic_layer(prob, params, [x], solver="SCS", solver_args=SCS_TIGHT)
    other = conic_layer(prob, params, [x], **kw)
    (x_scs,), info_scs = scs(*vals, return_info=True)
    (x_o,), info_o = other(*vals, return_info=True)
    assert info_scs.ok and info_o.ok
    ref = reference_solve(prob, params, [v.detach().numpy() for v in vals], [x])[0]
    assert np.abs(x_scs.detach().numpy() - ref).max() < 1e-6
    assert (x_scs - x_o).abs().max() < 1e-6
    w = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    g_scs = weighted_grads([x_scs], vals, [w])
    g_o = weighted_grads([x_o], vals, [w])
    for u, v in zip(g_scs, g_o):
        assert (u - v).abs().max() < 1e-5


# ----------------------------------------------------------------------------
# Status policy: a returned point is within its status's limits, or a failure
# ----------------------------------------------------------------------------


def _box_projection_layer():
    y, z = cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [z >= 0, z <= 1])
    return conic_layer(prob, [y], [z]), y


def _sqrt_layer():
    a, u = cp.Parameter(), cp.Variable()
    return conic_layer(cp.Problem(cp.Minimize(-cp.sqrt(u)), [u >= a]), [a], [u])


UNUSABLE = {
    # SCS stops at max_iters on (−663545, 1.001): 1e3 times suboptimal.
    "huge-data": (lambda: _box_projection_layer()[0], [1e30, 0.5], {}),
    # Unbounded below without a ray: SCS returned u = 6.7e6 as optimal_inaccurate.
    "unbounded-no-ray": (_sqrt_layer, 1.0, {}),
    # Five iterations: 74 % infeasible, reported max_iter.
    "five-iterations": (lambda: _box_projection_layer()[0], [2.0, -0.5], {"max_iters": 5}),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_an_unusable_point_is_a_failure_never_a_warning(case):
    make, value, args = UNUSABLE[case]
    layer = make()
    v = as_tensor(value, grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no max_iter/inaccurate warning of ours
        warnings.filterwarnings("ignore", message="Solved/Inaccurate")  # diffcp's own
        (out,), info = layer(v, solver_args=args, on_failure="mask", return_info=True)
        with pytest.raises(SolverError):
            layer(v, solver_args=args)
    status = info.status[0]
    assert status in (Status.NUMERICAL_ERROR, Status.UNBOUNDED), status
    assert torch.isnan(out).all()
    measures = info.residuals[0]
    limits = conic.ACCURACY[Status.MAX_ITER]
    assert max(measures[:2]) > limits.residual or measures[2] > limits.gap
    (g,) = torch.autograd.grad(torch.nan_to_num(out).sum(), v)
    assert (g == 0).all()


def _judged(status, A, b, c, x, y, s):
    A = sp.csc_matrix(np.asarray(A, dtype=np.float64))
    b, c, x, y, s = (np.asarray(v, dtype=np.float64) for v in (b, c, x, y, s))
    return conic.judge(status, conic._residuals(A, b, c, x, y, s), A, b, c, x, y, s)


def test_status_judgement_per_status_and_certificates():
    """`judge` on hand-made points (SCS form: Ax + s = b, s ≥ 0; Aᵀy + c = 0)."""
    # min x s.t. x ≥ −1: x = −1, s = 0, y = 1 is optimal.
    one = ([[-1.0]], [1.0], [1.0])
    assert _judged(Status.OPTIMAL, *one, [-1], [1], [0]) is Status.OPTIMAL
    # y 0.5 % off: beyond optimal's limits, within the usable ones.
    assert _judged(Status.OPTIMAL, *one, [-1], [1.005], [0]) is Status.OPTIMAL_INACCURATE
    assert _judged(Status.MAX_ITER, *one, [-1], [1.005], [0]) is Status.MAX_ITER
    # y 50 % off: no approximate solution, and no certificate either.
    assert _judged(Status.MAX_ITER, *one, [-1], [1.5], [0]) is Status.NUMERICAL_ERROR
    # min x₁ s.t. x₁ + x₂ ≥ −1 is unbounded: x = (−1e8, 1e8 − 1) is a ray.
    ray = ([[-1.0, -1.0]], [1.0], [1.0, 0.0])
    assert _judged(Status.OPTIMAL_INACCURATE, *ray, [-1e8, 1e8 - 1], [1], [0]) \
        is Status.UNBOUNDED
    # x ≥ 1 and x ≤ 0 is infeasible: y = (1e8, 1e8) ≥ 0 has Aᵀy = 0, bᵀy < 0.
    clash = ([[-1.0], [1.0]], [-1.0, 0.0], [0.0])
    assert _judged(Status.MAX_ITER, *clash, [0.5], [1e8, 1e8], [0, 0]) is Status.INFEASIBLE


def test_the_documented_status_limits_are_the_ones_applied():
    doc = conic.__doc__
    for status, limits in conic.ACCURACY.items():
        def short(v):
            return f"{v:.0e}".replace("e-0", "e-")

        line = (f"{status.value:<20}residuals ≤ {short(limits.residual)}, "
                f"suboptimality bound ≤ {short(limits.gap)}")
        assert line in doc, line


# ----------------------------------------------------------------------------
# Optional solvers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("solver, package", [("ECOS", "ecos"), ("CLARABEL", "clarabel")])
def test_a_missing_solver_package_is_named_at_construction_and_at_call(monkeypatch, solver,
                                                                        package):
    monkeypatch.setattr(conic, "_importable", lambda name: name != package)
    prob, params, outputs = _soc_dual_problem()
    with pytest.raises(ImportError, match=rf"(?i){solver}'.*pip install {package}") as err:
        conic_layer(prob, params, outputs, solver=solver)
    assert "not installed" in str(err.value)
    layer = conic_layer(prob, params, outputs)
    with pytest.raises(ImportError, match=rf"pip install {package}"):
        layer(as_tensor([0.5, 0.3, -0.2]), as_tensor(2.0),
              solver_args={"solve_method": solver.capitalize()})


# ----------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------


def _endless_problem():
    """x ≥ p, Σx ≤ r with Σp = r − 1e-9 and eps = 1e-14: SCS iterates until stopped."""
    n = 6
    p, r, x = cp.Parameter(n), cp.Parameter(), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= p, cp.sum(x) <= r])
    # The time limit only bounds a failing test; the interrupt comes long before.
    args = {"eps": 1e-14, "max_iters": 10**9, "time_limit": 60.0}
    pv = np.linspace(-1.0, 1.0, n) / 3 + 1.0 / n
    return conic_layer(prob, [p, r], [x], solver_args=args), pv, pv.sum() - 1e-9


def _interrupt_after(seconds):
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test's duration. A process started in the
    background by a shell without job control (nohup, `cmd &` in a script) inherits
    SIGINT ignored, and then SCS rightly restores "ignored" after its solve; what
    this test checks is that the process's handler, whatever it was, comes back."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.watchdog(90)
@pytest.mark.parametrize("batch", [1, 3], ids=["serial", "thread-pool"])
@pytest.mark.parametrize("on_failure", ["raise", "mask"])
def test_ctrl_c_during_a_solve_raises_keyboard_interrupt(batch, on_failure, python_sigint):
    """SCS catches SIGINT and stops with status 'interrupted': that is the user's Ctrl-C,
    never a per-sample failure that on_failure='mask' would swallow."""
    layer, pv, r = _endless_problem()
    p = as_tensor(np.tile(pv, (batch, 1)) if batch > 1 else pv, grad=True)
    rt = as_tensor(np.full(batch, r) if batch > 1 else r)
    timer = _interrupt_after(0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            layer(p, rt, on_failure=on_failure)
    finally:
        timer.cancel()
    # The process still takes Ctrl-C the Python way, and the layer still solves.
    timer = _interrupt_after(0.05)
    try:
        with pytest.raises(KeyboardInterrupt):
            time.sleep(5)
    finally:
        timer.cancel()
    (x,), info = layer(p, rt + 1.0, solver_args={"eps": 1e-8}, return_info=True)
    assert info.ok and torch.isfinite(x).all()
