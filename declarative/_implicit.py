"""`implicit`: differentiate any solver by the implicit function theorem.

Given a forward solver (any torch code; it is run without autograd, so its
iterations are never stored) and a residual F with F(x*, θ) = 0 at the
solution, the returned function gives x*(θ) whose vector-Jacobian product is

    ∇_θ ℓ = −(∂F/∂θ)ᵀ w,    where   (∂F/∂x)ᵀ w = ∇_x ℓ,

the IFT's dx/dθ = −(∂F/∂x)⁻¹ ∂F/∂θ (the seed's section 3) applied to the
upstream gradient. Both Jacobians enter only through products computed with
``torch.func.vjp``; the linear system is solved densely (the Jacobian is
assembled from n products, then factored) or matrix-free with GMRES (MINRES
when ``symmetric=True``).

Batching: x has a leading batch dimension B and F is applied row by row, so
∂F/∂x is block diagonal (samples do not interact). Parameters may be batched
(leading dimension B) or shared.

The IFT's conditions are checked where they can be: the residual must vanish
at the returned point (``residual_tol``), and ∂F/∂x must be nonsingular — a
singular (or numerically singular) Jacobian is an `ImplicitFunctionError`
naming the sample, never a NaN gradient.

Example (the seed's unit circle, x = √(1 − θ²), dx/dθ = −θ/x)::

    circle = implicit(lambda th: torch.sqrt(1 - th**2),
                      lambda x, th: th**2 + x**2 - 1)
    x = circle(theta)          # differentiable in theta
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.func import vjp

from .backends.krylov import gmres, minres

METHODS = ("dense", "iterative")
# Largest system solved with batched LU: torch's CPU batched LU is unreliable
# on matrices of about 150×150 and larger (wrong pivots; see NOTES.md), so
# bigger systems are solved one sample at a time.
BATCHED_LU_MAX = 128


class ImplicitFunctionError(ValueError):
    """A condition of the implicit function theorem fails at the solution."""


def implicit(solve: Callable, residual: Callable, *, method: str = "dense",
             symmetric: bool = False, tol: float | None = None, max_iter: int = 1000,
             residual_tol: float | None = 1e-6, rcond: float | None = None):
    """Wrap ``solve`` so its output is differentiable through ``residual``.

    Args:
        solve: ``solve(*params) -> x`` with x of shape (B, *shape); run under no_grad.
        residual: ``residual(x, *params) -> F`` with F of x's shape, zero at the solution,
            each row depending only on its own sample.
        method: "dense" (assemble ∂F/∂x per sample and factor it) or "iterative"
            (matrix-free GMRES / MINRES on ∂F/∂xᵀ products).
        symmetric: ∂F/∂x is symmetric (e.g. F is a gradient): MINRES instead of GMRES.
        tol, max_iter: the iterative solve's relative tolerance (default 1e-10 in
            float64, 1e-5 in float32) and cap; stopping at the cap warns.
        residual_tol: largest allowed ‖F(x, θ)‖∞ / (1 + ‖x‖∞) at the returned point
            (None skips the check).
        rcond: smallest allowed σ_min/σ_max of ∂F/∂x for the dense method
            (default: n × machine epsilon × 100).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    options = dict(method=method, symmetric=symmetric, tol=tol, max_iter=max_iter,
                   residual_tol=residual_tol, rcond=rcond)

    def solved(*params):
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}.")
        return _Implicit.apply(solve, residual, options, *params)

    return solved


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


class _Implicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, solve, residual, options, *params):
        with torch.no_grad():
            x = solve(*params)
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError("solve(*params) must return a tensor with a leading batch dimension.")
        x = x.detach()
        if options["residual_tol"] is not None:
            with torch.no_grad():
                F = _flat(residual(x, *params))
            size = F.abs().amax(-1) / (1 + _flat(x).abs().amax(-1))
            bad = (size > options["residual_tol"]) | ~torch.isfinite(size)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ImplicitFunctionError(
                    f"the residual does not vanish at the solver's output (condition 1 of "
                    f"the implicit function theorem): sample {i} has scaled ‖F‖∞ = "
                    f"{float(size[i]):.2e} > residual_tol = {options['residual_tol']:g}. "
                    "Solve more accurately or check that residual(x, *params) is zero at the "
                    "solution."
                )
        ctx.solve_residual = residual
        ctx.options = options
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx):
        x, *params = ctx.saved_tensors
        residual, opts = ctx.solve_residual, ctx.options
        shape = x.shape
        B = shape[0]

        def F_of_x(xv):
            return _flat(residual(xv.reshape(shape), *params))

        _, vjp_x = vjp(F_of_x, _flat(x))
        g = _flat(gx)
        if opts["method"] == "dense":
            w = _dense_adjoint(vjp_x, g, opts)
        else:
            def matvec(v):
                return vjp_x(v)[0]

            solver = minres if opts["symmetric"] else gmres
            tol = opts["tol"] if opts["tol"] is not None else (
                1e-10 if g.dtype == torch.float64 else 1e-5)
            w, info = solver(matvec, g, tol=tol, max_iter=opts["max_iter"])
            if not bool(info.converged.all()):
                warnings.warn(
                    f"implicit: the iterative solve of (∂F/∂x)ᵀ w = g stopped after "
                    f"{info.iterations} iterations with relative residual "
                    f"{float(info.residual.max()):.2e}; gradients may be inaccurate "
                    "(∂F/∂x may be nearly singular; raise max_iter or use method='dense').",
                    UserWarning, stacklevel=2)
        # ∇θ = −(∂F/∂θ)ᵀ w, one vjp through all parameters at once.
        wants = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        grads = [None] * len(params)
        if wants:
            def F_of_params(*ps):
                full = list(params)
                for i, p in zip(wants, ps):
                    full[i] = p
                return _flat(residual(x, *full))

            _, vjp_p = vjp(F_of_params, *[params[i] for i in wants])
            for i, gi in zip(wants, vjp_p(-w.reshape(B, -1))):
                grads[i] = gi
        return (None, None, None, *grads)


def _dense_adjoint(vjp_x, g: torch.Tensor, opts) -> torch.Tensor:
    """Assemble J = ∂F/∂x per sample from n vjps, check it, solve Jᵀ w = g."""
    B, n = g.shape
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    # Row k of J for every sample: vjp with e_k → Jᵀ e_k = (row k of J)ᵀ.
    rows = torch.func.vmap(lambda e: vjp_x(e.expand(B, n))[0])(eye)  # (n, B, n)
    J = rows.transpose(0, 1)  # (B, n, n), J[b, k, :] = ∂F_k/∂x
    sv = torch.linalg.svdvals(J)
    rcond = opts["rcond"] if opts["rcond"] is not None else (
        100 * n * torch.finfo(g.dtype).eps)
    ratio = sv[:, -1] / sv[:, 0].clamp_min(torch.finfo(g.dtype).tiny)
    bad = ~(ratio > rcond)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ImplicitFunctionError(
            f"∂F/∂x is singular at sample {i} (σ_min/σ_max = {float(ratio[i]):.1e} ≤ "
            f"{rcond:.1e}): the implicit function theorem's invertibility condition fails, "
            "so the solution is not a differentiable function of the parameters there."
        )
    Jt = J.mT
    if n <= BATCHED_LU_MAX or g.device.type != "cpu":
        return torch.linalg.solve(Jt, g)
    return torch.stack([torch.linalg.solve(Jt[b], g[b]) for b in range(B)])
