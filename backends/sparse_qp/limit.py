"""The KKT system at the solution: the polish and the backward's adjoint solve.

The dense engine's limit system (`backends.qp.limit`, where the math and the
tie handling are explained): in the limit μ → 0 an active row (s = 0) holds as
an equality and an inactive one (λ = 0) drops out, so with C = [A; G_active]

    [ Q   Cᵀ ] [a_z]   [g_z]
    [ C   0  ] [a_C] = [g_C],        a_λ = 0 on inactive rows.

Row i is active when ŝᵢ/(1 + |ĥᵢ|) < λ̂ᵢ on the equilibrated problem. Here the
system keeps the KKT matrix's pattern (inactive rows become identity rows),
so each sample's solver is refactored in place: the polish's factorization is
the one the backward reuses. A tie (a non-unique solution or dependent active
rows: K₀ singular) is handled by the refinement with the exact matrix, which
converges to the least-norm solution along the tie for a consistent
right-hand side; where it does not converge (an inconsistent right-hand side
on a tie), LSQR on the exact sparse matrix gives the least-squares solution
of least norm, as the dense engine's pseudo-inverse does.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla

from ..qp.ipm import STRICT
from .ipm import Point, Vectors, residuals
from .kkt import Breakdown, SampleKKT

# Relative residual below which a refined limit solve is accepted (the dense
# engine's REFINE_TOL in float64); above it, the least-squares fallback.
ADJOINT_TOL = 1e-12
# The least-squares fallback's tolerances and iteration cap (times the dimension).
LSQR_TOL = 1e-14
LSQR_ITER_FACTOR = 20


def active_rows(pt: Point, vec: Vectors) -> np.ndarray:
    """(p,) rows held as equalities at the solution (scaled data)."""
    return (pt.s / (1.0 + np.abs(vec.h)) < pt.lam) & vec.keep


def factor_limit(op: SampleKKT, active: np.ndarray) -> None:
    """Factor the limit system for ``active`` (a no-op when it is already factored)."""
    if isinstance(op.factored, np.ndarray) and np.array_equal(op.factored, active):
        return
    op.factored = None
    op.set_matrix(active, np.where(active, 0.0, -1.0))
    op.factor()
    op.factored = active.copy()


def solve_limit(op: SampleKKT, active: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """The limit system's solution for ``rhs`` (z, ν, λ order; inactive rows' entries
    are dropped), by the factor with refinement, else least squares."""
    n, m = op.n, op.m
    rhs = rhs.copy()
    rhs[n + m:][~active] = 0.0
    sol, err = (op.solve(rhs) if isinstance(op.factored, np.ndarray)
                else (None, np.inf))  # a factorization that broke down: least squares
    if not (err <= ADJOINT_TOL and np.isfinite(sol).all()):
        sol = least_squares(op, rhs)
    sol[n + m:][~active] = 0.0
    return sol


def least_squares(op: SampleKKT, rhs: np.ndarray) -> np.ndarray:
    """min ‖x‖ among the minimizers of ‖K₀x − rhs‖ (K₀ is symmetric)."""
    K = sla.LinearOperator((op.N, op.N), matvec=op.apply, rmatvec=op.apply, dtype=np.float64)
    return sla.lsqr(K, rhs, atol=LSQR_TOL, btol=LSQR_TOL, iter_lim=LSQR_ITER_FACTOR * op.N)[0]


def polish(op: SampleKKT, vec: Vectors, pt: Point, eps: float):
    """The exact KKT point on ``pt``'s active set and whether it passes the strict
    test (feasible within eps, λ ≥ 0 within eps, residuals within eps):
    (ok, point, residuals)."""
    active = active_rows(pt, vec)
    try:
        factor_limit(op, active)
    except Breakdown:
        return False, pt, None
    h0 = np.where(active, vec.h, 0.0)
    sol = solve_limit(op, active, np.concatenate([-vec.q, vec.b, h0]))
    x, nu, lam = op.split(sol)
    s = np.where(vec.free, 1.0, vec.h - op.G(x))
    feasible = True
    if op.p:
        scale_l = 1.0 + float(np.abs(lam).max())
        feasible = bool((s[vec.keep] >= -eps * (1.0 + np.abs(vec.h[vec.keep]))).all()
                        and (lam >= -eps * scale_l).all())
    point = Point(x.copy(), nu.copy(), np.maximum(lam, 0.0), np.maximum(s, 0.0))
    res = residuals(op, point, vec, STRICT)["res"]
    ok = feasible and bool(np.isfinite(res).all()) and float(res.max()) <= eps
    return ok, point, res
