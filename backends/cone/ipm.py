"""Batched primal–dual interior point on the homogeneous self-dual embedding.

Problem (equilibrated, `scaling`): min cᵀx s.t. Ax + s = b, s ∈ K (`cones`).
The embedding (Ye, Todd & Mizuno 1994; as in ECOS and Clarabel) adds τ, κ ≥ 0:

    r_x = Aᵀz + cτ = 0,   r_z = Ax + s − bτ = 0,   r_τ = cᵀx + bᵀz + κ = 0,
    s ∈ K, z ∈ K*, sᵀz = 0, τκ = 0.

A solution with τ > 0 gives the optimum (x, z, s)/τ; one with κ > 0 a
certificate: bᵀz < 0 with Aᵀz = 0 (primal infeasible), or cᵀx < 0 with
Ax + s = 0 (dual infeasible: unbounded). Each iteration is Mehrotra's
predictor–corrector (as Clarabel's): with H the cone scaling (`metric`) the
step solves

    AᵀΔz + cΔτ = −d_x,   AΔx + Δs − bΔτ = −d_z,   cᵀΔx + bᵀΔz + Δκ = −d_τ,
    Δs + HΔz = −d_s,     κΔτ + τΔκ = −d_κ,

by two solves with K = [[0, Aᵀ], [A, −H]] (`kkt`): v₁ = K⁻¹[c; −b] and
v₂ = K⁻¹[−d_x; d_s − d_z], then Δτ from the last row and Δ = v₂ − Δτ v₁.

Stopping test (per sample, on the equilibrated problem, at x̄ = x/τ, …):

    primal  ‖Ax̄ + s̄ − b‖∞ / (1 + max(‖b‖∞, ‖Ax̄‖∞, ‖s̄‖∞))
    dual    ‖Aᵀz̄ + c‖∞ / (1 + max(‖c‖∞, ‖Aᵀz̄‖∞))
    gap     |cᵀx̄ + bᵀz̄| / (1 + min(|cᵀx̄|, |bᵀz̄|))

all at most eps: optimal. Samples are independent: a finished sample leaves
the active set and is no longer updated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import exp as exp_cone
from .cones import Cones
from .kkt import NormalKKT, mv, rmv
from .metric import Metric
from .settings import ConeSettings

RUNNING, OPTIMAL, INFEASIBLE, UNBOUNDED, MAX_ITER, NUMERICAL, INACCURATE = range(7)
# A warm start's slacks and duals are pushed this far (relative to their
# scale) into the interior: a point on the boundary leaves no room to move.
WARM_START_SHIFT = 1e-3


@dataclass
class Iterates:
    """The embedding's final state (equilibrated units), per sample."""

    x: torch.Tensor  # (B, n)
    z: torch.Tensor  # (B, m)
    s: torch.Tensor  # (B, m)
    tau: torch.Tensor  # (B,)
    kappa: torch.Tensor  # (B,)
    codes: torch.Tensor  # (B,)
    iterations: torch.Tensor  # (B,)
    residuals: torch.Tensor  # (B, 3): primal, dual, gap

    def take(self, idx, other: Iterates) -> None:
        for name in ("x", "z", "s", "tau", "kappa", "codes", "iterations", "residuals"):
            mine = getattr(self, name)
            setattr(self, name, mine.index_copy(0, idx, getattr(other, name).to(mine.dtype)))


def _inf(t):
    if t.shape[-1] == 0:
        return t.new_zeros(t.shape[:-1])
    return t.abs().amax(-1)


def _dot(u, v):
    return (u * v).sum(-1)


# ---------------------------------------------------------------------------
# Start
# ---------------------------------------------------------------------------


