"""The torch paths (simplex, entropy, qp) as data: tensors plus a small metadata dict.

Each path is built from a compiled form once (`spec_from_form`, numpy side)
into ``arrays`` (name -> array) and ``meta`` (JSON-able). The runtime object
(`make_path`) holds only tensors, so the same code serves `CvxpyLayer` and the
exported standalone module (`declarative.export`), which keeps the arrays as
buffers and imports neither CVXPY nor `canon`.
"""

from __future__ import annotations

import numpy as np
import torch

from ._checks import functorch_active
from ._maps import LinearMap, coo_arrays
from .backends import entropy as entropy_backend
from .backends.qp import QPSettings, solve_qp
from .backends.status import Box

QP_BLOCKS = ("Q", "q", "G", "h", "A", "b")


class Result:
    """What the layer reads off a structured solve: statuses, iterations, residuals."""

    def __init__(self, status, iterations, residuals, warm_start=None):
        self.status, self.iterations, self.residuals = status, iterations, residuals
        self._warm = warm_start

    def warm_start(self):
        return self._warm


# ---------------------------------------------------------------------------
# Building the spec from a compiled form (numpy; needs the compiled objects)
# ---------------------------------------------------------------------------


def spec_from_form(form, layout) -> tuple[dict, dict]:
    arrays: dict = {}
    meta: dict = {"kind": form.kind, "outputs": []}

    def add_map(name, matrix):
        a, m = coo_arrays(matrix)
        for k, v in a.items():
            arrays[f"{name}.{k}"] = v
        meta[f"{name}.map"] = m

    for i, rec in enumerate(form.outputs):
        add_map(f"out{i}", rec.matrix)
        meta["outputs"].append({"shape": list(rec.shape), "primal": rec.is_primal})
    program = form.program
    if form.kind == "qp":
        meta.update(n=program.n, p=program.p, m=program.m,
                    batched={k: bool(program.batched[k]) for k in QP_BLOCKS})
        for k in QP_BLOCKS:
            add_map(k, program.maps[k])
    elif form.kind == "simplex":
        add_map("y", program.y_map)
        add_map("r", program.r_map)
    elif form.kind == "entropy":
        meta.update(tau=float(program.tau), program_kind=program.kind,
                    transport_shape=list(program.transport_shape or []))
        add_map("theta", program.theta_map)
        add_map("b", program.b_map)
        arrays["A"] = np.asarray(program.A, dtype=np.float64)
        arrays["independent"] = np.asarray(program.independent, dtype=np.int64)
    meta["maskable"] = _maskable(form, layout)
    return arrays, meta


def _maskable(form, layout) -> list[bool]:
    """Parameters that may hold −inf: masked logits (softmax's −inf → weight 0).

    A parameter qualifies when it enters only the entropy path's logits, with
    positive coefficients, so −inf can only ever produce a −inf logit.
    """
    if form.kind != "entropy":
        return [False] * len(layout)
    theta = form.program.theta_map.tocsc()
    b_cols = set(form.program.b_map.tocoo().col.tolist())
    out = []
    for slot in layout.slots:
        block = theta[:, slot.offset:slot.stop]
        positive = block.nnz > 0 and bool((block.data > 0).all())
        out.append(positive and not any(c in b_cols for c in range(slot.offset, slot.stop)))
    return out


# ---------------------------------------------------------------------------
# Runtime paths (torch only)
# ---------------------------------------------------------------------------


class _Path:
    def __init__(self, tensors: dict, meta: dict):
        self.t, self.meta = tensors, meta
        self.outputs = [self._map(f"out{i}") for i in range(len(meta["outputs"]))]
        self.output_primal = [o["primal"] for o in meta["outputs"]]

    def _map(self, name) -> LinearMap:
        return LinearMap(self.t[f"{name}.rows"], self.t[f"{name}.cols"], self.t[f"{name}.vals"],
                         self.meta[f"{name}.map"])

    def _read(self, x, y=None):
        return [o(x if primal else y) for o, primal in zip(self.outputs, self.output_primal)]


