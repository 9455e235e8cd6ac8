"""Conic backend: solve a batch of cone programs and differentiate it with diffcp.

Problem convention: `declarative.canon.cone` (SCS form, Ax + s = b, s ∈ K).

The forward pass calls diffcp's per-program routine
(``solve_and_derivative_internal`` with ``raise_on_error=False``) over the
batch in a thread pool, exactly as diffcp's ``solve_and_derivative_batch``
does, but keeps each sample's status, iteration count and residuals instead
of aborting the whole batch at the first infeasible sample. The backward
pass applies each sample's adjoint derivative (diffcp's ``DT``) and maps the
result to θ with the cone program's adjoint data map.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import diffcp
import numpy as np
from diffcp.cone_program import solve_and_derivative_internal, solve_internal
from threadpoolctl import threadpool_limits

from .solver_args import DIFFCP_KEYS, SOLVER_KEYS
from .solver_args import check_type as _check_type
from .status import Status

if TYPE_CHECKING:  # canon's cone module is CVXPY-free, but keep the backend standalone
    from ..canon.cone import ConeProgram

SOLVE_METHODS = {"SCS": "SCS", "ECOS": "ECOS", "CLARABEL": "Clarabel", "DIFFCP": "SCS"}
DIFF_MODES = ("auto", "dense", "lsqr", "lsmr", "lpgd", "lpgd_left", "lpgd_right")

TIME_LIMIT_KEYS = {"SCS": "time_limit_secs", "Clarabel": "time_limit"}

# Largest KKT dimension N = n + m + 1 for which `mode="auto"` picks diffcp's dense
# adjoint: exact, and accurate where LSQR stops at a few percent (NOTES.md).
# diffcp builds the dense N×N matrix in the forward pass and factors MMᵀ in the
# backward; measured here (benchmarks/bench_conic.py, B = 1) dense beats LSQR
# up to N ≈ 250 (N = 202: 8.8 vs 10.5 ms; N = 302: 16.5 vs 13.7 ms).
DENSE_MODE_MAX_DIM = 250

# A sample reported "solved" whose scaled residuals exceed RESIDUAL_CHECK, or
# whose suboptimality bound (see `_residuals`) exceeds SUBOPTIMALITY_CHECK, is
# downgraded to optimal_inaccurate: SCS can stop on a wrong point at large scale.
RESIDUAL_CHECK = 1e-3
SUBOPTIMALITY_CHECK = 1e-2


@dataclass(frozen=True)
class ConicSettings:
    """Resolved options for one call of the conic backend."""

    solve_method: str = "SCS"
    mode: str = "auto"
    n_jobs_forward: int = -1
    n_jobs_backward: int = -1
    derivative_kwargs: dict = field(default_factory=dict)
    solver_kwargs: dict = field(default_factory=dict)

    @classmethod
    def resolve(cls, solver: str | None, defaults: dict | None = None,
                call: dict | None = None) -> ConicSettings:
        """Merge the layer's ``defaults`` and the ``call``'s solver_args, checking each.

        The solve method comes from the call, else the defaults, else ``solver``.
        Keys of the call must suit that method; keys of the layer's defaults that
        another method does not take are left out when a call switches methods.
        """
        defaults, call = dict(defaults or {}), dict(call or {})
        method = _solve_method(solver, defaults, call)
        accepted = SOLVER_KEYS[method]
        out = dict(solve_method=method)
        kwargs = {}
        for origin, args in (("layer", defaults), ("call", call)):
            for key, value in args.items():
                if key == "solve_method":
                    continue
                if key in DIFFCP_KEYS:
                    _check_type("solver_args", key, value, DIFFCP_KEYS[key])
                    if key == "warm_starts":
                        raise ValueError("solver_args['warm_starts'] is not supported; "
                                         "warm starts are not available on the conic path.")
                    if key == "time_limit":
                        if method not in TIME_LIMIT_KEYS:
                            raise ValueError(f"solver_args['time_limit'] is not supported by "
                                             f"{method}; use SCS or Clarabel.")
                        kwargs[TIME_LIMIT_KEYS[method]] = float(value)
                        continue
                    out[key] = value
                elif key in accepted:
                    _check_type("solver_args", key, value, accepted[key])
                    kwargs[key] = value.item() if isinstance(value, np.generic) else value
                elif origin == "layer" and "solve_method" in call and _known(key):
                    continue  # a setting for the layer's default solver, not this one
                else:
                    raise ValueError(
                        f"solver_args has unknown key {key!r} for solve_method {method!r}. "
                        f"Accepted keys: {sorted(set(DIFFCP_KEYS) | set(accepted))}."
                    )
        mode = out.get("mode", "auto")
        if mode not in DIFF_MODES:
            raise ValueError(f"solver_args['mode'] must be one of {DIFF_MODES}, got {mode!r}.")
        out["solver_kwargs"] = kwargs
        return cls(**out)

    def mode_for(self, cone: ConeProgram) -> str:
        if self.mode != "auto":
            return self.mode
        return "dense" if cone.n + cone.m + 1 <= DENSE_MODE_MAX_DIM else "lsqr"


def _solve_method(solver, defaults: dict, call: dict) -> str:
    """The diffcp solve method, from the call, the layer's defaults or ``solver``."""
    for where, args in (("solver_args", call), ("solver_args", defaults)):
        if "solve_method" in args:
            value = args["solve_method"]
            if not isinstance(value, str):
                raise TypeError(f"{where}['solve_method'] must be a str, got "
                                f"{type(value).__name__} ({value!r}).")
            if value.upper() not in SOLVE_METHODS:
                raise ValueError(f"{where}['solve_method'] must be one of "
                                 f"{sorted(set(SOLVE_METHODS.values()))}, got {value!r}.")
            return SOLVE_METHODS[value.upper()]
    name = "SCS" if solver is None else solver
    if not isinstance(name, str) or name.upper() not in SOLVE_METHODS:
        raise ValueError(f"solver must be one of {sorted(SOLVE_METHODS)} for the conic "
                         f"backend, got {solver!r}.")
    return SOLVE_METHODS[name.upper()]


