"""The backward's system: the optimality conditions linearized at the solution.

At a solution (x, y, s) the conditions Aᵀy + c = 0, Ax + s = b and the cone
complementarity s = Π_K(−v), y = Π_K*(v) with v = y − s (Moreau) linearize to

    E1  Aᵀdy = p₁,    E2  A dx + ds = p₂,    E3  (I − D) dy + D ds = 0,

with D = DΠ_K*(v), the derivative of the projection (symmetric, 0 ⪯ D ⪯ I;
cf. Agrawal et al. 2019, "Differentiating through a cone program"; Ali et al.
2017 for the second-order cone's). Per block, from (y, s):

    zero cone        D = 1 (s = 0, y free)
    orthant row      D = 1 if y > s (active), 0 if s > y (inactive)
    second-order     v = (t, u): D = I if ‖u‖ ≤ t, 0 if ‖u‖ ≤ −t, else eigenvalues
                     1 on (1, û), 0 on (1, −û), ½(1 + t/‖u‖) on {(0, p): p ⊥ û}
    exponential      D = (I + H)⁻¹ with the interior point's final H (`exp`)

This is the limit of the interior point's Newton system ((I + H)⁻¹ → D as
μ → 0 on the central path) without its O(μ) error and without its off-path
error: the NT scaling's middle eigenvalue η² equals s₀/y₀ only on the central
path, and it is the cone's curvature term. At a degenerate point (a weakly
active row, v = 0) the rule picks one element of the generalized derivative
(the B-subdifferential's), so the gradient stays finite.

Solve. The adjoint system Jᵀw = ḡ is solved by iterative refinement,
preconditioned by the same system with D's eigenvalues clipped to [δ, 1 − δ]:
there D = (I + H_δ)⁻¹ with H_δ finite and positive definite, and its adjoint
reduces to K_δ = [[0, Aᵀ], [A, −H_δ]] (`kkt`, normal equations, Cholesky):

    K_δ [w₁; u] = [ḡ_x − Aᵀḡ_s; ḡ_y],   w₂ = ḡ_s + u,   w₃ = ḡ_y − A w₁ − u.

The gradients are ∇c = −w₁, ∇b = w₂, ∇A = −(y w₁ᵀ + w₂ xᵀ) (`function`).
"""

from __future__ import annotations

import torch

from .cones import Cones
from .kkt import NormalKKT, mv, rmv
from .metric import BlockOp, RowScaling

# The refined adjoint is accepted where its residual is at most this (relative);
# elsewhere J is singular with an inconsistent right-hand side.
REFINED = 1e-9
# Singular values below this (relative to the largest) count as zero in the
# fallback's pseudo-inverse.
PINV_RTOL = 1e-10


