"""Export a layer to a standalone torch module that needs no modelling stack.

    exported = layer.export()                  # or ExportedLayer.from_layer(layer)
    torch.save(exported.state_dict(), "layer.pt")

    # later, in another process, without CVXPY:
    from declarative.export import ExportedLayer
    module = ExportedLayer()
    module.load_state_dict(torch.load("layer.pt"))
    (x,) = module(A, b)

The module holds the compiled problem data as buffers (so ``.to(device)``,
``.double()`` and ``.float()`` move and cast them) and its metadata (shapes,
parameter names and attributes, the path's kind, the solver settings) as the
state dict's extra state, so a freshly constructed, empty `ExportedLayer`
rebuilds itself from the state dict alone. The simplex, entropy and QP paths
run on torch only; the conic path also needs diffcp (never CVXPY). Calls
behave as the original layer's: same validation, batching, statuses, failure
policy and gradients.
"""

from __future__ import annotations

import types

import numpy as np
import torch

from ._paths import make_path
from ._runtime import (
    SolveInfo,
    build_theta,
    check_on_failure,
    check_params,
    handle_failures,
    host,
    mark_invalid,
    shape_outputs,
)
from .backends.status import Box
from .canon.parameters import ParameterSlot, default_checks

FORMAT = 1
META_KEYS = frozenset({"format", "backend", "path", "slots", "log_space", "maskable", "shapes",
                       "exp", "solver", "solver_args", "on_failure", "strict"})


class _Layout:
    """The parameter layout rebuilt from metadata (what `check_params` and θ need)."""

    def __init__(self, slots, log_space):
        self.slots = tuple(slots)
        self.log_space = tuple(log_space)

    def __len__(self):
        return len(self.slots)


