"""The one call pipeline of every front door, torch only (neither CVXPY nor `canon`).

    validate (`check_params`) → θ (`build_theta`) → route.solve → `SolveInfo`
    → failure policy (`settle`) → outputs in the variables' shapes

`run` is that pipeline for `CvxpyLayer` and `ExportedLayer` (a `Door` holds
what they fix at construction); `QPFunction` validates its own qpth-style
inputs and shares the rest (`settle`). Statuses arrive as the routes' code
tensors (`backends.solution`) and are read on the host once per call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks
from .backends.functorch import is_wrapped
from .backends.solution import INVALID, Solution, to_status
from .backends.status import Status
from .errors import SolverError
from .routes.conic import refuse_functorch

ON_FAILURE = ("raise", "mask")


@dataclass(frozen=True)
class SolveInfo:
    """Per-sample outcome of one call (``layer(..., return_info=True)``)."""

    status: tuple[Status, ...]
    iterations: np.ndarray
    # (B, 3): scaled primal residual, dual residual and gap (complementarity or
    # relative suboptimality); `backends.solution` says what each route reports.
    residuals: np.ndarray
    backend: str
    # This call's solution as a starting point for the next (``warm_start=info``).
    warm_start: dict | None = None

    @property
    def ok(self) -> bool:
        return all(s is Status.OPTIMAL for s in self.status)

    @classmethod
    def of(cls, solution: Solution, route: str, invalid=()) -> SolveInfo:
        """The info of one solve; samples ``invalid`` (refused before the solve) are
        reported invalid_input, with no iterations and NaN residuals."""
        codes = host(solution.codes).astype(np.int64)
        iterations = np.array(host(solution.iterations), dtype=np.int64)
        residuals = np.array(host(solution.residuals), dtype=np.float64)
        if invalid:
            idx = list(invalid)
            codes[idx], iterations[idx], residuals[idx] = INVALID, 0, np.nan
        return cls(to_status(codes), iterations, residuals, route, solution.warm_start())


def check_params(params, door, maskable, on_failure: str = "raise"):
    """Validate the call's tensors against the parameter layout.

    Returns (params, batch, invalid): ``invalid`` lists the samples whose values
    fail a value check (see `_checks`); with ``on_failure="raise"`` the first
    such failure raises instead. Their values are replaced by stand-ins
    (`stand_ins`) so that every route solves something harmless there; the
    caller reports them invalid_input (`mark_invalid`).
    """
    layout, labels = door.layout, door.labels
    if len(params) != len(layout):
        names = ", ".join(f"'{s.name}'" for s in layout.slots)
        raise ValueError(
            "A tensor must be provided for each CVXPY parameter; "
            f"received {len(params)} tensors, expected {len(layout)} ({names})."
        )
    params = tuple(_checks.check_tensor(lab, p) for lab, p in zip(labels, params))
    for lab, p, slot in zip(labels, params, layout.slots):
        _checks.check_dense(lab, p, slot)
    params = tuple(
        _checks.sparse_values(lab, p, slot.shape, slot.sparse_index, cache)
        if slot.sparse_index is not None else p
        for lab, p, slot, cache in zip(labels, params, layout.slots, door.sparse_caches))
    batch = _checks.check_batch(params, [s.value_shape for s in layout.slots], labels)
    inside = _checks.functorch_active(*params)
    failed = {}
    for k, (lab, p, slot, b, neginf) in enumerate(
            zip(labels, params, layout.slots, batch.per_input, maskable)):
        found = _checks.value_failures(lab, p, slot, b, allow_neginf=neginf)
        if found is None:
            continue
        mask, message = found
        if inside:
            raise ValueError(message + " Inside torch.func transforms such samples cannot be "
                             "masked: filter them out before the transform.")
        if on_failure == "raise":
            raise ValueError(message + " Pass on_failure='mask' to mark such samples "
                             "invalid_input (NaN outputs) instead.")
        failed[k] = mask.to("cpu").expand(batch.size)
    if not failed:
        return params, batch, ()
    bad = torch.stack(list(failed.values())).any(0)
    return (stand_ins(params, layout, batch, bad, failed), batch,
            tuple(bad.nonzero().flatten().tolist()))


def stand_ins(params, layout, batch: _checks.BatchInfo, bad: torch.Tensor, failed: dict):
    """Replace the values of the ``bad`` samples by values that pass every check.

    Each bad sample takes every batched parameter's value from the first good
    sample (the same problem, so no harder to solve); with no good sample, the
    parameters that failed take `_checks.stand_in`. torch.where keeps autograd:
    the replaced entries get zero gradient, and the stand-ins are detached.
    """
    good = (~bad).nonzero().flatten()
    donor = int(good[0]) if good.numel() else None
    out = []
    for k, (p, slot, batched) in enumerate(zip(params, layout.slots, batch.per_input)):
        if donor is not None and batched:
            rows = bad.to(p.device).reshape((-1,) + (1,) * len(slot.value_shape))
            out.append(torch.where(rows, p[donor].detach(), p))
        elif donor is None and k in failed:
            out.append(torch.where(torch.ones((), dtype=torch.bool, device=p.device),
                                   _checks.stand_in(slot, p), p))
        else:
            out.append(p)
    return tuple(out)


def build_theta(params, batch: _checks.BatchInfo, log_space, dtype: torch.dtype) -> torch.Tensor:
    """The (B, len θ) parameter matrix; see `canon.parameters` for the layout."""
    B = batch.size
    cols, logs = [], []
    for p, batched, log in zip(params, batch.per_input, log_space):
        p = p.to(dtype)
        flat = p.reshape(B, -1) if batched else p.reshape(1, -1).expand(B, -1)
        cols.append(flat)
        if log:
            logs.append(torch.log(flat))
    cols.extend(logs)
    cols.append(torch.ones(B, 1, dtype=dtype, device=batch.device))
    return torch.cat(cols, dim=1)


def shape_outputs(flat, shapes, exp_mask, batch: _checks.BatchInfo):
    """(B, size) outputs -> the variables' shapes; exp() for GP primal variables.

    Each output is a fresh row-major tensor: a user may edit it in place (x[:, 0] = 0)
    without touching what the backward saved, which it would be if it were a view.
    """
    outs = []
    for value, shape, exp in zip(flat, shapes, exp_mask):
        value = value.reshape((batch.size,) + tuple(shape))
        if exp:
            value = torch.exp(value)
        if not batch.batched:
            value = value[0]
        outs.append(value.to(batch.dtype).clone(memory_format=torch.contiguous_format))
    return tuple(outs)


def host(values) -> np.ndarray:
    """Iteration counts or residuals as a numpy array (they may already be one)."""
    if isinstance(values, np.ndarray):
        return values
    t = values.detach()
    if is_wrapped(t):
        # Inside torch.func transforms even bookkeeping tensors come wrapped and
        # have no storage to share; tolist() still reads their values.
        return np.asarray(t.tolist())
    return t.cpu().numpy()


def resolve_warm_start(warm_start, cache, backend: str, batch: int, shapes: dict | None):
    """The warm-start state for this call: from a `SolveInfo`, a dict, or the cache (True).

    ``shapes`` is this route's `warm_shapes`. A state from another layer or route
    is refused naming what differs; the cache (True) is simply not used then.
    """
    if warm_start is None or warm_start is False:
        return None
    if warm_start is True:
        state, origin = cache, "the layer's last call"
    elif isinstance(warm_start, SolveInfo):
        if warm_start.backend != backend:
            raise ValueError(f"warm_start comes from the {warm_start.backend!r} path; this "
                             f"layer runs {backend!r}.")
        state, origin = warm_start.warm_start, "warm_start"
    elif isinstance(warm_start, dict):
        state, origin = warm_start, "warm_start"
    elif isinstance(warm_start, Solution):  # a backend's result (QPFunction's return_info)
        state, origin = warm_start.warm_start(), "warm_start"
    else:
        raise TypeError("warm_start must be True, False/None, a SolveInfo (return_info=True) "
                        f"or its .warm_start dict; got {type(warm_start).__name__}.")
    if not state or shapes is None:
        return None  # nothing to start from, or a route that takes no warm start
    problem = _warm_mismatch(state, shapes, batch)
    if problem is None:
        return state
    if warm_start is True:
        return None  # the cache is from a call of another batch size or route: start cold
    raise ValueError(f"{origin} does not fit this layer: {problem}. Pass the SolveInfo of "
                     "a previous call of this same layer (return_info=True).")


def _warm_mismatch(state, shapes: dict, batch: int) -> str | None:
    if not isinstance(state, dict):
        return f"expected a dict, got {type(state).__name__}"
    if set(state) != set(shapes):
        return f"it has keys {sorted(state)}, this route takes {sorted(shapes)}"
    for key, size in shapes.items():
        shape = getattr(state[key], "shape", None)
        if shape is None:
            return f"warm_start[{key!r}] is {type(state[key]).__name__}, expected a tensor"
        if tuple(shape) != (batch, size):
            return (f"warm_start[{key!r}] has shape {tuple(shape)}, this call needs "
                    f"({batch}, {size})")
    return None


def check_on_failure(on_failure: str) -> None:
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be 'raise' or 'mask', got {on_failure!r}.")


def failed_samples(status, strict: bool) -> list[int]:
    """Samples without a usable solution (strict: anything but optimal)."""
    if strict:
        return [i for i, s in enumerate(status) if s is not Status.OPTIMAL]
    return [i for i, s in enumerate(status) if not s.has_solution]


def mask_samples(flat, bad: list[int]):
    """NaN in the rows ``bad``; torch.where gives those rows zero gradient."""
    out = []
    for t in flat:
        mask = torch.zeros(t.shape[0], 1, dtype=torch.bool, device=t.device)
        mask[bad] = True
        out.append(torch.where(mask, torch.full_like(t, float("nan")), t))
    return out


def settle(flat, status, on_failure: str, strict: bool):
    """The failure policy on outputs ``flat`` (each (B, ·)) given each sample's
    ``status``: raise, or NaN-mask, the failed samples; warn about the
    usable-but-imperfect ones (max_iter, optimal_inaccurate) unless ``strict``."""
    if all(s is Status.OPTIMAL for s in status):
        return flat
    bad = failed_samples(status, strict)
    if bad and on_failure == "raise":
        raise SolverError(bad, [status[i] for i in bad])
    if bad:
        flat = mask_samples(flat, bad)
    if not strict:
        warn_imperfect(status)
    return flat


def user_stacklevel() -> int:
    """The stacklevel that points a warning at the caller's own line: the first frame
    outside this package and torch (module calls go through torch's module.py)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("declarative") or name.startswith("torch")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def warn_imperfect(status) -> None:
    capped = [i for i, s in enumerate(status) if s is Status.MAX_ITER]
    if capped:
        warnings.warn(f"Samples {capped} stopped at the iteration or time limit (status "
                      "max_iter); their solutions are the best iterate. Pass strict=True to "
                      "treat this as a failure.", UserWarning, stacklevel=user_stacklevel())
    inaccurate = [i for i, s in enumerate(status) if s is Status.OPTIMAL_INACCURATE]
    if inaccurate:
        warnings.warn(f"Samples {inaccurate} were solved inaccurately (status "
                      "optimal_inaccurate); tighten the solver tolerances.", UserWarning,
                      stacklevel=user_stacklevel())


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Door:
    """What a layer (or a loaded export) fixes at construction for one route."""

    layout: object  # `canon.parameters.ParameterLayout` (or the export's rebuild)
    labels: tuple[str, ...]  # "parameter i ('name')" for messages
    shapes: tuple  # each output's shape
    exp: tuple[bool, ...]  # outputs to exponentiate (primal variables of a GP)
    # Per parameter: the sorted sparsity pattern on each device, for `sparse_values`.
    sparse_caches: tuple = ()

    @classmethod
    def of(cls, layout, shapes, exp) -> Door:
        labels = tuple(f"parameter {i} ('{s.name}')" for i, s in enumerate(layout.slots))
        return cls(layout, labels, tuple(tuple(s) for s in shapes), tuple(exp),
                   tuple({} for _ in layout.slots))


@dataclass(frozen=True)
class Defaults:
    """The layer's own settings, which a call's keyword arguments override."""

    solver: str | None
    solver_args: dict
    on_failure: str
    strict: bool


def run(door: Door, route, params, defaults: Defaults, *, solver_args=None, on_failure=None,
        strict=None, warm_start=False, cache=None):
    """One call: (outputs in the variables' shapes, `SolveInfo`).

    ``cache`` is the state ``warm_start=True`` starts from (a previous info's).
    """
    if solver_args is not None and not isinstance(solver_args, dict):
        raise TypeError(f"solver_args must be a dict, got {type(solver_args).__name__}.")
    on_failure = defaults.on_failure if on_failure is None else on_failure
    check_on_failure(on_failure)
    strict = defaults.strict if strict is None else bool(strict)
    params, batch, invalid = check_params(params, door, route.maskable, on_failure)
    if route.kind == "auto":  # a `routes.cost.RouteChoice`: this batch's route
        previous = warm_start.backend if isinstance(warm_start, SolveInfo) else None
        route, warm_fits = route.pick(batch.size, batch.device, params, previous)
        if not warm_fits:  # a previous call of this layer on a route this call cannot take
            warm_start = None
    settings = route.settings(defaults.solver_args, solver_args, defaults.solver)
    if not route.functorch:
        refuse_functorch(params)
    warm = resolve_warm_start(warm_start, cache, route.kind, batch.size, route.warm_shapes())
    theta = build_theta(params, batch, door.layout.log_space, route.theta_dtype or batch.dtype)
    flat, solution = route.solve(theta, settings, warm)
    info = SolveInfo.of(solution, route.kind, invalid)
    flat = settle(flat, info.status, on_failure, strict)
    return shape_outputs(flat, door.shapes, door.exp, batch), info
