"""Compile CVXPY problems once into parameter-affine problem data.

Framework-free (numpy, scipy, cvxpy): this package never imports torch.
Names load lazily (PEP 562) so that the CVXPY-free modules (`cone`,
`parameters`, `recovery`) can serve an exported layer without importing CVXPY.
"""

from .._lazy import lazy_getattr

_EXPORTS = {
    "CompiledProblem": ".compile",
    "FORMS": ".compile",
    "REQUIREMENTS": ".compile",
    "compile_problem": ".compile",
    "ConeProgram": ".cone",
    "NonconvexError": ".diagnostics",
    "NotDPPError": ".diagnostics",
    "ProblemError": ".diagnostics",
    "ParameterLayout": ".parameters",
    "Recovery": ".recovery",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
