"""Batched primal–dual interior point (Mehrotra predictor–corrector) for QPs.

Problem and shapes: see `data`. With slacks s ≥ 0 and multipliers λ ≥ 0
(inequalities), ν (equalities), the iterates approach the KKT conditions

    Qz + q + Gᵀλ + Aᵀν = 0,   Gz + s = h,   Az = b,   s ∘ λ = 0.

Each iteration factors the Newton matrix once (`kkt`), then solves it twice:
the affine (predictor) direction gives the centering σ = (μ_aff / μ)³, the
corrector adds the second-order term ds_aff ∘ dλ_aff. Samples are handled
independently: a sample that has converged (or failed) leaves the active set
and is no longer updated; the loop ends when the active set is empty.

When the backward pass will need it, the Newton matrix is factored at every
sample's final iterate and that factorization is kept (``need_factor``), so the
implicit backward solves with it instead of factoring again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..status import Status
from .data import QPData
from .kkt import KKTSystem, choose
from .settings import QPSettings

# Integer codes used on the device; converted to `Status` once at the end.
# W for an h = +inf row: large enough that W⁻¹ vanishes next to any real row.
FREE_ROW_WEIGHT = 1e30

# Floors for s and λ under `fixed_iterations` (far below any tolerance).
SLACK_FLOOR = {torch.float64: 1e-14, torch.float32: 1e-7}

RUNNING, OPTIMAL, INFEASIBLE, UNBOUNDED, MAX_ITER, NUMERICAL, INACCURATE = range(7)
CODE_TO_STATUS = {
    OPTIMAL: Status.OPTIMAL,
    INFEASIBLE: Status.INFEASIBLE,
    UNBOUNDED: Status.UNBOUNDED,
    MAX_ITER: Status.MAX_ITER,
    NUMERICAL: Status.NUMERICAL_ERROR,
    INACCURATE: Status.OPTIMAL_INACCURATE,
    RUNNING: Status.MAX_ITER,
}


@dataclass
class IPMResult:
    z: torch.Tensor  # (B, n) primal solution (original variables)
    lam: torch.Tensor  # (B, p) inequality multipliers
    nu: torch.Tensor  # (B, m) equality multipliers
    s: torch.Tensor  # (B, p) slacks h - Gz
    codes: torch.Tensor  # (B,) status codes
    iterations: torch.Tensor  # (B,)
    residuals: torch.Tensor  # (B, 3) scaled primal, dual, gap
    kkt: KKTSystem
    factor: dict | None  # Newton matrix factors at the final iterates
    w: torch.Tensor | None = None  # (B, p) W = s/λ of the backward's matrix (sharpened)
    singular: torch.Tensor | None = None  # (B,) the backward's matrix is singular (a tie)

    @property
    def status(self) -> list[Status]:
        return [CODE_TO_STATUS[int(c)] for c in self.codes.tolist()]

    def merge(self, idx: torch.Tensor, other: IPMResult) -> None:
        """Take samples ``idx`` from ``other`` (a solve of just those samples)."""
        for name in ("z", "lam", "nu", "s", "codes", "iterations", "residuals", "w", "singular"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None:
                setattr(self, name, mine.index_copy(0, idx, theirs.to(mine.dtype)))
        if self.factor is not None and other.factor is not None:
            self.factor = {k: v.index_copy(0, idx, other.factor[k]) for k, v in
                           self.factor.items()}

    def warm_start(self) -> dict:
        """This solution as a starting point for the next solve (detached)."""
        return {"z": self.z.detach(), "lam": self.lam.detach(), "s": self.s.detach(),
                "nu": self.nu.detach()}


def _inf_norm(t: torch.Tensor) -> torch.Tensor:
    if t.shape[-1] == 0:
        return torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
    return t.abs().amax(-1)


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest α ≤ 1 with v + α dv ≥ 0, per sample (v > 0)."""
    if v.shape[-1] == 0:
        return torch.ones(v.shape[:-1], dtype=v.dtype, device=v.device)
    neg = dv < 0
    # Divide only where dv < 0: torch.where would otherwise carry the other
    # branch's inf into the unrolled backward as NaN.
    safe = torch.where(neg, dv, -torch.ones_like(dv))
    ratio = torch.where(neg, -v / safe, torch.full_like(v, float("inf")))
    return ratio.amin(-1).clamp(max=1.0)


