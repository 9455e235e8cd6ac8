"""Drop-in import path for cvxpylayers users: ``from declarative.torch import CvxpyLayer``."""

from .layer import CvxpyLayer as CvxpyLayer
from .layer import SolveInfo as SolveInfo

__all__ = ["CvxpyLayer", "SolveInfo"]
