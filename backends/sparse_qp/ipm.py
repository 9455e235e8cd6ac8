"""Primal–dual interior point (Mehrotra predictor–corrector) for one sample.

The dense engine's method (`backends.qp.ipm`, where each rule is explained)
for one sample at a time, with the Newton system solved by the sparse LDLᵀ
factorization of `kkt` instead of a dense elimination. The problem it sees is
already equilibrated (`scaling`). With slacks s ≥ 0 and multipliers λ ≥ 0
(inequalities), ν (equalities), the iterates approach

    Qz + q + Gᵀλ + Aᵀν = 0,   Gz + s = h,   Az = b,   s ∘ λ = 0,

each iteration factoring K₀ (W = S/Λ) once and solving it twice (predictor,
then corrector). The stopping test is the dense engine's, componentwise:

    primal       |Gx + s − h|ᵢ / (1 + |hᵢ| + |Gx|ᵢ)   and   |Ax − b|ᵢ / (1 + |bᵢ| + |Ax|ᵢ)
    dual         |r_d|ⱼ / (1 + |q|ⱼ + |Qx|ⱼ + |Gᵀλ|ⱼ + |Aᵀν|ⱼ)
    complement.  min(sᵢ / (1 + |hᵢ|), λᵢ)    and the gap sᵀλ / (1 + |objective|)

with the same `Ready` rounds before a polish, the same certificates of
infeasibility (Farkas) and unboundedness (a recession direction), and the same
codes. Rows with h = +inf keep λ = 0 and are identity rows of the Newton matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..qp.ipm import (
    INACCURATE,
    INFEASIBLE,
    MAX_ITER,
    NUMERICAL,
    OPTIMAL,
    RUNNING,
    STRICT,
    UNBOUNDED,
    WARM_START_SHIFT,
)
from .kkt import Breakdown, SampleKKT
from .settings import SparseQPSettings


@dataclass
class Point:
    """An iterate in scaled units: x (n), ν (m), λ (p), s (p; 1 on h = +inf rows)."""

    x: np.ndarray
    nu: np.ndarray
    lam: np.ndarray
    s: np.ndarray


@dataclass
class Vectors:
    """One sample's scaled q, h (0 on h = +inf rows), b and its free-row mask."""

    q: np.ndarray
    h: np.ndarray
    b: np.ndarray
    free: np.ndarray  # (p,) h = +inf
    keep: np.ndarray  # (p,) ~free
    count: int  # number of constrained rows (at least 1)


def vectors(q, h, b) -> Vectors:
    free = np.isposinf(h)
    return Vectors(q, np.where(free, 0.0, h), b, free, ~free, max(int((~free).sum()), 1))


def _inf(v: np.ndarray) -> float:
    return float(np.abs(v).max(initial=0.0))


def _max_step(v: np.ndarray, dv: np.ndarray) -> float:
    """Largest α ≤ 1 with v + α dv ≥ 0 (v > 0)."""
    neg = dv < 0
    if not neg.any():
        return 1.0
    return min(1.0, float((-v[neg] / dv[neg]).min()))


def residuals(op: SampleKKT, pt: Point, vec: Vectors, rows=STRICT, eps: float = 1.0) -> dict:
    """The KKT residuals at ``pt``, their scaled sizes ``res`` (3,) and ``stop``, the
    measure compared with eps under the test ``rows`` (`STRICT` or a `Ready`)."""
    x, lam, s, nu = pt.x, pt.lam, pt.s, pt.nu
    q, h, b = vec.q, vec.h, vec.b
    Hx, GTl = op.hess(x), op.GT(lam)
    ATn = op.AT(nu) if op.m else np.zeros_like(x)
    r_d = Hx + q + GTl + ATn
    Gx = op.G(x)
    Ax = op.A(x) if op.m else b
    r_p = np.where(vec.free, 0.0, Gx + s - h)
    r_e = Ax - b
    pres = max(_inf(r_p / (1 + np.abs(h) + np.abs(Gx))), _inf(r_e / (1 + np.abs(b) + np.abs(Ax))))
    dres = _inf(r_d / (1 + np.abs(q) + np.abs(Hx) + np.abs(GTl) + np.abs(ATn)))
    obj = 0.5 * float(x @ Hx) + float(q @ x)
    comp = float(s @ lam) / (1 + abs(obj))
    ready = None
    if op.p:
        # Per row: the slack or the multiplier at the tolerance (see `backends.qp.ipm`).
        s_n = s / (1 + np.abs(h))
        low, high = np.minimum(s_n, lam), np.maximum(s_n, lam)
        comp = max(comp, float(low[vec.keep].max(initial=0.0)))
        if rows is not STRICT:
            row = np.minimum(low / (rows.decided * np.maximum(high, 1e-300)), high / rows.small)
            ready = float(row[vec.keep].max(initial=0.0)) * eps
    res = np.array([pres, dres, comp])
    if rows is STRICT:
        stop = float(res.max())
    else:
        stop = max(pres, dres) * (eps / rows.loose)
        stop = stop if ready is None else max(stop, ready)
    return dict(r_d=r_d, r_p=r_p, r_e=r_e, Hx=Hx, Gx=Gx, Ax=Ax, GTl=GTl, ATn=ATn, res=res,
                stop=stop)


