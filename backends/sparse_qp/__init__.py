"""Sparse interior-point QP solver: per-sample sparse LDLᵀ (qdldl) in a thread pool.

For QPs too large or too sparse for the dense engine (`backends.qp`); same
problem, statuses and backward, with Q, G and A given as a shared sparsity
pattern and per-sample value arrays.
"""

from .engine import SparseQPResult as SparseQPResult
from .function import SparseQPProblem as SparseQPProblem
from .function import sparse_qp_solve as sparse_qp_solve
from .pattern import SparsePattern as SparsePattern
from .settings import SparseQPSettings as SparseQPSettings
