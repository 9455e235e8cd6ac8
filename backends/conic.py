"""Conic backend: solve a batch of cone programs and differentiate them.

Problem convention: `declarative.canon.cone` (SCS form, Ax + s = b, s ∈ K).

The forward pass calls diffcp's per-program solve routine (``solve_internal``,
``raise_on_error=False``: SCS, ECOS or Clarabel) over the batch in a thread
pool, as diffcp's ``solve_and_derivative_batch`` does, but keeps each sample's
status, iteration count and residuals instead of aborting the whole batch at
the first infeasible sample. The backward pass applies each sample's adjoint
(`cone_derivative.ConeAdjoint`: the residual map's derivative with its null
directions deflated; diffcp's own for the LPGD modes) and maps the result to
θ with the cone program's adjoint data map.

Status policy (one criterion, applied to every returned point). A solver's
point is measured by `_residuals`: the scaled primal and dual residuals and a
weak-duality bound on the relative suboptimality, (cᵀx − p*)/(1 + |cᵀx|).
Each status that returns a point allows these limits (`ACCURACY`):

    optimal             residuals ≤ 1e-3, suboptimality bound ≤ 1e-2
    optimal_inaccurate  residuals ≤ 1e-2, suboptimality bound ≤ 1e-1
    max_iter            residuals ≤ 1e-2, suboptimality bound ≤ 1e-1

A point the solver calls optimal that misses the first line is
optimal_inaccurate. A point that misses its status's line is not returned: the
sample is infeasible or unbounded where the point is a certificate of it (a
ray, `_certificate`), numerical_error otherwise. Infeasible and unbounded
reported by the solver stand as they are. A Ctrl-C (SIGINT) that stops a solve
raises KeyboardInterrupt; it is never a per-sample status.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field

import diffcp
import numpy as np
import scipy.sparse as sp
import torch
from diffcp.cone_program import solve_and_derivative_internal, solve_internal

from . import solution
from .cone_derivative import ConeAdjoint
from .solution import Solution
from .solver_args import DIFFCP_KEYS, SOLVER_KEYS
from .solver_args import check_type as _check_type
from .status import Status
from .threads import run_samples

SOLVE_METHODS = {"SCS": "SCS", "ECOS": "ECOS", "CLARABEL": "Clarabel", "DIFFCP": "SCS"}
DIFF_MODES = ("auto", "dense", "lsqr", "lsmr", "lpgd", "lpgd_left", "lpgd_right")
LPGD_MODES = ("lpgd", "lpgd_left", "lpgd_right")  # diffcp's own adjoint (re-solves)
# The Python package each solve method imports, for a clear error when it is missing.
SOLVER_PACKAGES = {"SCS": "scs", "ECOS": "ecos", "Clarabel": "clarabel"}

TIME_LIMIT_KEYS = {"SCS": "time_limit_secs", "Clarabel": "time_limit"}

# Largest KKT dimension N = n + m + 1 for which `mode="auto"` picks the dense
# adjoint (`cone_derivative`: one LU of the deflated N×N matrix in the first
# backward): exact, and accurate where LSQR stops at a few percent.
# Measured here (box-constrained ridge least squares, B = 1, forward + backward,
# one BLAS thread): dense vs LSQR 13 vs 19 ms at N = 227, 25 vs 34 at N = 327,
# 60 vs 72 at N = 447, 265 vs 112 at N = 647.
DENSE_MODE_MAX_DIM = 400



# The status policy of the module docstring: the limits every route applies
# (`backends.solution`).
ACCURACY = solution.ACCURACY
# A failed point is a certificate of unboundedness (infeasibility) when its ray
# satisfies the constraints to this fraction of its objective (see `_certificate`).
CERTIFICATE_TOL = 1e-4
# Objectives smaller than this (∞-norm) are solved lifted to this size (see
# `objective_scale`): below it SCS's absolute tolerance is a large relative error.
OBJECTIVE_FLOOR = 0.1


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
        require_solver(method)
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

    def mode_for(self, cone: ConeStructure) -> str:
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


# Which cones each solver takes through diffcp (diffcp's Clarabel and ECOS
# interfaces drop power cones). Every one of them is differentiated here
# (`cone_derivative`: diffcp's projections, and our own for power cones).
SOLVER_CONES = {
    "SCS": {"z", "f", "l", "q", "s", "ep", "ed", "p"},
    "ECOS": {"z", "f", "l", "q", "ep"},
    "Clarabel": {"z", "f", "l", "q", "s", "ep"},
}
CONE_NAMES = {"z": "zero", "f": "zero", "l": "nonnegative", "q": "second-order",
              "s": "PSD", "ep": "exponential", "ed": "dual exponential", "p": "power",
              "pnd": "n-dimensional power"}


def check_cones(cone_dict: dict, solve_method: str) -> None:
    """Refuse, before any solve, cones that the solver (through diffcp) lacks."""
    present = {k for k, v in cone_dict.items() if (v if not isinstance(v, list) else len(v))}
    missing = present - SOLVER_CONES[solve_method]
    if missing:
        names = ", ".join(sorted(CONE_NAMES.get(k, k) for k in missing))
        able = [m for m, cones in SOLVER_CONES.items() if present <= cones]
        raise ValueError(f"solve_method {solve_method!r} does not support the {names} cone(s) "
                         f"of this problem; use one of {able or ['none']}.")


@functools.cache
def _importable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def require_solver(method: str) -> None:
    """Raise a clear ImportError when the solve method's package is not installed."""
    package = SOLVER_PACKAGES[method]
    if not _importable(package):
        raise ImportError(f"solver {method!r} needs the Python package {package!r}, which is "
                          f"not installed; install it with `pip install {package}`, or "
                          "choose another solver (SCS is always available).")


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


