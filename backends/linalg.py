"""Batched dense linear algebra shared by the torch backends (Cholesky-based only:
torch's batched LU is unreliable on CPU at the sizes we use, see NOTES.md)."""

from __future__ import annotations

import torch


def cholesky(M: torch.Tensor, shift: float = 1e-12, tries: int = 6):
    """Batched Cholesky with a per-sample diagonal-shift fallback.

    A sample whose factorization fails is retried with ``shift`` times its
    largest diagonal entry added to the diagonal, the shift growing 100-fold
    per try. Returns (L, shifted) where ``shifted`` marks those samples.
    """
    L, info = torch.linalg.cholesky_ex(M)
    bad = info != 0
    if not bool(bad.any()):
        return L, bad
    scale = M.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    shifted = bad.clone()
    for _ in range(tries):
        if M.dim() == 2:
            L, info = torch.linalg.cholesky_ex(M + (shift * scale) * eye)
            bad = info != 0
        else:
            idx = bad.nonzero().squeeze(-1)
            trial = M[idx] + (shift * scale[idx])[:, None, None] * eye
            L2, info2 = torch.linalg.cholesky_ex(trial)
            L = L.index_copy(0, idx, L2)
            bad = bad.index_copy(0, idx, info2 != 0)
        if not bool(bad.any()):
            break
        shift *= 100.0
    return L, shifted


def chol_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(LLᵀ)⁻¹ r for batched vectors r (B, k); L (k, k) or (B, k, k).

    Two triangular solves: faster than torch.cholesky_solve for one right-hand side.
    """
    if L.dim() == 2:
        y = torch.linalg.solve_triangular(L, r.T, upper=False)
        return torch.linalg.solve_triangular(L.T, y, upper=True).T
    y = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1)


def forward_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """L⁻¹ r for batched vectors r (B, k)."""
    if L.dim() == 2:
        return torch.linalg.solve_triangular(L, r.T, upper=False).T
    return torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)


def backward_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """L⁻ᵀ r for batched vectors r (B, k)."""
    if L.dim() == 2:
        return torch.linalg.solve_triangular(L.T, r.T, upper=True).T
    return torch.linalg.solve_triangular(L.mT, r.unsqueeze(-1), upper=True).squeeze(-1)
