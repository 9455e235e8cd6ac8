"""Per-sample solver outcomes, shared by every backend (no torch here)."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """What a backend reports for one sample of a batch."""

    OPTIMAL = "optimal"
    OPTIMAL_INACCURATE = "optimal_inaccurate"
    INFEASIBLE = "infeasible"
    UNBOUNDED = "unbounded"
    MAX_ITER = "max_iter"
    INVALID_INPUT = "invalid_input"
    NUMERICAL_ERROR = "numerical_error"

    def __str__(self) -> str:
        return self.value

    @property
    def has_solution(self) -> bool:
        """A point is returned that the caller may use (possibly with a warning)."""
        return self in (Status.OPTIMAL, Status.OPTIMAL_INACCURATE, Status.MAX_ITER)


class Box:
    """A per-call mailbox a backend's autograd Function writes its result into.

    A plain object on purpose: torch.func flattens dict arguments into new
    dicts (pytree), so a dict would not carry the result back to the caller.
    """

    result = None
    solved = None
