"""The QP route: CVXPY's quadratic form, solved by the batched torch interior point."""

from __future__ import annotations

import torch

from ..backends.qp import QPSettings, solve_qp
from .base import Route, add_map, torch_route_settings
from .presolved import Substitution, box_solve

BLOCKS = ("Q", "q", "G", "h", "A", "b")
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
# Conic-solver spellings the QP engine understands (drop-in code passes them).
QP_ALIASES = {"max_iters": "max_iter", "time_limit_secs": "time_limit"}


def qp_settings(*arg_dicts) -> QPSettings:
    """QPSettings from solver_args (`base.torch_route_settings`)."""
    return torch_route_settings("qp", QPSettings, QP_KEYS, QP_ALIASES, *arg_dicts)


class QPRoute(Route):
    """CVXPY's QP form, presolved (`canon.presolve`: variables its equalities define
    are substituted away at each call, in torch), solved by the batched interior
    point, or in closed form when what is left is a box QP."""

    kind = "qp"

    @classmethod
    def misfit(cls, form) -> str | None:
        from ..canon.compile import DENSE_QP_MAX_CONSTRAINTS, DENSE_QP_MAX_VARIABLES

        program = form.program
        if program.n > DENSE_QP_MAX_VARIABLES or \
                program.p + program.m > DENSE_QP_MAX_CONSTRAINTS:
            return (f"its QP form has {program.n} variables and {program.p + program.m} "
                    f"constraints; the dense engine takes at most {DENSE_QP_MAX_VARIABLES} and "
                    f"{DENSE_QP_MAX_CONSTRAINTS} (backend='sparse_qp' keeps it sparse)")
        return None

    @classmethod
    def _compile(cls, form, layout, arrays, meta):
        from ..canon import presolve  # numpy side only: the export never imports it

        program = form.program
        elim = presolve.find(program)
        meta.update(n=program.n, p=program.p, m=program.m,
                    batched={k: bool(program.batched[k]) for k in BLOCKS},
                    presolve=not elim.empty, box=elim.box)
        for k in BLOCKS:
            add_map(arrays, meta, k, program.maps[k])
        if not elim.empty:
            for name in ("keep", "pivots", "pivot_rows", "rest_rows"):
                arrays[f"presolve.{name}"] = getattr(elim, name)

    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.maps = {k: self.map(k) for k in BLOCKS}
        n, p, m = meta["n"], meta["p"], meta["m"]
        self.shapes = {"Q": (n, n), "q": (n,), "G": (p, n), "h": (p,), "A": (m, n), "b": (m,)}
        self.elimination = (Substitution(*(tensors[f"presolve.{k}"] for k in
                                           ("keep", "pivots", "pivot_rows", "rest_rows")),
                                         n, meta["batched"])
                            if meta.get("presolve") else None)

    def settings(self, layer_args, call_args=None, solver=None):
        return qp_settings(layer_args, call_args)

    def cost(self):
        """Work: the dense Newton system's flops on the presolved problem (Schur
        complement and Cholesky: n²(p + m) + n³/3; none for a box QP's closed
        form), plus the substitution's per-sample flops where a parameter reaches
        its pivot block or Q (then P = −D⁻¹A[R, K] and PᵀQ_CC P are rebuilt for
        every sample: c²k + c²k + ck² for c pivots and k kept variables).
        Size: the dense blocks' entries, and the substitution's dense products
        (pivots × all variables)."""
        n, p, m = (self.warm_shapes()[k] for k in ("z", "lam", "nu"))
        sub, sub_work = 0.0, 0.0
        if self.elimination is not None:
            c, k = self.elimination.pivots.numel(), self.elimination.keep.numel()
            sub = float(c) * self.meta["n"]
            batched = self.meta["batched"]
            if batched["A"]:
                sub_work = float(2 * c * c * k + c * k * k)
            elif batched["Q"]:
                sub_work = float(c * c * k + c * k * k)
        if self.meta.get("box"):
            return "qp:box", sub_work, float(n + p) + sub
        return "qp", float(n * n * (p + m) + n ** 3 / 3) + sub_work, \
            float(n * (n + p + m)) + sub

    def warm_shapes(self):
        n, p, m = self.meta["n"], self.meta["p"], self.meta["m"]
        if self.elimination is not None:  # the reduced problem's sizes
            n, m = self.elimination.keep.numel(), self.elimination.rest_rows.numel()
        return {"z": n, "lam": p, "s": p, "nu": m}

    def blocks(self, theta: torch.Tensor):
        """The six QP blocks; parameter-free blocks stay unbatched (shared)."""
        B = theta.shape[0]
        out = []
        for k in BLOCKS:
            lmap, shape = self.maps[k], self.shapes[k]
            if self.meta["batched"][k]:
                out.append(lmap(theta).reshape((B,) + shape))
            else:
                out.append(lmap.constant(theta.dtype, theta.device).reshape(shape))
        return out

    def solve(self, theta, settings, warm):
        blocks = self.blocks(theta)
        B = theta.shape[0]
        if self.elimination is None:
            (x, lam, nu), result = solve_qp(*blocks, batch=B, settings=settings, warm=warm)
        else:
            sub = self.elimination.at(*blocks)
            reduced = sub.reduced()
            closed = (box_solve(*reduced[:4], B, col=sub.box_columns(reduced[2]))
                      if self.meta["box"] else None)
            if closed is not None:
                (x_k, lam, nu_k), result = closed
            else:
                (x_k, lam, nu_k), result = solve_qp(*reduced, batch=B, settings=settings,
                                                    warm=warm)
            x, nu = sub.expand(x_k, lam, nu_k)
        y = torch.cat([nu, lam], dim=-1)  # CVXPY's row order: zero cone, then nonneg
        return self.read(x, y), result
