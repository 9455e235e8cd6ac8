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
the second-order and exponential rows ("cone rows", k of them) keep dense
block-diagonal (B, k, k) matrices W, R and H, so that every product with them
is one batched matrix product (the sizes users put in layers keep k small).
Vectors are (B, m) or (B, m, r) (r right-hand sides).
"""

from __future__ import annotations

import torch

from .cones import Cones


def _cols(t):
    return t.unsqueeze(-1) if t.dim() == 2 else t


class Metric:
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
        if self.k:
            B, k = s.shape[0], self.k
            self.W = s.new_zeros(B, k, k)
            self.R = s.new_zeros(B, k, k)
            self.H = s.new_zeros(B, k, k)
            if cones.nq:
                self._nt_soc(cones.soc(s), cones.soc(z))
            if cones.ne:
                from .exp import ExpScaling

                self.exp = ExpScaling(cones.exp(s), cones.exp(z))
                e = cones.e0 - q0
                self.exp.place(self.R[:, e:, e:], self.H[:, e:, e:])

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
        q = s.shape[1]
        def outer(u):
            return mask * u.unsqueeze(-1) * u.unsqueeze(-2)

        self.W[:, :q, :q] = torch.diag_embed(mj * eta_r) + outer(a)
        self.R[:, :q, :q] = torch.diag_embed(mj / eta_r) + outer(ai)
        self.H[:, :q, :q] = torch.diag_embed(mj * eta_r * eta_r) + outer(hb)

    def _apply(self, diag, M, v):
        v3 = _cols(v)
        q0 = self.cones.q0
        out = v3[:, :q0] * diag.unsqueeze(-1)
        if self.k:
            out = torch.cat([out, torch.bmm(M, v3[:, q0:])], 1)
        return out if v.dim() == 3 else out.squeeze(-1)

    def w(self, v, inverse: bool = False):
        """W v (W⁻¹ v) on the symmetric cones' rows (the exponential rows' value is
        meaningless and the Jordan products that use it ignore them)."""
        return self._apply(self.r_diag if inverse else self.w_diag,
                           (self.R if inverse else self.W) if self.k else None, v)

    def lam(self, z):
        """λ = W z (symmetric rows)."""
        return self.w(z)

    def wi(self, v, transpose: bool = False):
        """R v (Rᵀ v) on all rows: H_δ⁻¹ = RᵀR."""
        return self._apply(self.r_diag, self.R.mT if transpose and self.k else
                           (self.R if self.k else None), v)

    def wi_rows(self, M):
        """R M for a matrix M (m, n) or (B, m, n), each column a vector: (B, m, n)."""
        q0 = self.cones.q0
        top = M[..., :q0, :] * self.r_diag.unsqueeze(-1)
        if not self.k:
            return top
        bottom = torch.matmul(self.R, M[..., q0:, :])
        return torch.cat([top, bottom], 1)

    def h(self, v):
        """H v with the zero cone's H = 0 (the unregularized system)."""
        return self._apply(self.h_diag, self.H if self.k else None, v)
