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

# Ruiz sweeps (2-norms): each takes every row and column norm of the KKT matrix
# to the square root of what it was; after the rows of G and A are normalized
# exactly, two leave them within a factor ~1.5 of 1 on the OptNet and CVXPY-form
# problems of the tests, which is all the interior point needs.
RUIZ_SWEEPS = 2
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
    def apply(self, data: QPData, Q: torch.Tensor | None = None) -> QPData:
        """The scaled problem (Q̂, q̂, Ĝ, ĥ, Â, b̂); shared blocks stay shared where possible.
        ``Q``: `apply_Q` of ``data`` if already computed."""
        D, E, F, c = self.D, self.E, self.F, self.c
        Q = self.apply_Q(data) if Q is None else Q
        q = data.q * D * c
        G = _outer(E, D, data.G)
        A = _outer(F, D, data.A)
        h = data.h * E
        b = data.b * F
        batch = data.batch
        return QPData(Q, q, G, h, A, b, batch)

    def apply_Q(self, data: QPData) -> torch.Tensor:
        """Q̂ = c·DQD alone (what the choice of elimination looks at)."""
        if self.q_zero:
            return data.Q
        root = self.D * self.c.sqrt()  # c·DQD = diag(√c D) Q diag(√c D)
        return _outer(root, root, data.Q)

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
    """diag(row) M diag(col); the result is batched when any of the three is (one new
    tensor: the second scaling runs in place)."""
    out = M * row.unsqueeze(-1)
    col = col.unsqueeze(-2)
    if _fits(out.shape, col.shape):
        return out.mul_(col)
    return out * col


def _fits(shape, other) -> bool:
    """Broadcasting ``other`` against ``shape`` leaves ``shape`` as it is (what
    torch.broadcast_shapes(shape, other) == shape says, without its ~50 µs)."""
    return len(other) <= len(shape) and all(
        o == 1 or o == s for s, o in zip(reversed(shape), reversed(other)))


def _norm_factor(squared: torch.Tensor) -> torch.Tensor:
    """1/√‖·‖ from squared 2-norms (one Ruiz step), zero rows/columns left alone."""
    f = torch.where(squared > 0, squared.clamp_min(1e-300) ** -0.25, torch.ones_like(squared))
    return f.clamp(*SWEEP_CLAMP)


