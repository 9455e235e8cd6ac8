"""One batched cone-program solve, from the user's data to a solution and its backward system.

    data ─ cast to the compute dtype (float64 by default)
         ─ equilibrate (`scaling`)               unit-sized rows, columns, b and c
         ─ interior point (`ipm`)                 the self-dual embedding, to eps
         ─ warm-start failures solved again cold
         ─ the backward's system (`kkt`)          K at the solution, factored once
         ─ unscale                                x, y, s in the user's units

Outputs per status: optimal, optimal_inaccurate and max_iter return the
(best) point; infeasible returns a Farkas certificate in y (Aᵀy = 0, y ∈ K*,
bᵀy = −1) with x and s NaN; unbounded returns a recession ray in x and s
(Ax + s = 0, s ∈ K, cᵀx = −1) with y NaN; numerical_error returns NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import solution
from ..solution import Solution
from . import ipm
from .cones import Cones, ConeSpec
from .limit import LimitSystem, project_dual, start_rho
from .scaling import Equilibration, equilibrate
from .settings import ConeSettings

# Codes whose samples carry a point (and a gradient).
SOLVED = (ipm.OPTIMAL, ipm.INACCURATE, ipm.MAX_ITER)


@dataclass
class ConeResult(Solution):
    """The batch's solution and what the backward needs; ``codes`` are the shared
    codes (`solution.CODES`), judged by the shared accuracy policy; ``residuals``
    the interior point's scaled primal, dual residuals and relative gap."""

    x: torch.Tensor  # (B, n) user's units, compute dtype
    y: torch.Tensor  # (B, m)
    s: torch.Tensor  # (B, m)
    scaled: tuple  # (Â, b̂, ĉ, x̂, ŷ, ŝ) for the backward
    equil: Equilibration
    cones: Cones
    kkt: LimitSystem | None  # the backward's system (None without a backward)

    @property
    def solved(self) -> torch.Tensor:
        """Samples with a point (and a gradient)."""
        return torch.isin(self.codes, torch.tensor(solution.WITH_POINT,
                                                   device=self.codes.device))

    def warm_start(self) -> dict:
        """This solution as the next solve's starting point (detached)."""
        return {"x": self.x.detach(), "y": self.y.detach(), "s": self.s.detach()}


def run(A, b, c, spec: ConeSpec, settings: ConeSettings, input_dtype, factor: bool,
        warm: dict | None = None) -> ConeResult:
    """Solve a batch: A (m, n) or (B, m, n), b (B, m), c (B, n) in the compute dtype."""
    cones = Cones(spec, A.device)
    equil = equilibrate(A, b, c, cones, settings.ruiz_sweeps)
    As, bs, cs = equil.apply(A, b, c)
    eps = settings.tolerance(input_dtype)
    warm_s = None
    if warm is not None:
        x, y, s = equil.scaled(*(warm[k].to(A.dtype) for k in ("x", "y", "s")))
        warm_s = {"x": x, "y": y, "s": s}
    it = ipm.solve(As, bs, cs, cones, settings, eps, warm_s)
    if warm_s is not None:
        _retry_cold(it, As, bs, cs, cones, settings, eps)
    xs, ys, ss = _points(it, bs, cs, cones)
    if settings.polish_steps:
        xs, ys, ss = _polish(As, bs, cs, xs, ys, ss, it, cones, settings, eps)
    kkt = _backward_system(As, xs, ys, ss, it.codes, cones, settings) if factor else None
    x, y, s = equil.solution(xs, ys, ss)
    x, y, s = _certificates(it.codes, x, y, s, b, c)
    codes = solution.judge(solution.from_ipm(it.codes), it.residuals)
    return ConeResult(codes, it.iterations, it.residuals, x, y, s, (As, bs, cs, xs, ys, ss),
                      equil, cones, kkt)


def _points(it: ipm.Iterates, b, c, cones: Cones):
    """(x, y, s) per sample in scaled units: the optimum (·/τ), or the raw rays."""
    tau = it.tau.unsqueeze(-1)
    x, z, s = it.x / tau, it.z / tau, it.s / tau
    pinf = (it.codes == ipm.INFEASIBLE).unsqueeze(-1)
    dinf = (it.codes == ipm.UNBOUNDED).unsqueeze(-1)
    x = torch.where(dinf, it.x, x)
    s = torch.where(dinf, it.s, s)
    z = torch.where(pinf, it.z, z)
    s = torch.cat([torch.zeros_like(s[:, :cones.l0]), s[:, cones.l0:]], 1)
    return x, z, s


