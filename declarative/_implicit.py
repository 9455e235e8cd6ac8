"""`implicit`: differentiate any solver by the implicit function theorem.

Given a forward solver (any torch code; it is run without autograd, so its
iterations are never stored) and a residual F with F(x*, θ) = 0 at the
solution, the returned function gives x*(θ) whose vector-Jacobian product is

    ∇_θ ℓ = −(∂F/∂θ)ᵀ w,    where   (∂F/∂x)ᵀ w = ∇_x ℓ,

the IFT's dx/dθ = −(∂F/∂x)⁻¹ ∂F/∂θ (the seed's section 3) applied to the
upstream gradient. Both Jacobians enter only through products computed with
``torch.func.vjp``; the linear system is solved densely (the Jacobian is
assembled from n products, equilibrated, then factored) or matrix-free with
GMRES (MINRES when ``symmetric=True``).

Higher derivatives (``create_graph=True``): the backward is itself made of
differentiable pieces. The adjoint solve is a `_LinearSolve` Function whose
own backward is again an implicit solve (with ∂F/∂x, untransposed) plus the
second-derivative term −∇_{x,θ}[aᵀ (∂F/∂x) b], computed by reverse-over-reverse
``torch.func``; so Hessians and Hessian-vector products through `implicit` are
exact to the linear solves' accuracy, at any order (they need F twice
differentiable). Every solve, of any order, goes through the same checks.

Batching: x has a leading batch dimension B and F is applied row by row, so
∂F/∂x is block diagonal (samples do not interact). Parameters may be batched
(leading dimension B) or shared.

The IFT's conditions are checked where they can be: the residual must vanish
at the returned point (``residual_tol``), and the adjoint system must be
solvable — see `implicit`'s docstring for the per-method criterion; failure is
an `ImplicitFunctionError` naming the sample, never a NaN (unless the upstream
gradient carries one) or a wrong gradient.

Example (the seed's unit circle, x = √(1 − θ²), dx/dθ = −θ/x)::

    circle = implicit(lambda th: torch.sqrt(1 - th**2),
                      lambda x, th: th**2 + x**2 - 1)
    x = circle(theta)          # differentiable in theta, to any order
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vjp

from .backends.krylov import gmres, minres

METHODS = ("dense", "iterative")
# Largest system solved with batched LU: torch's CPU batched LU is unreliable
# on matrices of about 150×150 and larger (wrong pivots; see NOTES.md), so
# bigger systems are solved one sample at a time.
BATCHED_LU_MAX = 128
# Column-then-row ∞-norm normalizations of ∂F/∂x after the first row one. One
# sweep reached the fixed point on every random test matrix (more changed nothing);
# each costs two passes over the n×n Jacobian.
EQUILIBRATION_SWEEPS = 1
# Default rcond: this many times n times machine epsilon.
RCOND_FACTOR = 100
# Default relative tolerance of the iterative solve, by dtype.
ITERATIVE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# The Krylov solvers report convergence at this multiple of tol (their own
# convention, see backends/krylov.py).
KRYLOV_SLACK = 10


class ImplicitFunctionError(ValueError):
    """A condition of the implicit function theorem fails at the solution."""


def implicit(solve: Callable, residual: Callable, *, method: str = "dense",
             symmetric: bool = False, tol: float | None = None, max_iter: int = 1000,
             residual_tol: float | None = 1e-6, rcond: float | None = None):
    """Wrap ``solve`` so its output is differentiable through ``residual``.

    Args:
        solve: ``solve(*params) -> x`` with x of shape (B, *shape); run under no_grad.
        residual: ``residual(x, *params) -> F`` with F of x's shape, zero at the solution,
            each row depending only on its own sample. Twice differentiable if second
            derivatives through the layer are wanted.
        method: "dense" (assemble ∂F/∂x per sample and factor it) or "iterative"
            (matrix-free GMRES / MINRES on products with ∂F/∂x).
        symmetric: ∂F/∂x is symmetric (e.g. F is a gradient): MINRES instead of GMRES.
        tol, max_iter: the iterative solve's relative tolerance (default 1e-10 in
            float64, 1e-5 in float32) and iteration cap.
        residual_tol: largest allowed ‖F(x, θ)‖∞ / (1 + ‖x‖∞) at the returned point
            (None skips the check).
        rcond: dense method: smallest allowed σ_min/σ_max of the equilibrated ∂F/∂x
            (default: 100 × n × machine epsilon).

    When the gradient is refused (`ImplicitFunctionError`, naming the first failing
    sample):

    - dense: ∂F/∂x is numerically singular, i.e. σ_min/σ_max ≤ rcond for the
      equilibrated D_r (∂F/∂x) D_c, whose rows, then columns, then rows are scaled to
      unit ∞-norm. The test is invariant to rescaling F's equations and nearly so to
      rescaling x's entries (a balancing, not an exact invariant); a zero row or
      column is singular. The solve uses the same equilibrated matrix.
    - iterative: the Krylov solve does not reach relative residual ``tol`` (×10) in
      ``max_iter`` iterations. A singular ∂F/∂x makes (∂F/∂x)ᵀ w = ∇_x ℓ unsolvable
      for almost every upstream gradient, so this is how singularity shows. When the
      system is solved anyway (∇_x ℓ lies in the range of (∂F/∂x)ᵀ), the result is
      exact in every direction in which x*(θ) is differentiable: differentiating
      F(x*(θ), θ) = 0 gives −(∂F/∂θ)ᵀ w = (dx*/dθ)ᵀ (∂F/∂x)ᵀ w = (dx*/dθ)ᵀ ∇_x ℓ.
      The solvers are not preconditioned: equations of F or entries of x on very
      different scales slow them down, and where that keeps them from ``tol`` the
      gradient is refused too (rescale F, or use the dense method).

    Iterative: samples whose upstream gradient is not finite are not checked (their
    gradient is NaN); the other samples' are unaffected, as with the dense method.
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


