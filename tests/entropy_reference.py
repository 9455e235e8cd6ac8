"""An independent reference for entropy-regularized linear programs.

    maximize θᵀx + τ Σ entr(xᵢ)  s.t.  A x = b   (x ≥ 0 implied)

Nothing here is shared with the backend: feasibility and the face of the
orthant are decided by one small LP per coordinate (HiGHS: the largest xᵢ
over {Ax = b, x ≥ 0}), the problem restricted to the free coordinates
is solved by Clarabel through CVXPY (exponential cones), and that point is
polished to full float64 accuracy by scipy's trust-region method on the dual
in the unscaled multiplier λ,

    G(λ) = τ Σ_S exp((θ_S − A_Sᵀλ)/τ − 1) + bᵀλ,   x_S = exp((θ_S − A_Sᵀλ)/τ − 1),

started from the λ that Clarabel's x satisfies by stationarity (a least-squares
fit on its well-determined entries). The polish is accepted only where its
primal residual is at round-off and it stays near Clarabel's point.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import scipy.linalg
import scipy.optimize

# A coordinate whose largest feasible value is below this is forced to zero.
FORCED = 1e-9
# Clarabel at tight tolerances gives the polish its start.
CLARABEL = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, tol_ktratio=1e-10,
                max_iter=500)
# The polished point must satisfy A x = b to this (relative to 1 + |b|).
POLISHED = 1e-12
# ... and stay this close to Clarabel's point (a sanity check on the polish).
NEAR_CLARABEL = 1e-4


class Infeasible(Exception):
    pass


def face(A, b):
    """Free coordinates of {x ≥ 0 : Ax = b} (those some feasible x makes positive).

    Raises Infeasible when the set is empty.
    """
    n = A.shape[1]
    free = np.zeros(n, dtype=bool)
    for i in range(n):
        c = np.zeros(n)
        c[i] = -1.0
        res = scipy.optimize.linprog(c, A_eq=A, b_eq=b, bounds=[(0, None)] * n,
                                     method="highs")
        if res.status == 2:
            raise Infeasible
        assert res.status in (0, 3), res.message  # 3: xᵢ unbounded above, so free
        free[i] = res.status == 3 or -res.fun > FORCED
    return free


def _independent(A, b):
    """Independent rows of A (SVD of its row space) and the consistent b for them."""
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    rank = int((s > s.max() * max(A.shape) * 1e-12).sum()) if s.size and s.max() > 0 else 0
    if rank == 0:
        if np.abs(b).max(initial=0.0) > 1e-12:
            raise Infeasible
        return A[:0], b[:0]
    # Rows picked by QR with pivoting on Aᵀ; the others must follow from them.
    _, _, piv = scipy.linalg.qr(A.T, pivoting=True)
    keep = np.sort(piv[:rank])
    coef = np.linalg.lstsq(A[keep].T, A.T, rcond=None)[0]  # A = coefᵀ A_keep
    if np.abs(coef.T @ b[keep] - b).max() > 1e-10 * (1 + np.abs(b).max()):
        raise Infeasible
    return A[keep], b[keep]


def _clarabel(A, b, theta, tau):
    n = A.shape[1]
    x = cp.Variable(n)
    prob = cp.Problem(cp.Maximize(theta @ x + tau * cp.sum(cp.entr(x))), [A @ x == b])
    prob.solve(solver=cp.CLARABEL, **CLARABEL)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"Clarabel: {prob.status}")
    return np.maximum(np.asarray(x.value, dtype=np.float64), 0.0)


def _polish(A, b, theta, tau, x0):
    """Minimize the dual G(λ) from the λ that x0 satisfies by stationarity."""
    # θ − τ(1 + log x) = Aᵀλ on the entries Clarabel resolves well.
    big = x0 > 1e-7 * max(x0.max(), 1e-300)
    rhs = theta - tau * (1.0 + np.log(np.where(big, x0, 1.0)))
    lam0 = np.linalg.lstsq(A[:, big].T, rhs[big], rcond=None)[0]

    def primal(lam):
        e = (theta - A.T @ lam) / tau - 1.0
        return np.exp(np.minimum(e, 700.0))

    def fun(lam):
        return tau * primal(lam).sum() + b @ lam

    def jac(lam):
        return b - A @ primal(lam)

    def hess(lam):
        return (A * primal(lam)) @ A.T / tau

    res = scipy.optimize.minimize(fun, lam0, jac=jac, hess=hess, method="trust-exact",
                                  options={"gtol": 1e-15, "maxiter": 500})
    lam = res.x
    # A few plain Newton steps finish what the trust region's stopping test leaves.
    for _ in range(5):
        step = np.linalg.lstsq(hess(lam), jac(lam), rcond=None)[0]
        lam = lam - step
    return primal(lam)


def solve(A, b, theta, tau):
    """x* (n,), with zeros on the forced coordinates; raises Infeasible."""
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    free = face(A, b)
    x = np.zeros(A.shape[1])
    if not free.any():
        return x
    A_S, b_S = _independent(A[:, free], b)
    if A_S.shape[0] == 0:
        raise RuntimeError("no constraint left on the free coordinates: unbounded entropy")
    x_c = _clarabel(A_S, b_S, theta[free], tau)
    x_S = _polish(A_S, b_S, theta[free], tau, x_c)
    residual = np.abs(A[:, free] @ x_S - b).max() / (1.0 + np.abs(b).max())
    if residual > POLISHED or np.abs(x_S - x_c).max() > NEAR_CLARABEL * (1 + x_c.max()):
        raise RuntimeError(f"reference polish failed: residual {residual:.1e}, "
                           f"|x − Clarabel| {np.abs(x_S - x_c).max():.1e}")
    x[free] = x_S
    return x