def _vm(y: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """yᵀM per sample: y (k,) or (B, k), M (k, n) or (B, k, n)."""
    if M.dim() == 2:
        return y @ M
    if y.dim() == 1:
        y = y.unsqueeze(0).expand(M.shape[0], -1)
    return torch.bmm(y.unsqueeze(-2), M).squeeze(-2)


def _mv(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mx per sample: M (k, n) or (B, k, n), x (n,) or (B, n)."""
    if M.dim() == 2:
        return x @ M.T
    if x.dim() == 1:
        x = x.unsqueeze(0).expand(M.shape[0], -1)
    return torch.bmm(M, x.unsqueeze(-1)).squeeze(-1)


def rows_and_cost(data: QPData):
    """The start every scaling shares: (q_zero, E, F, c0), rows of G and A to unit
    norm and c0 the cost scale that brings Q (or q) to unit size (with D = 1)."""
    Q, G, A = data.Q, data.G, data.A
    q_zero = Q.dim() == 2 and not bool(Q.any())
    # Rows of G and A to unit norm first: a row scaling of the data is undone exactly.
    E = _norm_factor(torch.linalg.vector_norm(G, dim=-1) ** 2) ** 2
    F = _norm_factor(torch.linalg.vector_norm(A, dim=-1) ** 2) ** 2
    # Q to unit size, so that the sweeps balance it against G and A whatever the
    # objective's scale (Q·1e6 would otherwise shrink D 1000-fold).
    c0 = _cost_scale(Q.diagonal(dim1=-2, dim2=-1), data.q, q_zero, None)
    return q_zero, E, F, c0


def equilibrate(data: QPData, columns: bool = True, sweeps: int = RUIZ_SWEEPS,
                start=None) -> Scaling:
    """Row and cost scaling, then (``columns``) Ruiz sweeps for D; see the module doc.

    Without ``columns`` D = 1: the Schur elimination's change of variables w = Lᵀẑ
    absorbs any column scaling exactly (L̂ = √c·D·L, so Ĝ L̂⁻ᵀ = E G L⁻ᵀ/√c), so
    only the rows and the cost matter there, and they cost one pass over G.
    Every norm in a sweep is a matrix-vector product with the squared entries
    (formed once): a sweep reads each matrix two or three times. ``start``:
    `rows_and_cost` of ``data`` if already computed (both scalings share it).
    """
    Q, G, A = data.Q, data.G, data.A
    q_zero, E, F, c0 = start if start is not None else rows_and_cost(data)
    # D is shared when Q must stay shared (a nonzero shared Q), or when all blocks are;
    # it is then computed from the shared blocks only.
    d_shared = (not columns or (Q.dim() == 2 and not q_zero)
                or Q.dim() == G.dim() == A.dim() == 2)
    D = torch.ones(data.n if d_shared else (data.batch, data.n), dtype=Q.dtype,
                   device=Q.device)
    if columns:
        D, E, F = _ruiz(data, q_zero, d_shared, c0, D, E, F, sweeps)
    # The cost scale of the problem scaled so far (diag(c0·Q) = c0·diag(Q) exactly).
    diag = None if q_zero else Q.diagonal(dim1=-2, dim2=-1) * (
        c0.reshape(-1, 1) if c0.dim() == 2 else c0)
    c = _cost_scale(diag, data.q * c0, q_zero, D)
    return Scaling(D, E, F, c0 * c, q_zero)


def _ruiz(data: QPData, q_zero: bool, d_shared: bool, c0, D, E, F, sweeps: int):
    """Ruiz sweeps on the KKT matrix [[c0·Q, Gᵀ, Aᵀ], [G], [A]] (2-norms)."""
    Q, G, A = data.Q, data.G, data.A
    use_g = G.dim() == 2 or not d_shared
    use_a = A.dim() == 2 or not d_shared
    G2, A2 = G * G, A * A
    Q2 = None if q_zero else (Q * Q).mul_(_col(c0, Q.dim()) ** 2)
    for _ in range(sweeps):
        D2 = D * D
        col = D2 * _vm(D2, Q2) if Q2 is not None else torch.zeros_like(D)
        if use_g:
            col = col + D2 * _vm(E * E, G2)
        if use_a:
            col = col + D2 * _vm(F * F, A2)
        D = D * _norm_factor(col)
        D2 = D * D
        E = E * _norm_factor(E * E * _mv(G2, D2))
        F = F * _norm_factor(F * F * _mv(A2, D2))
    return D, E, F


def _cost_scale(Q_diag, q, q_zero: bool, D: torch.Tensor | None) -> torch.Tensor:
    """c = 1 / (mean diagonal of DQD), or 1/‖Dq‖∞ for an LP; shared with a shared Q.
    ``Q_diag``: the diagonal of Q; D None: D = 1.

    The diagonal bounds every entry of a semidefinite Q (|Qᵢⱼ| ≤ √(QᵢᵢQⱼⱼ)), so its
    mean is Q's size at the cost of reading n entries.
    """
    if not q_zero:
        size = (Q_diag if D is None else Q_diag * D * D).abs().mean(-1)
    else:
        size = (q if D is None else q * D).abs().amax(-1) if q.shape[-1] else torch.ones(
            q.shape[:-1], dtype=q.dtype, device=q.device)
    c = torch.where(size > 0, 1.0 / size, torch.ones_like(size)).clamp(*COST_CLAMP)
    if c.dim() == 0:
        return c.reshape(1)
    return c.unsqueeze(-1)  # (B, 1): per sample
