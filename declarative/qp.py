"""The module path qpth users already write: ``from declarative.qp import QPFunction``
(as ``qpth.qp.QPFunction``), with ``QPSolvers``."""

from .qpfunction import QPFunction as QPFunction
from .qpfunction import QPSolvers as QPSolvers

__all__ = ["QPFunction", "QPSolvers"]
