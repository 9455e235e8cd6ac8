"""Batched conic interior point in torch (zero, orthant, second-order and exponential
cones), differentiated on its own KKT system at the solution."""

from .cones import ConeSpec as ConeSpec
from .engine import ConeResult as ConeResult
from .function import solve_cone as solve_cone
from .settings import ConeSettings as ConeSettings
