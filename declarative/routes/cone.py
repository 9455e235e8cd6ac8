"""The cone route: CVXPY's cone program solved by the batched torch interior point.

The same cone program as the conic route (SCS's convention, the same output
maps), solved by `backends.cone` instead of diffcp: the whole batch at once,
on the parameters' device and dtype, differentiated on the interior point's own
optimality conditions, and under torch.func's transforms. It takes zero,
nonnegative, second-order and exponential cones; a program with PSD, power or
dual exponential cones stays on the conic route.
"""

from __future__ import annotations

import numpy as np
import torch

from ..backends.cone import ConeSettings, ConeSpec, solve_cone
from ..backends.cone.cones import SUPPORTED
from .base import Route, add_arrays, plain, torch_route_settings

# ConeSettings fields a caller may set through solver_args, with their types.
_NUM = (int, float)
CONE_KEYS = {
    "eps": _NUM, "max_iter": int, "step_fraction": _NUM, "static_reg": _NUM,
    "regularization_tries": int, "refine_steps": int, "limit_refine_steps": int,
    "infeas_tol": _NUM, "not_improved_lim": int, "polish_steps": int, "ruiz_sweeps": int,
}
# Conic-solver spellings it understands (code written for SCS passes them).
CONE_ALIASES = {"max_iters": "max_iter"}


def cone_settings(*arg_dicts) -> ConeSettings:
    """ConeSettings from solver_args (`base.torch_route_settings`)."""
    return torch_route_settings("cone", ConeSettings, CONE_KEYS, CONE_ALIASES, *arg_dicts)


class ConeRoute(Route):
    kind = "cone"
    form = "conic"  # the conic route's program, another solver

    @classmethod
    def misfit(cls, form) -> str | None:
        cones = [k for k, v in form.program.cone_dict.items()
                 if k not in SUPPORTED and np.size(v) and np.any(np.asarray(v) != 0)]
        if cones:
            return (f"its cone program holds {sorted(cones)} cones (PSD 's', power 'p' or dual "
                    "exponential 'ed'), which only the conic path solves")
        return None

    @classmethod
    def _compile(cls, form, layout, arrays, meta):
        cone = form.program
        meta.update(n=cone.n, m=cone.m, cone_dict=plain(cone.cone_dict),
                    constant_A=bool(cone.A_map.tocsc()[:, :-1].nnz == 0))
        cols = np.repeat(np.arange(cone.n), np.diff(cone.indptr))
        add_arrays(arrays, meta, {"c": cone.c_map, "A": cone.A_map, "b": cone.b_map},
                   {"flat": (cone.indices * cone.n + cols, np.int64)})

    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.c, self.A, self.b = self.map("c"), self.map("A"), self.map("b")
        self.spec = ConeSpec.from_dict(dict(meta["cone_dict"]))
        self.flat = tensors["flat"]

    def settings(self, layer_args, call_args=None, solver=None):
        return cone_settings(layer_args, call_args)

    def cost(self):
        """Work: the normal equations' flops, n²m + n³/3; size: A's dense entries.
        Exponential cones cost more per iteration (their own constants)."""
        n, m = self.meta["n"], self.meta["m"]
        return ("cone:exp" if self.spec.exp else "cone"), float(n * n * m + n ** 3 / 3), \
            float(n * m)

    def warm_shapes(self):
        return {"x": self.meta["n"], "y": self.meta["m"], "s": self.meta["m"]}

    def dense_A(self, theta: torch.Tensor) -> torch.Tensor:
        """A (m, n) when no parameter reaches it (shared by the batch), else (B, m, n)."""
        m, n = self.meta["m"], self.meta["n"]
        flat = self.flat.to(theta.device)
        if self.meta["constant_A"]:
            vals = self.A.constant(theta.dtype, theta.device)
            return theta.new_zeros(m * n).index_put((flat,), vals).view(m, n)
        vals = self.A(theta)  # (B, nnz)
        dense = theta.new_zeros(theta.shape[0], m * n).index_copy(1, flat, vals)
        return dense.view(-1, m, n)

    def solve(self, theta, settings, warm):
        (x, y, _), result = solve_cone(self.dense_A(theta), self.b(theta), self.c(theta),
                                       self.spec, settings, warm)
        return self.read(x, y), result