class LimitMetric(RowScaling):
    """H_δ of the clipped limit system in `metric.Metric`'s interface (R, with
    H_δ⁻¹ = RᵀR), plus D itself for the refinement's residuals."""

    def __init__(self, cones: Cones, y, s, delta: float):
        self.cones = cones
        q0 = cones.q0
        d_lp = (cones.lp(y) > cones.lp(s)).to(y.dtype)
        self.d_diag = torch.cat([torch.ones_like(y[:, :cones.l0]), d_lp], 1)
        clipped = self.d_diag.clamp(delta, 1 - delta)
        self.r_diag = (clipped / (1 - clipped)).sqrt()
        self.v_diag = 1 / (1 - clipped)
        self.k = cones.m - q0
        q, ne = cones.e0 - q0, cones.ne
        soc = self._soc(cones.soc(y), cones.soc(s), delta) if q else (None,) * 3
        exp = self._exp(y, s, delta) if ne else (None,) * 3
        self.D, self.R, self.V = (BlockOp(a, b, q, ne) for a, b in zip(soc, exp))

    def _soc(self, y, s, delta):
        c = self.cones
        v = y - s
        t = c.head(v)
        norm_u = (c.seg_sum(v * v) - t * t).clamp_min(0).sqrt()
        inside, polar = norm_u <= t, norm_u <= -t
        mid = 0.5 * (1 + t / norm_u.clamp_min(1e-300))
        d_plus = (~polar).to(y.dtype)
        d_minus = inside.to(y.dtype)
        d_mid = torch.where(inside, 1.0, torch.where(polar, 0.0, mid))
        uhat = torch.where(c.soc_head_mask, 0.0, v) / c.spread(norm_u.clamp_min(1e-300))
        head = c.soc_head_mask.to(y.dtype) * 2 ** -0.5
        e_plus, e_minus = head + uhat * 2 ** -0.5, head - uhat * 2 ** -0.5
        mask = c.soc_block_mask.to(y.dtype)

        def assemble(f):
            """Σ f(d) q qᵀ over the eigen-pairs, as a dense block-diagonal matrix."""
            fp, fm, fd = (c.spread(f(d)) for d in (d_plus, d_minus, d_mid))
            pp = e_plus.unsqueeze(-1) * e_plus.unsqueeze(-2)
            mm = e_minus.unsqueeze(-1) * e_minus.unsqueeze(-2)
            eye = torch.diag_embed(fd)
            return eye + mask * ((fp - fd).unsqueeze(-1) * pp + (fm - fd).unsqueeze(-1) * mm)

        return (assemble(lambda d: d),
                assemble(lambda d: (d.clamp(delta, 1 - delta)
                                    / (1 - d.clamp(delta, 1 - delta))).sqrt()),
                assemble(lambda d: 1 / (1 - d.clamp(delta, 1 - delta))))

    def _exp(self, y, s, delta):
        """D = I − DΠ_K(s − y) on each exponential cone (Moreau), from the projection's
        derivative at v = y − s (`exp.project_primal`); R and V from its eigenpairs."""
        from .exp import project_primal

        c = self.cones
        w = (c.exp(s) - c.exp(y)).reshape(s.shape[0], -1, 3)
        _, DP, _ = project_primal(w, start_rho(c, s))
        eye = torch.eye(3, dtype=s.dtype, device=s.device)
        d, Q = torch.linalg.eigh(eye - DP)

        def spectral(f):
            return (Q * f(d.clamp(delta, 1 - delta)).unsqueeze(-2)) @ Q.mT

        return ((Q * d.clamp(0, 1).unsqueeze(-2)) @ Q.mT,
                spectral(lambda x: (x / (1 - x)).sqrt()), spectral(lambda x: 1 / (1 - x)))

    def d(self, v):
        """D v (B, m, r)."""
        return self._apply(self.d_diag, self.D, v)

    def vinv(self, v):
        """(I − D_δ)⁻¹ v: dv from the preconditioner's (Ax − r₂) (see `LimitSystem.solve`)."""
        return self._apply(self.v_diag, self.V, v)


