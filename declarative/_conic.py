"""Torch wiring of the conic backend: one autograd Function around diffcp.

The Function sees only θ, the (B, len θ) parameter matrix built by the layer
in torch; broadcasting, dtype casts and the DGP log transform stay in plain
autograd outside it, so their derivatives (including the sum over the batch
for a broadcast parameter) come from torch itself.
"""

from __future__ import annotations

import numpy as np
import torch

from .backends import conic
from .backends.functorch import is_vmapped, is_wrapped
from .backends.guard import guard_second_order


class ConicSolve(torch.autograd.Function):
    """θ (B, len θ) -> the requested outputs, each (B, size_k), float64.

    ``box`` is a per-call `Box` that receives the `ConicResult`, so statuses
    reach the caller without any state on the layer (thread-safe).
    """

    @staticmethod
    def forward(ctx, theta: torch.Tensor, form,
                settings: conic.ConicSettings, need_derivative: bool, box,
                warm: dict | None = None):
        theta_np = theta.detach().to("cpu", torch.float64).numpy()
        result = conic.solve(form.program, theta_np, settings, need_derivative, warm)
        box.result = result
        outs = []
        for rec in form.outputs:
            v = result.x if rec.is_primal else result.y
            outs.append(torch.from_numpy(rec.apply(v)).to(theta.device))
        ctx.result = result
        ctx.form = form
        ctx.save_for_backward(*outs)
        ctx.device = theta.device
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        outputs = ctx.saved_tensors  # raises if the graph was already freed
        with torch.no_grad():
            dtheta, *rest = ConicSolve._backward(ctx, grads)
        (dtheta,) = guard_second_order("conic path (diffcp)", (dtheta,), outputs)
        return (dtheta, *rest)

    @staticmethod
    def _backward(ctx, grads):
        result, form = ctx.result, ctx.form
        B = result.x.shape[0]
        dx = np.zeros((B, form.program.n))
        dy = np.zeros((B, form.program.m))
        for g, rec in zip(grads, form.outputs):
            if g is None:
                continue
            gn = g.detach().to("cpu", torch.float64).numpy()
            if rec.is_primal:
                dx += rec.adjoint(gn)
            else:
                dy += rec.adjoint(gn)
        # A NaN upstream gradient stays in its own sample: the adjoint is per sample.
        dtheta = result.vjp(dx, dy)
        return torch.from_numpy(dtheta).to(ctx.device), None, None, None, None, None


def refuse_functorch(params) -> None:
    """The conic path runs diffcp in numpy: torch.func transforms cannot see through it."""
    wrapped = [p for p in params if is_wrapped(p)]
    if not wrapped:
        return
    which = ("torch.func.vmap" if any(is_vmapped(p) for p in wrapped)
             else "torch.func.grad/jacrev/jacfwd/jvp")
    raise NotImplementedError(
        f"{which} is not supported on the conic path: diffcp solves in numpy, outside "
        "torch's transforms. Use the layer's own batch dimension instead of vmap, "
        "torch.autograd.functional.jacobian instead of jacrev, or a problem the QP or "
        "entropy paths take (they support vmap and jacrev)."
    )
