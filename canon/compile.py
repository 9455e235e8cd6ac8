"""Compile a CVXPY problem once into parameter-affine data for the backends.

`compile_problem` checks the problem (DCP/DGP and DPP, parameters, requested
variables), asks CVXPY for its parametrized cone program (`ParamConeProg`,
through ``get_problem_data``), and composes CVXPY's maps with the user's
parameter layout. The result never changes afterwards and holds no values:
calling a layer never writes ``Parameter.value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cvxpy as cp

from .cone import ConeProgram, cone_dict_from_dims, from_param_cone_prog
from .diagnostics import ProblemError, check_problem
from .parameters import ParameterLayout
from .recovery import Recovery, dual_recovery, primal_recovery


@dataclass(frozen=True)
class CompiledProblem:
    """Everything the front door and the backends need, framework-free."""

    layout: ParameterLayout
    cone: ConeProgram
    outputs: tuple[Recovery, ...]
    gp: bool = False
    # GP: user parameter i enters the cone program as log(p_i).
    log_space: tuple[bool, ...] = ()
    # Structure recognized for faster exact paths, by backend name.
    structures: dict = field(default_factory=dict)


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
    if len(set(parameters)) != len(parameters):
        raise ProblemError("The layer's parameters list names a Parameter twice.")
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


def compile_problem(problem: cp.Problem, parameters, variables,
                    gp: bool = False) -> CompiledProblem:
    """Compile ``problem`` for the given parameter order and requested outputs."""
    check_problem(problem, gp=gp)
    _check_arguments(problem, parameters, variables)
    parameters = list(parameters)
    variables = list(variables)

    if gp:
        dgp2dcp = cp.reductions.Dgp2Dcp(problem)
        target, _ = dgp2dcp.apply(problem)
        log_params = dgp2dcp.canon_methods._parameters  # user param -> log-space param
        gp_var_ids = {k: v[0] for k, v in dgp2dcp.var_id_map.items()}
    else:
        target = problem
        log_params = {}
        gp_var_ids = {}

    data, chain, _ = target.get_problem_data(cp.DIFFCP)
    param_prob = data[cp.settings.PARAM_PROB]
    param_ids = {k: v[0] for k, v in chain.compose_param_id_map().items()}
    var_ids = {k: v[0] for k, v in chain.compose_var_id_map().items()}
    constr_ids = chain.compose_constr_id_map()

    layout = ParameterLayout(parameters)
    log_space = tuple(p in log_params for p in parameters)
    cvxpy_ids = []
    for p in parameters:
        pid = log_params[p].id if p in log_params else p.id
        cvxpy_ids.append(param_ids.get(pid, pid))
    S = layout.to_cvxpy(parameters, cvxpy_ids, param_prob.param_id_to_col,
                        param_prob.total_param_size)
    cone = from_param_cone_prog(param_prob, S, cone_dict_from_dims(data["dims"]))

    outputs = tuple(_recoveries(problem, variables, param_prob, var_ids, gp_var_ids,
                                constr_ids, cone, gp))
    return CompiledProblem(layout, cone, outputs, gp=gp, log_space=log_space)


def _recoveries(problem, variables, param_prob, var_ids, gp_var_ids, constr_ids, cone, gp):
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
            yield primal_recovery(v, param_prob.var_id_to_col[vid], cone.n)
            continue
        if gp:
            raise NotImplementedError(
                f"dual variable '{v.name()}' requested with gp=True: the log-space "
                "reformulation changes the constraints, so their duals are not the geometric "
                "program's. Request primal variables only."
            )
        con = owner[v.id]
        cid = constr_ids.get(con.id, con.id)
        if cid not in rows:
            raise NotImplementedError(
                f"the dual of constraint {con} is not available: CVXPY eliminated or "
                "split it while canonicalizing."
            )
        start, canonical = rows[cid]
        yield dual_recovery(v, con, canonical, start, cone.m)
