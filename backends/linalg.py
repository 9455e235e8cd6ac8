"""Batched dense linear algebra shared by the torch backends (Cholesky-based only:
torch's batched LU is unreliable on CPU at the sizes we use, see NOTES.md)."""

from __future__ import annotations

import torch

# CPU batched Cholesky: LAPACK's potrf runs matrix by matrix at ~6 GFLOP/s on
# 100×100 blocks; a blocked factorization whose updates are batched matrix
# products is faster on large batches of such matrices, mostly with 2 threads
# (measured, 128 matrices of 100×100 in float64: 4.1 ms blocked with 25-column
# panels vs 6.8 ms with 2 threads; 6.3 vs 7.6 ms with 1). On small batches its
# dozen extra kernel launches cost more than they save (16 matrices of 96×96:
# 0.83 ms blocked vs 0.73 ms), hence the batch threshold.
BLOCKED_MIN_SIZE = 64
BLOCKED_MIN_BATCH = 64
BLOCK = 25


def _factor(M: torch.Tensor, out: torch.Tensor | None):
    """(L, ok) for a batch of matrices; ``ok`` is False where M is not positive definite."""
    n = M.shape[-1]
    if (M.dim() == 3 and M.device.type == "cpu" and n >= BLOCKED_MIN_SIZE
            and M.shape[0] >= BLOCKED_MIN_BATCH):
        return _blocked(M, out)
    if out is not None:
        info = torch.empty(M.shape[:-2], dtype=torch.int32, device=M.device)
        L, info = torch.linalg.cholesky_ex(M, out=(out, info))
    else:
        L, info = torch.linalg.cholesky_ex(M)
    return L, info == 0


def _blocked(M: torch.Tensor, out: torch.Tensor | None):
    n = M.shape[-1]
    L = out if out is not None else torch.empty_like(M)
    L.zero_()
    ok = torch.ones(M.shape[0], dtype=torch.bool, device=M.device)
    for j in range(0, n, BLOCK):
        e = min(j + BLOCK, n)
        left = L[:, j:e, :j]
        S = M[:, j:e, j:e] - left @ left.mT if j else M[:, j:e, j:e]
        Ljj, info = torch.linalg.cholesky_ex(S)
        ok &= info == 0
        L[:, j:e, j:e] = Ljj
        if e < n:
            R = M[:, e:, j:e] - L[:, e:, :j] @ left.mT if j else M[:, e:, j:e]
            L[:, e:, j:e] = torch.linalg.solve_triangular(Ljj, R.mT, upper=False).mT
    return L, ok


def cholesky(M: torch.Tensor, shift: float = 1e-12, tries: int = 6,
             out: torch.Tensor | None = None):
    """Batched Cholesky with a per-sample diagonal-shift fallback.

    A sample whose factorization fails is retried with ``shift`` times its
    largest diagonal entry added to the diagonal, the shift growing 100-fold
    per try. Returns (L, shifted) where ``shifted`` marks those samples. ``out``
    is an optional preallocated result (reused across interior-point iterations).
    """
    if torch.is_grad_enabled() and M.requires_grad:
        return _cholesky_differentiable(M, shift, tries)
    L, ok = _factor(M, out)
    bad = ~ok
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
            L2, ok2 = _factor(trial, None)
            L = L.index_copy(0, idx, L2)
            bad = bad.index_copy(0, idx, ~ok2)
        if not bool(bad.any()):
            break
        shift *= 100.0
    return L, shifted


def chol_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(LLᵀ)⁻¹ r for batched vectors r (B, k); L (k, k) or (B, k, k).

    Two triangular solves: faster than torch.cholesky_solve for one right-hand side.
    A shared L solves the rows of r from the right (yᵀ = rᵀL⁻ᵀ, then zᵀ = yᵀL⁻¹):
    no transposes of r, and at batch 1 half the time of the batched form.
    """
    if L.dim() == 2:
        y = torch.linalg.solve_triangular(L.T, r, upper=True, left=False)
        return torch.linalg.solve_triangular(L, y, upper=False, left=False)
    y = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1)


def _cholesky_differentiable(M: torch.Tensor, shift: float, tries: int):
    """The fallback for autograd (unrolled backward): find each sample's shift
    without the graph, then factor once with it, so no failed factorization (whose
    backward is NaN) ever enters the graph."""
    with torch.no_grad():
        _, info = torch.linalg.cholesky_ex(M)
        bad = info != 0
        scale = M.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
        amount = torch.zeros_like(scale)
        s = shift
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        for _ in range(tries):
            if not bool(bad.any()):
                break
            amount = torch.where(bad, s * scale, amount)
            _, info = torch.linalg.cholesky_ex(M + amount[..., None, None] * eye)
            bad = info != 0
            s *= 100.0
    shifted = amount > 0
    if bool(shifted.any()):
        M = M + amount[..., None, None] * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    L, _ = torch.linalg.cholesky_ex(M)
    return L, shifted


def forward_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """L⁻¹ r for batched vectors r (B, k)."""
    if L.dim() == 2:  # rows from the right: yᵀ = rᵀ L⁻ᵀ
        return torch.linalg.solve_triangular(L.T, r, upper=True, left=False)
    return torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)


def backward_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """L⁻ᵀ r for batched vectors r (B, k)."""
    if L.dim() == 2:  # rows from the right: zᵀ = rᵀ L⁻¹
        return torch.linalg.solve_triangular(L, r, upper=False, left=False)
    return torch.linalg.solve_triangular(L.mT, r.unsqueeze(-1), upper=True).squeeze(-1)
