"""One batched QP solve, from the user's data to a solution and its backward system.

    data ─ symmetrize Q, cast to the compute dtype
         ─ equilibrate (`scaling`)                 every later step sees unit-sized rows
         ─ semidefiniteness of Q                    indefinite samples: error or status
         ─ choose the elimination (`kkt`)           Schur (Q ≻ 0) or reduced (any PSD Q)
         ─ interior point (`ipm`)                   to the tolerance on residuals and gap
         ─ warm-start failures solved again cold
         ─ polish on the active set (`limit`)       the exact KKT point, verified
         ─ the rare sample whose polish fails: more interior-point iterations, to the
           per-row complementarity test
         ─ unscale                                  z, s, λ, ν in the user's units

The polish solves the KKT system with the active rows as equalities, the system
the backward differentiates, so its factorization is the one the backward uses:
the last factorization of the forward pass is the backward's. It is accepted
only where the polished point passes the interior point's own stopping test
with the per-row complementarity (feasible within the tolerance, λ ≥ 0 within
it). It also ends the interior point earlier: a weakly active row (s, λ → 0
together) would otherwise need μ down to eps², where the reduced elimination's
Q + GᵀW⁻¹G has lost its digits (cf. Stellato et al. 2020 on OSQP's polishing).

Computation runs in float64 by default whatever the input dtype (`QPSettings.
compute_dtype`): the equilibrated KKT systems near the solution lose every digit
float32 has, and on CPUs float64 costs the same for these latency-bound sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import solution
from ..solution import Solution
from . import ipm
from .data import QPData
from .kkt import KKTSystem, ReducedKKT, SchurKKT, indefinite, refuse_indefinite, schur_factor
from .limit import REFINE_STEPS, LimitSystem, active_rows
from .scaling import Scaling, equilibrate, rows_and_cost
from .settings import QPSettings

# The interior point's codes as the shared status codes (`solution.CODES`).
_SHARED = torch.tensor([0] * 7)
for _ipm, _code in ((ipm.RUNNING, solution.MAX_ITER), (ipm.OPTIMAL, solution.OPTIMAL),
                    (ipm.INFEASIBLE, solution.INFEASIBLE), (ipm.UNBOUNDED, solution.UNBOUNDED),
                    (ipm.MAX_ITER, solution.MAX_ITER), (ipm.NUMERICAL, solution.NUMERICAL),
                    (ipm.INACCURATE, solution.INACCURATE)):
    _SHARED[_ipm] = _code


@dataclass
class QPResult(Solution):
    """The batch's solution (user's units) and what the backward needs.

    ``residuals``: the interior point's scaled primal residual, dual residual and
    complementarity (`ipm`), on the equilibrated problem.
    """

    z: torch.Tensor = None  # (B, n) primal solution
    lam: torch.Tensor = None  # (B, p) inequality multipliers
    nu: torch.Tensor = None  # (B, m) equality multipliers
    s: torch.Tensor = None  # (B, p) slacks h − Gz (+inf on h = +inf rows)
    kkt: KKTSystem = None  # the elimination (equilibrated problem)
    scaling: Scaling = None
    limit: LimitSystem | None = None  # the backward's system (None without a backward)

    @property
    def factor(self) -> dict | None:
        """The factorization kept for the backward (tensors)."""
        return None if self.limit is None else self.limit.factors

    def warm_start(self) -> dict:
        """This solution as a starting point for the next solve (detached)."""
        return {"z": self.z.detach(), "lam": self.lam.detach(), "s": self.s.detach(),
                "nu": self.nu.detach()}


def prepare(Q, q, G, h, A, b, batch: int, settings: QPSettings) -> QPData:
    """Symmetric Q (½zᵀQz only sees the symmetric part), in the compute dtype."""
    dtype = settings.compute_dtype or torch.float64
    Q = 0.5 * (Q + Q.mT)
    return QPData(*(t.to(dtype) for t in (Q, q, G, h, A, b)), batch=batch)


def run(data: QPData, settings: QPSettings, input_dtype: torch.dtype, factor: bool,
        warm: dict | None = None, with_limit: bool = True) -> QPResult:
    """Solve a batch (``data`` from `prepare`); ``factor``: keep the backward's factors."""
    # Rows and cost first: enough for the Schur elimination, which absorbs any
    # column scaling; the reduced one gets Ruiz's column scaling too. Both start
    # from the same row and cost scales, and the choice looks only at Q̂.
    start = rows_and_cost(data)
    scaling = equilibrate(data, columns=False, start=start)
    Q_hat = scaling.apply_Q(data)
    chol = torch.linalg.cholesky_ex(Q_hat) if settings.kkt != "reduced" else None
    bad_q = indefinite(Q_hat, chol[1] if chol else torch.linalg.cholesky_ex(Q_hat)[1],
                       input_dtype)
    if settings.check_psd:
        refuse_indefinite(Q_hat, bad_q)
    L = schur_factor(data.n, data.p, data.m, settings, chol)
    if L is not None:
        sdata = scaling.apply(data, Q_hat)
        kkt = SchurKKT(sdata.squeezed(), settings, L[0] if data.batch == 1 and L.dim() == 3
                       else L)
    else:
        scaling = equilibrate(data, columns=True, start=start)
        sdata = scaling.apply(data)
        kkt = ReducedKKT(sdata.squeezed(), settings)
    eps = settings.tolerance(sdata.dtype)
    warm_scaled = _scale_warm(scaling, warm)
    polish = settings.backward != "unroll" and not settings.fixed_iterations
    rounds = POLISH_ROUNDS(eps) if polish else [ipm.STRICT]
    it = ipm.solve(kkt, settings, eps, warm_scaled, rows=rounds[0])
    if warm_scaled is not None:
        _retry_cold(it, kkt, settings, eps, rows=rounds[0])
    limit = reuse = None
    # After the last round one more polish, then stop. (The end needs its own
    # marker: ipm.STRICT is None too, and reading it as the end skipped the strict
    # round after a second failed polish.)
    for rows in (rounds[1:] + [_END]) if polish else []:
        limit, again, reuse = _polish(it, kkt, eps, reuse)
        if again is None or rows is _END:
            break
        _iterate_on(it, kkt, eps, again, rows)
        limit = None
    if with_limit and (limit is None or limit.stale):
        # A stale polish's system is still the one wanted where no active set moved.
        active = _active(it, kkt)
        if reuse is None or not (factor and torch.equal(active, reuse[0].active)):
            limit = LimitSystem(kkt, active, factor=factor)
        else:
            limit = reuse[0]
    if limit is not None and not (with_limit and factor):
        limit.factors = {}  # the backward keeps only the active set (or nothing)
    if not with_limit:
        limit = None
    if bool(bad_q.any()):
        it.codes = torch.where(bad_q.expand_as(it.codes), ipm.NUMERICAL, it.codes)
    z, s, lam, nu = scaling.solution(kkt.to_original(it.x), it.s, it.lam, it.nu)
    if it.free is not None:
        s = torch.where(it.free, torch.full_like(s, float("inf")), s)
    codes = solution.judge(_SHARED.to(it.codes.device)[it.codes], it.residuals)
    return QPResult(codes, it.iterations, it.residuals, z=z, lam=lam, nu=nu, s=s, kkt=kkt,
                    scaling=scaling, limit=limit)


