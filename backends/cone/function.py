"""Differentiable batched cone-program solve: forward by interior point, backward by the IFT.

Problem (SCS convention, `cones`): for each sample, min cᵀx s.t. Ax + s = b,
s ∈ K, with dual y ∈ K*, Aᵀy + c = 0. Inputs: A (m, n) shared or (B, m, n),
b (m,) or (B, m), c (n,) or (B, n), dense, any float dtype; outputs x (B, n),
y (B, m), s (B, m) in the inputs' dtype.

Backward (the implicit function theorem at the solution, `limit`). With
v = y − s, y = Π_K*(v) and s = Π_K(−v), the optimality conditions
Aᵀy + c = 0, Ax + s = b linearize to

    Aᵀdy = −dc − dAᵀy,    A dx + ds = db − dA x,    (I − D) dy + D ds = 0,

D = DΠ_K*(v) the projection's derivative at the (polished) solution: exact
on a strictly complementary solution, one element of the generalized
derivative at a degenerate one (a weakly active row). For ḡ = ∂L/∂(x, y, s)
the adjoint system Jᵀw = ḡ gives

    ∇c = −w₁,   ∇b = w₂,   ∇A = −(y w₁ᵀ + w₂ xᵀ),

solved in the equilibrated space by iterative refinement preconditioned with
the factorization the forward pass made at the solution (normal equations,
Cholesky; a dense minimum-norm least squares where J is singular). A shared
input receives the sum over the batch; samples without a solution receive
zero gradient.
"""

from __future__ import annotations

import torch

from ..autograd import ImplicitSolve
from ..status import Box
from . import engine
from .cones import ConeSpec
from .settings import ConeSettings


class ConeProblem:
    """The cone solve as `autograd.ImplicitSolve` sees it: inputs (A, b, c), outputs
    (x, y, s); torch.func's vmap folds its dimension into the batch."""

    name = "cone layer"
    ranks = (2, 1, 1)

    def __init__(self, batch: int, spec: ConeSpec, settings: ConeSettings, warm, need_grad):
        self.batch, self.spec, self.settings = batch, spec, settings
        self.warm, self.need_grad = warm, need_grad

    def solve(self, A, b, c):
        dtype = self.settings.compute_dtype or torch.float64
        B = self.batch
        A_w = A.to(dtype)
        b_w = b.to(dtype).expand(B, -1) if b.dim() == 1 else b.to(dtype)
        c_w = c.to(dtype).expand(B, -1) if c.dim() == 1 else c.to(dtype)
        result = engine.run(A_w, b_w, c_w, self.spec, self.settings, A.dtype,
                            factor=self.need_grad, warm=self.warm)
        outputs = tuple(t.to(A.dtype) for t in (result.x, result.y, result.s))
        return outputs, _Solved(result, self.settings, A.dtype)

    def folded(self, V: int) -> ConeProblem:
        return ConeProblem(V * self.batch, self.spec, self.settings, None, self.need_grad)


class _Solved:
    """What the backward needs from a forward solve (kept off the autograd graph)."""

    def __init__(self, result: engine.ConeResult, settings: ConeSettings, dtype):
        self.result, self.settings, self.dtype = result, settings, dtype
        self.batch = result.x.shape[0]

    def adjoint(self, cotangents, needs, shared):
        r = self.result
        gx, gy, gs = (g.to(t.dtype) for g, t in zip(cotangents, (r.x, r.y, r.s)))
        grads = adjoint(r, self.settings, gx, gy, gs, needs, shared)
        return tuple(None if g is None else g.to(self.dtype) for g in grads)


def adjoint(result: engine.ConeResult, settings: ConeSettings, gx, gy, gs, needs, shared):
    """Gradients of (A, b, c) from those of (x, y, s); see the module doc."""
    A, b, c, x, y, s = result.scaled
    eq = result.equil
    ok = result.solved.unsqueeze(-1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    gx, gy, gs = (torch.where(ok, g, zero) for g in eq.cotangent(gx, gy, gs))
    gs = torch.cat([torch.zeros_like(gs[:, :result.cones.l0]), gs[:, result.cones.l0:]], 1)
    w1, w2 = result.kkt.adjoint(gx.unsqueeze(-1), gy.unsqueeze(-1), gs.unsqueeze(-1),
                                settings.limit_refine_steps)
    ax = torch.where(ok, w1.squeeze(-1), zero)
    ay = torch.where(ok, w2.squeeze(-1), zero)
    grads = [None, None, None]
    if needs[0]:
        y0, x0 = torch.where(ok, y, zero), torch.where(ok, x, zero)
        if shared[0]:
            gA = -(torch.einsum("bi,bj->ij", y0, ax) + torch.einsum("bi,bj->ij", ay, x0))
        else:
            gA = -(y0.unsqueeze(-1) * ax.unsqueeze(-2) + ay.unsqueeze(-1) * x0.unsqueeze(-2))
        grads[0] = gA * eq.E.unsqueeze(-1) * eq.D.unsqueeze(-2)
    if needs[1]:
        gb = ay * eq.sb * eq.E
        grads[1] = gb.sum(0) if shared[1] else gb
    if needs[2]:
        gc = -ax * eq.sc * eq.D
        grads[2] = gc.sum(0) if shared[2] else gc
    return tuple(grads)


def solve_cone(A, b, c, cone_dict: dict | ConeSpec, settings: ConeSettings | None = None,
               warm: dict | None = None):
    """Solve a batch of cone programs; returns ((x, y, s), ConeResult), differentiable in
    A, b, c. ``cone_dict``: SCS's cone dictionary (keys z/f, l, q, ep) or a `ConeSpec`."""
    settings = settings or ConeSettings()
    spec = cone_dict if isinstance(cone_dict, ConeSpec) else ConeSpec.from_dict(cone_dict)
    batch = _check(A, b, c, spec)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (A, b, c))
    box = Box()
    x, y, s = ImplicitSolve.apply(ConeProblem(batch, spec, settings, warm, need_grad), box,
                                  A, b, c)
    return (x, y, s), box.result


def _check(A, b, c, spec: ConeSpec) -> int:
    """The batch size, after checking shapes against each other and the cone."""
    for name, t, dims in (("A", A, (2, 3)), ("b", b, (1, 2)), ("c", c, (1, 2))):
        if not isinstance(t, torch.Tensor) or t.dim() not in dims or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor with {dims[0]} or "
                             f"{dims[1]} dimensions (the second form batched), got "
                             f"{type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}.")
    m, n = A.shape[-2:]
    if b.shape[-1] != m or c.shape[-1] != n:
        raise ValueError(f"shapes disagree: A is {m}×{n}, b has {b.shape[-1]} entries "
                         f"(expected {m}), c has {c.shape[-1]} (expected {n}).")
    if spec.m != m:
        raise ValueError(f"the cones have {spec.m} rows in all but A has {m}.")
    batches = {t.shape[0] for t, d in ((A, 3), (b, 2), (c, 2)) if t.dim() == d}
    if len(batches) > 1:
        raise ValueError(f"batch sizes disagree among A, b, c: {sorted(batches)}.")
    return batches.pop() if batches else 1
