"""The entropy and simplex paths: softmax, sparsemax, entropic transport, constrained softmax.

The seed's section 4.1 first: its KKT system (3) is built in torch at a
softmax solution and differentiated by the implicit function theorem, and
the layer's Jacobian is checked against what that gives, diag(z) − z zᵀ.
Every other derivative is checked against something the path does not
compute: autograd of a closed form written here (torch.softmax, a sort-based
sparsemax), central finite differences by re-solving, another backend on the
same problem (the exponential-cone path through diffcp, the QP engine), or
``torch.autograd.gradcheck`` in float64. Forward references: torch.softmax,
the sort-based projection (itself checked against its KKT conditions),
log-domain Sinkhorn, Clarabel through CVXPY and SCS through diffcp.

Conic tolerances: exponential-cone problems run SCS at eps 1e-10 (it stalls
short of 1e-12), the sparsemax QP at eps 1e-12; agreement is asserted at 1e-8
on solutions and 1e-6 on gradients. Measured: solutions ≤ 6e-11, gradients
≤ 5e-8 (transport), the rest of the gap being SCS's. Clarabel is not used as an
exponential-cone reference: at tolerance 1e-10 its solutions are still ~2e-6
off (a flat objective); ECOS at 1e-9 is within ~1e-8.
"""

import warnings

import cvxpy as cp
import entropy_reference
import numpy as np
import pytest
import torch
from helpers import (
    SCS_EXP,
    SCS_TIGHT,
    as_tensor,
    central_differences,
    conic_layer,
    directional_difference,
    reference_solve,
    weighted_grads,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from references import log_sinkhorn as _sinkhorn
from references import simplex_projection as _sparsemax_ref
from references import sparsemax as _sparsemax_torch
from references import sparsemax_jacobian as _sparsemax_jacobian

from declarative import SolverError, Status
from declarative.torch import CvxpyLayer

DT = torch.float64
CONIC_X_TOL = 1e-8  # |path − conic| on solutions, with SCS at the eps above
CONIC_G_TOL = 1e-6  # ... and on gradients (diffcp's derivative at that solution)
GRADCHECK = dict(eps=1e-6, atol=1e-6, rtol=1e-5)





def _weights(shape, seed):
    return torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _solve(layer, *args, **kw):
    """Call the layer, insisting that every sample is solved to full accuracy."""
    out, info = layer(*args, return_info=True, **kw)
    assert all(s is Status.OPTIMAL for s in info.status), info.status
    return out, info


# ----------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------


def _softmax_problem(n, tau=1.0, spelling="entr"):
    """maximize θᵀz + τ·H(z) s.t. 1ᵀz = 1, in the spellings users write."""
    theta = cp.Parameter(n)
    z = cp.Variable(n)
    H = cp.sum(cp.entr(z))
    cons = [cp.sum(z) == 1]
    if spelling == "entr":
        obj = cp.Maximize(theta @ z + tau * H)
    elif spelling == "rel_entr":
        obj = cp.Maximize(theta @ z - tau * cp.sum(cp.rel_entr(z, 1)))
    elif spelling == "minimize_negation":
        obj = cp.Minimize(-theta @ z - tau * H)
    elif spelling == "explicit_nonneg":
        obj = cp.Maximize(theta @ z + tau * H)
        cons = cons + [z >= 0]
    elif spelling == "explicit_nonneg_reversed":
        obj = cp.Maximize(tau * H + z @ theta)
        cons = [0 <= z, 1 == cp.sum(z)]
    else:
        raise ValueError(spelling)
    return cp.Problem(obj, cons), theta, z


def _sparsemax_problem(n, radius=1.0):
    y = cp.Parameter(n)
    z = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == radius, z >= 0])
    return prob, y, z


def _transport_problem(r, c, tau=1.0, rows_first=True):
    """maximize −⟨C, Z⟩ + τ·H(Z) s.t. Z1 = a, Zᵀ1 = b (Z ≥ 0 implied by entr)."""
    C = cp.Parameter((r, c))
    a = cp.Parameter(r)
    b = cp.Parameter(c)
    Z = cp.Variable((r, c))
    rows, cols = cp.sum(Z, axis=1) == a, cp.sum(Z, axis=0) == b
    prob = cp.Problem(cp.Maximize(-cp.sum(cp.multiply(C, Z)) + tau * cp.sum(cp.entr(Z))),
                      [rows, cols] if rows_first else [cols, rows])
    return prob, (C, a, b), Z


# A constant with mixed signs, so the constrained softmax is not a transport in disguise.
A_GENERAL = np.array([[1.0, -1.0, 0.0, 2.0, 0.0],
                      [0.0, 1.0, 1.0, -1.0, 1.0]])


def _general_problem(tau=1.0):
    """Constrained softmax: maximize θᵀz + τ·H(z) s.t. 1ᵀz = 1, A z = b (A constant)."""
    n = A_GENERAL.shape[1]
    theta = cp.Parameter(n)
    b = cp.Parameter(A_GENERAL.shape[0])
    z = cp.Variable(n)
    prob = cp.Problem(cp.Maximize(theta @ z + tau * cp.sum(cp.entr(z))),
                      [cp.sum(z) == 1, A_GENERAL @ z == b])
    return prob, theta, b, z


def _general_data(rng, B=None):
    """θ and a b = A z₀ for an interior z₀ of the simplex (so the problem is feasible)."""
    shape = () if B is None else (B,)
    n = A_GENERAL.shape[1]
    z0 = rng.dirichlet(np.ones(n), size=shape or None)
    return rng.standard_normal(shape + (n,)), z0 @ A_GENERAL.T


def _ot_data(rng, r, c, B=None):
    """Costs in [0, 1) and strictly positive marginals with equal totals."""
    shape = () if B is None else (B,)
    C = rng.random(shape + (r, c))
    a = rng.random(shape + (r,)) + 0.1
    b = rng.random(shape + (c,)) + 0.1
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    return C, a, b


# ----------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------


def _exp_cone_reference(problem, parameters, values, variable):
    """CVXPY + ECOS at tight tolerances (Clarabel stops ~1e-6 short on these exp cones)."""
    old = [p.value for p in parameters]
    try:
        for p, v in zip(parameters, values):
            p.value = np.asarray(v, dtype=np.float64)
        problem.solve(solver=cp.ECOS, abstol=1e-9, reltol=1e-9, feastol=1e-9,
                      max_iters=200)
        assert problem.status == "optimal", problem.status
        return np.array(variable.value)
    finally:
        for p, v in zip(parameters, old):
            p.value = v


# ----------------------------------------------------------------------------
# 1. The seed's derivation (section 4.1, equations (1)–(9))
# ----------------------------------------------------------------------------


def _kkt_F(theta, x):
    """F(θ, z, u, v) of the seed's equation (3); x = (z, u, v), size 2n + 1."""
    n = theta.shape[0]
    z, u, v = x[:n], x[n], x[n + 1:]
    return torch.cat([theta - torch.log(z) - 1.0 + u + v,  # stationarity
                      (u * (z.sum() - 1.0)).reshape(1),  # primal feasibility (equality)
                      v * z])  # complementary slackness


def _seed_solution(theta):
    """(z, u, v) solving (3): z = softmax(θ); v = 0 since z > 0; u from stationarity."""
    z = torch.softmax(theta, 0)
    v = torch.zeros_like(z)
    u = (torch.log(z) + 1.0 - theta).mean()  # θ − log z − 1 + u1 = 0 (every entry equal)
    return z, u, v


def _seed_kkt_jacobians(theta):
    """dF/dx and dF/dθ at the solution, by autograd of F."""
    z, u, v = _seed_solution(theta)
    x = torch.cat([z, u.reshape(1), v])
    Jx = torch.autograd.functional.jacobian(lambda x_: _kkt_F(theta, x_), x)
    Jt = torch.autograd.functional.jacobian(lambda t_: _kkt_F(t_, x), theta)
    return Jx, Jt, (z, u, v)


def _seed_ift_jacobian(theta):
    """−[dF/dx]⁻¹ dF/dθ at the solution: the derivative of x = (z, u, v) in θ."""
    Jx, Jt, zuv = _seed_kkt_jacobians(theta)
    return -torch.linalg.solve(Jx, Jt), Jx, zuv


