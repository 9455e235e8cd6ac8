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

from .. import solution
from ..autograd import ImplicitSolve
from ..krylov import minres
from ..status import Box
from . import engine
from .limit import min_norm
from .settings import QPSettings


class QPProblem:
    """The QP solve as `autograd.ImplicitSolve` sees it: inputs (Q, q, G, h, A, b)."""

    name = "QP layer"
    ranks = (2, 1, 2, 1, 2, 1)

    def __init__(self, batch: int, settings: QPSettings, warm: dict | None, need_grad: bool):
        self.batch, self.settings, self.warm, self.need_grad = batch, settings, warm, need_grad

    def solve(self, Q, q, G, h, A, b):
        data = engine.prepare(Q, q, G, h, A, b, self.batch, self.settings)
        # The implicit backward reuses the factorization of the system at the
        # solution; the matrix-free one needs only the active set.
        factor = self.need_grad and self.settings.backward == "implicit"
        result = engine.run(data, self.settings, Q.dtype, factor=factor, warm=self.warm,
                            with_limit=self.need_grad)
        outputs = tuple(t.to(Q.dtype) for t in (result.z, result.lam, result.nu))
        return outputs, _Solved(result, self.settings, Q.dtype)

    def folded(self, V: int) -> QPProblem:
        return QPProblem(V * self.batch, self.settings, None, self.need_grad)


class _Solved:
    """What the backward needs from a forward solve (kept off the autograd graph)."""

    def __init__(self, result: engine.QPResult, settings, input_dtype):
        self.result, self.settings, self.input_dtype = result, settings, input_dtype
        self.batch = result.z.shape[0]
        self.ok = engine._isin(result.codes, solution.WITH_POINT).unsqueeze(-1)

    def adjoint(self, cotangents, needs, shared):
        return _adjoint(*cotangents, self, needs, shared)


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
    problem = QPProblem(batch, settings, warm, need_grad)
    z, lam, nu = ImplicitSolve.apply(problem, box, Q, q, G, h, A, b)
    return (z, lam, nu), box.result