def _polish(A, b, c, x, y, s, it: ipm.Iterates, cones: Cones, settings: ConeSettings,
            eps: float):
    """Newton's method on the normal map from the interior point's solution.

    With v = y − s, y = Π_K*(v) and s = y − v = Π_K(−v) (Moreau), the optimality
    conditions are F(x, v) = [Aᵀy + c; Ax + s − b] = 0, and F's Jacobian is the
    backward's J₂ (`limit`). Its Newton steps converge quadratically from the
    interior point's point, and the result has s ∈ K, y ∈ K*, sᵀy = 0 exactly: the
    interior point's sᵀz = ε leaves a second-order cone's s₁ and −z₁ an angle of
    order √ε apart (x with them), which no stopping test on residuals and gap
    removes. Each sample keeps the polished point only where its residuals do not
    get worse (nor beyond eps) than the interior point's."""
    solved = torch.isin(it.codes, torch.tensor((ipm.OPTIMAL, ipm.INACCURATE),
                                               device=it.codes.device))
    if not bool(solved.any()):
        return x, y, s
    v, xp = y - s, x
    one = torch.ones_like(it.tau)
    rho = start_rho(cones, s) if cones.ne else None
    for _ in range(settings.polish_steps):
        yp, extra = project_dual(cones, v, rho)
        rho = None if extra is None else extra[1]
        sp = yp - v
        r = ipm.residuals(A, b, c, xp, yp, sp, one, torch.zeros_like(one))
        F1 = r["rx"]
        F2 = r["rz"]
        system = LimitSystem(A, cones, yp, sp, settings.static_reg,
                             settings.regularization_tries)
        dx, dv = system.solve(-F1.unsqueeze(-1), -F2.unsqueeze(-1),
                              settings.limit_refine_steps)
        xp, v = xp + dx.squeeze(-1), v + dv.squeeze(-1)
    yp, _ = project_dual(cones, v, rho)
    sp = yp - v
    res = ipm.residuals(A, b, c, xp, yp, sp, one, torch.zeros_like(one))["res"].amax(-1)
    limit = torch.maximum(it.residuals.amax(-1), torch.full_like(res, eps))
    ok = (solved & (res <= limit)).unsqueeze(-1)
    it.codes = torch.where(ok.squeeze(-1), ipm.OPTIMAL, it.codes)
    it.residuals = torch.where(ok, ipm.residuals(A, b, c, xp, yp, sp, one,
                                                 torch.zeros_like(one))["res"], it.residuals)
    return torch.where(ok, xp, x), torch.where(ok, yp, y), torch.where(ok, sp, s)


def _certificates(codes, x, y, s, b, c):
    """Normalize the rays (bᵀy = −1, cᵀx = −1) and blank what a status does not return."""
    nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    pinf = (codes == ipm.INFEASIBLE).unsqueeze(-1)
    dinf = (codes == ipm.UNBOUNDED).unsqueeze(-1)
    bad = (codes == ipm.NUMERICAL).unsqueeze(-1)
    by = (b * y).sum(-1, keepdim=True)
    cx = (c * x).sum(-1, keepdim=True)
    y = torch.where(pinf, y / (-by).clamp_min(1e-300), torch.where(dinf | bad, nan, y))
    x = torch.where(dinf, x / (-cx).clamp_min(1e-300), torch.where(pinf | bad, nan, x))
    s = torch.where(dinf, s / (-cx).clamp_min(1e-300), torch.where(pinf | bad, nan, s))
    return x, y, s


def _backward_system(A, x, y, s, codes, cones: Cones, settings: ConeSettings) -> LimitSystem:
    """The linearized optimality conditions at each solution (`limit`), their
    preconditioner factored once: the backward's system. Samples without a point
    get the unit point (their gradient is zero)."""
    solved = torch.isin(codes, torch.tensor(SOLVED, device=codes.device)).unsqueeze(-1)
    e = cones.unit(s)
    s_b = torch.where(solved, s, e)
    y_b = torch.where(solved, y, e)
    return LimitSystem(A, cones, y_b, s_b, settings.static_reg, settings.regularization_tries)


def _retry_cold(it: ipm.Iterates, A, b, c, cones, settings, eps) -> None:
    """Samples a warm start left without an optimal point are solved again from scratch:
    the answer must never depend on where the interior point began."""
    settled = torch.tensor((ipm.OPTIMAL, ipm.INFEASIBLE, ipm.UNBOUNDED), device=it.codes.device)
    bad = ~torch.isin(it.codes, settled)
    if not bool(bad.any()):
        return
    idx = bad.nonzero().flatten()
    A_sub = A.index_select(0, idx) if A.dim() == 3 else A
    redo = ipm.solve(A_sub, b[idx], c[idx], cones, settings, eps)
    it.take(idx, redo)
