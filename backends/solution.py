"""What every route's solve returns: a `Solution`, and the one status criterion.

A route's backend decides each sample's status on the device, as an integer
code (`CODES`: the position in `Status`), and reports three scaled measures of
how far its point is from optimal, with one meaning on every route:

    residuals[:, 0]   primal residual (constraint violation), scaled
    residuals[:, 1]   dual residual (stationarity), scaled
    residuals[:, 2]   gap: complementarity or relative suboptimality

(each backend's docstring says how it scales them). A point is only returned
under a status whose limits it meets (`ACCURACY`): a solver's "optimal" beyond
the first line is optimal_inaccurate, and a point beyond its status's line is
no solution at all, numerical_error unless the backend found a certificate of
infeasibility or unboundedness (`judge`). So a status never vouches for a point
it should not, whichever solver produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .status import Status

STATUSES: tuple[Status, ...] = tuple(Status)
CODES = {s: i for i, s in enumerate(STATUSES)}
OPTIMAL = CODES[Status.OPTIMAL]
INACCURATE = CODES[Status.OPTIMAL_INACCURATE]
INFEASIBLE = CODES[Status.INFEASIBLE]
UNBOUNDED = CODES[Status.UNBOUNDED]
MAX_ITER = CODES[Status.MAX_ITER]
INVALID = CODES[Status.INVALID_INPUT]
NUMERICAL = CODES[Status.NUMERICAL_ERROR]
# Codes whose samples carry a point.
WITH_POINT = (OPTIMAL, INACCURATE, MAX_ITER)


@dataclass(frozen=True)
class Accuracy:
    """How far from optimal a point returned under one status may be."""

    residual: float  # scaled primal and dual residuals, each at most this
    gap: float  # the gap measure at most this

    def holds(self, measures) -> bool:
        """For one sample's (primal, dual, gap)."""
        primal, dual, gap = (float(v) for v in measures)
        return max(primal, dual) <= self.residual and gap <= self.gap


# The limits every route applies. OPTIMAL's sit an order of magnitude above SCS's
# default tolerance (1e-4) measured our way; the exact routes meet 1e-10. Beyond
# the usable limits a point is not an approximate solution (SCS returned
# (−663545, 1.001) as max_iter for a projection onto [0, 1]²).
ACCURACY = {
    Status.OPTIMAL: Accuracy(residual=1e-3, gap=1e-2),
    Status.OPTIMAL_INACCURATE: Accuracy(residual=1e-2, gap=1e-1),
    Status.MAX_ITER: Accuracy(residual=1e-2, gap=1e-1),
}


def judge(codes, residuals, certificate=None):
    """The status each sample's point earns under `ACCURACY` (codes (B,), residuals (B, 3)).

    ``certificate``: (B,) codes INFEASIBLE / UNBOUNDED where the backend's point
    proves it, anything else where it does not (used for points that fail).
    Tensors, or numpy arrays from the per-sample backends, judged where they are:
    on a batch of one the tensor operations' dispatch costs far more than the test.
    """
    xp = np if isinstance(codes, np.ndarray) else torch
    res = residuals.astype(np.float64) if xp is np else residuals.to(torch.float64)
    # NaN and +inf propagate through the maximum and fail every comparison: a
    # non-finite measure never holds.
    worst, gap = xp.maximum(res[:, 0], res[:, 1]), res[:, 2]

    def holds(code):
        lim = ACCURACY[STATUSES[code]]
        return (worst <= lim.residual) & (gap <= lim.gap)

    codes = xp.where((codes == OPTIMAL) & ~holds(OPTIMAL), INACCURATE, codes)
    # Every OPTIMAL left meets OPTIMAL's limits; the others must meet their own.
    fails = xp.zeros_like(codes, dtype=bool)
    for code in WITH_POINT[1:]:
        fails = fails | ((codes == code) & ~holds(code))
    if not bool(fails.any()):
        return codes
    proof = xp.full_like(codes, NUMERICAL)
    if certificate is not None:
        known = (certificate == INFEASIBLE) | (certificate == UNBOUNDED)
        proof = xp.where(known, certificate, proof)
    return xp.where(fails, proof, codes)


# The interior points' own codes (`qp.ipm`, `cone.ipm`: RUNNING, OPTIMAL, INFEASIBLE,
# UNBOUNDED, MAX_ITER, NUMERICAL, INACCURATE = 0 … 6) as shared codes; a sample
# still running when the loop ended reached the iteration cap.
_FROM_IPM = torch.tensor([MAX_ITER, OPTIMAL, INFEASIBLE, UNBOUNDED, MAX_ITER, NUMERICAL,
                          INACCURATE])


def from_ipm(codes: torch.Tensor) -> torch.Tensor:
    """An interior point's codes (B,) as shared codes, on their device."""
    return _FROM_IPM.to(codes.device)[codes]


def to_status(codes) -> tuple[Status, ...]:
    """Codes (a tensor or an array) as `Status` values: one host transfer."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().tolist()
    return tuple(STATUSES[int(c)] for c in np.asarray(codes).reshape(-1))


def codes_of(statuses) -> torch.Tensor:
    return torch.tensor([CODES[Status(s)] for s in statuses], dtype=torch.long)


@dataclass
class Solution:
    """A route's solve of a batch: per-sample codes, iterations and scaled residuals,
    and the state a later call may warm-start from. Backends return subclasses
    that carry what their backward needs."""

    codes: torch.Tensor  # (B,) long, see `CODES`
    iterations: torch.Tensor  # (B,)
    residuals: torch.Tensor  # (B, 3), see the module docstring

    @property
    def status(self) -> list[Status]:
        return list(to_status(self.codes))

    def warm_start(self) -> dict | None:
        """This solve's state as a starting point for the next call (None: none)."""
        return None
