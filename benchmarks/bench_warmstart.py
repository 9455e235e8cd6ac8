"""Warm starts on slowly changing parameters (an MPC-like loop): iterations and time saved.

    python benchmarks/bench_warmstart.py [--steps 20] [--batch 16] [--quick]

A batch of problems is solved at T consecutive steps whose parameters drift a
little each step, once cold (from scratch) and once warm (from the previous
step's solution: ``layer(..., warm_start=info)``); per path: mean solver
iterations per solve and total time, cold vs warm, and the largest difference
between the warm and cold solutions.
"""

from __future__ import annotations

import time

import cvxpy as cp
import numpy as np
import torch
from harness import argument_parser, emit, setup

from declarative import CvxpyLayer


def mpc_problem(nx=6, nu=3, T=10, seed=0):
    """Linear MPC over horizon T: track a target from x0 with bounded inputs (a QP)."""
    rng = np.random.default_rng(seed)
    A = np.eye(nx) + 0.1 * rng.standard_normal((nx, nx))
    A /= max(1.0, np.abs(np.linalg.eigvals(A)).max())
    B = rng.standard_normal((nx, nu))
    x0, target = cp.Parameter(nx), cp.Parameter(nx)
    x, u = cp.Variable((T + 1, nx)), cp.Variable((T, nu))
    cons = [x[0] == x0, cp.abs(u) <= 1] + [x[t + 1] == A @ x[t] + B @ u[t] for t in range(T)]
    cost = cp.sum_squares(x[1:] - np.ones((T, 1)) @ cp.reshape(target, (1, nx), order="C"))
    return cp.Problem(cp.Minimize(cost + 0.1 * cp.sum_squares(u)), cons), [x0, target], [u]


def transport_problem(r=20, c=20, tau=0.1):
    C, a, b, Z = cp.Parameter((r, c)), cp.Parameter(r), cp.Parameter(c), cp.Variable((r, c))
    prob = cp.Problem(cp.Maximize(-cp.sum(cp.multiply(C, Z)) + tau * cp.sum(cp.entr(Z))),
                      [cp.sum(Z, axis=1) == a, cp.sum(Z, axis=0) == b])
    return prob, [C, a, b], [Z]


def run_loop(layer, inputs_at, steps):
    """(mean iterations cold, warm; seconds cold, warm; max |warm − cold|), steps 2..T."""
    cold_it, warm_it, cold_t, warm_t, diff, info = [], [], 0.0, 0.0, 0.0, None
    for k in range(steps):
        ins = inputs_at(k)
        t0 = time.perf_counter()
        (xc,), ic = layer(*ins, return_info=True)
        t1 = time.perf_counter()
        (xw,), info = layer(*ins, return_info=True, warm_start=info if info is not None else False)
        if k > 0:  # the first warm solve has nothing to start from
            cold_t, warm_t = cold_t + t1 - t0, warm_t + time.perf_counter() - t1
            cold_it.append(float(np.mean(ic.iterations)))
            warm_it.append(float(np.mean(info.iterations)))
            diff = max(diff, float((xc - xw).abs().max()))
    return np.mean(cold_it), np.mean(warm_it), cold_t, warm_t, diff


def main(argv=None):
    p = argument_parser(__doc__.splitlines()[0], repeats=None, warmup=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 5
    setup(args.threads)
    rng, B, T = np.random.default_rng(1), args.batch, args.steps
    prob, params, outs = mpc_problem()
    x0, drift, tgt = rng.standard_normal((B, 6)), 0.02 * rng.standard_normal((T, B, 6)), \
        rng.standard_normal(6)
    rows = []
    for backend, solver_args in (("qp", None), ("conic", {"eps": 1e-6, "max_iters": 20000})):
        layer = CvxpyLayer(prob, params, outs, backend=backend, solver_args=solver_args)
        rows.append(("MPC (n=96 QP)", backend, *run_loop(
            layer, lambda k: (torch.tensor(x0 + drift[: k + 1].sum(0)), torch.tensor(tgt)), T)))
    prob, params, outs = transport_problem()
    C0, a = rng.random((B, 20, 20)), torch.tensor(np.full(20, 1 / 20))
    layer = CvxpyLayer(prob, params, outs)
    rows.append(("transport 20x20", layer.backend,
                 *run_loop(layer, lambda k: (torch.tensor(C0 + 0.01 * k), a, a), T)))
    lines = [f"{T} steps, batch {B}; times are totals over steps 2..{T}\n",
             "| problem | path | B | iterations cold | iterations warm | time cold (s) | "
             "time warm (s) | speed-up | max |warm − cold| |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {path} | {B} | {ic:.1f} | {iw:.1f} | {tc:.2f} | {tw:.2f} | "
              f"{tc / tw:.2f} | {d:.1e} |" for name, path, ic, iw, tc, tw, d in rows]
    emit("\n".join(lines) + "\n", args.out, __file__)


if __name__ == "__main__":
    main()
