"""The QP engine on the problems OptNet-style models build, scaled and conditioned badly.

Every sample must be optimal and right: solutions against a polished reference
(Clarabel on row-normalized data, then the exact KKT point on its active set),
gradients of all six inputs against central differences through that reference
(along a random direction of all six at once), and each sample's result must not
depend on its batch-mates. Then one test per failure seen on such problems.
"""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from declarative.backends.qp import solve_qp
from helpers import qp_kkt_error, qp_polished_reference, random_qp
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from declarative import QPFunction, Status

DT = torch.float64
E = torch.Tensor()


def optnet_family(seed, n, p, m, B, eps, dtype=DT, row_decades=3.0):
    """B OptNet-shaped QPs: Q = LLᵀ + εI (L lower triangular with positive entries, as
    OptNet parametrizes it, or Gaussian), random G and A with rows scaled by
    10^U(−d, d), a strictly feasible point z₀ (h = Gz₀ + s₀, s₀ ∈ (0, 1), b = Az₀)."""
    rng = np.random.default_rng(seed)
    if seed % 2 == 0:
        L = np.tril(rng.random((B, n, n)))
    else:
        L = rng.standard_normal((B, n, n)) / np.sqrt(n)
    Q = L @ L.transpose(0, 2, 1) + eps * np.eye(n)
    G = rng.standard_normal((B, p, n))
    A = rng.standard_normal((B, m, n))
    z0 = rng.standard_normal((B, n))
    h = np.einsum("bpn,bn->bp", G, z0) + rng.random((B, p))
    b = np.einsum("bmn,bn->bm", A, z0)
    rg = 10.0 ** rng.uniform(-row_decades, row_decades, (B, p))
    ra = 10.0 ** rng.uniform(-row_decades, row_decades, (B, m))
    G, h, A, b = G * rg[..., None], h * rg, A * ra[..., None], b * ra
    q = 3.0 * rng.standard_normal((B, n))
    return [torch.tensor(x, dtype=dtype) for x in (Q, q, G, h, A, b)]


def _sample(data, i):
    return [t[i].detach().double().numpy() for t in data]


def _directional_fd(data64, direction, weights):
    """d/dt of Σ weights·(z, λ)(data + t·direction) at 0, by central differences through
    the reference. Near a change of active set a step can straddle it; the smallest
    discrepancy over three steps is what a right derivative must meet."""
    wz, wl = weights

    def value(t):
        z, lam, _ = qp_polished_reference(*[x + t * d for x, d in zip(data64, direction)])
        return wz @ z + wl @ lam

    return [(value(h) - value(-h)) / (2 * h) for h in (1e-6, 1e-7, 1e-8)]