def _known(key: str) -> bool:
    return any(key in keys for keys in SOLVER_KEYS.values())


# What diffcp can differentiate, and which cones each solver takes through it.
DIFFERENTIABLE_CONES = {"z", "f", "l", "q", "s", "ep", "ed"}
SOLVER_CONES = {
    "SCS": {"z", "f", "l", "q", "s", "ep", "ed", "p"},
    "ECOS": {"z", "f", "l", "q", "ep"},
    "Clarabel": {"z", "f", "l", "q", "s", "ep"},
}
CONE_NAMES = {"z": "zero", "f": "zero", "l": "nonnegative", "q": "second-order",
              "s": "PSD", "ep": "exponential", "ed": "dual exponential", "p": "power"}


def check_cones(cone_dict: dict, solve_method: str) -> None:
    """Refuse, before any solve, cones that the solver or diffcp's derivative lacks."""
    present = {k for k, v in cone_dict.items() if (v if not isinstance(v, list) else len(v))}
    missing = present - SOLVER_CONES[solve_method]
    if missing:
        names = ", ".join(sorted(CONE_NAMES[k] for k in missing))
        able = [m for m, cones in SOLVER_CONES.items() if present <= cones]
        raise ValueError(f"solve_method {solve_method!r} does not support the {names} cone(s) "
                         f"of this problem; use one of {able or ['none']}.")
    if present - DIFFERENTIABLE_CONES:
        names = ", ".join(sorted(CONE_NAMES[k] for k in present - DIFFERENTIABLE_CONES))
        raise ValueError(f"This problem needs {names} cone(s), which diffcp cannot "
                         "differentiate; rewrite the constraint with supported atoms.")


def status_from_diffcp(text: str) -> Status:
    t = text.lower()
    if t.startswith("solved") or t.startswith("optimal"):
        if "max_iters" in t or "time_limit" in t:
            return Status.MAX_ITER
        if "inaccurate" in t:
            return Status.OPTIMAL_INACCURATE
        return Status.OPTIMAL
    if "infeasible" in t:
        return Status.INFEASIBLE
    if "unbounded" in t:
        return Status.UNBOUNDED
    return Status.NUMERICAL_ERROR


