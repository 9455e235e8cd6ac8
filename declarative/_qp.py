"""Torch wiring of the QP form: θ -> dense (Q, q, G, h, A, b) -> batched IPM.

Everything here is plain autograd except the IPM's own implicit backward
(`backends.qp.QPSolve`): the affine data maps and output maps are sparse
linear maps, so the chain rule to θ, to broadcast parameters and to the
DGP log transform is torch's.
"""

from __future__ import annotations

import dataclasses

import torch

from ._sparse import SparseMap
from .backends.qp import QPSettings, solve_qp
from .canon.compile import Form
from .canon.qp import BLOCKS

QP_KEYS = {f.name: f.type for f in dataclasses.fields(QPSettings)}
# Conic-solver spellings understood on the QP path (drop-in code passes them).
QP_ALIASES = {"max_iters": "max_iter"}


def qp_settings(*arg_dicts) -> QPSettings:
    """QPSettings from the layer's and the call's solver_args (QP keys only)."""
    merged = {}
    for d in arg_dicts:
        if d:
            merged.update(d)
    changes = {}
    for key, value in merged.items():
        name = QP_ALIASES.get(key, key)
        if name in QP_KEYS:
            changes[name] = value
    return QPSettings(**changes)


class QPPath:
    """The compiled QP form with its maps ready for torch."""

    def __init__(self, form: Form):
        self.form = form
        program = form.program
        self.program = program
        self.maps = {k: SparseMap(program.maps[k]) for k in BLOCKS}
        self.outputs = [(SparseMap(rec.matrix), rec) for rec in form.outputs]

    def blocks(self, theta: torch.Tensor):
        """The six QP blocks; parameter-free blocks stay unbatched (shared)."""
        B = theta.shape[0]
        out = []
        for name in BLOCKS:
            shape = self.program.shape(name)
            smap = self.maps[name]
            if self.program.batched[name]:
                out.append(smap(theta).reshape((B,) + shape))
            else:
                out.append(smap.dense_constant(theta.dtype, theta.device).reshape(shape))
        return out

    def solve(self, theta: torch.Tensor, settings: QPSettings):
        Q, q, G, h, A, b = self.blocks(theta)
        (x, lam, nu), result = solve_qp(Q, q, G, h, A, b, batch=theta.shape[0],
                                        settings=settings)
        y = torch.cat([nu, lam], dim=-1)  # CVXPY's row order: zero cone, then nonneg
        flat = [smap(x if rec.is_primal else y) for smap, rec in self.outputs]
        return flat, result
