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

from ..guard import guard_second_order
from ..krylov import minres
from ..status import Box
from . import ipm
from .data import QPData
from .kkt import choose
from .settings import QPSettings


class _Solved:
    """What the backward needs from a forward solve (kept off the autograd graph)."""

    def __init__(self, result, data, settings, input_dtype):
        self.result, self.settings, self.input_dtype = result, settings, input_dtype
        self.blocks = (data.Q, data.q, data.G, data.h, data.A, data.b)
        self.ok = torch.tensor([s.has_solution for s in result.status],
                               device=result.z.device).unsqueeze(-1)


class QPSolve(torch.autograd.Function):
    """(Q, q, G, h, A, b) -> (z, λ, ν); ``box`` receives the `IPMResult`.

    Written for torch.func too: ``setup_context`` style, a ``vmap`` rule that
    folds the mapped dimension into the solver's own batch, and a backward that
    is itself a Function (`QPAdjoint`) with a vmap rule, so jacrev works.
    """

    @staticmethod
    def forward(Q, q, G, h, A, b, batch: int, settings: QPSettings, box,
                warm: dict | None, need_grad: bool):
        Q = (Q + Q.mT).mul_(0.5)  # ½zᵀQz only sees the symmetric part
        data = QPData(Q, q, G, h, A, b, batch)
        kkt = choose(data, settings)
        input_dtype = Q.dtype
        if kkt.name == "reduced" and Q.dtype != torch.float64:
            # Q + GᵀW⁻¹G loses every digit in float32 near the solution (W spans
            # ~1e-8..1e8 there): the reduced path computes in float64 and returns
            # the input dtype. The Schur form stays in float32 (it is well-conditioned).
            data = data.to(torch.float64)
            kkt = choose(data, settings)
        # The implicit backward reuses the factorization at the final iterate; the
        # matrix-free one needs only W there.
        need_factor = need_grad and settings.backward == "implicit"
        result = ipm.solve(data, settings, need_factor=need_factor, kkt=kkt, warm=warm)
        if warm is not None:
            _retry_cold(result, data, settings, need_factor)
        box.result = result
        box.solved = _Solved(result, data, settings, input_dtype)
        # Fresh tensors: an empty ν can alias the input b, which autograd refuses to save.
        return tuple(t.to(input_dtype, copy=True) for t in (result.z, result.lam, result.nu))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.solved = inputs[8].solved
        ctx.shared = tuple(t.dim() == d for t, d in zip(inputs[:6], (2, 1, 2, 1, 2, 1)))
        # The solution is what the backward needs (the factorization rides on
        # `solved`); saving it through autograd also gives the usual "backward
        # through the graph a second time" error without retain_graph.
        ctx.save_for_backward(*output)

    @staticmethod
    def backward(ctx, gz, gl, gn):
        outputs = ctx.saved_tensors  # raises if the graph was already freed
        solved = ctx.solved
        like = [torch.zeros_like(t) for t in (solved.result.z, solved.result.lam,
                                              solved.result.nu)]
        gz, gl, gn = (l if g is None else g for g, l in zip((gz, gl, gn), like))
        grads = QPAdjoint.apply(gz, gl, gn, solved, ctx.needs_input_grad[:6], ctx.shared)
        grads = guard_second_order("QP layer", grads, outputs)
        return (*grads, None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, Q, q, G, h, A, b, batch, settings, box, warm, need_grad):
        """Fold the vmapped dimension V into the batch: one solve of V·batch samples."""
        V = info.batch_size
        folded = []
        for t, d, nd in zip((Q, q, G, h, A, b), in_dims[:6], (2, 1, 2, 1, 2, 1)):
            if d is None:
                folded.append(t)  # shared by every mapped sample: stays shared
                continue
            t = t.movedim(d, 0)
            if t.dim() == nd + 1:  # mapped but unbatched: one copy per batch sample
                t = t.unsqueeze(1).expand((V, batch) + tuple(t.shape[1:]))
            folded.append(t.reshape((V * batch,) + tuple(t.shape[2:])))
        z, lam, nu = QPSolve.apply(*folded, V * batch, settings, box, None, need_grad)
        out = tuple(o.reshape((V, batch) + tuple(o.shape[1:])) for o in (z, lam, nu))
        return out, (0, 0, 0)


