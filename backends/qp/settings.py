"""Named settings of the batched interior-point QP solver."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

BACKWARD_MODES = ("implicit", "unroll", "iterative")
KKT_METHODS = ("auto", "schur", "reduced")


def check_interior_point(settings, *positive: str) -> None:
    """The checks both QP engines' settings share: step fractions in (0, 1), at
    least one iteration, and the named fields positive."""
    for name in ("step_fraction", "step_fraction_max"):
        value = getattr(settings, name)
        if not (0.0 < value < 1.0):
            raise ValueError(f"{name} must lie in (0, 1), got {value}.")
    if settings.max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {settings.max_iter}.")
    for name in positive:
        if not getattr(settings, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(settings, name)}.")


@dataclass(frozen=True)
class QPSettings:
    # Stopping tolerance on the scaled primal and dual residuals and on the
    # complementarity gap. None picks a default by dtype: float64 reaches 1e-10
    # in one or two Newton steps more than 1e-8; float32 cannot go below ~1e-6.
    eps: float | None = None
    # Iteration cap; a sample still running there gets status max_iter.
    max_iter: int = 50
    # Wall-clock limit of one solve in seconds (None: no limit); samples still
    # running then get status max_iter and their best iterate.
    time_limit: float | None = None
    # `eps` only ever tightens the dtype's default (CvxpyLayer sets this: code
    # written for SCS passes eps=1e-6 meaning "at least this accurate").
    eps_tightens: bool = False
    # Fraction of the step to the boundary of the positive orthant (keeps s, λ > 0):
    # 1 − σ (σ: Mehrotra's centering) clamped to [step_fraction, step_fraction_max]
    # (a step_fraction_max below step_fraction fixes the fraction at step_fraction).
    step_fraction: float = 0.99
    step_fraction_max: float = 0.9999
    # Relative threshold of the infeasibility certificates (Farkas / recession direction).
    infeas_tol: float = 1e-8
    # Stop a sample after this many iterations without residual improvement
    # (qpth's notImprovedLim); its status is then max_iter.
    not_improved_lim: int = 8
    # Elimination used for the Newton system:
    #   "schur"   (Q positive definite) dual Schur complement of size p with
    #             [G; A] Q⁻¹ [G; A]ᵀ formed once per call;
    #   "reduced" (any PSD Q) primal matrix Q + GᵀDG (+ρAᵀA) of size n;
    #   "auto"    the cheaper of the two by flop count, "reduced" when Q is singular.
    kkt: str = "auto"
    # First diagonal shift tried when a Cholesky factorization fails, relative to
    # the matrix's largest diagonal entry; multiplied by 100 on each retry.
    regularization: float = 1e-12
    regularization_tries: int = 6
    # Condition bound (max/min diagonal of chol(Q), squared, after equilibration)
    # above which "auto" avoids the Schur path: its change of variables amplifies
    # rounding by cond(Q).
    schur_max_condition: float = 1e10
    # Run exactly max_iter iterations on every sample (no early exit): for
    # measuring the backward's cost against the iteration count K (implicit
    # versus unroll). Slacks and multipliers are floored at SLACK_FLOOR so the
    # iteration stays finite after it has converged.
    fixed_iterations: bool = False
    backward: str = "implicit"
    # Q is always tested for semidefiniteness (its Cholesky, which the solver
    # needs anyway, settles the definite case; only a failed factorization pays
    # more). An indefinite sample gets status numerical_error, or with check_psd
    # a ValueError naming Q and the batch index (qpth's check_Q_spd).
    check_psd: bool = False
    # The dtype the solver computes in (None: float64 whatever the input dtype;
    # results come back in the input's). float32 halves memory traffic on GPUs
    # with slow float64, at the price of accuracy on ill-conditioned problems.
    compute_dtype: torch.dtype | None = None
    # Matrix-free backward ("iterative"): MINRES tolerance (None: 1e-10 in float64,
    # 1e-5 in float32) and iteration cap.
    iterative_tol: float | None = None
    iterative_max_iter: int = 1000

    def __post_init__(self):
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {self.backward!r}.")
        if self.kkt not in KKT_METHODS:
            raise ValueError(f"kkt must be one of {KKT_METHODS}, got {self.kkt!r}.")
        check_interior_point(self, "infeas_tol")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}.")
        if self.compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, torch.float32 or torch.float64, "
                             f"got {self.compute_dtype!r}.")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive seconds, got {self.time_limit}.")

    def tolerance(self, dtype: torch.dtype) -> float:
        default = 1e-10 if dtype == torch.float64 else 1e-5
        if self.eps is None:
            return default
        return min(float(self.eps), default) if self.eps_tightens else float(self.eps)

    def krylov_tolerance(self, dtype: torch.dtype) -> float:
        if self.iterative_tol is not None:
            return float(self.iterative_tol)
        return 1e-10 if dtype == torch.float64 else 1e-5

    def with_(self, **changes) -> QPSettings:
        return replace(self, **changes)
