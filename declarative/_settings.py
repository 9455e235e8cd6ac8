"""solver_args for the torch paths (QP engine settings), checked by name and type."""

from __future__ import annotations

from .backends.qp import QPSettings

# QPSettings fields a caller may set through solver_args, with their types.
_NUM = (int, float)
QP_KEYS = {
    "eps": _NUM, "max_iter": int, "time_limit": _NUM, "step_fraction": _NUM,
    "step_fraction_max": _NUM,
    "infeas_tol": _NUM, "not_improved_lim": int, "kkt": str, "regularization": _NUM,
    "regularization_tries": int, "schur_max_condition": _NUM,
    "fixed_iterations": bool, "backward": str, "iterative_tol": _NUM,
    "iterative_max_iter": int,
}
# Conic-solver spellings understood on the torch paths (drop-in code passes them).
QP_ALIASES = {"max_iters": "max_iter", "time_limit_secs": "time_limit"}


def qp_settings(*arg_dicts) -> QPSettings:
    """QPSettings for the torch paths from the layer's and the call's solver_args.

    QP keys are checked by name and type. Settings of the conic solvers
    (SCS, ECOS, Clarabel, diffcp) are accepted and have no effect here, so code
    written for cvxpylayers runs unchanged; ``solve_method``, which would pick a
    solver this path does not run, and anything else are errors (the latter
    listing the accepted keys). ``eps`` only tightens the default tolerance.
    """
    from .backends.solver_args import DIFFCP_KEYS, SOLVER_KEYS, check_type

    conic_keys = set(DIFFCP_KEYS).union(*SOLVER_KEYS.values())
    merged = {}
    for d in arg_dicts:
        if d:
            merged.update(d)
    changes = {"eps_tightens": True}
    if "solve_method" in merged:
        raise ValueError(
            f"solver_args['solve_method']={merged['solve_method']!r} names a conic solver, but "
            "this call runs a torch path (qp, entropy or simplex), which would ignore it. "
            "Leave it out, or build the layer with backend='conic' to solve with it.")
    for key, value in merged.items():
        name = QP_ALIASES.get(key, key)
        if name in QP_KEYS:
            check_type("solver_args", key, value, QP_KEYS[name])
            changes[name] = value.item() if hasattr(value, "item") else value
        elif key not in conic_keys:
            raise ValueError(
                f"solver_args has unknown key {key!r} for the torch solvers. Accepted keys: "
                f"{sorted(set(QP_KEYS) | set(QP_ALIASES))} (conic-solver keys are accepted "
                "and ignored on this path)."
            )
    return QPSettings(**changes)
