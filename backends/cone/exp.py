"""Exponential cones: K = cl{(r, s, t): s > 0, s·exp(r/s) ≤ t} (SCS's and Clarabel's
convention), K* = cl{(u, v, w): u < 0, −u·exp(v/u) ≤ e·w}.

A nonsymmetric cone has no Nesterov–Todd scaling; this follows the primal–dual
scaling of Dahl & Andersen 2022 ("A primal-dual interior-point algorithm for
nonsymmetric exponential-cone optimization") as Clarabel implements it
(Goulart & Chen 2024): with the dual barrier f*(z) = −log(z₂ − z₁ − z₁ log(−z₃/z₁))
− log(−z₁) − log(z₃), its gradient g = ∇f*(z) and Hessian H* = ∇²f*(z), the
primal barrier's gradient z̃ = ∇f(s) (through the Wright ω function), and
μ = sᵀz/3, μ̃ = gᵀz̃/3,

    H = s sᵀ/⟨s, z⟩ + δs δsᵀ/⟨δs, δz⟩ + t·a aᵀ,     δs = s + μg, δz = z + μz̃,
    t = μ‖H* − g gᵀ/3 − h hᵀ/(z̃ᵀH*z̃ − 3μ̃²)‖_F, h = μ̃g − H*z̃, a = z × z̃ / ‖z × z̃‖,

a positive definite 3×3 matrix with H z = s and H z̃ = g-side secant conditions;
near the central path (or where a denominator is unsafe) H = μH* (dual
scaling). The affine step uses d_s = s, the corrector d_s = s + σμg − η with
Clarabel's third-order correction η. Steps stay inside by backtracking on
membership. The projection onto K and its derivative (`project_primal`)
serve the polish and the backward.

Shapes: a block of ``ne`` cones is (B, 3·ne) in the engine's vectors and
(B, ne, 3) here; H, its inverse factor R (H⁻¹ = RᵀR) are (B, ne, 3, 3).
"""

from __future__ import annotations

import math

import torch

# Clarabel's central point of the exponential cone (s = z = −∇f(s) there).
CENTRAL = (-1.051383945322714, 0.556409619469370, 1.258967884768947)
# Backtracking of the step to the cones' boundary: factor and number of tries.
BACKTRACK = 0.8
BACKTRACK_TRIES = 40
# The primal–dual scaling is used only where these stay clear of zero (Clarabel's
# guards, relative to the arithmetic): |μμ̃ − 1| > √ε and |z̃ᵀH*z̃ − 3μ̃²| > ε.
SCALING_GUARD = (1.5e-8, 2.2e-16)
# Smallest eigenvalue of H kept, relative to its largest (float64's rounding).
EIG_FLOOR = 1e-15


def _cones(v):
    return v.reshape(v.shape[0], -1, 3, *v.shape[2:])


def wright_omega(x):
    """ω(x): the y with y + log y = x, for x ≥ 1 (Serrano's thesis, Alg. 4, §8.4)."""
    zm1 = x - 1
    taylor = 1 + zm1 * (0.5 + zm1 * (1 / 16 + zm1 * (-1 / 192 + zm1 * (-1 / 3072 + zm1 * 13
                                                                        / 61440))))
    lx = x.clamp_min(1.0).log()
    inv = 1 / x.clamp_min(1.0)
    q = lx * inv
    asym = x - lx + q + q * inv * (lx / 2 - 1) + q * inv * inv * (lx * lx / 3 - 1.5 * lx + 1)
    w = torch.where(x < 1 + math.pi, taylor, asym)
    r = x - w - w.log()
    for _ in range(2):
        wp1 = w + 1
        t = wp1 * (wp1 + 2 * r / 3)
        w = w * (1 + (r / wp1) * (t - 0.5 * r) / (t - r))
        r = (2 * w * w - 8 * w - 1) / (72 * wp1 ** 6) * r ** 4
    return w


def primal_gradient(s):
    """∇f(s) of the primal barrier (Clarabel's gradient_primal), s (…, 3)."""
    s0, s1, s2 = s.unbind(-1)
    w = wright_omega(1 - s0 / s1 - (s1 / s2).log())
    g0 = 1 / ((w - 1) * s1)
    g1 = g0 + g0 * (w * s1 / s2).log() - 1 / s1
    g2 = w / ((1 - w) * s2)
    return torch.stack([g0, g1, g2], -1)


