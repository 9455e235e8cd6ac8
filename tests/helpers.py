"""Test utilities: tensors, weighted gradients, solver settings, a conic-path layer.

The references themselves (Clarabel solves, central differences, random QPs,
closed forms) live in `references`, shared with the benchmarks; they are
re-exported here under the names the tests import.
"""

from __future__ import annotations

import numpy as np
import torch
from references import (  # noqa: F401  (re-exported)
    CLARABEL_TIGHT,
    central_differences,
    directional_difference,
    qp_kkt_error,
    qp_polished_reference,
    qp_reference,
    random_qp,
    reference_solve,
    rel_err,
)

SCS_TIGHT = {"eps": 1e-12, "max_iters": 100_000}
CLARABEL_ARGS = {"solve_method": "Clarabel", **CLARABEL_TIGHT}
# Exponential cones: SCS stalls short of 1e-12 (max_iters) but reaches 1e-10 cleanly.
SCS_EXP = {"eps": 1e-10, "max_iters": 100_000}


def as_tensor(a, grad=False, dtype=torch.float64):
    """A fresh tensor from array-like data (float64 unless told)."""
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=grad)


def weighted_grads(outputs, inputs, weights):
    """Gradient of Σ_k <weights_k, outputs_k> with respect to each input."""
    loss = sum((w * o).sum() for w, o in zip(weights, outputs))
    return torch.autograd.grad(loss, inputs)


def conic_layer(problem, parameters, variables, **kwargs):
    """A CvxpyLayer forced onto the conic (diffcp) path, whatever ``backend="auto"`` picks."""
    from declarative.torch import CvxpyLayer

    kwargs.setdefault("backend", "conic")
    return CvxpyLayer(problem, parameters, variables, **kwargs)