def _check_residual(residual, x, params, residual_tol):
    """Condition 1: F(x, θ) = 0 at the solver's output, per sample."""
    with torch.no_grad():
        F = _flat(residual(x, *params))
    size = F.abs().amax(-1) / (1 + _flat(x).abs().amax(-1))
    bad = (size > residual_tol) | ~torch.isfinite(size)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ImplicitFunctionError(
            f"the residual does not vanish at the solver's output (condition 1 of "
            f"the implicit function theorem): sample {i} has scaled ‖F‖∞ = "
            f"{float(size[i]):.2e} > residual_tol = {residual_tol:g}. "
            "Solve more accurately or check that residual(x, *params) is zero at the "
            "solution."
        )


class _Implicit(torch.autograd.Function):
    """x = solve(θ) forward; backward −(∂F/∂θ)ᵀ w with w from `_LinearSolve`.

    x is saved as an output, so under create_graph the backward's dependence on x
    is differentiated through this same node (x*(θ) again), and w's through
    `_LinearSolve`'s backward.
    """

    @staticmethod
    def forward(ctx, solve, residual, options, *params):
        with torch.no_grad():
            x = solve(*params)
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError("solve(*params) must return a tensor with a leading batch dimension.")
        x = x.detach()
        if options["residual_tol"] is not None:
            _check_residual(residual, x, params, options["residual_tol"])
        ctx.residual = residual
        ctx.options = options
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    def backward(ctx, gx):
        x, *params = ctx.saved_tensors
        residual = ctx.residual
        wants = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        if not wants:
            return (None, None, None, *[None] * len(params))
        # (∂F/∂x)ᵀ w = ∇x ℓ; w has F's (= x's) shape.
        w = _LinearSolve.apply(residual, ctx.options, True, gx, x, *params)

        # ∇θ = −(∂F/∂θ)ᵀ w, one vjp through all wanted parameters at once.
        def F_of_params(*ps):
            full = list(params)
            for i, p in zip(wants, ps):
                full[i] = p
            return residual(x, *full)

        _, vjp_p = vjp(F_of_params, *[params[i] for i in wants])
        grads = [None] * len(params)
        for i, gi in zip(wants, vjp_p(-w)):
            grads[i] = gi
        return (None, None, None, *grads)


