"""Measure the constants of the route cost model (`cost`) on this machine.

    python -m declarative.routes.calibrate                     # measure, fit, print the table
    python -m declarative.routes.calibrate --out my_costs.json # ... and store the constants
    python -m declarative.routes.calibrate --quick             # the smallest sizes (a smoke run)

then ``DECLARATIVE_ROUTE_COSTS=my_costs.json`` makes ``backend="auto"`` route by
them. For each route that can take a problem (``backend=`` forced), times forward +
backward of problems written as users write them (box least squares, LASSO,
nonnegative least squares, total variation, projections, cvxpylayers' ReLU
layer, control, SOCPs and logistic regressions) at several sizes and batch
sizes, on one thread in float64 (medians of repeats), and fits per route

    t(B) = c_call + c_shared · size + B · (c_sample + c_work · work + c_size · size)

by non-negative least squares on relative errors (each route's ``work`` and
``size`` are its own measures of one sample, `Route.cost`). The table printed
compares the fit with each measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings
from datetime import date

import cvxpy as cp
import numpy as np
import torch
from scipy.optimize import nnls

from . import cost

# A problem: (build() -> (problem, parameters, variables), sample(rng, B) -> arrays with a
# leading batch dimension). The benchmarks time the same formulations.


def regression(m: int, n: int, l1: float = 0.0, ridge: float = 0.0, box: bool = False,
               nonneg: bool = False):
    """min ‖Ax − b‖² + l1‖x‖₁ + ridge‖x‖² (s.t. −1 ≤ x ≤ 1, or x ≥ 0), A and b parameters."""
    def build():
        A, b = cp.Parameter((m, n), name="A"), cp.Parameter(m, name="b")
        x = cp.Variable(n, name="x")
        obj = cp.sum_squares(A @ x - b)
        obj = obj + l1 * cp.norm1(x) if l1 else obj
        obj = obj + ridge * cp.sum_squares(x) if ridge else obj
        cons = [x >= -1, x <= 1] if box else [x >= 0] if nonneg else []
        return cp.Problem(cp.Minimize(obj), cons), [A, b], [x]

    return build, lambda rng, B: [rng.standard_normal((B, m, n)) / math.sqrt(m),
                                  2.0 * rng.standard_normal((B, m))]


def denoise(n: int, tv: bool):
    """min ‖x − y‖² + 0.5‖Dx‖₁ (total variation), or s.t. x ≥ 0 (a projection: a ReLU)."""
    def build():
        y, x = cp.Parameter(n, name="y"), cp.Variable(n)
        if tv:
            return cp.Problem(cp.Minimize(cp.sum_squares(x - y) + 0.5 * cp.norm1(cp.diff(x)))), \
                [y], [x]
        return cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0]), [y], [x]

    return build, lambda rng, B: [rng.standard_normal((B, n))]


def relu_layer(n: int):
    """cvxpylayers' ReLU-layer example: a variable tied to the weight Parameter
    (Wt == W) times the input Parameter, so a presolve's pivot block depends on the
    parameters and its substitution is rebuilt for every sample."""
    def build():
        W, b, x = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter(n)
        z, Wt = cp.Variable(n), cp.Variable((n, n))
        return cp.Problem(cp.Minimize(cp.sum_squares(z - Wt @ x - b)), [z >= 0, Wt == W]), \
            [W, b, x], [z]

    return build, lambda rng, B: [rng.standard_normal((B,) + s) for s in ((n, n), (n,), (n,))]


def mpc(T: int, nx: int = 4, nu: int = 2):
    """Track zero from x0 under |u| ≤ 1 and x_{t+1} = A x_t + B u_t; returns u."""
    rng = np.random.default_rng(3)
    A = np.eye(nx) + 0.1 * rng.standard_normal((nx, nx))
    A /= max(1.0, np.abs(np.linalg.eigvals(A)).max())
    Bu = rng.standard_normal((nx, nu))

    def build():
        x0, x, u = cp.Parameter(nx, name="x0"), cp.Variable((T + 1, nx)), cp.Variable((T, nu))
        cons = [x[0] == x0, cp.abs(u) <= 1] + [x[t + 1] == A @ x[t] + Bu @ u[t] for t in range(T)]
        return cp.Problem(cp.Minimize(cp.sum_squares(x) + 0.1 * cp.sum_squares(u)), cons), \
            [x0], [u]

    return build, lambda rng, B: [3.0 * rng.standard_normal((B, nx))]


def socp_regression(n: int, m: int):
    """min ‖Fx − g‖₂ + 0.1‖x‖₁ s.t. ‖x‖₂ ≤ 1."""
    def build():
        x, F, g = cp.Variable(n), cp.Parameter((m, n)), cp.Parameter(m)
        return cp.Problem(cp.Minimize(cp.norm(F @ x - g, 2) + 0.1 * cp.norm(x, 1)),
                          [cp.norm(x, 2) <= 1]), [F, g], [x]

    def sample(rng, B):
        F = rng.standard_normal((B, m, n))
        xt = rng.uniform(-0.4, 0.4, (B, n))
        return [F, np.einsum("bmn,bn->bm", F, xt) + 0.3 * rng.standard_normal((B, m))]

    return build, sample


def classifier(m: int, n: int, loss: str):
    """SVM (hinge) or logistic regression with fixed labels y; X a parameter; returns w."""
    y = np.where(np.arange(m) % 2 == 0, 1.0, -1.0)

    def build():
        X, w = cp.Parameter((m, n), name="X"), cp.Variable(n)
        if loss == "hinge":
            b = cp.Variable()
            fit = cp.sum(cp.pos(1 - cp.multiply(y, X @ w + b))) / m
        else:
            fit = cp.sum(cp.logistic(-cp.multiply(y, X @ w))) / m
        return cp.Problem(cp.Minimize(fit + 0.1 * cp.sum_squares(w))), [X], [w]

    return build, lambda rng, B: [rng.standard_normal((B, m, n)) + 0.5 * y[:, None] * np.ones(n)]


# Each family: size -> a problem, and the sizes measured. They span small to large so
# that the fixed and the per-flop terms are both seen.
FAMILIES = {
    "box-least-squares": (lambda n: regression(2 * n, n, box=True), [10, 40, 120]),
    "lasso": (lambda n: regression(2 * n, n, l1=0.5), [10, 50, 150]),
    # Square and dense: CVXPY's QP form ties an auxiliary variable to Ax − b, whose
    # sparse LDLᵀ factor fills in, so the sparse route's time follows its factor's
    # flops, which the smaller families do not show.
    "nonnegative-ls": (lambda n: regression(n, n, ridge=0.1, nonneg=True), [60, 200, 400]),
    "total-variation": (lambda n: denoise(n, tv=True), [50, 300, 1000]),
    "projection": (lambda n: denoise(n, tv=False), [100, 500, 2000]),
    "relu-layer": (relu_layer, [5, 10, 20]),
    "control": (mpc, [10, 30]),
    "socp": (lambda n: socp_regression(n, 2 * n), [5, 20, 60]),
    "logistic": (lambda n: classifier(6 * n, n, "logistic"), [3, 10]),
}
BATCHES = (1, 8, 32)
# A measurement expected to take longer than this is left out (the fit extrapolates).
MAX_SECONDS = 4.0


def _time(layer, values, repeats: int) -> float:
    def once():
        ins = [v.clone().requires_grad_() for v in values]
        out = layer(*ins)
        torch.autograd.grad(sum(o.sum() for o in out), ins)

    once()  # first-call work (maps, caches) out of the measurement
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(families: dict, repeats: int, batches=BATCHES, echo=print) -> list[dict]:
    """One row per (family, size, route, batch): the route's cost measures and the
    median seconds of forward + backward."""
    from .. import CvxpyLayer

    rows, rng = [], np.random.default_rng(0)
    for name, (make, sizes) in families.items():
        for size in sizes:
            build, sample = make(size)
            prob, params, variables = build()
            auto = CvxpyLayer(prob, params, variables)
            kinds = [c.kind for c in auto._choice.candidates] if auto._choice else [auto.backend]
            layers = {k: CvxpyLayer(prob, params, variables, backend=k) for k in kinds}
            last, previous = {}, None
            for B in batches:
                values = [torch.tensor(v) for v in sample(rng, B)]
                for kind, layer in layers.items():
                    if previous and last.get(kind, 0.0) * B / previous > MAX_SECONDS:
                        continue
                    last[kind] = t = _time(layer, values, repeats)
                    key, work, entries = layer.route(kind).cost()
                    rows.append(dict(family=name, size=size, route=kind, key=key, work=work,
                                     entries=entries, batch=B, seconds=t))
                    echo(f"  {name:<18}{size:>6}  {kind:<10} B={B:<3} {t * 1e3:9.2f} ms")
                previous = B
    return rows


def fit(rows: list[dict]) -> dict:
    """Per cost key: the non-negative (call, shared, sample, work, size) minimizing
    relative errors."""
    constants = {}
    for key in sorted({r["key"] for r in rows}):
        mine = [r for r in rows if r["key"] == key]
        X = np.array([[1.0, r["entries"], r["batch"], r["batch"] * r["work"],
                       r["batch"] * r["entries"]] for r in mine])
        t = np.array([r["seconds"] for r in mine])
        scale = X.max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls((X / scale) / t[:, None], np.ones_like(t))
        names = ("call", "shared", "sample", "work", "size")
        constants[key] = {k: float(c) for k, c in zip(names, coef / scale)}
    return constants


def report(rows: list[dict], constants: dict) -> str:
    lines = [f"{'family':<18}{'size':>6}  {'route':<10}{'B':>4}{'measured':>12}{'fitted':>12}"]
    for r in rows:
        pred = cost.predict(r["key"], r["work"], r["entries"], r["batch"], constants)
        lines.append(f"{r['family']:<18}{r['size']:>6}  {r['route']:<10}{r['batch']:>4}"
                     f"{r['seconds'] * 1e3:>10.2f}ms{pred * 1e3:>10.2f}ms")
    return "\n".join(lines)


def save(constants: dict, path) -> None:
    """Store the constants as `cost.constants` reads them, with the machine's name."""
    data = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": date.today().isoformat(), "threads": 1, "routes": constants}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="store the constants in this JSON file")
    parser.add_argument("--quick", action="store_true", help="the smallest size of each family")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per point (3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    families = {k: (b, s[:1]) for k, (b, s) in FAMILIES.items()} if args.quick else FAMILIES
    rows = measure(families, args.repeats, echo=lambda line: print(line, flush=True))
    constants = fit(rows)
    print("\n" + report(rows, constants))
    if args.out:
        save(constants, args.out)
        print(f"\nwrote {args.out}; DECLARATIVE_ROUTE_COSTS={args.out} makes auto use it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
