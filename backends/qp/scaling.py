"""Equilibration of QP data: the interior point runs on a problem with unit-sized rows.

For a sample ``minimize ½zᵀQz + qᵀz  s.t.  Gz ≤ h, Az = b`` we choose positive
diagonal scalings D (variables), E (rows of G), F (rows of A) and a cost scale
c > 0, and solve the equivalent problem in ẑ = D⁻¹z:

    Q̂ = c·DQD,   q̂ = c·Dq,   Ĝ = EGD,   ĥ = Eh,   Â = FAD,   b̂ = Fb.

Its solution maps back as z = Dẑ, s = E⁻¹ŝ, λ = Eλ̂/c, ν = Fν̂/c. The KKT
matrix M = [[Q, Gᵀ, Aᵀ], [G, −W, 0], [A, 0, 0]] transforms by a congruence,
M̂ = P M P with P = diag(√c·D, E/√c, F/√c), so an adjoint solve a = M⁻¹g is
a = P M̂⁻¹ (P g): the backward runs in the well-scaled space too.

D, E, F come from Ruiz's iteration on the KKT matrix (each row and column is
divided by the square root of its ∞-norm until all are near 1; Ruiz 2001,
"A scaling algorithm to equilibrate both rows and columns norms in matrices"),
the cost scale from the mean column norm of Q̂ (or ‖q̂‖∞ for an LP), as OSQP
does (Stellato et al. 2020). Multiplying rows of G or A, or the objective, by
any positive factor then leaves the interior point's iterates unchanged up to
round-off, so neither its stopping test nor its step rules see the user's units.

Every scaling is computed per sample from that sample's own data, or once from
data the whole batch shares; never from the batch as a whole, so a sample's
result does not depend on its batch-mates. To keep a shared Q shared (the
Schur elimination factors it once per call), D and c are then computed from the
shared blocks only; E and F still follow each sample's own G and A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import QPData

# Ruiz sweeps: each brings every row and column norm to within a square root of
# 1 of the previous one; 10 sweeps leave them within ~1e-3 of 1 on the OptNet
# and CVXPY-form problems of the test suite, beyond which nothing changes.
RUIZ_SWEEPS = 10
# Bounds of each sweep's factor (OSQP's): a zero row or column is left alone,
# and no single sweep rescales by more than 1e4.
SWEEP_CLAMP = (1e-4, 1e4)
# Bounds of the cost scale c.
COST_CLAMP = (1e-6, 1e6)


@dataclass
class Scaling:
    """D (n), E (p), F (m) and c (1), each shared (1-D) or per sample (2-D)."""

    D: torch.Tensor
    E: torch.Tensor
    F: torch.Tensor
    c: torch.Tensor
    # Q = 0 (an LP) stays the shared zero matrix whatever D is.
    q_zero: bool = False

    # ---- data --------------------------------------------------------------
    def apply(self, data: QPData) -> QPData:
        """The scaled problem (Q̂, q̂, Ĝ, ĥ, Â, b̂); shared blocks stay shared where possible."""
        D, E, F, c = self.D, self.E, self.F, self.c
        Q = data.Q if self.q_zero else _outer(D, D, data.Q) * _col(c, data.Q.dim())
        q = data.q * D * c
        G = _outer(E, D, data.G)
        A = _outer(F, D, data.A)
        h = data.h * E
        b = data.b * F
        batch = data.batch
        return QPData(Q, q, G, h, A, b, batch)

    # ---- solutions ---------------------------------------------------------
    def solution(self, x, s, lam, nu):
        """Scaled (ẑ, ŝ, λ̂, ν̂) -> original (z, s, λ, ν)."""
        return x * self.D, s / self.E, lam * self.E / self.c, nu * self.F / self.c

    def scaled_point(self, z, s, lam, nu):
        """Original (z, s, λ, ν) -> scaled: a warm start enters the scaled space."""
        return z / self.D, s * self.E, lam * self.c / self.E, nu * self.c / self.F

    # ---- the congruence P of the KKT matrix ----------------------------------
    def congruence(self, gz, gl, gn):
        """P·(g_z, g_λ, g_ν) with P = diag(√c·D, E/√c, F/√c) (its own transpose)."""
        root = self.c.sqrt()
        return gz * self.D * root, gl * self.E / root, gn * self.F / root


def _col(c: torch.Tensor, dim: int) -> torch.Tensor:
    """c shaped to multiply a matrix: () or (1, 1) shared, (B, 1, 1) per sample."""
    return c.reshape(-1, 1, 1) if c.dim() == 2 else c.reshape(1, 1) if dim == 2 else c


def _outer(row: torch.Tensor, col: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """diag(row) M diag(col); the result is batched when any of the three is."""
    return M * row.unsqueeze(-1) * col.unsqueeze(-2)


def _inf_cols(M: torch.Tensor) -> torch.Tensor:
    """∞-norm of each column: (k, n) -> (n,), (B, k, n) -> (B, n)."""
    if M.shape[-2] == 0:
        return torch.zeros(M.shape[:-2] + M.shape[-1:], dtype=M.dtype, device=M.device)
    return M.abs().amax(-2)


def _inf_rows(M: torch.Tensor) -> torch.Tensor:
    if M.shape[-1] == 0:
        return torch.zeros(M.shape[:-1], dtype=M.dtype, device=M.device)
    return M.abs().amax(-1)


def _factor(norm: torch.Tensor) -> torch.Tensor:
    """One sweep's factor 1/√norm, with zero rows/columns left alone."""
    f = torch.where(norm > 0, norm.rsqrt(), torch.ones_like(norm))
    return f.clamp(*SWEEP_CLAMP)