class _LinearSolve(torch.autograd.Function):
    """y with A y = rhs, A = ∂F/∂x at (x, θ) (transpose=False) or its transpose.

    Backward: dy = A⁻¹ (d rhs − dA y), so with v = A⁻ᵀ ȳ (again a `_LinearSolve`,
    transpose flipped) rhs gets v and (x, θ) get −∇_{x,θ}[vᵀ A y], which is
    −∇[aᵀ (∂F/∂x) b] with (a, b) = (v, y) for A = ∂F/∂x and (y, v) for its
    transpose. Everything is in differentiable ops, so any order works.
    """

    @staticmethod
    def forward(ctx, residual, options, transpose, rhs, x, *params):
        y = _solve(residual, options, transpose, rhs, x, params)
        ctx.residual, ctx.options, ctx.transpose = residual, options, transpose
        ctx.save_for_backward(y, x, *params)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, x, *params = ctx.saved_tensors
        residual, transpose = ctx.residual, ctx.transpose
        v = _LinearSolve.apply(residual, ctx.options, not transpose, gy, x, *params)
        needs = ctx.needs_input_grad[4:]  # x, *params
        wants = [i for i, need in enumerate(needs) if need]
        grads = [None] * len(needs)
        if wants:
            a, b = (y, v) if transpose else (v, y)
            for i, gi in zip(wants, _bilinear_gradient(residual, a, b, x, params, wants)):
                grads[i] = -gi
        return (None, None, None, v, *grads)


def _bilinear_gradient(residual, a, b, x, params, wants):
    """∇ of Σ_samples aᵀ (∂F/∂x)(x, θ) b with respect to (x, *params)[wants].

    Reverse over reverse: aᵀ (∂F/∂x) b = ⟨(∂F/∂x)ᵀ a, b⟩, the inner product with a
    vjp, differentiated by torch.func.grad (partial derivatives: x and θ are
    independent arguments here, whatever links them in the outer graph).
    """
    inputs = [x, *params]

    def h(*chosen):
        full = list(inputs)
        for i, t in zip(wants, chosen):
            full[i] = t
        _, pull = vjp(lambda z: residual(z, *full[1:]), full[0])
        return (pull(a)[0] * b).sum()

    return torch.func.grad(h, argnums=tuple(range(len(wants))))(*[inputs[i] for i in wants])


def _solve(residual, opts, transpose, rhs, x, params):
    """A y = rhs with A = ∂F/∂x (or its transpose) at (x, θ), all of x's shape."""
    shape = x.shape

    def F_flat(xv):
        return _flat(residual(xv.reshape(shape), *params))

    _, pull = vjp(F_flat, _flat(x))  # pull(u) = (∂F/∂x)ᵀ u
    g = _flat(rhs)
    if opts["method"] == "dense":
        y = _dense_solve(pull, g, transpose, opts)
    else:
        y = _iterative_solve(pull, g, transpose, opts)
    return y.reshape(shape)


def _equilibrate(J: torch.Tensor):
    """(D_r J D_c, d_r, d_c, finite) for J (B, n, n): rows, columns, rows of unit ∞-norm.

    Each step divides by the current maxima exactly, so the result depends on J only
    through its row-normalized form: rescaling F's equations changes nothing. For the
    scale of x's entries it is a balancing, not an invariant: with entries spread
    over ±14 decades σ_min/σ_max moved by at most 3 decades on random matrices, where
    the unscaled ratio moves by 25. Zero rows and columns keep scale 1 (they are
    singular whatever the scaling).
    """
    def inverse(norms):
        return torch.where(norms > 0, 1 / norms, torch.ones_like(norms))

    M = J.abs()
    row_max = M.amax(-1)  # amax propagates NaN: a non-finite J shows here
    finite = torch.isfinite(row_max).all(-1)
    d_r = inverse(row_max)
    for _ in range(EQUILIBRATION_SWEEPS):
        d_c = inverse((d_r.unsqueeze(-1) * M).amax(-2))
        d_r = inverse((M * d_c.unsqueeze(-2)).amax(-1))
    return d_r.unsqueeze(-1) * J * d_c.unsqueeze(-2), d_r, d_c, finite