@dataclass
class ConicResult:
    """A solved batch: solutions (NaN where no point), status and the adjoints."""

    x: np.ndarray  # (B, n)
    y: np.ndarray  # (B, m)
    s: np.ndarray  # (B, m)
    status: list[Status]
    iterations: np.ndarray  # (B,)
    residuals: np.ndarray  # (B, 3): primal, dual residual, suboptimality bound (scaled)
    adjoints: list  # per sample: diffcp's DT or None
    cone: ConeProgram
    n_jobs_backward: int = 1
    # Per-sample objective scale σ: the solver saw c/σ (see `solve`).
    sigma: np.ndarray | None = None

    def vjp(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """Gradients of x and y (B, n), (B, m) -> gradient of θ (B, len θ)."""
        cone = self.cone
        B = dx.shape[0]
        dA = np.zeros((B, cone.nnz))
        db = np.zeros((B, cone.m))
        dc = np.zeros((B, cone.n))
        rows, cols = _nonzero_coordinates(cone)

        def one(i):
            DT = self.adjoints[i]
            if DT is None or not (np.any(dx[i]) or np.any(dy[i])):
                return
            sigma = 1.0 if self.sigma is None else self.sigma[i]
            # The solver's problem had c' = c/σ and dual y' = y/σ.
            gA, gb, gc = DT(dx[i], sigma * dy[i], np.zeros(cone.m))
            gc = gc / sigma
            if gA.nnz == cone.nnz:
                dA[i] = gA.data
            else:  # explicit zeros dropped somewhere: read by coordinates
                dA[i] = np.asarray(gA.tocsr()[rows, cols]).ravel()
            db[i] = gb
            dc[i] = gc

        _run(one, B, self.n_jobs_backward)
        return self.cone.data_adjoint(dc, dA, db)


def _nonzero_coordinates(cone: ConeProgram):
    cols = np.repeat(np.arange(cone.n), np.diff(cone.indptr))
    return cone.indices, cols


def _workers(n_jobs: int, batch: int) -> int:
    if n_jobs == -1:
        n_jobs = os.cpu_count() or 1
    return max(1, min(n_jobs, batch))


def _run(fn, batch: int, n_jobs: int) -> None:
    workers = _workers(n_jobs, batch)
    if workers == 1:
        for i in range(batch):
            fn(i)
        return
    # One BLAS thread per program, as diffcp does: the parallelism is across samples.
    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fn, range(batch)))


