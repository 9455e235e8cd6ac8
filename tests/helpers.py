"""Shared references for the tests: CVXPY + Clarabel solves and finite differences."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import torch

# Tight interior-point tolerances: references must be far more accurate than
# the tolerances the tests assert.
CLARABEL_TIGHT = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10,
                      tol_ktratio=1e-10, max_iter=500)
SCS_TIGHT = {"eps": 1e-12, "max_iters": 100_000}
CLARABEL_ARGS = {"solve_method": "Clarabel", **CLARABEL_TIGHT}


def reference_solve(problem: cp.Problem, parameters, values, outputs, **solver_opts):
    """Solve with CVXPY (Clarabel) at the given values; restore Parameter values after.

    ``outputs`` are Variables or dual Variables; returns their values as arrays.
    """
    old = [p.value for p in parameters]
    try:
        for p, v in zip(parameters, values):
            p.value = np.asarray(v, dtype=np.float64)
        opts = dict(CLARABEL_TIGHT)
        opts.update(solver_opts)
        problem.solve(solver=cp.CLARABEL, **opts)
        if problem.status not in ("optimal",):
            raise RuntimeError(f"reference solve status {problem.status}")
        return [np.array(v.value, dtype=np.float64) for v in outputs]
    finally:
        for p, v in zip(parameters, old):
            p.value = v


def central_differences(fn, inputs, weights, eps=1e-6):
    """d(Σ weights·fn(inputs))/d(inputs) by central differences, input by input."""
    grads = []
    for k, x in enumerate(inputs):
        g = torch.zeros_like(x)
        flat = g.view(-1)
        for j in range(x.numel()):
            plus = [t.clone() for t in inputs]
            minus = [t.clone() for t in inputs]
            plus[k].view(-1)[j] += eps
            minus[k].view(-1)[j] -= eps
            fp = sum((w * o).sum() for w, o in zip(weights, fn(*plus)))
            fm = sum((w * o).sum() for w, o in zip(weights, fn(*minus)))
            flat[j] = (fp - fm) / (2 * eps)
        grads.append(g)
    return grads


def rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def conic_layer(problem, parameters, variables, **kwargs):
    """A CvxpyLayer forced onto the conic (diffcp) path, whatever ``backend="auto"`` picks."""
    from declarative.torch import CvxpyLayer

    kwargs.setdefault("backend", "conic")
    return CvxpyLayer(problem, parameters, variables, **kwargs)