def equilibrate(data: QPData, sweeps: int = RUIZ_SWEEPS) -> Scaling:
    """Ruiz scaling of the KKT matrix, then the cost scale; see the module docstring."""
    Q, G, A = data.Q, data.G, data.A
    dtype, device, B = Q.dtype, Q.device, data.batch
    q_zero = Q.dim() == 2 and not bool(Q.any())
    # D is shared when Q must stay shared (a nonzero shared Q), or when all blocks are;
    # it is then computed from the shared blocks only.
    d_shared = (Q.dim() == 2 and not q_zero) or Q.dim() == G.dim() == A.dim() == 2
    use_q = not q_zero
    use_g = G.dim() == 2 or not d_shared
    use_a = A.dim() == 2 or not d_shared

    def ones(size, shared):
        return torch.ones(size if shared else (B, size), dtype=dtype, device=device)

    D = ones(data.n, d_shared)
    E = ones(data.p, d_shared and G.dim() == 2)
    F = ones(data.m, d_shared and A.dim() == 2)
    # Bring Q to unit size first, so that the sweeps balance Q against G and A the
    # same way whatever the objective's scale (Q·1e6 would otherwise shrink D
    # 1000-fold and leave the constraints' rows ~30 times too long).
    c0 = _cost_scale(data, D, q_zero)
    Q = Q if q_zero else Q * _col(c0, Q.dim())
    for _ in range(sweeps):
        norms = []
        if use_q:
            norms.append(_inf_cols(_outer(D, D, Q)))
        if use_g:
            norms.append(_inf_cols(_outer(E, D, G)))
        if use_a:
            norms.append(_inf_cols(_outer(F, D, A)))
        norm = norms[0]
        for other in norms[1:]:
            norm = torch.maximum(norm, other)
        D = D * _factor(norm)
        E = E * _factor(_inf_rows(_outer(E, D, G)))
        F = F * _factor(_inf_rows(_outer(F, D, A)))
    scaled = QPData(Q, data.q * c0, G, data.h, A, data.b, B)
    return Scaling(D, E, F, c0 * _cost_scale(scaled, D, q_zero), q_zero)


def _cost_scale(data: QPData, D: torch.Tensor, q_zero: bool) -> torch.Tensor:
    """c = 1 / (mean column norm of DQD), or 1/‖Dq‖∞ for an LP; shared with a shared Q."""
    if not q_zero:
        size = _inf_cols(data.Q * D.unsqueeze(-1) * D.unsqueeze(-2)).mean(-1)
    else:
        size = (data.q * D).abs().amax(-1) if data.n else torch.ones(
            data.q.shape[:-1], dtype=D.dtype, device=D.device)
    c = torch.where(size > 0, 1.0 / size, torch.ones_like(size)).clamp(*COST_CLAMP)
    if c.dim() == 0:
        return c.reshape(1)
    return c.unsqueeze(-1)  # (B, 1): per sample
