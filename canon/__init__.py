"""Compile CVXPY problems once into parameter-affine problem data.

Framework-free (numpy, scipy, cvxpy): this package never imports torch.
Names load lazily (PEP 562) so that the CVXPY-free modules (`cone`,
`parameters`, `recovery`) can serve an exported layer without importing CVXPY.
"""

from importlib import import_module

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


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'declarative.canon' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