_END = object()  # the polish rounds' end (see `solve`)


def _active(it: ipm.Iterates, kkt: KKTSystem) -> torch.Tensor:
    h = kkt.vec("h")
    return active_rows(it.s, it.lam, torch.where(torch.isinf(h), 0.0, h), it.free)


# Codes whose samples are polished: those the interior point brought to its test,
# and those stalled at the accuracy floor. Not max_iter: the cap the caller set
# cut that solve short, and its best iterate is what the status promises.
POLISHABLE = (ipm.OPTIMAL, ipm.INACCURATE)


def POLISH_ROUNDS(eps: float) -> list:
    """The stopping tests of the interior point's successive rounds: residuals to
    eps^0.6 and every row decided to 1e-3 (or weakly active below √eps), then
    polish; where that polish fails, iterate on to eps and rows decided to 1e-6 (or
    below eps^¾) and polish again; then the strict test."""
    return [ipm.Ready(1e-3, eps ** 0.5, eps ** 0.6), ipm.Ready(1e-6, eps ** 0.75, eps),
            ipm.STRICT]


def _polish(it: ipm.Iterates, kkt: KKTSystem, eps: float, previous=None):
    """Replace each sample's iterate by the exact KKT point on its active set where
    that point passes the strict stopping test. Returns (the limit system, the
    indices of samples stopped at the tolerance whose polish failed, or None, and
    what a later polish of the same solve may reuse).

    The polished point depends only on the data and the active sets: where no
    sample's active set changed since the ``previous`` polish, its points and
    verdicts are reused (exactly what a new polish would compute)."""
    active = _active(it, kkt)
    polishable = _isin(it.codes, POLISHABLE)
    if previous is not None and torch.equal(active, previous[0].active):
        limit, point, ok = previous
    else:
        limit = LimitSystem(kkt, active, factor=True)
        point, ok = _polished_points(limit, it, kkt, eps, polishable)
    reuse = (limit, point, ok)
    ok = ok & polishable
    if bool(ok.any()):
        x, lam, s, nu, res = point
        keep = ok.unsqueeze(-1)
        it.x, it.lam = torch.where(keep, x, it.x), torch.where(keep, lam, it.lam)
        it.s, it.nu = torch.where(keep, s, it.s), torch.where(keep, nu, it.nu)
        it.residuals = torch.where(keep, res, it.residuals)
        it.codes = torch.where(ok, ipm.OPTIMAL, it.codes)
    again = ~ok & (it.codes == ipm.OPTIMAL)
    limit.stale = bool(again.any())
    return limit, (again.nonzero().flatten() if limit.stale else None), reuse


