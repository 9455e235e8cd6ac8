"""The route registry: one entry per way of solving and differentiating a problem.

Order matters: from the most specific structure to the most general, which is
the order `backend="auto"` prefers among the routes a problem's structure allows
(see `canon.compile.FORMS` for the recognizers). Each route: `base.Route`.
"""

from .base import Route, as_tensors
from .cone import ConeRoute
from .conic import ConicRoute
from .entropy import EntropyRoute, SimplexRoute
from .qp import QPRoute
from .sparse_qp import SparseQPRoute

ROUTES: dict[str, type[Route]] = {
    route.kind: route
    for route in (SimplexRoute, EntropyRoute, QPRoute, SparseQPRoute, ConeRoute, ConicRoute)
}


def compile_route(kind: str, form, layout) -> tuple[dict, dict]:
    """(arrays, meta) of route ``kind`` for ``form`` (numpy side, at construction)."""
    return ROUTES[kind].compile(form, layout)


def available(compiled) -> tuple[str, ...]:
    """The routes a compiled problem's structure allows, in `ROUTES` order. A route
    whose form is built on first use (the conic program) is listed when that form
    is built: forcing it (backend=...) builds it and says why if it does not fit."""
    kinds = compiled.kinds
    out = []
    for kind, route in ROUTES.items():
        form = route.form_kind()
        if form not in kinds:
            continue
        if route.misfit.__func__ is not Route.misfit.__func__:  # the form must be read
            if form not in compiled.forms or route.misfit(compiled.forms[form]):
                continue
        out.append(kind)
    return tuple(out)


def load_route(tensors: dict, meta: dict) -> Route:
    """The torch runtime of a compiled route (built once per layer or loaded export)."""
    return ROUTES[meta["kind"]](tensors, meta)


__all__ = ["ROUTES", "Route", "as_tensors", "available", "compile_route", "load_route"]
