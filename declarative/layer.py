"""`CvxpyLayer`: a CVXPY problem as a differentiable torch module.

A drop-in for ``cvxpylayers.torch.CvxpyLayer``::

    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])
    (x_star,) = layer(A_t, b_t)          # each tensor: shape, or (batch, *shape)

Conventions (as cvxpylayers): each parameter may carry one leading batch
dimension; unbatched ones broadcast and their gradient is the sum over the
batch; a batch of 1 keeps its dimension. Outputs come back in the inputs'
(promoted) dtype and on their device. The layer never writes
``Parameter.value`` and keeps no per-call state, so it may be shared across
threads and two layers may share Parameters.
"""

from __future__ import annotations

import threading
import time

import torch

from ._pipeline import Defaults, Door, SolveInfo, check_on_failure, run
from .canon import REQUIREMENTS, CompiledProblem, compile_problem
from .routes import ROUTES, as_tensors, available, compile_route, load_route
from .routes.cost import NOMINAL_BATCH, SHOWN_BATCHES, Candidate, RouteChoice, RouteReport

BACKENDS = ("auto",) + tuple(ROUTES)

__all__ = ["CvxpyLayer", "SolveInfo"]


class CvxpyLayer(torch.nn.Module):
    """Solve a parametrized CVXPY problem in the forward pass; differentiate it by the IFT.

    Args:
        problem: a DPP-compliant ``cvxpy.Problem`` (DGP with ``gp=True``).
        parameters: the problem's Parameters, in the order tensors are passed.
        variables: Variables (or constraints' dual variables) to return, in order.
        solver: conic solver run through diffcp: ``None``/"SCS" (default), "ECOS" or
            "CLARABEL". Naming one asks for the conic path; naming one where that path
            cannot run (a parametric quad_form, or a forced torch backend) is an error.
        gp: the problem is a disciplined geometric program.
        verbose: print solver output.
        canon_backend: CVXPY's canonicalization backend (as in cvxpylayers).
        solver_args: default solver arguments; a call's ``solver_args`` override them.
        on_failure: "raise" (default) raises `SolverError` when a sample has no
            solution, and ValueError when a sample's value is invalid (NaN, ±inf, or
            a value the problem's convexity cannot take: see `declarative._checks`);
            "mask" returns NaN for those samples (zero gradient), reporting the
            latter as invalid_input.
        strict: also count samples that stopped at the iteration/time limit
            (max_iter) or solved inaccurately as failures; by default they are
            returned with a UserWarning.
        backend: "auto" (default) takes the most specific structure the problem
            has: "simplex" (projection onto a simplex: sparsemax), "entropy"
            (entropy-regularized LP: softmax, optimal transport), a QP ("qp": the
            batched dense interior point, presolved; "sparse_qp": per-sample sparse
            LDLᵀ), a cone program ("cone": the batched torch interior point;
            "conic": diffcp); where a structure has several routes each call takes
            the one predicted fastest for its batch (`routes.cost`; ``layer.routes``
            explains it, ``layer.backend`` names the choice for a batch of 16).
            Naming one forces it (an invalid choice is an error saying why).
    """

    def __init__(self, problem, parameters, variables, solver: str | None = None,
                 gp: bool = False, verbose: bool = False, canon_backend: str | None = None,
                 solver_args: dict | None = None, *, on_failure: str = "raise",
                 backend: str = "auto", strict: bool = False):
        super().__init__()
        self._compiled: CompiledProblem = compile_problem(problem, parameters, variables, gp=gp,
                                                          canon_backend=canon_backend)
        if solver_args is not None and not isinstance(solver_args, dict):
            raise TypeError(f"solver_args must be a dict, got {type(solver_args).__name__}.")
        self._requested = backend
        self.backend = _resolve_backend(backend, self._compiled, solver, solver_args)
        self._routes: dict = {}  # kind -> (Route, Door, arrays, meta), built once each
        # backend="auto" with several exact routes on one form: chosen per call.
        self._choice = None
        if self.backend == "auto":
            # cvxpylayers' batched solvers name the job of the batched torch routes.
            batched_only = isinstance(solver, str) and solver.upper() in BATCHED_SOLVERS
            self._choice = self._candidates(dict(solver_args or {}), batched_only)
            self.backend = self._choice.best(NOMINAL_BATCH).kind
            if len(self._choice.candidates) == 1:
                self._choice = None
        if self.backend != "conic" and isinstance(solver, str) and \
                solver.upper() in BATCHED_SOLVERS:
            solver = None  # its job is the torch route's (see BATCHED_SOLVERS)
        self.solver, self.gp, self.verbose = solver, gp, verbose
        self.canon_backend = canon_backend
        self.solver_args = dict(solver_args or {})
        if verbose:
            self.solver_args.setdefault("verbose", True)
        check_on_failure(on_failure)
        self.on_failure, self.strict = on_failure, bool(strict)
        route = self.route(self.backend)
        # Resolve once so a bad key fails at construction, not at the first call.
        route.settings(self.solver_args, None, solver)
        # Per thread, the last solution of a call that asked for warm starts, for the
        # next forward(warm_start=True). A cache only: a warm start changes how fast a
        # solve converges, never its answer; calls without warm starts keep nothing.
        self._warm = threading.local()

    @property
    def compiled(self) -> CompiledProblem:
        return self._compiled

    def route(self, kind: str):
        """The runtime of route ``kind`` for this problem (compiled on first use)."""
        return self._route_parts(kind)[0]

    def _route_parts(self, kind: str):
        """(Route, Door, arrays, meta) of route ``kind``, built once."""
        if kind not in self._routes:
            form = self._compiled.form(ROUTES[kind].form_kind())
            layout = self._compiled.layout
            arrays, meta = compile_route(kind, form, layout)
            door = Door.of(layout, [rec.shape for rec in form.outputs],
                           [self._compiled.gp and rec.is_primal for rec in form.outputs])
            self._routes[kind] = (load_route(as_tensors(arrays), meta), door, arrays, meta)
        return self._routes[kind]

    def _candidates(self, solver_args: dict, batched_only: bool = False) -> RouteChoice:
        """The exact routes on the form of the most specific one, with their costs;
        a route that refuses the layer's solver_args is not among them."""
        kinds = [k for k in available(self._compiled)
                 if ROUTES[k].batched_torch or not batched_only]
        form = ROUTES[kinds[0]].form_kind()
        every, fitting = [], []
        for kind in kinds:
            if ROUTES[kind].form_kind() != form:
                continue
            route = self.route(kind)
            every.append(Candidate(kind, route, *route.cost()))
            if len(kinds) == 1:
                break  # nothing to compare
            try:
                route.settings(solver_args, None, None)
                fitting.append(every[-1])
            except (ValueError, TypeError):
                pass  # arguments meant for another route
        # None fits: keep them all, and the chosen one's error names the argument.
        return RouteChoice(fitting or every)

    @property
    def routes(self) -> RouteReport:
        """Which route this layer runs and why (printable)."""
        predicted, corrected = {}, {}
        if self._choice is not None:
            predicted = {c.kind: {b: self._choice.expected(c, b) for b in SHOWN_BATCHES}
                         for c in self._choice.candidates}
            corrected = self._choice.corrections()
        kinds, compiled = available(self._compiled), self._compiled
        refused = {}
        for k in ROUTES:
            form = ROUTES[k].form_kind()
            if k in kinds:
                continue
            if form in compiled.kinds and form not in compiled.forms:
                refused[k] = (f"not compared: it takes the {form} form, which is built only "
                              f"when asked for (backend={k!r})")
            else:
                refused[k] = f"not this problem's ({REQUIREMENTS[k]})"
        chosen = self.backend if self._choice is None else self._choice.best(NOMINAL_BATCH).kind
        return RouteReport(chosen, predicted, refused, self._requested, corrected)

    def _defaults(self) -> Defaults:
        return Defaults(self.solver, self.solver_args, self.on_failure, self.strict)

    # ------------------------------------------------------------------
    def forward(self, *params: torch.Tensor, solver_args: dict | None = None,
                return_info: bool = False, on_failure: str | None = None,
                strict: bool | None = None, warm_start=False):
        """Solve for a batch of parameter values; returns a tuple in ``variables`` order.

        ``warm_start``: True starts from this thread's previous call with a warm start
        (when the batch size matches; the first such call starts cold), or pass a
        previous call's `SolveInfo` (``return_info=True``). The QP and entropy paths
        and SCS use it. Calls without a warm start keep no state on the layer.
        ``solver_args={"solve_method": ...}`` on a layer whose ``backend="auto"`` chose
        a torch path solves this call on the conic path with that solver.
        """
        kind = self._route_kind(solver_args)
        route, door, _, _ = self._route_parts(kind)
        chosen = self._choice is not None and kind == self.backend
        if chosen:
            route = self._choice  # this call's batch picks (`routes.cost`)
        started = time.perf_counter()
        outputs, info = run(door, route, params, self._defaults(), solver_args=solver_args,
                            on_failure=on_failure, strict=strict, warm_start=warm_start,
                            cache=getattr(self._warm, "state", None))
        if chosen:
            self._choice.observe(info.backend, len(info.status), time.perf_counter() - started)
        if warm_start is not False and warm_start is not None:
            self._warm.state = info.warm_start
        return (outputs, info) if return_info else outputs

    def __getstate__(self):
        # A thread-local warm-start cache is not picklable, and a copy starts cold.
        state = dict(self.__dict__)
        state.pop("_warm", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._warm = threading.local()

    def _route_kind(self, solver_args) -> str:
        """The path this call runs: the layer's, or conic when the call names a conic solver."""
        if (self.backend == "conic" or not isinstance(solver_args, dict)
                or "solve_method" not in solver_args):
            return self.backend
        method = solver_args["solve_method"]
        if self._requested != "auto":
            raise ValueError(
                f"solver_args['solve_method']={method!r} asks for a conic solver, but this "
                f"layer was built with backend={self._requested!r}. Build it with "
                "backend='auto' or 'conic' to solve with that solver.")
        if "conic" not in self._compiled.kinds:
            raise ValueError(
                f"solver_args['solve_method']={method!r} asks for a conic solver, but "
                f"{_NO_CONIC} Leave solve_method out; the layer runs the torch QP engine.")
        return "conic"

    def export(self):
        """A standalone torch module for this layer (see `declarative.export`)."""
        from .export import ExportedLayer

        return ExportedLayer.from_layer(self)


# Why a problem has no conic form (the only case: see `CompiledProblem.form`).
_NO_CONIC = ("this problem has quad_form(x, P) with a Parameter P, which only the QP path "
             "takes (the conic path would need CVXPY to rewrite it into cones, which is not "
             "DPP).")


# cvxpylayers' batched solvers for GPUs and JAX: where a problem has a torch route,
# that route does their job here (batched, on the inputs' device).
BATCHED_SOLVERS = ("MOREAU", "CUCLARABEL", "MPAX")


def _batched_solver(solver, compiled: CompiledProblem) -> bool:
    """True if ``solver`` names one of cvxpylayers' batched solvers (then the layer runs
    its torch route); other names are the conic path's (checked there)."""
    if solver is None:
        return False
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a solver name (a str, e.g. 'SCS', 'CLARABEL', "
                        f"'ECOS'), got {type(solver).__name__}. Solver-interface objects are "
                        "cvxpylayers'; this library selects its own routes.")
    if solver.upper() not in BATCHED_SOLVERS:
        return False
    torch_routes = [k for k in available(compiled) if k != "conic"]
    if not torch_routes:
        raise ValueError(
            f"solver={solver!r} is a batched solver of cvxpylayers; here its job (a batched "
            "solve on the inputs' device) is done by the torch routes (QP, entropy, simplex, "
            "cone), and this problem fits none of them. Leave solver out to solve it on the "
            "conic path (SCS), or pass solver='CLARABEL'.")
    return True


def _resolve_backend(backend: str, compiled: CompiledProblem, solver, solver_args) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend in ("conic", "cone"):
        compiled.form("conic")  # raises the specific reason when there is none
    kinds = available(compiled)
    if _batched_solver(solver, compiled):
        solver = None
        if backend == "auto":
            return "auto"
    # Naming a conic solver (solver=... or solver_args['solve_method']) asks for it.
    named = (f"solver={solver!r}" if solver is not None else
             f"solver_args['solve_method']={solver_args['solve_method']!r}"
             if "solve_method" in (solver_args or {}) else None)
    if backend == "auto":
        if named is None:
            return "auto"  # the layer chooses among the exact routes (`routes.cost`)
        if "conic" not in kinds:
            raise ValueError(f"{named} names a conic solver, but {_NO_CONIC} Leave it out: "
                             "the layer then runs the torch QP engine.")
        return "conic"
    if backend not in kinds:
        form = compiled.forms.get(ROUTES[backend].form_kind())
        why = ROUTES[backend].misfit(form) if form is not None else None
        raise ValueError(
            f"backend={backend!r} is not valid for this problem"
            + (f": {why}" if why else "") + f". Its structure allows {kinds}. The "
            f"{backend!r} path needs {REQUIREMENTS[backend]}.")
    if named is not None and backend != "conic":
        raise ValueError(f"{named} names a conic solver, which backend={backend!r} does not "
                         "use. Leave it out, or use backend='conic' (or 'auto').")
    return backend