def solve(cone: ConeProgram, theta: np.ndarray, settings: ConicSettings,
          need_derivative: bool, warm: dict | None = None) -> ConicResult:
    """Solve the batch of cone programs at parameters θ (B, len θ).

    ``warm`` ({"x", "y", "s"}, each (B, ·)) warm-starts SCS from a previous
    solution, per sample where it is finite; other solvers ignore it.
    """
    B = theta.shape[0]
    c, A_vals, b = cone.data(theta)
    x = np.full((B, cone.n), np.nan)
    y = np.full((B, cone.m), np.nan)
    s = np.full((B, cone.m), np.nan)
    status = [Status.NUMERICAL_ERROR] * B
    iterations = np.zeros(B, dtype=np.int64)
    residuals = np.full((B, 3), np.nan)
    adjoints: list = [None] * B
    mode = settings.mode_for(cone)
    kwargs = dict(settings.solver_kwargs)
    if settings.derivative_kwargs:
        kwargs["derivative_kwargs"] = dict(settings.derivative_kwargs)
    if settings.solve_method == "SCS" and "time_limit_secs" in kwargs:
        # diffcp re-runs SCS without acceleration when it stops inaccurate unless
        # acceleration_lookback is given; at a time limit that doubles the wall time.
        kwargs.setdefault("acceleration_lookback", 10)
    # Objective scaling: solvers stop on absolute tolerances, so an objective of
    # size 1e-4 was "solved" 30% off. Each sample is solved with c/σ, σ = ‖c‖∞; the
    # solution x is unchanged and the dual scales back as y = σ·y'.
    sigma = np.abs(c).max(axis=1) if c.shape[1] else np.ones(B)
    sigma = np.where((sigma > 0) & np.isfinite(sigma), sigma, 1.0)

    def one(i):
        if not (np.all(np.isfinite(c[i])) and np.all(np.isfinite(A_vals[i]))
                and np.all(np.isfinite(b[i]))):
            status[i] = Status.INVALID_INPUT
            return
        A = cone.matrix(A_vals[i])
        ci = c[i] / sigma[i]
        start = None
        if warm is not None and settings.solve_method == "SCS":
            xs, ys, ss = (np.asarray(warm[k][i], dtype=np.float64) for k in ("x", "y", "s"))
            if np.isfinite(xs).all() and np.isfinite(ys).all() and np.isfinite(ss).all():
                start = (xs.copy(), ys / sigma[i], ss.copy())
        try:
            if need_derivative:
                result = solve_and_derivative_internal(
                    A, b[i].copy(), ci.copy(), cone.cone_dict, warm_start=start,
                    solve_method=settings.solve_method, mode=mode, raise_on_error=False,
                    **dict(kwargs))
            else:
                kw = dict(kwargs)
                kw.pop("derivative_kwargs", None)
                result = solve_internal(A, b[i].copy(), ci.copy(), cone.cone_dict,
                                        solve_method=settings.solve_method, warm_start=start,
                                        raise_on_error=False, **kw)
        except diffcp.SolverError as err:  # ECOS raises instead of reporting
            status[i] = status_from_diffcp(str(err).rsplit("status", 1)[-1].strip())
            return
        except (ArithmeticError, np.linalg.LinAlgError):
            status[i] = Status.NUMERICAL_ERROR
            return
        info = result["info"]
        st = status_from_diffcp(str(info.get("status", "failure")))
        iterations[i] = int(info.get("iter", 0))
        if not st.has_solution:
            status[i] = st
            return
        xi, yi, si = (np.asarray(result[k], dtype=np.float64) for k in ("x", "y", "s"))
        res = _residuals(A, b[i], ci, xi, yi, si)
        residuals[i] = res
        if st is Status.OPTIMAL and (max(res[:2]) > RESIDUAL_CHECK or res[2] > SUBOPTIMALITY_CHECK):
            st = Status.OPTIMAL_INACCURATE
        x[i], y[i], s[i] = xi, yi * sigma[i], si
        status[i] = st
        if need_derivative:
            adjoints[i] = result.get("DT")

    _run(one, B, settings.n_jobs_forward)
    return ConicResult(x, y, s, status, iterations, residuals, adjoints, cone,
                       n_jobs_backward=settings.n_jobs_backward, sigma=sigma)


def _residuals(A, b, c, x, y, s) -> tuple[float, float, float]:
    """Scaled primal and dual residuals, and a bound on the relative suboptimality.

    The residuals are scaled the way solvers scale them, which hides absolute
    errors when the data are large (a right-hand side of 1e6: residuals of 3e-5
    with an objective 4x the optimum). The bound does not: by weak duality the
    objective exceeds the optimum by at most |gap| + ‖Aᵀy + c‖‖x‖ + ‖Ax + s − b‖‖y‖.
    """
    def inf(v):
        return float(np.linalg.norm(v, np.inf)) if v.size else 0.0

    Ax, ATy = A @ x, A.T @ y
    r_p, r_d = Ax + s - b, ATy + c
    primal = inf(r_p) / (1.0 + max(inf(b), inf(Ax)))
    dual = inf(r_d) / (1.0 + max(inf(c), inf(ATy)))
    cx, by = float(c @ x), float(b @ y)
    bound = (abs(cx + by) + float(np.linalg.norm(r_d) * np.linalg.norm(x))
             + float(np.linalg.norm(r_p) * np.linalg.norm(y))) / (1.0 + abs(cx))
    return primal, dual, bound if math.isfinite(bound) else np.inf
