"""Constant sparse linear maps applied to a batch in plain torch (autograd, any device).

A map is y = x Mᵀ for x (B, in_size), with M given by COO triplets (rows,
cols, vals). It is stored as tensors only, so an exported module can hold it
as buffers. Most maps the compiler produces are selections (each output reads
one input, often with coefficient 1, often a contiguous block): those run as a
slice or a gather; the rest as gather-multiply-scatter (index_add).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def coo_arrays(matrix) -> dict:
    """(rows, cols, vals) and layout metadata of a scipy matrix, for `LinearMap`."""
    M = sp.coo_array(sp.csr_array(matrix))
    M.sum_duplicates()
    rows = M.row.astype(np.int64)
    cols = M.col.astype(np.int64)
    vals = M.data.astype(np.float64)
    meta = {"shape": [int(M.shape[0]), int(M.shape[1])], "select": None, "unit": False}
    order = np.argsort(rows, kind="stable")
    rows, cols, vals = rows[order], cols[order], vals[order]
    if M.shape[0] and M.nnz == M.shape[0] and np.array_equal(rows, np.arange(M.shape[0])):
        meta["unit"] = bool(np.all(vals == 1.0))
        contiguous = np.array_equal(cols, cols[0] + np.arange(M.shape[0]))
        meta["select"] = int(cols[0]) if contiguous else -1
    return {"rows": rows, "cols": cols, "vals": vals}, meta


class LinearMap:
    """Apply a COO map held as tensors; see the module docstring."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, meta: dict):
        self.rows, self.cols, self.vals = rows, cols, vals
        self.out_size, self.in_size = meta["shape"]
        self.select = meta["select"]  # None: general; -1: gather; k ≥ 0: slice from k
        self.unit = meta["unit"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.select is not None:
            if self.select >= 0:
                out = x.narrow(-1, self.select, self.out_size)
            else:
                out = x.index_select(-1, self.cols.to(x.device))
            if not self.unit:
                out = out * self.vals.to(dtype=x.dtype, device=x.device)
            return out
        contrib = x.index_select(-1, self.cols.to(x.device)) * self.vals.to(
            dtype=x.dtype, device=x.device)
        out = torch.zeros(x.shape[:-1] + (self.out_size,), dtype=x.dtype, device=x.device)
        return out.index_add(-1, self.rows.to(x.device), contrib)

    def constant(self, dtype, device) -> torch.Tensor:
        """The map at θ = e_last (the constant 1): the block's value when it is fixed."""
        e = torch.zeros(1, self.in_size, dtype=dtype, device=device)
        e[0, -1] = 1.0
        return self(e)[0]
