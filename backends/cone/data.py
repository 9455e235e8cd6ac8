"""Batched dense (A, b, c) from a parameter-affine cone program (`declarative.canon.cone`).

A `ConeProgram` gives c = Cθ, vals(A) = Mθ, b = Nθ with C, M, N sparse and A's
CSC pattern (``indices``, ``indptr``); θ is (B, len θ) with its trailing
constant 1. `ProgramData` turns θ into the engine's dense inputs, differentiably
(sparse × dense products, so autograd carries gradients back to θ):

    A (m, n) when A does not depend on the parameters (then shared by the whole
    batch: one equilibration and one matrix product per step), else (B, m, n);
    b (B, m); c (B, n).
"""

from __future__ import annotations

import numpy as np
import torch


def _sparse(mat, dtype, device):
    coo = mat.tocoo()
    index = torch.tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
    return torch.sparse_coo_tensor(index, torch.tensor(coo.data), coo.shape,
                                   check_invariants=False).coalesce().to(
        dtype=dtype, device=device)


class ProgramData:
    """θ -> (A, b, c) for one `ConeProgram` (maps built once per dtype and device)."""

    def __init__(self, program):
        self.program = program
        self.n, self.m = int(program.n), int(program.m)
        self.cone_dict = program.cone_dict
        cols = np.repeat(np.arange(self.n), np.diff(program.indptr))
        self.flat = torch.tensor(program.indices * self.n + cols, dtype=torch.long)
        A_map = program.A_map.tocsc()
        # A is constant when only θ's trailing 1 (the offset column) reaches it.
        self.constant_A = A_map[:, :-1].nnz == 0
        self._cache = {}

    def _maps(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._cache:
            p = self.program
            self._cache[key] = tuple(_sparse(M, dtype, device) for M in (p.A_map, p.b_map,
                                                                          p.c_map))
        return self._cache[key]

    def __call__(self, theta: torch.Tensor):
        """θ (B, len θ) -> A, b, c (see the module doc)."""
        A_map, b_map, c_map = self._maps(theta.dtype, theta.device)
        tT = theta.T
        b = torch.sparse.mm(b_map, tT).T
        c = torch.sparse.mm(c_map, tT).T
        flat = self.flat.to(theta.device)
        if self.constant_A:
            vals = torch.sparse.mm(A_map, tT[:, :1]).T[0]
            A = theta.new_zeros(self.m * self.n).index_put((flat,), vals)
            return A.view(self.m, self.n), b, c
        vals = torch.sparse.mm(A_map, tT).T
        A = theta.new_zeros(theta.shape[0], self.m * self.n)
        A = A.index_put((torch.arange(theta.shape[0], device=theta.device).unsqueeze(-1),
                         flat.unsqueeze(0)), vals)
        return A.view(-1, self.m, self.n), b, c