def initial_point(A, b, c, cones: Cones, settings: ConeSettings, warm: dict | None):
    """Clarabel's start with H = I: x = argmin ‖Ax − b‖ (zero rows exact), s = b − Ax;
    z the least-norm solution of Aᵀz = −c; s, z shifted into the cone; τ = κ = 1."""
    B, m = b.shape
    e = cones.unit(b)
    if cones.ne:
        # Nonsymmetric cones have no shift into the interior that keeps a start
        # centered: every cone starts at its central point, x at 0 (as Clarabel).
        tau = torch.ones(B, dtype=b.dtype, device=b.device)
        x, z, s = torch.zeros_like(c), e.clone(), e.clone()
        if warm is not None:
            x, z, s = _warm_point(cones, warm, (x, z, s))
        return x, z, s, tau, torch.ones_like(tau)
    metric = Metric(cones, e, e, settings.static_reg)
    kkt = NormalKKT(A, metric, settings.static_reg, settings.regularization_tries)
    r1 = torch.stack([torch.zeros_like(c), -c], -1)
    r2 = torch.stack([b, torch.zeros_like(b)], -1)
    X, Z = kkt.solve(r1, r2, settings.refine_steps)
    x, s, z = X[..., 0], -Z[..., 0], Z[..., 1]
    s, z = cones.shift_into(s, 1.0), cones.shift_into(z, 1.0)
    tau = torch.ones(B, dtype=b.dtype, device=b.device)
    kappa = torch.ones_like(tau)
    if warm is not None:
        x, z, s = _warm_point(cones, warm, (x, z, s))
    return x, z, s, tau, kappa


def _warm_point(cones: Cones, warm: dict, cold):
    """A previous solution (x, y, s; equilibrated units) moved into the interior."""
    x0, z0, s0 = cold
    x, z, s = (warm[k].to(dtype=x0.dtype, device=x0.device) for k in ("x", "y", "s"))
    ok = torch.isfinite(x).all(-1) & torch.isfinite(z).all(-1) & torch.isfinite(s).all(-1)
    s = cones.shift_into(s, WARM_START_SHIFT * (1 + _inf(s)).unsqueeze(-1))
    z = cones.shift_into(z, WARM_START_SHIFT * (1 + _inf(z)).unsqueeze(-1))
    keep = ok.unsqueeze(-1)
    return (torch.where(keep, x, x0), torch.where(keep, z, z0), torch.where(keep, s, s0))


# ---------------------------------------------------------------------------
# Residuals and the status of each sample
# ---------------------------------------------------------------------------


def residuals(A, b, c, x, z, s, tau, kappa):
    """The embedding's residuals and the scaled measures of the stopping test."""
    Ax = mv(A, x.unsqueeze(-1)).squeeze(-1)
    ATz = rmv(A, z.unsqueeze(-1)).squeeze(-1)
    rx = ATz + c * tau.unsqueeze(-1)
    rz = Ax + s - b * tau.unsqueeze(-1)
    cx, bz = _dot(c, x), _dot(b, z)
    rt = cx + bz + kappa
    t = tau.clamp_min(1e-300)
    pres = _inf(rz) / t / (1 + torch.maximum(_inf(b), torch.maximum(_inf(Ax), _inf(s)) / t))
    dres = _inf(rx) / t / (1 + torch.maximum(_inf(c), _inf(ATz) / t))
    gap = (cx + bz).abs() / t / (1 + torch.minimum(cx.abs(), bz.abs()) / t)
    res = torch.stack([pres, dres, gap], -1)
    return dict(rx=rx, rz=rz, rt=rt, Ax=Ax, ATz=ATz, cx=cx, bz=bz, res=res)


def certificates(r: dict, x, z, s, tau, kappa, tol: float):
    """(primal infeasible, dual infeasible) read off the raw embedding iterates."""
    leaning = kappa >= tau
    bz, cx = r["bz"], r["cx"]
    pinf = leaning & (bz < 0) & (_inf(r["ATz"]) <= tol * (-bz)) & (-bz > tol * _inf(z))
    dinf = leaning & (cx < 0) & (_inf(r["Ax"] + s) <= tol * (-cx)) & (-cx > tol * _inf(x))
    return pinf, dinf


def classify(worst, converged, best, stall, pinf, dinf, eps, settings, last, failed):
    code = torch.full_like(stall, RUNNING)
    floor = (stall >= settings.not_improved_lim) & (best <= eps ** 0.5)
    code = torch.where(floor, INACCURATE, code)
    if last:
        code = torch.where(code == RUNNING, MAX_ITER, code)
    code = torch.where(dinf & ~converged, UNBOUNDED, code)
    code = torch.where(pinf & ~converged, INFEASIBLE, code)
    # Rounding ends a solve near its accuracy floor (a cone's det lost to cancellation,
    # a factorization that fails): within √eps that is optimal_inaccurate, at the
    # best iterate; elsewhere a numerical error.
    broken = ~torch.isfinite(worst) | failed
    code = torch.where(broken, torch.where(best <= eps ** 0.5, INACCURATE, NUMERICAL), code)
    return torch.where(converged, OPTIMAL, code)