# Active-set sharpening of W for the backward pass. At a finite μ a constraint
# with a small slack (or a small multiplier) still has a moderate W = s/λ, which
# leaks O(1/W) (or O(W)) into the derivative: seen as 1e-6 errors on random QPs.
# A row whose normalized W̃ = W·(1 + ‖λ‖∞)/(1 + |hᵢ| + sᵢ) exceeds SHARPEN (or
# falls below 1/SHARPEN) is clearly inactive (active): the backward uses the
# limit μ → 0, dropping it (W = FREE_ROW_WEIGHT) or tightening it (W·1e-6).
# Ambiguous rows (weakly active) keep their W: a generalized derivative. Only the
# Schur form can take the tightening: in the reduced form W⁻¹ enters H directly
# and a further 1e6 there is beyond what refinement recovers.
SHARPEN = 1e4
# A factor whose (min/max diagonal)² falls below this is treated as singular: far
# below any legitimate conditioning (W spans ~1e-16..1e16 at most), reached when a
# dropped row (W⁻¹ = 1e-30) leaves a direction of the tie unconstrained.
SINGULAR_RATIO = {torch.float64: 1e-20, torch.float32: 1e-20}
ACTIVE_TIGHTEN = 1e-6


def _sharpened(w, s, lam, h, converged, tighten: bool):
    if w.shape[-1] == 0:
        return w
    dual_scale = 1.0 + lam.abs().amax(-1, keepdim=True)
    primal_scale = 1.0 + h.abs() + s.abs()
    wn = w * dual_scale / primal_scale
    ok = converged.unsqueeze(-1)
    w = torch.where(ok & (wn > SHARPEN), torch.full_like(w, FREE_ROW_WEIGHT), w)
    if not tighten:
        return w
    return torch.where(ok & (wn < 1.0 / SHARPEN), w * ACTIVE_TIGHTEN, w)


def _warm_point(kkt, warm: dict, cold, free):
    """Start from a previous solution (z, λ, s, ν) where it is usable, per sample."""
    x0, l0, s0, n0 = cold
    z, lam, s, nu = (warm[k].to(dtype=x0.dtype, device=x0.device) for k in ("z", "lam", "s", "nu"))
    ok = torch.isfinite(z).all(-1) & torch.isfinite(lam).all(-1) & torch.isfinite(nu).all(-1)
    if s.shape[-1]:
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        shift_s = WARM_START_SHIFT * (1 + s.abs().amax(-1, keepdim=True))
        shift_l = WARM_START_SHIFT * (1 + lam.abs().amax(-1, keepdim=True))
        s = s.clamp_min(0) + shift_s
        lam = lam.clamp_min(0) + shift_l
        if free is not None:
            lam = torch.where(free, torch.zeros_like(lam), lam)
    x = kkt.from_original(z)
    keep = ok.unsqueeze(-1)
    return (torch.where(keep, x, x0), torch.where(keep, lam, l0), torch.where(keep, s, s0),
            torch.where(keep, nu, n0))


class _Buffer:
    """Full-batch storage of per-sample tensors written by index."""

    def __init__(self):
        self.t: dict = {}

    def put(self, name: str, idx: torch.Tensor, value: torch.Tensor, batch: int):
        if name not in self.t:
            self.t[name] = torch.zeros((batch,) + tuple(value.shape[1:]), dtype=value.dtype,
                                       device=value.device)
        self.t[name].index_copy_(0, idx, value.detach())


# Warm start: the previous solution's slacks and multipliers are pushed at least
# this far (relative to their scale) into the interior; a point on the boundary
# (s·λ ≈ 0) would leave the Newton steps no room to move. Measured on a drifting
# batch (n = 40, p = 60): 1e-3 takes 5.3 iterations for small drifts and 9.3 for
# large ones (cold: 10.9, 11.2); 1e-4 is faster on small drifts, slower than cold
# on large ones.
WARM_START_SHIFT = 1e-3


