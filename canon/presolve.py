"""Presolve of CVXPY's QP form: which variables its equalities define, decided once.

CVXPY writes ``sum_squares(A x − b)`` as an auxiliary t with the equality
t − (A x − b) = 0 and the objective tᵀt; ``huber``, ``norm1`` and a dynamics
recursion ``X[t+1] == F X[t] + G U[t]`` define variables the same way. Solving the
QP form as written leaves those variables in (n and the equality count grow
several-fold) and Q singular. Here we find, from the sparsity pattern alone,

    pivot rows R and pivot columns C (|R| = |C|) such that each pivot column
    appears in no equality row outside R, the pivot block A[R, C] is upper
    triangular in the order found, and its diagonal entries are constants
    (parameter-free, nonzero),

by peeling: repeatedly take a column that appears in exactly one of the
equality rows still left, with a constant coefficient there, and drop that row.
Then x_C = A[R, C]⁻¹ (b_R − A[R, K] x_K) for the kept columns K, always solvable
(triangular, constant nonzero diagonal), and the QP in x_K keeps the other
equality rows only. The route applies the substitution in torch at each call
(`declarative.routes.qp`): the reduced Q = TᵀQT is not affine in θ (AᵀA), but
autograd differentiates the substitution, so gradients are those of the
original problem.

After the substitution the problem may be separable with simple bounds (Q
diagonal, every inequality row a single variable, no equality left): a box QP,
solved in closed form by clamping (`Box`). That is what a ReLU written as a
projection, ``min ‖x − y‖² s.t. x ≥ 0``, becomes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Elimination:
    """Index sets of the substitution x_C = A[R, C]⁻¹ (b_R − A[R, K] x_K)."""

    keep: np.ndarray  # K: kept columns, in their original order
    pivots: np.ndarray  # C, in peeling order (A[R, C] upper triangular)
    pivot_rows: np.ndarray  # R, in peeling order
    rest_rows: np.ndarray  # equality rows kept in the reduced problem
    box: bool  # the reduced problem is a box QP (see the module docstring)

    @property
    def empty(self) -> bool:
        return self.pivots.size == 0


def _pattern(M: sp.csr_array, shape, const_col: int):
    """(structurally nonzero, constant-and-nonzero) patterns of a block from its map
    (rows: the block's row-major entries), as sparse boolean (CSC) matrices."""
    M = sp.coo_array(M, copy=True)  # COO: the rows are n² entries for Q
    M.sum_duplicates()
    live = M.data != 0
    nonzero = np.unique(M.row[live])
    param = np.unique(M.row[live & (M.col != const_col)])
    constant = np.setdiff1d(M.row[live & (M.col == const_col)], param)

    def matrix(entries):
        r, c = np.divmod(entries, shape[1])
        return sp.csc_array((np.ones(entries.size, dtype=bool), (r, c)), shape=shape)

    return matrix(nonzero), matrix(constant)


def find(program) -> Elimination:
    """The elimination of a `canon.qp.QuadraticProgram` (possibly empty)."""
    n, m = program.n, program.m
    last = program.maps["A"].shape[1] - 1
    A_nz, A_const = _pattern(program.maps["A"], (m, n), last)
    A_rows = sp.csr_array(A_nz)
    remaining = np.ones(m, dtype=bool)
    counts = np.diff(A_nz.indptr).astype(np.int64)  # per column, rows still left
    pivots, pivot_rows = [], []
    taken = np.zeros(n, dtype=bool)
    progress = True
    while progress:
        progress = False
        for j in np.flatnonzero((counts == 1) & ~taken):
            col = A_nz.indices[A_nz.indptr[j]:A_nz.indptr[j + 1]]
            rows = col[remaining[col]]
            if rows.size != 1 or not A_const[rows[0], j]:
                continue
            i = rows[0]
            pivots.append(j)
            pivot_rows.append(i)
            taken[j] = True
            remaining[i] = False
            # The row is gone: its columns lose one occurrence.
            counts[A_rows.indices[A_rows.indptr[i]:A_rows.indptr[i + 1]]] -= 1
            progress = True
    pivots = np.array(pivots, dtype=np.int64)
    keep = np.flatnonzero(~taken)
    rest = np.flatnonzero(remaining)
    elim = Elimination(keep, pivots, np.array(pivot_rows, dtype=np.int64), rest, False)
    if elim.empty:
        return elim
    return Elimination(keep, pivots, elim.pivot_rows, rest, _is_box(program, elim, last))


def _is_box(program, elim: Elimination, last: int) -> bool:
    """Q diagonal and each inequality row on one variable after the substitution
    (decided on sparsity patterns: a structural nonzero counts as nonzero)."""
    if elim.rest_rows.size:
        return False
    n, p, m = program.n, program.p, program.m
    A_nz, _ = _pattern(program.maps["A"], (m, n), last)
    Q_nz, _ = _pattern(program.maps["Q"], (n, n), last)
    G_nz, _ = _pattern(program.maps["G"], (p, n), last)
    K, C, R = elim.keep, elim.pivots, elim.pivot_rows
    A_nz = sp.csr_array(A_nz).astype(np.int64)
    # x_C depends on x_K through T = A[R, C]⁻¹ A[R, K]: the closure of the pattern
    # under back-substitution, at most as many rounds as the chain of pivots is long.
    D = A_nz[R][:, C]
    D = D - sp.diags_array(D.diagonal(), dtype=np.int64)
    dep = _binary(A_nz[R][:, K])
    for _ in range(C.size):
        new = _binary(dep + D @ dep)
        if (new != dep).nnz == 0:
            break
        dep = new
    T = sp.vstack([sp.eye(K.size, dtype=np.int64, format="csr"), dep]).tocsr()  # K, then C
    order = np.concatenate([K, C])
    Q_o = sp.csr_array(Q_nz).astype(np.int64)[order][:, order]
    Qr = (T.T @ Q_o @ T).tocoo()
    Gr = sp.csr_array(G_nz).astype(np.int64)[:, order] @ T
    off_diagonal = np.any((Qr.row != Qr.col) & (Qr.data != 0))
    return bool(not off_diagonal and (np.diff(_binary(Gr).indptr) <= 1).all())


def _binary(M) -> sp.csr_array:
    M = sp.csr_array(M)
    M.data = (M.data != 0).astype(np.int64)
    M.eliminate_zeros()
    return M