def test_seed_kkt_system_gives_softmax_jacobian():
    n = 5
    theta = as_tensor(np.random.default_rng(0).standard_normal(n))
    D, Jx, (z, u, v) = _seed_ift_jacobian(theta)
    x = torch.cat([z, u.reshape(1), v])

    # Step 3 of the recipe: F(θ, x) = 0 and dF/dx is nonsingular. u = 1 − logsumexp(θ)
    # is not 0 here; at u = 0 the second row of (4) would vanish.
    assert _kkt_F(theta, x).abs().max() < 1e-14
    assert abs(float(u) - (1.0 - float(torch.logsumexp(theta, 0)))) < 1e-14
    assert abs(float(u)) > 0.1
    assert float(torch.linalg.svdvals(Jx).min()) > 1e-3

    # Autograd's dF/dx is the seed's matrix (4), whose first block row is written
    # for −F₁ (diag(z)⁻¹, −1, −I).
    I, one = torch.eye(n, dtype=DT), torch.ones(n, 1, dtype=DT)
    eq4 = torch.cat([
        torch.cat([torch.diag(1 / z), -one, -I], 1),
        torch.cat([u * one.T, (z.sum() - 1).reshape(1, 1), torch.zeros(1, n, dtype=DT)], 1),
        torch.cat([torch.diag(v), torch.zeros(n, 1, dtype=DT), torch.diag(z)], 1),
    ], 0)
    flip = torch.diag(torch.cat([-torch.ones(n, dtype=DT), torch.ones(n + 1, dtype=DT)]))
    assert (Jx - flip @ eq4).abs().max() < 1e-12

    # Step 4: the top-left block of −[dF/dx]⁻¹ dF/dθ is diag(z) − z zᵀ.
    assert (D[:n] - (torch.diag(z) - torch.outer(z, z))).abs().max() < 1e-12
    assert (D[n] + z).abs().max() < 1e-12  # du/dθ = −zᵀ, as u = 1 − logsumexp(θ)
    assert D[n + 1:].abs().max() < 1e-12  # v stays 0 near the solution


def test_layer_jacobian_equals_the_seed_ift_jacobian():
    n = 5
    theta = as_tensor(np.random.default_rng(0).standard_normal(n))
    prob, th, z = _softmax_problem(n)
    layer = CvxpyLayer(prob, [th], [z])
    assert layer.backend == "entropy"
    D, _, (z_seed, _, _) = _seed_ift_jacobian(theta)
    J = torch.autograd.functional.jacobian(lambda t: layer(t)[0], theta)
    assert (layer(theta)[0] - z_seed).abs().max() < 1e-15
    assert (J - D[:n]).abs().max() < 1e-12
    assert J.abs().max() > 0.05


def test_seed_system_is_singular_at_u_zero_but_the_layer_is_not():
    """Writing feasibility as u(zᵀ1 − 1) makes (4) singular where u = 1 − logsumexp(θ) = 0
    (the seed's "u > 0" does not hold in general); softmax itself is smooth there."""
    n = 5
    theta = as_tensor(np.random.default_rng(0).standard_normal(n))
    theta = theta - torch.logsumexp(theta, 0) + 1.0  # a shift: same softmax, u = 0
    Jx, _, (z, u, _) = _seed_kkt_jacobians(theta)
    assert abs(float(u)) < 1e-14
    assert float(torch.linalg.svdvals(Jx).min()) < 1e-12
    prob, th, zv = _softmax_problem(n)
    layer = CvxpyLayer(prob, [th], [zv])
    J = torch.autograd.functional.jacobian(lambda t: layer(t)[0], theta)
    assert (J - (torch.diag(z) - torch.outer(z, z))).abs().max() < 1e-12


def test_layer_jacobian_with_temperature_is_block_diagonal_over_the_batch():
    n, B, tau = 4, 3, 0.5
    prob, th, z = _softmax_problem(n, tau=tau)
    layer = CvxpyLayer(prob, [th], [z])
    theta = as_tensor(np.random.default_rng(1).standard_normal((B, n)))
    J = torch.autograd.functional.jacobian(lambda t: layer(t)[0], theta)  # (B, n, B, n)
    for i in range(B):
        for j in range(B):
            if i == j:
                s = torch.softmax(theta[i] / tau, 0)
                ref = (torch.diag(s) - torch.outer(s, s)) / tau
            else:
                ref = torch.zeros(n, n, dtype=DT)
            assert (J[i, :, j] - ref).abs().max() < 1e-12


def test_dual_newton_on_the_softmax_structure_matches_the_seed_formula():
    """sum(z) == s with s a Parameter leaves the closed form: dual Newton and its IFT backward."""
    n, tau = 5, 0.7
    theta = cp.Parameter(n)
    s = cp.Parameter()
    z = cp.Variable(n)
    prob = cp.Problem(cp.Maximize(theta @ z + tau * cp.sum(cp.entr(z))), [cp.sum(z) == s])
    layer = CvxpyLayer(prob, [theta, s], [z])
    assert layer.backend == "entropy" and layer.compiled.form("entropy").program.kind == "general"

    th = as_tensor(np.random.default_rng(2).standard_normal(n))
    sv = as_tensor(1.7)
    (z_star,), _ = _solve(layer, th, sv)
    p = torch.softmax(th / tau, 0)
    assert (z_star - sv * p).abs().max() < 1e-13
    Jt, Js = torch.autograd.functional.jacobian(lambda a, b_: layer(a, b_)[0], (th, sv))
    assert (Jt - sv * (torch.diag(p) - torch.outer(p, p)) / tau).abs().max() < 1e-12
    assert (Js - p).abs().max() < 1e-12


# ----------------------------------------------------------------------------
# 2. Softmax: the closed form under every spelling
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["entr", "rel_entr", "minimize_negation",
                                      "explicit_nonneg", "explicit_nonneg_reversed"])
def test_softmax_spellings_route_to_the_closed_form(spelling):
    n, tau = 6, 0.8
    prob, th, z = _softmax_problem(n, tau=tau, spelling=spelling)
    layer = CvxpyLayer(prob, [th], [z])
    assert layer.backend == "entropy"
    program = layer.compiled.form("entropy").program
    assert program.kind == "softmax" and program.tau == pytest.approx(tau, rel=1e-15)

    theta = as_tensor(np.random.default_rng(3).standard_normal((4, n)), grad=True)
    (z_star,), info = _solve(layer, theta)
    assert info.backend == "entropy"
    ref = torch.softmax(theta / tau, -1)
    assert (z_star - ref).abs().max() < 1e-12
    w = _weights((4, n), 0)
    (g,) = weighted_grads([z_star], [theta], [w])
    (g_ref,) = weighted_grads([ref], [theta], [w])
    assert (g - g_ref).abs().max() < 1e-12


def test_softmax_extreme_and_equal_logits_match_torch_softmax():
    n = 5
    prob, th, z = _softmax_problem(n)
    layer = CvxpyLayer(prob, [th], [z])
    theta = as_tensor([[1e4, -1e4, 0.0, 1e4, 3.0],  # two tied winners at 1e4
                [-1e4, -1e4, -1e4, -1e4 + 2.0, -1e4],  # all far below zero
                [2.5, 2.5, 2.5, 2.5, 2.5],  # equal logits: the uniform distribution
                [1e4, 1e4 - 1.0, -3.0, 0.0, 1e4 - 0.5],  # large, with O(1) differences
                [0.0, 0.0, 0.0, 0.0, 1e-9]], grad=True)
    (z_star,), _ = _solve(layer, theta)
    ref = torch.softmax(theta, -1)
    assert torch.isfinite(z_star).all()
    assert (z_star - ref).abs().max() < 1e-12
    assert (z_star[2] - 1.0 / n).abs().max() < 1e-15
    assert (z_star[0] - as_tensor([0.5, 0, 0, 0.5, 0])).abs().max() < 1e-15
    w = _weights(theta.shape, 1)
    (g,) = weighted_grads([z_star], [theta], [w])
    (g_ref,) = weighted_grads([ref], [theta], [w])
    assert torch.isfinite(g).all()
    assert (g - g_ref).abs().max() < 1e-12


def test_softmax_temperature_1e_3():
    """θᵀz + τ·sum(entr(z)) with τ = 1e-3 is softmax(θ/τ): nearly argmax, still smooth."""
    n, tau = 6, 1e-3
    prob, th, z = _softmax_problem(n, tau=tau)
    layer = CvxpyLayer(prob, [th], [z])
    rng = np.random.default_rng(4)
    # Logits 1e-3 apart keep the answer away from one-hot, so the Jacobian is not ~0.
    theta = as_tensor(np.stack([rng.standard_normal(n),
                         0.3 + tau * rng.standard_normal(n)]), grad=True)
    (z_star,), _ = _solve(layer, theta)
    ref = torch.softmax(theta / tau, -1)
    assert (z_star - ref).abs().max() < 1e-12
    assert z_star[0].max() > 1 - 1e-12  # the argmax, to working precision
    J = torch.autograd.functional.jacobian(lambda t: layer(t)[0][1], theta)[:, 1]
    s = ref[1].detach()
    assert (J - (torch.diag(s) - torch.outer(s, s)) / tau).abs().max() < 1e-9
    assert J.abs().max() > 10.0


