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
    """y = x Mᵀ for x (B, cols); its adjoint g -> g M."""

    def __init__(self, matrix: sp.csr_array):
        self.matrix = sp.csr_array(matrix)
        self.matrix_T = sp.csr_array(self.matrix.T)
        self._device_copies: dict = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
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
