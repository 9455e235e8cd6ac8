"""Shared references for the tests: CVXPY + Clarabel solves and finite differences."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import torch

# Tight interior-point tolerances: references must be far more accurate than
# the tolerances the tests assert.
CLARABEL_TIGHT = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10,
                      tol_ktratio=1e-10, max_iter=500)
SCS_TIGHT = {"eps": 1e-12, "max_iters": 100_000}
CLARABEL_ARGS = {"solve_method": "Clarabel", **CLARABEL_TIGHT}
# Exponential cones: SCS stalls short of 1e-12 (max_iters) but reaches 1e-10 cleanly.
SCS_EXP = {"eps": 1e-10, "max_iters": 100_000}


def as_tensor(a, grad=False, dtype=torch.float64):
    """A fresh tensor from array-like data (float64 unless told)."""
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=grad)


def weighted_grads(outputs, inputs, weights):
    """Gradient of Σ_k <weights_k, outputs_k> with respect to each input."""
    loss = sum((w * o).sum() for w, o in zip(weights, outputs))
    return torch.autograd.grad(loss, inputs)


def reference_solve(problem: cp.Problem, parameters, values, outputs, **solver_opts):
    """Solve with CVXPY (Clarabel) at the given values; restore Parameter values after.

    ``outputs`` are Variables or dual Variables; returns their values as arrays.
    """
    old = [p.value for p in parameters]
    try:
        for p, v in zip(parameters, values):
            p.value = np.asarray(v, dtype=np.float64)
        opts = dict(CLARABEL_TIGHT)
        opts.update(solver_opts)
        problem.solve(solver=cp.CLARABEL, **opts)
        if problem.status not in ("optimal",):
            raise RuntimeError(f"reference solve status {problem.status}")
        return [np.array(v.value, dtype=np.float64) for v in outputs]
    finally:
        for p, v in zip(parameters, old):
            p.value = v


def central_differences(fn, inputs, weights, eps=1e-6):
    """d(Σ weights·fn(inputs))/d(inputs) by central differences, input by input."""
    grads = []
    for k, x in enumerate(inputs):
        g = torch.zeros_like(x)
        flat = g.view(-1)
        for j in range(x.numel()):
            plus = [t.clone() for t in inputs]
            minus = [t.clone() for t in inputs]
            plus[k].view(-1)[j] += eps
            minus[k].view(-1)[j] -= eps
            fp = sum((w * o).sum() for w, o in zip(weights, fn(*plus)))
            fm = sum((w * o).sum() for w, o in zip(weights, fn(*minus)))
            flat[j] = (fp - fm) / (2 * eps)
        grads.append(g)
    return grads


def random_qp(seed, n=4, p=6, m=2, B=3, shared=False, dtype=torch.float64):
    """B random feasible, strictly convex QPs as (Q, q, G, h, A, b) tensors.

    Each sample has a Slater point z0 (h = G z0 + s0 with s0 ≥ 0.1, b = A z0).
    Strictly positive slacks keep the optimum generic (LICQ and strict
    complementarity hold), so the duals are unique and the solution map is
    differentiable; q is scaled up so that some constraints are active.
    ``shared``: Q, G and A are one unbatched matrix for the whole batch.
    """
    rng = np.random.default_rng(seed)
    k = 1 if shared else B
    L = rng.standard_normal((k, n, n))
    Q = L @ L.transpose(0, 2, 1) / n + 0.5 * np.eye(n)
    G = rng.standard_normal((k, p, n))
    A = rng.standard_normal((k, m, n))
    z0 = rng.standard_normal((B, n))
    h = np.einsum("bpn,bn->bp", np.broadcast_to(G, (B, p, n)), z0) + 0.1 + rng.random((B, p))
    b = np.einsum("bmn,bn->bm", np.broadcast_to(A, (B, m, n)), z0)
    q = 3.0 * rng.standard_normal((B, n))
    if shared:
        Q, G, A = Q[0], G[0], A[0]
    return [torch.tensor(x, dtype=dtype) for x in (Q, q, G, h, A, b)]


def rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def conic_layer(problem, parameters, variables, **kwargs):
    """A CvxpyLayer forced onto the conic (diffcp) path, whatever ``backend="auto"`` picks."""
    from declarative.torch import CvxpyLayer

    kwargs.setdefault("backend", "conic")
    return CvxpyLayer(problem, parameters, variables, **kwargs)


def directional_difference(fn, inputs, directions, weights, eps=1e-6):
    """d/dh Σ weights·fn(inputs + h·directions) at h = 0, by a central difference.

    For derivatives that exist only along some directions (the marginals of a
    transport problem must keep equal totals), where an entry-by-entry
    difference would leave the feasible set.
    """
    def value(h):
        out = fn(*[x + h * d for x, d in zip(inputs, directions)])
        return sum((w * o).sum() for w, o in zip(weights, out))

    return (value(eps) - value(-eps)) / (2 * eps)


def qp_reference(Q, q, G, h, A, b):
    """One QP ``min ½zᵀQz + qᵀz s.t. Gz ≤ h, Az = b`` by CVXPY + Clarabel (tight tolerances).

    Arrays of shapes (n, n), (n,), (p, n), (p,), (m, n), (m,); Q only needs to be
    PSD (its symmetric part is used). Rows with h = +inf are left out, their λ is 0.
    Returns (z, λ, ν) as float64 arrays in CVXPY's sign convention
    (Lagrangian ½zᵀQz + qᵀz + λᵀ(Gz − h) + νᵀ(Az − b)).
    """
    Q, q, G, h, A, b = (np.asarray(t, dtype=np.float64) for t in (Q, q, G, h, A, b))
    n = q.shape[0]
    z = cp.Variable(n)
    S = 0.5 * (Q + Q.T)
    objective = q @ z
    if np.any(S != 0):
        objective = objective + 0.5 * cp.quad_form(z, cp.psd_wrap(S))
    keep = np.isfinite(h)
    constraints = []
    if keep.any():
        constraints.append(G[keep] @ z <= h[keep])
    if b.shape[0]:
        constraints.append(A @ z == b)
    problem = cp.Problem(cp.Minimize(objective), constraints)
    problem.solve(solver=cp.CLARABEL, **CLARABEL_TIGHT)
    if problem.status != "optimal":
        raise RuntimeError(f"reference solve status {problem.status}")
    lam = np.zeros(h.shape[0])
    k = 0
    if keep.any():
        lam[keep] = constraints[0].dual_value
        k = 1
    nu = np.asarray(constraints[k].dual_value, dtype=np.float64).reshape(-1) if b.shape[0] \
        else np.zeros(0)
    return np.asarray(z.value, dtype=np.float64), lam, nu


def qp_polished_reference(Q, q, G, h, A, b, tol=1e-8):
    """One QP solved to round-off: Clarabel on row-normalized data, then polished.

    Clarabel at tight tolerances still leaves s·λ ≈ 1e-10, which moves z by up to
    √1e-10 at weakly active rows and by cond(Q)·1e-10 elsewhere, and it can stop
    short on rows of very different sizes. So the rows of G and A are normalized
    first (the same feasible set), and given Clarabel's active set (rows with
    λᵢ > sᵢ) the equality-constrained KKT system is solved exactly. The result is
    verified on the original data (stationarity, feasibility, λ ≥ 0, complementarity,
    each relative to its terms, within ``tol``); RuntimeError if it fails.
    """
    Q, q, G, h, A, b = (np.asarray(t, dtype=np.float64) for t in (Q, q, G, h, A, b))
    p, m = h.size, b.size
    rg = np.maximum(np.abs(G).max(axis=1, initial=0.0), 1e-300) if p else np.ones(0)
    ra = np.maximum(np.abs(A).max(axis=1, initial=0.0), 1e-300) if m else np.ones(0)
    Gs, hs, As, bs = G / rg[:, None], h / rg, A / ra[:, None], b / ra
    try:
        z, lam, nu = qp_reference(Q, q, Gs, hs, As, bs)
    except RuntimeError:
        z, lam, nu = _clarabel_any(Q, q, Gs, hs, As, bs)
    slack = np.where(np.isfinite(hs), hs - Gs @ z, np.inf)
    active = lam > slack
    S = 0.5 * (Q + Q.T)
    for _ in range(20):  # active-set corrections, where Clarabel's guess was off
        z_p, lam_p, nu_p = _solve_on_active_set(S, q, Gs, hs, As, bs, active)
        scale = 1.0 + np.abs(z_p).max(initial=0.0)
        violated = np.isfinite(hs) & (Gs @ z_p - hs > 1e-12 * scale) & ~active
        negative = active & (lam_p < 0)
        if not (violated.any() or negative.any()):
            break
        active = (active & ~negative) | violated
    lam_p, nu_p = lam_p / rg, nu_p / ra  # back to the original rows
    if qp_kkt_error(Q, q, G, h, A, b, z_p, lam_p, nu_p) > tol:
        raise RuntimeError("reference: the polished point fails the KKT check")
    return z_p, lam_p, nu_p


def _solve_on_active_set(S, q, G, h, A, b, active):
    """The KKT point with the rows ``active`` of G held as equalities (least squares)."""
    n, p = q.size, h.size
    act = np.flatnonzero(active)
    C = np.vstack([G[act], A])
    k = C.shape[0]
    K = np.block([[S, C.T], [C, np.zeros((k, k))]])
    sol = np.linalg.lstsq(K, np.concatenate([-q, h[act], b]), rcond=None)[0]
    lam = np.zeros(p)
    lam[act] = sol[n:n + act.size]
    return sol[:n], lam, sol[n + act.size:]


def _clarabel_any(Q, q, G, h, A, b):
    """Clarabel's point whatever its status (`qp_polished_reference` verifies it)."""
    n = q.size
    z = cp.Variable(n)
    cons = [G[np.isfinite(h)] @ z <= h[np.isfinite(h)]] if h.size else []
    if b.size:
        cons.append(A @ z == b)
    obj = q @ z + 0.5 * cp.quad_form(z, cp.psd_wrap(0.5 * (Q + Q.T)))
    prob = cp.Problem(cp.Minimize(obj), cons)
    prob.solve(solver=cp.CLARABEL, **CLARABEL_TIGHT)
    lam = np.zeros(h.size)
    if h.size:
        lam[np.isfinite(h)] = cons[0].dual_value
    nu = np.asarray(cons[-1].dual_value).reshape(-1) if b.size else np.zeros(0)
    return np.asarray(z.value), lam, nu


def qp_kkt_error(Q, q, G, h, A, b, z, lam, nu) -> float:
    """The largest KKT violation of (z, λ, ν), each measured against its own terms."""
    S = 0.5 * (Q + Q.T)
    Qz, Gl, An = S @ z, G.T @ lam, A.T @ nu
    stat = np.abs(Qz + q + Gl + An) / (1 + np.abs(Qz) + np.abs(q) + np.abs(Gl) + np.abs(An))
    fin = np.isfinite(h)
    Gz = G[fin] @ z
    slack = h[fin] - Gz
    feas = np.maximum(-slack, 0) / (1 + np.abs(h[fin]) + np.abs(Gz))
    eq = np.abs(A @ z - b) / (1 + np.abs(b) + np.abs(A @ z)) if b.size else np.zeros(1)
    dual = np.maximum(-lam, 0) / (1 + np.abs(lam).max(initial=0.0))
    comp = np.minimum(np.abs(slack) / (1 + np.abs(h[fin])), np.abs(lam[fin]))
    return float(max(stat.max(initial=0), feas.max(initial=0), eq.max(initial=0),
                     dual.max(initial=0), comp.max(initial=0)))
