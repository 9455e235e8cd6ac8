"""The batched QP engine (`backends.qp`), `QPFunction` and CvxpyLayer's QP route.

Problem, per sample: minimize ½ zᵀQz + qᵀz  s.t.  Gz ≤ h,  Az = b.

Every solution is checked against Clarabel through CVXPY (tight tolerances), and
every derivative against something the engine does not compute: a closed form
differentiated by torch autograd, central differences by re-solving, the conic
(diffcp + SCS) path on the same problem, ``torch.autograd.gradcheck``, or
per-sample solves (for broadcast gradients).
"""

from __future__ import annotations

import functools
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from cvxpy.utilities import scopes
from declarative.backends.qp import QPSettings, solve_qp
from helpers import (
    SCS_TIGHT,
    as_tensor,
    central_differences,
    conic_layer,
    qp_reference,
    random_qp,
    reference_solve,
    rel_err,
    weighted_grads,
)
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import declarative
from declarative import NotDPPError, Status
from declarative.qpfunction import QPFunction, QPSolvers
from declarative.torch import CvxpyLayer

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems
KKTS = ("schur", "reduced")
NAMES = ("Q", "q", "G", "h", "A", "b")
E = torch.Tensor()  # qpth's spelling of an absent (A, b) or (G, h)
SHARED = pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])


# ----------------------------------------------------------------------------
# Data and small tools
# ----------------------------------------------------------------------------



def _sample(data, i):
    """Sample i of (Q, q, G, h, A, b) as numpy arrays (shared blocks as they are)."""
    out = []
    for name, t in zip(NAMES, data):
        batched = t.dim() == (3 if name in "QGA" else 2)
        out.append((t[i] if batched else t).detach().cpu().double().numpy())
    return out


def _batch(data) -> int:
    return max(t.shape[0] for name, t in zip(NAMES, data)
               if t.dim() == (3 if name in "QGA" else 2))


def _solve(data, settings=None):
    """((z, λ, ν), QPResult) of the engine on a batch."""
    return solve_qp(*data, batch=_batch(data), settings=settings)


def _weights(outputs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, dtype=DT, generator=gen).to(o.dtype) for o in outputs]



def _close(got, ref, tol) -> bool:
    """max |got − ref| ≤ tol · max(1, max |ref|): absolute near zero, relative for large values."""
    got = np.asarray(got.detach().cpu() if isinstance(got, torch.Tensor) else got, np.float64)
    ref = np.asarray(ref.detach().cpu() if isinstance(ref, torch.Tensor) else ref, np.float64)
    if got.size == 0 and ref.size == 0:
        return True
    return float(np.abs(got - ref).max()) <= tol * max(1.0, float(np.abs(ref).max()))


def _no_constraints(n, dtype=DT):
    return torch.zeros(0, n, dtype=dtype), torch.zeros(0, dtype=dtype)


# Reference derivatives by re-solving: a tolerance far below the default keeps
# the re-solves' own error (divided by the step) out of the comparison.
FD_SETTINGS = dict(eps=1e-12)
FD_STEP = 1e-5


def _fd(data, weights, kkt="auto", build=None):
    """Central differences of Σ <w, (z, λ, ν)>; ``build`` maps the inputs to the six blocks."""
    settings = QPSettings(kkt=kkt, **FD_SETTINGS)
    build = build or (lambda *a: a)

    def fn(*a):
        return _solve(build(*a), settings)[0]

    return central_differences(fn, [t.detach() for t in data], weights, eps=FD_STEP)


# ----------------------------------------------------------------------------
# Solutions and duals against Clarabel
# ----------------------------------------------------------------------------


@SHARED
@pytest.mark.parametrize("m", [0, 2], ids=["ineq", "ineq+eq"])
@pytest.mark.parametrize("kkt", KKTS)
def test_solution_and_duals_match_clarabel(kkt, m, shared):
    data = random_qp(1, n=5, p=8, m=m, B=3, shared=shared)
    (z, lam, nu), res = _solve(data, QPSettings(kkt=kkt))
    assert res.kkt.name == kkt
    assert res.status == [Status.OPTIMAL] * 3
    active = inactive = 0
    for i in range(3):
        z_r, l_r, n_r = qp_reference(*_sample(data, i))
        assert _close(z[i], z_r, 1e-8)
        assert _close(lam[i], l_r, 1e-8)
        assert nu.shape == (3, m) and _close(nu[i], n_r, 1e-8)
        active += int((l_r > 1e-3).sum())
        inactive += int((res.s[i].numpy() > 1e-3).sum())
    assert active > 0 and inactive > 0  # the comparison involves both kinds of rows


@pytest.mark.parametrize("shared_blocks", ["Q", "G", "A", "QG", "QA", "GA"])
@pytest.mark.parametrize("kkt", KKTS)
def test_any_mix_of_shared_and_batched_matrices(kkt, shared_blocks):
    """Each of Q, G, A may be shared or batched independently (a CVXPY problem whose
    parameter enters only A gives a shared Q and G with a batched A): the solution
    and the gradients equal those of the same data expanded to the batch."""
    B = 3
    base = random_qp(4, n=4, p=6, m=2, B=B, shared=True)
    mixed = [t if (name in shared_blocks or t.dim() != 2 or name not in "QGA")
             else t.unsqueeze(0).expand(B, -1, -1).clone()
             for name, t in zip(NAMES, base)]
    full = [t.unsqueeze(0).expand(B, -1, -1).clone() if (t.dim() == 2 and name in "QGA")
            else t for name, t in zip(NAMES, base)]
    inputs = [t.clone().requires_grad_(True) for t in mixed]
    ref_inputs = [t.clone().requires_grad_(True) for t in full]
    outs, res = _solve(inputs, QPSettings(kkt=kkt))
    ref_outs, _ = _solve(ref_inputs, QPSettings(kkt=kkt))
    assert res.status == [Status.OPTIMAL] * B
    for o, r in zip(outs, ref_outs):
        assert _close(o, r, 1e-9)
    weights = _weights(outs, 2)
    got = weighted_grads(outs, inputs, weights)
    ref = weighted_grads(ref_outs, ref_inputs, weights)
    for name, g, r, t in zip(NAMES, got, ref, mixed):
        expected = r.sum(0) if r.dim() > t.dim() else r  # a shared input gets the sum
        assert _close(g, expected, 1e-8), name


def test_slacks_and_residuals_are_reported():
    data = random_qp(2)
    (z, lam, nu), res = _solve(data)
    Q, q, G, h, A, b = data
    assert torch.allclose(res.s, h - torch.einsum("bpn,bn->bp", G, z), atol=1e-12)
    assert (res.residuals <= QPSettings().tolerance(DT)).all()
    assert (res.iterations > 0).all() and (res.iterations <= QPSettings().max_iter).all()


# ----------------------------------------------------------------------------
# Gradients: central differences, the conic path, gradcheck
# ----------------------------------------------------------------------------