@dataclass(frozen=True)
class ConeStructure:
    """What the solver needs besides the values: sizes, cones and A's sparsity pattern
    (CSC, explicit zeros kept), shared by every sample. `canon.cone.ConeProgram`
    has these fields too."""

    n: int
    m: int
    cone_dict: dict
    indices: np.ndarray  # (nnz,) row of each stored entry
    indptr: np.ndarray  # (n + 1,)

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def matrix(self, values: np.ndarray) -> sp.csc_matrix:
        """One sample's A from its nonzero values (a fresh matrix: the solver may edit it)."""
        return sp.csc_matrix((np.array(values, dtype=np.float64), self.indices.copy(),
                              self.indptr.copy()), shape=(self.m, self.n))


@dataclass
class ConicResult(Solution):
    """A solved batch: solutions (NaN where no point), statuses and the adjoints.

    ``residuals``: scaled primal and dual residuals and the relative suboptimality
    bound (`_residuals`).
    """

    x: np.ndarray = None  # (B, n)
    y: np.ndarray = None  # (B, m)
    s: np.ndarray = None  # (B, m)
    adjoints: list = None  # per sample: (dx, dy, ds) -> (dA values, db, dc), or None
    cone: ConeStructure = None
    n_jobs_backward: int = 1
    # Per-sample objective scale σ: the solver saw c/σ (see `objective_scale`).
    sigma: np.ndarray | None = None

    def warm_start(self) -> dict:
        return {k: torch.from_numpy(v) for k, v in (("x", self.x), ("y", self.y),
                                                     ("s", self.s))}

    def vjp(self, dx: np.ndarray, dy: np.ndarray):
        """Gradients of x and y (B, n), (B, m) -> gradients of (c, vals(A), b)."""
        cone = self.cone
        B = dx.shape[0]
        dA = np.zeros((B, cone.nnz))
        db = np.zeros((B, cone.m))
        dc = np.zeros((B, cone.n))

        def one(i):
            adjoint = self.adjoints[i]
            if adjoint is None or not (np.any(dx[i]) or np.any(dy[i])):
                return
            sigma = 1.0 if self.sigma is None else self.sigma[i]
            # The solver's problem had c' = c/σ and dual y' = y/σ.
            dA[i], db[i], gc = adjoint(dx[i], sigma * dy[i], np.zeros(cone.m))
            dc[i] = gc / sigma

        _run(one, B, self.n_jobs_backward)
        return dc, dA, db


def _nonzero_coordinates(cone: ConeStructure):
    cols = np.repeat(np.arange(cone.n), np.diff(cone.indptr))
    return cone.indices, cols


def _workers(n_jobs: int, batch: int) -> int:
    if n_jobs == -1:
        n_jobs = os.cpu_count() or 1
    return max(1, min(n_jobs, batch))


def _run(fn, batch: int, n_jobs: int) -> None:
    """fn(i) for each sample in ``n_jobs`` threads (-1: one per CPU), one BLAS
    thread per program as diffcp does (`threads.run_samples`)."""
    run_samples(fn, batch, _workers(n_jobs, batch), serial_one_blas=True)


