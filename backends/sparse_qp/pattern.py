"""The sparsity shared by a batch of QPs, and the KKT structure built from it once.

Problem, for each sample of a batch (values differ, positions do not):

    minimize ½ zᵀQz + qᵀz   subject to   Gz ≤ h  (p rows),   Az = b  (m rows)

Q (n×n), G (p×n) and A (m×n) are given by the positions of their stored
entries (CSC or CSR index arrays) and, per sample, the values in that order:
arrays (B, nnz) or (nnz,) shared by the batch. This is how CVXPY's
parameter-affine data arrive (values = an affine map of θ). A position may
appear twice (the values add up). ``Q_part`` says how Q's entries are read:

    "full"    Q as given; ½zᵀQz only sees its symmetric part ½(Q + Qᵀ)
    "upper"   the upper triangle of a symmetric Q (CVXPY's, OSQP's and
              Clarabel's convention): an entry (i, j), i < j, stands for both
              Q_ij and Q_ji

The Newton matrix of the interior point and the backward's limit system share
one pattern, the upper triangle of the quasi-definite KKT matrix in the
variable order (z, ν, λ), N = n + m + p:

    [ Q + δI   Aᵀ    Gᵀ      ]
    [ A       −δI    0       ]
    [ G        0    −W − δI  ]

(inactive rows of the limit system are identity rows with their G entries
zeroed, still inside the pattern). Its assembly from the value arrays is a
fixed sparse matrix (`KKTLayout`), built once per pattern and cached on it
with the symbolic analysis (`SparsePattern.symbolic`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

Q_PARTS = ("full", "upper")
FORMATS = ("csc", "csr")


def _index_array(name: str, value, length: int | None = None) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape} and "
                         f"dtype {arr.dtype}.")
    if length is not None and arr.size != length:
        raise ValueError(f"{name} must have {length} entries, got {arr.size}.")
    return arr.astype(np.int64)


def _coordinates(name: str, arrays, shape: tuple[int, int], fmt: str):
    """(rows, cols) of each stored entry, in the order of the block's value array."""
    if not isinstance(arrays, (tuple, list)) or len(arrays) != 2:
        raise ValueError(f"pattern {name} must be (indptr, indices) index arrays, got "
                         f"{type(arrays).__name__}.")
    outer = shape[1] if fmt == "csc" else shape[0]
    inner = shape[0] if fmt == "csc" else shape[1]
    indptr = _index_array(f"{name} indptr", arrays[0], outer + 1)
    indices = _index_array(f"{name} indices", arrays[1])
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.size:
        raise ValueError(f"{name} indptr must start at 0, never decrease and end at the "
                         f"number of indices ({indices.size}); got {indptr[:3]}...{indptr[-1:]}")
    if indices.size and (indices.min() < 0 or indices.max() >= inner):
        raise ValueError(f"{name} indices must lie in [0, {inner}) for a {shape[0]}×{shape[1]} "
                         f"matrix, got the range [{indices.min()}, {indices.max()}].")
    major = np.repeat(np.arange(outer), np.diff(indptr))
    return (indices, major) if fmt == "csc" else (major, indices)