@SHARED
@pytest.mark.parametrize("kkt", KKTS)
def test_gradients_of_all_six_inputs_match_central_differences(kkt, shared):
    data = random_qp(3, n=3, p=5, m=1, B=2, shared=shared)
    inputs = [t.clone().requires_grad_(True) for t in data]
    outs, res = _solve(inputs, QPSettings(kkt=kkt))
    assert res.kkt.name == kkt
    weights = _weights(outs, 1)
    got = weighted_grads(outs, inputs, weights)
    ref = _fd(data, weights, kkt)
    for name, g, r in zip(NAMES, got, ref):
        assert r.norm() > 1e-2, name  # a real derivative, not a comparison of zeros
        assert rel_err(g, r) < 1e-6, name


@SHARED
@pytest.mark.parametrize("kkt", KKTS)
def test_gradcheck_all_six_inputs_and_three_outputs(kkt, shared):
    data = random_qp(4, n=3, p=4, m=1, B=2, shared=shared)
    inputs = tuple(t.clone().requires_grad_(True) for t in data)
    settings = QPSettings(kkt=kkt)

    def fn(*a):
        return solve_qp(*a, batch=2, settings=settings)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@functools.cache
def _cvxpy_qp(n, p, m):
    """The engine's QP written in CVXPY with Q = FᵀF (DPP for the conic path too)."""
    F, q = cp.Parameter((n, n), name="F"), cp.Parameter(n, name="q")
    G, h = cp.Parameter((p, n), name="G"), cp.Parameter(p, name="h")
    A, b = cp.Parameter((m, n), name="A"), cp.Parameter(m, name="b")
    z = cp.Variable(n, name="z")
    ineq, eq = G @ z <= h, A @ z == b
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ z) + q @ z), [ineq, eq])
    return prob, [F, q, G, h, A, b], [z, ineq.dual_variables[0], eq.dual_variables[0]]


def _cvxpy_qp_data(seed, n, p, m, B, shared):
    """(F, q, G, h, A, b) with Q = FᵀF positive definite; see `random_qp`."""
    Q, q, G, h, A, b = random_qp(seed, n, p, m, B, shared)
    F = torch.linalg.cholesky(Q).mT.contiguous()  # FᵀF = Q
    return [F, q, G, h, A, b]


@functools.cache
def _conic(n, p, m):
    prob, params, outs = _cvxpy_qp(n, p, m)
    return conic_layer(prob, params, outs, solver_args=SCS_TIGHT)


@SHARED
def test_gradients_match_the_conic_path(shared):
    """solve_qp(FᵀF, ...) against diffcp + SCS on the same problem (∇F covers ∇Q)."""
    n, p, m, B = 4, 6, 2, 3
    data = _cvxpy_qp_data(5, n, p, m, B, shared)
    ours_in = [t.clone().requires_grad_(True) for t in data]
    conic_in = [t.clone().requires_grad_(True) for t in data]
    F, q, G, h, A, b = ours_in
    ours, _ = solve_qp(F.mT @ F, q, G, h, A, b, batch=B)
    theirs = _conic(n, p, m)(*conic_in)
    for o, t in zip(ours, theirs):
        assert (o - t).abs().max() < 1e-7
    weights = _weights(ours, 2)
    got = weighted_grads(ours, ours_in, weights)
    ref = weighted_grads(theirs, conic_in, weights)
    for name, g, r in zip(("F",) + NAMES[1:], got, ref):
        assert r.norm() > 1e-2, name
        assert rel_err(g, r) < 1e-6, name


# ----------------------------------------------------------------------------
# Cases the peers get wrong
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kkt", KKTS)
def test_weakly_active_constraint_has_finite_gradients(kkt):
    """Q = I, q = (−1, −3), G = I, h = (1, 1): z = (1, 1), row 0 active with λ₀ = 0.

    z₀ = min(−q₀, h₀) is not differentiable there: its one-sided derivatives in
    q₀ are −1 and 0 (in h₀: 0 and 1). The gradient must be finite and lie between
    them; everything that is differentiable must be exact.
    """
    f = QPFunction(verbose=-1, settings=QPSettings(kkt=kkt))
    inputs = [as_tensor(np.eye(2), True), as_tensor([-1.0, -3.0], True), as_tensor(np.eye(2), True),
              as_tensor([1.0, 1.0], True)]
    z = f(*inputs, E, E)
    # s₀ and λ₀ both vanish there; a stopping test on the total gap alone lets them stop
    # at √μ, a 1e-5 error in z₀ (Clarabel at 1e-10 tolerances: 1.1e-5).
    assert torch.allclose(z.detach(), as_tensor([[1.0, 1.0]]), atol=1e-8)
    dQ0, dq0, dG0, dh0 = torch.autograd.grad(z[0, 0], inputs, retain_graph=True)
    dQ1, dq1, dG1, dh1 = torch.autograd.grad(z[0, 1], inputs)
    for g in (dQ0, dq0, dG0, dh0, dQ1, dq1, dG1, dh1):
        assert torch.isfinite(g).all()
    # Row 1 is strongly active (λ₁ = 2): z₁ = h₁ exactly.
    assert torch.allclose(dh1, as_tensor([0.0, 1.0]), atol=1e-8)
    assert dq1.abs().max() < 1e-8 and dQ1.abs().max() < 1e-8 and dG1[0].abs().max() < 1e-8
    # Row 0 is weakly active: the gradient lies between the one-sided derivatives.
    assert -1 - 1e-8 <= float(dq0[0]) <= 1e-8 and abs(float(dq0[1])) < 1e-8
    assert -1e-8 <= float(dh0[0]) <= 1 + 1e-8 and abs(float(dh0[1])) < 1e-8
    # ... which re-solving confirms are −1 and 0.
    def z0_at(q0):
        return float(f(inputs[0].detach(), as_tensor([q0, -3.0]), inputs[2].detach(),
                       inputs[3].detach(), E, E)[0, 0])

    step = 1e-4
    assert abs((z0_at(-1 + step) - z0_at(-1)) / step + 1) < 1e-5
    assert abs((z0_at(-1) - z0_at(-1 - step)) / step) < 1e-5


