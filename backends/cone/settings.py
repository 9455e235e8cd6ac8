"""Named settings of the batched conic interior point."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ConeSettings:
    # Stopping tolerance on the scaled primal and dual residuals and on the
    # relative duality gap (`ipm`). None picks a default by the input's dtype:
    # float64 inputs get 1e-10 (one or two Newton steps past 1e-8, and the
    # backward's system is then exact to that order); float32 inputs, whose
    # results are rounded to 6e-8 anyway, get 1e-7. The solver computes in
    # float64 either way (`compute_dtype`).
    eps: float | None = None
    # `eps` only tightens the dtype's default (a front door passing a peer's
    # looser eps=1e-6 means "at least this accurate").
    eps_tightens: bool = False
    # Iteration cap; a sample still running there gets status max_iter.
    max_iter: int = 100
    # Fraction of the step to the boundary of the cone (keeps s, z interior).
    step_fraction: float = 0.99
    # Static regularization of the Newton system, relative to its scale: +δ on
    # the x block and −δ on the zero cone's rows (whose H is 0), as Clarabel
    # does; iterative refinement against the unregularized system removes it.
    static_reg: float = 1e-8
    # A failed Cholesky is retried with the x-block shift multiplied by 100.
    regularization_tries: int = 6
    # Iterative-refinement steps on each interior-point Newton solve: one repairs the
    # regularization; the final polish and the backward refine further
    # (`limit_refine_steps`), so the iterates' steps need no more.
    refine_steps: int = 1
    # Refinement steps of the polish's and the backward's solves (the limit system).
    limit_refine_steps: int = 4
    # Relative threshold of the infeasibility certificates (Farkas ray / recession ray).
    infeas_tol: float = 1e-8
    # Stop a sample after this many iterations without a 10% improvement of its
    # worst residual; within √eps it is optimal_inaccurate, else it runs on.
    not_improved_lim: int = 8
    # Newton steps on the normal map after the interior point (`engine._polish`):
    # exact complementarity, so x to the arithmetic's accuracy (0: no polish).
    polish_steps: int = 2
    # Ruiz sweeps of the equilibration (`scaling`).
    ruiz_sweeps: int = 10
    # The dtype the solver computes in (None: float64 whatever the input).
    compute_dtype: torch.dtype | None = None

    def __post_init__(self):
        if not (0.0 < self.step_fraction < 1.0):
            raise ValueError(f"step_fraction must lie in (0, 1), got {self.step_fraction}.")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter}.")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}.")
        if not self.infeas_tol > 0:
            raise ValueError(f"infeas_tol must be positive, got {self.infeas_tol}.")
        if not self.static_reg > 0:
            raise ValueError(f"static_reg must be positive, got {self.static_reg}.")
        if self.refine_steps < 0 or self.ruiz_sweeps < 0:
            raise ValueError("refine_steps and ruiz_sweeps must be non-negative.")
        if self.compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, torch.float32 or torch.float64, "
                             f"got {self.compute_dtype!r}.")

    def tolerance(self, input_dtype: torch.dtype) -> float:
        default = 1e-10 if input_dtype == torch.float64 else 1e-7
        if self.eps is None:
            return default
        return min(float(self.eps), default) if self.eps_tightens else float(self.eps)

    def with_(self, **changes) -> ConeSettings:
        return replace(self, **changes)
