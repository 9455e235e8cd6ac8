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
        ctx.device = theta.device
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
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