def solve(data: QPData, settings: QPSettings, need_factor: bool,
          kkt: KKTSystem | None = None, warm: dict | None = None) -> IPMResult:
    kkt = kkt or choose(data, settings)
    B, p, m = data.batch, data.p, data.m
    dtype, device = data.dtype, data.device
    eps = settings.tolerance(dtype)

    def step_fraction(sigma):
        """How far toward the boundary to step: 1 − σ within [step_fraction,
        step_fraction_max]. A small σ means the affine direction nearly reached
        the target, so the step can go closer to the boundary (measured on
        random QPs, n = p = 100: 11.0 → 9.7 mean iterations). A fixed-iteration
        run (the unroll measurement) keeps the plain fraction: past convergence
        longer steps only reach the floors on s, λ sooner, and the unrolled
        derivative degrades there (5e-6 at K = 30, seen in test_implicit)."""
        if settings.fixed_iterations:
            return settings.step_fraction
        low = settings.step_fraction
        return (1 - sigma.detach()).clamp(min=low, max=max(low, settings.step_fraction_max))

    q_all, h_all, b_all = kkt.vec("q"), kkt.vec("h"), kkt.vec("b")
    # h = +inf marks "no constraint": such rows keep λ = 0, never move, and
    # enter the Newton matrix with W = FREE_ROW_WEIGHT (W⁻¹ = 0 in effect).
    free_all = torch.isposinf(h_all) if p else None
    has_free = bool(free_all.any()) if p else False
    if has_free:
        h_all = torch.where(free_all, torch.zeros_like(h_all), h_all)

    # ---- initial point: the Newton system with W = I (CVXOPT's choice) ----
    F0 = kkt.factor(torch.ones(B, p, dtype=dtype, device=device))
    x, lam_raw, nu = kkt.solve(F0, -q_all, h_all, b_all)
    s = -lam_raw
    lam = lam_raw.clone()
    if p:
        if has_free:
            s = torch.where(free_all, torch.ones_like(s), s)
            lam = torch.where(free_all, torch.ones_like(lam), lam)
        a_s = (-s).amax(-1, keepdim=True)
        s = torch.where(a_s >= 0, s + 1 + a_s, s)
        a_l = (-lam).amax(-1, keepdim=True)
        lam = torch.where(a_l >= 0, lam + 1 + a_l, lam)
        if has_free:
            lam = torch.where(free_all, torch.zeros_like(lam), lam)
    if warm is not None:
        x, lam, s, nu = _warm_point(kkt, warm, (x, lam, s, nu), free_all if has_free else None)

    codes = torch.zeros(B, dtype=torch.long, device=device)
    iterations = torch.zeros(B, dtype=torch.long, device=device)
    residuals = torch.full((B, 3), float("nan"), dtype=dtype, device=device)
    best = torch.full((B,), float("inf"), dtype=dtype, device=device)
    stalled = torch.zeros(B, dtype=torch.long, device=device)
    final = _Buffer()
    final_w = torch.ones(B, p, dtype=dtype, device=device)
    final_singular = torch.zeros(B, dtype=torch.bool, device=device)
    # The best iterate so far (by worst scaled residual): a sample that stalls
    # or hits the cap returns it rather than a possibly degraded last iterate.
    best_state = [x, lam, s, nu]
    active = torch.arange(B, device=device)
    act = kkt  # the system restricted to the active samples

    deadline = None if settings.time_limit is None else time.monotonic() + settings.time_limit
    for it in range(settings.max_iter + 1):
        if active.numel() == 0:
            break
        out_of_time = deadline is not None and time.monotonic() > deadline
        full = active.numel() == B
        xa = x if full else x[active]
        la = lam if full else lam[active]
        sa = s if full else s[active]
        na = nu if full else nu[active]
        qa = q_all if full else q_all[active]
        ha = h_all if full else h_all[active]
        ba = b_all if full else b_all[active]
        fa = (free_all if full else free_all[active]) if has_free else None

        # ---- residuals and convergence -------------------------------------
        Hx = act.hess(xa)
        GTl = act.GT(la)
        ATn = act.AT(na) if m else torch.zeros_like(xa)
        r_d = Hx + qa + GTl + ATn
        neg_rd = -r_d
        # G x, A x and the Newton right-hand side's G r, A r (r = −r_d, shared by
        # the predictor and the corrector) in one pass over G and A.
        (Gx, Ax), pre = act.constraint_products(xa, neg_rd)
        if not m:
            Ax = ba
        r_p = Gx + sa - ha
        if has_free:
            r_p = torch.where(fa, torch.zeros_like(r_p), r_p)
        r_e = Ax - ba
        gap = (sa * la).sum(-1)
        obj = 0.5 * (xa * Hx).sum(-1) + (qa * xa).sum(-1)
        pres = torch.maximum(
            _inf_norm(r_p) / (1 + torch.maximum(_inf_norm(ha), _inf_norm(Gx))),
            _inf_norm(r_e) / (1 + torch.maximum(_inf_norm(ba), _inf_norm(Ax))))
        dres = _inf_norm(r_d) / (1 + torch.maximum(torch.maximum(_inf_norm(qa), _inf_norm(Hx)),
                                                   _inf_norm(GTl + ATn)))
        gres = gap / (1 + obj.abs())
        if p:
            # Per-row complementarity: the gap alone lets a weakly active row stop
            # at s = λ = √μ, a solution error of √μ (1e-5 at μ = 1e-10).
            comp = torch.minimum(sa / (1 + ha.abs()), la / (1 + _inf_norm(la).unsqueeze(-1)))
            if has_free:
                comp = torch.where(fa, torch.zeros_like(comp), comp)
            gres = torch.maximum(gres, comp.amax(-1))
        res = torch.stack([pres, dres, gres], -1)
        worst = res.amax(-1)
        converged = worst <= eps
        if settings.fixed_iterations:
            converged = converged & (it == settings.max_iter)

        # Infeasibility certificates on the normalized iterates.
        y_norm = torch.maximum(_inf_norm(la), _inf_norm(na)).clamp_min(1e-300)
        farkas = (_inf_norm(GTl + ATn) / y_norm <= settings.infeas_tol) & (
            ((ha * la).sum(-1) + (ba * na).sum(-1)) / y_norm < -settings.infeas_tol
        ) & (y_norm > 1.0 / settings.infeas_tol ** 0.5)
        x_norm = _inf_norm(xa).clamp_min(1e-300)
        recession = (
            (_inf_norm(Hx) / x_norm <= settings.infeas_tol)
            & (_inf_norm(Ax - 0) / x_norm <= settings.infeas_tol if m else True)
            & ((Gx.amax(-1) if p else torch.zeros_like(x_norm)) / x_norm <= settings.infeas_tol)
            & ((qa * xa).sum(-1) / x_norm < -settings.infeas_tol)
            & (x_norm > 1.0 / settings.infeas_tol ** 0.5)
        )
        worst_d = worst.detach()
        improved = worst_d < 0.9 * best[active]
        better = worst_d < best[active]
        if bool(better.any()):
            sel = active[better]
            best_state = [t.index_copy(0, sel, v[better]) for t, v in
                          zip(best_state, (xa, la, sa, na))]
        best[active] = torch.minimum(worst_d, best[active])
        stall = torch.where(improved, torch.zeros_like(stalled[active]), stalled[active] + 1)
        stalled[active] = stall

        code = torch.full_like(active, RUNNING)
        code = torch.where(stall >= settings.not_improved_lim,
                           torch.where(best[active] <= eps ** 0.5, INACCURATE, NUMERICAL), code)
        if settings.fixed_iterations:
            code = torch.full_like(active, RUNNING)
        if it == settings.max_iter or out_of_time:
            code = torch.where(code == RUNNING, MAX_ITER, code)
        code = torch.where(recession & ~converged, UNBOUNDED, code)
        code = torch.where(farkas & ~converged, INFEASIBLE, code)
        code = torch.where(converged, OPTIMAL, code)
        iterations[active] = it
        residuals[active] = res.detach()
        done = code != RUNNING
        # Stalled or capped samples go back to their best iterate.
        revert = done & ~converged & (best[active] < worst_d)
        if bool(revert.any()):
            sel = active[revert]
            xa, la, sa, na = (torch.where(revert.unsqueeze(-1), bt[active], v) for bt, v in
                              zip(best_state, (xa, la, sa, na)))
            x, lam, s, nu = (t.index_copy(0, sel, bt[sel]) for t, bt in
                             zip((x, lam, s, nu), best_state))
            residuals[sel] = best[sel].unsqueeze(-1).expand(-1, 3).to(residuals.dtype)
        w = sa / la if p else sa
        if has_free:
            w = torch.where(fa, torch.full_like(w, FREE_ROW_WEIGHT), w)

        # ---- finished samples leave; the rest factor at the current iterate --
        if bool(done.any()):
            sel = done.nonzero().squeeze(-1)
            codes[active[sel]] = code[sel]
            w_done = _sharpened(w[sel], sa[sel], la[sel], ha[sel], code[sel] == OPTIMAL,
                                tighten=kkt.name == "schur")
            final_w.index_copy_(0, active[sel], w_done.detach())
            if need_factor:
                # The backward's factorization, at the (sharpened) final iterate.
                done_kkt = act.subset(sel, iteration_only=True)
                F_done = done_kkt.factor(w_done)
                # A (numerically) singular limit KKT matrix means a tie: the solution
                # is not unique (a degenerate LP) and has no derivative; the backward
                # then takes the minimum-norm solution of the limit system.
                diag = F_done["L"].diagonal(dim1=-2, dim2=-1).abs()
                tie = F_done["shifted"].clone()
                if diag.shape[-1]:
                    if kkt.name == "schur":  # dropped rows (huge W) are benign there
                        kept = w_done < FREE_ROW_WEIGHT
                        big = torch.where(kept, diag, torch.zeros_like(diag)).amax(-1)
                        small = torch.where(kept, diag, torch.full_like(diag, torch.inf)).amin(-1)
                    else:
                        big, small = diag.amax(-1), diag.amin(-1)
                    ratio = (small / big.clamp_min(1e-300)) ** 2
                    tie |= kept.any(-1) & (ratio < SINGULAR_RATIO[dtype]) if kkt.name == "schur" \
                        else ratio < SINGULAR_RATIO[dtype]
                final_singular[active[sel]] = tie
                for k, v in F_done.items():
                    final.put(k, active[sel], v, B)
            keep = (~done).nonzero().squeeze(-1)
            active = active[keep]
            if active.numel() == 0:
                break
            xa, la, sa, na = xa[keep], la[keep], sa[keep], na[keep]
            r_d, r_p, r_e, w = r_d[keep], r_p[keep], r_e[keep], w[keep]
            neg_rd = neg_rd[keep]
            if pre is not None:
                pre = tuple(None if t is None else t[keep] for t in pre)
            fa = fa[keep] if has_free else None
            act = kkt.subset(active, iteration_only=True)
        F = act.factor(w)

        # ---- predictor -----------------------------------------------------
        count = max(p, 1) if not has_free else (~fa).sum(-1, keepdim=True).clamp_min(1)
        mu = (sa * la).sum(-1, keepdim=True) / count
        r_l = sa - r_p
        if has_free:
            r_l = torch.where(fa, torch.zeros_like(r_l), r_l)
        _, dl_a, _ = act.solve(F, neg_rd, r_l, -r_e, primal=False, pre=pre)
        ds_a = -sa - w * dl_a
        if has_free:
            dl_a = torch.where(fa, torch.zeros_like(dl_a), dl_a)
            ds_a = torch.where(fa, torch.zeros_like(ds_a), ds_a)
        alpha_a = torch.minimum(_max_step(sa, ds_a), _max_step(la, dl_a)).unsqueeze(-1)
        mu_a = ((sa + alpha_a * ds_a) * (la + alpha_a * dl_a)).sum(-1, keepdim=True) / count
        sigma = (mu_a / mu.clamp_min(1e-300)).clamp(0, 1) ** 3

        # ---- corrector ------------------------------------------------------
        r_c = sa * la + ds_a * dl_a - sigma * mu
        r_l = r_c / la - r_p
        if has_free:
            r_l = torch.where(fa, torch.zeros_like(r_l), r_l)
        dx, dl, dn = act.newton_solve(F, neg_rd, r_l, -r_e, pre=pre)
        ds = -r_p - r_l - w * dl
        if has_free:
            dl = torch.where(fa, torch.zeros_like(dl), dl)
            ds = torch.where(fa, torch.zeros_like(ds), ds)
        alpha = torch.minimum(_max_step(sa, ds), _max_step(la, dl)).unsqueeze(-1)
        alpha = torch.clamp(step_fraction(sigma) * alpha, max=1.0) if p else torch.ones_like(alpha)

        x = x.index_copy(0, active, xa + alpha * dx)
        if p:
            s_new, l_new = sa + alpha * ds, la + alpha * dl
            if settings.fixed_iterations:
                floor = SLACK_FLOOR[dtype]
                s_new, l_new = s_new.clamp_min(floor), l_new.clamp_min(floor)
                if has_free:
                    l_new = torch.where(fa, torch.zeros_like(l_new), l_new)
            s = s.index_copy(0, active, s_new)
            lam = lam.index_copy(0, active, l_new)
        if m:
            nu = nu.index_copy(0, active, na + alpha * dn)

    z = kkt.to_original(x)
    s_out = torch.where(free_all, torch.full_like(s, float("inf")), s) if has_free else s
    factor = final.t if need_factor else None
    return IPMResult(z, lam, nu, s_out, codes, iterations, residuals, kkt, factor, final_w,
                     final_singular)
