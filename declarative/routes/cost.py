"""Which route a call takes under ``backend="auto"``: a measured cost model.

Some problems can be solved exactly by more than one route on the same
canonical form: a QP by the dense batched interior point (`qp`, presolved, a box
QP in closed form) or by per-sample sparse factorizations (`sparse_qp`); a cone
program by the batched torch interior point (`cone`) or by diffcp's solvers one
sample at a time (`conic`). Which is faster depends on the sizes and on the
batch: the dense engines pay a fixed cost per call (hundreds of small tensor
operations per iteration) and almost nothing per extra sample at small n; the
per-sample ones the reverse. Each route predicts a call of B samples as

    t(B) = c_call + c_shared · size + B · (c_sample + c_work · work + c_size · size)

where ``work`` and ``size`` are the route's own measures of one sample
(`Route.cost`: the flops of its factorizations, e.g. the dense Newton system's
or the sparse factor's from its symbolic analysis, and the entries each
iteration touches, e.g. nnz(A) for diffcp; the c_shared term is the work on
blocks the batch shares, done once per call) and the five constants per route are measured on
a machine by `calibrate` (forward + backward, float64, one thread) and stored in
``route_costs.json`` next to this module, or in the file the environment variable
``DECLARATIVE_ROUTE_COSTS`` names (constants measured on the machine that trains). A call
takes the cheapest predicted route for its batch size; inputs on a GPU take the
batched torch routes (the per-sample ones run on the CPU and would copy the
batch there and back), and inputs inside torch.func transforms the routes that
support them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..backends.functorch import any_wrapped

COSTS_FILE = Path(__file__).with_name("route_costs.json")
# `layer.backend` names the route a batch of this many CPU samples takes.
NOMINAL_BATCH = 16
# Batches the explanation (`layer.routes`) shows predictions for.
SHOWN_BATCHES = (1, 16, 64)


def constants() -> dict:
    """{cost key: {"call", "shared", "sample", "work", "size"}}: seconds, and seconds
    per unit of work or size (see the module doc), from ``DECLARATIVE_ROUTE_COSTS``'s
    file if set, else the shipped one."""
    return _load(os.environ.get("DECLARATIVE_ROUTE_COSTS") or str(COSTS_FILE))


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    try:
        table = json.loads(Path(path).read_text())["routes"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"DECLARATIVE_ROUTE_COSTS={path!r}: expected a JSON file written by "
                         f"`python -m declarative.routes.calibrate --out`, got {err}") from err
    missing = set(json.loads(COSTS_FILE.read_text())["routes"]) - set(table)
    if missing:
        raise ValueError(f"{path!r} has no constants for the routes {sorted(missing)}: "
                         "measure them again with `python -m declarative.routes.calibrate`")
    return table


def predict(key: str, work: float, size: float, batch: int, table=None) -> float:
    c = (table or constants())[key]
    return c["call"] + c.get("shared", 0.0) * size \
        + batch * (c["sample"] + c["work"] * work + c.get("size", 0.0) * size)


@dataclass(frozen=True)
class Candidate:
    kind: str
    route: object  # `base.Route`
    key: str  # its constants' name in route_costs.json
    work: float
    size: float

    def seconds(self, batch: int) -> float:
        return predict(self.key, self.work, self.size, batch)


class RouteChoice:
    """The exact routes of one canonical form, chosen per call by predicted time."""

    def __init__(self, candidates: list[Candidate]):
        self.candidates = candidates
        self._picked: dict = {}
        # kind -> how many times slower than predicted its calls measured (≥ 1).
        self._underestimate: dict = {}
        self._warmed: set = set()  # routes whose first call (caches built) is past
        first = candidates[0].route
        # The front door checks inputs before choosing; these agree across a form.
        self.maskable, self.kind = first.maskable, "auto"

    def pick(self, batch: int, device, params, warm_route: str | None = None):
        """(the route for a call of ``batch`` samples on ``device``, whether a warm
        start from ``warm_route`` fits it). A warm start from one of these routes
        keeps the call on that route where it can run (its state is that route's,
        and starting warm is what it was passed for); otherwise the call starts cold."""
        # torch.compile traces fake tensors: only the batched torch routes can run there.
        wrapped = any_wrapped(*params) or torch.compiler.is_compiling()
        device_type = getattr(device, "type", str(device))
        if warm_route is not None:
            for c in self._pool(device_type, wrapped):
                if c.kind == warm_route:
                    return c.route, True
        key = (batch, device_type, wrapped)
        if key not in self._picked:
            self._picked[key] = self.best(batch, device_type, wrapped).route
        route = self._picked[key]
        known = warm_route is None or all(c.kind != warm_route for c in self.candidates)
        return route, known  # another layer's state: the pipeline names what differs

    def _pool(self, device_type: str, wrapped: bool) -> list[Candidate]:
        pool = [c for c in self.candidates
                if not wrapped or (c.route.functorch and c.route.batched_torch)]
        if device_type != "cpu":
            pool = [c for c in pool if c.route.batched_torch] or pool
        return pool or self.candidates

    def best(self, batch: int, device_type: str = "cpu", wrapped: bool = False) -> Candidate:
        pool = self._pool(device_type, wrapped)
        if len(pool) == 1:
            return pool[0]
        return min(pool, key=lambda c: self.expected(c, batch))

    def expected(self, candidate: Candidate, batch: int) -> float:
        """The predicted seconds, raised by what this layer's calls have measured."""
        return candidate.seconds(batch) * self._underestimate.get(candidate.kind, 1.0)

    def corrections(self) -> dict:
        """{kind: factor} by which this layer's calls raised a route's prediction."""
        return dict(self._underestimate)

    def observe(self, kind: str, batch: int, forward_seconds: float) -> None:
        """Correct a route the model underestimates on this problem.

        The constants are fitted across problem families, and a route's time on one
        problem can be far from the fit (a sparse factorization that meets ties
        and falls back to LSQR runs 4x its prediction on a Huber regression). A
        call whose forward alone took longer than the whole predicted forward +
        backward raises that route's prediction by the factor, so the next calls
        go elsewhere if that is now cheaper. Corrections only raise predictions:
        a route is never preferred on the strength of one fast call, and a route
        never tried keeps its fit.
        """
        candidate = next((c for c in self.candidates if c.kind == kind), None)
        if candidate is None or batch <= 0:
            return
        if kind not in self._warmed:  # a first call also builds the route's caches
            self._warmed.add(kind)
            return
        factor = max(1.0, forward_seconds / candidate.seconds(batch))
        previous = self._underestimate.get(kind, 1.0)
        if abs(factor - previous) > 0.25 * previous:
            self._underestimate[kind] = factor
            self._picked.clear()


