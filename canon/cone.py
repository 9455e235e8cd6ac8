"""Parameter-affine cone programs.

Convention (SCS / diffcp), for one sample with parameter vector θ:

    primal   minimize    cᵀx                 dual   maximize  -bᵀy
             subject to  Ax + s = b, s ∈ K           subject to Aᵀy + c = 0, y ∈ K*

with K a product of cones in the order zero (``z``), nonnegative (``l``),
second-order (``q``), PSD (``s``, lower-triangular column-major svec with √2
off-diagonal scaling), exponential (``ep``), dual exponential (``ed``) and
power (``p``). A has a fixed sparsity pattern (CSC ``indices``/``indptr``,
explicit zeros kept), and

    c = C θ,     vals(A) = M θ,     b = N θ

with C, M, N sparse, θ the user's parameter vector (see `parameters`). A batch
of B samples is θ as a (B, len θ) array; each map is then one sparse product.
The forward maps sit beside their adjoints in `ConeProgram`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

ConeDict = dict


@dataclass(frozen=True)
class ConeProgram:
    n: int  # primal variables
    m: int  # constraint rows
    cone_dict: ConeDict  # SCS cone dictionary
    indices: np.ndarray  # CSC row indices of A (length nnz)
    indptr: np.ndarray  # CSC column pointers of A (length n + 1)
    c_map: sp.csr_array  # n × len θ
    A_map: sp.csr_array  # nnz × len θ
    b_map: sp.csr_array  # m × len θ
    offset_map: sp.csr_array  # 1 × len θ, constant term of the objective

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    # ---- forward maps ---------------------------------------------------
    def data(self, theta: np.ndarray):
        """θ (B, len θ) -> c (B, n), vals(A) (B, nnz), b (B, m)."""
        tT = np.ascontiguousarray(theta.T)
        return ((self.c_map @ tT).T, (self.A_map @ tT).T, (self.b_map @ tT).T)

    def matrix(self, values: np.ndarray) -> sp.csc_matrix:
        """One sample's A from its nonzero values (a fresh matrix: diffcp edits it)."""
        return sp.csc_matrix(
            (np.array(values, dtype=np.float64), self.indices.copy(), self.indptr.copy()),
            shape=(self.m, self.n),
        )

    # ---- adjoint --------------------------------------------------------
    def data_adjoint(self, dc: np.ndarray, dA: np.ndarray, db: np.ndarray) -> np.ndarray:
        """Adjoint of `data`: (dc, dvals(A), db), each (B, ·) -> dθ (B, len θ)."""
        out = (self.c_map.T @ dc.T) + (self.A_map.T @ dA.T) + (self.b_map.T @ db.T)
        return np.asarray(out).T


def from_param_cone_prog(param_prob, S: sp.csr_array, cone_dict: ConeDict) -> ConeProgram:
    """Compose CVXPY's `ParamConeProg` maps with the user-θ selection ``S``.

    CVXPY stores ``Ãx + b̃ ∈ K`` with the augmented ``[Ã | b̃]`` given as a
    sparse map from its parameter vector to the CSC values of ``[Ã | b̃]``;
    SCS wants ``Ax + s = b``, hence ``A = -Ã`` and ``b = b̃``.
    """
    n = int(param_prob.x.size)
    reduced = param_prob.reduced_A
    reduced.cache(keep_zeros=True)
    q = sp.csr_array(param_prob.q)
    c_map = sp.csr_array(q[:n] @ S)
    offset_map = sp.csr_array(q[n:n + 1] @ S)
    if reduced.problem_data_index is None:
        m = 0
        indices = np.zeros(0, dtype=np.int32)
        indptr = np.zeros(n + 1, dtype=np.int32)
        empty = sp.csr_array((0, S.shape[1]))
        return ConeProgram(n, 0, cone_dict, indices, indptr, c_map, empty, empty, offset_map)

    aug_indices, aug_indptr, (m, n_aug) = reduced.problem_data_index
    assert n_aug == n + 1, "augmented constraint matrix has one column for b"
    values_map = sp.csr_array(reduced.reduced_mat) @ S
    # Canonical CSC order (sorted rows within each column): diffcp returns dA
    # in that order, so the value map must be in it too.
    perm = _canonical_order(aug_indices, aug_indptr, (m, n_aug))
    aug_indices = np.asarray(aug_indices)[perm]
    values_map = sp.csr_array(values_map[perm])

    nnz_A = int(aug_indptr[n])
    indices = np.ascontiguousarray(aug_indices[:nnz_A], dtype=np.int32)
    indptr = np.ascontiguousarray(aug_indptr[: n + 1], dtype=np.int32)
    A_map = sp.csr_array(-values_map[:nnz_A])
    b_rows = aug_indices[nnz_A:]
    scatter = sp.csr_array(
        (np.ones(b_rows.size), (b_rows, np.arange(b_rows.size))), shape=(m, b_rows.size)
    )
    b_map = sp.csr_array(scatter @ values_map[nnz_A:])
    return ConeProgram(n, int(m), cone_dict, indices, indptr, c_map, A_map, b_map, offset_map)


def leading_rows(cone: ConeProgram, count: int) -> ConeProgram:
    """The cone program restricted to its first ``count`` rows (e.g. the zero cone's)."""
    keep = cone.indices < count
    indptr = np.concatenate([[0], np.cumsum(
        [keep[cone.indptr[j]:cone.indptr[j + 1]].sum() for j in range(cone.n)])]).astype(np.int32)
    return ConeProgram(cone.n, count, {"z": count}, cone.indices[keep].astype(np.int32), indptr,
                       cone.c_map, sp.csr_array(cone.A_map[np.flatnonzero(keep)]),
                       sp.csr_array(cone.b_map[:count]), cone.offset_map)


def _canonical_order(indices, indptr, shape) -> np.ndarray:
    """Permutation that sorts the row indices within each CSC column."""
    labels = np.arange(1, len(indices) + 1, dtype=np.float64)
    M = sp.csc_matrix((labels, np.asarray(indices), np.asarray(indptr)), shape=shape)
    M.has_sorted_indices = False
    M.sort_indices()
    return (M.data - 1).astype(np.int64)


def cone_dict_from_dims(dims) -> ConeDict:
    """SCS cone dictionary from CVXPY's `ConeDims`."""
    from cvxpy.reductions.solvers.conic_solvers.scs_conif import dims_to_solver_dict

    return dims_to_solver_dict(dims)