@pytest.mark.parametrize("kkt", KKTS)
def test_duplicated_rows_in_G(kkt):
    """An active row given twice: z is unique (λ splits between the copies, their sum is
    unique). The derivative is taken through the duplication, so both copies move
    together, which is the direction in which the solution is differentiable."""
    data = random_qp(6, n=4, p=6, m=1, B=1, shared=True)
    z_r, l_r, n_r = qp_reference(*_sample(data, 0))
    k = int(np.argmax(l_r))
    assert l_r[k] > 1e-2  # duplicate a strongly active row

    def build(Q, q, G, h, A, b):
        return Q, q, torch.cat([G, G[k:k + 1]]), torch.cat([h, h[:, k:k + 1]], -1), A, b

    inputs = [t.clone().requires_grad_(True) for t in data]
    (z, lam, nu), res = _solve(build(*inputs), QPSettings(kkt=kkt))
    assert res.status == [Status.OPTIMAL]
    assert _close(z[0].detach(), z_r, 1e-8)
    lam_sum = lam[0, :-1].detach().clone()
    lam_sum[k] += lam[0, -1].detach()
    assert _close(lam_sum.numpy(), l_r, 1e-7)
    assert _close(nu[0].detach(), n_r, 1e-7)
    w = _weights([z], 3)
    got = weighted_grads([z], inputs, w)

    def fn(*a):
        return [_solve(build(*a), QPSettings(kkt=kkt, **FD_SETTINGS))[0][0]]

    ref = central_differences(fn, data, w, eps=FD_STEP)
    for name, g, r in zip(NAMES, got, ref):
        assert r.norm() > 1e-3, name
        assert rel_err(g, r) < 1e-6, name


@pytest.mark.parametrize("kkt", KKTS)
def test_duplicated_rows_in_A(kkt):
    """An equality given twice (consistent b): rank-deficient A; z unique, ν's sum unique."""
    data = random_qp(7, n=4, p=5, m=2, B=1, shared=True)
    z_r, l_r, n_r = qp_reference(*_sample(data, 0))

    def build(Q, q, G, h, A, b):
        return Q, q, G, h, torch.cat([A, A[:1]]), torch.cat([b, b[:, :1]], -1)

    inputs = [t.clone().requires_grad_(True) for t in data]
    (z, lam, nu), res = _solve(build(*inputs), QPSettings(kkt=kkt))
    assert res.status == [Status.OPTIMAL]
    assert _close(z[0].detach(), z_r, 1e-8)
    assert _close(lam[0].detach(), l_r, 1e-7)
    nu_sum = nu[0, :2].detach().clone()
    nu_sum[0] += nu[0, 2].detach()
    assert _close(nu_sum.numpy(), n_r, 1e-7)
    w = _weights([z, lam], 4)
    got = weighted_grads([z, lam], inputs, w)

    def fn(*a):
        return _solve(build(*a), QPSettings(kkt=kkt, **FD_SETTINGS))[0][:2]

    ref = central_differences(fn, data, w, eps=FD_STEP)
    for name, g, r in zip(NAMES, got, ref):
        assert r.norm() > 1e-3, name
        assert rel_err(g, r) < 1e-6, name


def _lp_at_vertex(seed, n=3, p=6, B=2):
    """LPs (Q = 0) with a unique, non-degenerate optimal vertex on rows 0..n−1."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((B, p, n))
    z = rng.standard_normal((B, n))
    h = np.einsum("bpn,bn->bp", G, z)
    h[:, n:] += 0.5 + rng.random((B, p - n))  # inactive rows: strictly slack
    lam = 0.5 + rng.random((B, n))  # active rows: strictly positive multipliers
    q = -np.einsum("bpn,bp->bn", G[:, :n], lam)
    return np.zeros((B, n, n)), q, G, h


def test_lp_q_zero_matches_the_vertex_closed_form():
    """z = G_B⁻¹h_B and λ_B = −G_B⁻ᵀ(q + Qz) (Q enters only through λ at Q = 0)."""
    n, p, B = 3, 6, 2
    inputs = [as_tensor(v, True) for v in _lp_at_vertex(8, n, p, B)]
    Q, q, G, h = inputs
    A, b = torch.zeros(B, 0, n, dtype=DT), torch.zeros(B, 0, dtype=DT)
    (z, lam, _), res = solve_qp(Q, q, G, h, A, b, batch=B)
    assert res.kkt.name == "reduced"  # Q = 0 has no Cholesky factor
    GB = G[:, :n]
    z_ref = torch.linalg.solve(GB, h[:, :n])
    S = 0.5 * (Q + Q.mT)
    lam_B = -torch.linalg.solve(GB.mT, q + (S @ z_ref.unsqueeze(-1)).squeeze(-1))
    lam_ref = torch.cat([lam_B, torch.zeros(B, p - n, dtype=DT)], -1)
    assert (z - z_ref).abs().max() < 1e-8 and (lam - lam_ref).abs().max() < 1e-8
    for i in range(B):
        z_c, l_c, _ = qp_reference(*_sample([Q, q, G, h, A, b], i))
        assert _close(z[i].detach(), z_c, 1e-8)
    w = _weights([z, lam], 5)
    got = weighted_grads([z, lam], inputs, w)
    ref = weighted_grads([z_ref, lam_ref], inputs, w)
    for name, g, r in zip(NAMES, got, ref):
        assert r.norm() > 1e-2, name
        assert rel_err(g, r) < 1e-6, name


def test_lp_refuses_schur_elimination():
    Q, q, G, h = (as_tensor(v) for v in _lp_at_vertex(8))
    with pytest.raises(ValueError, match="reduced"):
        solve_qp(Q, q, G, h, torch.zeros(0, 3, dtype=DT), torch.zeros(0, dtype=DT), batch=2,
                 settings=QPSettings(kkt="schur"))


def _singular_qp(seed, n=4, rank=2, B=2):
    """PSD Q of rank 2 (in n = 4), bounded by a box and two more rows, one equality."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((B, n, rank))
    Q = L @ L.transpose(0, 2, 1)
    extra = rng.standard_normal((B, 2, n))
    G = np.concatenate([np.broadcast_to(np.eye(n), (B, n, n)),
                        np.broadcast_to(-np.eye(n), (B, n, n)), extra], 1)
    z0 = 0.5 * (rng.random((B, n)) - 0.5)
    h = np.concatenate([np.ones((B, 2 * n)), np.einsum("bpn,bn->bp", extra, z0) + 0.3], 1)
    A = rng.standard_normal((B, 1, n))
    b = np.einsum("bmn,bn->bm", A, z0)
    q = 2.0 * rng.standard_normal((B, n))
    return [as_tensor(x) for x in (Q, q, G, h, A, b)]


def test_singular_psd_q_matches_clarabel_and_central_differences():
    data = _singular_qp(9)
    assert (torch.linalg.matrix_rank(data[0]) == 2).all()
    inputs = [t.clone().requires_grad_(True) for t in data]
    (z, lam, nu), res = _solve(inputs)
    assert res.kkt.name == "reduced" and res.status == [Status.OPTIMAL] * 2
    for i in range(2):
        z_r, l_r, n_r = qp_reference(*_sample(data, i))
        assert _close(z[i].detach(), z_r, 1e-8)
        assert _close(lam[i].detach(), l_r, 1e-7)
        assert _close(nu[i].detach(), n_r, 1e-7)
    weights = _weights([z, lam, nu], 6)
    got = weighted_grads([z, lam, nu], inputs, weights)
    ref = _fd(data, weights)
    for name, g, r in zip(NAMES, got, ref):
        assert r.norm() > 1e-3, name
        assert rel_err(g, r) < 1e-6, name
    with pytest.raises(ValueError, match="reduced"):
        _solve(data, QPSettings(kkt="schur"))