# ---------------------------------------------------------------------------
# The Newton step
# ---------------------------------------------------------------------------


def _tau_step(b, c, x1, z1, x2, z2, rhs_tau, d_kappa, tau, kappa):
    """Δτ from the embedding's last row, given v₁ = (x1, z1) and v₂ = (x2, z2)."""
    num = _dot(c, x2) + _dot(b, z2) + rhs_tau - d_kappa / tau
    den = _dot(c, x1) + _dot(b, z1) + kappa / tau
    return num / den


def _direction(kkt, metric, b, c, v1, r1, r2, d_s, rhs_tau, d_kappa, tau, kappa, steps):
    x2, z2 = (t.squeeze(-1) for t in kkt.solve(r1.unsqueeze(-1), r2.unsqueeze(-1), steps))
    x1, z1 = v1
    dtau = _tau_step(b, c, x1, z1, x2, z2, rhs_tau, d_kappa, tau, kappa)
    dx = x2 - dtau.unsqueeze(-1) * x1
    dz = z2 - dtau.unsqueeze(-1) * z1
    ds = -d_s - metric.h(dz)
    dkappa = -(d_kappa + kappa * dtau) / tau
    return dx, dz, ds, dtau, dkappa


def _max_step(cones, s, z, tau, kappa, ds, dz, dtau, dkappa):
    """The longest step keeping s, z, τ, κ interior (s and z in one batched pass)."""
    B = s.shape[0]
    both = cones.max_step(torch.cat([s, z]), torch.cat([ds, dz]))
    alpha = torch.minimum(both[:B], both[B:])
    tk, dtk = torch.stack([tau, kappa], -1), torch.stack([dtau, dkappa], -1)
    neg = dtk < 0
    ratio = torch.where(neg, -tk / torch.where(neg, dtk, -1.0), 1e30).amin(-1)
    return torch.minimum(alpha, ratio)


def newton_step(A, b, c, cones: Cones, state, r: dict, settings: ConeSettings):
    """Mehrotra's predictor–corrector step; returns (new state, factorization failed)."""
    x, z, s, tau, kappa = state
    mu = (cones.dot(s, z) + tau * kappa) / (cones.degree + 1)
    metric = Metric(cones, s, z, settings.static_reg)
    kkt = NormalKKT(A, metric, settings.static_reg, settings.regularization_tries)
    steps = settings.refine_steps
    # v₁ = K⁻¹[c; −b] and the affine direction's v₂ in one solve (two columns).
    d_s = s.clone()
    d_s[:, :cones.l0] = 0
    X, Z = kkt.solve(torch.stack([c, -r["rx"]], -1), torch.stack([-b, d_s - r["rz"]], -1),
                     steps)
    v1 = (X[..., 0], Z[..., 0])
    dtau = _tau_step(b, c, *v1, X[..., 1], Z[..., 1], r["rt"], tau * kappa, tau, kappa)
    dz_a = Z[..., 1] - dtau.unsqueeze(-1) * v1[1]
    ds_a = -d_s - metric.h(dz_a)
    dkappa_a = -(tau * kappa + kappa * dtau) / tau
    alpha = _max_step(cones, s, z, tau, kappa, ds_a, dz_a, dtau, dkappa_a).clamp(max=1.0)
    sigma = ((1 - alpha) ** 3).unsqueeze(-1)
    # Corrector: the second-order terms and the centering target σμ.
    d_s = _combined_ds(cones, metric, s, z, ds_a, dz_a, sigma, mu.unsqueeze(-1))
    d_kappa = tau * kappa + dtau * dkappa_a - sigma.squeeze(-1) * mu
    keep = 1 - sigma
    dx, dz, ds, dtau, dkappa = _direction(
        kkt, metric, b, c, v1, -keep * r["rx"], d_s - keep * r["rz"], d_s,
        keep.squeeze(-1) * r["rt"], d_kappa, tau, kappa, steps)
    alpha = _max_step(cones, s, z, tau, kappa, ds, dz, dtau, dkappa)
    alpha = (settings.step_fraction * alpha).clamp(max=1.0)
    a = alpha.unsqueeze(-1)
    new = (x + a * dx, z + a * dz, s + a * ds, tau + alpha * dtau, kappa + alpha * dkappa)
    return new, kkt.failed