def _check_family(seed, n, p, m, eps, dtype, B=16, fd_samples=2):
    data = optnet_family(seed, n, p, m, B, eps, dtype)
    inputs = [t.clone().requires_grad_(True) for t in data]
    (z, lam, nu), res = solve_qp(*inputs, batch=B)
    assert res.status == [Status.OPTIMAL] * B
    gen = torch.Generator().manual_seed(seed)
    wz = torch.randn(B, n, dtype=DT, generator=gen)
    wl = torch.randn(B, p, dtype=DT, generator=gen)
    grads = torch.autograd.grad((wz.to(dtype) * z).sum() + (wl.to(dtype) * lam).sum(), inputs)
    z_tol, g_tol = (1e-6, 1e-4) if dtype == torch.float64 else (1e-3, 5e-2)
    for i in range(B):
        z_r, l_r, n_r = qp_polished_reference(*_sample(data, i))
        assert np.abs(z[i].detach().double().numpy() - z_r).max() <= z_tol * max(
            1.0, np.abs(z_r).max())
    for i in range(fd_samples):
        data64 = _sample(data, i)
        rng = np.random.default_rng(seed + i)
        direction = [rng.standard_normal(x.shape) for x in data64]
        # Q moves as R(I + tS)R with R = Q^½: Q stays PSD on both sides of every
        # step (a plain symmetric step of 1e-6 makes Q = LLᵀ + 1e-8·I indefinite).
        w, V = np.linalg.eigh(data64[0])
        R = (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T
        S = 0.5 * (direction[0] + direction[0].T)
        direction[0] = R @ (S / np.linalg.norm(S, 2)) @ R
        ours = sum(float((g[i].double() * torch.as_tensor(d)).sum())
                   for g, d in zip(grads, direction))
        fds = _directional_fd(data64, direction, (wz[i].numpy(), wl[i].numpy()))
        assert max(abs(f) for f in fds) > 1e-6  # a real derivative, not zeros compared
        err = min(abs(ours - f) / abs(f) for f in fds)
        assert err <= g_tol, (i, ours, fds)
    # Each sample alone gives what it gave in the batch.
    for i in (0, B - 1):
        solo = [t[i:i + 1].clone().requires_grad_(True) for t in data]
        (z1, l1, _), r1 = solve_qp(*solo, batch=1)
        assert r1.status == [Status.OPTIMAL]
        z_i = z[i].detach()
        same = 1e-9 if dtype == torch.float64 else 1e-6  # round-off of the output dtype
        assert torch.allclose(z1[0].detach(), z_i, rtol=same, atol=same * float(z_i.abs().max()))
        g1 = torch.autograd.grad((wz[i:i + 1].to(dtype) * z1).sum()
                                 + (wl[i:i + 1].to(dtype) * l1).sum(), solo)
        for a, b in zip(g1, grads):
            if b[i].numel():
                scale = float(b[i].abs().max()) + 1e-30
                assert float((a[0] - b[i]).abs().max()) <= max(1e-6, same) * scale


FAMILY = st.tuples(st.sampled_from([20, 50, 100]), st.sampled_from([1, 2, 3]),
                   st.sampled_from([0, 4]), st.sampled_from([1e-4, 1e-6, 1e-8]),
                   st.sampled_from([torch.float64, torch.float32]), st.integers(0, 10_000))


# No shrinking: a failing family is reported as drawn (shrinking re-solves dozens of
# references per step and can run for many minutes).
@settings(max_examples=10, deadline=None, derandomize=True,
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(FAMILY)
def test_property_optnet_families_are_optimal_exact_and_batch_independent(family):
    n, ratio, eq_div, eps, dtype, seed = family
    _check_family(seed, n, ratio * n, n // eq_div if eq_div else 0, eps, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [20, 50, 100])
def test_every_optnet_family(n, dtype):
    """The whole grid: inequalities ∈ {n, 2n, 3n}, equalities ∈ {0, n/4}, ε ∈ {1e-4, 1e-8}."""
    for ratio in (1, 2, 3):
        for m in (0, n // 4):
            for eps in (1e-4, 1e-8):
                _check_family(n + 10 * ratio + m, n, ratio * n, m, eps, dtype, fd_samples=1)


# ----------------------------------------------------------------------------
# One test per failure seen on such problems
# ----------------------------------------------------------------------------


def test_gradients_on_lenet_and_sudoku_shapes_are_not_zero():
    """The shapes where the backward once returned exact zeros labelled optimal."""
    for seed, (n, p, m) in enumerate([(50, 100, 0), (64, 192, 40)]):
        data = optnet_family(seed, n, p, m, 4, 1e-4, row_decades=0.0)
        inputs = [t.clone().requires_grad_(True) for t in data]
        (z, _, _), res = solve_qp(*inputs, batch=4)
        assert res.status == [Status.OPTIMAL] * 4
        w = torch.linspace(-1, 1, n, dtype=DT)
        (gq,) = torch.autograd.grad((z @ w).sum(), inputs[1])
        data64 = _sample(data, 0)
        direction = [np.zeros_like(x) for x in data64]
        direction[1] = np.random.default_rng(seed).standard_normal(n)
        fds = _directional_fd(data64, direction, (w.numpy(), np.zeros(p)))
        ours = float(gq[0] @ torch.as_tensor(direction[1]))
        assert min(abs(ours - f) for f in fds) <= 1e-5 * max(1.0, abs(fds[0]))


def test_a_sample_does_not_depend_on_its_batch_mates():
    """A batch mixing a singular Q (which moves every sample to the reduced elimination)
    with definite ones: each sample's solution and gradient are what it gets alone."""
    data = optnet_family(3, 10, 20, 2, 4, 1e-4, row_decades=0.0)
    d = torch.zeros(10, dtype=DT)
    d[0] = 1.0
    P = torch.eye(10, dtype=DT) - torch.outer(d, d)
    data[0][1] = P @ data[0][1] @ P  # singular in one direction (bounded by the rows)
    inputs = [t.clone().requires_grad_(True) for t in data]
    (z, lam, _), res = solve_qp(*inputs, batch=4)
    assert res.kkt.name == "reduced"
    g_all = torch.autograd.grad(z.sum() + lam.sum(), inputs)
    for i in range(4):
        solo = [t[i:i + 1].clone().requires_grad_(True) for t in data]
        (z1, l1, _), r1 = solve_qp(*solo, batch=1)
        assert r1.status[0] == res.status[i]
        assert torch.allclose(z1[0], z[i], atol=1e-9, rtol=1e-9)
        g1 = torch.autograd.grad(z1.sum() + l1.sum(), solo)
        for a, b in zip(g1, g_all):
            assert torch.allclose(a[0], b[i], atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("how", ["rows of G by 1e±6", "rows of A by 1e±6", "objective by 1e6"])
def test_scaling_rows_or_the_objective_changes_nothing(how):
    data = optnet_family(5, 20, 40, 5, 16, 1e-4, row_decades=0.0)
    (z0, l0, n0), r0 = solve_qp(*data, batch=16)
    rng = np.random.default_rng(0)
    Q, q, G, h, A, b = data
    if how.startswith("rows of G"):
        s = torch.as_tensor(10.0 ** rng.choice([-6, 6], size=(16, 40)))
        scaled, back = [Q, q, G * s[..., None], h * s, A, b], ("lam", s)
    elif how.startswith("rows of A"):
        s = torch.as_tensor(10.0 ** rng.choice([-6, 6], size=(16, 5)))
        scaled, back = [Q, q, G, h, A * s[..., None], b * s], ("nu", s)
    else:
        scaled, back = [Q * 1e6, q * 1e6, G, h, A, b], ("both", 1e6)
    (z1, l1, n1), r1 = solve_qp(*scaled, batch=16)
    assert r0.status == r1.status == [Status.OPTIMAL] * 16
    assert torch.allclose(z1, z0, atol=1e-8, rtol=1e-8)
    name, s = back
    if name == "lam":
        assert torch.allclose(l1 * s, l0, atol=1e-7, rtol=1e-7)
    elif name == "nu":
        assert torch.allclose(n1 * s, n0, atol=1e-7, rtol=1e-7)
    else:
        assert torch.allclose(l1 / s, l0, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("cond", [1e6, 1e8, 1e10])
def test_ill_conditioned_q_is_solved(cond):
    n, B = 30, 10
    rng = np.random.default_rng(1)
    U = np.linalg.qr(rng.standard_normal((B, n, n)))[0]
    Q = U @ (np.logspace(0, -np.log10(cond), n)[None, :, None] * U.transpose(0, 2, 1))
    data = optnet_family(4, n, 60, 0, B, 1e-4, row_decades=0.0)
    data[0] = torch.as_tensor(Q)
    (z, lam, nu), res = solve_qp(*data, batch=B)
    assert res.status == [Status.OPTIMAL] * B
    for i in range(B):
        d = _sample(data, i)
        assert qp_kkt_error(*d, z[i].numpy(), lam[i].numpy(), nu[i].numpy()) < 1e-9


def test_a_huge_cost_on_one_variable_does_not_hide_another():
    """min ½‖x‖² + pᵀx on the box [0, 1]² with p₀ = −1e12: x = (1, 1), and x₁ depends
    on p₁ not at all (its bound is active)."""
    Q = torch.eye(2, dtype=DT)
    G = torch.cat([torch.eye(2, dtype=DT), -torch.eye(2, dtype=DT)])
    h = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=DT)
    for p0 in (-1e8, -1e12):
        p = torch.tensor([[p0, -2.0]], dtype=DT, requires_grad=True)
        (z, lam, _), res = solve_qp(Q, p, G, h, torch.zeros(0, 2, dtype=DT),
                                    torch.zeros(0, dtype=DT), batch=1)
        assert res.status == [Status.OPTIMAL]
        assert torch.allclose(z.detach(), torch.ones(1, 2, dtype=DT), atol=1e-12)
        (g,) = torch.autograd.grad(z[0, 1], p)
        assert g.abs().max() <= 1e-15
        assert float(lam[0, 1]) == pytest.approx(1.0, abs=1e-9)
    z = QPFunction(verbose=-1)(Q, torch.tensor([-1e8, -2.0], dtype=DT), G, h, E, E)
    assert torch.allclose(z, torch.ones(1, 2, dtype=DT), atol=1e-12)


def test_infeasible_samples_are_reported_infeasible():
    """g₀ᵀz ≤ 1 and g₀ᵀz ≥ 2 in every sample (HiGHS and Clarabel agree: infeasible)."""
    B, n = 16, 10
    rng = np.random.default_rng(5)
    G = torch.as_tensor(rng.standard_normal((B, 20, n)))
    G = torch.cat([G, -G[:, :1]], 1)
    h = torch.cat([torch.ones(B, 20, dtype=DT), -2 * torch.ones(B, 1, dtype=DT)], 1)
    q = torch.as_tensor(rng.standard_normal((B, n)))
    (_, _, _), res = solve_qp(torch.eye(n, dtype=DT), q, G, h, torch.zeros(0, n, dtype=DT),
                              torch.zeros(0, dtype=DT), batch=B)
    assert res.status == [Status.INFEASIBLE] * B


def test_float32_semidefinite_q_of_low_rank_is_accepted():
    """Q = LLᵀ of rank 3 formed in float32 has eigenvalues of −1e-7 (round-off)."""
    n = 10
    rng = np.random.default_rng(7)
    L = torch.tensor(rng.standard_normal((20, n, 3)), dtype=torch.float32)
    Q = L @ L.mT
    assert float(torch.linalg.eigvalsh(Q.double()).amin()) < 0  # as formed
    G = torch.cat([torch.eye(n), -torch.eye(n)])
    q = torch.tensor(rng.standard_normal((20, n)), dtype=torch.float32)
    z, res = QPFunction(verbose=-1)(Q, q, G, torch.ones(2 * n), E, E, return_info=True)
    assert z.dtype == torch.float32
    assert res.status == [Status.OPTIMAL] * 20


def test_indefinite_q_is_never_optimal():
    Q = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    args = (Q, torch.tensor([1.0, 1.0], dtype=DT), torch.eye(2, dtype=DT),
            torch.ones(2, dtype=DT), E, E)
    with pytest.raises(ValueError, match="positive semidefinite"):
        QPFunction(verbose=-1)(*args)
    z, res = QPFunction(verbose=-1, check_Q_spd=False, on_failure="mask")(
        *args, return_info=True)
    assert res.status == [Status.NUMERICAL_ERROR]
    assert torch.isnan(z).all()


def test_a_far_finite_bound_is_as_good_as_an_infinite_one():
    G = torch.cat([torch.eye(2, dtype=DT), -torch.eye(2, dtype=DT)])
    q = torch.tensor([[-3.0, -1.0]], dtype=DT)
    for far in (1e10, 1e15, float("inf")):
        h = torch.tensor([1.0, far, 1.0, 1.0], dtype=DT)
        (z, _, _), res = solve_qp(torch.eye(2, dtype=DT), q, G, h, torch.zeros(0, 2, dtype=DT),
                                  torch.zeros(0, dtype=DT), batch=1)
        assert res.status == [Status.OPTIMAL], far
        assert torch.allclose(z, torch.tensor([[1.0, 1.0]], dtype=DT), atol=1e-9), far


def test_the_silent_flag_silences_printing_not_warnings():
    """verbose=-1 (the qpth spelling) keeps a max_iter sample's warning."""
    data = random_qp(19, B=2)
    f = QPFunction(verbose=-1, maxIter=4)  # a usable point, not yet optimal
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z, res = f(*data, return_info=True)
    assert res.status == [Status.MAX_ITER] * 2
    assert any("max_iter" in str(w.message) for w in caught)


def test_degenerate_lp_goes_on_to_the_strict_test_when_the_polish_fails():
    """An assignment LP with tied costs: the optimal face is not a vertex, so the
    polish on the active set fails (z is free along the face) twice; the interior
    point must then iterate to the strict per-row test, not return the looser
    round's point as optimal."""
    rng = np.random.default_rng(0)
    k = 6
    n = k * k
    rows = np.kron(np.eye(k), np.ones((1, k)))  # Σ_j X_ij = 1 (X flattened by rows)
    cols = np.kron(np.ones((1, k)), np.eye(k))  # Σ_i X_ij = 1
    A = np.vstack([rows, cols[:-1]])  # one of the 2k sums is implied by the others
    costs = np.stack([rng.integers(0, 3, n).astype(float) for _ in range(3)])
    data = [torch.zeros(3, n, n, dtype=DT), torch.tensor(costs), -torch.eye(n, dtype=DT)
            .expand(3, n, n), torch.zeros(3, n, dtype=DT),
            torch.tensor(A).expand(3, -1, -1), torch.ones(3, A.shape[0], dtype=DT)]
    (z, lam, nu), res = solve_qp(*data, batch=3)
    assert res.status == [Status.OPTIMAL] * 3
    for i in range(3):
        x = cp.Variable(n)
        prob = cp.Problem(cp.Minimize(costs[i] @ x), [x >= 0, A @ x == 1])
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        assert abs(float(costs[i] @ z[i].numpy()) - prob.value) < 1e-9
        assert float(z[i].min()) > -1e-9 and np.abs(A @ z[i].numpy() - 1).max() < 1e-9
