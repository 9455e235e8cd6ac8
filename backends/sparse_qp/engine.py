"""One batched sparse QP solve: from value arrays to each sample's solution.

    values ─ equilibrate (`scaling`), vectorized over the batch
           ─ per sample, in a thread pool (`threads`):
               build the sample's operators and KKT solver (`kkt`: qdldl LDLᵀ,
                 its AMD order and elimination tree computed once)
               interior point (`ipm`) to the first round's test
               a warm start that did not settle: solved again cold
               polish on the active set (`limit`); where it fails and the sample
                 stopped at the tolerance, more iterations and a polish again
               the backward's limit system, factored (when a gradient is needed)
           ─ unscale: z, s, λ, ν in the user's units

The stages and rules are the dense engine's (`backends.qp.engine`); its module
docstring says why the polish is there (the exact point on the active set, and
an earlier end where a weakly active row would need μ down to eps²). Each
sample keeps its solver, holding the limit system's factorization, for the
backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import solution
from ..qp.engine import POLISH_ROUNDS, POLISHABLE
from ..qp.ipm import INACCURATE, INFEASIBLE, MAX_ITER, NUMERICAL, OPTIMAL, RUNNING, UNBOUNDED
from ..solution import Solution
from ..threads import run_samples
from . import ipm
from .kkt import Breakdown, SampleKKT
from .limit import active_rows, factor_limit, polish
from .pattern import SparsePattern
from .scaling import Scaling, equilibrate
from .settings import SparseQPSettings

# The interior point's codes as the shared status codes (`solution.CODES`).
SHARED_CODES = {RUNNING: solution.MAX_ITER, OPTIMAL: solution.OPTIMAL,
                INFEASIBLE: solution.INFEASIBLE, UNBOUNDED: solution.UNBOUNDED,
                MAX_ITER: solution.MAX_ITER, NUMERICAL: solution.NUMERICAL,
                INACCURATE: solution.INACCURATE}
SETTLED = (OPTIMAL, INFEASIBLE, UNBOUNDED)
# Codes whose samples get a backward system (those that return a point).
WITH_POINT = (OPTIMAL, INACCURATE, MAX_ITER)


@dataclass
class SampleState:
    """What the backward needs of one sample: its solver with the limit system
    factored and the active rows (None: no gradient for this sample)."""

    op: SampleKKT | None = None
    active: np.ndarray | None = None


@dataclass
class SparseQPResult(Solution):
    """The batch's solution in the user's units (float64) and the backward's state.

    ``residuals``: the interior point's scaled primal residual, dual residual and
    complementarity on the equilibrated problem (`ipm`).
    """

    z: torch.Tensor = None  # (B, n)
    lam: torch.Tensor = None  # (B, p)
    nu: torch.Tensor = None  # (B, m)
    s: torch.Tensor = None  # (B, p) slacks h − Gz (+inf on h = +inf rows)
    scaling: Scaling = None
    samples: list = field(default_factory=list)  # SampleState per sample
    pattern: SparsePattern = None
    settings: SparseQPSettings = None

    def warm_start(self) -> dict:
        """This solution as a starting point for the next solve (detached)."""
        return {"z": self.z.detach(), "lam": self.lam.detach(), "s": self.s.detach(),
                "nu": self.nu.detach()}


def run(pattern: SparsePattern, values: dict, settings: SparseQPSettings, need_grad: bool,
        warm: dict | None = None) -> SparseQPResult:
    """Solve a batch. ``values``: float64 arrays (B, ·) for "Q", "q", "G", "h", "A", "b"
    (Q, G, A: value arrays in the pattern's order); ``warm``: arrays (B, ·) for
    "z", "lam", "s", "nu" in the user's units, or None."""
    B = values["q"].shape[0]
    scaling = equilibrate(pattern, values["Q"], values["G"], values["A"], values["q"])
    Qv, q, Gv, h, Av, b = scaling.apply(pattern, *(values[k] for k in "QqGhAb"))
    warm_scaled = None if warm is None else scaling.scaled_point(
        warm["z"], np.where(np.isfinite(warm["s"]), warm["s"], 1.0), warm["lam"], warm["nu"])
    n, p, m = pattern.n, pattern.p, pattern.m
    out = {"x": np.full((B, n), np.nan), "lam": np.full((B, p), np.nan),
           "s": np.full((B, p), np.nan), "nu": np.full((B, m), np.nan),
           "codes": np.full(B, NUMERICAL), "iterations": np.zeros(B, dtype=np.int64),
           "residuals": np.full((B, 3), np.nan)}
    states = [SampleState() for _ in range(B)]
    eps = settings.tolerance()
    deadline = None if settings.time_limit is None else time.monotonic() + settings.time_limit

    def one(i):
        op = SampleKKT(pattern, Qv[i], Gv[i], Av[i], settings)
        vec = ipm.vectors(q[i], h[i], b[i])
        start = None if warm_scaled is None else ipm.Point(
            *(t[i] for t in (warm_scaled[0], warm_scaled[3], warm_scaled[2], warm_scaled[1])))
        code, pt, track = _solve_sample(op, vec, settings, eps, start, deadline)
        out["x"][i], out["nu"][i], out["lam"][i], out["s"][i] = pt.x, pt.nu, pt.lam, pt.s
        out["codes"][i], out["iterations"][i], out["residuals"][i] = code, track.iterations, \
            track.res
        if need_grad and code in WITH_POINT:
            states[i] = _backward_state(op, pt, vec)

    run_samples(one, B, settings.workers(B, pattern.symbolic()["factor_flops"]))
    z, s, lam, nu = scaling.solution(out["x"], out["s"], out["lam"], out["nu"])
    s = np.where(np.isposinf(h), np.inf, s)
    codes = np.array([SHARED_CODES[int(c)] for c in out["codes"]], dtype=np.int64)
    codes = torch.from_numpy(solution.judge(codes, out["residuals"]))
    residuals = torch.from_numpy(out["residuals"])
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
               (("z", z), ("lam", lam), ("nu", nu), ("s", s))}
    return SparseQPResult(codes, torch.from_numpy(out["iterations"]), residuals, **tensors,
                          scaling=scaling, samples=states, pattern=pattern, settings=settings)