@dataclass(frozen=True)
class RouteReport:
    """What ``backend="auto"`` chose and why (`CvxpyLayer.routes`)."""

    chosen: str  # the route of a nominal batch (`layer.backend`)
    predicted: dict  # kind -> {batch: seconds}, the candidates of the chosen form
    refused: dict  # kind -> why it is not among the candidates
    requested: str
    corrected: dict = None  # kind -> factor its calls measured above the prediction

    def __str__(self) -> str:
        if self.requested != "auto":
            lines = [f"backend={self.requested!r} was requested: every call runs it."]
        else:
            lines = [f"backend='auto': {self.chosen!r} for a batch of {NOMINAL_BATCH} on the "
                     "CPU; each call takes the route predicted fastest for its batch size "
                     "(measured constants, route_costs.json)."]
        if self.predicted:
            head = "".join(f"{f'B={b}':>12}" for b in SHOWN_BATCHES)
            lines.append(f"  {'route':<12}{head}   (predicted forward + backward)")
            for kind, times in self.predicted.items():
                cells = "".join(f"{times[b] * 1e3:>10.1f}ms" for b in SHOWN_BATCHES)
                factor = (self.corrected or {}).get(kind, 1.0)
                note = f"   (x{factor:.1f}: measured on this layer's calls)" if factor > 1 else ""
                lines.append(f"  {kind:<12}{cells}{note}")
        for kind, why in self.refused.items():
            lines.append(f"  {kind}: {why}")
        return "\n".join(lines)
