"""The scaling H of the Newton system at an interior (s, z): Δs + H Δz = −d_s.

Symmetric cones use Nesterov–Todd scaling W (symmetric, W z = W⁻¹ s = λ, H = W²):

    orthant          W = diag(√(s/z))
    second-order     W = η (−J + v vᵀ/(1 + w₀)),   W⁻¹ = η⁻¹ (−J + Jv (Jv)ᵀ/(1 + w₀)),
                     H = η² (2 w wᵀ − J),          v = w + e,
                     w = (s̄ + J z̄) / (2γ), s̄ = s/√det s, z̄ = z/√det z,
                     γ = √((1 + s̄ᵀz̄)/2), η = (det s / det z)^¼, J = diag(1, −1, …, −1)

(Nesterov & Todd 1997; as written in CVXOPT's and ECOS's documentation).
Exponential cones use a 3×3 positive definite H per cone (`exp`). The normal
equations need a factor R with H⁻¹ = RᵀR per block: W⁻¹ on the symmetric
cones (symmetric), Lᵀ from H⁻¹ = LLᵀ on exponential cones, and 1/√δ on the
zero cone's rows, where H = 0 is regularized to δ.

Layout: the zero cone's and the orthant's rows are diagonal (vectors (B, q0));
the second-order rows keep one dense block-diagonal (B, q, q) matrix and the
exponential rows (B, ne, 3, 3) blocks (`BlockOp`), so that every product with
them is one batched matrix product (the sizes users put in layers keep q small).
Vectors are (B, m) or (B, m, r) (r right-hand sides).
"""

from __future__ import annotations

import torch

from .cones import Cones


def _cols(t):
    return t.unsqueeze(-1) if t.dim() == 2 else t


class BlockOp:
    """A block-diagonal operator on the cone rows (second-order, then exponential):
    one dense (B, q, q) matrix for the second-order rows (None: zero) and 3×3
    blocks (B, ne, 3, 3) for the exponential rows (None: zero). Applied to
    (B, k, r) vectors or (k, n) / (B, k, n) matrices; returns (B, k, ·)."""

    def __init__(self, soc, exp, q: int, ne: int):
        self.soc, self.exp, self.q, self.ne = soc, exp, q, ne

    @property
    def mT(self):
        return BlockOp(None if self.soc is None else self.soc.mT,
                       None if self.exp is None else self.exp.mT, self.q, self.ne)

    def __call__(self, v, batch: int):
        q, parts = self.q, []
        if q:
            vs = v[..., :q, :]
            parts.append(torch.matmul(self.soc, vs) if self.soc is not None else
                         vs.new_zeros((batch,) + tuple(vs.shape[-2:])))
        if self.ne:
            ve = v[..., q:, :]
            if self.exp is None:
                parts.append(ve.new_zeros((batch,) + tuple(ve.shape[-2:])))
            else:
                ve4 = ve.reshape(tuple(ve.shape[:-2]) + (self.ne, 3, ve.shape[-1]))
                parts.append(torch.matmul(self.exp, ve4).reshape(batch, 3 * self.ne, -1))
        parts = [t.expand(batch, -1, -1) if t.dim() == 2 else t for t in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -2)


class RowScaling:
    """Products with an operator that is diagonal on the orthant rows and
    block-diagonal (`BlockOp`) on the cone rows. Subclasses set ``cones``,
    ``k`` (the cone rows' count), ``r_diag`` and ``R`` (H_δ⁻¹ = RᵀR)."""

    def _apply(self, diag, M, v):
        v3 = _cols(v)
        q0 = self.cones.q0
        out = v3[:, :q0] * diag.unsqueeze(-1)
        if self.k:
            out = torch.cat([out, M(v3[:, q0:], v3.shape[0])], 1)
        return out if v.dim() == 3 else out.squeeze(-1)

    def wi(self, v, transpose: bool = False):
        """R v (Rᵀ v) on all rows: H_δ⁻¹ = RᵀR."""
        return self._apply(self.r_diag, self.R.mT if transpose else self.R, v)

    def wi_rows(self, M):
        """R M for a matrix M (m, n) or (B, m, n), each column a vector: (B, m, n)."""
        q0 = self.cones.q0
        top = M[..., :q0, :] * self.r_diag.unsqueeze(-1)
        if not self.k:
            return top
        return torch.cat([top, self.R(M[..., q0:, :], top.shape[0])], 1)


class Metric(RowScaling):
    """H at one iterate (per sample), with the products the Newton solve needs."""

    def __init__(self, cones: Cones, s, z, zero_reg: float):
        self.cones = cones
        q0 = cones.q0
        w_lp = (cones.lp(s) / cones.lp(z)).sqrt()
        root = torch.full_like(s[:, :cones.l0], zero_reg ** -0.5)
        # Diagonal rows: W (orthant; 0 on the zero cone), R = W⁻¹ (1/√δ on the zero
        # cone), H = W² (0 on the zero cone).
        self.w_diag = torch.cat([torch.zeros_like(root), w_lp], 1)
        self.r_diag = torch.cat([root, 1.0 / w_lp], 1)
        self.h_diag = self.w_diag * self.w_diag
        self.k = cones.m - q0
        self.exp = None
        q, ne = cones.e0 - q0, cones.ne
        W = R = H = None
        if q:
            W, R, H = self._nt_soc(cones.soc(s), cones.soc(z))
        Re = He = None
        if ne:
            from .exp import ExpScaling

            self.exp = ExpScaling(cones.exp(s), cones.exp(z))
            Re, He = self.exp.R, self.exp.H
        self.W = BlockOp(W, None, q, ne)
        self.R = BlockOp(R, Re, q, ne)
        self.H = BlockOp(H, He, q, ne)

    def _nt_soc(self, s, z):
        c = self.cones
        det_s = c.soc_det(s).clamp_min(1e-300)
        det_z = c.soc_det(z).clamp_min(1e-300)
        sn = s / c.spread(det_s.sqrt())
        zn = z / c.spread(det_z.sqrt())
        gamma = ((1 + c.seg_sum(sn * zn)).clamp_min(1e-300) / 2).sqrt()
        head = c.soc_head_mask
        w = (sn + torch.where(head, zn, -zn)) / c.spread(2 * gamma)
        eta = (det_s / det_z) ** 0.25
        w0 = c.head(w)
        v = torch.where(head, w + 1, w)
        jv = torch.where(head, v, -v)
        mask = c.soc_block_mask.to(s.dtype)
        mj = 1.0 - 2.0 * head.to(s.dtype)  # −J
        eta_r, w0_r = c.spread(eta), c.spread(w0)
        a = v * (eta_r / (1 + w0_r)).sqrt()
        ai = jv * (1 / (eta_r * (1 + w0_r))).sqrt()
        hb = w * (2 ** 0.5 * eta_r)

        def outer(u):
            return mask * u.unsqueeze(-1) * u.unsqueeze(-2)

        return (torch.diag_embed(mj * eta_r) + outer(a), torch.diag_embed(mj / eta_r) + outer(ai),
                torch.diag_embed(mj * eta_r * eta_r) + outer(hb))

    def w(self, v, inverse: bool = False):
        """W v (W⁻¹ v) on the symmetric cones' rows (the exponential rows' value is
        meaningless and the Jordan products that use it ignore them)."""
        return self._apply(self.r_diag if inverse else self.w_diag,
                           self.R if inverse else self.W, v)

    def lam(self, z):
        """λ = W z (symmetric rows)."""
        return self.w(z)

    def h(self, v):
        """H v with the zero cone's H = 0 (the unregularized system)."""
        return self._apply(self.h_diag, self.H, v)
