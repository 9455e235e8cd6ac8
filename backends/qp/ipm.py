"""Batched primal–dual interior point (Mehrotra predictor–corrector) for QPs.

Problem and shapes: see `data`; the problem it sees is already equilibrated
(`scaling`), and the iterates x live in the elimination's working space (`kkt`).
With slacks s ≥ 0 and multipliers λ ≥ 0 (inequalities), ν (equalities), the
iterates approach the KKT conditions

    Qz + q + Gᵀλ + Aᵀν = 0,   Gz + s = h,   Az = b,   s ∘ λ = 0.

Each iteration factors the Newton matrix once, then solves it twice: the affine
(predictor) direction gives the centering σ = (μ_aff / μ)³, the corrector adds
the second-order term ds_aff ∘ dλ_aff. Samples are independent: a sample that
has converged (or failed) leaves the active set and is no longer updated.

Stopping test (one criterion, per sample, on the equilibrated problem). Each
row and each component is measured against its own terms, so a huge entry in
one part of a problem (a linear cost of 1e12 on one variable) cannot hide an
error in another:

    primal       |Gx + s − h|ᵢ / (1 + |hᵢ| + |Gx|ᵢ)   and   |Ax − b|ᵢ / (1 + |bᵢ| + |Ax|ᵢ)
    dual         |r_d|ⱼ / (1 + |q|ⱼ + |Hx|ⱼ + |Gᵀλ|ⱼ + |Aᵀν|ⱼ)
    complement.  min(sᵢ / (1 + |hᵢ|), λᵢ)    and the gap sᵀλ / (1 + |objective|)

A sample is optimal when the largest of these is at most ``eps``. Requiring
one of sᵢ, λᵢ to reach the tolerance on every row (not only their product)
settles which rows are active, which the backward relies on (`limit`), and
keeps a weakly active row from stopping at s = λ = √μ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .kkt import KKTSystem
from .settings import QPSettings

# W for an h = +inf row: large enough that W⁻¹ vanishes next to any real row.
FREE_ROW_WEIGHT = 1e30
# Floors for s and λ under `fixed_iterations` (far below any tolerance).
SLACK_FLOOR = {torch.float64: 1e-14, torch.float32: 1e-7}
# Integer codes used on the device; `Status` is made of them once, at the end.
RUNNING, OPTIMAL, INFEASIBLE, UNBOUNDED, MAX_ITER, NUMERICAL, INACCURATE = range(7)
# Warm start: the previous solution's slacks and multipliers are pushed at least
# this far (relative to their scale) into the interior; a point on the boundary
# (s·λ ≈ 0) would leave the Newton steps no room to move. Measured on a drifting
# batch (n = 40, p = 60): 1e-3 takes 5.3 iterations for small drifts and 9.3 for
# large ones (cold: 10.9, 11.2); 1e-4 is faster on small drifts, slower than cold
# on large ones.
WARM_START_SHIFT = 1e-3


@dataclass
class Iterates:
    """The interior point's final state, in the equilibrated problem's units."""

    x: torch.Tensor  # (B, n) primal, working space
    lam: torch.Tensor  # (B, p)
    s: torch.Tensor  # (B, p) slacks (0 on h = +inf rows)
    nu: torch.Tensor  # (B, m)
    codes: torch.Tensor  # (B,) RUNNING .. INACCURATE
    iterations: torch.Tensor  # (B,)
    residuals: torch.Tensor  # (B, 3): primal, dual, complementarity (see the module doc)
    free: torch.Tensor | None  # (B, p) rows with h = +inf, or None

    def take(self, idx: torch.Tensor, other: Iterates) -> None:
        """Replace samples ``idx`` by ``other``'s (a solve of just those samples)."""
        for name in ("x", "lam", "s", "nu", "codes", "iterations", "residuals"):
            mine = getattr(self, name)
            setattr(self, name, mine.index_copy(0, idx, getattr(other, name).to(mine.dtype)))


def _inf_norm(t: torch.Tensor) -> torch.Tensor:
    if t.shape[-1] == 0:
        return torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
    return t.abs().amax(-1)


