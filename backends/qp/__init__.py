"""Batched primal–dual interior-point QP solver in pure torch (CPU and CUDA)."""

from .data import QPData as QPData
from .engine import QPResult as QPResult
from .function import QPProblem as QPProblem
from .function import solve_qp as solve_qp
from .settings import QPSettings as QPSettings