def objective_scale(c: np.ndarray) -> np.ndarray:
    """σ (B,) with which each sample's objective is solved as c/σ.

    Solvers stop on absolute tolerances too (SCS: 1e-4), so an objective of
    size 1e-4 was "solved" 30 % off. Objectives smaller than OBJECTIVE_FLOOR
    (∞-norm) are lifted to that size; larger ones are left as written, where
    the relative tolerances govern (a rescaled problem is another solver run,
    no more accurate). The solution x is unchanged and the dual scales back
    as y = σ·y'.
    """
    size = np.abs(c).max(axis=1) if c.shape[1] else np.ones(c.shape[0])
    sigma = np.minimum(size / OBJECTIVE_FLOOR, 1.0)
    return np.where((sigma > 0) & np.isfinite(sigma), sigma, 1.0)


@dataclass
class _Sample:
    """One sample's outcome (the solution in the solver's scaling, c/σ)."""

    status: Status
    iterations: int = 0
    point: tuple | None = None  # (x, y, s)
    residuals: tuple | None = None
    adjoint: object = None


def solve(cone: ConeStructure, c: np.ndarray, A_vals: np.ndarray, b: np.ndarray,
          settings: ConicSettings, need_derivative: bool,
          warm: dict | None = None) -> ConicResult:
    """Solve the batch of cone programs with data c (B, n), vals(A) (B, nnz), b (B, m).

    ``warm`` ({"x", "y", "s"}, each (B, ·)) warm-starts SCS from a previous
    solution, per sample where it is finite; other solvers ignore it.
    Raises KeyboardInterrupt when the user interrupts a solve.
    """
    B = c.shape[0]
    x = np.full((B, cone.n), np.nan)
    y = np.full((B, cone.m), np.nan)
    s = np.full((B, cone.m), np.nan)
    status = [Status.NUMERICAL_ERROR] * B
    iterations = np.zeros(B, dtype=np.int64)
    residuals = np.full((B, 3), np.nan)
    adjoints: list = [None] * B
    sigma = objective_scale(c)
    run = _SampleSolver(cone, settings, need_derivative)

    def one(i):
        start = None
        if warm is not None and settings.solve_method == "SCS":
            xs, ys, ss = (np.asarray(warm[k][i], dtype=np.float64) for k in ("x", "y", "s"))
            if np.isfinite(xs).all() and np.isfinite(ys).all() and np.isfinite(ss).all():
                start = (xs.copy(), ys / sigma[i], ss.copy())
        out = run(c[i] / sigma[i], A_vals[i], b[i], start)
        status[i], iterations[i], adjoints[i] = out.status, out.iterations, out.adjoint
        if out.residuals is not None:
            residuals[i] = out.residuals
        if out.point is not None:
            x[i], y[i], s[i] = out.point[0], out.point[1] * sigma[i], out.point[2]

    _run(one, B, settings.n_jobs_forward)
    return ConicResult(solution.codes_of(status), torch.from_numpy(iterations),
                       torch.from_numpy(residuals), x=x, y=y, s=s, adjoints=adjoints,
                       cone=cone, n_jobs_backward=settings.n_jobs_backward, sigma=sigma)