@pytest.mark.parametrize("kkt", KKTS)
def test_nonsymmetric_q_is_its_symmetric_part_with_a_symmetric_gradient(kkt):
    Q, q, G, h, A, b = random_qp(10, B=2)
    K = as_tensor(np.random.default_rng(10).standard_normal((2, 4, 4)))
    Q_ns = (Q + K - K.mT).requires_grad_(True)  # symmetric part Q
    Q_s = Q.clone().requires_grad_(True)
    settings = QPSettings(kkt=kkt)
    out_ns, _ = solve_qp(Q_ns, q, G, h, A, b, batch=2, settings=settings)
    out_s, _ = solve_qp(Q_s, q, G, h, A, b, batch=2, settings=settings)
    for u, v in zip(out_ns, out_s):
        assert (u - v).abs().max() < 1e-12
    w = _weights(out_s, 7)
    (g_ns,) = weighted_grads(out_ns, [Q_ns], w)
    (g_s,) = weighted_grads(out_s, [Q_s], w)
    assert (g_ns - g_ns.mT).abs().max() < 1e-12
    assert (g_ns - g_s).abs().max() < 1e-12
    # and it is the derivative of the non-symmetric input, entry by entry
    (ref,) = _fd([Q_ns.detach()], w, kkt, build=lambda Q_: (Q_, q, G, h, A, b))
    assert rel_err(g_ns, ref) < 1e-6


# ----------------------------------------------------------------------------
# Infeasible, unbounded, masked
# ----------------------------------------------------------------------------


def _box_batch():
    """Three 3-variable problems with shared Q, G, A; sample 1 is infeasible (z ≤ −1, Σz ≥ 1).

    Samples 0 and 2 each have one active row (z₀ ≤ 1, and Σz ≥ −3)."""
    Q = as_tensor(2 * np.eye(3) + 0.3, True)
    G = as_tensor(np.vstack([np.eye(3), -np.ones((1, 3))]), True)
    A = as_tensor([[1.0, -1.0, 0.0]], True)
    b = as_tensor([0.2], True)
    h = as_tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1], [2, 0.5, 1, 3]], True)
    q = as_tensor([[-6.0, 1.0, 0.5], [0.0, 0.0, 0.0], [4.0, 3.0, 5.0]], True)
    return [Q, q, G, h, A, b]


@pytest.mark.parametrize("kkt", KKTS)
def test_infeasible_sample_raises_with_indices_and_statuses(kkt):
    data = _box_batch()
    with pytest.raises(declarative.SolverError) as info:
        QPFunction(verbose=-1, settings=QPSettings(kkt=kkt))(*data)
    assert info.value.indices == [1]
    assert info.value.statuses == [Status.INFEASIBLE]
    assert "1: infeasible" in str(info.value)
    _, res = _solve([t.detach() for t in data], QPSettings(kkt=kkt))
    assert res.status == [Status.OPTIMAL, Status.INFEASIBLE, Status.OPTIMAL]


def test_inconsistent_equalities_are_infeasible():
    Q = torch.eye(2, dtype=DT)
    A, b = as_tensor([[1.0, 1.0], [1.0, 1.0]]), as_tensor([0.0, 1.0])
    with pytest.raises(declarative.SolverError) as info:
        QPFunction(verbose=-1)(Q, torch.zeros(2, dtype=DT), E, E, A, b)
    assert info.value.statuses == [Status.INFEASIBLE]


@pytest.mark.parametrize("kkt", KKTS)
def test_mask_keeps_feasible_samples_and_zeroes_infeasible_gradients(kkt):
    data = _box_batch()
    f = QPFunction(verbose=-1, on_failure="mask", settings=QPSettings(kkt=kkt))
    z = f(*data)
    assert torch.isnan(z[1]).all() and torch.isfinite(z[[0, 2]]).all()
    w = _weights([z], 8)[0]
    grads = torch.autograd.grad((torch.nan_to_num(z) * w).sum(), data)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[1][1].abs().max() == 0 and grads[3][1].abs().max() == 0
    # Each feasible sample equals its solo solve; shared gradients are the sum of theirs.
    solo_sum = [torch.zeros_like(data[k]) for k in (0, 2, 4, 5)]
    for i in (0, 2):
        inputs = [data[0], data[1][i:i + 1], data[2], data[3][i:i + 1], data[4], data[5]]
        zi = QPFunction(verbose=-1, settings=QPSettings(kkt=kkt))(*inputs)
        assert (zi[0] - z[i]).abs().max() < 1e-12
        gi = torch.autograd.grad((zi[0] * w[i]).sum(), inputs)
        assert gi[3].abs().max() > 0.1  # an active row
        assert _close(grads[1][i], gi[1][0], 1e-9) and _close(grads[3][i], gi[3][0], 1e-9)
        solo_sum = [s + gi[k] for s, k in zip(solo_sum, (0, 2, 4, 5))]
    for k, s in zip((0, 2, 4, 5), solo_sum):
        assert _close(grads[k], s, 1e-9), NAMES[k]