def certificates(r: dict, pt: Point, vec: Vectors, m: int, tol: float):
    """(farkas, recession), read off iterates that have grown large (`backends.qp.ipm`)."""
    y_norm = max(_inf(pt.lam), _inf(pt.nu), 1e-300)
    farkas = (_inf(r["GTl"] + r["ATn"]) / y_norm <= tol
              and (float(vec.h @ pt.lam) + float(vec.b @ pt.nu)) / y_norm < -tol
              and y_norm > tol ** -0.5)
    x_norm = max(_inf(pt.x), 1e-300)
    g_max = float(r["Gx"][vec.keep].max(initial=0.0))
    recession = (_inf(r["Hx"]) / x_norm <= tol and g_max / x_norm <= tol
                 and float(vec.q @ pt.x) / x_norm < -tol and x_norm > tol ** -0.5
                 and (not m or _inf(r["Ax"]) / x_norm <= tol))
    return farkas, recession


def classify(worst, converged, best, stall, farkas, recession, eps, settings, last) -> int:
    """This iteration's code (the dense engine's rules, one sample)."""
    code = RUNNING
    if stall >= settings.not_improved_lim and best <= eps ** 0.5:
        code = INACCURATE
    if not np.isfinite(worst):
        code = NUMERICAL
    if last and code == RUNNING:
        code = MAX_ITER
    if recession and not converged:
        code = UNBOUNDED
    if farkas and not converged:
        code = INFEASIBLE
    return OPTIMAL if converged else code


def newton_step(op: SampleKKT, r: dict, pt: Point, vec: Vectors,
                settings: SparseQPSettings) -> Point:
    """Mehrotra's predictor–corrector step from ``pt``."""
    free = vec.free
    lam_safe = np.where(free, 1.0, pt.lam)
    w = pt.s / lam_safe
    op.set_matrix(vec.keep, np.where(free, -1.0, -w))
    op.factor()
    op.factored = "ipm"
    mu = float(pt.s @ pt.lam) / vec.count
    neg_rd, r_p, neg_re = -r["r_d"], r["r_p"], -r["r_e"]
    # Predictor (affine direction): its centering σ = (μ_aff/μ)³.
    sol, _ = op.solve(np.concatenate([neg_rd, neg_re, np.where(free, 0.0, pt.s - r_p)]))
    dl_a = np.where(free, 0.0, op.split(sol)[2])
    ds_a = np.where(free, 0.0, -pt.s - w * dl_a)
    alpha_a = min(_max_step(pt.s, ds_a), _max_step(pt.lam, dl_a))
    mu_a = float((pt.s + alpha_a * ds_a) @ (pt.lam + alpha_a * dl_a)) / vec.count
    sigma = min(max(mu_a / max(mu, 1e-300), 0.0), 1.0) ** 3
    # Corrector: the second-order term ds_a ∘ dλ_a and the centering target σμ.
    r_l = np.where(free, 0.0, (pt.s * pt.lam + ds_a * dl_a - sigma * mu) / lam_safe - r_p)
    sol, _ = op.solve(np.concatenate([neg_rd, neg_re, r_l]))
    dx, dn, dl = op.split(sol)
    dl = np.where(free, 0.0, dl)
    ds = np.where(free, 0.0, -r_p - r_l - w * dl)
    alpha = min(_max_step(pt.s, ds), _max_step(pt.lam, dl))
    if op.p:
        frac = min(max(1.0 - sigma, settings.step_fraction),
                   max(settings.step_fraction, settings.step_fraction_max))
        alpha = min(frac * alpha, 1.0)
    else:
        alpha = 1.0
    return Point(pt.x + alpha * dx, pt.nu + alpha * dn, pt.lam + alpha * dl, pt.s + alpha * ds)


