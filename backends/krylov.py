"""Batched matrix-free Krylov solvers in torch: MINRES (symmetric) and GMRES (general).

Each solves B independent systems at once, A_b x_b = r_b, given only a
function ``matvec(v)`` mapping (B, n) to (B, n). Scalars of the recurrences are
per sample, so samples converge independently; a converged sample's iterate
is frozen. Both return (x, info) with ``info.converged`` (B,) and the relative
residual norms, so callers can warn when a solve stops at its cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KrylovInfo:
    converged: torch.Tensor  # (B,) bool
    residual: torch.Tensor  # (B,) relative residual ‖r − A x‖ / ‖r‖
    iterations: int


def _dot(a, b):
    return (a * b).sum(-1)


def minres(matvec, rhs: torch.Tensor, tol: float = 1e-10, max_iter: int = 1000,
           precond=None):
    """MINRES (Paige & Saunders) for symmetric, possibly indefinite systems.

    ``precond(v)`` applies an SPD preconditioner M⁻¹ (diagonal scalings are
    typical); the iteration then minimizes the M⁻¹-norm of the residual. The
    preconditioned norm can reach ``tol`` before the true residual does, so the
    solve restarts on the remaining residual until the true relative residual
    is within ``tol`` (or the iteration budget is spent).
    """
    rhs_norm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    x = torch.zeros_like(rhs)
    used = 0
    residual = rhs
    while used < max_iter:
        dx, its = _minres(matvec, residual, tol, max_iter - used, precond)
        x = x + dx
        used += its
        residual = rhs - matvec(x)
        rel = residual.norm(dim=-1) / rhs_norm
        if bool((rel <= tol).all()) or its == 0:
            break
    rel = (rhs - matvec(x)).norm(dim=-1) / rhs_norm
    return x, KrylovInfo(rel <= tol * 10, rel, used)


def _minres(matvec, rhs: torch.Tensor, tol: float, max_iter: int, precond):
    B, n = rhs.shape
    dtype = rhs.dtype
    tiny = torch.finfo(dtype).tiny
    x = torch.zeros_like(rhs)
    M = precond if precond is not None else (lambda v: v)
    r1 = rhs.clone()
    y = M(r1)
    beta1 = torch.sqrt(_dot(r1, y).clamp_min(0))
    zero = torch.zeros(B, dtype=dtype, device=rhs.device)
    oldb, beta = zero.clone(), beta1.clone()
    dbar, epsln, phibar = zero.clone(), zero.clone(), beta1.clone()
    cs, sn = -torch.ones_like(zero), zero.clone()
    w, w2 = torch.zeros_like(rhs), torch.zeros_like(rhs)
    r2 = r1.clone()
    done = beta1 <= tiny
    it = 0
    for it in range(1, max_iter + 1):
        s = 1.0 / beta.clamp_min(tiny)
        v = s.unsqueeze(-1) * y
        y = matvec(v)
        if it >= 2:
            y = y - (beta / oldb.clamp_min(tiny)).unsqueeze(-1) * r1
        alfa = _dot(v, y)
        y = y - (alfa / beta.clamp_min(tiny)).unsqueeze(-1) * r2
        r1, r2 = r2, y
        y = M(r2)
        oldb, beta = beta, torch.sqrt(_dot(r2, y).clamp_min(0))
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar ** 2 + beta ** 2).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        denom = 1.0 / gamma
        w1, w2 = w2, w
        w = (v - oldeps.unsqueeze(-1) * w1 - delta.unsqueeze(-1) * w2) * denom.unsqueeze(-1)
        step = torch.where(done.unsqueeze(-1), torch.zeros_like(x), phi.unsqueeze(-1) * w)
        x = x + step
        # phibar is the (preconditioned) residual norm of the current iterate.
        done = done | (phibar <= tol * beta1.clamp_min(tiny))
        if bool(done.all()):
            break
    return x, it


def gmres(matvec, rhs: torch.Tensor, tol: float = 1e-10, max_iter: int = 1000,
          restart: int = 50, precond=None):
    """Restarted GMRES with modified Gram–Schmidt, for general square systems.

    ``precond(v)`` ≈ A⁻¹v is applied on the right (A P⁻¹ y = r, x = P⁻¹ y), so the
    residual it minimizes is the true one; an inexact factorization makes a good
    one: a few wrong directions cost a few extra iterations.
    """
    P = precond if precond is not None else (lambda v: v)
    B, n = rhs.shape
    dtype = rhs.dtype
    tiny = torch.finfo(dtype).tiny
    x = torch.zeros_like(rhs)
    rhs_norm = rhs.norm(dim=-1).clamp_min(tiny)
    total = 0
    restart = max(1, min(restart, n))
    while total < max_iter:
        r = rhs - matvec(x)
        beta = r.norm(dim=-1)
        if bool((beta <= tol * rhs_norm).all()):
            break
        k_max = min(restart, max_iter - total)
        V = torch.zeros(B, k_max + 1, n, dtype=dtype, device=rhs.device)
        H = torch.zeros(B, k_max + 1, k_max, dtype=dtype, device=rhs.device)
        V[:, 0] = r / beta.clamp_min(tiny).unsqueeze(-1)
        cs = torch.zeros(B, k_max, dtype=dtype, device=rhs.device)
        sn = torch.zeros(B, k_max, dtype=dtype, device=rhs.device)
        g = torch.zeros(B, k_max + 1, dtype=dtype, device=rhs.device)
        g[:, 0] = beta
        k_used = 0
        Z = [] if precond is not None else None
        for k in range(k_max):
            zk = P(V[:, k])
            if Z is not None:
                Z.append(zk)
            wv = matvec(zk)
            for j in range(k + 1):
                H[:, j, k] = _dot(V[:, j], wv)
                wv = wv - H[:, j, k].unsqueeze(-1) * V[:, j]
            H[:, k + 1, k] = wv.norm(dim=-1)
            V[:, k + 1] = wv / H[:, k + 1, k].clamp_min(tiny).unsqueeze(-1)
            for j in range(k):  # apply the previous rotations to the new column
                t = cs[:, j] * H[:, j, k] + sn[:, j] * H[:, j + 1, k]
                H[:, j + 1, k] = -sn[:, j] * H[:, j, k] + cs[:, j] * H[:, j + 1, k]
                H[:, j, k] = t
            denom = torch.sqrt(H[:, k, k] ** 2 + H[:, k + 1, k] ** 2).clamp_min(tiny)
            cs[:, k], sn[:, k] = H[:, k, k] / denom, H[:, k + 1, k] / denom
            H[:, k, k] = denom
            H[:, k + 1, k] = 0.0
            g[:, k + 1] = -sn[:, k] * g[:, k]
            g[:, k] = cs[:, k] * g[:, k]
            k_used = k + 1
            total += 1
            if bool((g[:, k + 1].abs() <= tol * rhs_norm).all()):
                break
        R = H[:, :k_used, :k_used]
        yk = torch.linalg.solve_triangular(R, g[:, :k_used].unsqueeze(-1), upper=True)
        basis = torch.stack(Z, dim=1) if Z is not None else V[:, :k_used]
        x = x + (basis.mT @ yk).squeeze(-1)
    residual = (rhs - matvec(x)).norm(dim=-1) / rhs_norm
    return x, KrylovInfo(residual <= tol * 10, residual, total)