def test_unbounded_lp_reports_unbounded():
    """min −z₀ s.t. z₀ ≥ 0, |z₁| ≤ 1 (Q = 0); and a singular-Q QP unbounded along z₁."""
    G = as_tensor([[-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    h = as_tensor([0.0, 1.0, 1.0])
    lp = (torch.zeros(2, 2, dtype=DT), as_tensor([-1.0, 0.0]), G, h, E, E)
    qp = (as_tensor([[1.0, 0.0], [0.0, 0.0]]), as_tensor([0.0, -1.0]), G[:1], h[:1], E, E)
    for Q, q, G_, h_, A, b in (lp, qp):
        _, res = solve_qp(Q, q, G_, h_, *_no_constraints(2), batch=1)
        assert res.status == [Status.UNBOUNDED]
        with pytest.raises(declarative.SolverError) as info:
            QPFunction(verbose=-1)(Q, q, G_, h_, A, b)
        assert info.value.statuses == [Status.UNBOUNDED]


# ----------------------------------------------------------------------------
# Equality-only, unconstrained, free rows
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kkt", KKTS)
def test_equality_only_matches_the_kkt_closed_form(kkt):
    data = random_qp(12, n=4, p=1, m=2, B=2)
    Q, q, _, _, A, b = (t.clone().requires_grad_(True) for t in data)
    z = QPFunction(verbose=-1, settings=QPSettings(kkt=kkt))(Q, q, E, E, A, b)
    zero = torch.zeros(2, 2, 2, dtype=DT)
    K = torch.cat([torch.cat([0.5 * (Q + Q.mT), A.mT], -1), torch.cat([A, zero], -1)], -2)
    z_ref = torch.linalg.solve(K, torch.cat([-q, b], -1))[:, :4]
    assert (z - z_ref).abs().max() < 1e-10
    w = _weights([z], 9)
    got = weighted_grads([z], [Q, q, A, b], w)
    ref = weighted_grads([z_ref], [Q, q, A, b], w)
    for name, g, r in zip("QqAb", got, ref):
        assert rel_err(g, r) < 1e-8, name


@pytest.mark.parametrize("kkt", KKTS)
def test_unconstrained_is_minus_q_inverse_q(kkt):
    data = random_qp(13, B=2)
    Q, q = (t.clone().requires_grad_(True) for t in data[:2])
    z = QPFunction(verbose=-1, settings=QPSettings(kkt=kkt))(Q, q, E, E, E, E)
    z_ref = -torch.linalg.solve(0.5 * (Q + Q.mT), q)
    assert (z - z_ref).abs().max() < 1e-10
    w = _weights([z], 10)
    for g, r in zip(weighted_grads([z], [Q, q], w), weighted_grads([z_ref], [Q, q], w)):
        assert rel_err(g, r) < 1e-8


@SHARED
@pytest.mark.parametrize("kkt", KKTS)
def test_infinite_h_rows_equal_dropping_them(kkt, shared):
    data = random_qp(14, n=4, p=6, m=2, B=3, shared=shared)
    Q, q, G, h, A, b = data
    keep = [[1, 2, 4, 5], [], [0, 2, 3, 4, 5]]  # sample 1: every row free
    h_inf = h.clone()
    for i, rows in enumerate(keep):
        h_inf[i, [r for r in range(6) if r not in rows]] = float("inf")
    inputs = [Q, q, G, h_inf, A, b]
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    settings = QPSettings(kkt=kkt)
    (z, lam, nu), res = _solve(inputs, settings)
    assert res.status == [Status.OPTIMAL] * 3
    assert torch.isinf(res.s[1]).all()
    w = _weights([z, lam, nu], 11)
    grads = weighted_grads([z, lam, nu], inputs, w)
    # The same samples solved alone with the free rows dropped, their gradients laid
    # out like the inputs (zero on the dropped rows) and summed for shared inputs.
    expected = [torch.zeros_like(t) for t in inputs]
    for i, rows in enumerate(keep):
        free = [r for r in range(6) if r not in rows]
        solo = _sample([Q, q, G, h, A, b], i)
        solo[2], solo[3] = solo[2][rows], solo[3][rows]
        solo = [as_tensor(x[None], True) for x in solo]
        (zi, li, ni), _ = solve_qp(*solo, batch=1, settings=settings)
        assert _close(z[i], zi[0], 1e-9)
        assert _close(lam[i, rows], li[0], 1e-9) and (lam[i, free] == 0).all()
        gQ, gq, gG, gh, gA, gb = weighted_grads([zi, li, ni], solo,
                                        [w[0][i:i + 1], w[1][i:i + 1, rows], w[2][i:i + 1]])
        gG_all = torch.zeros(6, 4, dtype=DT).index_copy(0, torch.tensor(rows, dtype=torch.long),
                                                         gG[0])
        gh_all = torch.zeros(6, dtype=DT).index_copy(0, torch.tensor(rows, dtype=torch.long),
                                                     gh[0])
        for k, g in enumerate((gQ[0], gq[0], gG_all, gh_all, gA[0], gb[0])):
            if inputs[k].dim() == g.dim() + 1:  # batched input: this sample's slice
                expected[k][i] = g
            else:  # shared input: the sum over the batch
                expected[k] += g
        if free:  # h = +inf rows: no constraint, no sensitivity
            assert grads[3][i, free].abs().max() < 1e-12
            if not shared:
                assert grads[2][i, free].abs().max() < 1e-12
    for name, g, e in zip(NAMES, grads, expected):
        assert e.norm() > 1e-2, name
        assert rel_err(g, e) < 1e-7, name


# ----------------------------------------------------------------------------
# dtype and broadcasting
# ----------------------------------------------------------------------------


def _float32_vs_float64(seed, kkt, n=4, p=6, m=2, B=8):
    data = random_qp(seed, n=n, p=p, m=m, B=B)
    in64 = [t.clone().requires_grad_(True) for t in data]
    in32 = [t.float().requires_grad_(True) for t in data]
    settings = QPSettings(kkt=kkt)
    out64, _ = _solve(in64, settings)
    out32, res32 = _solve(in32, settings)
    assert all(o.dtype == torch.float32 for o in out32)
    w = _weights(out64, 12)
    g64 = weighted_grads(out64, in64, w)
    g32 = weighted_grads(out32, in32, [x.float() for x in w])
    assert all(g.dtype == torch.float32 for g in g32)
    return res32, out32, out64, g32, g64


@pytest.mark.parametrize("kkt", ["schur", "reduced"])
def test_float32_end_to_end_is_close_to_float64(kkt):
    """float32 in, float32 out; the reduced form computes in float64 internally."""
    res32, out32, out64, g32, g64 = _float32_vs_float64(0, kkt)
    assert res32.kkt.name == kkt
    for o32, o64 in zip(out32, out64):
        assert _close(o32, o64, 1e-4)
    for name, g, r in zip(NAMES, g32, g64):
        if r.norm() > 0:
            assert rel_err(g.double(), r) < 1e-3, name


def test_float32_default_settings_when_auto_picks_reduced():
    res32, out32, out64, g32, g64 = _float32_vs_float64(0, "auto", n=3, p=8, m=0)
    assert res32.kkt.name == "reduced"
    for o32, o64 in zip(out32, out64):
        assert _close(o32, o64, 1e-4)
    for name, g, r in zip(NAMES[:4], g32, g64):
        assert rel_err(g.double(), r) < 1e-3, name


def test_mixed_dtypes_promote_to_float64():
    Q, q, G, h, A, b = random_qp(15, B=2)
    z = QPFunction(verbose=-1)(Q.float(), q, G.float(), h, A, b.float())
    assert z.dtype == torch.float64


def test_broadcast_gradients_are_sums_and_qpth_returns_the_mean():
    """Shared Q, G, h, A, b with a batched q: ∇(shared) = Σ_i ∇_i (what autograd does for a
    broadcast); qpth returns the mean, so ours = nBatch × qpth's (documented deviation)."""
    qpth = pytest.importorskip("qpth.qp")
    B = 4
    Q, q, G, h, A, b = random_qp(16, n=4, p=6, m=1, B=B, shared=True)
    h, b = h[0], b[0]  # one Slater point: every sample feasible
    ours_in = [t.clone().requires_grad_(True) for t in (Q, q, G, h, A, b)]
    z = QPFunction(verbose=-1)(*ours_in)
    w = _weights([z], 13)[0]
    ours = torch.autograd.grad((w * z).sum(), ours_in)
    solo_sum = [torch.zeros_like(t) for t in ours_in]
    for i in range(B):
        inputs = [t.detach().clone().requires_grad_(True) for t in (Q, q[i], G, h, A, b)]
        zi = QPFunction(verbose=-1)(*inputs)
        gi = list(torch.autograd.grad((w[i] * zi[0]).sum(), inputs))
        gi[1] = torch.zeros_like(q).index_copy(0, torch.tensor([i]), gi[1][None])
        solo_sum = [s + g for s, g in zip(solo_sum, gi)]
    for name, g, s in zip(NAMES, ours, solo_sum):
        assert s.norm() > 1e-3, name
        assert rel_err(g, s) < 1e-8, name

    qpth_in = [t.clone().requires_grad_(True) for t in (Q, q, G, h, A, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z_qpth = qpth.QPFunction(verbose=-1)(*qpth_in)
        theirs = torch.autograd.grad((w * z_qpth).sum(), qpth_in)
    assert (z - z_qpth).abs().max() < 1e-6
    assert rel_err(ours[1], theirs[1]) < 1e-5  # the batched input: same convention
    for name, g, t in zip(NAMES, ours, theirs):
        if name != "q":
            assert rel_err(g, B * t) < 1e-5, name


# ----------------------------------------------------------------------------
# QPFunction as a drop-in for qpth
# ----------------------------------------------------------------------------


def _qpth_case(kind):
    Q, q, G, h, A, b = random_qp(17, n=4, p=6, m=2, B=3)
    if kind == "unbatched":
        return Q[0], q[0], G[0], h[0], E, E
    if kind == "batched p":  # constraints shared: feasible for every q
        return Q[0], q, G[0], h[0], E, E
    if kind == "all batched":
        return Q, q, G, h, E, E
    return Q, q, G, h, A, b  # with equalities


@pytest.mark.parametrize("kind", ["unbatched", "batched p", "all batched", "equalities"])
def test_qpfunction_matches_qpth_and_returns_nbatch_by_nz(kind):
    qpth = pytest.importorskip("qpth.qp")
    args = _qpth_case(kind)
    batch = 1 if kind == "unbatched" else 3
    z = QPFunction(verbose=-1)(*args)
    assert z.shape == (batch, 4) and z.dtype == DT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z_qpth = qpth.QPFunction(verbose=-1)(*args)
    assert z_qpth.shape == z.shape
    assert (z - z_qpth).abs().max() < 1e-6
    for i in range(batch):
        z_r, _, _ = qp_reference(*_sample(args, i))
        assert _close(z[i].numpy(), z_r, 1e-8)


def test_qpfunction_accepts_qpth_positional_arguments_and_solver_enum():
    Q, q, G, h, _, _ = random_qp(18, B=2)
    z_named = QPFunction(eps=1e-9, verbose=-1, notImprovedLim=5, maxIter=30)(Q, q, G, h, E, E)
    for solver in (QPSolvers.PDIPM_BATCHED, QPSolvers.CVXPY):
        # qpth's order: eps, verbose, notImprovedLim, maxIter, solver, check_Q_spd
        z = QPFunction(1e-9, -1, 5, 30, solver, True)(Q, q, G, h, E, E)
        assert (z - z_named).abs().max() < 1e-12
    for i in range(2):
        assert _close(z_named[i], qp_reference(*_sample([Q, q, G, h, E, E], i))[0], 1e-7)


def test_qpfunction_return_info_and_max_iter_warning():
    Q, q, G, h, A, b = random_qp(19, B=2)
    z, res = QPFunction(verbose=-1)(Q, q, G, h, A, b, return_info=True)
    assert res.status == [Status.OPTIMAL] * 2
    # Four iterations leave a usable point (residuals within 1e-2): max_iter.
    with pytest.warns(UserWarning, match="max_iter"):
        z = QPFunction(verbose=0, maxIter=4)(Q, q, G, h, A, b)
    assert torch.isfinite(z).all()  # the best iterate, not a failure by default
    with pytest.raises(declarative.SolverError) as info:
        QPFunction(verbose=-1, maxIter=4, strict=True)(Q, q, G, h, A, b)
    assert info.value.statuses == [Status.MAX_ITER] * 2
    # One leaves residuals of 0.4: no solution, whatever the cap says.
    with pytest.raises(declarative.SolverError) as info:
        QPFunction(verbose=-1, maxIter=1)(Q, q, G, h, A, b)
    assert info.value.statuses == [Status.NUMERICAL_ERROR] * 2


def test_check_q_spd_refuses_indefinite_q_naming_q():
    Q, q, G, h, A, b = random_qp(20, B=2)
    bad = Q.clone()
    bad[1] = torch.diag(as_tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"Q must be positive semidefinite at batch index 1"):
        QPFunction(verbose=-1, check_Q_spd=True)(bad, q, G, h, A, b)
    # a single Q shared by the batch: no batch index to name
    with pytest.raises(ValueError, match=r"Q must be positive semidefinite: its smallest"):
        QPFunction(verbose=-1, check_Q_spd=True)(bad[1], q, G, h, A, b)
    # PSD but singular is accepted (qpth refuses it), and so is Q = 0 (an LP)
    Qz, qz, Gz, hz = (as_tensor(v[0]) for v in _lp_at_vertex(8))
    z = QPFunction(verbose=-1, check_Q_spd=True)(Qz, qz, Gz, hz, E, E)
    assert torch.isfinite(z).all()


def _valid():
    Q, q, G, h, A, b = random_qp(21, n=3, p=3, m=1, B=2)
    return [Q, q, G, h, A, b]


def _with(k, value):
    args = _valid()
    args[k] = value(args[k]) if callable(value) else value
    return args


def _nan_at(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


VALIDATION = {
    "Q not square": (lambda: _with(0, torch.ones(2, 3, 2, dtype=DT)), ValueError, r"^Q must"),
    "Q 1-d": (lambda: _with(0, torch.ones(3, dtype=DT)), ValueError, r"^Q must"),
    "p wrong nz": (lambda: _with(1, torch.ones(2, 4, dtype=DT)), ValueError, r"^p must"),
    "G wrong nz": (lambda: _with(2, torch.ones(2, 3, 2, dtype=DT)), ValueError, r"^G must"),
    "h wrong rows": (lambda: _with(3, torch.ones(2, 2, dtype=DT)), ValueError, r"^h must"),
    "A wrong nz": (lambda: _with(4, torch.ones(2, 1, 4, dtype=DT)), ValueError, r"^A must"),
    "b wrong rows": (lambda: _with(5, torch.ones(2, 2, dtype=DT)), ValueError, r"^b must"),
    "b absent": (lambda: _with(5, E), ValueError, r"^b must"),
    "batch Q vs p": (lambda: _with(1, torch.ones(5, 3, dtype=DT)), ValueError,
                     r"Inconsistent batch sizes: Q: 2, p: 5"),
    "batch h vs b": (lambda: _with(5, torch.ones(4, 1, dtype=DT)), ValueError,
                     r"Inconsistent batch sizes: .*h: 2.*b: 4"),
    **{f"NaN in {n}": ((lambda k=k: _with(k, _nan_at)), ValueError,
                       rf"^{n} contains NaN at batch index 0")
       for k, n in enumerate(("Q", "p", "G", "h", "A", "b"))},
    **{f"int {n}": ((lambda k=k: _with(k, lambda t: t.long())), TypeError,
                    rf"^{n} \(argument {k}\) must be a float32 or float64 tensor")
       for k, n in enumerate(("Q", "p", "G", "h", "A", "b"))},
    "list Q": (lambda: _with(0, [[1.0]]), TypeError, r"^Q \(argument 0\) must be a torch.Tensor"),
    "-inf h": (lambda: _with(3, lambda t: t.index_fill(1, torch.tensor([0]), -float("inf"))),
               ValueError, r"^h contains ±inf"),
    "+inf p": (lambda: _with(1, lambda t: t.index_fill(1, torch.tensor([0]), float("inf"))),
               ValueError, r"^p contains ±inf"),
}


@pytest.mark.parametrize("case", list(VALIDATION))
def test_qpfunction_input_errors_name_the_argument(case):
    make, exc, pattern = VALIDATION[case]
    with pytest.raises(exc, match=pattern):
        QPFunction(verbose=-1)(*make())


# ----------------------------------------------------------------------------
# CvxpyLayer: QPs are routed to the engine
# ----------------------------------------------------------------------------


@functools.cache
def _qp_layer(n, p, m):
    prob, params, outs = _cvxpy_qp(n, p, m)
    return CvxpyLayer(prob, params, outs, backend="qp")  # the dense engine's tests


@SHARED
def test_cvxpylayer_routes_qp_and_agrees_with_conic_and_clarabel(shared):
    n, p, m, B = 4, 6, 2, 3
    layer = _qp_layer(n, p, m)
    assert layer.backend == "qp"
    data = _cvxpy_qp_data(22, n, p, m, B, shared)
    qp_in = [t.clone().requires_grad_(True) for t in data]
    conic_in = [t.clone().requires_grad_(True) for t in data]
    ours, info = layer(*qp_in, return_info=True)
    assert info.backend == "qp" and info.ok
    theirs = _conic(n, p, m)(*conic_in)
    for o, t in zip(ours, theirs):  # z, then the inequality and equality duals
        assert o.shape == t.shape == (B, o.shape[-1])
        assert (o - t).abs().max() < 1e-7
    weights = _weights(ours, 14)
    for name, g, r in zip(("F",) + NAMES[1:], weighted_grads(ours, qp_in, weights),
                          weighted_grads(theirs, conic_in, weights)):
        assert r.norm() > 1e-2, name
        assert rel_err(g, r) < 1e-6, name
    prob, params, outs = _cvxpy_qp(n, p, m)
    for i in range(B):
        values = [t[i] if t.dim() == len(par.shape) + 1 else t for t, par in zip(data, params)]
        ref = reference_solve(prob, params, [v.numpy() for v in values], outs)
        for o, r in zip(ours, ref):  # primal, and CVXPY's dual_value for each constraint
            assert _close(o[i].detach(), r, 1e-8)


def test_cvxpylayer_sum_squares_fit_routes_to_qp():
    """Constrained least squares: sum_squares objective, affine constraints."""
    m, n = 6, 3
    A, y = cp.Parameter((m, n)), cp.Parameter(m)
    x = cp.Variable(n)
    con = [x >= -0.2, cp.sum(x) == 0.5]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - y)), con)
    layer = CvxpyLayer(prob, [A, y], [x, con[0].dual_variables[0]])
    assert layer.backend == "qp"
    conic = conic_layer(prob, [A, y], [x, con[0].dual_variables[0]], solver_args=SCS_TIGHT)
    rng = np.random.default_rng(23)
    A_v = as_tensor(rng.standard_normal((2, m, n)), True)
    y_v = as_tensor(3 * rng.standard_normal((2, m)), True)
    A_c, y_c = (t.detach().clone().requires_grad_(True) for t in (A_v, y_v))
    ours, theirs = layer(A_v, y_v), conic(A_c, y_c)
    assert (ours[1] > 1e-3).any()  # some bound is active
    for o, t in zip(ours, theirs):
        assert (o - t).abs().max() < 1e-7
    w = _weights(ours, 15)
    for g, r in zip(weighted_grads(ours, [A_v, y_v], w), weighted_grads(theirs, [A_c, y_c], w)):
        assert rel_err(g, r) < 1e-6


def test_cvxpylayer_qp_path_reports_infeasible_samples_and_masks_them():
    layer = _qp_layer(4, 6, 2)
    data = _cvxpy_qp_data(29, 4, 6, 2, 3, False)
    G, h = data[2].clone(), data[3].clone()
    G[1, 1] = -G[1, 0]  # sample 1: gᵀz ≤ −1 and −gᵀz ≤ −1 cannot both hold
    h[1, :2] = -1.0
    data[2], data[3] = G, h
    with pytest.raises(declarative.SolverError) as info:
        layer(*data)
    assert info.value.indices == [1] and info.value.statuses == [Status.INFEASIBLE]
    inputs = [t.clone().requires_grad_(True) for t in data]
    outs_, sol = layer(*inputs, on_failure="mask", return_info=True)
    assert sol.status[1] is Status.INFEASIBLE
    for o in outs_:
        assert torch.isnan(o[1]).all() and torch.isfinite(o[[0, 2]]).all()
    grads = torch.autograd.grad(sum(torch.nan_to_num(o).sum() for o in outs_), inputs)
    for g in grads:
        assert torch.isfinite(g).all() and g[1].abs().max() == 0
    # the feasible samples are what they are alone
    solo = layer(*[t[[0, 2]] for t in data])
    for o, s_ in zip(outs_, solo):
        assert _close(o[[0, 2]], s_, 1e-10)


def _quad_form_problem(n):
    P, q = cp.Parameter((n, n), PSD=True), cp.Parameter(n)
    x = cp.Variable(n)
    with scopes.quad_form_dpp_scope():
        objective = 0.5 * cp.quad_form(x, P) + q @ x
    return P, q, x, objective


def test_parametric_quad_form_matches_the_kkt_closed_form():
    n, B = 3, 2
    P, q, x, objective = _quad_form_problem(n)
    a = np.ones((1, n))
    prob = cp.Problem(cp.Minimize(objective), [a @ x == 1])
    layer = CvxpyLayer(prob, [P, q], [x])
    assert layer.backend == "qp"
    with pytest.raises(NotDPPError):  # why the reference is a closed form
        conic_layer(prob, [P, q], [x])
    rng = np.random.default_rng(24)
    L = rng.standard_normal((B, n, n))
    P_v = as_tensor(L @ L.transpose(0, 2, 1) + 0.1 * np.eye(n), True)
    q_v = as_tensor(rng.standard_normal((B, n)), True)
    (x_star,) = layer(P_v, q_v)
    A = as_tensor(a)
    S = torch.triu(P_v) + torch.triu(P_v, 1).mT  # a symmetric Parameter is its upper triangle
    K = torch.cat([torch.cat([S, A.mT.expand(B, n, 1)], -1),
                   torch.cat([A.expand(B, 1, n), torch.zeros(B, 1, 1, dtype=DT)], -1)], -2)
    x_ref = torch.linalg.solve(K, torch.cat([-q_v, torch.ones(B, 1, dtype=DT)], -1))[:, :n]
    assert (x_star - x_ref).abs().max() < 1e-9
    w = _weights([x_star], 16)
    (gP, gq) = weighted_grads([x_star], [P_v, q_v], w)
    (rP, rq) = weighted_grads([x_ref], [P_v, q_v], w)
    assert (gP.tril(-1) == 0).all()  # the strictly lower triangle is not read
    assert rel_err(gP, rP) < 1e-7 and rel_err(gq, rq) < 1e-7


def test_parametric_quad_form_with_inequalities_matches_central_differences():
    n = 3
    P, q, x, objective = _quad_form_problem(n)
    prob = cp.Problem(cp.Minimize(objective), [x <= 0.3, cp.sum(x) >= -1])
    layer = CvxpyLayer(prob, [P, q], [x])
    assert layer.backend == "qp"
    L = np.random.default_rng(25).standard_normal((n, n))
    P_v = as_tensor(L @ L.T + 0.2 * np.eye(n), True)
    q_v = as_tensor(-1 + np.random.default_rng(0).standard_normal(n), True)
    (x_star,) = layer(P_v, q_v)
    assert int((x_star.detach() > 0.3 - 1e-6).sum()) == 1  # one active bound, not a vertex
    z_r, _, _ = qp_reference(P_v.detach().numpy(), q_v.detach().numpy(),
                             np.vstack([np.eye(n), -np.ones((1, n))]),
                             np.r_[0.3 * np.ones(n), 1.0], np.zeros((0, n)), np.zeros(0))
    assert _close(x_star.detach(), z_r, 1e-8)
    w = _weights([x_star], 17)
    got = weighted_grads([x_star], [P_v, q_v], w)

    def fn(P_, q_):  # P is read from its upper triangle; one-entry steps keep it PD
        return layer(P_, q_, solver_args=FD_SETTINGS)

    ref = central_differences(fn, [P_v.detach(), q_v.detach()], w, eps=FD_STEP)
    for g, r in zip(got, ref):
        assert r.norm() > 1e-3
        assert rel_err(g, r) < 1e-6


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,kkt,tol", [
    (torch.float64, "schur", 1e-9),
    (torch.float64, "reduced", 1e-9),
    (torch.float32, "schur", 1e-4),  # float32 reduced: see the bug above
], ids=["float64-schur", "float64-reduced", "float32-schur"])
@SHARED
def test_cuda_matches_cpu(dtype, kkt, tol, shared):
    data = random_qp(26, n=4, p=6, m=2, B=8, shared=shared, dtype=dtype)
    cpu_in = [t.clone().requires_grad_(True) for t in data]
    gpu_in = [t.cuda().requires_grad_(True) for t in data]
    settings = QPSettings(kkt=kkt)
    cpu_out, _ = _solve(cpu_in, settings)
    gpu_out, res = _solve(gpu_in, settings)
    assert res.status == [Status.OPTIMAL] * 8
    assert res.kkt.name == kkt
    for c, g in zip(cpu_out, gpu_out):
        assert g.device.type == "cuda" and g.dtype == dtype
        assert _close(g, c, tol)
    w = _weights(cpu_out, 18)
    g_cpu = weighted_grads(cpu_out, cpu_in, w)
    g_gpu = weighted_grads(gpu_out, gpu_in, [x.cuda() for x in w])
    for name, c, g in zip(NAMES, g_cpu, g_gpu):
        assert g.device.type == "cuda"
        assert rel_err(g.cpu().double(), c.double()) < (1e-8 if dtype == DT else 1e-3), name


@pytest.mark.cuda
def test_cuda_qpfunction_and_layer_keep_the_device():
    Q, q, G, h, A, b = (t.cuda() for t in random_qp(27, B=2))
    z = QPFunction(verbose=-1)(Q, q, G, h, A, b)
    assert z.device.type == "cuda" and z.shape == (2, 4)
    data = [t.cuda() for t in _cvxpy_qp_data(28, 4, 6, 2, 2, False)]
    outs = _qp_layer(4, 6, 2)(*data)
    assert all(o.device.type == "cuda" for o in outs)


# ----------------------------------------------------------------------------
# Property test
# ----------------------------------------------------------------------------


@st.composite
def _feasible_qps(draw):
    n = draw(st.integers(1, 4))
    p = draw(st.integers(0, 5))
    m = draw(st.integers(0, n - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    semidefinite = draw(st.booleans())
    rng = np.random.default_rng(seed)
    # Q = LLᵀ + εI; semidefinite: rank n − 1 (rank 1 for n = 1), ε = 0, and a box bounds it.
    L = rng.standard_normal((n, max(n - 1, 1) if semidefinite else n))
    Q = L @ L.T + (0.0 if semidefinite else 0.1) * np.eye(n)
    z0 = rng.uniform(-0.5, 0.5, n)
    G = rng.standard_normal((p, n))
    h = G @ z0 + rng.uniform(0.1, 2.0, p)  # s₀ ≥ 0.1: strictly feasible, generic optimum
    if semidefinite:
        G = np.vstack([G, np.eye(n), -np.eye(n)])
        h = np.r_[h, np.ones(2 * n)]
    A = rng.standard_normal((m, n))
    return Q, 2.0 * rng.standard_normal(n), G, h, A, A @ z0, seed


@settings(max_examples=15, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(_feasible_qps())
def test_property_random_feasible_qps(problem):
    """Solution against Clarabel; ⟨∇, v⟩ of a random linear functional of (z, λ, ν) along a
    random direction v in all six inputs against a central difference along v."""
    *blocks, seed = problem
    z_r, l_r, n_r = qp_reference(*blocks)
    inputs = [as_tensor(x[None], True) for x in blocks]
    outs, res = _solve(inputs)
    assert res.status == [Status.OPTIMAL]
    assert _close(outs[0], z_r[None], 1e-7)
    assert _close(outs[1], l_r[None], 1e-6) and _close(outs[2], n_r[None], 1e-6)
    w = _weights(outs, seed)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, dtype=DT, generator=gen) for t in inputs]
    got = sum((g * d).sum() for g, d in zip(weighted_grads(outs, inputs, w), v))
    fd_settings = QPSettings(**FD_SETTINGS)

    def along(t):
        o, _ = _solve([x.detach() + t * d for x, d in zip(inputs, v)], fd_settings)
        return sum((wk * ok).sum() for wk, ok in zip(w, o))

    ref = (along(FD_STEP) - along(-FD_STEP)) / (2 * FD_STEP)
    assert abs(float(got - ref)) <= 1e-6 * max(1.0, abs(float(ref)))