def test_softmax_masked_entries_minus_inf():
    n = 5
    prob, th, z = _softmax_problem(n)
    layer = CvxpyLayer(prob, [th], [z])
    ninf = -float("inf")
    theta = as_tensor([[1.0, ninf, 0.5, 2.0, ninf],
                [ninf, ninf, ninf, 0.0, ninf]], grad=True)  # one entry left: one-hot
    (z_star,), _ = _solve(layer, theta)
    ref = torch.softmax(theta, -1)
    assert (z_star - ref).abs().max() < 1e-12
    w = _weights(theta.shape, 2)
    (g,) = weighted_grads([z_star], [theta], [w])
    (g_ref,) = weighted_grads([ref], [theta], [w])
    assert (g - g_ref).abs().max() < 1e-12


def test_softmax_with_a_nonneg_variable():
    n = 4
    theta = cp.Parameter(n)
    z = cp.Variable(n, nonneg=True)
    prob = cp.Problem(cp.Maximize(theta @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1])
    layer = CvxpyLayer(prob, [theta], [z])
    th = as_tensor(np.random.default_rng(5).standard_normal(n))
    (z_star,), _ = _solve(layer, th)
    assert (z_star - torch.softmax(th, 0)).abs().max() < 1e-12


# ----------------------------------------------------------------------------
# 3. Sparsemax and its relatives (the simplex path)
# ----------------------------------------------------------------------------


def test_sparsemax_matches_the_sort_based_closed_form():
    n, B = 7, 12
    prob, y, z = _sparsemax_problem(n)
    layer = CvxpyLayer(prob, [y], [z])
    assert layer.backend == "simplex"
    y_v = np.random.default_rng(6).standard_normal((B, n)) * np.geomspace(0.01, 10.0, B)[:, None]
    refs = [_sparsemax_ref(row) for row in y_v]
    sizes = {int(s.sum()) for _, _, s in refs}
    assert min(sizes) == 1 and max(sizes) == n and len(sizes) >= 4  # one-hot to dense
    (z_star,), _ = _solve(layer, as_tensor(y_v))
    for i, (z_ref, _, _) in enumerate(refs):
        assert np.abs(z_star[i].numpy() - z_ref).max() < 1e-12


def test_sparsemax_jacobian_is_support_restricted_centering():
    n = 6
    prob, y, z = _sparsemax_problem(n)
    layer = CvxpyLayer(prob, [y], [z])
    y_v = np.array([1.2, 0.9, 0.1, -0.4, 0.6, 0.85])
    z_ref, t, support = _sparsemax_ref(y_v)
    assert np.abs(y_v - t).min() > 0.04  # no entry near the support's edge
    assert 1 < support.sum() < n
    yt = as_tensor(y_v)
    J = torch.autograd.functional.jacobian(lambda a: layer(a)[0], yt)
    assert (J - _sparsemax_jacobian(support)).abs().max() < 1e-12
    # ... and autograd through the torch closed form says the same.
    J_auto = torch.autograd.functional.jacobian(_sparsemax_torch, yt)
    assert (J - J_auto).abs().max() < 1e-12


TIES = [
    [1.5, 0.5, 0.0, -1.0, -2.0],  # t = 0.5 = y₁: one entry at the threshold
    [1.0, 0.5, 0.25, 0.25, -1.0],  # t = 0.25 = y₂ = y₃: two of them
    [0.0, 0.0, 1.0, 0.0, 0.0],  # one-hot: t = 0, every other entry at it
    [3.0, 0.0, 0.0, 0.0, 0.0],  # scaled one-hot: t = 2, no tie
    [0.2, 0.2, 0.2, 0.2, 0.2],  # equal entries: z = y, all in the support
]


@pytest.mark.parametrize("row", TIES)
def test_sparsemax_ties_and_one_hot(row):
    n = len(row)
    prob, y, z = _sparsemax_problem(n)
    layer = CvxpyLayer(prob, [y], [z])
    y_v = np.array(row)
    z_ref, t, support = _sparsemax_ref(y_v)
    yt = as_tensor(y_v)
    (z_star,), _ = _solve(layer, yt)
    assert np.abs(z_star.numpy() - z_ref).max() < 1e-15

    # At a tie the layer uses the support without the tied entries (an element of
    # the generalized Jacobian) ...
    J = torch.autograd.functional.jacobian(lambda a: layer(a)[0], yt)
    assert (J - _sparsemax_jacobian(support)).abs().max() < 1e-15
    # ... which is the one-sided derivative along any direction that pushes the tied
    # entries below the threshold t = (Σ_S y − 1)/|S|, which itself moves at the mean of
    # d over the support. The map is piecewise linear: a forward difference is exact
    # until another entry reaches the threshold (margins here ≥ 0.25).
    tied = np.isclose(y_v, t, rtol=0, atol=1e-15)
    rng = np.random.default_rng(7)
    for _ in range(3):
        d = rng.standard_normal(n)
        d[tied] = d[support].mean() - np.abs(d[tied]) - 0.1
        h = 1e-3
        fd = (layer(as_tensor(y_v + h * d))[0] - z_star) / h
        assert (fd - J @ as_tensor(d)).abs().max() < 1e-10


def test_sparsemax_radius_two_and_a_radius_parameter():
    n = 6
    y_v = np.random.default_rng(8).standard_normal(n)
    z_ref, t, support = _sparsemax_ref(y_v, r=2.0)
    assert np.abs(y_v - t).min() > 0.02 and 1 < support.sum() < n

    prob, y, z = _sparsemax_problem(n, radius=2.0)  # sum(z) == 2
    layer = CvxpyLayer(prob, [y], [z])
    assert layer.backend == "simplex"
    (z_star,), _ = _solve(layer, as_tensor(y_v))
    assert np.abs(z_star.numpy() - z_ref).max() < 1e-12

    r = cp.Parameter()
    prob_r = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == r, z >= 0])
    layer_r = CvxpyLayer(prob_r, [y, r], [z])
    assert layer_r.backend == "simplex"
    yt, rt = as_tensor(y_v), as_tensor(2.0)
    (z_r,), _ = _solve(layer_r, yt, rt)
    assert np.abs(z_r.numpy() - z_ref).max() < 1e-12
    Jy, Jr = torch.autograd.functional.jacobian(lambda a, b_: layer_r(a, b_)[0], (yt, rt))
    s = torch.as_tensor(support, dtype=DT)
    assert (Jy - _sparsemax_jacobian(support)).abs().max() < 1e-12
    assert (Jr - s / s.sum()).abs().max() < 1e-12  # dz/dr: spread evenly on the support
    w = _weights(n, 3)
    (fd,) = central_differences(lambda r_: (layer_r(yt, r_)[0],), [rt], [w], eps=1e-6)
    assert abs(float(fd) - float(w @ Jr)) < 1e-9


def test_sparsemax_scaled_objective_with_a_linear_term():
    """minimize 3‖θ − z‖² + cᵀz s.t. Σz = 2, z ≥ 0 is the projection of θ − c/6."""
    n = 6
    theta = cp.Parameter(n)
    c = cp.Parameter(n)
    z = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(3 * cp.sum_squares(theta - z) + c @ z),
                      [cp.sum(z) == 2, z >= 0])
    layer = CvxpyLayer(prob, [theta, c], [z])
    assert layer.backend == "simplex"
    rng = np.random.default_rng(9)
    th_v, c_v = rng.standard_normal(n), rng.standard_normal(n)
    z_ref, t, support = _sparsemax_ref(th_v - c_v / 6, r=2.0)
    assert np.abs(th_v - c_v / 6 - t).min() > 0.02 and 1 < support.sum() < n
    tht, ct = as_tensor(th_v), as_tensor(c_v)
    (z_star,), _ = _solve(layer, tht, ct)
    assert np.abs(z_star.numpy() - z_ref).max() < 1e-12
    Jt, Jc = torch.autograd.functional.jacobian(lambda a, b_: layer(a, b_)[0], (tht, ct))
    J = _sparsemax_jacobian(support)
    assert (Jt - J).abs().max() < 1e-12
    assert (Jc + J / 6).abs().max() < 1e-12


