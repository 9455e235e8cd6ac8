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
    M = sp.coo_array(matrix, copy=True)  # not through CSR: rows may number n²
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
        # (dtype, device) -> (stamp, rows, cols, vals there, the constant or None): a
        # call converts nothing and a fixed block is built once (see `_on`).
        self._cache: dict = {}

    def _on(self, dtype, device) -> list:
        """The map's tensors on ``device`` (vals in ``dtype``), converted once. The
        entry is rebuilt when the map's own tensors change (in place: their version
        counters; or swapped: their storage), e.g. by loading a state dict."""
        stamp = tuple((t._version, t.data_ptr()) for t in (self.rows, self.cols, self.vals))
        entry = self._cache.get((dtype, device))
        if entry is None or entry[0] != stamp:
            entry = [stamp, self.rows.to(device), self.cols.to(device),
                     self.vals.to(dtype=dtype, device=device), None]
            self._cache[(dtype, device)] = entry
        return entry

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.select is not None and self.select >= 0 and self.unit:
            return x.narrow(-1, self.select, self.out_size)
        _, rows, cols, vals, _ = self._on(x.dtype, x.device)
        if self.select is not None:
            out = x.narrow(-1, self.select, self.out_size) if self.select >= 0 \
                else x.index_select(-1, cols)
            return out if self.unit else out * vals
        contrib = x.index_select(-1, cols) * vals
        out = torch.zeros(x.shape[:-1] + (self.out_size,), dtype=x.dtype, device=x.device)
        return out.index_add(-1, rows, contrib)

    def constant(self, dtype, device) -> torch.Tensor:
        """The map at θ = e_last (the constant 1): the block's value when it is fixed.
        Computed once per dtype and device (callers never write into it)."""
        entry = self._on(dtype, device)
        if entry[4] is None:
            e = torch.zeros(1, self.in_size, dtype=dtype, device=device)
            e[0, -1] = 1.0
            entry[4] = self(e)[0]
        return entry[4]

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}
