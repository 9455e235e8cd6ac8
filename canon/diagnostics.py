"""Say why a problem cannot be compiled, and where.

CVXPY answers "is this problem DPP?" with one boolean. Users need the
offending expression: we search the expression tree for the deepest node that
fails the rule while all of its arguments pass it, and name that node and the
objective or constraint that holds it.

Three failure kinds are told apart, because they need different fixes:
nonconvex as written (not DCP / not DGP), and convex but not DPP (a product
of parameters, a parameter inside a nonlinear atom, ...).
"""

from __future__ import annotations

import cvxpy as cp
from cvxpy.utilities import scopes


class ProblemError(ValueError):
    """The CVXPY problem cannot be turned into a differentiable layer."""


class NotDPPError(ProblemError):
    """Convex as written, but not disciplined parametrized (DPP)."""


class NonconvexError(ProblemError):
    """Not DCP (or not DGP with ``gp=True``): nonconvex as written."""


def _parts(problem: cp.Problem):
    yield "the objective", problem.objective
    for i, con in enumerate(problem.constraints):
        yield f"constraint {i} ({con})", con


def _passes(expr, rule: str) -> bool:
    if rule == "dgp":
        return expr.is_dgp()
    return expr.is_dcp()


def _deepest_failure(expr, rule: str):
    """The deepest subexpression that fails ``rule`` while its arguments pass."""
    for arg in getattr(expr, "args", []):
        if not _passes(arg, rule):
            return _deepest_failure(arg, rule)
    return expr


def _locate(problem: cp.Problem, rule: str, dpp: bool):
    scope = scopes.dpp_scope() if dpp else _null_scope()
    with scope:
        for where, part in _parts(problem):
            if not _passes(part, rule):
                return where, _deepest_failure(part, rule)
    return None, None


class _null_scope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_problem(problem: cp.Problem, gp: bool = False, quad_form_dpp: bool = False) -> None:
    """Raise a `ProblemError` naming the offending expression, or return.

    ``quad_form_dpp`` accepts ``quad_form(x, P)`` with a parameter ``P`` in
    the objective (CVXPY's ``quad_form_dpp_scope``), which the QP path handles.
    """
    if not isinstance(problem, cp.Problem):
        raise TypeError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}")
    rule = "dgp" if gp else "dcp"
    kind = "DGP" if gp else "DCP"
    if not (problem.is_dgp() if gp else problem.is_dcp()):
        where, expr = _locate(problem, rule, dpp=False)
        hint = (" (geometric programs need monomials/posynomials of positive variables)"
                if gp else "")
        raise NonconvexError(
            f"Problem is not {kind}: it is nonconvex as written{hint}. "
            f"{_capital(where)} fails the {kind} rules at `{expr}`. "
            "Rewrite that expression with DCP-compliant atoms; see "
            "https://www.cvxpy.org/tutorial/dcp/index.html."
        )
    if gp:
        ok = problem.is_dgp(dpp=True)
    elif quad_form_dpp:
        ok = problem.is_dpp(quad_form_dpp="qp")
    else:
        ok = problem.is_dpp()
    if ok:
        return
    if quad_form_dpp:
        with scopes.quad_form_dpp_scope():
            where, expr = _locate(problem, rule, dpp=True)
    else:
        where, expr = _locate(problem, rule, dpp=True)
    location = (f" {_capital(where)} is not DPP at `{expr}`." if where is not None else "")
    raise NotDPPError(
        "Problem must be DPP (disciplined parametrized programming) to be differentiated."
        f"{location} Parameters may multiply variables or enter affinely, but not "
        "multiply each other or enter nonlinear atoms; replace such a subexpression by a "
        "new Parameter computed in torch. See "
        "https://www.cvxpy.org/tutorial/dpp/index.html."
    )


def _capital(s: str | None) -> str:
    return s[:1].upper() + s[1:] if s else ""