def initial_point(op: SampleKKT, vec: Vectors, warm: Point | None) -> Point:
    """The dense engine's start (`backends.qp.ipm.initial_point`: W = diag(w₀),
    w₀ = max(1, |hᵢ| / (1 + median |h|))²), or a usable warm start."""
    h = vec.h
    typical = 1.0 + (float(np.median(np.abs(h))) if op.p else 0.0)
    w0 = np.maximum(np.abs(h) / typical, 1.0) ** 2
    op.set_matrix(vec.keep, np.where(vec.free, -1.0, -w0))
    op.factor()
    op.factored = "ipm"
    sol, _ = op.solve(np.concatenate([-vec.q, vec.b, h]))
    x, nu, lam_raw = op.split(sol)
    s, lam = -w0 * lam_raw, lam_raw.copy()
    if op.p:
        s[vec.free], lam[vec.free] = 1.0, 1.0
        a_s, a_l = float((-s).max()), float((-lam).max())
        if a_s >= 0:
            s = s + 1 + a_s
        if a_l >= 0:
            lam = lam + 1 + a_l
        lam[vec.free] = 0.0
    cold = Point(x.copy(), nu.copy(), lam, s)
    return cold if warm is None else _warm_point(warm, cold, vec)


def _warm_point(warm: Point, cold: Point, vec: Vectors) -> Point:
    """A previous solution (scaled units), pushed WARM_START_SHIFT into the interior."""
    if not all(np.isfinite(v).all() for v in (warm.x, warm.lam, warm.nu)):
        return cold
    s = np.where(np.isfinite(warm.s), warm.s, 1.0)
    lam = warm.lam
    if s.size:
        s = np.maximum(s, 0.0) + WARM_START_SHIFT * (1 + np.abs(s).max())
        lam = np.maximum(lam, 0.0) + WARM_START_SHIFT * (1 + np.abs(lam).max())
        lam = np.where(vec.free, 0.0, lam)
        s = np.where(vec.free, 1.0, s)
    return Point(warm.x.copy(), warm.nu.copy(), lam, s)


class Tracker:
    """One sample's loop state: its best iterate (by worst scaled residual), stalls."""

    def __init__(self, iterations: int = 0):
        self.iterations = iterations
        self.best = np.inf
        self.best_point = None
        self.best_res = np.full(3, np.nan)
        self.res = np.full(3, np.nan)
        self.stalled = 0

    def record(self, it: int, res: np.ndarray, pt: Point):
        worst = float(res.max()) if np.isfinite(res).all() else np.inf
        if worst < self.best or self.best_point is None:
            self.best_point, self.best_res = pt, res
        improved = worst < 0.9 * self.best
        self.best = min(worst, self.best)
        self.stalled = 0 if improved else self.stalled + 1
        self.iterations, self.res = it, res
        return worst


def iterate(op: SampleKKT, vec: Vectors, pt: Point, settings: SparseQPSettings, eps: float,
            rows, track: Tracker, deadline: float | None):
    """Run from ``pt`` until a code other than RUNNING; returns (code, point).

    Continues the iteration count in ``track``. A sample stopped other than by
    convergence returns its best iterate (and the residuals in ``track.res``).
    """
    pt_now = pt
    for it in range(track.iterations, settings.max_iter + 1):
        r = residuals(op, pt_now, vec, rows, eps)
        worst = track.record(it, r["res"], pt_now)
        converged = r["stop"] <= eps
        farkas, recession = certificates(r, pt_now, vec, op.m, settings.infeas_tol)
        last = it == settings.max_iter or (deadline is not None and time.monotonic() > deadline)
        code = classify(worst, converged, track.best, track.stalled, farkas, recession, eps,
                        settings, last)
        if code == RUNNING:
            try:
                pt_now = newton_step(op, r, pt_now, vec, settings)
            except Breakdown:
                code = NUMERICAL
        if code != RUNNING:
            if not converged and track.best < worst:
                pt_now, track.res = track.best_point, track.best_res
            return code, pt_now
    return MAX_ITER, pt_now
