"""An independent reference for entropy-regularized linear programs.

    maximize θᵀx + τ Σ entr(xᵢ)  s.t.  A x = b   (x ≥ 0 implied)

Nothing here is shared with the backend: feasibility and the face of the
orthant are decided by one small LP per coordinate (HiGHS: the largest xᵢ
over {Ax = b, x ≥ 0}), the problem restricted to the free coordinates
is solved by Clarabel through CVXPY (exponential cones), and its multiplier is
polished by Newton's method with an exact line search (bisection) on the dual
in the unscaled multiplier λ, in mpmath at MP_DIGITS digits beyond the smallest
entry of x (no overflow, no underflow that matters),

    G(λ) = τ Σ_S exp((θ_S − A_Sᵀλ)/τ − 1) + bᵀλ,   x_S = exp((θ_S − A_Sᵀλ)/τ − 1),

to a gradient ‖b − A x‖∞ of MP_TOL.
`directional_derivative` differentiates the same way, by a central difference
at h = 1e-20 in mpmath: exact to float64 precision even where float64 finite
differences are useless (entries of x near 1e-8 that carry O(1) derivatives).
"""

from __future__ import annotations

import cvxpy as cp
import mpmath as mp
import numpy as np
import scipy.linalg
import scipy.optimize

# A coordinate whose largest feasible value is below this is forced to zero.
FORCED = 1e-9
# Clarabel at tight tolerances gives the polish its start.
CLARABEL = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, tol_ktratio=1e-10,
                max_iter=500)
# The polish: Newton on the dual in mpmath at this many digits beyond the
# smallest entry of x (exp has no overflow there, and the answer is exact to far
# below float64's round-off), at most MP_MAX_DIGITS.
MP_DIGITS = 60
MP_MAX_DIGITS = 300
# ... to this gradient ‖b − A x‖∞: x exact to ~1e-50·cond, so that the central
# difference at h = 1e-20 is exact to float64 precision where cond ≤ 1e8.
MP_TOL = "1e-50"
MP_MAX_ITER = 200


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


def _kept_rows(A):
    """Independent rows of A: rank from its singular values, rows by QR with pivoting."""
    s = np.linalg.svd(A, compute_uv=False)
    rank = int((s > s.max() * max(A.shape) * 1e-12).sum()) if s.size and s.max() > 0 else 0
    if rank == 0:
        return np.zeros(0, dtype=np.int64)
    _, _, piv = scipy.linalg.qr(A.T, pivoting=True)
    return np.sort(piv[:rank])


def _independent(A, b):
    """Independent rows of A and their b; the other rows' b must follow (else Infeasible)."""
    keep = _kept_rows(A)
    if keep.size == 0:
        if np.abs(b).max(initial=0.0) > 1e-12:
            raise Infeasible
        return A[:0], b[:0]
    coef = np.linalg.lstsq(A[keep].T, A.T, rcond=None)[0]  # A = coefᵀ A_keep
    if np.abs(coef.T @ b[keep] - b).max() > 1e-10 * (1 + np.abs(b).max()):
        raise Infeasible
    return A[keep], b[keep]


def _clarabel(A, b, theta, tau):
    """Clarabel's multiplier for A x = b, in the sign of λ below (stationarity
    θ − τ(1 + log x) = Aᵀλ): an interior-point method's duals are accurate where
    the tiny entries of its x are not."""
    n = A.shape[1]
    x = cp.Variable(n)
    eq = A @ x == b
    prob = cp.Problem(cp.Maximize(theta @ x + tau * cp.sum(cp.entr(x))), [eq])
    prob.solve(solver=cp.CLARABEL, **CLARABEL)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"Clarabel: {prob.status}")
    y = np.asarray(eq.dual_value, dtype=np.float64).ravel()
    x_c = np.maximum(np.asarray(x.value, dtype=np.float64), 0.0)
    # CVXPY's sign convention for a maximization's duals: take the sign that
    # reproduces Clarabel's largest entries.
    big = x_c >= 0.5 * x_c.max()
    fit = [np.abs(theta[big] - tau * (1 + np.log(x_c[big])) - A[:, big].T @ (sgn * y)).max()
           for sgn in (1.0, -1.0)]
    return y if fit[0] <= fit[1] else -y