def test_sparsemax_agrees_with_the_qp_engine_and_the_conic_path():
    n, B = 6, 5
    prob, y, z = _sparsemax_problem(n, radius=1.5)
    layer = CvxpyLayer(prob, [y], [z])
    qp = CvxpyLayer(prob, [y], [z], backend="qp")
    conic = conic_layer(prob, [y], [z], solver_args=SCS_TIGHT)
    assert (layer.backend, qp.backend, conic.backend) == ("simplex", "qp", "conic")
    y_v = np.random.default_rng(10).standard_normal((B, n))
    for row in y_v:
        _, t, _ = _sparsemax_ref(row, r=1.5)
        assert np.abs(row - t).min() > 1e-2  # away from kinks: Jacobians are unique
    yt = as_tensor(y_v, grad=True)
    w = _weights((B, n), 4)
    (z_s,), _ = _solve(layer, yt)
    (g_s,) = weighted_grads([z_s], [yt], [w])
    for other, x_tol, g_tol in ((qp, 1e-8, 1e-6), (conic, CONIC_X_TOL, CONIC_G_TOL)):
        (z_o,), _ = _solve(other, yt)
        (g_o,) = weighted_grads([z_o], [yt], [w])
        assert (z_s - z_o).abs().max() < x_tol
        assert (g_s - g_o).abs().max() < g_tol


_entry = st.floats(-3, 3, allow_nan=False, width=64)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(_entry, min_size=2, max_size=7), st.floats(0.25, 3.0))
def test_sparsemax_property(row, radius):
    """Random points and radii: the closed form, and the support-centering gradient."""
    y_v = np.array(row)
    z_ref, t, support = _sparsemax_ref(y_v, r=radius)
    assume(np.abs(y_v - t).min() > 1e-6)
    layer = _property_sparsemax_layer(len(row))
    yt, rt = as_tensor(y_v, grad=True), as_tensor(radius, grad=True)
    (z_star,), _ = _solve(layer, yt, rt)
    assert np.abs(z_star.detach().numpy() - z_ref).max() < 1e-12
    w = torch.linspace(-1, 2, len(row), dtype=DT)
    gy, gr = weighted_grads([z_star], [yt, rt], [w])
    s = torch.as_tensor(support, dtype=DT)
    assert (gy - _sparsemax_jacobian(support) @ w).abs().max() < 1e-12
    assert abs(float(gr) - float(s @ w / s.sum())) < 1e-12


_PROPERTY_LAYERS: dict = {}


def _property_sparsemax_layer(n):
    if n not in _PROPERTY_LAYERS:
        y, r, z = cp.Parameter(n), cp.Parameter(), cp.Variable(n)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == r, z >= 0])
        _PROPERTY_LAYERS[n] = CvxpyLayer(prob, [y, r], [z])
    return _PROPERTY_LAYERS[n]


# ----------------------------------------------------------------------------
# 4. Entropic optimal transport
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_transport_marginals_and_sinkhorn(tau):
    r, c, B = 3, 4, 4
    prob, params, Z = _transport_problem(r, c, tau=tau)
    layer = CvxpyLayer(prob, list(params), [Z])
    program = layer.compiled.form("entropy").program
    assert layer.backend == "entropy" and program.kind == "transport"
    assert len(program.independent) == r + c - 1  # the two totals are one equation

    C, a, b = _ot_data(np.random.default_rng(11), r, c, B)
    (Z_star,), _ = _solve(layer, as_tensor(C), as_tensor(a), as_tensor(b))
    Zn = Z_star.numpy()
    assert (Zn > 0).all()
    assert np.abs(Zn.sum(2) - a).max() < 1e-10
    assert np.abs(Zn.sum(1) - b).max() < 1e-10
    for i in range(B):
        assert np.abs(Zn[i] - _sinkhorn(C[i], a[i], b[i], tau)).max() < 1e-10


def test_transport_agrees_with_the_conic_path():
    r, c, B = 3, 4, 3
    prob, params, Z = _transport_problem(r, c, tau=0.5)
    layer = CvxpyLayer(prob, list(params), [Z])
    conic = conic_layer(prob, list(params), [Z], solver_args=SCS_EXP)
    C, a, b = _ot_data(np.random.default_rng(12), r, c, B)
    Ct = as_tensor(C, grad=True)
    w = _weights((B, r, c), 5)
    outs = []
    for lay in (layer, conic):
        (Z_s,), _ = _solve(lay, Ct, as_tensor(a), as_tensor(b))
        outs.append((Z_s, weighted_grads([Z_s], [Ct], [w])[0]))
    (Z_e, g_e), (Z_c, g_c) = outs
    assert (Z_e - Z_c).abs().max() < CONIC_X_TOL
    assert (g_e - g_c).abs().max() < CONIC_G_TOL
    assert g_e.abs().max() > 1e-3


def _consistent_direction(rng, r, c):
    """(da, db) with Σda = Σdb: the marginals stay feasible along it."""
    da, db = rng.standard_normal(r), rng.standard_normal(c)
    db += (da.sum() - db.sum()) / c
    return da, db


def test_transport_gradients_match_central_differences():
    r, c = 3, 4
    prob, params, Z = _transport_problem(r, c, tau=0.5)
    layer = CvxpyLayer(prob, list(params), [Z])
    C, a, b = _ot_data(np.random.default_rng(13), r, c)
    Ct, at, bt = as_tensor(C, grad=True), as_tensor(a, grad=True), as_tensor(b, grad=True)
    w = _weights((r, c), 6)
    (Z_star,), _ = _solve(layer, Ct, at, bt)
    gC, ga, gb = weighted_grads([Z_star], [Ct, at, bt], [w])

    def plan(*args):
        return layer(*args)

    inputs = [Ct.detach(), at.detach(), bt.detach()]
    # eps 1e-5: the forward is exact to ~1e-14, which a smaller step would amplify.
    (fd_C,) = central_differences(lambda C_: plan(C_, *inputs[1:]), inputs[:1], [w], eps=1e-5)
    assert (gC - fd_C).abs().max() < 1e-7
    assert gC.abs().max() > 1e-3

    # The gradient in (a, b) is defined up to the direction (1, −1) that breaks the
    # equal totals; along directions that keep them the derivative is unique.
    rng = np.random.default_rng(14)
    for _ in range(3):
        da, db = _consistent_direction(rng, r, c)
        dC = rng.standard_normal((r, c))
        fd = directional_difference(plan, inputs, [as_tensor(dC), as_tensor(da), as_tensor(db)],
                                    [w], eps=1e-5)
        got = (gC * as_tensor(dC)).sum() + ga @ as_tensor(da) + gb @ as_tensor(db)
        assert abs(float(got - fd)) < 1e-7
        assert abs(float(ga @ as_tensor(da) + gb @ as_tensor(db))) > 1e-3


def test_transport_batch_matches_one_at_a_time_and_broadcast_sums():
    r, c, B = 2, 3, 3
    prob, params, Z = _transport_problem(r, c)
    layer = CvxpyLayer(prob, list(params), [Z])
    C, a, b = _ot_data(np.random.default_rng(15), r, c, B)
    Cs = as_tensor(C[0], grad=True)  # one cost shared by the batch
    at = as_tensor(a)
    w = _weights((B, r, c), 7)
    (Zb,), _ = _solve(layer, Cs, at, as_tensor(b))
    (gC,) = weighted_grads([Zb], [Cs], [w])
    total = torch.zeros_like(Cs)
    for i in range(B):
        Ci = Cs.detach().clone().requires_grad_(True)
        (Zi,), _ = _solve(layer, Ci, at[i], as_tensor(b[i]))
        assert (Zb[i] - Zi).abs().max() < 1e-14
        total += weighted_grads([Zi], [Ci], [w[i]])[0]
    assert (gC - total).abs().max() < 1e-13
    assert gC.abs().max() > 1e-3


def test_transport_constraints_in_either_order_agree():
    r, c = 3, 4
    C, a, b = _ot_data(np.random.default_rng(16), r, c)
    outs = []
    for rows_first in (True, False):
        prob, params, Z = _transport_problem(r, c, rows_first=rows_first)
        layer = CvxpyLayer(prob, list(params), [Z])
        assert layer.backend == "entropy"
        Ct = as_tensor(C, grad=True)
        (Z_s,), _ = _solve(layer, Ct, as_tensor(a), as_tensor(b))
        outs.append((Z_s, weighted_grads([Z_s], [Ct], [_weights((r, c), 8)])[0]))
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-13
    assert (outs[0][1] - outs[1][1]).abs().max() < 1e-12


