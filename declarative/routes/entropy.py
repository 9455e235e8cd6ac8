"""The entropy and simplex routes: closed forms and the dual Newton solve."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..backends import entropy as backend
from ..backends.functorch import any_wrapped
from ..backends.solution import Solution
from .base import Route, add_arrays, add_map


def _closed_form(codes: torch.Tensor | None, B: int, device) -> Solution:
    """A closed form's Solution: its codes (None: all optimal), no iterations, exact."""
    none, zeros = _nothing(B, device)
    return Solution(none if codes is None else codes, none, zeros)


@lru_cache(maxsize=32)
def _nothing(B: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) zero codes or iterations and (B, 3) zero residuals, made once per batch
    size: a closed form's call is a few tensor operations, and three allocations
    were a tenth of a small sparsemax's. Only read (`SolveInfo.of` copies them)."""
    return (torch.zeros(B, dtype=torch.long, device=device),
            torch.zeros(B, 3, dtype=torch.float64, device=device))


class SimplexRoute(Route):
    """Euclidean projection onto a simplex (sparsemax): sort and threshold."""

    kind = "simplex"

    @classmethod
    def _compile(cls, form, layout, arrays, meta):
        add_map(arrays, meta, "y", form.program.y_map)
        add_map(arrays, meta, "r", form.program.r_map)

    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.y, self.r = self.map("y"), self.map("r")

    def solve(self, theta, settings, warm):
        # Nothing to warm-start. Statuses are not inspectable inside torch.func
        # transforms (all optimal there: the closed form has no other failure mode).
        y, r = self.y(theta), self.r(theta)
        x, codes = backend.project_simplex(y, r, inspect=not any_wrapped(y, r))
        return self.read(x), _closed_form(codes, theta.shape[0], theta.device)


class EntropyRoute(Route):
    """Entropy-regularized LPs: softmax in closed form, else dual Newton."""

    kind = "entropy"

    @classmethod
    def _compile(cls, form, layout, arrays, meta):
        program = form.program
        meta.update(tau=float(program.tau), program_kind=program.kind,
                    transport_shape=list(program.transport_shape or []),
                    maskable=_maskable(form, layout))
        add_arrays(arrays, meta, {"theta": program.theta_map, "b": program.b_map},
                   {"A": (program.A, np.float64), "independent": (program.independent, np.int64)})

    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.theta, self.b = self.map("theta"), self.map("b")
        self.tau = meta["tau"]
        self.program = meta["program_kind"]
        self._eq: dict = {}  # device -> equality operator (immutable, shared by calls)

    def warm_shapes(self):
        if self.program == "softmax":
            return None
        return {"nu": int(self.t["independent"].numel())}

    def _equalities(self, device):
        """The equality operator, built once per device (float64: the solve's dtype)."""
        key = str(device)
        eq = self._eq.get(key)
        if eq is None:
            independent = self.t["independent"].to(device)
            if self.program == "transport":
                r, c = self.meta["transport_shape"]
                eq = backend.TransportEqualities(r, c, independent)
            else:
                A = self.t["A"].to(dtype=backend.WORK_DTYPE, device=device)
                eq = backend.DenseEqualities(A, independent)
            self._eq[key] = eq
        return eq

    def solve(self, theta, settings, warm):
        logits = self.theta(theta)
        if self.program == "softmax":
            x, codes = backend.softmax(logits, self.tau, inspect=not any_wrapped(logits))
            return self.read(x), _closed_form(codes, theta.shape[0], theta.device)
        x, result = backend.entropy_solve(logits, self.b(theta), self.tau,
                                          self._equalities(theta.device),
                                          None if warm is None else warm["nu"])
        return self.read(x), result


def _maskable(form, layout) -> list[bool]:
    """Parameters that may hold −inf: masked logits (softmax's −inf → weight 0).

    A parameter qualifies when it enters only the logits, with positive
    coefficients, so −inf can only ever produce a −inf logit.
    """
    theta = form.program.theta_map.tocsc()
    b_cols = set(form.program.b_map.tocoo().col.tolist())
    out = []
    for slot in layout.slots:
        block = theta[:, slot.offset:slot.stop]
        positive = block.nnz > 0 and bool((block.data > 0).all())
        out.append(positive and not any(c in b_cols for c in range(slot.offset, slot.stop)))
    return out
