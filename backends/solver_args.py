"""The solver_args every path accepts, with their types; no solver is imported here.

The torch paths accept the conic solvers' keys (and ignore them) so that code
written for cvxpylayers runs unchanged, and an exported layer on a torch path
checks its solver_args without diffcp installed: the tables live apart from
`backends.conic`, which imports diffcp.
"""

from __future__ import annotations

import numpy as np

_NUM = (int, float)

# Keys of solver_args that diffcp itself takes (the rest go to the solver).
DIFFCP_KEYS = {
    "solve_method": str,
    "mode": str,
    "n_jobs_forward": int,
    "n_jobs_backward": int,
    "derivative_kwargs": dict,
    "warm_starts": (list, tuple),
    "time_limit": (int, float),  # seconds; mapped to the solver's own setting
}
# Solver settings accepted per solve method, with their types (bool < int < float).
SOLVER_KEYS = {
    "SCS": {
        "eps": _NUM, "eps_abs": _NUM, "eps_rel": _NUM, "eps_infeas": _NUM,
        "max_iters": int, "time_limit_secs": _NUM, "acceleration_lookback": int,
        "acceleration_interval": int, "normalize": bool, "scale": _NUM,
        "adaptive_scale": bool, "rho_x": _NUM, "alpha": _NUM, "verbose": bool,
    },
    "ECOS": {
        "abstol": _NUM, "reltol": _NUM, "feastol": _NUM, "abstol_inacc": _NUM,
        "reltol_inacc": _NUM, "feastol_inacc": _NUM, "max_iters": int, "verbose": bool,
    },
    "Clarabel": {
        "max_iter": int, "time_limit": _NUM, "verbose": bool, "tol_gap_abs": _NUM,
        "tol_gap_rel": _NUM, "tol_feas": _NUM, "tol_infeas_abs": _NUM, "tol_infeas_rel": _NUM,
        "tol_ktratio": _NUM, "reduced_tol_gap_abs": _NUM, "reduced_tol_gap_rel": _NUM,
        "reduced_tol_feas": _NUM, "reduced_tol_infeas_abs": _NUM,
        "reduced_tol_infeas_rel": _NUM, "reduced_tol_ktratio": _NUM,
        "max_step_fraction": _NUM, "equilibrate_enable": bool, "equilibrate_max_iter": int,
        "static_regularization_enable": bool, "static_regularization_constant": _NUM,
        "dynamic_regularization_enable": bool, "iterative_refinement_enable": bool,
        "presolve_enable": bool, "direct_solve_method": str, "max_threads": int,
    },
}


def check_type(where: str, key: str, value, types) -> None:
    """Refuse ``where[key] = value`` unless it has one of ``types`` (a bool is no number)."""
    if isinstance(value, np.generic):
        value = value.item()  # numpy scalars are what many users pass
    ok = isinstance(value, types) and not (isinstance(value, bool) and types in (_NUM, int))
    if types is bool:
        ok = isinstance(value, (bool, np.bool_))
    if not ok:
        expected = types.__name__ if isinstance(types, type) else " or ".join(
            t.__name__ for t in types)
        raise TypeError(f"{where}[{key!r}] must be {expected}, got {type(value).__name__} "
                        f"({value!r}).")
