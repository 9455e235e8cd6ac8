"""Measure the constants of the route cost model (`declarative.routes.cost`).

    python benchmarks/calibrate_routes.py            # measure, fit, print the table
    python benchmarks/calibrate_routes.py --write    # ... and store route_costs.json
    python benchmarks/calibrate_routes.py --quick    # fewer sizes (a smoke run)

For each route that can take a problem (`backend=` forced), times forward +
backward of problems written as users write them, at several sizes and batch
sizes, on one thread in float64 (medians of interleaved repeats), and fits per
route the model

    t(B) = c_call + c_shared · size + B · (c_sample + c_work · work + c_size · size)

by non-negative least squares on relative errors (each route's ``work`` and
``size`` are its own measures of one sample, `Route.cost`). The table printed compares the
fit with each measurement. `backend="auto"` reads the stored constants; run
this on the machine that trains to route by its own speeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from datetime import date

import cvxpy as cp
import numpy as np
import torch
from scipy.optimize import nnls

from declarative import CvxpyLayer
from declarative.routes import cost

# Each family: size -> (problem, parameters, variables, value shapes). The sizes
# span small to large so that the fixed and the per-flop terms are both seen.


def _box_least_squares(n):
    A, b, x = cp.Parameter((2 * n, n)), cp.Parameter(2 * n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= -1, x <= 1])
    return prob, [A, b], [x], [(2 * n, n), (2 * n,)]


def _lasso(n):
    A, b, x = cp.Parameter((2 * n, n)), cp.Parameter(2 * n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.5 * cp.norm1(x)))
    return prob, [A, b], [x], [(2 * n, n), (2 * n,)]


def _total_variation(n):
    y, x = cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y) + 0.5 * cp.norm1(cp.diff(x))))
    return prob, [y], [x], [(n,)]


def _relu_layer(n):
    """cvxpylayers' ReLU-layer example: a variable tied to the weight Parameter
    (Wt == W) times the input Parameter, so the presolve's pivot block depends on
    the parameters and its substitution is rebuilt for every sample."""
    W, b, x = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter(n)
    z, Wt = cp.Variable(n), cp.Variable((n, n))
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - Wt @ x - b)), [z >= 0, Wt == W])
    return prob, [W, b, x], [z], [(n, n), (n,), (n,)]


def _projection(n):
    y, x = cp.Parameter(n), cp.Variable(n)
    return cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0]), [y], [x], [(n,)]


def _control(T):
    rng = np.random.default_rng(0)
    F = np.eye(4) + 0.1 * rng.standard_normal((4, 4))
    G = rng.standard_normal((4, 2))
    x0, X, U = cp.Parameter(4), cp.Variable((4, T + 1)), cp.Variable((2, T))
    cons = [X[:, 0] == x0, cp.abs(U) <= 1]
    cons += [X[:, t + 1] == F @ X[:, t] + G @ U[:, t] for t in range(T)]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X) + cp.sum_squares(U)), cons)
    return prob, [x0], [U], [(4,)]


def _socp(n):
    F, g, x = cp.Parameter((2 * n, n)), cp.Parameter(2 * n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.norm(F @ x - g, 2) + 0.1 * cp.norm1(x)),
                      [cp.norm(x, 2) <= 1])
    return prob, [F, g], [x], [(2 * n, n), (2 * n,)]


def _logistic(n):
    N = 6 * n
    X, w = cp.Parameter((N, n)), cp.Variable(n)
    y = np.sign(np.random.default_rng(1).standard_normal(N))
    loss = cp.sum(cp.logistic(-cp.multiply(y, X @ w))) / N + 0.1 * cp.sum_squares(w)
    return cp.Problem(cp.Minimize(loss)), [X], [w], [(N, n)]


FAMILIES = {
    "box-least-squares": (_box_least_squares, [10, 40, 120]),
    "lasso": (_lasso, [10, 50, 150]),
    "total-variation": (_total_variation, [50, 300, 1000]),
    "projection": (_projection, [100, 500, 2000]),
    "relu-layer": (_relu_layer, [5, 10, 20]),
    "control": (_control, [10, 30]),
    "socp": (_socp, [5, 20, 60]),
    "logistic": (_logistic, [3, 10]),
}
QUICK = {"box-least-squares": [10, 40], "lasso": [10, 50], "total-variation": [50, 300],
         "projection": [100], "relu-layer": [5], "control": [10], "socp": [5, 20],
         "logistic": [3]}
BATCHES = (1, 8, 32)
# A measurement expected to take longer than this is left out (the fit extrapolates).
MAX_SECONDS = 4.0


def _time(layer, values, repeats):
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


def measure(families: dict, repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for name, (build, sizes) in families.items():
        for size in sizes:
            prob, params, variables, shapes = build(size)
            auto = CvxpyLayer(prob, params, variables)
            kinds = [c.kind for c in auto._choice.candidates] if auto._choice else [auto.backend]
            layers = {k: CvxpyLayer(prob, params, variables, backend=k) for k in kinds}
            last, previous = {}, None
            for B in BATCHES:
                values = [torch.tensor(rng.standard_normal((B,) + s)) for s in shapes]
                for kind, layer in layers.items():
                    if previous and last.get(kind, 0.0) * B / previous > MAX_SECONDS:
                        continue
                    t = _time(layer, values, repeats)
                    last[kind] = t
                    key, work, entries = layer.route(kind).cost()
                    rows.append(dict(family=name, size=size, route=kind, key=key, work=work,
                                     entries=entries, batch=B, seconds=t))
                    print(f"  {name:<18}{size:>6}  {kind:<10} B={B:<3} {t * 1e3:9.2f} ms",
                          flush=True)
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
        call, shared, sample, work, size = coef / scale
        constants[key] = {"call": float(call), "shared": float(shared), "sample": float(sample),
                          "work": float(work), "size": float(size)}
    return constants


def report(rows, constants):
    print(f"\n{'family':<18}{'size':>6}  {'route':<10}{'B':>4}{'measured':>12}{'fitted':>12}")
    for r in rows:
        pred = cost.predict(r["key"], r["work"], r["entries"], r["batch"], constants)
        print(f"{r['family']:<18}{r['size']:>6}  {r['route']:<10}{r['batch']:>4}"
              f"{r['seconds'] * 1e3:>10.2f}ms{pred * 1e3:>10.2f}ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="store route_costs.json")
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    families = {k: (b, QUICK[k]) for k, (b, _) in FAMILIES.items()} if args.quick else FAMILIES
    rows = measure(families, args.repeats)
    constants = fit(rows)
    report(rows, constants)
    if args.write:
        data = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
                "date": date.today().isoformat(), "threads": 1, "routes": constants}
        cost.COSTS_FILE.write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {cost.COSTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