def dual_gradient_hessian(z):
    """∇f*(z) and ∇²f*(z) of the dual barrier, z (…, 3) -> (…, 3), (…, 3, 3)."""
    z0, z1, z2 = z.unbind(-1)
    lg = (-z2 / z0).log()
    r = -z0 * lg - z0 + z1
    c2 = 1 / r
    g = torch.stack([c2 * lg - 1 / z0, -c2, (c2 * z0 - 1) / z2], -1)
    rr = r * r
    h00 = (rr - z0 * r + lg * lg * z0 * z0) / (rr * z0 * z0)
    h01 = -lg / rr
    h11 = 1 / rr
    h02 = (z1 - z0) / (rr * z2)
    h12 = -z0 / (rr * z2)
    h22 = (rr - z0 * r + z0 * z0) / (rr * z2 * z2)
    H = torch.stack([torch.stack([h00, h01, h02], -1), torch.stack([h01, h11, h12], -1),
                     torch.stack([h02, h12, h22], -1)], -2)
    return g, H


def in_primal(s):
    s0, s1, s2 = s.unbind(-1)
    ok = (s2 > 0) & (s1 > 0)
    return ok & (s1 * (s2 / torch.where(ok, s1, 1.0)).clamp_min(1e-300).log() - s0 > 0)


def in_dual(z):
    z0, z1, z2 = z.unbind(-1)
    ok = (z2 > 0) & (z0 < 0)
    return ok & (z1 - z0 - z0 * (-z2 / torch.where(ok, z0, -1.0)).clamp_min(1e-300).log() > 0)


def max_step(u, du, dual: bool | None = None):
    """Largest α (a backtracked 0.8ᵏ, at most 1e30... capped at 1) keeping every
    cone of u + α du inside, per sample. ``u`` stacks primal and dual halves
    (the engine passes [s; z] in one batch: first half primal, second dual)."""
    u3, du3 = _cones(u), _cones(du)
    B = u3.shape[0]
    alphas = BACKTRACK ** torch.arange(BACKTRACK_TRIES, dtype=u.dtype, device=u.device)
    trial = u3.unsqueeze(1) + alphas.view(1, -1, 1, 1) * du3.unsqueeze(1)  # (B, K, ne, 3)
    half = B // 2
    ok = torch.cat([in_primal(trial[:half]), in_dual(trial[half:])]).all(-1)  # (B, K)
    first = torch.where(ok, torch.arange(BACKTRACK_TRIES, device=u.device), BACKTRACK_TRIES)
    k = first.amin(-1)
    return torch.where(k < BACKTRACK_TRIES, BACKTRACK ** k.to(u.dtype), 0.0)