class ExportedLayer(torch.nn.Module):
    """A compiled layer as a standalone module; see the module docstring."""

    def __init__(self):
        super().__init__()
        self._meta: dict | None = None

    # ---- construction ---------------------------------------------------
    @classmethod
    def from_layer(cls, layer) -> ExportedLayer:
        module = cls()
        compiled = layer.compiled
        layout = compiled.layout
        if layer.backend == "conic":
            arrays, path_meta = _conic_spec(compiled.form("conic"))
        else:
            arrays, path_meta = layer._spec
        meta = {
            "format": FORMAT,
            "backend": layer.backend,
            "path": path_meta,
            "slots": [dict(name=s.name, shape=list(s.shape), offset=s.offset, size=s.size,
                           attributes=_plain(s.attributes), checks=list(s.checks),
                           sparse_index=None if s.sparse_index is None else
                           [s.sparse_index[0].tolist(), s.sparse_index[1].tolist()])
                      for s in layout.slots],
            "log_space": list(layout.log_space),
            "maskable": list(layer._maskable),
            "shapes": [list(s) for s in layer._shapes],
            "exp": list(layer._exp),
            "solver": layer.solver,
            "solver_args": _plain(layer.solver_args),
            "on_failure": layer.on_failure,
            "strict": layer.strict,
        }
        module._install(arrays, meta)
        return module

    def _install(self, arrays: dict, meta: dict) -> None:
        for name, value in arrays.items():
            self.register_buffer(_key(name), torch.as_tensor(np.asarray(value)).clone())
        self._meta = meta

    # ---- state dict -------------------------------------------------------
    def get_extra_state(self):
        return self._meta

    def set_extra_state(self, state):
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a declarative ExportedLayer state (format mismatch).")
        missing = sorted(META_KEYS - set(state))
        if missing:
            raise ValueError(f"ExportedLayer state is incomplete: its '_extra_state' lacks "
                             f"{missing}. Save it again with layer.export().state_dict().")
        self._meta = state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # An empty module learns its buffers from the state dict itself.
        for key, value in state_dict.items():
            if key.startswith(prefix) and key != prefix + "_extra_state":
                name = key[len(prefix):]
                if "." not in name and name not in self._buffers:
                    self.register_buffer(name, torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # Refuse an incomplete state now, not with a KeyError at the first call.
        # (error_msgs make load_state_dict raise, with strict=False too.)
        if self._meta is None:
            error_msgs.append(f"ExportedLayer: the state has no '{prefix}_extra_state' (the "
                              "layer's metadata). Save it with layer.export().state_dict().")
            return
        missing = [prefix + _key(n) for n in required_buffers(self._meta)
                   if _key(n) not in self._buffers]
        if missing:
            self._meta = None
            error_msgs.append(f"ExportedLayer: the state lacks the buffers {missing}. Save it "
                              "again with layer.export().state_dict().")

    # ---- calls ------------------------------------------------------------
    def _tensors(self) -> dict:
        return {_name(k): v for k, v in self._buffers.items()}

    def forward(self, *params, solver_args: dict | None = None, return_info: bool = False,
                on_failure: str | None = None, strict: bool | None = None):
        meta = self._meta
        if meta is None:
            raise RuntimeError("ExportedLayer is empty: load a state dict or use from_layer().")
        on_failure = meta["on_failure"] if on_failure is None else on_failure
        check_on_failure(on_failure)
        strict = meta["strict"] if strict is None else bool(strict)
        layout = self._layout()
        labels = tuple(f"parameter {i} ('{s.name}')" for i, s in enumerate(layout.slots))
        if solver_args is not None and not isinstance(solver_args, dict):
            raise TypeError(f"solver_args must be a dict, got {type(solver_args).__name__}.")
        params, batch, invalid = check_params(params, layout, labels, meta["maskable"],
                                              on_failure)
        if meta["backend"] == "conic":
            flat, info = self._conic(params, batch, layout, solver_args)
        else:
            from ._settings import qp_settings

            path = make_path(self._tensors(), meta["path"])
            settings = (qp_settings(meta["solver_args"], solver_args)
                        if meta["backend"] == "qp" or solver_args else None)
            theta = build_theta(params, batch, layout.log_space, batch.dtype)
            flat, result = path.solve(theta, settings)
            info = SolveInfo(tuple(result.status), host(result.iterations),
                             host(result.residuals), meta["backend"],
                             result.warm_start())
        info = mark_invalid(info, invalid)
        flat = handle_failures(flat, info, on_failure, strict)
        outputs = shape_outputs(flat, meta["shapes"], meta["exp"], batch)
        return (outputs, info) if return_info else outputs

    def _layout(self) -> _Layout:
        """The parameter layout, rebuilt once per loaded state."""
        cached = getattr(self, "_layout_cache", None)
        if cached is not None and cached[0] is self._meta:
            return cached[1]
        slots = []
        for s, log in zip(self._meta["slots"], self._meta["log_space"]):
            index = s.get("sparse_index")
            index = None if index is None else tuple(np.asarray(i, dtype=np.int64) for i in index)
            checks = s.get("checks")  # states saved before checks were recorded: all of them
            if checks is None:
                checks = default_checks(s["attributes"], log)
            slots.append(ParameterSlot(s["name"], tuple(s["shape"]), s["offset"], s["size"],
                                       s["attributes"], index, checks=tuple(checks)))
        layout = _Layout(slots, self._meta["log_space"])
        self._layout_cache = (self._meta, layout)
        return layout

    def _conic(self, params, batch, layout, solver_args):
        from ._conic import ConicSolve
        from .backends import conic

        meta = self._meta
        form = _conic_form(self._tensors(), meta["path"])
        settings = conic.ConicSettings.resolve(meta["solver"], meta["solver_args"], solver_args)
        conic.check_cones(form.program.cone_dict, settings.solve_method)
        theta = build_theta(params, batch, layout.log_space, torch.float64)
        need = torch.is_grad_enabled() and theta.requires_grad
        box = Box()
        flat = ConicSolve.apply(theta, form, settings, need, box)
        result = box.result
        return flat, SolveInfo(tuple(result.status), result.iterations, result.residuals, "conic")


# ---------------------------------------------------------------------------
# Conic path: arrays in, scipy/`canon.cone` objects out (no CVXPY)
# ---------------------------------------------------------------------------


def _conic_spec(form):
    import scipy.sparse as sp

    cone = form.program
    arrays, meta = {}, {"kind": "conic", "n": cone.n, "m": cone.m,
                        "cone_dict": _plain(cone.cone_dict), "outputs": []}

    def add(name, M):
        M = sp.coo_array(M)
        arrays[f"{name}.rows"], arrays[f"{name}.cols"] = M.row.astype(np.int64), M.col.astype(
            np.int64)
        arrays[f"{name}.vals"] = M.data.astype(np.float64)
        meta[f"{name}.shape"] = list(M.shape)

    for k in ("c_map", "A_map", "b_map", "offset_map"):
        add(k, getattr(cone, k))
    arrays["indices"], arrays["indptr"] = cone.indices.astype(np.int64), cone.indptr.astype(
        np.int64)
    for i, rec in enumerate(form.outputs):
        add(f"out{i}", rec.matrix)
        meta["outputs"].append({"name": rec.name, "shape": list(rec.shape), "source": rec.source})
    return arrays, meta


def _conic_form(tensors: dict, meta: dict):
    import scipy.sparse as sp

    from .canon.cone import ConeProgram
    from .canon.recovery import Recovery

    def matrix(name):
        rows, cols, vals = (tensors[f"{name}.{k}"].detach().cpu().numpy()
                            for k in ("rows", "cols", "vals"))
        return sp.csr_array((vals.astype(np.float64), (rows, cols)),
                            shape=tuple(meta[f"{name}.shape"]))

    cone = ConeProgram(meta["n"], meta["m"], dict(meta["cone_dict"]),
                       tensors["indices"].cpu().numpy().astype(np.int32),
                       tensors["indptr"].cpu().numpy().astype(np.int32),
                       matrix("c_map"), matrix("A_map"), matrix("b_map"), matrix("offset_map"))
    outputs = tuple(Recovery(o["name"], tuple(o["shape"]), o["source"], matrix(f"out{i}"))
                    for i, o in enumerate(meta["outputs"]))
    return types.SimpleNamespace(kind="conic", program=cone, outputs=outputs)


# ---------------------------------------------------------------------------


def required_buffers(meta: dict) -> list[str]:
    """Names of the arrays a state with metadata ``meta`` must hold (see `_paths`)."""
    path = meta["path"]
    kind = path["kind"]
    maps = [f"out{i}" for i in range(len(path["outputs"]))]
    arrays = []
    if kind == "qp":
        maps += ["Q", "q", "G", "h", "A", "b"]
    elif kind == "simplex":
        maps += ["y", "r"]
    elif kind == "entropy":
        maps += ["theta", "b"]
        arrays += ["A", "independent"]
    elif kind == "conic":
        maps += ["c_map", "A_map", "b_map", "offset_map"]
        arrays += ["indices", "indptr"]
    return [f"{m}.{part}" for m in maps for part in ("rows", "cols", "vals")] + arrays


def _key(name: str) -> str:
    """Buffer names cannot contain '.'."""
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")


def _plain(value):
    """JSON-like copy (numpy scalars and arrays to Python) for the extra state."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
