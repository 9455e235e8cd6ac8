"""Batched QP data with shared (unbatched) blocks kept unexpanded.

Problem, for each sample b of a batch of B:

    minimize    ½ zᵀQz + qᵀz
    subject to  Gz ≤ h   (p rows),   Az = b   (m rows)

Shapes: Q (n, n) or (B, n, n); q (n,) or (B, n); G (p, n) or (B, p, n);
h (p,) or (B, p); A (m, n) or (B, m, n); b (m,) or (B, m). A block without a
batch dimension is shared by every sample and is never copied B times:
products with it are single matrix products over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def mv(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M x for each sample: M (k, n) or (B, k, n), x (B, n) -> (B, k)."""
    if M.dim() == 2:
        return x @ M.T
    # Row-vector form: on CPU, (B,1,n)@(B,n,k) runs ~4x faster than (B,k,n)@(B,n,1).
    return torch.bmm(x.unsqueeze(-2), M.mT).squeeze(-2)


def mv_rows(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M xᵢ for k vectors per sample: M (r, n) or (B, r, n), X (B, k, n) -> (B, k, r)."""
    if M.dim() == 2:
        return X @ M.T
    return torch.bmm(X, M.mT)


def rmv(M: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mᵀ y for each sample: M (k, n) or (B, k, n), y (B, k) -> (B, n)."""
    if M.dim() == 2:
        return y @ M
    return torch.bmm(y.unsqueeze(-2), M).squeeze(-2)


def take(t: torch.Tensor, batched: bool, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` of a batched tensor; a shared tensor is returned as is."""
    if not batched or idx is None:
        return t
    return t.index_select(0, idx)


@dataclass
class QPData:
    Q: torch.Tensor
    q: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    batch: int

    @property
    def n(self) -> int:
        return self.Q.shape[-1]

    @property
    def p(self) -> int:
        return self.G.shape[-2]

    @property
    def m(self) -> int:
        return self.A.shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.Q.dtype

    @property
    def device(self) -> torch.device:
        return self.Q.device

    def batched(self, name: str) -> bool:
        t = getattr(self, name)
        return t.dim() == (3 if name in ("Q", "G", "A") else 2)

    def subset(self, idx: torch.Tensor | None) -> QPData:
        """The samples ``idx`` (shared blocks stay shared)."""
        if idx is None:
            return self
        return QPData(*(take(getattr(self, k), self.batched(k), idx)
                        for k in ("Q", "q", "G", "h", "A", "b")), batch=int(idx.numel()))

    def squeezed(self) -> QPData:
        """A batch of one with its matrices as shared (2-D) blocks: the same problem,
        and each product with them one plain matrix product instead of a batched
        one with its reshapes (at batch 1 the interior point's cost is the count
        of tensor operations, not their flops)."""
        if self.batch != 1:
            return self
        Q, G, A = (t[0] if t.dim() == 3 else t for t in (self.Q, self.G, self.A))
        return QPData(Q, self.q, G, self.h, A, self.b, batch=1)

    def to(self, dtype: torch.dtype) -> QPData:
        return QPData(*(getattr(self, k).to(dtype) for k in ("Q", "q", "G", "h", "A", "b")),
                      batch=self.batch)

    def expand_vector(self, name: str) -> torch.Tensor:
        t = getattr(self, name)
        return t if self.batched(name) else t.unsqueeze(0).expand(self.batch, -1)
