"""One batched QP solve, from the user's data to a solution and its backward system.

    data ─ symmetrize Q, cast to the compute dtype
         ─ equilibrate (`scaling`)                 every later step sees unit-sized rows
         ─ semidefiniteness of Q                    indefinite samples: error or status
         ─ choose the elimination (`kkt`)           Schur (Q ≻ 0) or reduced (any PSD Q)
         ─ interior point (`ipm`)                   per-sample codes
         ─ warm-start failures solved again cold
         ─ certificates for the samples that failed (`certify`)
         ─ the limit KKT system at the solution (`limit`), factored once for the backward
         ─ unscale                                  z, s, λ, ν in the user's units

Computation runs in float64 by default whatever the input dtype (`QPSettings.
compute_dtype`): the equilibrated KKT systems near the solution lose every digit
float32 has, and on CPUs float64 costs the same for these latency-bound sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..status import Status
from . import ipm
from .data import QPData
from .kkt import KKTSystem, choose, indefinite, refuse_indefinite
from .limit import LimitSystem, active_rows
from .scaling import Scaling, equilibrate
from .settings import QPSettings

CODE_TO_STATUS = {
    ipm.OPTIMAL: Status.OPTIMAL,
    ipm.INFEASIBLE: Status.INFEASIBLE,
    ipm.UNBOUNDED: Status.UNBOUNDED,
    ipm.MAX_ITER: Status.MAX_ITER,
    ipm.NUMERICAL: Status.NUMERICAL_ERROR,
    ipm.INACCURATE: Status.OPTIMAL_INACCURATE,
    ipm.RUNNING: Status.MAX_ITER,
}
# Codes whose samples carry no usable point.
FAILED = (ipm.INFEASIBLE, ipm.UNBOUNDED, ipm.NUMERICAL)


@dataclass
class QPResult:
    z: torch.Tensor  # (B, n) primal solution, user's units
    lam: torch.Tensor  # (B, p) inequality multipliers
    nu: torch.Tensor  # (B, m) equality multipliers
    s: torch.Tensor  # (B, p) slacks h − Gz (+inf on h = +inf rows)
    codes: torch.Tensor  # (B,) ipm codes
    iterations: torch.Tensor  # (B,)
    residuals: torch.Tensor  # (B, 3) scaled primal, dual, complementarity
    kkt: KKTSystem  # the elimination (equilibrated problem)
    scaling: Scaling
    limit: LimitSystem | None  # the backward's system (None without a backward)

    @property
    def status(self) -> list[Status]:
        return [CODE_TO_STATUS[int(c)] for c in self.codes.tolist()]

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
    scaling = equilibrate(data)
    sdata = scaling.apply(data)
    chol = torch.linalg.cholesky_ex(sdata.Q) if settings.kkt != "reduced" else None
    bad_q = indefinite(sdata.Q, chol[1] if chol else torch.linalg.cholesky_ex(sdata.Q)[1],
                       input_dtype)
    if settings.check_psd:
        refuse_indefinite(sdata.Q, bad_q)
    kkt = choose(sdata, settings, chol)
    eps = settings.tolerance(sdata.dtype)
    warm_scaled = _scale_warm(scaling, warm)
    it = ipm.solve(sdata, kkt, settings, eps, warm_scaled)
    if warm_scaled is not None:
        _retry_cold(it, sdata, kkt, settings, eps)
    if bool(bad_q.any()):
        it.codes = torch.where(bad_q.expand_as(it.codes), ipm.NUMERICAL, it.codes)
    limit = None
    if with_limit:
        h = kkt.vec("h")
        free = it.free
        active = active_rows(it.s, it.lam, torch.where(torch.isinf(h), 0.0, h), free)
        limit = LimitSystem(kkt, active, factor=factor)
    z, s, lam, nu = scaling.solution(kkt.to_original(it.x), it.s, it.lam, it.nu)
    if it.free is not None:
        s = torch.where(it.free, torch.full_like(s, float("inf")), s)
    return QPResult(z, lam, nu, s, it.codes, it.iterations, it.residuals, kkt, scaling, limit)


def _scale_warm(scaling: Scaling, warm: dict | None) -> dict | None:
    if warm is None:
        return None
    dtype = scaling.D.dtype
    z, s, lam, nu = (warm[k].to(dtype) for k in ("z", "s", "lam", "nu"))
    s = torch.where(torch.isinf(s), torch.ones_like(s), s)
    z, s, lam, nu = scaling.scaled_point(z, s, lam, nu)
    return {"z": z, "s": s, "lam": lam, "nu": nu}


def _retry_cold(it: ipm.Iterates, data: QPData, kkt: KKTSystem, settings, eps) -> None:
    """Samples a warm start left without an optimal point are solved again from scratch.

    A warm start only changes where the interior point begins; from a poor start
    (another batch's solution, a different active set) it can stall. The answer
    must never depend on it, so such samples get the cold start's result.
    """
    settled = torch.tensor((ipm.OPTIMAL, ipm.INFEASIBLE, ipm.UNBOUNDED), device=it.codes.device)
    bad = ~torch.isin(it.codes, settled)
    if not bool(bad.any()):
        return
    idx = bad.nonzero().flatten()
    redo = ipm.solve(data.subset(idx), kkt.subset(idx), settings, eps)
    it.take(idx, redo)