@dataclass(frozen=True, eq=False)
class SparsePattern:
    """Positions of the stored entries of Q, G and A (see the module docstring).

    ``Q``, ``G``, ``A``: (indptr, indices) in ``format`` ("csc" or "csr"); the
    value arrays follow that order. Build one with `SparsePattern.from_matrices`
    from scipy matrices. Reuse it across calls: its KKT layout and symbolic
    analysis are computed once and cached on it.
    """

    n: int
    p: int
    m: int
    Q: tuple
    G: tuple
    A: tuple
    Q_part: str = "full"
    format: str = "csc"

    def __post_init__(self):
        for name in ("n", "p", "m"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"pattern {name} must be a non-negative integer, got {v!r}.")
        if self.n < 1:
            raise ValueError(f"pattern n must be at least 1, got {self.n}.")
        if self.Q_part not in Q_PARTS:
            raise ValueError(f"Q_part must be one of {Q_PARTS}, got {self.Q_part!r}.")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}.")
        coords = {
            "Q": _coordinates("Q", self.Q, (self.n, self.n), self.format),
            "G": _coordinates("G", self.G, (self.p, self.n), self.format),
            "A": _coordinates("A", self.A, (self.m, self.n), self.format),
        }
        rows, cols = coords["Q"]
        if self.Q_part == "upper" and np.any(rows > cols):
            k = int(np.flatnonzero(rows > cols)[0])
            raise ValueError(f"Q_part='upper' needs entries on or above the diagonal; entry {k} "
                             f"is at ({rows[k]}, {cols[k]}). Pass Q_part='full' for a whole Q.")
        object.__setattr__(self, "_coords", coords)

    # ---- entry coordinates -------------------------------------------------
    def rows(self, block: str) -> np.ndarray:
        return self._coords[block][0]

    def cols(self, block: str) -> np.ndarray:
        return self._coords[block][1]

    def nnz(self, block: str) -> int:
        return int(self._coords[block][0].size)

    @classmethod
    def from_matrices(cls, Q, G, A, Q_part: str = "full"):
        """(pattern, (Q_vals, G_vals, A_vals)) from scipy sparse (or dense) matrices.

        Shapes: Q (n, n), G (p, n), A (m, n); the values come back as float64
        arrays in CSC order. Explicitly stored zeros stay in the pattern (a
        parameter's entry that happens to be 0 now is still a position).
        """
        mats = [sp.csc_array(M) for M in (Q, G, A)]
        n = mats[0].shape[1]
        for name, M, rows in (("Q", mats[0], n), ("G", mats[1], None), ("A", mats[2], None)):
            if M.shape[1] != n or (rows is not None and M.shape[0] != rows):
                raise ValueError(f"{name} has shape {M.shape}; expected ({rows or 'rows'}, {n}).")
        pattern = cls(n, mats[1].shape[0], mats[2].shape[0],
                      *[(M.indptr, M.indices) for M in mats], Q_part=Q_part, format="csc")
        return pattern, tuple(np.asarray(M.data, dtype=np.float64) for M in mats)

    # ---- cached structure ---------------------------------------------------
    @functools.cached_property
    def layout(self) -> KKTLayout:
        return KKTLayout(self)

    def symbolic(self) -> dict:
        """Sizes for a cost model: the KKT dimension and entries, and the LDLᵀ factor's
        entries and flops (Σ over columns of (count + 1)², with the AMD ordering the
        factorization uses). Computed once per pattern and cached: qdldl has no
        symbolic-only entry point, so this is one factorization of a matrix with
        this pattern (as long as one of the interior point's iterations)."""
        return self.layout.symbolic


def _assembly(slots: np.ndarray, weights: np.ndarray, nnz_kkt: int, size: int) -> sp.csr_array:
    """The (nnz_kkt × size) matrix that adds entry k's value times weights[k] into slot[k]."""
    return sp.csr_array((weights, (slots, np.arange(size))), shape=(nnz_kkt, size))


class Compressed:
    """A CSR structure for entries at (rows, cols) (duplicates summed) and the
    assembly ``S`` (stored × given entries) with which data = S @ values."""

    def __init__(self, rows, cols, shape, weights=None, source=None, size=None):
        size = rows.size if size is None else size
        source = np.arange(rows.size) if source is None else source
        weights = np.ones(rows.size) if weights is None else weights
        M = sp.csr_array((np.ones(rows.size), (rows, cols)), shape=shape)
        M.sum_duplicates()
        M.sort_indices()
        self.shape = shape
        self.indptr, self.indices = M.indptr, M.indices
        self.rows = np.repeat(np.arange(shape[0]), np.diff(M.indptr)).astype(np.int64)
        self.cols = M.indices.astype(np.int64)
        flat = self.rows * shape[1] + self.cols
        slot = np.searchsorted(flat, rows * shape[1] + cols)
        self.S = sp.csr_array((weights, (slot, source)), shape=(flat.size, size))