def test_transport_float32_keeps_its_dtype():
    r, c = 3, 4
    prob, params, Z = _transport_problem(r, c)
    layer = CvxpyLayer(prob, list(params), [Z])
    C, a, b = _ot_data(np.random.default_rng(17), r, c)
    Ct = as_tensor(C, grad=True, dtype=torch.float32)
    (Z32,), _ = _solve(layer, Ct, as_tensor(a, dtype=torch.float32),
                       as_tensor(b, dtype=torch.float32))
    assert Z32.dtype == torch.float32
    assert np.abs(Z32.detach().numpy() - _sinkhorn(C, a, b, 1.0)).max() < 1e-5
    (g,) = torch.autograd.grad(Z32[0, 0], Ct)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_transport_every_sample_of_a_batch_converges():
    """A batch of 50 ordinary problems: each reaches full accuracy, with no warning."""
    r, c, B = 3, 4, 50
    prob, params, Z = _transport_problem(r, c, tau=1.0)
    layer = CvxpyLayer(prob, list(params), [Z])
    C, a, b = _ot_data(np.random.default_rng(0), r, c, B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (Z_star,), info = _solve(layer, as_tensor(C), as_tensor(a), as_tensor(b))
    assert np.abs(Z_star.numpy().sum(2) - a).max() < 1e-10


# ----------------------------------------------------------------------------
# 5. A general entropy program: constrained softmax
# ----------------------------------------------------------------------------


def test_constrained_softmax_is_optimal_and_agrees_with_references():
    B = 4
    prob, theta, b, z = _general_problem()
    layer = CvxpyLayer(prob, [theta, b], [z])
    assert layer.backend == "entropy"
    assert layer.compiled.form("entropy").program.kind == "general"
    th_v, b_v = _general_data(np.random.default_rng(18), B)
    tht, bt = as_tensor(th_v, grad=True), as_tensor(b_v, grad=True)
    (z_star,), _ = _solve(layer, tht, bt)
    zn = z_star.detach().numpy()

    # Its own optimality conditions: feasible, z > 0, and θ − 1 − log z lies in the
    # row space of [1ᵀ; A] (stationarity of θᵀz + H(z) − νᵀ(Mz − (1, b))).
    M = np.vstack([np.ones(A_GENERAL.shape[1]), A_GENERAL])
    for i in range(B):
        assert (zn[i] > 0).all()
        assert np.abs(M @ zn[i] - np.r_[1.0, b_v[i]]).max() < 1e-12
        s = th_v[i] - 1 - np.log(zn[i])
        nu = np.linalg.lstsq(M.T, s, rcond=None)[0]
        assert np.abs(M.T @ nu - s).max() < 1e-10

    # ECOS through CVXPY, and the conic path (SCS via diffcp) with its gradient.
    for i in range(B):
        ref = _exp_cone_reference(prob, [theta, b], [th_v[i], b_v[i]], z)
        assert np.abs(zn[i] - ref).max() < 1e-7
    conic = conic_layer(prob, [theta, b], [z], solver_args=SCS_EXP)
    w = _weights((B, A_GENERAL.shape[1]), 9)
    g = weighted_grads([z_star], [tht, bt], [w])
    (z_c,), _ = _solve(conic, tht, bt)
    g_c = weighted_grads([z_c], [tht, bt], [w])
    assert (z_star - z_c).abs().max() < CONIC_X_TOL
    for ge, gc in zip(g, g_c):
        assert (ge - gc).abs().max() < CONIC_G_TOL
        assert ge.abs().max() > 1e-3


def test_constrained_softmax_gradients_match_central_differences():
    prob, theta, b, z = _general_problem(tau=0.5)
    layer = CvxpyLayer(prob, [theta, b], [z])
    th_v, b_v = _general_data(np.random.default_rng(19))
    tht, bt = as_tensor(th_v, grad=True), as_tensor(b_v, grad=True)
    w = _weights(A_GENERAL.shape[1], 10)
    (z_star,), _ = _solve(layer, tht, bt)
    got = weighted_grads([z_star], [tht, bt], [w])
    # eps 1e-5: the forward is exact to ~1e-13, which a smaller step would amplify.
    fd = central_differences(layer, [tht.detach(), bt.detach()], [w], eps=1e-5)
    for g, f in zip(got, fd):
        assert (g - f).abs().max() < 1e-7
        assert g.abs().max() > 1e-3


@pytest.mark.parametrize("case", ["transport_tau_0.01", "general_logits_30"])
def test_dual_newton_solves_feasible_problems_with_large_logits(case):
    if case == "transport_tau_0.01":
        tau = 0.01
        prob, params, Z = _transport_problem(3, 4, tau=tau)
        layer = CvxpyLayer(prob, list(params), [Z])
        C, a, b = _ot_data(np.random.default_rng(0), 3, 4)
        (Z_star,), _ = _solve(layer, as_tensor(C), as_tensor(a), as_tensor(b))
        assert np.abs(Z_star.numpy() - _sinkhorn(C, a, b, tau)).max() < 1e-10
    else:
        prob, theta, b, z = _general_problem(tau=1.0)
        layer = CvxpyLayer(prob, [theta, b], [z])
        th_v, b_v = _general_data(np.random.default_rng(3))
        th_v = 30.0 * th_v  # logits of a few tens, as in attention
        (z_star,), _ = _solve(layer, as_tensor(th_v), as_tensor(b_v))
        ref = _exp_cone_reference(prob, [theta, b], [th_v, b_v], z)
        assert np.abs(z_star.numpy() - ref).max() < 1e-7


# ----------------------------------------------------------------------------
# 6. gradcheck in float64 on every path
# ----------------------------------------------------------------------------


def _gradcheck_case(path):
    """(function of the checked inputs, inputs) for each structured path."""
    if path == "softmax":
        prob, th, z = _softmax_problem(5, tau=0.7)
        layer = CvxpyLayer(prob, [th], [z])
        theta_v = as_tensor(np.random.default_rng(20).standard_normal((2, 5)), True)
        return layer, (lambda t: layer(t)[0]), (theta_v,)
    if path == "softmax_dual_newton":
        theta, s, z = cp.Parameter(4), cp.Parameter(), cp.Variable(4)
        prob = cp.Problem(cp.Maximize(theta @ z + cp.sum(cp.entr(z))), [cp.sum(z) == s])
        layer = CvxpyLayer(prob, [theta, s], [z])
        theta_v = as_tensor(np.random.default_rng(21).standard_normal(4), True)
        return layer, (lambda t, s_: layer(t, s_)[0]), (theta_v, as_tensor(1.3, True))
    if path == "sparsemax":
        prob, y, z = _sparsemax_problem(6, radius=1.5)
        layer = CvxpyLayer(prob, [y], [z])
        y_v = np.array([1.2, 0.9, 0.1, -0.4, 0.7, 0.85])
        return layer, (lambda t: layer(t)[0]), (as_tensor(y_v, True),)
    if path == "transport":
        prob, params, Z = _transport_problem(3, 4, tau=0.5)
        layer = CvxpyLayer(prob, list(params), [Z])
        C, a, b = _ot_data(np.random.default_rng(22), 3, 4, 2)
        a_t, b_t = as_tensor(a), as_tensor(b)
        return layer, (lambda C_: layer(C_, a_t, b_t)[0]), (as_tensor(C, True),)
    if path == "general":
        prob, theta, b, z = _general_problem(tau=0.8)
        layer = CvxpyLayer(prob, [theta, b], [z])
        th_v, b_v = _general_data(np.random.default_rng(23), 2)
        return layer, (lambda t, b_: layer(t, b_)[0]), (as_tensor(th_v, True), as_tensor(b_v, True))
    raise ValueError(path)


@pytest.mark.parametrize("path", ["softmax", "softmax_dual_newton", "sparsemax", "transport",
                                  "general"])
def test_gradcheck_every_path(path):
    layer, fn, inputs = _gradcheck_case(path)
    assert layer.backend in ("entropy", "simplex")
    assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)


# ----------------------------------------------------------------------------
# 7. Routing: "auto" picks the structured path; "conic" forces the exponential cone
# ----------------------------------------------------------------------------


