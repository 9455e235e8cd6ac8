"""declarative: differentiable convex optimization layers for PyTorch.

Public names load lazily (PEP 562), so ``import declarative.canon`` stays
free of torch: the compile stage is framework-free by design.

A source checkout keeps ``canon/`` and ``backends/`` beside this folder; an
installed wheel nests them. ``_layout`` makes both import the same way.
"""

from ._layout import register as _register_checkout_stages
from ._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "CvxpyLayer": ".layer",
    "QPFunction": ".qpfunction",
    "QPSolvers": ".qpfunction",
    "implicit": "._implicit",
    "ImplicitFunctionError": "._implicit",
    "SolveInfo": "._pipeline",
    "ExportedLayer": ".export",
    "SolverError": ".errors",
    "ParameterTypeError": ".errors",
    "Status": ".backends.status",
    "ProblemError": ".canon",
    "NotDPPError": ".canon",
    "NonconvexError": ".canon",
}

__all__ = sorted(_EXPORTS)

_register_checkout_stages(__name__, __file__)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__():
    return sorted(list(globals()) + __all__)