class KKTLayout:
    """The upper-triangular CSC pattern of the KKT matrix and its assembly maps.

    K's stored values are ``S_Q @ Q_vals + S_A @ A_vals + S_G @ G_vals`` plus
    the diagonal terms; ``diag_x``, ``diag_nu``, ``diag_lam`` are the positions
    of the three diagonal blocks in K's data array. ``Qsym``: the pattern of the
    symmetric Q (both triangles, CSR) with its own assembly ``S_sym``, for the
    products Qz and the scaling.
    """

    def __init__(self, pattern: SparsePattern):
        n, p, m = pattern.n, pattern.p, pattern.m
        self.n, self.p, self.m, self.N = n, p, m, n + m + p
        qr, qc = pattern.rows("Q"), pattern.cols("Q")
        half = pattern.Q_part == "full"
        # Q's contributions to the upper triangle (a "full" Q's (i, j) and (j, i) both
        # land on (min, max) with weight ½: the symmetric part).
        q_w = np.where((qr != qc) & half, 0.5, 1.0)
        ar, ac = pattern.rows("A"), pattern.cols("A")
        gr, gc = pattern.rows("G"), pattern.cols("G")
        ids = np.arange(self.N)
        rows = np.concatenate([np.minimum(qr, qc), ac, gc, ids])
        cols = np.concatenate([np.maximum(qr, qc), n + ar, n + m + gr, ids])
        K = sp.csc_array((np.ones(rows.size), (rows, cols)), shape=(self.N, self.N))
        K.sum_duplicates()
        K.sort_indices()
        self.indptr, self.indices = K.indptr.astype(np.int64), K.indices.astype(np.int64)
        self.nnz = int(self.indices.size)
        slot = self._slots(rows, cols)
        kq, ka, kg = qr.size, ar.size, gr.size
        self.S_Q = _assembly(slot[:kq], q_w, self.nnz, kq)
        self.S_A = _assembly(slot[kq:kq + ka], np.ones(ka), self.nnz, ka)
        self.S_G = _assembly(slot[kq + ka:kq + ka + kg], np.ones(kg), self.nnz, kg)
        diag = slot[kq + ka + kg:]
        self.diag_x, self.diag_nu, self.diag_lam = diag[:n], diag[n:n + m], diag[n + m:]
        self._symmetric_q(pattern, qr, qc, half)

    def _slots(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Position in K's data array of each (row, col) of the upper triangle."""
        # Within a column the indices are sorted: a search in that column's range.
        starts = self.indptr[cols]
        key = cols * self.N + rows
        flat = np.repeat(np.arange(self.N), np.diff(self.indptr)) * self.N + self.indices
        slot = np.searchsorted(flat, key)
        assert np.all(flat[slot] == key) and np.all(slot >= starts)
        return slot

    def _symmetric_q(self, pattern, qr, qc, half):
        off = qr != qc
        rows = np.concatenate([qr, qc[off]])
        cols = np.concatenate([qc, qr[off]])
        w = np.concatenate([np.where(off & half, 0.5, 1.0), np.full(int(off.sum()),
                                                                    0.5 if half else 1.0)])
        src = np.concatenate([np.arange(qr.size), np.flatnonzero(off)])
        self.Qsym = Compressed(rows, cols, (self.n, self.n), weights=w, source=src,
                               size=qr.size)
        self.S_sym = self.Qsym.S
        # Its transpose, stored: (B, k) values map to the symmetric entries as values @ S_symᵀ.
        self.S_sym_T = sp.csr_array(self.S_sym.T)
        self.Qsym_rows, self.Qsym_cols = self.Qsym.rows, self.Qsym.cols
        self.Gc = Compressed(pattern.rows("G"), pattern.cols("G"), (self.p, self.n))
        self.Ac = Compressed(pattern.rows("A"), pattern.cols("A"), (self.m, self.n))

    def upper(self, data: np.ndarray):
        """K's upper triangle with stored values ``data`` (shares the array). A
        csc_matrix, not a csc_array: qdldl converts anything else on every call."""
        return sp.csc_matrix((data, self.indices, self.indptr), shape=(self.N, self.N))

    @functools.cached_property
    def symbolic(self) -> dict:
        import qdldl

        # A quasi-definite matrix with this pattern (zero off-diagonal values stay
        # stored): the factor's structure depends on the pattern alone.
        data = np.zeros(self.nnz)
        data[self.diag_x] = 1.0
        data[self.diag_nu] = -1.0
        data[self.diag_lam] = -1.0
        L = qdldl.Solver(self.upper(data), upper=True).factors()[0]
        counts = np.diff(L.indptr).astype(np.float64)
        return {"kkt_dim": self.N, "kkt_nnz": self.nnz, "factor_nnz": int(L.nnz),
                "factor_flops": float(np.sum((counts + 1) ** 2))}
