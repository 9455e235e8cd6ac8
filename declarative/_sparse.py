"""A constant sparse linear map applied to a batch, differentiable in its input.

The compiled maps (θ -> problem data, solution -> outputs) are scipy CSR
matrices. On the CPU scipy's sparse product is far faster than torch's sparse
CSR product (whose thread start-up dominates at these sizes); on CUDA a torch
sparse copy of the matrix is made once per device and dtype.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class SparseMap:
    """y = x Mᵀ for x (B, cols); its adjoint g -> g M.

    Most maps are selections (each row reads one column, often with coefficient
    1, often a contiguous block); those run as a slice or an index gather in
    torch, with autograd's own backward, and skip the sparse product.
    """

    def __init__(self, matrix: sp.csr_array):
        self.matrix = sp.csr_array(matrix)
        self.matrix.sum_duplicates()
        self.matrix_T = sp.csr_array(self.matrix.T)
        self._device_copies: dict = {}
        self._selection = _as_selection(self.matrix)

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._selection is not None:
            start, index, scale = self._selection
            if start is not None:
                out = x.narrow(-1, start, self.shape[0])
            else:
                out = x.index_select(-1, index.to(x.device))
            if scale is not None:
                out = out * torch.as_tensor(scale, dtype=x.dtype, device=x.device)
            return out
        return _Apply.apply(x, self)

    def dense_constant(self, dtype, device) -> torch.Tensor:
        """The map applied to θ = e_last (the constant column): M[:, -1]."""
        col = self.matrix[:, [self.matrix.shape[1] - 1]].toarray().ravel()
        return torch.as_tensor(col, dtype=dtype, device=device)

    def _torch(self, which: str, dtype, device) -> torch.Tensor:
        key = (which, dtype, device)
        t = self._device_copies.get(key)
        if t is None:
            M = (self.matrix if which == "fwd" else self.matrix_T).tocsr()
            t = torch.sparse_csr_tensor(
                torch.as_tensor(M.indptr, dtype=torch.int64),
                torch.as_tensor(M.indices, dtype=torch.int64),
                torch.as_tensor(M.data, dtype=dtype), size=M.shape).to(device)
            self._device_copies[key] = t
        return t

    def apply(self, x: torch.Tensor, which: str = "fwd") -> torch.Tensor:
        M = self.matrix if which == "fwd" else self.matrix_T
        if x.device.type == "cpu":
            out = M @ x.detach().numpy().T
            return torch.from_numpy(np.ascontiguousarray(np.asarray(out).T)).to(x.dtype)
        Mt = self._torch(which, x.dtype, x.device)
        return (Mt @ x.T).T


def _as_selection(M: sp.csr_array):
    """(start, index, scale) when every row of M has one entry; else None.

    ``start`` is set when the columns are consecutive; ``scale`` is None when
    every coefficient is 1.
    """
    rows, cols = M.shape
    if rows == 0 or M.nnz != rows or not np.all(np.diff(M.indptr) == 1):
        return None
    index = M.indices.astype(np.int64)
    scale = None if np.all(M.data == 1.0) else M.data.copy()
    start = int(index[0]) if np.array_equal(index, index[0] + np.arange(rows)) else None
    return start, torch.as_tensor(index), scale


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, smap: SparseMap):
        ctx.smap = smap
        return smap.apply(x, "fwd")

    @staticmethod
    def backward(ctx, g):
        # Linear map: its adjoint is again a SparseMap application, so double
        # backward works too.
        return _ApplyT.apply(g, ctx.smap), None


class _ApplyT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, smap: SparseMap):
        ctx.smap = smap
        return smap.apply(g, "adj")

    @staticmethod
    def backward(ctx, h):
        return _Apply.apply(h, ctx.smap), None