def _mp_newton(A, b, theta, tau, lam):
    """Minimize G(λ) in mpmath (no overflow, at the working precision) by Newton's method
    with an exact line search (bisection on the slope along the step, after
    doubling to bracket it: from a poor start exp makes the full step far too
    short or too long); returns x as mpf values."""
    m, n = A.shape
    A_ = [[mp.mpf(A[j, i]) for i in range(n)] for j in range(m)]
    tau = mp.mpf(tau)

    def primal(lam):
        return [mp.exp((theta[i] - mp.fsum(A_[j][i] * lam[j] for j in range(m))) / tau - 1)
                for i in range(n)]

    def gradient(lam):  # ∇G = b − A x(λ)
        x = primal(lam)
        return x, [b[j] - mp.fsum(A_[j][i] * x[i] for i in range(n)) for j in range(m)]

    def slope(lam, step, t):  # d/dt G(λ − t·step)
        _, g = gradient([lam[j] - t * step[j] for j in range(m)])
        return -mp.fsum(step[j] * g[j] for j in range(m))

    lam = [mp.mpf(v) for v in lam]
    for _ in range(MP_MAX_ITER):
        x, grad = gradient(lam)
        if max(abs(g) for g in grad) < mp.mpf(MP_TOL):
            return x, lam
        H = mp.matrix(m, m)
        for j in range(m):
            for k in range(m):
                H[j, k] = mp.fsum(A_[j][i] * x[i] * A_[k][i] for i in range(n)) / tau
        # Directions carried only by entries below the working precision (x ~ 1e-150
        # at small τ) make H singular there; a shift at that precision leaves them be.
        shift = mp.mpf(10) ** (5 - mp.mp.dps) * max(H[j, j] for j in range(m))
        for j in range(m):
            H[j, j] += shift
        step = list(mp.lu_solve(H, mp.matrix(grad)))
        lo, hi = mp.mpf(0), mp.mpf(1)
        while slope(lam, step, hi) < 0:
            lo, hi = hi, 2 * hi
        for _ in range(200):
            if hi - lo <= mp.mpf(10) ** -12 * hi:
                break
            mid = (lo + hi) / 2
            if slope(lam, step, mid) < 0:
                lo = mid
            else:
                hi = mid
        t = hi if abs(slope(lam, step, hi)) < abs(slope(lam, step, lo)) else lo
        lam = [lam[j] - t * step[j] for j in range(m)]
    raise RuntimeError("mpmath Newton did not converge")


def _restricted(A, b, theta, tau):
    """(free, A_S, b_S): the face, and the independent rows of A on it (Infeasible)."""
    free = face(A, b)
    if not free.any():
        return free, None, None
    A_S, b_S = _independent(A[:, free], b)
    if A_S.shape[0] == 0:
        raise RuntimeError("no constraint left on the free coordinates: unbounded entropy")
    return free, A_S, b_S


def solve(A, b, theta, tau):
    """x* (n,), with zeros on the forced coordinates; raises Infeasible."""
    return _polished(A, b, theta, tau)[0]


def _polished(A, b, theta, tau):
    """(x (n,) float64, free, kept rows, (λ as mpf, digits) or None)."""
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    free, A_S, b_S = _restricted(A, b, theta, tau)
    x = np.zeros(A.shape[1])
    if A_S is None:
        return x, free, None, None
    lam0 = _clarabel(A_S, b_S, theta[free], tau)
    digits = _digits(A_S, theta[free], tau, lam0)
    with mp.workdps(digits):
        x_mp, lam = _mp_newton(A_S, [mp.mpf(v) for v in b_S],
                               [mp.mpf(v) for v in theta[free]], tau, list(lam0))
    x[free] = [float(v) for v in x_mp]
    return x, free, _kept_rows(A[:, free]), (lam, digits)


def _digits(A, theta, tau, lam):
    """Working precision: MP_DIGITS beyond the smallest entry of x at λ, so that
    entries the constraints need (x₀ = 4x₁ ~ 1e-37 beside x₂ ~ 1) stay resolved."""
    log10_x = ((theta - A.T @ lam) / tau - 1.0) / np.log(10.0)
    return int(min(MP_MAX_DIGITS, MP_DIGITS + max(0.0, -np.floor(log10_x.min()))))


def directional_derivative(A, b, theta, tau, d_theta, d_b, w, h=1e-20):
    """d/dh wᵀx*(θ + h dθ, b + h db) at h = 0 by a central difference in mpmath
    (at least MP_DIGITS digits, so h = 1e-20 has neither truncation nor round-off
    to speak of), each side started from the exact multiplier. ``d_b`` must keep b on its
    face (d_b = A dz with dz on the free coordinates)."""
    A = np.asarray(A, dtype=np.float64)
    _, free, keep, start = _polished(A, b, theta, tau)
    if start is None:
        return 0.0  # x = 0 is the only feasible point
    lam, digits = start
    A_S = A[keep][:, free]
    with mp.workdps(digits):
        h = mp.mpf(h)
        sides = []
        for sign in (1, -1):
            bb = [mp.mpf(b[j]) + sign * h * mp.mpf(d_b[j]) for j in keep]
            th = [mp.mpf(theta[i]) + sign * h * mp.mpf(d_theta[i]) for i in np.flatnonzero(free)]
            sides.append(_mp_newton(A_S, bb, th, tau, lam)[0])
        wf = [mp.mpf(v) for v in np.asarray(w)[free]]
        diff = mp.fsum(wf[i] * (sides[0][i] - sides[1][i]) for i in range(len(wf)))
        return float(diff / (2 * h))