def _retry_cold(result, data: QPData, settings: QPSettings, need_factor: bool) -> None:
    """Samples a warm start left without an optimal point are solved again from scratch.

    A warm start only changes where the interior point begins; from a poor start
    (another batch's solution, a different active set) it can stall. The answer
    must never depend on it, so such samples get the cold start's result.
    """
    settled = (ipm.OPTIMAL, ipm.INFEASIBLE, ipm.UNBOUNDED)
    bad = ~torch.isin(result.codes, torch.tensor(settled, device=result.codes.device))
    if not bool(bad.any()):
        return
    idx = bad.nonzero().flatten()
    sub = data.subset(idx)
    redo = ipm.solve(sub, settings, need_factor=need_factor, kkt=result.kkt.subset(idx))
    result.merge(idx, redo)


class QPAdjoint(torch.autograd.Function):
    """Cotangents (ḡ_z, ḡ_λ, ḡ_ν) -> gradients of (Q, q, G, h, A, b); see the module doc."""

    @staticmethod
    def forward(gz, gl, gn, solved: _Solved, needs, shared):
        return _adjoint(gz, gl, gn, solved, needs, shared)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("Double backward through the QP layer is not supported: its "
                           "backward is an implicit (KKT) solve, differentiated once.")

    @staticmethod
    def vmap(info, in_dims, gz, gl, gn, solved, needs, shared):
        """A batch of V cotangents. Two cases, told apart by the solve's batch size:

        - jacrev (the solve was not mapped): one adjoint solve per cotangent;
        - vmap of grad (the forward's vmap rule folded V into the solve, so it holds
          V·B samples): fold the cotangents the same way, solve once, and sum each
          logically shared input's gradient over B but not over V.
        """
        V = info.batch_size
        cot = [t if d is None else t.movedim(d, 0) for t, d in zip((gz, gl, gn), in_dims[:3])]
        folded_batch = solved.result.z.shape[0]
        B = next((c.shape[1] for c, d in zip(cot, in_dims[:3]) if d is not None), None)
        if B is not None and folded_batch == V * B != B:
            flat = [c.reshape((V * B,) + tuple(c.shape[2:])) if d is not None else
                    c.unsqueeze(0).expand((V,) + tuple(c.shape)).reshape(
                        (V * B,) + tuple(c.shape[1:]))
                    for c, d in zip(cot, in_dims[:3])]
            grads = _adjoint(*flat, solved, needs, (False,) * 6)
            out = tuple(None if g is None else
                        (lambda r, i: r.sum(1) if shared[i] else r)(
                            g.reshape((V, B) + tuple(g.shape[1:])), i)
                        for i, g in enumerate(grads))
            return out, tuple(None if o is None else 0 for o in out)
        rows = []
        for v in range(V):
            args = [t if d is None else c[v] for t, c, d in zip((gz, gl, gn), cot, in_dims[:3])]
            rows.append(QPAdjoint.apply(*args, solved, needs, shared))
        out = tuple(None if rows[0][k] is None else torch.stack([r[k] for r in rows])
                    for k in range(6))
        return out, tuple(None if o is None else 0 for o in out)