def _routing_case(path, rng):
    """(problem, parameters, variable, values) for the four structured problems."""
    if path == "softmax":
        prob, th, z = _softmax_problem(5, tau=0.6)
        return prob, [th], z, [rng.standard_normal((2, 5))]
    if path == "sparsemax":
        prob, y, z = _sparsemax_problem(5)
        return prob, [y], z, [np.array([[1.2, 0.9, 0.1, -0.4, 0.7],
                                         [0.3, -0.2, 0.25, 0.0, 0.4]])]
    if path == "transport":
        prob, params, Z = _transport_problem(2, 3, tau=0.5)
        return prob, list(params), Z, list(_ot_data(rng, 2, 3, 2))
    prob, theta, b, z = _general_problem(tau=0.8)
    return prob, [theta, b], z, list(_general_data(rng, 2))


@pytest.mark.parametrize("path,backend,kind", [
    ("softmax", "entropy", "softmax"),
    ("sparsemax", "simplex", None),
    ("transport", "entropy", "transport"),
    ("general", "entropy", "general"),
])
def test_auto_routes_to_the_structured_path_and_agrees_with_the_conic_path(path, backend, kind):
    prob, params, var, values = _routing_case(path, np.random.default_rng(24))
    auto = CvxpyLayer(prob, params, [var])
    assert auto.backend == backend
    if kind is not None:
        assert auto.compiled.form("entropy").program.kind == kind
    args = {"solver_args": SCS_TIGHT if path == "sparsemax" else SCS_EXP}
    conic = CvxpyLayer(prob, params, [var], backend="conic", **args)
    named = CvxpyLayer(prob, params, [var], solver="SCS", **args)  # naming a solver: conic
    assert conic.backend == named.backend == "conic"

    inputs = [as_tensor(v, grad=True) for v in values]
    w = _weights(values[0].shape[:1] + var.shape, 11)
    results = []
    for lay in (auto, conic):
        (x,), info = _solve(lay, *inputs)
        assert info.backend == lay.backend
        results.append((x, weighted_grads([x], [inputs[0]], [w])[0]))
    (x_a, g_a), (x_c, g_c) = results
    assert (x_a - x_c).abs().max() < CONIC_X_TOL
    assert (g_a - g_c).abs().max() < CONIC_G_TOL
    assert g_a.abs().max() > 1e-3


@pytest.mark.parametrize("path,forced", [("softmax", "simplex"), ("softmax", "qp"),
                                         ("sparsemax", "entropy"), ("transport", "qp")])
def test_forcing_a_path_the_structure_does_not_allow_is_an_error(path, forced):
    prob, params, var, _ = _routing_case(path, np.random.default_rng(25))
    with pytest.raises(ValueError, match=f"backend='{forced}' is not valid"):
        CvxpyLayer(prob, params, [var], backend=forced)


# ----------------------------------------------------------------------------
# 8. Failures, statuses and fall-through
# ----------------------------------------------------------------------------


def test_infeasible_marginals_raise_or_mask():
    r, c = 3, 4
    prob, params, Z = _transport_problem(r, c)
    layer = CvxpyLayer(prob, list(params), [Z])
    C, a, b = _ot_data(np.random.default_rng(26), r, c, 3)
    a[1] *= 1.2  # totals differ
    a[2] = [0.7, 0.5, -0.2]  # totals equal, but a negative row sum
    assert abs(a[2].sum() - b[2].sum()) < 1e-12
    Ct = as_tensor(C, grad=True)
    args = (Ct, as_tensor(a), as_tensor(b))

    with pytest.raises(SolverError) as err:
        layer(*args)
    assert err.value.indices == [1, 2]
    assert err.value.statuses == [Status.INFEASIBLE] * 2

    (Z_m,), info = layer(*args, on_failure="mask", return_info=True)
    assert info.status[0] is Status.OPTIMAL
    assert torch.isnan(Z_m[1:]).all()
    assert np.abs(Z_m[0].detach().numpy() - _sinkhorn(C[0], a[0], b[0], 1.0)).max() < 1e-10
    (g,) = torch.autograd.grad((Z_m[0] ** 2).sum(), Ct)
    assert torch.isfinite(g).all() and g[0].abs().max() > 1e-3
    assert (g[1:] == 0).all()


def test_constrained_softmax_with_unreachable_b_is_infeasible():
    prob, theta, b, z = _general_problem()
    layer = CvxpyLayer(prob, [theta, b], [z])
    th_v, b_v = _general_data(np.random.default_rng(27), 2)
    b_v[1] = [5.0, 5.0]  # A z over the simplex stays within [-1, 2] × [-1, 1]
    with pytest.raises(SolverError) as err:
        layer(as_tensor(th_v), as_tensor(b_v))
    assert err.value.indices == [1]
    (z_m,) = layer(as_tensor(th_v), as_tensor(b_v), on_failure="mask")
    assert torch.isnan(z_m[1]).all() and torch.isfinite(z_m[0]).all()


@pytest.mark.parametrize("radius", [-1.0, 0.0])
def test_sparsemax_nonpositive_radius(radius):
    y, r, z = cp.Parameter(4), cp.Parameter(), cp.Variable(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == r, z >= 0])
    layer = CvxpyLayer(prob, [y, r], [z])
    assert layer.backend == "simplex"
    yt = as_tensor(np.random.default_rng(28).standard_normal(4))
    if radius < 0:  # {z ≥ 0, Σz < 0} is empty
        with pytest.raises(SolverError):
            layer(yt, as_tensor(radius))
    else:  # {z ≥ 0, Σz = 0} = {0}
        (z_star,), _ = _solve(layer, yt, as_tensor(radius))
        assert (z_star == 0).all()


def _fall_through_cases():
    n = 4
    theta = cp.Parameter(n)
    z = cp.Variable(n)
    H = cp.sum(cp.entr(z))
    tau = cp.Parameter(pos=True)
    y = cp.Parameter(n)
    return [
        ("entropy_plus_quadratic",
         cp.Problem(cp.Maximize(theta @ z + H - cp.sum_squares(z)), [cp.sum(z) == 1]),
         [theta], "cone"),
        ("entropy_with_inequality",
         cp.Problem(cp.Maximize(theta @ z + H), [cp.sum(z) == 1, z <= 0.4]), [theta], "cone"),
        ("parameter_temperature",
         cp.Problem(cp.Maximize(theta @ z + tau * H), [cp.sum(z) == 1]), [theta, tau], "cone"),
        ("sparsemax_with_upper_bound",
         cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == 1, z >= 0, z <= 0.4]),
         [y], "qp"),
        ("sparsemax_without_nonneg",
         cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == 1]), [y], "qp"),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _fall_through_cases()])
def test_problems_that_do_not_match_fall_through(name):
    _, prob, params, expected = next(c for c in _fall_through_cases() if c[0] == name)
    z = prob.variables()[0]
    layer = CvxpyLayer(prob, params, [z])
    # auto chooses among the routes of the form by cost (tests/test_route_choice.py)
    candidates = [c.kind for c in layer._choice.candidates] if layer._choice else [layer.backend]
    assert expected in candidates and layer.backend in candidates
    assert not {"entropy", "simplex"} & set(layer.compiled.kinds)
    layer = CvxpyLayer(prob, params, [z], backend=expected)
    rng = np.random.default_rng(29)
    values = [rng.standard_normal(4) if p.shape else np.array(0.5) for p in params]
    (z_star,), _ = _solve(layer, *[as_tensor(v) for v in values])
    if expected == "cone":
        ref = _exp_cone_reference(prob, params, values, z)
    else:
        (ref,) = reference_solve(prob, params, values, [z])
    assert np.abs(z_star.numpy() - ref).max() < 1e-7


# ----------------------------------------------------------------------------
# 9. Nothing wrong passes as a solution: small temperatures, faces of the
#    orthant, infeasible equalities, extreme scales (reference: entropy_reference,
#    per-coordinate LPs + Clarabel polished on the dual, nothing shared with the path)
# ----------------------------------------------------------------------------


# 1ᵀz = 1 plus two mixed-sign rows: neither a transport nor a 0/1 system.
A_MIXED = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                    [0.5, -1.2, 0.0, 2.0, -0.3, 0.0, 1.0],
                    [0.0, 0.7, -1.0, 0.0, 1.5, -0.8, 0.2]])
REF_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def _equality_problem(A, tau, b=None):
    """maximize θᵀz + τ·H(z) s.t. A z = b; b a Parameter unless given as constants."""
    theta = cp.Parameter(A.shape[1])
    z = cp.Variable(A.shape[1])
    b_par = cp.Parameter(A.shape[0]) if b is None else None
    rhs = b_par if b is None else np.asarray(b, dtype=np.float64)
    prob = cp.Problem(cp.Maximize(theta @ z + tau * cp.sum(cp.entr(z))), [A @ z == rhs])
    return prob, theta, b_par, z