class LimitSystem:
    """J at the solution with its clipped preconditioner factored once."""

    def __init__(self, A, cones: Cones, y, s, static_reg: float, tries: int):
        self.A = A
        self.metric = LimitMetric(cones, y, s, static_reg)
        self.kkt = NormalKKT(A, self.metric, static_reg, tries)

    def _precondition(self, gx, gy, gs):
        A = self.A
        w1, u = self.kkt.solve_regularized(gx - rmv(A, gs), gy)
        return w1, gs + u, gy - mv(A, w1) - u

    def _residual(self, w, g):
        A, (w1, w2, w3), (gx, gy, gs) = self.A, w, g
        dw3 = self.metric.d(w3)
        return gx - rmv(A, w2), gy - mv(A, w1) - (w3 - dw3), gs - w2 - dw3

    def adjoint(self, gx, gy, gs, steps: int):
        """(w₁, w₂) of Jᵀw = ḡ (see the module doc); ḡ (B, n, r), (B, m, r), (B, m, r).

        Where J is singular (a variable the solution leaves undetermined, such as an
        auxiliary t of ‖x‖ ≤ t ≤ 1 with both sides inactive) and ḡ asks for its
        derivative, the refinement does not converge; those samples get the
        minimum-norm least-squares solution from a dense pseudo-inverse (`_lstsq`)."""
        g = (gx, gy, gs)
        w = self._precondition(*g)
        for _ in range(steps):
            e = self._precondition(*self._residual(w, g))
            w = tuple(a + b for a, b in zip(w, e))
        res = torch.stack([t.abs().amax((1, 2)) for t in self._residual(w, g)]).amax(0)
        size = torch.stack([t.abs().amax((1, 2)) for t in g]).amax(0)
        bad = ~(res <= REFINED * (1 + size))
        if bool(bad.any()):
            w1, w2 = self._lstsq(bad.nonzero().flatten(), g)
            keep = bad.view(-1, 1, 1)
            return torch.where(keep, w1, w[0]), torch.where(keep, w2, w[1])
        return w[0], w[1]

    def _lstsq(self, idx, g):
        """Minimum-norm least squares of J₂ᵀ[w₁; w₂] = [ḡ_x; Dḡ_y + (D − I)ḡ_s] for the
        samples ``idx`` (J₂ = [[0, AᵀD], [A, D − I]], dense), scattered into full
        (B, n, r), (B, m, r) tensors."""
        gx, gy, gs = g
        B, n, r = gx.shape
        m = gy.shape[1]
        A = self.A if self.A.dim() == 3 else self.A.expand(B, -1, -1)
        eye = torch.eye(m, dtype=gx.dtype, device=gx.device).expand(B, m, m)
        D = self.metric.d(eye.contiguous())[idx]
        Ai = A[idx]
        top = torch.cat([torch.zeros_like(Ai.mT[..., :n]), Ai.mT @ D], -1)
        bottom = torch.cat([Ai, D - eye[idx]], -1)
        J = torch.cat([top, bottom], -2)
        rhs = torch.cat([gx[idx], self.metric.d(gy)[idx] + self.metric.d(gs)[idx] - gs[idx]], 1)
        sol = torch.linalg.pinv(J.mT, rtol=PINV_RTOL) @ rhs
        w1 = gx.new_zeros(B, n, r).index_copy(0, idx, sol[:, :n])
        w2 = gx.new_zeros(B, m, r).index_copy(0, idx, sol[:, n:])
        return w1, w2

    def solve(self, r1, r2, steps: int):
        """[dx; dv] with J₂ [dx; dv] = [r₁; r₂], J₂ = [[0, AᵀD], [A, D − I]] (the
        normal map's Jacobian in v = y − s; dy = D dv, ds = (D − I) dv), refined.

        The preconditioner's dv = D_δ⁻¹ dy is formed as (I − D_δ)⁻¹(A dx − r₂): the
        same vector without dividing by D_δ's tiny eigenvalues after multiplying by
        H_δ⁻¹'s huge ones (which would mix the eigen-directions' rounding)."""
        A, d, metric = self.A, self.metric.d, self.metric

        def precondition(p1, p2):
            dx, _ = self.kkt.solve_regularized(p1, p2)
            return dx, metric.vinv(mv(A, dx) - p2)

        dx, dv = precondition(r1, r2)
        for _ in range(steps):
            ddv = d(dv)
            e1, e2 = precondition(r1 - rmv(A, ddv), r2 - mv(A, dx) - ddv + dv)
            dx, dv = dx + e1, dv + e2
        return dx, dv


def start_rho(cones: Cones, s):
    """ρ = r/s of each exponential cone's slack: the projection's starting guess."""
    s3 = cones.exp(s).reshape(s.shape[0], -1, 3)
    return torch.where(s3[..., 1] > 0, s3[..., 0] / s3[..., 1].clamp_min(1e-300), 0.0)


def project_dual(cones: Cones, v, rho=None):
    """Π_K*(v): free on the zero cone, max(v, 0) on the orthant, the second-order
    cone's projection ((t + ‖u‖)/2 · (1, u/‖u‖) on the boundary case), and on the
    exponential cones v + Π_K(−v) (Moreau; `exp.project_primal`, from ``rho``).
    Returns (Π_K*(v), the exponential cones' (DΠ_K(−v), ρ) or None)."""
    lp = cones.lp(v).clamp_min(0)
    soc = cones.soc(v)
    if cones.nq:
        t = cones.head(soc)
        norm_u = (cones.seg_sum(soc * soc) - t * t).clamp_min(0).sqrt()
        inside, polar = norm_u <= t, norm_u <= -t
        scale = torch.where(inside, 1.0, torch.where(polar, 0.0, (t + norm_u) / (
            2 * norm_u.clamp_min(1e-300))))
        head = torch.where(inside, t, torch.where(polar, 0.0, (t + norm_u) / 2))
        soc = torch.where(cones.soc_head_mask, cones.spread(head), soc * cones.spread(scale))
    exp, extra = cones.exp(v), None
    if cones.ne:
        from .exp import project_primal

        w = -exp.reshape(v.shape[0], -1, 3)
        P, DP, rho = project_primal(w, torch.zeros_like(w[..., 0]) if rho is None else rho)
        exp = (P - w).reshape(v.shape[0], -1)
        extra = (DP, rho)
    return cones.join(v[:, :cones.l0], lp, soc, exp), extra
