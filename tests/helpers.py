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