class QPPath(_Path):
    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.maps = {k: self._map(k) for k in QP_BLOCKS}
        n, p, m = meta["n"], meta["p"], meta["m"]
        self.shapes = {"Q": (n, n), "q": (n,), "G": (p, n), "h": (p,), "A": (m, n), "b": (m,)}

    def blocks(self, theta: torch.Tensor):
        """The six QP blocks; parameter-free blocks stay unbatched (shared)."""
        B = theta.shape[0]
        out = []
        for k in QP_BLOCKS:
            lmap, shape = self.maps[k], self.shapes[k]
            if self.meta["batched"][k]:
                out.append(lmap(theta).reshape((B,) + shape))
            else:
                out.append(lmap.constant(theta.dtype, theta.device).reshape(shape))
        return out

    def solve(self, theta: torch.Tensor, settings: QPSettings, warm=None):
        (x, lam, nu), result = solve_qp(*self.blocks(theta), batch=theta.shape[0],
                                        settings=settings, warm=warm)
        y = torch.cat([nu, lam], dim=-1)  # CVXPY's row order: zero cone, then nonneg
        return self._read(x, y), result


class SimplexPath(_Path):
    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.y, self.r = self._map("y"), self._map("r")

    def solve(self, theta: torch.Tensor, settings=None, warm=None):
        # A closed form: nothing to warm-start. Statuses come from the backend as a
        # code tensor (not inspectable inside torch.func transforms: all optimal there).
        y, r = self.y(theta), self.r(theta)
        x, codes = entropy_backend.project_simplex(y, r, inspect=not functorch_active(y, r))
        B = theta.shape[0]
        status = entropy_backend.statuses(codes, B)
        return self._read(x), Result(status, np.zeros(B, dtype=np.int64), np.zeros((B, 3)))


class EntropyPath(_Path):
    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.theta, self.b = self._map("theta"), self._map("b")
        self.tau = meta["tau"]
        self.kind = meta["program_kind"]
        self._eq: dict = {}  # device -> equality operator (immutable, shared by calls)

    def _equalities(self, device):
        """The equality operator, built once per device (float64: the solve's dtype)."""
        key = str(device)
        eq = self._eq.get(key)
        if eq is None:
            independent = self.t["independent"].to(device)
            if self.kind == "transport":
                r, c = self.meta["transport_shape"]
                eq = entropy_backend.TransportEqualities(r, c, independent)
            else:
                A = self.t["A"].to(dtype=entropy_backend.WORK_DTYPE, device=device)
                eq = entropy_backend.DenseEqualities(A, independent)
            self._eq[key] = eq
        return eq

    def solve(self, theta: torch.Tensor, settings=None, warm=None):
        logits = self.theta(theta)
        B = theta.shape[0]
        if self.kind == "softmax":
            # Statuses come from the backend (not inspectable inside torch.func
            # transforms, where the closed form has no failure mode to report).
            x, codes = entropy_backend.softmax(logits, self.tau,
                                               inspect=not functorch_active(logits))
            status = entropy_backend.statuses(codes, B)
            result = Result(status, np.zeros(B, dtype=np.int64), np.zeros((B, 3)))
        else:
            box = Box()
            eq = self._equalities(theta.device)
            need_grad = torch.is_grad_enabled() and theta.requires_grad
            x = entropy_backend.EntropySolve.apply(logits, self.b(theta), self.tau, eq, box,
                                                   None if warm is None else warm["nu"],
                                                   need_grad)
            r = box.result
            result = Result(r.status, r.iterations, r.residuals, {"nu": r.nu.detach()})
        return self._read(x), result


PATHS = {"qp": QPPath, "simplex": SimplexPath, "entropy": EntropyPath}


def make_path(tensors: dict, meta: dict) -> _Path:
    return PATHS[meta["kind"]](tensors, meta)


def as_tensors(arrays: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in arrays.items()}
