"""Torch wiring of the simplex-projection and entropy forms (closed forms and dual Newton)."""

from __future__ import annotations

import torch

from ._sparse import SparseMap
from .backends import entropy as backend
from .backends.status import Status
from .canon.compile import Form


class _Result:
    """What the layer reads off a structured solve: statuses, iterations, residuals."""

    def __init__(self, status, iterations, residuals):
        self.status, self.iterations, self.residuals = status, iterations, residuals


class SimplexPath:
    def __init__(self, form: Form):
        self.form = form
        self.y = SparseMap(form.program.y_map)
        self.r = SparseMap(form.program.r_map)
        self.outputs = [SparseMap(rec.matrix) for rec in form.outputs]

    def solve(self, theta: torch.Tensor, settings=None):
        y, r = self.y(theta), self.r(theta)
        x = backend.project_simplex(y, r)
        B = theta.shape[0]
        # r < 0: no point of the simplex; r = 0: x = 0 is the only (optimal) point.
        bad = (r.detach() < 0).squeeze(-1) | ~torch.isfinite(y.detach()).any(-1)
        status = [Status.INFEASIBLE if bool(b) else Status.OPTIMAL for b in bad]
        result = _Result(status, torch.zeros(B, dtype=torch.long),
                         torch.zeros(B, 3, dtype=theta.dtype))
        return [o(x) for o in self.outputs], result


class EntropyPath:
    def __init__(self, form: Form, dtype=torch.float64):
        program = form.program
        self.form = form
        self.program = program
        self.theta = SparseMap(program.theta_map)
        self.b = SparseMap(program.b_map)
        self.outputs = [SparseMap(rec.matrix) for rec in form.outputs]
        independent = torch.as_tensor(program.independent, dtype=torch.long)
        if program.kind == "transport":
            r, c = program.transport_shape
            self.eq = backend.TransportEqualities(r, c, independent)
        else:
            self.eq = backend.DenseEqualities(torch.as_tensor(program.A), independent)

    def maskable(self, layout) -> tuple[bool, ...]:
        """Which parameters may hold −inf: masked logits (softmax's −inf → weight 0).

        A parameter qualifies when it enters only the logits, with positive
        coefficients, so −inf can only ever produce a −inf logit.
        """
        theta = self.program.theta_map.tocsc()
        b_cols = set(self.program.b_map.tocoo().col.tolist())
        out = []
        for slot in layout.slots:
            cols = range(slot.offset, slot.stop)
            block = theta[:, slot.offset:slot.stop]
            positive = block.nnz > 0 and bool((block.data > 0).all())
            out.append(positive and not any(c in b_cols for c in cols))
        return tuple(out)

    def _equalities(self, dtype, device):
        eq = self.eq
        if isinstance(eq, backend.DenseEqualities) and (
                eq.full.dtype != dtype or eq.full.device != device):
            eq = backend.DenseEqualities(eq.full.to(dtype=dtype, device=device),
                                         eq.independent.to(device))
        elif isinstance(eq, backend.TransportEqualities):
            eq = backend.TransportEqualities(eq.r, eq.c, eq.independent.to(device))
        return eq

    def solve(self, theta: torch.Tensor, settings=None):
        logits = self.theta(theta)
        B = theta.shape[0]
        tau = self.program.tau
        if self.program.kind == "softmax":
            x = backend.softmax(logits, tau)
            # A row needs one finite logit and no +inf; masks (−inf) are fine.
            if bool(torch.isfinite(logits.detach().sum())):
                status = (Status.OPTIMAL,) * B
            else:
                lg = logits.detach()
                bad = ~torch.isfinite(lg).any(-1) | torch.isposinf(lg).any(-1)
                status = tuple(Status.INVALID_INPUT if bool(b) else Status.OPTIMAL for b in bad)
            result = _Result(status, torch.zeros(B, dtype=torch.long),
                             torch.zeros(B, 3, dtype=theta.dtype))
        else:
            box: dict = {}
            eq = self._equalities(theta.dtype, theta.device)
            x = backend.EntropySolve.apply(logits, self.b(theta), tau, eq, box)
            r = box["result"]
            result = _Result(r.status, r.iterations, r.residuals)
        return [o(x) for o in self.outputs], result
