"""Differentiable batched QP solve: forward by interior point, backward by the IFT.

Backward (OptNet's differentiated KKT conditions, Amos & Kolter 2017). At the
solution (z, λ, ν) the KKT conditions linearize to

    M [dz; dλ; dν] = −[dQ z + dq + dGᵀλ + dAᵀν;  dG z − dh;  dA z − db],

with M the KKT matrix at the solution (`limit`: active rows as equalities,
inactive rows dropped), so for upstream gradients (ḡ_z, ḡ_λ, ḡ_ν) one solve
a = M⁻¹ [ḡ_z; ḡ_λ; ḡ_ν] gives

    ∇q = −a_z,   ∇Q = −½(a_z zᵀ + z a_zᵀ),   ∇G = −(λ a_zᵀ + a_λ zᵀ),
    ∇h = a_λ,    ∇A = −(ν a_zᵀ + a_ν zᵀ),      ∇b = a_ν.

The solve runs in the equilibrated problem, a = P M̂⁻¹ (P ḡ) (`scaling`), with
the factorization the forward pass kept. A shared (unbatched) input receives
the sum over the batch, as autograd does for broadcasting. Samples without a
solution receive zero gradient.
"""

from __future__ import annotations

import warnings

import torch

from ..guard import guard_second_order
from ..krylov import minres
from ..status import Box
from . import engine
from .limit import min_norm
from .settings import QPSettings


class _Solved:
    """What the backward needs from a forward solve (kept off the autograd graph)."""

    def __init__(self, result: engine.QPResult, settings, input_dtype):
        self.result, self.settings, self.input_dtype = result, settings, input_dtype
        self.ok = ~torch.isin(result.codes, torch.tensor(engine.FAILED,
                                                         device=result.codes.device))
        self.ok = self.ok.unsqueeze(-1)


class QPSolve(torch.autograd.Function):
    """(Q, q, G, h, A, b) -> (z, λ, ν); ``box`` receives the `QPResult`.

    Written for torch.func too: ``setup_context`` style, a ``vmap`` rule that
    folds the mapped dimension into the solver's own batch, and a backward that
    is itself a Function (`QPAdjoint`) with a vmap rule, so jacrev works.
    """

    @staticmethod
    def forward(Q, q, G, h, A, b, batch: int, settings: QPSettings, box,
                warm: dict | None, need_grad: bool):
        data = engine.prepare(Q, q, G, h, A, b, batch, settings)
        # The implicit backward reuses the factorization of the system at the
        # solution; the matrix-free one needs only the active set.
        factor = need_grad and settings.backward == "implicit"
        result = engine.run(data, settings, Q.dtype, factor=factor, warm=warm,
                            with_limit=need_grad)
        box.result = result
        box.solved = _Solved(result, settings, Q.dtype)
        return tuple(t.to(Q.dtype) for t in (result.z, result.lam, result.nu))

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
        r = solved.result
        like = [torch.zeros_like(t) for t in (r.z, r.lam, r.nu)]
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


def _adjoint_solve(result: engine.QPResult, settings: QPSettings, gz, gl, gn):
    """a = M⁻¹ ḡ at the solution, in the user's units (see the module doc)."""
    kkt, limit, scaling = result.kkt, result.limit, result.scaling
    gz, gl, gn = scaling.congruence(gz, gl, gn)
    rhs = (kkt.rhs_to_working(gz), gl, gn)
    if settings.backward == "iterative":
        a = _iterative(limit, rhs, settings)
    else:
        a, converged = limit.solve_refined(*rhs)
        if not bool(converged.all()):  # a tie with an inconsistent right-hand side
            a = _merge(a, min_norm(limit, rhs, (~converged).nonzero().flatten()), ~converged)
    a_z, a_l, a_n = kkt.dir_to_original(a[0]), a[1], a[2]
    return scaling.congruence(a_z, a_l, a_n)


def _merge(a, b, mask):
    return tuple(torch.where(mask.unsqueeze(-1), v, u) for u, v in zip(a, b))


def _iterative(limit, rhs, settings: QPSettings):
    """MINRES on the limit system, matrix-free (it is symmetric): only products with
    Q, G and A; for the memory-lean backward (``backward="iterative"``)."""
    rhs = limit.rhs(*rhs)
    sizes = [t.shape[-1] for t in rhs]

    def split(v):
        return torch.split(v, sizes, dim=-1)

    def matvec(v):
        return torch.cat(limit.apply(*split(v)), dim=-1)

    tol = settings.krylov_tolerance(rhs[0].dtype)
    sol, info = minres(matvec, torch.cat(rhs, -1), tol=tol,
                       max_iter=settings.iterative_max_iter)
    if not bool(info.converged.all()):
        worst = float(info.residual.max())
        warnings.warn(f"iterative backward: MINRES stopped after {info.iterations} iterations "
                      f"with relative residual {worst:.2e} > tol {tol:g}; "
                      "gradients may be inaccurate (raise iterative_max_iter, or use "
                      "backward='implicit').", UserWarning, stacklevel=5)
    return split(sol)


def _adjoint(gz, gl, gn, solved: _Solved, needs, shared):
    result = solved.result
    z, lam, nu = result.z, result.lam, result.nu
    work = z.dtype  # the compute dtype
    ok = solved.ok
    gz, gl, gn = (torch.where(ok, g.to(work), torch.zeros((), dtype=work, device=g.device))
                  for g in (gz, gl, gn))
    a_z, a_l, a_n = _adjoint_solve(result, solved.settings, gz, gl, gn)
    a_z, a_l, a_n = (torch.where(ok, a, torch.zeros_like(a)) for a in (a_z, a_l, a_n))
    lam_f = torch.where(torch.isfinite(lam), lam, torch.zeros_like(lam))

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
        grads[2] = outer_sum(2, [(lam_f, a_z), (a_l, z)], -1.0)
    if needs[3]:
        grads[3] = reduce(a_l, 3)
    if needs[4]:
        grads[4] = outer_sum(4, [(nu, a_z), (a_n, z)], -1.0)
    if needs[5]:
        grads[5] = reduce(a_n, 5)
    return tuple(None if g is None else g.to(solved.input_dtype) for g in grads)


def solve_qp(Q, q, G, h, A, b, batch: int, settings: QPSettings | None = None,
             warm: dict | None = None):
    """Solve and return ((z, λ, ν), QPResult); differentiable in all six inputs.

    ``warm`` (optional) is a previous solution {"z", "lam", "s", "nu"} of the same
    batch size (`QPResult.warm_start()`), used as the starting point where finite.
    """
    settings = settings or QPSettings()
    box = Box()
    if warm is not None:
        for k in ("z", "lam", "s", "nu"):
            if warm[k].shape[0] != batch:
                raise ValueError(f"warm start has batch size {warm[k].shape[0]}, the call {batch}.")
    if settings.backward == "unroll":
        with torch.enable_grad():
            data = engine.prepare(Q, q, G, h, A, b, batch, settings)
            result = engine.run(data, settings, Q.dtype, factor=False, warm=warm,
                                with_limit=False)
        return tuple(t.to(Q.dtype) for t in (result.z, result.lam, result.nu)), result
    need_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (Q, q, G, h, A, b))
    z, lam, nu = QPSolve.apply(Q, q, G, h, A, b, batch, settings, box, warm, need_grad)
    return (z, lam, nu), box.result
