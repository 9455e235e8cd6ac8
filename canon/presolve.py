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
    """(structurally nonzero, constant-and-nonzero) boolean arrays of a block's map."""
    rows = M.shape[0]
    nonzero = np.zeros(rows, dtype=bool)
    coo = M.tocoo()
    nonzero[coo.row[coo.data != 0]] = True
    param = np.zeros(rows, dtype=bool)
    mask = (coo.col != const_col) & (coo.data != 0)
    param[coo.row[mask]] = True
    const_value = np.asarray(M[:, [const_col]].todense()).ravel()
    constant = (const_value != 0) & ~param
    return nonzero.reshape(shape), constant.reshape(shape)


def find(program) -> Elimination:
    """The elimination of a `canon.qp.QuadraticProgram` (possibly empty)."""
    n, m = program.n, program.m
    last = program.maps["A"].shape[1] - 1
    A_nz, A_const = _pattern(program.maps["A"], (m, n), last)
    remaining = np.ones(m, dtype=bool)
    counts = A_nz.sum(0)
    pivots, pivot_rows = [], []
    taken = np.zeros(n, dtype=bool)
    progress = True
    while progress:
        progress = False
        for j in np.flatnonzero((counts == 1) & ~taken):
            rows = np.flatnonzero(A_nz[:, j] & remaining)
            if rows.size != 1 or not A_const[rows[0], j]:
                continue
            i = rows[0]
            pivots.append(j)
            pivot_rows.append(i)
            taken[j] = True
            remaining[i] = False
            counts -= A_nz[i]  # the row is gone: its columns lose one occurrence
            progress = True
    pivots = np.array(pivots, dtype=np.int64)
    keep = np.flatnonzero(~taken)
    rest = np.flatnonzero(remaining)
    elim = Elimination(keep, pivots, np.array(pivot_rows, dtype=np.int64), rest, False)
    if elim.empty:
        return elim
    return Elimination(keep, pivots, elim.pivot_rows, rest, _is_box(program, elim, last))


def _is_box(program, elim: Elimination, last: int) -> bool:
    """Q diagonal and each inequality row on one variable after the substitution."""
    if elim.rest_rows.size:
        return False
    n, p, m = program.n, program.p, program.m
    A_nz, _ = _pattern(program.maps["A"], (m, n), last)
    Q_nz, _ = _pattern(program.maps["Q"], (n, n), last)
    G_nz, _ = _pattern(program.maps["G"], (p, n), last)
    K, C, R = elim.keep, elim.pivots, elim.pivot_rows
    # x_C depends on x_K through T = A[R, C]⁻¹ A[R, K]: the closure of the pattern.
    D = A_nz[np.ix_(R, C)].astype(np.int64)
    dep = A_nz[np.ix_(R, K)].astype(np.int64)
    for _ in range(C.size):  # back-substitution fills at most |C| levels deep
        new = np.minimum(dep + (D - np.diag(np.diag(D))) @ dep, 1)
        if np.array_equal(new, dep):
            break
        dep = new
    T = np.vstack([np.eye(K.size, dtype=np.int64), dep])  # rows: K then C
    order = np.concatenate([K, C])
    Qr = T.T @ Q_nz[np.ix_(order, order)].astype(np.int64) @ T
    Gr = G_nz[:, order].astype(np.int64) @ T
    off = Qr - np.diag(np.diag(Qr))
    return bool(not off.any() and ((Gr != 0).sum(1) <= 1).all())
