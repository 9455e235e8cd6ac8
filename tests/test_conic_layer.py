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
from concurrent.futures import ThreadPoolExecutor

import cvxpy as cp
import numpy as np
import pytest
import torch
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

from declarative import Status

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


def _sparsemax(theta: torch.Tensor) -> torch.Tensor:
    """Sort-based sparsemax (Martins & Astudillo, 2016) of a vector."""
    zs, _ = torch.sort(theta, descending=True)
    k = torch.arange(1, theta.numel() + 1, dtype=theta.dtype)
    cs = zs.cumsum(0)
    kz = int((1 + k * zs > cs).sum())
    tau = (cs[kz - 1] - 1) / kz
    return torch.clamp(theta - tau, min=0), tau


def test_sparsemax_matches_sort_based_closed_form_and_jacobian():
    n = 5
    theta = cp.Parameter(n)
    z = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - theta)), [cp.sum(z) == 1, z >= 0])
    layer = conic_layer(prob, [theta], [z], solver_args=SCS_TIGHT)

    th = as_tensor([1.2, 0.9, 0.1, -0.4, 0.7], grad=True)
    z_ref, tau = _sparsemax(th.detach())
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


def test_symmetric_parameter_gets_symmetric_gradient_of_the_closed_form():
    """A ``symmetric=True`` Parameter is lowered to its triangle; the gradient stays exact."""
    n = 3
    P = cp.Parameter((n, n), symmetric=True)
    X = cp.Variable((n, n), PSD=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - P)))
    layer = conic_layer(prob, [P], [X], solver_args=SCS_TIGHT)
    M = torch.tensor([[1.0, 0.3, -0.5], [0.3, -1.5, 0.4], [-0.5, 0.4, 0.8]], dtype=DT)
    Pt = M.clone().requires_grad_(True)

    def closed_form(P_):
        evals, evecs = torch.linalg.eigh((P_ + P_.T) / 2)
        return evecs @ torch.diag(evals.clamp(min=0)) @ evecs.T

    (X_star,) = layer(Pt)
    X_ref = closed_form(Pt)
    assert (X_star - X_ref).abs().max() < 1e-8
    W = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(7))
    (g,) = torch.autograd.grad((W * X_star).sum(), [Pt])
    (g_ref,) = torch.autograd.grad((W * X_ref).sum(), [Pt])
    assert (g - g.T).abs().max() < 1e-10
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

    w = np.array([0.7, -1.1, 0.9])
    grads = torch.autograd.grad((torch.from_numpy(w) * got).sum(), ts)
    h = 1e-5
    for k in range(3):
        e = np.zeros(3)
        e[k] = h
        fd = (w @ _gp_reference(prob, params, variables, vals + e)
              - w @ _gp_reference(prob, params, variables, vals - e)) / (2 * h)
        assert abs(float(grads[k]) - fd) < 1e-4 * max(1.0, abs(fd)), (k, float(grads[k]), fd)


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


@pytest.mark.watchdog(90)
@pytest.mark.parametrize("batch", [1, 3], ids=["serial", "thread-pool"])
@pytest.mark.parametrize("on_failure", ["raise", "mask"])
def test_ctrl_c_during_a_solve_raises_keyboard_interrupt(batch, on_failure):
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