def _polished_points(limit: LimitSystem, it: ipm.Iterates, kkt: KKTSystem, eps: float,
                     polishable):
    """The polished points and which pass the strict test, with more refinement
    steps where a polishable sample's entries miss (continuing the same refinement)."""
    q, h, b = kkt.vec("q"), kkt.vec("h"), kkt.vec("b")
    h0 = torch.where(torch.isinf(h), 0.0, h)
    run = limit.refinement(-q, h0, b)
    limit.refine(run, steps=0)
    point, ok = _polished_point(run.solution(), it, kkt, eps, q, h0, b)
    if bool((polishable & ~ok).any()):
        limit.refine(run, steps=REFINE_STEPS)
        retry, ok2 = _polished_point(run.solution(), it, kkt, eps, q, h0, b)
        point = tuple(torch.where(ok2.unsqueeze(-1), b, a) for a, b in zip(point, retry))
        ok = ok | ok2
    return point, ok


def _polished_point(solution, it: ipm.Iterates, kkt: KKTSystem, eps: float, q, h0, b):
    """The KKT point on each sample's active set (``solution``: the limit system's
    solution for the right-hand side (−q, h0, b)) and whether it passes the strict
    test (feasible within eps, λ ≥ 0 within eps, residuals within eps)."""
    free = it.free
    x, lam, nu = solution
    s = h0 - kkt.G(x)
    if free is not None:
        s = torch.where(free, torch.ones_like(s), s)
    feasible = torch.ones_like(it.codes, dtype=torch.bool)
    if lam.shape[-1]:
        scale_l = 1.0 + lam.abs().amax(-1, keepdim=True)
        feasible = ((s >= -eps * (1.0 + h0.abs())).all(-1)
                    & (lam >= -eps * scale_l).all(-1))
    s, lam = s.clamp_min(0.0), lam.clamp_min(0.0)
    res = ipm.residuals(kkt, x, lam, s, nu, q, h0, b, free)["res"]
    return (x, lam, s, nu, res), feasible & (res.amax(-1) <= eps)


def _iterate_on(it: ipm.Iterates, kkt: KKTSystem, eps, idx, rows) -> None:
    """More interior-point iterations for samples ``idx``, from where they stopped."""
    sub = ipm.Iterates(*(t[idx] for t in (it.x, it.lam, it.s, it.nu, it.codes,
                                          it.iterations, it.residuals)),
                       None if it.free is None else it.free[idx])
    more = ipm.solve(kkt.subset(idx), kkt.settings, eps, rows=rows, start=sub)
    it.take(idx, more)


def _isin(codes: torch.Tensor, values) -> torch.Tensor:
    """codes ∈ values, elementwise (a few comparisons; torch.isin sorts)."""
    out = codes == values[0]
    for v in values[1:]:
        out = out | (codes == v)
    return out


def _scale_warm(scaling: Scaling, warm: dict | None) -> dict | None:
    if warm is None:
        return None
    dtype = scaling.D.dtype
    z, s, lam, nu = (warm[k].to(dtype) for k in ("z", "s", "lam", "nu"))
    s = torch.where(torch.isinf(s), torch.ones_like(s), s)
    z, s, lam, nu = scaling.scaled_point(z, s, lam, nu)
    return {"z": z, "s": s, "lam": lam, "nu": nu}


def _retry_cold(it: ipm.Iterates, kkt: KKTSystem, settings, eps, rows) -> None:
    """Samples a warm start left without an optimal point are solved again from scratch.

    A warm start only changes where the interior point begins; from a poor start
    (another batch's solution, a different active set) it can stall. The answer
    must never depend on it, so such samples get the cold start's result.
    """
    bad = ~_isin(it.codes, (ipm.OPTIMAL, ipm.INFEASIBLE, ipm.UNBOUNDED))
    if not bool(bad.any()):
        return
    idx = bad.nonzero().flatten()
    redo = ipm.solve(kkt.subset(idx), settings, eps, rows=rows)
    it.take(idx, redo)
