"""Equilibration of cone-program data: the interior point sees unit-sized rows and columns.

For one sample `min cᵀx s.t. Ax + s = b, s ∈ K` we choose positive diagonal
D (columns), E (rows) and scalars σ_b, σ_c, and solve the equivalent program

    Â = E A D,   b̂ = σ_b E b,   ĉ = σ_c D c,

whose solution maps back as x = D x̂ / σ_b, s = E⁻¹ ŝ / σ_b, y = E ŷ / σ_c.
E must keep K unchanged: it is constant on each second-order and exponential
cone's rows (a cone scaled by a positive number is itself), free on the
orthant's and the zero cone's rows.

D and E come from Ruiz's iteration on [[0, Aᵀ], [A, 0]] (∞-norms; Ruiz 2001),
each sweep's factor within `SWEEP_CLAMP` as Clarabel and OSQP bound theirs;
σ_b, σ_c bring b̂ and ĉ to unit size. A shared A gets one shared D and E (and
Â stays shared), a batched A one per sample; σ_b, σ_c are per sample. The
backward works in the scaled space with these held fixed (the solution map
does not depend on them), `function`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cones import Cones

# Bounds of one Ruiz sweep's factor, and of the total scaling of b and c.
SWEEP_CLAMP = (1e-4, 1e4)
VECTOR_CLAMP = (1e-6, 1e6)


@dataclass
class Equilibration:
    D: torch.Tensor  # (n,) or (B, n)
    E: torch.Tensor  # (m,) or (B, m)
    sb: torch.Tensor  # (B, 1)
    sc: torch.Tensor  # (B, 1)

    def apply(self, A, b, c):
        A = self.E.unsqueeze(-1) * A * self.D.unsqueeze(-2)
        return A, self.sb * self.E * b, self.sc * self.D * c

    def solution(self, x, y, s):
        """Scaled (x̂, ŷ, ŝ) -> the user's (x, y, s)."""
        return x * self.D / self.sb, y * self.E / self.sc, s / (self.E * self.sb)

    def scaled(self, x, y, s):
        """The user's (x, y, s) -> scaled (a warm start)."""
        return x * self.sb / self.D, y * self.sc / self.E, s * self.E * self.sb

    def cotangent(self, gx, gy, gs):
        """Gradients with respect to (x, y, s) -> with respect to (x̂, ŷ, ŝ)."""
        return gx * self.D / self.sb, gy * self.E / self.sc, gs / (self.E * self.sb)


def _factor(norm):
    f = torch.where(norm > 0, norm.clamp_min(1e-300).rsqrt(), torch.ones_like(norm))
    return f.clamp(*SWEEP_CLAMP)


def _block_max(cones: Cones, rows):
    """Row norms (B, m) made constant on each cone block (their maximum)."""
    parts = [rows[:, :cones.q0]]
    if cones.nq:
        soc = cones.soc(rows)
        top = soc.new_zeros((soc.shape[0], cones.nq)).scatter_reduce(
            1, cones.soc_id.expand_as(soc), soc, "amax", include_self=False)
        parts.append(cones.spread(top))
    if cones.ne:
        exp = cones.exp(rows).reshape(rows.shape[0], cones.ne, 3).amax(-1, keepdim=True)
        parts.append(exp.expand(-1, -1, 3).reshape(rows.shape[0], -1))
    return torch.cat(parts, 1)


def equilibrate(A, b, c, cones: Cones, sweeps: int) -> Equilibration:
    """Ruiz sweeps for D, E (shared with a shared A), then σ_b and σ_c per sample."""
    A3 = A if A.dim() == 3 else A.unsqueeze(0)
    absA = A3.abs()
    D = torch.ones(A3.shape[0], A3.shape[2], dtype=A.dtype, device=A.device)
    E = torch.ones(A3.shape[0], A3.shape[1], dtype=A.dtype, device=A.device)
    for _ in range(sweeps):
        M = absA * E.unsqueeze(-1) * D.unsqueeze(-2)
        col = M.amax(-2) if M.shape[-2] else torch.zeros_like(D)
        row = M.amax(-1) if M.shape[-1] else torch.zeros_like(E)
        D = D * _factor(col)
        E = E * _factor(_block_max(cones, row))
    if A.dim() == 2:
        D, E = D[0], E[0]
    sb = _vector_scale(E * b)
    sc = _vector_scale(D * c)
    return Equilibration(D, E, sb, sc)


def _vector_scale(v):
    size = v.abs().amax(-1, keepdim=True) if v.shape[-1] else v.new_ones(v.shape[:-1] + (1,))
    return torch.where(size > 0, 1.0 / size.clamp_min(1e-300), 1.0).clamp(*VECTOR_CLAMP)