class ExpScaling:
    """H per exponential cone at (s, z) and the products the engine needs."""

    def __init__(self, s, z):
        s3, z3 = _cones(s), _cones(z)
        self.grad, H_dual = dual_gradient_hessian(z3)
        self.H_dual = H_dual
        dot_sz = (s3 * z3).sum(-1, keepdim=True)
        mu = dot_sz / 3
        zt = primal_gradient(s3)
        st = self.grad
        mu_t = (st * zt).sum(-1, keepdim=True) / 3
        ds = s3 + mu * st
        dz = z3 + mu * zt
        dot_dsz = (ds * dz).sum(-1, keepdim=True)
        de1 = mu * mu_t - 1
        Hzt = (H_dual @ zt.unsqueeze(-1)).squeeze(-1)
        de2 = (zt * Hzt).sum(-1, keepdim=True) - 3 * mu_t * mu_t
        use = ((de1.abs() > SCALING_GUARD[0]) & (de2.abs() > SCALING_GUARD[1])
               & (dot_sz > 0) & (dot_dsz > 0))
        tmp = mu_t * st - Hzt
        de2_safe = torch.where(use, de2, 1.0)
        M = H_dual - _outer(st, st) / 3 - _outer(tmp, tmp) / de2_safe.unsqueeze(-1)
        t = mu * torch.linalg.matrix_norm(M).unsqueeze(-1)
        axis = torch.linalg.cross(z3, zt)
        axis = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True).clamp_min(1e-300)
        Hpd = (_outer(s3, s3) / dot_sz.unsqueeze(-1)
               + _outer(ds, ds) / torch.where(use, dot_dsz, 1.0).unsqueeze(-1)
               + t.unsqueeze(-1) * _outer(axis, axis))
        self.H = torch.where(use.unsqueeze(-1), Hpd, mu.unsqueeze(-1) * H_dual)
        # R = L⁻¹ from H = LLᵀ (so RᵀR = H⁻¹). Near a solution with s and z both on
        # the boundary H has eigenvalues ~1/μ and ~μ, beyond Cholesky's reach in
        # float64: there R = Λ^{-½}Qᵀ from H = QΛQᵀ with the eigenvalues floored
        # relative to the largest, and H recomposed from them (R factors that H).
        L, info = torch.linalg.cholesky_ex(self.H)
        eye = torch.eye(3, dtype=s.dtype, device=s.device).expand_as(L)
        self.R = torch.linalg.solve_triangular(L, eye, upper=False)
        bad = info != 0
        if bool(bad.any()):
            lam, Q = torch.linalg.eigh(self.H[bad])
            lam = lam.clamp_min(EIG_FLOOR * lam[..., -1:].abs().clamp_min(1e-300))
            self.R[bad] = (Q * lam.rsqrt().unsqueeze(-2)).mT
            self.H[bad] = (Q * lam.unsqueeze(-2)) @ Q.mT


def _outer(u, v):
    return u.unsqueeze(-1) * v.unsqueeze(-2)


def higher_correction(H_dual, z, ds, dz):
    """Clarabel's third-order correction η at z (Dahl & Andersen 2022, §5): the
    second derivative of the dual barrier's gradient along H*⁻¹Δs_a and Δz_a.
    All (B, ne, 3) but H_dual (B, ne, 3, 3)."""
    L, info = torch.linalg.cholesky_ex(H_dual)
    u = torch.cholesky_solve(ds.unsqueeze(-1), L).squeeze(-1)
    z0, z1, z2 = z.unbind(-1)
    u0, _, u2 = u.unbind(-1)
    v0, _, v2 = dz.unbind(-1)
    e2 = -z0 / z2
    e0 = e2.log()
    psi = z0 * e0 - z0 + z1
    eta = torch.stack([e0, torch.ones_like(e0), e2], -1)
    dot_u = (u * eta).sum(-1)
    dot_v = (dz * eta).sum(-1)
    coef = ((u0 * (v0 / z0 - v2 / z2) + u2 * (z0 * v2 / z2 - v0) / z2) * psi
            - 2 * dot_u * dot_v) / psi ** 3
    inv2 = 1 / (psi * psi)
    add0 = ((1 / psi - 2 / z0) * u0 * v0 / (z0 * z0) - u2 * v2 / (z2 * z2) / psi
            + dot_u * inv2 * (v0 / z0 - v2 / z2) + dot_v * inv2 * (u0 / z0 - u2 / z2))
    add2 = (2 * (z0 / psi - 1) * u2 * v2 / z2 ** 3 - (u2 * v0 + u0 * v2) / (z2 * z2) / psi
            + dot_u * inv2 * (z0 * v2 / (z2 * z2) - v0 / z2)
            + dot_v * inv2 * (z0 * u2 / (z2 * z2) - u0 / z2))
    eta = coef.unsqueeze(-1) * eta
    eta = eta + torch.stack([add0, torch.zeros_like(add0), add2], -1)
    ok = (info == 0).unsqueeze(-1)
    return torch.where(ok, 0.5 * eta, 0.0)


def combined_ds(scaling: ExpScaling, s, z, ds_a, dz_a, sigma, mu):
    """d_s of the corrector on the exponential rows: s + σμ∇f*(z) − η."""
    shift = (sigma * mu).unsqueeze(-1) * scaling.grad
    eta = higher_correction(scaling.H_dual, _cones(z), _cones(ds_a), _cones(dz_a))
    return s + (shift - eta).reshape(s.shape)


# ---------------------------------------------------------------------------
# Projection (for the polish and the backward's exact derivative)
# ---------------------------------------------------------------------------

