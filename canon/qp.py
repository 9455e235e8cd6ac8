"""Recognize quadratic programs and compile them to parameter-affine dense data.

A DPP problem whose objective is quadratic (``sum_squares``, ``quad_form``,
including ``quad_form(x, P)`` with a PSD Parameter P inside CVXPY's
``quad_form_dpp_scope``) and whose constraints are affine (or reduce to affine
constraints, as ``norm1`` and ``abs`` do) is canonicalized by CVXPY with a
quadratic objective and zero/nonnegative cones only. Then, with x CVXPY's
stacked variable,

    minimize    ½ xᵀQx + qᵀx
    subject to  Gx ≤ h    (CVXPY's nonnegative-cone rows)
                Ax = b    (CVXPY's zero-cone rows)

and every block is an affine function of θ: vec(Q) = M_Q θ, q = M_q θ, and so
on, with each matrix flattened row-major. A block whose map reads no user
parameter is constant: the backend shares it across the batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
from cvxpy.utilities import scopes

from .cone import ConeProgram, from_param_cone_prog


@dataclass(frozen=True)
class QuadraticProgram:
    n: int
    p: int  # inequality rows
    m: int  # equality rows
    maps: dict  # block name -> csr map (rows of the flattened block) × len θ
    batched: dict  # block name -> whether it depends on the user's parameters

    def shape(self, name: str) -> tuple[int, ...]:
        n, p, m = self.n, self.p, self.m
        return {"Q": (n, n), "q": (n,), "G": (p, n), "h": (p,), "A": (m, n), "b": (m,)}[name]


def is_quadratic_program(problem: cp.Problem) -> bool:
    """CVXPY's own test, with parametric quad_form accepted."""
    with scopes.quad_form_dpp_scope():
        return bool(problem.is_qp()) and bool(problem.is_dpp(quad_form_dpp="qp"))


def problem_data(problem: cp.Problem, canon_backend: str | None = None):
    """CVXPY's canonicalization keeping the quadratic objective."""
    # CVXPY's QP canonicalization reads its own sparse constants through
    # `.value` and warns about it; the user can do nothing about that.
    with scopes.quad_form_dpp_scope(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Reading from a sparse CVXPY expression")
        return problem.get_problem_data(cp.CLARABEL, canon_backend=canon_backend)


def from_param_prog(param_prob, S: sp.csr_array, dims) -> QuadraticProgram | None:
    """The QP form of CVXPY's program, or None when it has cones beyond zero/nonneg."""
    if dims.soc or dims.psd or dims.exp or dims.p3d or getattr(dims, "pnd", None):
        return None
    z, l = int(dims.zero), int(dims.nonneg)
    cone = from_param_cone_prog(param_prob, S, {"z": z, "l": l})
    n = cone.n
    maps = {"q": cone.c_map}
    maps.update(_split_rows(cone, z, l))
    maps["Q"] = _quadratic_map(param_prob, S, n)
    user_cols = S.shape[1] - 1  # the last column of θ is the constant 1
    batched = {k: bool(_reads_columns(M, user_cols)) for k, M in maps.items()}
    return QuadraticProgram(n, l, z, maps, batched)


def _relabeled(M, target, keep, rows: int) -> sp.coo_array:
    """The rows ``keep`` (a mask) of M, row k moved to ``target[k]``, in a matrix of
    ``rows`` rows. COO: the maps' rows are a block's row-major entries (n² of them
    for Q), and a CSR matrix would store a row pointer for each (12 GB at n = 40 000)."""
    M = sp.coo_array(M)
    sel = keep[M.row]
    out = sp.coo_array((M.data[sel], (target[M.row[sel]].astype(np.int64), M.col[sel])),
                       shape=(rows, M.shape[1]))
    out.sum_duplicates()
    return out


def _split_rows(cone: ConeProgram, z: int, l: int) -> dict:
    """Row-major maps of A (first z rows) and G (next l rows), and of b, h."""
    n = cone.n
    cols = np.repeat(np.arange(n), np.diff(cone.indptr))
    rows = cone.indices
    eq = rows < z
    ineq = ~eq

    def scatter(mask, row_offset, count):
        return _relabeled(cone.A_map, (rows - row_offset) * n + cols, mask, count * n)

    b_rows = sp.csr_array(cone.b_map)
    return {
        "A": scatter(eq, 0, z),
        "G": scatter(ineq, z, l),
        "b": sp.csr_array(b_rows[:z]),
        "h": sp.csr_array(b_rows[z:z + l]),
    }


def _quadratic_map(param_prob, S, n: int) -> sp.csr_array:
    reduced = param_prob.reduced_P
    reduced.cache(keep_zeros=True)
    if reduced.problem_data_index is None or reduced.reduced_mat is None:
        return sp.coo_array((n * n, S.shape[1]))
    indices, indptr, _ = reduced.problem_data_index
    values = sp.csr_array(reduced.reduced_mat) @ S
    cols = np.repeat(np.arange(n), np.diff(indptr))
    rows = np.asarray(indices)
    upper_only = np.any(rows < cols) and not np.any(rows > cols)
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    every = np.ones(rows.size, dtype=bool)
    full = _relabeled(values, rows * n + cols, every, n * n)
    if upper_only:  # a triangular P stands for P + Pᵀ − diag(P)
        mirror = _relabeled(values, cols * n + rows, rows != cols, n * n)
        full = sp.coo_array((np.concatenate([full.data, mirror.data]),
                             (np.concatenate([full.row, mirror.row]),
                              np.concatenate([full.col, mirror.col]))), shape=full.shape)
        full.sum_duplicates()
    return full


def _reads_columns(M: sp.csr_array, user_cols: int) -> bool:
    if M.nnz == 0:
        return False
    coo = M.tocoo()
    return bool(np.any((coo.col < user_cols) & (coo.data != 0)))