def _combined_ds(cones: Cones, metric: Metric, s, z, ds_a, dz_a, sigma, mu):
    """d_s of the corrector: W(λ \\ (λ∘λ + (W⁻¹Δs_a)∘(WΔz_a) − σμe)) on symmetric cones,
    the exponential cones' own (`exp`)."""
    lam = metric.lam(z)
    e = cones.unit(s)
    target = (cones.circ(lam, lam) + cones.circ(metric.w(ds_a, inverse=True), metric.w(dz_a))
              - sigma * mu * e)
    d_s = metric.w(cones.circ_div(lam, target))
    if cones.ne:
        exp = exp_cone.combined_ds(metric.exp, cones.exp(s), cones.exp(z), cones.exp(ds_a),
                                   cones.exp(dz_a), sigma, mu)
        d_s = torch.cat([d_s[:, :cones.e0], exp], 1)
    return d_s


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class _Tracker:
    """Per-sample bookkeeping: best iterate (by worst residual), stall counts, codes."""

    def __init__(self, B, dtype, device, state):
        self.codes = torch.zeros(B, dtype=torch.long, device=device)
        self.iterations = torch.zeros(B, dtype=torch.long, device=device)
        self.residuals = torch.full((B, 3), float("nan"), dtype=dtype, device=device)
        self.best = torch.full((B,), float("inf"), dtype=dtype, device=device)
        self.stalled = torch.zeros(B, dtype=torch.long, device=device)
        self.best_res = self.residuals.clone()
        self.best_state = list(state)

    def record(self, active, it, res, state):
        worst = res.amax(-1)
        better = worst < self.best[active]
        if bool(better.any()):
            sel = active[better]
            self.best_state = [t.index_copy(0, sel, v[better])
                               for t, v in zip(self.best_state, state)]
            self.best_res[sel] = res[better]
        improved = worst < 0.9 * self.best[active]
        self.best[active] = torch.fmin(worst, self.best[active])  # NaN-blind
        stall = torch.where(improved, torch.zeros_like(active), self.stalled[active] + 1)
        self.stalled[active] = stall
        self.iterations[active] = it
        self.residuals[active] = res
        return worst, stall


def _pick(t, idx, batched=True):
    return t if idx is None or not batched else t.index_select(0, idx)


def solve(A, b, c, cones: Cones, settings: ConeSettings, eps: float,
          warm: dict | None = None) -> Iterates:
    """Run the interior point on the equilibrated data (A shared (m, n) or (B, m, n))."""
    B = b.shape[0]
    state = list(initial_point(A, b, c, cones, settings, warm))
    track = _Tracker(B, b.dtype, b.device, state)
    active = torch.arange(B, device=b.device)
    A_act, b_act, c_act = A, b, c
    failed = torch.zeros(B, dtype=torch.bool, device=b.device)
    for it in range(settings.max_iter + 1):
        sub = None if active.numel() == B else active
        st = [_pick(t, sub) for t in state]
        r = residuals(A_act, b_act, c_act, *st)
        worst, stall = track.record(active, it, r["res"], st)
        converged = r["res"].amax(-1) <= eps
        pinf, dinf = certificates(r, *st, settings.infeas_tol)
        code = classify(worst, converged, track.best[active], stall, pinf, dinf, eps,
                        settings, it == settings.max_iter, failed)
        done = code != RUNNING
        if bool(done.any()):
            _retire(track, state, active, code, done, converged, worst)
            keep = (~done).nonzero().squeeze(-1)
            active = active[keep]
            if active.numel() == 0:
                break
            st = [t[keep] for t in st]
            r = {k: v[keep] for k, v in r.items()}
            A_act = _pick(A, active, A.dim() == 3)
            b_act, c_act = b[active], c[active]
        new, bad = newton_step(A_act, b_act, c_act, cones, st, r, settings)
        failed = bad
        state = [t.index_copy(0, active, v) for t, v in zip(state, new)]
    return Iterates(*state, track.codes, track.iterations, track.residuals)


def _retire(track: _Tracker, state: list, active, code, done, converged, worst) -> None:
    """Record finished samples' codes; stalled or capped ones go back to their best."""
    sel = done.nonzero().squeeze(-1)
    track.codes[active[sel]] = code[sel]
    revert = done & ~converged & (code != INFEASIBLE) & (code != UNBOUNDED) & (
        (track.best[active] < worst) | ~torch.isfinite(worst))
    if bool(revert.any()):
        back = active[revert]
        for i, t in enumerate(state):
            state[i] = t.index_copy(0, back, track.best_state[i][back])
        track.residuals[back] = track.best_res[back]