def _solve_sample(op: SampleKKT, vec: ipm.Vectors, settings, eps, warm, deadline):
    """One sample from start to polished point: (code, point, tracker)."""
    rounds = POLISH_ROUNDS(eps)
    try:
        pt = ipm.initial_point(op, vec, warm)
    except Breakdown:
        track = ipm.Tracker()
        return NUMERICAL, _nan_point(op), track
    track = ipm.Tracker()
    code, pt = ipm.iterate(op, vec, pt, settings, eps, rounds[0], track, deadline)
    if warm is not None and code not in SETTLED:
        # A warm start only changes where the iteration begins; the answer must never
        # depend on it, so a sample it left unsettled gets the cold start's result.
        track = ipm.Tracker()
        code, pt = ipm.iterate(op, vec, ipm.initial_point(op, vec, None), settings, eps,
                               rounds[0], track, deadline)
    # Polish; where that fails on a sample stopped at a round's test, iterate on to
    # the next round's (the last is STRICT, which is None: hence the explicit end).
    for rows in rounds[1:] + [_END]:
        if code not in POLISHABLE:
            break
        ok, polished, res = polish(op, vec, pt, eps)
        if ok:
            pt, track.res, code = polished, res, OPTIMAL
            break
        if rows is _END or code != OPTIMAL:
            break
        code, pt = ipm.iterate(op, vec, pt, settings, eps, rows, track, deadline)
    return code, pt, track


_END = object()


def _nan_point(op: SampleKKT) -> ipm.Point:
    return ipm.Point(np.full(op.n, np.nan), np.full(op.m, np.nan), np.full(op.p, np.nan),
                     np.full(op.p, np.nan))


def _backward_state(op: SampleKKT, pt: ipm.Point, vec: ipm.Vectors) -> SampleState:
    """The limit system at the final point, factored (the polish's, when it is the same)."""
    active = active_rows(pt, vec)
    try:
        factor_limit(op, active)
    except Breakdown:
        op.factored = None  # the backward falls back to least squares
    return SampleState(op, active)
