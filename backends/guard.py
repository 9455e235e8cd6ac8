"""One rule for the implicit backward passes: differentiated once, never silently twice."""

from __future__ import annotations

import torch

from .functorch import is_wrapped


class _RefuseSecondOrder(torch.autograd.Function):
    """Identity on a gradient, anchored to the layer's outputs; its backward raises."""

    @staticmethod
    def forward(ctx, where: str, grad, *anchors):
        ctx.where = where
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"Double backward through the {ctx.where} is not supported: its backward is an "
            "implicit solve, differentiated once (the second-order term would be missing). "
            "Use the simplex/softmax paths (plain autograd) for higher-order derivatives."
        )


def guard_second_order(where: str, grads, anchors):
    """The gradients, marked so that differentiating them again raises.

    Under ``create_graph=True`` torch records nothing for a backward computed
    without a graph when the upstream gradient is constant, so a Hessian-vector
    product would silently miss this layer's term. Each gradient is routed
    through a node tied to the layer's outputs (``anchors``) whose backward
    raises. torch.func (autograd with create_graph on wrapped tensors) is let
    through: its transforms go through the Functions' own vmap rules.
    """
    if not torch.is_grad_enabled():
        return grads
    anchors = [a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad]
    if not anchors or any(isinstance(g, torch.Tensor) and is_wrapped(g) for g in grads):
        return grads
    return tuple(None if g is None else _RefuseSecondOrder.apply(where, g, *anchors)
                 for g in grads)
