"""Exceptions users can act on."""

from __future__ import annotations

from collections.abc import Sequence

from .backends.status import Status


def _solver_error_base() -> type[Exception]:
    """``diffcp.SolverError`` where diffcp imports, else a plain ``Exception``.

    Code written for cvxpylayers catches ``diffcp.SolverError`` (cvxpylayers let
    diffcp's error through), so ours subclasses it whenever diffcp is there. An
    exported layer on a torch route runs without diffcp (and without CVXPY, which
    diffcp imports), so diffcp is no hard dependency of this module.
    """
    try:
        from diffcp import SolverError as DiffcpSolverError
    except ImportError:
        return Exception
    return DiffcpSolverError


class SolverError(_solver_error_base()):
    """One or more samples of a batch have no usable solution.

    A subclass of ``diffcp.SolverError`` when diffcp is importable, so that code
    written for cvxpylayers keeps catching it (of ``Exception`` otherwise).
    ``indices`` lists the failing batch positions and ``statuses`` their
    `Status`, in the same order.
    """

    def __init__(self, indices: Sequence[int], statuses: Sequence[Status], detail: str = ""):
        self.indices = list(int(i) for i in indices)
        self.statuses = list(statuses)
        shown = ", ".join(f"{i}: {s}" for i, s in list(zip(self.indices, self.statuses))[:20])
        more = "" if len(self.indices) <= 20 else f", ... ({len(self.indices)} in all)"
        msg = (f"Solver failed on {len(self.indices)} sample(s) of the batch "
               f"(index: status) {{{shown}{more}}}.")
        if detail:
            msg += " " + detail
        msg += (" Pass on_failure='mask' to get the other samples with NaN in the failed"
                " ones, or return_info=True to inspect statuses.")
        super().__init__(msg)
        self._detail = detail

    def __reduce__(self):
        # Errors cross process boundaries (DataLoader workers, multiprocessing).
        return (type(self), (self.indices, self.statuses, self._detail))


class ParameterTypeError(TypeError, AttributeError):
    """A parameter value is not a torch.Tensor.

    Also an ``AttributeError``, which is what cvxpylayers raised for the same
    mistake, so existing ``except`` clauses keep working.
    """
