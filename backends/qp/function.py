"""Differentiable batched QP solve: forward by interior point, backward by the IFT.

Backward (OptNet's differentiated KKT conditions). At the solution (z, λ, ν)
with slacks s and W = diag(s/λ), the KKT conditions linearize to

    M [dz; dλ; dν] = −[dQ z + dq + dGᵀλ + dAᵀν;  dG z − dh;  dA z − db],
    M = [[Q, Gᵀ, Aᵀ], [G, −W, 0], [A, 0, 0]]   (symmetric),

so for upstream gradients (ḡ_z, ḡ_λ, ḡ_ν) one solve a = M⁻¹ [ḡ_z; ḡ_λ; ḡ_ν]
with the Newton matrix factored at the final iterate (kept by the forward pass)
gives

    ∇q = −a_z,   ∇Q = −½(a_z zᵀ + z a_zᵀ),   ∇G = −(λ a_zᵀ + a_λ zᵀ),
    ∇h = a_λ,    ∇A = −(ν a_zᵀ + a_ν zᵀ),      ∇b = a_ν.

A shared (unbatched) input receives the sum over the batch, as autograd does
for broadcasting. Samples without a solution receive zero gradient.
"""

from __future__ import annotations

import warnings

import torch

from ..krylov import minres
from . import ipm
from .data import QPData
from .kkt import choose
from .settings import QPSettings


