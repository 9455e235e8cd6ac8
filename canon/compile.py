"""Compile a CVXPY problem once into parameter-affine data for the backends.

`compile_problem` checks the problem (DCP/DGP and DPP, parameters, requested
variables) and asks CVXPY for its parametrized programs (`ParamConeProg`
through ``get_problem_data``), composed with the user's parameter layout.
Each *form* is one canonicalization for one family of backends:

    "simplex"  Euclidean projection onto a simplex (sparsemax) `entropy.SimplexProjection`
    "entropy"  entropy-regularized LP (softmax, transport)     `entropy.EntropyProgram`
    "qp"       quadratic program, dense blocks (torch IPM)     `qp.QuadraticProgram`
    "conic"    cone program, SCS convention (diffcp)           `cone.ConeProgram`

in order from most specific to most general. The structured forms are built at
construction when the problem has that structure; the conic form is built on
first use (a QP layer may never need it). Forms hold no values:
calling a layer never writes ``Parameter.value``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import cvxpy as cp

from . import entropy as entropy_canon
from . import qp as qp_canon
from .cone import cone_dict_from_dims, from_param_cone_prog
from .diagnostics import NotDPPError, ProblemError, check_problem
from .parameters import ParameterLayout, needed_checks
from .recovery import Recovery, dual_recovery, primal_recovery

KINDS = ("simplex", "entropy", "qp", "conic")  # the order of `FORMS` below


@dataclass(frozen=True)
class Form:
    """One canonical form: its program and how to read the outputs off its solution."""

    kind: str
    program: object
    outputs: tuple[Recovery, ...]


@dataclass
class CompiledProblem:
    """Everything the front door and the backends need, framework-free."""

    layout: ParameterLayout
    gp: bool
    # GP: user parameter i enters the programs as log(p_i).
    log_space: tuple[bool, ...]
    forms: dict = field(default_factory=dict)
    _source: tuple | None = field(default=None, repr=False)
    # (DCP problem, user param -> log-space param, user var id -> log var id); the
    # identity for DCP problems, Dgp2Dcp's reduction for geometric programs.
    _dcp: tuple | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # CVXPY's own QP test passed (quad_form with a Parameter allowed).
    qp_ok: bool = False
    # Passed to CVXPY's canonicalization (get_problem_data's canon_backend).
    canon_backend: str | None = None

    def __getstate__(self):
        # Layers are copied and pickled (deepcopy, torch.save of a model, SWA's
        # AveragedModel); a lock cannot be, and a fresh one serves the copy.
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def kinds(self) -> tuple[str, ...]:
        """Forms available for this problem (built or buildable)."""
        kinds = set(self.forms)
        if self._source is not None and self._source[3]:
            kinds.add("conic")
        return tuple(k for k in KINDS if k in kinds)

    def form(self, kind: str) -> Form:
        if kind in self.forms:
            return self.forms[kind]
        if kind != "conic" or self._source is None:
            raise ProblemError(f"this problem has no {kind!r} form; available: {self.kinds}.")
        with self._lock:
            if "conic" not in self.forms:
                problem, parameters, variables, conic_ok = self._source
                if not conic_ok:
                    raise NotDPPError(
                        "This problem is DPP only with quad_form(x, P) for a Parameter P, which "
                        "the QP path handles; the conic path cannot (CVXPY rewrites the "
                        "quad_form into cones). Use backend='qp' or 'auto'."
                    )
                self.forms["conic"] = _conic_form(problem, parameters, variables, self)
        return self.forms["conic"]


def _names(items) -> str:
    return ", ".join(f"'{i.name()}'" for i in items) or "none"


def _check_arguments(problem: cp.Problem, parameters, variables) -> None:
    if not isinstance(parameters, (list, tuple)):
        raise ProblemError(
            "The layer's parameters must be provided as a list or tuple of cvxpy.Parameter, "
            f"got {type(parameters).__name__}."
        )
    if not isinstance(variables, (list, tuple)):
        raise ProblemError(
            "The layer's variables must be provided as a list or tuple of cvxpy.Variable, "
            f"got {type(variables).__name__}."
        )
    for i, p in enumerate(parameters):
        if not isinstance(p, cp.Parameter):
            raise ProblemError(
                f"parameters[{i}] must be a cvxpy.Parameter, got {type(p).__name__}.")
    seen = set()
    for i, p in enumerate(parameters):
        if p in seen:
            raise ProblemError(f"The layer's parameters list names Parameter '{p.name()}' "
                               f"twice (again at position {i}).")
        seen.add(p)
    in_problem = set(problem.parameters())
    given = set(parameters)
    if in_problem != given:
        missing = [p for p in problem.parameters() if p not in given]
        extra = [p for p in parameters if p not in in_problem]
        raise ProblemError(
            "The layer's parameters must exactly match problem.parameters: "
            f"missing {_names(missing)}; not in the problem {_names(extra)}."
        )
    primal = set(problem.variables())
    duals = {dv.id for con in problem.constraints for dv in con.dual_variables}
    for i, v in enumerate(variables):
        if not isinstance(v, cp.Variable):
            raise ProblemError(f"variables[{i}] must be a cvxpy.Variable, got {type(v).__name__}.")
        if v not in primal and v.id not in duals:
            raise ProblemError(
                f"variables[{i}] ('{v.name()}') must be a subset of problem.variables "
                "or a dual variable of one of the problem's constraints "
                "(constraint.dual_variables[k])."
            )


def _check_domain(problem: cp.Problem) -> None:
    """Refuse complex and mixed-integer problems, naming the leaf that makes them so.

    Every backend solves real, continuous programs; a complex variable would come
    back as its real part and an integer one has no derivative.
    """
    for kind, leaves in (("Variable", problem.variables()), ("Parameter", problem.parameters())):
        for leaf in leaves:
            if leaf.is_complex():
                which = next(a for a in ("complex", "imag", "hermitian")
                             if leaf.attributes.get(a))
                raise ProblemError(
                    f"{kind} '{leaf.name()}' is complex ({which}=True); layers solve "
                    f"real-valued problems only. Write it as two real {kind}s (its real "
                    "and imaginary parts) and the problem in real arithmetic.")
    for const in problem.constants():
        if const.is_complex():
            raise ProblemError(
                f"the problem holds a complex constant ({const}); layers solve real-valued "
                "problems only. Write the problem in real arithmetic.")
    for v in problem.variables():
        kind = next((a for a in ("boolean", "integer") if v.attributes.get(a) is not False
                     and v.attributes.get(a) is not None), None)
        if kind is not None:
            raise ProblemError(
                f"Variable '{v.name()}' is declared {kind}=True: the problem is mixed-integer, "
                "and its solution is piecewise constant in the parameters (no useful "
                f"derivative). Drop {kind}=True to differentiate the continuous relaxation.")


def compile_problem(problem: cp.Problem, parameters, variables, gp: bool = False,
                    canon_backend: str | None = None) -> CompiledProblem:
    """Compile ``problem`` for the given parameter order and requested outputs.

    ``canon_backend`` is passed to CVXPY's ``get_problem_data`` (its choice of
    canonicalization backend, e.g. "SCIPY" or "CPP"; None: CVXPY's default).
    """
    if not isinstance(problem, cp.Problem):
        raise TypeError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}.")
    _check_domain(problem)
    qp_ok = (not gp) and qp_canon.is_quadratic_program(problem)
    check_problem(problem, gp=gp, quad_form_dpp=qp_ok)
    _check_arguments(problem, parameters, variables)
    parameters = list(parameters)
    variables = list(variables)
    conic_ok = problem.is_dgp(dpp=True) if gp else problem.is_dpp()

    if gp:
        dgp2dcp = cp.reductions.Dgp2Dcp(problem)
        target, _ = dgp2dcp.apply(problem)
        log_params = dgp2dcp.canon_methods._parameters  # user param -> log-space param
        gp_var_ids = {k: v[0] for k, v in dgp2dcp.var_id_map.items()}
    else:
        target, log_params, gp_var_ids = problem, {}, {}
    log_space = tuple(p in log_params for p in parameters)
    layout = ParameterLayout(parameters, log_space,
                             needed_checks(problem, parameters, _convex_test(gp, qp_ok)))
    compiled = CompiledProblem(layout, gp, log_space,
                               _source=(problem, parameters, variables, conic_ok),
                               _dcp=(target, log_params, gp_var_ids), qp_ok=qp_ok,
                               canon_backend=canon_backend)
    for kind, build in FORMS.items():
        if kind == "conic":
            continue  # built on first use: a layer on a structured route may never need it
        form = build(problem, parameters, variables, compiled)
        if form is not None:
            compiled.forms[kind] = form
    if not compiled.forms:
        compiled.form("conic")  # compile now: errors surface at construction
    return compiled


def _convex_test(gp: bool, qp_ok: bool):
    """The test `check_problem` applies, as a predicate (for `needed_checks`)."""
    if gp:
        return lambda p: p.is_dgp(dpp=True)
    return lambda p: p.is_dpp(quad_form_dpp="qp" if qp_ok else None)


def _canonical(problem, parameters, compiled, data_fn):
    """CVXPY's program for ``problem`` and the selection S from the user's θ."""
    target, log_params, gp_var_ids = compiled._dcp
    data, chain, _ = data_fn(target, compiled.canon_backend)
    param_prob = data[cp.settings.PARAM_PROB]
    param_ids = {k: v[0] for k, v in chain.compose_param_id_map().items()}
    var_ids = {k: v[0] for k, v in chain.compose_var_id_map().items()}
    S = compiled.layout.to_cvxpy(_entries(compiled.layout, parameters, log_params, param_ids),
                                 param_prob.param_id_to_col, param_prob.total_param_size)
    ids = (var_ids, gp_var_ids, chain.compose_constr_id_map())
    return data, param_prob, S, ids


def _entries(layout, parameters, log_params, param_ids):
    """(parameter, θ slot, CVXPY id) for every value CVXPY's program reads.

    In a geometric program a parameter may appear both as a coefficient (as its
    log-space copy) and as an exponent (as itself); both are wired.
    """
    entries = []
    for p, slot, log_slot in zip(parameters, layout.slots, layout.log_slots):
        entries.append((p, slot, param_ids.get(p.id, p.id)))
        if log_slot is not None:
            lp = log_params[p]
            entries.append((lp, log_slot, param_ids.get(lp.id, lp.id)))
    return entries


def _conic_form(problem, parameters, variables, compiled) -> Form:
    data, param_prob, S, ids = _canonical(
        problem, parameters, compiled,
        lambda t, backend: t.get_problem_data(cp.DIFFCP, canon_backend=backend))
    cone = from_param_cone_prog(param_prob, S, cone_dict_from_dims(data["dims"]))
    gp_constraints = (_gp_constraint_ids(problem, compiled._dcp[0])
                      if compiled.gp and _wants_duals(problem, variables) else None)
    outputs = tuple(_recoveries(problem, variables, param_prob, ids, cone.n, cone.m,
                                compiled.gp, gp_constraints))
    return Form("conic", cone, outputs)


def _wants_duals(problem, variables) -> bool:
    primal = set(problem.variables())
    return any(v not in primal for v in variables)


def _gp_constraint_ids(problem, target) -> dict:
    """User constraint id -> id of its log-space constraint in ``target`` (Dgp2Dcp's output).

    The geometric program's dual variables are, by CVXPY's definition, the duals
    of the log-space problem's constraints (``Dgp2Dcp.invert`` passes them through
    unchanged). The reduction that built ``target`` is not kept, so it is applied
    again: it is deterministic, and its constraint list lines up with ``target``'s
    position by position (auxiliary constraints included).
    """
    again, inverse = cp.reductions.Dgp2Dcp(problem).apply(problem)
    if len(again.constraints) != len(target.constraints):
        raise ProblemError("the log-space reformulation of this geometric program is not "
                           "reproducible; its dual variables cannot be located.")
    position = {con.id: k for k, con in enumerate(again.constraints)}
    return {cid: target.constraints[position[log_id]].id
            for cid, log_id in inverse.cons_id_map.items() if log_id in position}


# The QP form: the sparse QP engine keeps it sparse up to these sizes (its
# factorization's fill decides the time; past them the conic path's solvers).
QP_MAX_VARIABLES = 50_000
QP_MAX_CONSTRAINTS = 100_000
# The dense QP engine (`qp` route) holds n×n and (p + m)×n blocks per sample:
# past these sizes in CVXPY's form (256 MB of float64 blocks per sample at the
# limit) only the sparse engine takes the QP form.
DENSE_QP_MAX_VARIABLES = 4000
DENSE_QP_MAX_CONSTRAINTS = 4000


def _qp_form(problem, parameters, variables, compiled) -> Form | None:
    data, param_prob, S, ids = _canonical(problem, parameters, compiled, qp_canon.problem_data)
    program = qp_canon.from_param_prog(param_prob, S, data["dims"])
    if program is None:
        return None
    if program.n > QP_MAX_VARIABLES or program.p + program.m > QP_MAX_CONSTRAINTS:
        return None
    outputs = tuple(_recoveries(problem, variables, param_prob, ids, program.n,
                                program.m + program.p, compiled.gp))
    return Form("qp", program, outputs)


def _structured(kind, recognize):
    """A form builder for a structure read off the problem as written (primal outputs)."""

    def build(problem, parameters, variables, compiled) -> Form | None:
        primal = set(problem.variables())
        if compiled.gp or not variables or any(v not in primal for v in variables):
            return None  # these forms return the primal variable only

        def S_fn(param_prob, param_ids):
            return compiled.layout.to_cvxpy(_entries(compiled.layout, parameters, {}, param_ids),
                                            param_prob.param_id_to_col,
                                            param_prob.total_param_size)

        program = recognize(problem, S_fn, compiled.layout.user_size)
        if program is None:
            return None
        z = problem.variables()[0]
        return Form(kind, program, tuple(primal_recovery(v, 0, z.size) for v in variables))

    return build


def _qp_if_fits(problem, parameters, variables, compiled) -> Form | None:
    if not compiled.qp_ok:
        return None
    # A structured form's variable is one of the QP form's: past the QP size limit
    # that form would be built (O(n²) work at large n) only to be discarded.
    if any(f.program.n > QP_MAX_VARIABLES for f in compiled.forms.values()):
        return None
    return _qp_form(problem, parameters, variables, compiled)


# The registry of canonical forms, from the most specific structure to the most
# general: a route is registered here (how its structure is recognized and
# compiled) and in `declarative.routes.ROUTES` (how it runs).
FORMS = {
    "simplex": _structured("simplex", entropy_canon.recognize_simplex),
    "entropy": _structured("entropy", entropy_canon.recognize_entropy),
    "qp": _qp_if_fits,
    "conic": lambda problem, parameters, variables, compiled: _conic_form(
        problem, parameters, variables, compiled),
}
# What each form needs, for the error when a route is forced on a problem without it.
REQUIREMENTS = {
    "simplex": "minimize α·sum_squares(±z + e) [+ cᵀz] subject to sum(z) == r and z >= 0 for "
               "one vector variable z, returning z only",
    "entropy": "maximize θᵀz + τ·sum(entr(z)) (or minimize its negation) subject to A z == b "
               "with A constant, for one variable z, returning z only",
    "qp": f"a quadratic (or linear) objective and affine constraints, at most "
          f"{DENSE_QP_MAX_VARIABLES} variables and {DENSE_QP_MAX_CONSTRAINTS} constraints in "
          "CVXPY's form, and no geometric program",
    "conic": "a DPP problem without quad_form(x, P) for a Parameter P",
    # Routes on another route's form (`declarative.routes`), not forms of their own.
    "sparse_qp": f"a quadratic (or linear) objective and affine constraints, at most "
                 f"{QP_MAX_VARIABLES} variables and {QP_MAX_CONSTRAINTS} constraints in CVXPY's "
                 "form, and no geometric program",
    "cone": "a DPP problem without quad_form(x, P) for a Parameter P whose cone program has "
            "zero, nonnegative, second-order and exponential cones only (no PSD, power or "
            "dual exponential cones)",
}


def _recoveries(problem, variables, param_prob, ids, x_size, y_size, gp,
                gp_constraints: dict | None = None):
    """A `Recovery` per requested variable: a primal column block of x or dual rows of y.

    ``gp_constraints`` maps a geometric program's constraints to their log-space
    ones (`_gp_constraint_ids`), whose duals are the program's duals.
    """
    var_ids, gp_var_ids, constr_ids = ids
    primal = set(problem.variables())
    owner = {dv.id: con for con in problem.constraints for dv in con.dual_variables}
    rows = {}
    start = 0
    for con in param_prob.constraints:
        rows[con.id] = (start, con)
        start += con.size
    for v in variables:
        if v in primal:
            vid = gp_var_ids.get(v.id, v.id)
            vid = var_ids.get(vid, vid)
            yield primal_recovery(v, param_prob.var_id_to_col[vid], x_size)
            continue
        con = owner[v.id]
        cid = gp_constraints.get(con.id, con.id) if gp else con.id
        cid = constr_ids.get(cid, cid)
        if cid not in rows:
            raise NotImplementedError(
                f"the dual of constraint {con} is not available: CVXPY eliminated or "
                "split it while canonicalizing."
            )
        start, canonical = rows[cid]
        yield dual_recovery(v, con, canonical, start, y_size)