def _dense_solve(pull, g: torch.Tensor, transpose: bool, opts) -> torch.Tensor:
    """Assemble J = ∂F/∂x per sample from n vjps, check it, solve Jᵀ y = g or J y = g."""
    B, n = g.shape
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    # Row k of J for every sample: vjp with e_k → Jᵀ e_k = (row k of J)ᵀ.
    rows = torch.func.vmap(lambda e: pull(e.expand(B, n))[0])(eye)  # (n, B, n)
    J = rows.transpose(0, 1)  # (B, n, n), J[b, k, :] = ∂F_k/∂x
    A, d_r, d_c, finite = _equilibrate(J)  # A = D_r J D_c
    if not bool(finite.all()):  # svdvals refuses those; they are reported as singular
        A = torch.where(finite[:, None, None], A, torch.zeros_like(A))
    sv = torch.linalg.svdvals(A)
    rcond = opts["rcond"] if opts["rcond"] is not None else (
        RCOND_FACTOR * n * torch.finfo(g.dtype).eps)
    ratio = sv[:, -1] / sv[:, 0].clamp_min(torch.finfo(g.dtype).tiny)
    # (A NaN right-hand side only spoils its own sample: it is not checked.)
    bad = ~(ratio > rcond)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        what = (f"σ_min/σ_max = {float(ratio[i]):.1e} ≤ {rcond:.1e} after equilibration"
                if bool(finite[i]) else "it has non-finite entries")
        raise ImplicitFunctionError(
            f"∂F/∂x is singular at sample {i} ({what}): the implicit function theorem's "
            "invertibility condition fails, so the solution is not a differentiable "
            "function of the parameters there."
        )
    # Jᵀ y = g  ⇔  Aᵀ (y / d_r) = d_c g;   J y = g  ⇔  A (y / d_c) = d_r g.
    M, scale_in, scale_out = (A.mT, d_c, d_r) if transpose else (A, d_r, d_c)
    u = _lu_solve(M, scale_in * g)
    return scale_out * u


def _lu_solve(M: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if M.shape[-1] <= BATCHED_LU_MAX or g.device.type != "cpu":
        return torch.linalg.solve(M, g)
    return torch.stack([torch.linalg.solve(M[b], g[b]) for b in range(g.shape[0])])


def _iterative_solve(pull, g: torch.Tensor, transpose: bool, opts) -> torch.Tensor:
    """Matrix-free Jᵀ y = g (products pull) or J y = g (products pull's vjp)."""
    if transpose:
        def matvec(v):
            return pull(v)[0]
    else:
        # u ↦ Jᵀu is linear; its vjp with v is J v (reverse over reverse, so only
        # what second derivatives need anyway, no forward-mode rules).
        _, push = vjp(lambda u: pull(u)[0], torch.zeros_like(g))

        def matvec(v):
            return push(v)[0]

    solver = minres if opts["symmetric"] else gmres
    tol = opts["tol"] if opts["tol"] is not None else ITERATIVE_TOL.get(g.dtype, 1e-10)
    y, info = solver(matvec, g, tol=tol, max_iter=opts["max_iter"])
    bad = ~info.converged & torch.isfinite(g).all(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        system = "(∂F/∂x)ᵀ w = ∇x ℓ" if transpose else "(∂F/∂x) v = ∇w"
        raise ImplicitFunctionError(
            f"the iterative solve of {system} failed at sample {i}: relative residual "
            f"{float(info.residual[i]):.1e} > {KRYLOV_SLACK * tol:.0e} after "
            f"{info.iterations} iterations. Either ∂F/∂x is singular there (the implicit "
            "function theorem's invertibility condition fails) or the system is too "
            "ill-conditioned or badly scaled for tol and max_iter; method='dense' tells "
            "the two apart."
        )
    return y
