"""The sparse QP route: CVXPY's quadratic form, one sparse LDLᵀ per sample.

The same QP form as the dense route (`routes.qp`), kept sparse: the positions
of Q, G and A's structural nonzeros (those some parameter value can reach) are
read off the form's maps once, and each call maps θ to the values at those
positions only. `backends.sparse_qp` factors each sample's KKT matrix
(qdldl), so the cost follows the factor's fill, not n: CVXPY's auxiliary
variables and banded constraints (differences, dynamics) cost little here,
where the dense engine pays n³. No presolve: the factorization absorbs the
variables the presolve would substitute.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ..backends.sparse_qp import SparsePattern, SparseQPSettings, sparse_qp_solve
from .base import Route, add_map
from .qp import BLOCKS, qp_settings

MATRICES = ("Q", "G", "A")


def _positions(M, shape):
    """(csr indptr, indices, rows of M) of the entries a block's map can reach."""
    M = sp.coo_array(M)  # COO: the map's rows are the block's n² entries for Q
    entries = np.unique(M.row)  # row-major flattened positions
    rows, cols = np.divmod(entries, shape[1])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
    return indptr.astype(np.int64), cols.astype(np.int64), entries


def _rows_of(M, entries) -> sp.coo_array:
    """The rows ``entries`` (sorted, each stored in M) of M, renumbered 0, 1, ..."""
    M = sp.coo_array(M)
    return sp.coo_array((M.data, (np.searchsorted(entries, M.row), M.col)),
                        shape=(entries.size, M.shape[1]))


class SparseQPRoute(Route):
    kind = "sparse_qp"
    form = "qp"
    batched_torch = False

    @classmethod
    def _compile(cls, form, layout, arrays, meta):
        program = form.program
        meta.update(n=program.n, p=program.p, m=program.m,
                    batched={k: bool(program.batched[k]) for k in BLOCKS})
        for k in BLOCKS:
            M = program.maps[k]
            if k in MATRICES:
                indptr, indices, entries = _positions(M, program.shape(k))
                arrays[f"{k}.indptr"], arrays[f"{k}.indices"] = indptr, indices
                M = _rows_of(M, entries)
            add_map(arrays, meta, k, M)

    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.maps = {k: self.map(k) for k in BLOCKS}
        positions = {k: tuple(tensors[f"{k}.{a}"].cpu().numpy() for a in ("indptr", "indices"))
                     for k in MATRICES}
        self.pattern = SparsePattern(meta["n"], meta["p"], meta["m"], **positions,
                                     Q_part="full", format="csr")

    def settings(self, layer_args, call_args=None, solver=None):
        return SparseQPSettings.from_qp(qp_settings(layer_args, call_args))

    def cost(self):
        """Work: the LDLᵀ factor's flops; size: the KKT matrix's and the factor's
        entries (from one factorization of the pattern, done once)."""
        sizes = self.pattern.symbolic()
        return self.kind, float(sizes["factor_flops"]), float(sizes["kkt_nnz"]
                                                              + sizes["factor_nnz"])

    def warm_shapes(self):
        n, p, m = self.meta["n"], self.meta["p"], self.meta["m"]
        return {"z": n, "lam": p, "s": p, "nu": m}

    def values(self, theta: torch.Tensor):
        """Q, q, G, h, A, b as value arrays: (B, k) where θ reaches them, else (k,)."""
        return [self.maps[k](theta) if self.meta["batched"][k]
                else self.maps[k].constant(theta.dtype, theta.device) for k in BLOCKS]

    def solve(self, theta, settings, warm):
        (x, lam, nu), result = sparse_qp_solve(self.pattern, *self.values(theta),
                                               settings=settings, warm=warm)
        y = torch.cat([nu, lam], dim=-1)  # CVXPY's row order: zero cone, then nonneg
        return self.read(x, y), result
