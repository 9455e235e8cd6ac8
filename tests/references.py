"""Independent references, one copy each, for the tests and the benchmarks.

CVXPY + Clarabel solves (a QP polished to round-off on its active set), central
differences, random feasible QPs, and closed forms: the projection onto a simplex
(sparsemax) with its Jacobian, and entropic transport by log-domain Sinkhorn.
Nothing here imports `declarative`: a reference shares no code with what it
checks. The benchmarks import this module by putting tests/ on sys.path.
"""

from __future__ import annotations

from collections.abc import Collection

import cvxpy as cp
import numpy as np
import torch

# Tight interior-point tolerances: references must be far more accurate than
# the tolerances the tests assert.
CLARABEL_TIGHT = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10,
                      tol_ktratio=1e-10, max_iter=500)


def reference_solve(problem: cp.Problem, parameters, values, outputs, **solver_opts):
    """Solve with CVXPY (Clarabel) at the given values; restore Parameter values after.

    ``outputs`` are Variables or dual Variables; returns their values as arrays.
    ``solver_opts`` override `CLARABEL_TIGHT`.
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


def central_differences(fn, inputs, weights, eps=1e-6, coords=None):
    """d(Σ weights·fn(inputs))/d(inputs) by central differences, input by input.

    ``coords``: per input, the flat indices to difference (None: all of them);
    the other entries of the result stay 0.
    """
    grads = []
    for k, x in enumerate(inputs):
        g = torch.zeros_like(x)
        flat = g.view(-1)
        for j in range(x.numel()) if coords is None else coords[k]:
            plus = [t.clone() for t in inputs]
            minus = [t.clone() for t in inputs]
            plus[k].view(-1)[j] += eps
            minus[k].view(-1)[j] -= eps
            fp = sum((w * o).sum() for w, o in zip(weights, fn(*plus)))
            fm = sum((w * o).sum() for w, o in zip(weights, fn(*minus)))
            flat[j] = (fp - fm) / (2 * eps)
        grads.append(g)
    return grads


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


def rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


# ----------------------------------------------------------------------------
# Random feasible QPs
# ----------------------------------------------------------------------------

def random_qp_arrays(seed, n=4, p=6, m=2, B=3, shared: Collection[str] = (), *, ridge=0.5,
                     row_scale=1.0, z0_scale=1.0, slack=(0.1, 1.0), q_scale=3.0):
    """B random feasible, strictly convex QPs ``min ½zᵀQz + qᵀz s.t. Gz ≤ h, Az = b``.

    Q = LLᵀ/n + ridge·I (L Gaussian), G and A Gaussian × ``row_scale``, a Slater
    point z0 = ``z0_scale``·Gaussian with h = G z0 + s0, s0 = slack[0] + slack[1]·U(0, 1),
    b = A z0, q = ``q_scale``·Gaussian. Strictly positive slacks keep the optimum
    generic (LICQ and strict complementarity hold), so the duals are unique and the
    solution map is differentiable. ``shared`` names the inputs that are one unbatched
    array for the whole batch (any of Q, G, A; b shares z0 with every sample). ``seed``
    is anything ``np.random.default_rng`` takes. Returns a dict of float64 arrays with
    a leading batch dimension on the batched inputs.
    """
    rng = np.random.default_rng(seed)

    def lead(name):
        return 1 if name in shared else B

    L = rng.standard_normal((lead("Q"), n, n))
    Q = L @ L.transpose(0, 2, 1) / n + ridge * np.eye(n)
    G = row_scale * rng.standard_normal((lead("G"), p, n))
    A = row_scale * rng.standard_normal((lead("A"), m, n))
    z0 = z0_scale * rng.standard_normal((lead("b"), n))
    Gz0 = np.einsum("bpn,bn->bp", np.broadcast_to(G, (B, p, n)), np.broadcast_to(z0, (B, n)))
    h = Gz0 + slack[0] + slack[1] * rng.random((B, p))
    b = np.einsum("bmn,bn->bm", np.broadcast_to(A, (lead("b"), m, n)), z0)
    q = q_scale * rng.standard_normal((B, n))
    out = {"Q": Q, "q": q, "G": G, "h": h, "A": A, "b": b}
    return {k: v[0] if k in shared else v for k, v in out.items()}


def random_qp(seed, n=4, p=6, m=2, B=3, shared=False, dtype=torch.float64):
    """`random_qp_arrays` as (Q, q, G, h, A, b) tensors; ``shared``: Q, G and A unbatched."""
    data = random_qp_arrays(seed, n, p, m, B, ("Q", "G", "A") if shared else ())
    return [torch.tensor(data[k], dtype=dtype) for k in ("Q", "q", "G", "h", "A", "b")]


# ----------------------------------------------------------------------------
# QPs by Clarabel, polished to round-off
# ----------------------------------------------------------------------------

def qp_reference(Q, q, G, h, A, b, tolerances=None):
    """One QP ``min ½zᵀQz + qᵀz s.t. Gz ≤ h, Az = b`` by CVXPY + Clarabel (tight tolerances).

    Arrays of shapes (n, n), (n,), (p, n), (p,), (m, n), (m,); Q only needs to be
    PSD (its symmetric part is used). Rows with h = +inf are left out, their λ is 0.
    ``tolerances`` replace `CLARABEL_TIGHT`. Returns (z, λ, ν) as float64 arrays in
    CVXPY's sign convention (Lagrangian ½zᵀQz + qᵀz + λᵀ(Gz − h) + νᵀ(Az − b)).
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
    problem.solve(solver=cp.CLARABEL, **(tolerances or CLARABEL_TIGHT))
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
    # Clarabel needs a PSD Q; data rounded to float32 (Q = LLᵀ + 1e-8·I) can have
    # eigenvalues of −1e-7·‖Q‖, so it gets the nearest PSD matrix. The polish and
    # the KKT check below use Q as given.
    w, V = np.linalg.eigh(0.5 * (Q + Q.T))
    Q_psd = Q if w.min(initial=0.0) >= 0 else (V * np.clip(w, 0.0, None)) @ V.T
    try:
        z, lam, nu = qp_reference(Q_psd, q, Gs, hs, As, bs)
    except (RuntimeError, cp.SolverError):
        z, lam, nu = _clarabel_any(Q_psd, q, Gs, hs, As, bs)
    slack = np.where(np.isfinite(hs), hs - Gs @ z, np.inf)
    active = lam > slack
    S = 0.5 * (Q + Q.T)
    for _ in range(20):  # active-set corrections, where Clarabel's guess was off
        z_p, lam_p, nu_p = _solve_on_active_set(S, q, Gs, hs, As, bs, active)
        scale = 1.0 + np.abs(z_p).max(initial=0.0)
        if np.abs(Gs[active] @ z_p - hs[active]).max(initial=0.0) > 1e-12 * scale:
            # More rows held than the point can meet exactly (Clarabel counts a
            # weakly active row): release the one with the smallest multiplier.
            act = np.flatnonzero(active)
            active[act[np.argmin(lam[act])]] = False
            continue
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