def _step_to_boundary(s, ds, lam, dl) -> torch.Tensor:
    """Largest α ≤ 1 with s + α ds ≥ 0 and λ + α dλ ≥ 0, per sample, as (B, 1)."""
    if s.shape[-1] == 0:
        return torch.ones(s.shape[:-1] + (1,), dtype=s.dtype, device=s.device)
    if torch.is_grad_enabled() and (ds.requires_grad or dl.requires_grad):
        return torch.minimum(_max_step(s, ds), _max_step(lam, dl)).unsqueeze(-1)
    # Without a graph the other branch's inf or NaN (λ = dλ = 0 on free rows) is harmless.
    inf = constant(float("inf"), s)
    ratio = torch.minimum(torch.where(ds < 0, -s / ds, inf), torch.where(dl < 0, -lam / dl, inf))
    return ratio.amin(-1, keepdim=True).clamp(max=1.0)


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest α ≤ 1 with v + α dv ≥ 0, per sample (v > 0)."""
    neg = dv < 0
    # Divide only where dv < 0: torch.where would otherwise carry the other
    # branch's inf into the unrolled backward as NaN.
    safe = torch.where(neg, dv, -torch.ones_like(dv))
    ratio = torch.where(neg, -v / safe, torch.full_like(v, float("inf")))
    return ratio.amin(-1).clamp(max=1.0)


_CONSTANTS: dict = {}


def constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device, made once: a Python
    float in torch.where is wrapped into a new tensor on every call."""
    key = (value, like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return t


def _zero_free(t, free):
    return t if free is None else torch.where(free, torch.zeros_like(t), t)


# ---------------------------------------------------------------------------
# Initial point
# ---------------------------------------------------------------------------


def initial_point(kkt: KKTSystem, q, h, b, free, warm: dict | None):
    """A start from the Newton system with W = diag(w₀), or a warm start.

    With W = I (CVXOPT's choice) x minimizes ½xᵀQx + qᵀx + ½‖Gx − h‖²: every
    row pulls Gx towards h, and one far bound (h = 1e10, a "big M") drags x out
    to 1e9 and the multipliers with it. Weighting row i by
    w₀ = max(1, |hᵢ| / (1 + median |h|))² leaves rows of ordinary size as they
    were and makes a far row's pull vanish (its λ starts near 0, its slack near
    hᵢ: inactive, as it will stay).
    """
    p = kkt.p
    typical = 1.0 + (h.abs().median(-1, keepdim=True).values if p else 0.0)
    w0 = (h.abs() / typical).clamp_min(1.0).square()
    F0 = kkt.factor(w0)
    x, lam_raw, nu = kkt.solve(F0, -q, h, b)
    s, lam = -F0["w"] * lam_raw, lam_raw.clone()
    if p:
        if free is not None:
            s = torch.where(free, torch.ones_like(s), s)
            lam = torch.where(free, torch.ones_like(lam), lam)
        a_s = (-s).amax(-1, keepdim=True)
        s = torch.where(a_s >= 0, s + 1 + a_s, s)
        a_l = (-lam).amax(-1, keepdim=True)
        lam = torch.where(a_l >= 0, lam + 1 + a_l, lam)
        lam = _zero_free(lam, free)
    if warm is not None:
        x, lam, s, nu = _warm_point(kkt, warm, (x, lam, s, nu), free)
    return x, lam, s, nu


def _warm_point(kkt, warm: dict, cold, free):
    """Start from a previous solution (z, λ, s, ν; scaled units) where it is usable."""
    x0, l0, s0, n0 = cold
    z, lam, s, nu = (warm[k].to(dtype=x0.dtype, device=x0.device) for k in ("z", "lam", "s", "nu"))
    ok = torch.isfinite(z).all(-1) & torch.isfinite(lam).all(-1) & torch.isfinite(nu).all(-1)
    if s.shape[-1]:
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        shift_s = WARM_START_SHIFT * (1 + s.abs().amax(-1, keepdim=True))
        shift_l = WARM_START_SHIFT * (1 + lam.abs().amax(-1, keepdim=True))
        s = s.clamp_min(0) + shift_s
        lam = _zero_free(lam.clamp_min(0) + shift_l, free)
    x = kkt.from_original(z)
    keep = ok.unsqueeze(-1)
    return (torch.where(keep, x, x0), torch.where(keep, lam, l0), torch.where(keep, s, s0),
            torch.where(keep, nu, n0))


# ---------------------------------------------------------------------------
# Residuals, certificates and the status of each sample
# ---------------------------------------------------------------------------


# How close a sample must come before it stops. `STRICT`: every residual and
# every row's complementarity (the slack or the multiplier) at the tolerance. A
# `Ready` test asks less: the residuals within ``loose`` and each row's side
# decided, min(ŝ, λ) ≤ decided·max(ŝ, λ), or both below ``small`` (a weakly
# active row). That is enough for a polish on the active set to find the exact
# point (`engine`), which then passes the strict test or is refused.
STRICT = None


@dataclass(frozen=True)
class Ready:
    decided: float
    small: float
    loose: float


def scales(q, h, b):
    """The constant parts 1 + |q|, 1 + |h|, 1 + |b| of the residuals' denominators
    (`residuals`): one solve computes them once, not once per iteration."""
    return 1 + q.abs(), 1 + h.abs(), 1 + b.abs()


def residuals(act: KKTSystem, x, lam, s, nu, q, h, b, free, rows=STRICT, eps: float = 1.0,
              consts=None):
    """KKT residuals at (x, λ, s, ν): their scaled sizes ``res`` (B, 3) (see the
    module doc) and ``stop`` (B,), the measure the stopping test compares with
    ``eps`` under the test ``rows`` (`STRICT` or a `Ready`). ``consts``: `scales`
    of (q, h, b) if already known. Also returns the products the Newton step and
    the certificates reuse (``ATn``, ``Ax``: None without equalities) and the
    gap's terms ``sl`` = s ∘ λ and ``gap`` = sᵀλ."""
    m, p = act.m, act.p
    q1, h1, b1 = consts if consts is not None else scales(q, h, b)
    Hx = act.hess(x)
    GTl = act.GT(lam)
    r_d = Hx + q + GTl
    ATn = None
    if m:
        ATn = act.AT(nu)
        r_d = r_d + ATn
    # G x, A x and the Newton right-hand side's G r, A r (r = −r_d, shared by the
    # predictor and the corrector) in one pass over G and A.
    neg_rd = -r_d
    (Gx, Ax), pre = act.constraint_products(x, neg_rd)
    r_p = _zero_free(Gx + s - h, free)
    pres = _inf_norm(r_p / (h1 + Gx.abs()))
    if m:
        r_e = Ax - b
        pres = torch.maximum(pres, _inf_norm(r_e / (b1 + Ax.abs())))
    else:
        r_e = b  # (B, 0)
    scale_d = q1 + Hx.abs() + GTl.abs()
    dres = _inf_norm(r_d / (scale_d if ATn is None else scale_d + ATn.abs()))
    obj = 0.5 * (x * Hx).sum(-1) + (q * x).sum(-1)
    sl = s * lam
    gap = sl.sum(-1)
    comp = gap / (1 + obj.abs())
    ready = None
    if p:
        # Per row: the slack or the multiplier at the tolerance (the gap alone lets
        # a weakly active row stop at s = λ = √μ, an error of √μ in the solution).
        s_n = s / h1
        low, high = torch.minimum(s_n, lam), torch.maximum(s_n, lam)
        comp = torch.maximum(comp, _zero_free(low, free).amax(-1))
        if rows is not STRICT:  # scaled so that ≤ eps means "decided or both small"
            row = torch.minimum(low / (rows.decided * high.clamp_min(1e-300)), high / rows.small)
            ready = _zero_free(row, free).amax(-1) * eps
    res = torch.stack([pres, dres, comp], -1)
    if rows is STRICT:
        stop = res.amax(-1)
    else:
        stop = torch.maximum(pres, dres) * (eps / rows.loose)
        stop = stop if ready is None else torch.maximum(stop, ready)
    return dict(r_d=r_d, neg_rd=neg_rd, r_p=r_p, r_e=r_e, pre=pre, Hx=Hx, Gx=Gx, Ax=Ax,
                GTl=GTl, ATn=ATn, sl=sl, gap=gap, res=res, stop=stop)


def may_certify(x, lam, nu, tol: float) -> torch.Tensor:
    """(B,) samples whose iterates have grown past tol^(−1/2): a certificate
    (`certificates`) needs that, so the full test runs only when some sample has."""
    t = torch.cat([x, lam, nu], -1) if lam.shape[-1] + nu.shape[-1] else x
    # Not "> bound": a NaN entry hides the other entries' size, so it runs the test.
    return ~(_inf_norm(t) <= tol ** -0.5)


def certificates(r: dict, x, lam, nu, q, h, b, m: int, p: int, tol: float):
    """(farkas, recession): the iterates certify infeasibility or unboundedness.

    Farkas: y = (λ, ν) with Gᵀλ + Aᵀν ≈ 0 and hᵀλ + bᵀν < 0 (then no z fits);
    recession: a direction x with Hx ≈ 0, Ax ≈ 0, Gx ≤ 0 and qᵀx < 0. Both are
    read off normalized iterates that have grown large, as the iterates of an
    infeasible (unbounded) problem do.
    """
    y_norm = torch.maximum(_inf_norm(lam), _inf_norm(nu)).clamp_min(1e-300)
    dual = r["GTl"] if r["ATn"] is None else r["GTl"] + r["ATn"]
    farkas = (_inf_norm(dual) / y_norm <= tol) & (
        ((h * lam).sum(-1) + (b * nu).sum(-1)) / y_norm < -tol) & (y_norm > tol ** -0.5)
    x_norm = _inf_norm(x).clamp_min(1e-300)
    recession = ((_inf_norm(r["Hx"]) / x_norm <= tol)
                 & ((r["Gx"].amax(-1) if p else torch.zeros_like(x_norm)) / x_norm <= tol)
                 & ((q * x).sum(-1) / x_norm < -tol) & (x_norm > tol ** -0.5))
    if m:
        recession = recession & (_inf_norm(r["Ax"]) / x_norm <= tol)
    return farkas, recession


def classify(worst, converged, best, stall, farkas, recession, eps, settings, last: bool):
    """Each running sample's code after this iteration's residuals (``farkas``,
    ``recession``: None where `may_certify` ruled both out).

    A stall (no 10% improvement of the best residual in ``not_improved_lim``
    iterations) ends a sample only once it is within √eps (optimal_inaccurate):
    that is the accuracy floor of the arithmetic. Far from the solution an
    infeasible start can take a dozen iterations of growing residuals before it
    turns (seen on OptNet-shaped QPs with ill-conditioned Q), so there only the
    iteration cap, a certificate or a non-finite iterate end it.
    """
    code = torch.full_like(stall, RUNNING)
    if not settings.fixed_iterations:
        code = torch.where(_floor(best, stall, eps, settings), INACCURATE, code)
        code = torch.where(~torch.isfinite(worst), NUMERICAL, code)
    if last:
        code = torch.where(code == RUNNING, MAX_ITER, code)
    if recession is not None:
        code = torch.where(recession & ~converged, UNBOUNDED, code)
        code = torch.where(farkas & ~converged, INFEASIBLE, code)
    return torch.where(converged, OPTIMAL, code)


def _floor(best, stall, eps, settings: QPSettings):
    """Stalled at the accuracy floor (see `classify`)."""
    return (stall >= settings.not_improved_lim) & (best <= eps ** 0.5)


def _done(worst, converged, best, stall, eps, settings: QPSettings, can_stall: bool):
    """The samples `classify` ends, certificates aside (the loop's cheap test).
    ``can_stall``: whether the loop has run long enough for any sample to stall."""
    if settings.fixed_iterations:
        return converged
    done = converged | ~torch.isfinite(worst)
    return done | _floor(best, stall, eps, settings) if can_stall else done


# ---------------------------------------------------------------------------
# The Newton step
# ---------------------------------------------------------------------------


def newton_step(act: KKTSystem, r: dict, x, lam, s, nu, w, free, settings: QPSettings):
    """Mehrotra's predictor–corrector step from (x, λ, s, ν); returns the new point."""
    p = act.p
    F = act.factor(w)
    count = max(p, 1) if free is None else (~free).sum(-1, keepdim=True).clamp_min(1)
    mu = r["gap"].unsqueeze(-1) / count
    neg_rd, r_p, r_e, pre = r["neg_rd"], r["r_p"], r["r_e"], r["pre"]
    neg_re = -r_e if act.m else r_e
    # Predictor (affine direction): its centering σ = (μ_aff/μ)³.
    _, dl_a, _ = act.solve(F, neg_rd, _zero_free(s - r_p, free), neg_re, primal=False, pre=pre)
    ds_a = _zero_free(-s - w * dl_a, free)
    dl_a = _zero_free(dl_a, free)
    alpha_a = _step_to_boundary(s, ds_a, lam, dl_a)
    mu_a = ((s + alpha_a * ds_a) * (lam + alpha_a * dl_a)).sum(-1, keepdim=True) / count
    sigma = (mu_a / mu.clamp_min(1e-300)).clamp(0, 1) ** 3
    # Corrector: the second-order term ds_a ∘ dλ_a and the centering target σμ.
    r_l = _zero_free((r["sl"] + ds_a * dl_a - sigma * mu) / lam - r_p, free)
    dx, dl, dn = act.newton_solve(F, neg_rd, r_l, neg_re, pre=pre)
    ds = _zero_free(-r_p - r_l - w * dl, free)
    dl = _zero_free(dl, free)
    if p:
        alpha = _step_to_boundary(s, ds, lam, dl)
        alpha = torch.clamp(_step_fraction(sigma, settings) * alpha, max=1.0)
    else:
        alpha = torch.ones_like(mu)
    s_new, l_new = s + alpha * ds, lam + alpha * dl
    if settings.fixed_iterations and p:
        floor = SLACK_FLOOR.get(s.dtype, 1e-14)
        s_new, l_new = s_new.clamp_min(floor), _zero_free(l_new.clamp_min(floor), free)
    return x + alpha * dx, l_new, s_new, (nu + alpha * dn if act.m else nu)


def _step_fraction(sigma, settings: QPSettings):
    """How far toward the boundary to step: 1 − σ within [step_fraction,
    step_fraction_max]. A small σ means the affine direction nearly reached the
    target, so the step can go closer to the boundary (measured on random QPs,
    n = p = 100: 11.0 → 9.7 mean iterations). A fixed-iteration run (the unroll
    measurement) keeps the plain fraction: past convergence longer steps only
    reach the floors on s, λ sooner, and the unrolled derivative degrades there."""
    if settings.fixed_iterations:
        return settings.step_fraction
    low = settings.step_fraction
    return (1 - sigma.detach()).clamp(min=low, max=max(low, settings.step_fraction_max))


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class _Tracker:
    """Per-sample bookkeeping of the loop.

    ``best``, ``stalled`` and ``best_state`` follow the active samples (the
    loop's own order); the results (``point``, ``codes``, ``iterations``,
    ``residuals``) have every sample and are written once per sample, when it
    leaves the active set, so an iteration that retires nobody writes none.
    """

    def __init__(self, B, dtype, device, state):
        self.B = B
        self.codes = torch.zeros(B, dtype=torch.long, device=device)
        self.iterations = torch.zeros(B, dtype=torch.long, device=device)
        self.residuals = torch.full((B, 3), float("nan"), dtype=dtype, device=device)
        self.point = list(state)
        self.best = torch.full((B,), float("inf"), dtype=dtype, device=device)
        self.stalled = torch.zeros(B, dtype=torch.long, device=device)
        # The best iterate so far (by worst scaled residual): a sample that stalls or
        # hits the cap returns it rather than a possibly degraded last iterate.
        self.best_state = list(state)

    def record(self, res):
        """This iteration's residuals (A, 3) -> (worst (A,), better (A,) than the best)."""
        worst = res.detach().amax(-1)
        better = worst < self.best
        improved = worst < 0.9 * self.best
        self.best = torch.minimum(worst, self.best)
        self.stalled = (self.stalled + 1).masked_fill_(improved, 0)
        return worst, better

    def keep_best(self, better, all_better: bool, any_better: bool, state) -> None:
        if all_better:  # the iterates are never written in place: keep a reference
            self.best_state = list(state)
        elif any_better:
            keep = better.unsqueeze(-1)
            self.best_state = [torch.where(keep, v, t) for t, v in zip(self.best_state, state)]

    def retire(self, active, it: int, code, done, converged, worst, res, state):
        """Record the samples ``done`` (their codes, iteration, residuals and final
        point: the best iterate where they stalled or were capped); returns the
        positions of those that go on."""
        revert = done & ~converged & (self.best < worst)
        if bool(revert.any()):
            keep = revert.unsqueeze(-1)
            state = [torch.where(keep, b, t) for t, b in zip(state, self.best_state)]
            res = torch.where(keep, self.best.unsqueeze(-1).to(res.dtype), res.detach())
        if active is None and bool(done.all()):  # everyone at once: no gathers
            self.codes, self.residuals = code, res.detach()
            self.iterations = torch.full_like(self.iterations, it)
            self.point = [v if v.shape[-1] else t for t, v in zip(self.point, state)]
            return None
        sel = done.nonzero().squeeze(-1)
        idx = sel if active is None else active[sel]
        self.codes = self.codes.index_copy(0, idx, code[sel])
        self.iterations = self.iterations.index_fill(0, idx, it)
        self.residuals = self.residuals.index_copy(0, idx, res.detach()[sel])
        self.point = [t.index_copy(0, idx, v[sel]) if t.shape[-1] else t
                      for t, v in zip(self.point, state)]
        return (~done).nonzero().squeeze(-1)

    def subset(self, keep) -> None:
        """Follow the active samples ``keep`` (positions among the current ones)."""
        self.best, self.stalled = self.best[keep], self.stalled[keep]
        self.best_state = [t[keep] for t in self.best_state]


def solve(kkt: KKTSystem, settings: QPSettings, eps: float, warm: dict | None = None,
          rows=STRICT, start: Iterates | None = None) -> Iterates:
    """Run the interior point with elimination ``kkt`` (of the equilibrated data).

    ``rows``: the per-row complementarity test (see `residuals`). ``start``:
    continue from these iterates
    (their iteration counts continue too) instead of a fresh starting point.
    """
    B, p = kkt.batch, kkt.p
    q_all, h_all, b_all = kkt.vec("q"), kkt.vec("h"), kkt.vec("b")
    # h = +inf marks "no constraint": such rows keep λ = 0, never move, and enter
    # the Newton matrix with W = FREE_ROW_WEIGHT (W⁻¹ = 0 in effect).
    free_all = torch.isposinf(h_all) if p else None
    if free_all is not None and not bool(free_all.any()):
        free_all = None
    if free_all is not None:
        h_all = torch.where(free_all, torch.zeros_like(h_all), h_all)
    if start is None:
        state = list(initial_point(kkt, q_all, h_all, b_all, free_all, warm))
        first = 0
    else:
        state = [start.x, start.lam, start.s, start.nu]
        first = int(start.iterations.amax())
    track = _Tracker(B, q_all.dtype, q_all.device, state)
    # The active samples' data, iterates and constants; `active` holds their
    # indices in the batch (None: all of them, in order).
    active, act = None, kkt
    data = [q_all, h_all, b_all, free_all, *scales(q_all, h_all, b_all)]
    deadline = None if settings.time_limit is None else time.monotonic() + settings.time_limit
    for it in range(first, settings.max_iter + 1):
        qa, ha, ba, fa, *consts = data
        xa, la, sa, na = state
        r = residuals(act, xa, la, sa, na, qa, ha, ba, fa, rows, eps, consts)
        worst, better = track.record(r["res"])
        converged = r["stop"] <= eps
        if settings.fixed_iterations:
            converged = converged & (it == settings.max_iter)
        last = it == settings.max_iter or (deadline is not None and time.monotonic() > deadline)
        done = _done(worst, converged, track.best, track.stalled, eps, settings,
                     it - first + 1 >= settings.not_improved_lim)
        maybe = may_certify(xa, la, na, settings.infeas_tol)
        # The iteration's one read on the host (a device sync on GPUs).
        all_better, any_better, any_done, any_big = torch.stack(
            [better.all(), better.any(), done.any(), maybe.any()]).tolist()
        farkas = recession = None
        if any_big:
            farkas, recession = certificates(r, xa, la, na, qa, ha, ba, kkt.m, p,
                                             settings.infeas_tol)
            any_done = any_done or bool((farkas | recession).any())  # rare: one sync more
        track.keep_best(better, all_better, any_better, state)
        if any_done or last:
            code = classify(worst, converged, track.best, track.stalled, farkas, recession,
                            eps, settings, last)
            keep = track.retire(active, it, code, code != RUNNING, converged, worst,
                                r["res"], state)
            if keep is None or keep.numel() == 0:
                break
            active = keep if active is None else active[keep]
            track.subset(keep)
            state = [t[keep] for t in state]
            data = [None if t is None else t[keep] for t in data]
            r = {k: (v[keep] if isinstance(v, torch.Tensor) else
                     None if v is None else tuple(None if t is None else t[keep] for t in v))
                 for k, v in r.items()}
            act = kkt.subset(active, iteration_only=True)
        xa, la, sa, na = state
        fa = data[3]
        w = sa / la if p else sa
        if fa is not None:
            w = torch.where(fa, torch.full_like(w, FREE_ROW_WEIGHT), w)
        state = list(newton_step(act, r, xa, la, sa, na, w, fa, settings))
    return Iterates(*track.point, track.codes, track.iterations, track.residuals, free_all)
