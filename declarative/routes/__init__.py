"""The route registry: one entry per way of solving and differentiating a problem.

Order matters: from the most specific structure to the most general, which is
the order `backend="auto"` prefers among the routes a problem's structure allows
(see `canon.compile.FORMS` for the recognizers). Each route: `base.Route`.
"""

from .base import Route, as_tensors
from .conic import ConicRoute
from .entropy import EntropyRoute, SimplexRoute
from .qp import QPRoute

ROUTES: dict[str, type[Route]] = {
    route.kind: route for route in (SimplexRoute, EntropyRoute, QPRoute, ConicRoute)
}


def compile_route(form, layout) -> tuple[dict, dict]:
    """(arrays, meta) of the route that takes ``form`` (numpy side, at construction)."""
    return ROUTES[form.kind].compile(form, layout)


def load_route(tensors: dict, meta: dict) -> Route:
    """The torch runtime of a compiled route (built once per layer or loaded export)."""
    return ROUTES[meta["kind"]](tensors, meta)


__all__ = ["ROUTES", "Route", "as_tensors", "compile_route", "load_route"]