# ----------------------------------------------------------------------------
# Closed forms: sparsemax and entropic transport
# ----------------------------------------------------------------------------

def simplex_projection(y, r=1.0):
    """Sort-based projection of a vector onto {z ≥ 0, Σz = r} (Held et al. 1974; Duchi
    et al. 2008), in numpy, checked against its optimality conditions.

    Returns z = max(y − t, 0), the threshold t and the support {i: yᵢ > t}
    (entries exactly at the threshold are left out of it).
    """
    y = np.asarray(y, dtype=np.float64)
    u = np.sort(y)[::-1]
    css = np.cumsum(u)
    k = np.arange(1, y.size + 1)
    rho = int(k[u - (css - r) / k > 0].max())
    t = (css[rho - 1] - r) / rho
    z = np.maximum(y - t, 0.0)
    # z is the projection: feasible, and y − z = t on the support, y ≤ t off it.
    assert abs(z.sum() - r) <= 1e-12 * max(1.0, abs(r))
    assert (z >= 0).all()
    on = z > 0
    assert np.abs((y - z)[on] - t).max() <= 1e-12 * max(1.0, np.abs(y).max())
    assert (y[~on] <= t + 1e-12).all()
    return z, t, y > t


def sparsemax_jacobian(support):
    """dz/dy = diag(s) − s sᵀ/|S|: centering restricted to the support."""
    s = torch.as_tensor(support, dtype=torch.float64)
    return torch.diag(s) - torch.outer(s, s) / s.sum()


def sparsemax(y: torch.Tensor, r=1.0) -> torch.Tensor:
    """The same projection in torch along the last dimension, batched, differentiable
    by autograd (away from ties)."""
    n = y.shape[-1]
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = u.cumsum(-1) - r
    k = torch.arange(1, n + 1, dtype=y.dtype, device=y.device)
    rho = (u - css.detach() / k > 0).sum(-1, keepdim=True)  # support size (a prefix of u)
    t = css.gather(-1, rho - 1) / rho
    return (y - t).clamp_min(0.0)


def log_sinkhorn(C, a, b, tau, tol=1e-14, sweeps=0, max_iter=100_000):
    """Entropic transport plan by log-domain Sinkhorn, batched over leading dimensions.

    ``maximize −⟨C, Z⟩ + τ Σ entr(Z) s.t. Z1 = a, Zᵀ1 = b``: its optimality
    conditions give Z_ij = exp((f_i + g_j − C_ij)/τ − 1); the −1 is absorbed into f,
    so Sinkhorn's fixed point is it. The potentials converge under no_grad until
    the row sums are within ``tol`` of a (1e-14: at τ = 0.01 the sweeps settle at
    round-off and can keep oscillating above 1e-15); then ``sweeps`` more sweeps
    are recorded by autograd from there, so the result's gradient approaches the
    implicit one as ``sweeps`` grows. Shapes C (..., r, c), a (..., r), b (..., c);
    numpy arrays in give a numpy array out.
    """
    arrays = isinstance(C, np.ndarray)
    if arrays:
        C, a, b = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (C, a, b))
    K = -C / tau
    la, lb = a.log(), b.log()
    with torch.no_grad():
        f, g = torch.zeros_like(a), torch.zeros_like(b)
        for _ in range(max_iter):
            f = la - torch.logsumexp(K + g[..., None, :], -1)
            g = lb - torch.logsumexp(K + f[..., :, None], -2)
            Z = torch.exp(K + f[..., :, None] + g[..., None, :])
            if float((Z.sum(-1) - a).abs().max()) < tol:
                break
        else:
            raise RuntimeError("log-domain Sinkhorn did not converge")
    for _ in range(sweeps):
        f = la - torch.logsumexp(K + g[..., None, :], -1)
        g = lb - torch.logsumexp(K + f[..., :, None], -2)
    Z = torch.exp(K + f[..., :, None] + g[..., None, :])
    return Z.numpy() if arrays else Z
