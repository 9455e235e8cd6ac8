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
rebuilds itself from the state dict alone. The module and the layer run the
same route object (`declarative.routes`) through the same call pipeline, so
calls behave as the original layer's: same validation, batching, statuses,
failure policy, warm starts and gradients. The simplex, entropy and QP routes
run on torch only; the conic route also needs diffcp (never CVXPY).
"""

from __future__ import annotations

import numpy as np
import torch

from ._pipeline import Defaults, Door, run
from .canon.parameters import ParameterSlot, default_checks
from .routes import load_route
from .routes.base import plain

# Version 2: every route, conic included, is its `routes` arrays and metadata.
FORMAT = 2
META_KEYS = frozenset({"format", "backend", "route", "slots", "log_space", "shapes", "exp",
                       "solver", "solver_args", "on_failure", "strict"})


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
        layout = layer.compiled.layout
        _, door, arrays, route_meta = layer._route_parts(layer.backend)
        meta = {
            "format": FORMAT,
            "backend": layer.backend,
            "route": route_meta,
            "slots": [dict(name=s.name, shape=list(s.shape), offset=s.offset, size=s.size,
                           attributes=plain(s.attributes), checks=list(s.checks),
                           sparse_index=None if s.sparse_index is None else
                           [s.sparse_index[0].tolist(), s.sparse_index[1].tolist()])
                      for s in layout.slots],
            "log_space": list(layout.log_space),
            "shapes": [list(sh) for sh in door.shapes],
            "exp": list(door.exp),
            "solver": layer.solver,
            "solver_args": plain(layer.solver_args),
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
        if not isinstance(state, dict) or "format" not in state:
            raise ValueError("not a declarative ExportedLayer state (no format marker).")
        if state["format"] != FORMAT:
            raise ValueError(f"this ExportedLayer state has format {state['format']}; this "
                             f"version reads format {FORMAT}. Export the layer again with "
                             "layer.export().")
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
    def forward(self, *params, solver_args: dict | None = None, return_info: bool = False,
                on_failure: str | None = None, strict: bool | None = None, warm_start=False):
        """Solve for a batch of parameter values, as the layer this was exported from
        does (same arguments, validation, statuses, failure policy and gradients);
        returns a tuple in the layer's ``variables`` order (with its `SolveInfo` when
        ``return_info``)."""
        if self._meta is None:
            raise RuntimeError("ExportedLayer is empty: load a state dict or use from_layer().")
        door, route = self._call_parts()
        meta = self._meta
        defaults = Defaults(meta["solver"], dict(meta["solver_args"]), meta["on_failure"],
                            meta["strict"])
        outputs, info = run(door, route, params, defaults, solver_args=solver_args,
                            on_failure=on_failure, strict=strict, warm_start=warm_start,
                            cache=getattr(self, "_warm_cache", None))
        self._warm_cache = info.warm_start
        return (outputs, info) if return_info else outputs

    def _call_parts(self):
        """(Door, route), built once per loaded state and set of buffers (``.to()``
        replaces the buffers, and the route then rebuilds on them)."""
        key = (id(self._meta), tuple(id(b) for b in self._buffers.values()))
        cached = getattr(self, "_parts", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        meta, layout = self._meta, self._layout()
        door = Door.of(layout, meta["shapes"], meta["exp"])
        tensors = {_name(k): v for k, v in self._buffers.items()}
        parts = (door, load_route(tensors, meta["route"]))
        self._parts = (key, parts)
        return parts

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


def required_buffers(meta: dict) -> list[str]:
    """Names of the arrays a state with metadata ``meta`` must hold (its route's)."""
    return list(meta["route"]["arrays"])


def _key(name: str) -> str:
    """Buffer names cannot contain '.'."""
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")