def _adjoint(gz, gl, gn, solved: _Solved, needs, shared):
    result = solved.result
    z, lam, nu = result.z, result.lam, result.nu
    work = z.dtype  # the dtype the solve ran in (float64 for float32 reduced solves)
    gz, gl, gn = (g.to(work) for g in (gz, gl, gn))
    kkt, F = result.kkt, result.factor
    ok = solved.ok
    gz, gl, gn = (torch.where(ok, g, torch.zeros_like(g)) for g in (gz, gl, gn))
    if solved.settings.backward == "iterative":
        a_w, a_l, a_n = _iterative_adjoint(kkt, result, kkt.rhs_to_working(gz), gl, gn,
                                           solved.settings)
    else:
        a_w, a_l, a_n = kkt.solve_refined(F, kkt.rhs_to_working(gz), gl, gn)
    a_z = kkt.dir_to_original(a_w)
    if result.singular is not None and bool(result.singular.any()):
        a_z, a_l, a_n = _min_norm_adjoint(solved.blocks, result, (gz, gl, gn), (a_z, a_l, a_n))
    a_z, a_l, a_n = (torch.where(ok, a, torch.zeros_like(a)) for a in (a_z, a_l, a_n))

    def outer_sum(i, pairs, scale):
        """scale · Σ_k u_k v_kᵀ per sample, as one batched product (u: (B, r),
        v: (B, c)); a shared input gets the sum over the batch as one matrix
        product instead of B outer products summed."""
        U = torch.stack([u for u, _ in pairs], -1)  # (B, r, k)
        V = torch.stack([v for _, v in pairs], -1)  # (B, c, k)
        if shared[i]:
            return (U.transpose(0, 1).flatten(1) @ V.transpose(0, 1).flatten(1).T).mul_(scale)
        return torch.bmm(U, V.mT).mul_(scale)

    def reduce(g, i):
        return g.sum(0) if shared[i] else g

    grads = [None] * 6
    if needs[0]:
        grads[0] = outer_sum(0, [(a_z, z), (z, a_z)], -0.5)  # symmetric
    if needs[1]:
        grads[1] = reduce(-a_z, 1)
    if needs[2]:
        grads[2] = outer_sum(2, [(lam, a_z), (a_l, z)], -1.0)
    if needs[3]:
        grads[3] = reduce(a_l, 3)
    if needs[4]:
        grads[4] = outer_sum(4, [(nu, a_z), (a_n, z)], -1.0)
    if needs[5]:
        grads[5] = reduce(a_n, 5)
    return tuple(None if g is None else g.to(solved.input_dtype) for g in grads)


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
    dtype = r_z.dtype
    if dtype != torch.float64:
        # MINRES loses orthogonality fast in float32 on a KKT matrix whose W spans
        # ~1e-8..1e8: the matrix-free solve runs in float64 and returns the input dtype.
        kkt = kkt.to(torch.float64)
        r_z, r_l, r_n = (t.double() for t in (r_z, r_l, r_n))
    w = result.w.to(r_z.dtype)
    F = {"w": w}

    def split(v):
        return v[:, :n], v[:, n:n + p], v[:, n + p:]

    def matvec(v):
        return torch.cat(kkt.apply(F, *split(v)), dim=-1)

    scale = torch.cat([torch.ones_like(r_z), 1.0 / (1.0 + w), torch.ones_like(r_n)], dim=-1)
    rhs = torch.cat([r_z, r_l, r_n], dim=-1)
    tol = settings.krylov_tolerance(dtype)
    sol, info = minres(matvec, rhs, tol=tol, max_iter=settings.iterative_max_iter,
                       precond=lambda v: scale * v)
    if not bool(info.converged.all()):
        worst = float(info.residual.max())
        warnings.warn(f"iterative backward: MINRES stopped after {info.iterations} iterations "
                      f"with relative residual {worst:.2e} > tol {tol:g}; "
                      "gradients may be inaccurate (raise iterative_max_iter, or use "
                      "backward='implicit').", UserWarning, stacklevel=4)
    return tuple(t.to(dtype) for t in split(sol))


def solve_qp(Q, q, G, h, A, b, batch: int, settings: QPSettings | None = None,
             warm: dict | None = None):
    """Solve and return ((z, λ, ν), IPMResult); differentiable in all six inputs.

    ``warm`` (optional) is a previous solution {"z", "lam", "s", "nu"} of the same
    batch size (`IPMResult.warm_start()`), used as the starting point where finite.
    """
    settings = settings or QPSettings()
    box = Box()
    if warm is not None:
        for k in ("z", "lam", "s", "nu"):
            if warm[k].shape[0] != batch:
                raise ValueError(f"warm start has batch size {warm[k].shape[0]}, the call {batch}.")
    if settings.backward == "unroll":
        with torch.enable_grad():
            data = QPData(0.5 * (Q + Q.mT), q, G, h, A, b, batch)
            result = ipm.solve(data, settings, need_factor=False, warm=warm)
        return (result.z, result.lam, result.nu), result
    need_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (Q, q, G, h, A, b))
    z, lam, nu = QPSolve.apply(Q, q, G, h, A, b, batch, settings, box, warm, need_grad)
    return (z, lam, nu), box.result
