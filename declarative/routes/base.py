"""The shape every route has: compiled once into arrays, run from tensors.

A route is how one family of problems is solved and differentiated. It has two
halves, both on one class:

- ``compile(form, layout) -> (arrays, meta)`` (numpy, at construction): the
  canonical form `canon` recognized, turned into named arrays (the parameter-affine
  maps θ → problem data, the maps solution → requested outputs, whatever the
  backend needs) and a small JSON-able ``meta`` dict. An exported layer keeps
  exactly these, as buffers and extra state.
- ``Route(tensors, meta)`` (torch only, built once per layer or loaded export):
  ``settings(layer_args, call_args)`` checks solver_args once per call;
  ``solve(theta, settings, warm) -> (outputs, Solution)`` maps θ (B, len θ) to
  the problem data, calls the backend, and reads the outputs (each (B, size))
  off the solution; the backend differentiates its own solve (implicitly), and
  the θ → data and solution → output maps are plain autograd.

Adding a route is a canon recognizer for its form (`canon.compile.FORMS`), a
backend module, and a subclass here registered in `routes.ROUTES`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .._maps import LinearMap, coo_arrays
from ..backends.solution import Solution
from ..backends.solver_args import DIFFCP_KEYS, SOLVER_KEYS, check_type

# Keys of the conic solvers and diffcp: accepted and ignored on the torch routes,
# so that code written for cvxpylayers runs unchanged.
CONIC_KEYS = frozenset(DIFFCP_KEYS).union(*SOLVER_KEYS.values())


class Route:
    kind: ClassVar[str]
    # The canonical form it compiles from (`canon.compile.FORMS`); None: its own kind.
    form: ClassVar[str | None] = None
    # Whether the route runs under torch.func transforms (vmap, jacrev, ...).
    functorch: ClassVar[bool] = True
    # The dtype θ is built in (None: the inputs' promoted dtype).
    theta_dtype: ClassVar[torch.dtype | None] = None
    # Solves the whole batch in torch on the inputs' device (not sample by sample on
    # the CPU): what a GPU batch should take (`cost`).
    batched_torch: ClassVar[bool] = True

    # ---- numpy side ---------------------------------------------------------
    @classmethod
    def form_kind(cls) -> str:
        return cls.form or cls.kind

    @classmethod
    def misfit(cls, form) -> str | None:
        """Why this route cannot take a problem that has its form (None: it can)."""
        return None

    @classmethod
    def compile(cls, form, layout) -> tuple[dict, dict]:
        arrays: dict = {}
        meta: dict = {"kind": cls.kind, "outputs": [],
                      "maskable": [False] * len(layout)}
        for i, rec in enumerate(form.outputs):
            add_map(arrays, meta, f"out{i}", rec.matrix)
            meta["outputs"].append({"shape": list(rec.shape), "primal": rec.is_primal})
        cls._compile(form, layout, arrays, meta)
        meta["arrays"] = sorted(arrays)  # what an exported state must hold
        return arrays, meta

    @classmethod
    def _compile(cls, form, layout, arrays: dict, meta: dict) -> None:
        raise NotImplementedError

    # ---- torch side ---------------------------------------------------------
    def __init__(self, tensors: dict, meta: dict):
        self.t, self.meta = tensors, meta
        self.outputs = [self.map(f"out{i}") for i in range(len(meta["outputs"]))]
        self.output_primal = [o["primal"] for o in meta["outputs"]]
        self.maskable = tuple(meta["maskable"])

    def map(self, name: str) -> LinearMap:
        return LinearMap(self.t[f"{name}.rows"], self.t[f"{name}.cols"],
                         self.t[f"{name}.vals"], self.meta[f"{name}.map"])

    def read(self, x, y=None) -> list[torch.Tensor]:
        """The requested outputs off the primal (x) and dual (y) solution."""
        return [o(x if primal else y) for o, primal in zip(self.outputs, self.output_primal)]

    def settings(self, layer_args: dict, call_args: dict | None = None, solver=None):
        """Checked settings from the layer's and the call's solver_args."""
        refuse_keys(self.kind, layer_args, call_args, accepted=())
        return None

    def cost(self) -> tuple[str, float, float]:
        """(its constants' key in `cost.COSTS_FILE`, one sample's work (flops of its
        factorizations), one sample's size (entries its iterations touch))."""
        return self.kind, 0.0, 0.0

    def warm_shapes(self) -> dict | None:
        """{key: size} of the warm-start state this route takes (each (B, size))."""
        return None

    def solve(self, theta: torch.Tensor, settings, warm) -> tuple[list, Solution]:
        raise NotImplementedError


def add_map(arrays: dict, meta: dict, name: str, matrix) -> None:
    """Store a scipy matrix as COO arrays for `Route.map`."""
    a, m = coo_arrays(matrix)
    for k, v in a.items():
        arrays[f"{name}.{k}"] = v
    meta[f"{name}.map"] = m


def add_arrays(arrays: dict, meta: dict, maps: dict, dense: dict = ()) -> None:
    """Store named scipy maps (`add_map`) and dense arrays (name -> (values, dtype))."""
    for name, matrix in maps.items():
        add_map(arrays, meta, name, matrix)
    for name, (values, dtype) in dict(dense).items():
        arrays[name] = np.asarray(values, dtype=dtype)


def plain(value):
    """A JSON-like copy (numpy scalars and arrays to Python) for metadata."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def refuse_keys(kind: str, *arg_dicts, accepted=()) -> dict:
    """The merged solver_args; keys neither ``accepted`` nor a conic solver's are an
    error naming the route (a misspelt key never passes silently). Conic keys are
    accepted and ignored: code written for cvxpylayers passes them."""
    merged = {}
    for d in arg_dicts:
        if d:
            merged.update(d)
    if "solve_method" in merged:
        raise ValueError(
            f"solver_args['solve_method']={merged['solve_method']!r} names a conic solver, but "
            f"this call runs the {kind!r} path, which would ignore it. Leave it out, or build "
            "the layer with backend='conic' to solve with it.")
    for key in merged:
        if key not in accepted and key not in CONIC_KEYS:
            took = (f"Accepted keys: {sorted(accepted)}" if accepted
                    else "It has no settings of its own")
            raise ValueError(
                f"solver_args has unknown key {key!r} for the {kind!r} path. {took} "
                "(conic-solver keys are accepted and ignored on this path).")
    return merged


def torch_route_settings(kind: str, make, keys: dict, aliases: dict, *arg_dicts):
    """``make(**changes)`` from solver_args, as the torch routes take them: their
    own keys checked by name and type, conic-solver spellings mapped by
    ``aliases`` (e.g. max_iters), other conic keys accepted and ignored, and
    ``eps`` only tightening the default (code written for SCS passes eps=1e-6
    meaning "at least this accurate")."""
    merged = refuse_keys(kind, *arg_dicts, accepted=set(keys) | set(aliases))
    changes = {"eps_tightens": True}
    for key, value in merged.items():
        name = aliases.get(key, key)
        if name in keys:
            check_type("solver_args", key, value, keys[name])
            changes[name] = value.item() if hasattr(value, "item") else value
    return make(**changes)


def as_tensors(arrays: dict) -> dict:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