def _ref_solution(A, b, theta, tau):
    """The reference point, or None where the equalities have no x ≥ 0."""
    try:
        return entropy_reference.solve(A, b, theta, tau)
    except entropy_reference.Infeasible:
        return None


def _ref_directional(A, b, theta, tau, d_theta, d_b, w):
    """d/dh wᵀx*(θ + h dθ, b + h db) at 0: the reference's central difference in
    mpmath (float64 differences lose digits where x has entries near 1e-8)."""
    return entropy_reference.directional_derivative(A, b, theta, tau, d_theta, d_b, w)


def test_small_temperature_with_a_mixed_sign_row_is_solved():
    """maximize θᵀz + 0.003·H(z) s.t. 1ᵀz = 1, z₂ − z₃ = 0.05: the answer is
    (0, 0.95, 0.05, 0, 0, 0), never a point off the constraints."""
    n, tau = 6, 0.003
    A = np.vstack([np.ones(n), np.eye(n)[2] - np.eye(n)[3]])
    b = np.array([1.0, 0.05])
    prob, theta, _, z = _equality_problem(A, tau, b=b)
    layer = CvxpyLayer(prob, [theta], [z])
    assert layer.backend == "entropy"
    th = np.array([0.1, 1.0, 0.5, 0.45, 0.0, -0.3])
    (x,), _ = _solve(layer, as_tensor(th))
    ref = entropy_reference.solve(A, b, th, tau)
    assert np.abs(ref - [0, 0.95, 0.05, 0, 0, 0]).max() < 1e-8
    assert np.abs(x.numpy() - ref).max() < 1e-8
    # At this τ the point is the vertex's: ∂x/∂θ ~ e^{-0.5/τ}, ∂x/∂b of order 1.
    # The gradient along a direction of (θ, b), with b a parameter, against the
    # reference re-solved (mpmath central difference).
    prob, theta, b_par, z = _equality_problem(A, tau)
    layer = CvxpyLayer(prob, [theta, b_par], [z])
    tht, bt = as_tensor(th, grad=True), as_tensor(b, grad=True)
    (x,), _ = _solve(layer, tht, bt)
    w, d_th, d_z = _weights(n, 40).numpy(), _weights(n, 41).numpy(), _weights(n, 42).numpy()
    g_th, g_b = weighted_grads([x], [tht, bt], [as_tensor(w)])
    got = float(g_th @ as_tensor(d_th) + g_b @ as_tensor(A @ d_z))
    fd = _ref_directional(A, b, th, tau, d_th, A @ d_z, w)
    assert abs(got - fd) < 1e-8 * max(1.0, abs(fd))
    assert abs(fd) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", [0.01, 0.003, 0.001])
def test_small_temperature_family_every_sample_is_solved(tau, dtype):
    """50 feasible samples of a general constant A: each is optimal and right."""
    B = 50
    prob, theta, b_par, z = _equality_problem(A_MIXED, tau)
    layer = CvxpyLayer(prob, [theta, b_par], [z])
    rng = np.random.default_rng(42)
    z0 = rng.dirichlet(np.ones(A_MIXED.shape[1]), size=B)
    th_v, b_v = rng.standard_normal((B, A_MIXED.shape[1])), z0 @ A_MIXED.T
    tht, bt = as_tensor(th_v, dtype=dtype), as_tensor(b_v, dtype=dtype)
    (x,), info = _solve(layer, tht, bt)
    assert x.dtype == dtype
    for i in range(B):
        ref = entropy_reference.solve(A_MIXED, bt[i].double().numpy(), tht[i].double().numpy(),
                                      tau)
        assert np.abs(x[i].double().numpy() - ref).max() < REF_TOL[dtype], i


def test_small_temperature_gradients_match_the_reference():
    """θ and b gradients at τ = 0.01 against central differences through the reference."""
    tau, B = 0.01, 3
    prob, theta, b_par, z = _equality_problem(A_MIXED, tau)
    layer = CvxpyLayer(prob, [theta, b_par], [z])
    rng = np.random.default_rng(43)
    z0 = rng.dirichlet(np.ones(7), size=B)
    th_v, b_v = rng.standard_normal((B, 7)), z0 @ A_MIXED.T
    tht, bt = as_tensor(th_v, grad=True), as_tensor(b_v, grad=True)
    (x,), _ = _solve(layer, tht, bt)
    w = _weights((B, 7), 44)
    g_th, g_b = weighted_grads([x], [tht, bt], [w])
    for i in range(B):
        d_th, d_z = rng.standard_normal(7), rng.standard_normal(7)
        d_b = A_MIXED @ d_z
        fd = _ref_directional(A_MIXED, b_v[i], th_v[i], tau, d_th, d_b, w[i].numpy())
        got = float(g_th[i] @ as_tensor(d_th) + g_b[i] @ as_tensor(d_b))
        assert abs(got - fd) < 1e-7 * max(1.0, abs(fd)), (i, got, fd)
        assert abs(fd) > 1e-3


def _face_case(name):
    """(A, b, forced coordinates) of feasible sets on a face of the orthant."""
    n = 5
    one = np.ones((1, n))
    if name == "z0_zero":  # 1ᵀz = 1, z₀ = 0
        return np.vstack([one, np.eye(n)[0]]), np.array([1.0, 0.0]), [0]
    if name == "two_z0_zero":  # the same, written 2·z₀ = 0
        return np.vstack([one, 2 * np.eye(n)[0]]), np.array([1.0, 0.0]), [0]
    if name == "sum_zero":  # 1ᵀz = 0: only z = 0
        return one, np.array([0.0]), list(range(n))
    if name == "pair_cancels":  # z₁ − z₂ = 0 and z₁ + z₂ = 0: both zero, others free
        A = np.vstack([one, np.eye(n)[1] - np.eye(n)[2], np.eye(n)[1] + np.eye(n)[2]])
        return A, np.array([1.0, 0.0, 0.0]), [1, 2]
    if name == "mixed_signs":  # z₀ − z₃ = 1, z₀ + z₁ + z₂ + z₄ − z₃ = 1 ⇒ z₁ = z₂ = z₄ = 0
        A = np.array([[1.0, 0, 0, -1, 0, 0], [1, 1, 1, -1, 1, 0], np.ones(6)])
        return A, np.array([1.0, 1.0, 2.0]), [1, 2, 4]
    raise ValueError(name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["z0_zero", "two_z0_zero", "sum_zero", "pair_cancels",
                                  "mixed_signs"])
def test_coordinates_forced_to_zero_are_solved_on_their_face(name, dtype):
    A, b, forced = _face_case(name)
    n, tau, B = A.shape[1], 0.5, 3
    prob, theta, b_par, z = _equality_problem(A, tau)
    layer = CvxpyLayer(prob, [theta, b_par], [z])
    assert layer.backend == "entropy"
    th_v = np.random.default_rng(45).standard_normal((B, n))
    tht = as_tensor(th_v, grad=True, dtype=dtype)
    bt = as_tensor(np.broadcast_to(b, (B, len(b))), dtype=dtype)
    (x,), _ = _solve(layer, tht, bt)
    assert (x[:, forced] == 0).all()
    w = _weights((B, n), 46)
    (g,) = torch.autograd.grad((x * w.to(dtype)).sum(), tht)
    assert torch.isfinite(g).all() and (g[:, forced] == 0).all()
    for i in range(B):
        ref = entropy_reference.solve(A, b, th_v[i], tau)
        assert np.abs(x[i].double().detach().numpy() - ref).max() < REF_TOL[dtype]
        if dtype == torch.float64 and len(forced) < n:
            d = np.random.default_rng(i).standard_normal(n)
            fd = _ref_directional(A, b, th_v[i], tau, d, 0 * b, w[i].numpy())
            assert abs(float(g[i] @ as_tensor(d)) - fd) < 1e-7 * max(1.0, abs(fd))
            assert abs(fd) > 1e-3