class _SampleSolver:
    """Solve one sample with the settings' solver; judge its point; build its adjoint."""

    def __init__(self, cone: ConeStructure, settings: ConicSettings, need_derivative: bool):
        self.cone, self.settings, self.need_derivative = cone, settings, need_derivative
        self.mode = settings.mode_for(cone)
        self.rows, self.cols = _nonzero_coordinates(cone)
        kwargs = dict(settings.solver_kwargs)
        if settings.solve_method == "SCS" and "time_limit_secs" in kwargs:
            # diffcp re-runs SCS without acceleration when it stops inaccurate unless
            # acceleration_lookback is given; at a time limit that doubles the wall time.
            kwargs.setdefault("acceleration_lookback", 10)
        self.kwargs = kwargs

    def __call__(self, c, A_vals, b, start) -> _Sample:
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(A_vals))
                and np.all(np.isfinite(b))):
            return _Sample(Status.INVALID_INPUT)
        A = self.cone.matrix(A_vals)  # the fixed pattern, explicit zeros kept
        result, failed = self._call_solver(A, b, c, start)
        if failed is not None:
            return _Sample(failed)
        info = result["info"]
        text = str(info.get("status", "failure"))
        if "interrupt" in text.lower():  # SCS caught Ctrl-C (SIGINT) and stopped
            raise KeyboardInterrupt(f"the {self.settings.solve_method} solve was interrupted")
        status = status_from_diffcp(text)
        iterations = int(info.get("iter", 0))
        if not status.has_solution:
            return _Sample(status, iterations)
        point = tuple(np.asarray(result[k], dtype=np.float64) for k in ("x", "y", "s"))
        res = _residuals(A, b, c, *point)
        status = judge(status, res, A, b, c, *point)
        if not status.has_solution:
            return _Sample(status, iterations, residuals=res)
        # The point's accuracy for the adjoint: its residuals (the suboptimality
        # bound overstates how far x, y, s are from a solution).
        adjoint = (self._adjoint(result, A, b, c, point, max(res[:2])) if self.need_derivative
                   else None)
        return _Sample(status, iterations, point, res, adjoint)

    def _call_solver(self, A, b, c, start):
        """(diffcp's result, None), or (None, the failure status) when the solver raised."""
        method = self.settings.solve_method
        solver_A = A.copy()
        solver_A.eliminate_zeros()
        try:
            if self.need_derivative and self.mode in LPGD_MODES:
                kwargs = dict(self.kwargs)
                if self.settings.derivative_kwargs:
                    kwargs["derivative_kwargs"] = dict(self.settings.derivative_kwargs)
                result = solve_and_derivative_internal(
                    solver_A, b.copy(), c.copy(), self.cone.cone_dict, warm_start=start,
                    solve_method=method, mode=self.mode, raise_on_error=False, **kwargs)
            else:
                result = solve_internal(solver_A, b.copy(), c.copy(), self.cone.cone_dict,
                                        solve_method=method, warm_start=start,
                                        raise_on_error=False, **dict(self.kwargs))
        except diffcp.SolverError as err:  # ECOS raises instead of reporting
            return None, status_from_diffcp(str(err).rsplit("status", 1)[-1].strip())
        except (ArithmeticError, np.linalg.LinAlgError):
            return None, Status.NUMERICAL_ERROR
        return result, None

    def _adjoint(self, result, A, b, c, point, accuracy):
        if self.mode in LPGD_MODES:
            return _diffcp_adjoint(result.get("DT"), self.cone, self.rows, self.cols)
        x, y, s = point
        return ConeAdjoint.at(A, b, c, self.cone.cone_dict, x, y, s, self.rows, self.cols,
                              method=self.mode, accuracy=accuracy)


def _diffcp_adjoint(DT, cone: ConeStructure, rows, cols):
    """diffcp's own adjoint (the LPGD modes), with dA read on our pattern."""
    if DT is None:
        return None

    def adjoint(dx, dy, ds):
        gA, gb, gc = DT(dx, dy, ds)
        if gA.nnz == cone.nnz:
            values = gA.data
        else:  # explicit zeros dropped somewhere: read by coordinates
            values = np.asarray(gA.tocsr()[rows, cols]).ravel()
        return values, gb, gc

    return adjoint


# ---------------------------------------------------------------------------
# The status policy
# ---------------------------------------------------------------------------

def judge(status: Status, measures, A, b, c, x, y, s) -> Status:
    """The status a returned point earns under `ACCURACY` (see the module docstring).

    ``measures`` are `_residuals`' (primal, dual, suboptimality bound). An
    "optimal" point beyond OPTIMAL's limits is optimal_inaccurate; a point
    beyond its status's limits is no solution: infeasible or unbounded where
    it is a certificate of that (`_certificate`), numerical_error otherwise.
    """
    if status is Status.OPTIMAL and not ACCURACY[Status.OPTIMAL].holds(measures):
        status = Status.OPTIMAL_INACCURATE
    if ACCURACY[status].holds(measures):
        return status
    return _certificate(A, b, c, x, y, s) or Status.NUMERICAL_ERROR


def _certificate(A, b, c, x, y, s) -> Status | None:
    """Infeasible or unbounded when the diverging point proves it (SCS's tests).

    Unbounded: x is a ray (Ax + s ≈ 0 for s ∈ K, since the point's s is the
    solver's) of strictly decreasing objective, ‖Ax + s‖∞ ≤ tol·(−cᵀx)/‖c‖∞.
    Infeasible: y ∈ K* with Aᵀy ≈ 0 and bᵀy < 0, ‖Aᵀy‖∞ ≤ tol·(−bᵀy)/‖b‖∞.
    """
    def inf(v):
        return float(np.linalg.norm(v, np.inf)) if v.size else 0.0

    cx, by = float(c @ x), float(b @ y)
    if cx < 0 and inf(A @ x + s) * inf(c) <= CERTIFICATE_TOL * -cx:
        return Status.UNBOUNDED
    if by < 0 and inf(A.T @ y) * inf(b) <= CERTIFICATE_TOL * -by:
        return Status.INFEASIBLE
    return None


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
    measures = (primal, dual, bound)
    return tuple(v if math.isfinite(v) else np.inf for v in measures)