# Newton steps on the projection's one-dimensional stationarity condition.
PROJECTION_NEWTON = 30


def project_primal(w, rho):
    """Π_K(w) and its derivative DΠ_K(w) per cone, w (B, ne, 3); ``rho`` (B, ne) a
    start for the boundary case's ρ = r/s (the interior point's own point).

    Boundary case: Π_K(w) = σ·a(ρ), a(ρ) = (ρ, 1, e^ρ), where ρ maximizes
    ⟨w, a⟩²/‖a‖² (σ = ⟨w, a⟩/‖a‖²), i.e. φ(ρ) = ⟨w, a′⟩‖a‖² − ⟨w, a⟩⟨a, a′⟩ = 0
    with a′ = (1, 0, e^ρ); Newton on φ from ``rho``. Its derivative follows by
    implicit differentiation: dρ = −∂_wφ/∂_ρφ, dσ = a/‖a‖² + ∂_ρσ dρ,
    DΠ = a dσᵀ + σ a′ dρᵀ. Other cases: w ∈ K (identity), −w ∈ K* (zero), and
    the face r ≤ 0, s = 0: (r, 0, max(t, 0)) with derivative diag(1, 0, [t > 0]).
    Returns (Π, DΠ, ρ)."""
    r0, s0, t0 = w.unbind(-1)
    rho = rho.clone()
    for _ in range(PROJECTION_NEWTON):
        e = rho.exp()
        va, vd, vdd = r0 * rho + s0 + t0 * e, r0 + t0 * e, t0 * e
        aa, ad, add_ = rho * rho + 1 + e * e, rho + e * e, 1 + 2 * e * e
        phi = vd * aa - va * ad
        dphi = vdd * aa + vd * 2 * ad - vd * ad - va * add_
        step = phi / torch.where(dphi.abs() > 0, dphi, 1e-300)
        rho = rho - step.clamp(-1.0, 1.0)
    e = rho.exp()
    a = torch.stack([rho, torch.ones_like(rho), e], -1)
    da = torch.stack([torch.ones_like(rho), torch.zeros_like(rho), e], -1)
    dda = torch.stack([torch.zeros_like(rho), torch.zeros_like(rho), e], -1)
    aa, ad = (a * a).sum(-1), (a * da).sum(-1)
    va, vd, vdd = (w * a).sum(-1), (w * da).sum(-1), (w * dda).sum(-1)
    sigma = va / aa
    dphi_w = da * aa.unsqueeze(-1) - a * ad.unsqueeze(-1)
    dphi_r = vdd * aa + vd * ad - va * ((da * da).sum(-1) + (a * dda).sum(-1))
    drho = -dphi_w / dphi_r.unsqueeze(-1)
    dsig = a / aa.unsqueeze(-1) + (-va * ad / (aa * aa)).unsqueeze(-1) * drho
    P = sigma.unsqueeze(-1) * a
    DP = _outer(a, dsig) + sigma.unsqueeze(-1).unsqueeze(-1) * _outer(da, drho)
    # The other cases, by membership of w, −w (polar) and the face r ≤ 0, s ≤ 0.
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(DP)
    inside = in_primal(w) | ((s0 == 0) & (r0 <= 0) & (t0 >= 0))
    polar = in_dual(-w) | ((r0 >= 0) & (s0 <= 0) & (t0 <= 0) & (r0 == 0))
    face = (r0 <= 0) & (s0 <= 0) & ~inside & ~polar
    P = torch.where(inside.unsqueeze(-1), w, torch.where(polar.unsqueeze(-1), 0.0, P))
    face_p = torch.stack([r0, torch.zeros_like(r0), t0.clamp_min(0)], -1)
    P = torch.where(face.unsqueeze(-1), face_p, P)
    face_d = torch.diag_embed(torch.stack([torch.ones_like(r0), torch.zeros_like(r0),
                                           (t0 > 0).to(w.dtype)], -1))

    def m(c):
        return c.unsqueeze(-1).unsqueeze(-1)

    DP = torch.where(m(inside), eye, torch.where(m(polar), 0.0, torch.where(m(face), face_d,
                                                                             DP)))
    DP = 0.5 * (DP + DP.mT)  # symmetric in exact arithmetic (a projection's Jacobian)
    return P, DP, rho