def test_transport_with_a_zero_marginal_is_solved():
    """A zero row sum forces that row of the plan to zero; the rest is the
    transport between the remaining marginals."""
    r, c, tau = 3, 4, 0.5
    prob, params, Z = _transport_problem(r, c, tau=tau)
    layer = CvxpyLayer(prob, list(params), [Z])
    C, a, b = _ot_data(np.random.default_rng(47), r, c)
    a[2] = 0.0
    a /= a.sum()
    b[1] = 0.0
    b /= b.sum()
    Ct = as_tensor(C, grad=True)
    (Zs,), _ = _solve(layer, Ct, as_tensor(a), as_tensor(b))
    assert (Zs[2] == 0).all() and (Zs[:, 1] == 0).all()
    keep_r, keep_c = [0, 1], [0, 2, 3]
    ref = _sinkhorn(C[np.ix_(keep_r, keep_c)], a[keep_r], b[keep_c], tau)
    assert np.abs(Zs.detach().numpy()[np.ix_(keep_r, keep_c)] - ref).max() < 1e-10
    # ∂/∂C against central differences of the reduced Sinkhorn reference.
    w = _weights((r, c), 48)
    (g,) = torch.autograd.grad((Zs * w).sum(), Ct)
    assert (g[2] == 0).all() and (g[:, 1] == 0).all()
    sub = w.numpy()[np.ix_(keep_r, keep_c)]
    for i, j in [(0, 0), (1, 2), (0, 3)]:
        e = np.zeros((2, 3))
        e[i, keep_c.index(j)] = 1e-6
        Cs = C[np.ix_(keep_r, keep_c)]
        fd = ((_sinkhorn(Cs + e, a[keep_r], b[keep_c], tau) * sub).sum()
              - (_sinkhorn(Cs - e, a[keep_r], b[keep_c], tau) * sub).sum()) / 2e-6
        assert abs(float(g[i, j]) - fd) < 1e-7
    assert g.abs().max() > 1e-3


def _infeasible_case(name):
    n = 4
    one = np.ones(n)
    if name == "beyond_the_simplex":  # z₀ + 2z₁ ≤ 2 on the simplex
        return np.vstack([one, [1.0, 2.0, 0, 0]]), np.array([1.0, 2.1])
    if name == "contradictory_sums":  # 1ᵀz = 1 and 1ᵀz = 2
        return np.vstack([one, one]), np.array([1.0, 2.0])
    if name == "negative_sum":
        return one[None], np.array([-1.0])
    if name == "mixed_signs":  # z₀ − z₁ = 1 and z₁ − z₀ = 1
        return np.array([[1.0, -1, 0, 0], [-1, 1, 0, 0]]), np.array([1.0, 1.0])
    raise ValueError(name)


@pytest.mark.parametrize("name", ["beyond_the_simplex", "contradictory_sums", "negative_sum",
                                  "mixed_signs"])
def test_infeasible_equalities_are_reported_infeasible(name):
    """A sample with no x ≥ 0 is INFEASIBLE (raised, or NaN with mask); its
    feasible neighbours in the batch are solved as if alone."""
    A, b_bad = _infeasible_case(name)
    n, tau = A.shape[1], 0.3
    prob, theta, b_par, z = _equality_problem(A, tau)
    layer = CvxpyLayer(prob, [theta, b_par], [z])
    assert _ref_solution(A, b_bad, np.zeros(n), tau) is None
    th_v = np.random.default_rng(49).standard_normal((3, n))
    b_ok = A @ np.array([0.4, 0.3, 0.2, 0.1])
    b_v = np.stack([b_ok, b_bad, b_ok])
    args = (as_tensor(th_v), as_tensor(b_v))
    for dtype in (torch.float64, torch.float32):
        args = tuple(t.to(dtype) for t in args)
        with pytest.raises(SolverError) as err:
            layer(*args)
        assert err.value.indices == [1]
        assert err.value.statuses == [Status.INFEASIBLE]
        (x,), info = layer(*args, on_failure="mask", return_info=True)
        assert info.status == (Status.OPTIMAL, Status.INFEASIBLE, Status.OPTIMAL)
        assert torch.isnan(x[1]).all()
        for i in (0, 2):
            ref = entropy_reference.solve(A, b_ok, th_v[i], tau)
            assert np.abs(x[i].double().numpy() - ref).max() < REF_TOL[dtype]


def test_sparsemax_float32_with_a_large_common_offset():
    """y = 1e3 + 1e-3·randn (n = 3000) in float32: the threshold is found after
    shifting by max(y), so the sum is 1 and the support is right."""
    n = 3000
    prob, y, z = _sparsemax_problem(n)
    layer = CvxpyLayer(prob, [y], [z])
    y32 = (1e3 + 1e-3 * torch.randn(2, n, generator=torch.Generator().manual_seed(50),
                                    dtype=torch.float64)).float()
    (x,), _ = _solve(layer, y32)
    assert x.dtype == torch.float32
    w = torch.randn(2, n, generator=torch.Generator().manual_seed(53)).float()
    y32.requires_grad_(True)
    (x,) = layer(y32)
    (g,) = torch.autograd.grad((x * w).sum(), y32)
    for i in range(2):
        y64 = y32[i].detach().double().numpy()
        ref, _, support = _sparsemax_ref(y64 - y64.max())  # exact shift in float64
        assert abs(float(x[i].double().sum()) - 1.0) < 1e-5
        assert np.abs(x[i].detach().double().numpy() - ref).max() < 1e-6
        assert ((x[i] > 0).numpy() == support).mean() > 0.999
        # The closed-form Jacobian on the reference's support: centering on S.
        s = torch.as_tensor(support, dtype=DT)
        expected = s * (w[i].double() - (s * w[i].double()).sum() / s.sum())
        assert (g[i].double() - expected).abs().max() < 1e-5


def test_sparsemax_recognition_is_linear_in_n():
    """A sparsemax over 20 000 entries compiles with no n×n array (a dense
    identity would be 3.2 GB) and solves correctly."""
    import tracemalloc

    n = 20_000
    prob, y, z = _sparsemax_problem(n)
    tracemalloc.start()
    try:
        layer = CvxpyLayer(prob, [y], [z])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert layer.backend == "simplex"
    assert peak < 400e6, f"peak {peak / 1e6:.0f} MB"
    yt = torch.randn(2, n, dtype=DT, generator=torch.Generator().manual_seed(51))
    (x,), _ = _solve(layer, yt)
    for i in range(2):
        assert np.abs(x[i].numpy() - _sparsemax_ref(yt[i].numpy())[0]).max() < 1e-12


@pytest.mark.parametrize("dtype,tau,scale", [(torch.float64, 1e-300, 1e9),
                                             (torch.float32, 1e-37, 50.0)])
def test_softmax_with_a_tiny_temperature_is_the_argmax(dtype, tau, scale):
    """θ/τ overflows; (θ − max θ)/τ does not: the answer is the (tie-split) argmax."""
    n = 5
    prob, th, z = _softmax_problem(n, tau=tau)
    layer = CvxpyLayer(prob, [th], [z])
    theta = torch.tensor([[0.3, 1.0, -0.2, 0.9, 0.1], [1.0, -1.0, 1.0, 0.0, 0.5]],
                         dtype=dtype) * scale
    theta.requires_grad_(True)
    (x,), _ = _solve(layer, theta)
    expected = torch.tensor([[0, 1, 0, 0, 0], [0.5, 0, 0.5, 0, 0]], dtype=dtype)
    assert torch.equal(x, expected)
    # The closed-form Jacobian (diag(x) − x xᵀ)/τ: zero at the one-hot row.
    w = _weights((2, n), 52).to(dtype)
    (g,) = torch.autograd.grad((x * w).sum(), theta)
    assert torch.isfinite(g).all()
    assert (g[0] == 0).all()
    J1 = (torch.diag(expected[1]) - torch.outer(expected[1], expected[1])).double()
    ref1 = (J1 @ w[1].double()) / tau
    assert torch.allclose(g[1].double(), ref1, rtol=1e-6)


def test_float32_gradients_of_the_dual_newton_path_match_float64():
    """float32 inputs are solved and differentiated in float64 inside: the
    gradients equal the float64 ones at the same (rounded) data, to float32."""
    tau, B = 0.2, 4
    prob, theta, b_par, z = _equality_problem(A_MIXED, tau)
    layer = CvxpyLayer(prob, [theta, b_par], [z])
    rng = np.random.default_rng(54)
    th32 = torch.tensor(rng.standard_normal((B, 7)), dtype=torch.float32)
    b32 = torch.tensor(rng.dirichlet(np.ones(7), size=B) @ A_MIXED.T, dtype=torch.float32)
    w = _weights((B, 7), 55)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        tt, bt = th32.to(dtype).requires_grad_(), b32.to(dtype).requires_grad_()
        (x,), _ = _solve(layer, tt, bt)
        grads[dtype] = weighted_grads([x], [tt, bt], [w.to(dtype)])
        assert grads[dtype][0].dtype == dtype
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert (g32.double() - g64).abs().max() <= 1e-5 * (1 + g64.abs().max())
        assert g64.abs().max() > 1e-2