def _reduce(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a per-sample gradient over the batch when the input was shared."""
    return grad.sum(0) if grad.dim() > like.dim() else grad


class QPSolve(torch.autograd.Function):
    """(Q, q, G, h, A, b) -> (z, λ, ν); ``box`` receives the `IPMResult`."""

    @staticmethod
    def forward(ctx, Q, q, G, h, A, b, batch: int, settings: QPSettings, box: dict,
                warm: dict | None = None):
        Q = 0.5 * (Q + Q.mT)  # ½zᵀQz only sees the symmetric part
        data = QPData(Q, q, G, h, A, b, batch)
        kkt = choose(data, settings)
        ctx.input_dtype = Q.dtype
        if kkt.name == "reduced" and Q.dtype != torch.float64:
            # Q + GᵀW⁻¹G loses every digit in float32 near the solution (W spans
            # ~1e-8..1e8 there): the reduced path computes in float64 and returns
            # the input dtype. The Schur form stays in float32 (it is well-conditioned).
            data = data.to(torch.float64)
            kkt = choose(data, settings)
        # The implicit backward reuses the factorization at the final iterate; the
        # matrix-free one needs only W there.
        need_factor = any(ctx.needs_input_grad[:6]) and settings.backward == "implicit"
        result = ipm.solve(data, settings, need_factor=need_factor, kkt=kkt, warm=warm)
        ctx.settings = settings
        box["result"] = result
        ctx.result = result
        ctx.shapes = (data.Q, data.q, data.G, data.h, data.A, data.b)
        ok = torch.tensor([s.has_solution for s in result.status], device=Q.device)
        ctx.ok = ok
        z, lam, nu = result.z, result.lam, result.nu
        ctx.save_for_backward(z, lam, nu)
        dt = ctx.input_dtype
        return z.to(dt), lam.to(dt), nu.to(dt)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, gl, gn):
        z, lam, nu = ctx.saved_tensors
        result = ctx.result
        work = z.dtype  # the dtype the solve ran in (float64 for float32 reduced solves)
        gz, gl, gn = (None if g is None else g.to(work) for g in (gz, gl, gn))
        kkt, F = result.kkt, result.factor
        Q, q, G, h, A, b = ctx.shapes
        zeros = torch.zeros_like
        gz = zeros(z) if gz is None else gz
        gl = zeros(lam) if gl is None else gl
        gn = zeros(nu) if gn is None else gn
        ok = ctx.ok.unsqueeze(-1)
        gz, gl, gn = (torch.where(ok, g, torch.zeros_like(g)) for g in (gz, gl, gn))
        if ctx.settings.backward == "iterative":
            a_w, a_l, a_n = _iterative_adjoint(kkt, result, kkt.rhs_to_working(gz), gl, gn,
                                               ctx.settings)
        else:
            a_w, a_l, a_n = kkt.solve_refined(F, kkt.rhs_to_working(gz), gl, gn)
        a_z = kkt.dir_to_original(a_w)
        if result.singular is not None and bool(result.singular.any()):
            a_z, a_l, a_n = _min_norm_adjoint(ctx.shapes, result, (gz, gl, gn), (a_z, a_l, a_n))
        a_z, a_l, a_n = (torch.where(ok, a, torch.zeros_like(a)) for a in (a_z, a_l, a_n))

        needs = ctx.needs_input_grad
        dQ = dq = dG = dh = dA = db = None
        if needs[0]:
            outer = a_z.unsqueeze(-1) * z.unsqueeze(-2)
            dQ = _reduce(-0.5 * (outer + outer.mT), Q)
        if needs[1]:
            dq = _reduce(-a_z, q)
        if needs[2]:
            dG = _reduce(-(lam.unsqueeze(-1) * a_z.unsqueeze(-2)
                           + a_l.unsqueeze(-1) * z.unsqueeze(-2)), G)
        if needs[3]:
            dh = _reduce(a_l, h)
        if needs[4]:
            dA = _reduce(-(nu.unsqueeze(-1) * a_z.unsqueeze(-2)
                           + a_n.unsqueeze(-1) * z.unsqueeze(-2)), A)
        if needs[5]:
            db = _reduce(a_n, b)
        grads = tuple(None if g is None else g.to(ctx.input_dtype)
                      for g in (dQ, dq, dG, dh, dA, db))
        return (*grads, None, None, None, None)


def _min_norm_adjoint(data, result, grads, current):
    """Minimum-norm adjoint for samples whose limit KKT matrix is singular (ties).

    The limit system keeps the active inequality rows as equalities and drops
    the inactive ones (W → ∞): [[Q, G_Aᵀ, Aᵀ], [G_A, 0, 0], [A, 0, 0]]. Where
    it is singular the solution is not unique and not differentiable; its
    least-squares minimum-norm solution is the documented generalized
    derivative (zero along the directions of the tie).
    """
    Q, _, G, _, A, _ = data
    gz, gl, gn = grads
    a_z, a_l, a_n = (t.clone() for t in current)
    n, m = gz.shape[-1], gn.shape[-1]
    for i in result.singular.nonzero().flatten().tolist():
        Qi = Q[i] if Q.dim() == 3 else Q
        Gi = G[i] if G.dim() == 3 else G
        Ai = A[i] if A.dim() == 3 else A
        act = (result.w[i] < ipm.FREE_ROW_WEIGHT).nonzero().flatten()
        Ga = Gi[act]
        k = n + act.numel() + m
        M = torch.zeros(k, k, dtype=gz.dtype, device=gz.device)
        M[:n, :n] = Qi
        M[:n, n:n + act.numel()] = Ga.T
        M[n:n + act.numel(), :n] = Ga
        M[:n, n + act.numel():] = Ai.T
        M[n + act.numel():, :n] = Ai
        rhs = torch.cat([gz[i], gl[i][act], gn[i]])
        sol = torch.linalg.pinv(M, hermitian=True) @ rhs
        a_z[i] = sol[:n]
        a_l[i] = 0.0
        a_l[i, act] = sol[n:n + act.numel()]
        a_n[i] = sol[n + act.numel():]
    return a_z, a_l, a_n


def _iterative_adjoint(kkt, result, r_z, r_l, r_n, settings: QPSettings):
    """Solve the adjoint KKT system matrix-free with MINRES (it is symmetric).

    Only products with Q, G, A and W are used; the matrix is never formed. A
    diagonal preconditioner scales each inequality row by 1/(1 + Wᵢ), which
    brings the inactive rows (W large) to unit size.
    """
    n, p = r_z.shape[-1], r_l.shape[-1]
    w = result.w
    F = {"w": w}

    def split(v):
        return v[:, :n], v[:, n:n + p], v[:, n + p:]

    def matvec(v):
        return torch.cat(kkt.apply(F, *split(v)), dim=-1)

    scale = torch.cat([torch.ones_like(r_z), 1.0 / (1.0 + w), torch.ones_like(r_n)], dim=-1)
    rhs = torch.cat([r_z, r_l, r_n], dim=-1)
    sol, info = minres(matvec, rhs, tol=settings.iterative_tol,
                       max_iter=settings.iterative_max_iter, precond=lambda v: scale * v)
    if not bool(info.converged.all()):
        worst = float(info.residual.max())
        warnings.warn(f"iterative backward: MINRES stopped after {info.iterations} iterations "
                      f"with relative residual {worst:.2e} > tol {settings.iterative_tol:g}; "
                      "gradients may be inaccurate (raise iterative_max_iter, or use "
                      "backward='implicit').", UserWarning, stacklevel=4)
    return split(sol)


def solve_qp(Q, q, G, h, A, b, batch: int, settings: QPSettings | None = None,
             warm: dict | None = None):
    """Solve and return ((z, λ, ν), IPMResult); differentiable in all six inputs.

    ``warm`` (optional) is a previous solution {"z", "lam", "s", "nu"} of the same
    batch size (`IPMResult.warm_start()`), used as the starting point where finite.
    """
    settings = settings or QPSettings()
    box: dict = {}
    if warm is not None:
        for k in ("z", "lam", "s", "nu"):
            if warm[k].shape[0] != batch:
                raise ValueError(f"warm start has batch size {warm[k].shape[0]}, the call {batch}.")
    if settings.backward == "unroll":
        with torch.enable_grad():
            data = QPData(0.5 * (Q + Q.mT), q, G, h, A, b, batch)
            result = ipm.solve(data, settings, need_factor=False, warm=warm)
        return (result.z, result.lam, result.nu), result
    z, lam, nu = QPSolve.apply(Q, q, G, h, A, b, batch, settings, box, warm)
    return (z, lam, nu), box["result"]
