"""The Newton system of the interior point, by normal equations and Cholesky.

The step (and the backward, `function`) solves

    K [x; z] = [r₁; r₂],    K = [[0, Aᵀ], [A, −H]]

with H the block-diagonal scaling at the iterate (`metric`; H = 0 on the
zero cone's rows). It is solved through the regularized system
K_δ = [[δI, Aᵀ], [A, −(H + δE₀)]] (E₀: the zero cone's rows), whose normal
equations are positive definite:

    (δI + AᵀH_δ⁻¹A) x = r₁ + AᵀH_δ⁻¹ r₂,     z = H_δ⁻¹(Ax − r₂),

formed as RᵀR with R = H_δ^{-½}-factor · A (a Gram matrix, PSD by
construction), then iterative refinement on the unregularized K removes the
regularization (as Clarabel does with its quasidefinite LDLᵀ). Only batched
Cholesky is used: batched LU is unreliable on CPUs past ~150×150 (NOTES.md).

Shapes: A (m, n) shared or (B, m, n); right-hand sides (B, n, k), (B, m, k).
"""

from __future__ import annotations

import torch

from .metric import Metric


def mv(A, X):
    """A X per sample: A (m, n) or (B, m, n), X (B, n, k) -> (B, m, k)."""
    if A.dim() == 2:
        B, n, k = X.shape
        return (A @ X.transpose(0, 1).reshape(n, B * k)).reshape(-1, B, k).transpose(0, 1)
    return torch.bmm(A, X)


def rmv(A, Z):
    """Aᵀ Z per sample: (B, m, k) -> (B, n, k)."""
    if A.dim() == 2:
        B, m, k = Z.shape
        return (A.T @ Z.transpose(0, 1).reshape(m, B * k)).reshape(-1, B, k).transpose(0, 1)
    return torch.bmm(A.mT, Z)


class NormalKKT:
    """K at one iterate, factored once; `solve` applies K⁻¹ (refined)."""

    def __init__(self, A, metric: Metric, static_reg: float, tries: int):
        self.A, self.metric = A, metric
        R = metric.wi_rows(A)
        self.R = R
        N = R.mT @ R
        B = N.shape[0]
        # δ absolute (the equilibrated problem has unit-sized data), then ×100 per
        # failed try: a product of huge and tiny weights can lose definiteness to
        # rounding near the end of a solve.
        reg = torch.full((B,), static_reg, dtype=N.dtype, device=N.device)
        diag = N.diagonal(dim1=-2, dim2=-1)
        diag += static_reg
        L, info = torch.linalg.cholesky_ex(N)
        for _ in range(tries):
            bad = info != 0
            if not bool(bad.any()):
                break
            diag[bad] += (99 * reg[bad]).unsqueeze(-1)
            reg = torch.where(bad, reg * 100, reg)
            L2, info2 = torch.linalg.cholesky_ex(N[bad])
            L[bad], info[bad] = L2, info2
        self.L, self.failed = L, info != 0
        self.delta = reg.view(B, 1, 1)

    def solve_regularized(self, r1, r2):
        t = self.metric.wi(r2)
        x = torch.cholesky_solve(r1 + self.R.mT @ t, self.L)
        z = self.metric.wi(self.R @ x - t, transpose=True)
        return x, z

    def apply(self, x, z):
        """K [x; z] (unregularized)."""
        return rmv(self.A, z), mv(self.A, x) - self.metric.h(z)

    def solve(self, r1, r2, steps: int):
        """K⁻¹ [r₁; r₂] with ``steps`` refinement steps; r (B, n, k), (B, m, k)."""
        x, z = self.solve_regularized(r1, r2)
        for _ in range(steps):
            k1, k2 = self.apply(x, z)
            dx, dz = self.solve_regularized(r1 - k1, r2 - k2)
            x, z = x + dx, z + dz
        return x, z
