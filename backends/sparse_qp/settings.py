"""Named settings of the sparse interior-point QP solver.

The fields it shares with the dense engine (`backends.qp.QPSettings`) have the
same names and meanings, so a route can pass the same solver arguments to
either (`SparseQPSettings.from_qp`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from ..qp.settings import check_interior_point

# The stopping tolerance when none is given. Every computation runs in float64
# (the factorization library has no other precision), whatever the input dtype.
DEFAULT_EPS = 1e-10


@dataclass(frozen=True)
class SparseQPSettings:
    # Stopping tolerance on the scaled residuals and complementarity (`ipm`).
    eps: float | None = None
    # `eps` only ever tightens the default (code written for SCS passes 1e-6).
    eps_tightens: bool = False
    # Iteration cap; a sample still running there gets status max_iter.
    max_iter: int = 50
    # Wall-clock limit of one call in seconds (None: none); samples still running
    # then stop with status max_iter and their best iterate.
    time_limit: float | None = None
    # Fraction of the step to the boundary: 1 − σ clamped to [step_fraction,
    # step_fraction_max] (as the dense engine; σ is Mehrotra's centering).
    step_fraction: float = 0.99
    step_fraction_max: float = 0.9999
    # Relative threshold of the infeasibility / unboundedness certificates.
    infeas_tol: float = 1e-8
    # A sample within √eps that has not improved its residuals by 10% for this
    # many iterations stops as optimal_inaccurate (the arithmetic's floor).
    not_improved_lim: int = 8
    # Static regularization δ of the quasi-definite KKT matrix (+δ on the primal
    # block, −δ on the dual ones; the data are equilibrated, so δ is relative to
    # unit-sized entries). It makes an LDLᵀ factorization exist in any symmetric
    # order; iterative refinement with the exact matrix removes its effect (OSQP
    # and Clarabel do the same; Clarabel's default is 1e-8).
    static_regularization: float = 1e-8
    # When a factorization breaks down (a non-finite solve, or refinement that
    # does not converge), δ is multiplied by 100 and the matrix refactored, at
    # most this many times.
    regularization_tries: int = 4
    # Iterative refinement of every KKT solve: at most refine_steps corrections,
    # until the residual is refine_tol relative to the right-hand side; it also
    # stops when a step gains less than a factor refine_stall.
    refine_steps: int = 10
    refine_tol: float = 1e-14
    refine_stall: float = 0.5
    # Worker threads over the samples of a batch: a count, or -1 for one per core
    # where the factorization is large enough to pay for them (parallel_min_flops).
    # qdldl's factorization and solves release the GIL, but the interior point's
    # small vector operations hold it: on small problems threads only contend for
    # it (measured on a 2-core machine, batch 16: 112 ms with 2 threads against
    # 42 ms with one at n = 100, 0.18 s against 0.10 s at n = 200, equal at
    # n = 500 with 2e7 flops per factorization). BLAS is held to one thread while
    # workers run.
    threads: int = -1
    parallel_min_flops: float = 1e7

    def __post_init__(self):
        check_interior_point(self, "infeas_tol", "static_regularization", "refine_tol")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}.")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive seconds, got {self.time_limit}.")
        if self.threads == 0 or self.threads < -1:
            raise ValueError(f"threads must be -1 (one per core) or a positive count, got "
                             f"{self.threads}.")

    def tolerance(self) -> float:
        if self.eps is None:
            return DEFAULT_EPS
        return min(float(self.eps), DEFAULT_EPS) if self.eps_tightens else float(self.eps)

    def workers(self, batch: int, factor_flops: float) -> int:
        """Threads for a batch whose KKT factorization costs ``factor_flops``."""
        if self.threads == -1:
            n = (os.cpu_count() or 1) if factor_flops >= self.parallel_min_flops else 1
        else:
            n = self.threads
        return max(1, min(n, batch))

    def with_(self, **changes) -> SparseQPSettings:
        return replace(self, **changes)

    @classmethod
    def from_qp(cls, qp_settings, **changes) -> SparseQPSettings:
        """The fields a dense `QPSettings` shares with this class, plus ``changes``."""
        mine = {f.name for f in fields(cls)}
        shared = {f.name: getattr(qp_settings, f.name) for f in fields(qp_settings)
                  if f.name in mine}
        return cls(**{**shared, **changes})
