"""The conic route: CVXPY's cone program solved per sample by diffcp's solvers.

θ → (c, vals(A), b) and solution → outputs are torch maps like every route's;
the backend (`backends.conic`) sees data only and returns x, y and their adjoint
with respect to the data. It runs in numpy, outside torch.func's transforms.
The backend (and diffcp) is imported when a conic route is built, not before:
an exported layer on a torch route runs without diffcp installed.
"""

from __future__ import annotations

import numpy as np
import torch

from ..backends.functorch import is_vmapped, is_wrapped
from ..backends.guard import guard_second_order
from ..backends.status import Box
from .base import Route, add_arrays, plain


class ConicRoute(Route):
    kind = "conic"
    functorch = False
    batched_torch = False
    theta_dtype = torch.float64

    @classmethod
    def _compile(cls, form, layout, arrays, meta):
        cone = form.program
        meta.update(n=cone.n, m=cone.m, nnz=cone.nnz, cone_dict=plain(cone.cone_dict))
        add_arrays(arrays, meta, {"c": cone.c_map, "A": cone.A_map, "b": cone.b_map},
                   {"indices": (cone.indices, np.int64), "indptr": (cone.indptr, np.int64)})

    @property
    def backend(self):
        from ..backends import conic  # here, not at import: see the module docstring

        return conic

    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        conic = self.backend
        self.c, self.A, self.b = self.map("c"), self.map("A"), self.map("b")
        self.structure = conic.ConeStructure(
            meta["n"], meta["m"], dict(meta["cone_dict"]),
            tensors["indices"].cpu().numpy().astype(np.int32),
            tensors["indptr"].cpu().numpy().astype(np.int32))

    def settings(self, layer_args, call_args=None, solver=None):
        settings = self.backend.ConicSettings.resolve(solver, layer_args, call_args)
        self.backend.check_cones(self.structure.cone_dict, settings.solve_method)
        return settings

    def cost(self):
        """No factorization work counted; size nnz(A) + n + m, what each of the
        solver's iterations touches."""
        n, m = self.meta["n"], self.meta["m"]
        exp = bool(self.structure.cone_dict.get("ep"))
        return ("conic:exp" if exp else "conic"), 0.0, float(self.meta.get("nnz", 0) + n + m)

    def warm_shapes(self):
        return {"x": self.meta["n"], "y": self.meta["m"], "s": self.meta["m"]}

    def solve(self, theta, settings, warm):
        need = torch.is_grad_enabled() and theta.requires_grad
        box = Box()
        x, y = ConicSolve.apply(self.c(theta), self.A(theta), self.b(theta), self.structure,
                                settings, need, box, warm, self.backend)
        return self.read(x, y), box.result


class ConicSolve(torch.autograd.Function):
    """(c, vals(A), b), each (B, ·), float64 -> (x, y); backward by the backend's
    per-sample adjoint. ``box`` receives the `ConicResult` (no state on the layer)."""

    @staticmethod
    def forward(ctx, c, A_vals, b, cone, settings, need_derivative: bool, box, warm, backend):
        numpy = [t.detach().to("cpu", torch.float64).numpy() for t in (c, A_vals, b)]
        result = backend.solve(cone, *numpy, settings, need_derivative, warm)
        box.result = result
        x = torch.from_numpy(result.x).to(c.device)
        y = torch.from_numpy(result.y).to(c.device)
        ctx.result, ctx.device = result, c.device
        ctx.save_for_backward(x, y)
        return x, y

    @staticmethod
    def backward(ctx, gx, gy):
        outputs = ctx.saved_tensors  # raises if the graph was already freed
        result = ctx.result
        B = result.x.shape[0]

        def host(g, size):
            if g is None:
                return np.zeros((B, size))
            return g.detach().to("cpu", torch.float64).numpy()

        # A NaN upstream gradient stays in its own sample: the adjoint is per sample.
        with torch.no_grad():
            dc, dA, db = result.vjp(host(gx, result.cone.n), host(gy, result.cone.m))
        grads = tuple(torch.from_numpy(g).to(ctx.device) for g in (dc, dA, db))
        grads = guard_second_order("conic path (diffcp)", grads, outputs)
        return (*grads, None, None, None, None, None, None)


def refuse_functorch(params) -> None:
    """The conic route runs diffcp in numpy: torch.func transforms cannot see through it."""
    wrapped = [p for p in params if is_wrapped(p)]
    if not wrapped:
        return
    which = ("torch.func.vmap" if any(is_vmapped(p) for p in wrapped)
             else "torch.func.grad/jacrev/jacfwd/jvp")
    raise NotImplementedError(
        f"{which} is not supported on the conic path: diffcp solves in numpy, outside "
        "torch's transforms. Use the layer's own batch dimension instead of vmap, "
        "torch.autograd.functional.jacobian instead of jacrev, or a problem the QP or "
        "entropy paths take (they support vmap and jacrev)."
    )
