"""Compile CVXPY problems once into parameter-affine problem data.

Framework-free (numpy, scipy, cvxpy): this package never imports torch.
"""

from .compile import CompiledProblem as CompiledProblem
from .compile import compile_problem as compile_problem
from .cone import ConeProgram as ConeProgram
from .diagnostics import NonconvexError as NonconvexError
from .diagnostics import NotDPPError as NotDPPError
from .diagnostics import ProblemError as ProblemError
from .parameters import ParameterLayout as ParameterLayout
from .recovery import Recovery as Recovery
