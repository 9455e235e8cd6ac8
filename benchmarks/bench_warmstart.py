"""Warm starts on slowly changing parameters (an MPC-like loop): iterations and time saved.

A batch of problems is solved at T consecutive steps whose parameters drift a
little each step, once cold (every solve from scratch) and once warm (each
solve starts from the previous step's solution: ``layer(..., warm_start=info)``).
Reported per path: mean solver iterations per solve and total time, cold vs warm,
and the largest difference between the warm and cold solutions.

    python benchmarks/bench_warmstart.py [--steps 20] [--batch 16]
"""

from __future__ import annotations

import argparse
import time

import cvxpy as cp
import numpy as np
import torch

from declarative import CvxpyLayer


def mpc_problem(nx=6, nu=3, T=10, seed=0):
    """Linear MPC over horizon T: track zero from x0 with bounded inputs (a QP)."""
    rng = np.random.default_rng(seed)
    A = np.eye(nx) + 0.1 * rng.standard_normal((nx, nx))
    A /= max(1.0, np.abs(np.linalg.eigvals(A)).max())
    B = rng.standard_normal((nx, nu))
    x0 = cp.Parameter(nx)
    target = cp.Parameter(nx)
    x = cp.Variable((T + 1, nx))
    u = cp.Variable((T, nu))
    cons = [x[0] == x0, cp.abs(u) <= 1]
    cons += [x[t + 1] == A @ x[t] + B @ u[t] for t in range(T)]
    cost = cp.sum_squares(x[1:] - np.ones((T, 1)) @ cp.reshape(target, (1, nx), order="C"))
    prob = cp.Problem(cp.Minimize(cost + 0.1 * cp.sum_squares(u)), cons)
    return prob, [x0, target], [u]


def transport_problem(r=20, c=20, tau=0.1):
    C = cp.Parameter((r, c))
    a = cp.Parameter(r)
    b = cp.Parameter(c)
    Z = cp.Variable((r, c))
    prob = cp.Problem(cp.Maximize(-cp.sum(cp.multiply(C, Z)) + tau * cp.sum(cp.entr(Z))),
                      [cp.sum(Z, axis=1) == a, cp.sum(Z, axis=0) == b])
    return prob, [C, a, b], [Z]


def run_loop(layer, inputs_at, steps):
    """(mean iterations cold, warm; seconds cold, warm; max |warm − cold|)."""
    cold_it, warm_it, cold_t, warm_t, diff = [], [], 0.0, 0.0, 0.0
    info = None
    for k in range(steps):
        ins = inputs_at(k)
        t0 = time.perf_counter()
        (xc,), ic = layer(*ins, return_info=True)
        t1 = time.perf_counter()
        (xw,), iw = layer(*ins, return_info=True, warm_start=info if info is not None else False)
        t2 = time.perf_counter()
        info = iw
        if k == 0:
            continue  # the first warm solve has nothing to start from
        cold_t += t1 - t0
        warm_t += t2 - t1
        cold_it.append(float(np.mean(ic.iterations)))
        warm_it.append(float(np.mean(iw.iterations)))
        diff = max(diff, float((xc - xw).abs().max()))
    return np.mean(cold_it), np.mean(warm_it), cold_t, warm_t, diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    B, T = args.batch, args.steps
    rows = []

    prob, params, outs = mpc_problem()
    x0 = rng.standard_normal((B, 6))
    drift = 0.02 * rng.standard_normal((T, B, 6))
    tgt = rng.standard_normal(6)

    def mpc_inputs(k):
        return (torch.tensor(x0 + drift[: k + 1].sum(0)), torch.tensor(tgt))

    for backend, args_ in (("qp", None), ("conic", {"eps": 1e-6, "max_iters": 20000})):
        layer = CvxpyLayer(prob, params, outs, backend=backend, solver_args=args_)
        rows.append(("MPC (n=96 QP)", backend, B, *run_loop(layer, mpc_inputs, T)))

    prob, params, outs = transport_problem()
    C0 = rng.random((B, 20, 20))
    a = np.full(20, 1 / 20)

    def ot_inputs(k):
        return (torch.tensor(C0 + 0.01 * k), torch.tensor(a), torch.tensor(a))

    layer = CvxpyLayer(prob, params, outs)
    rows.append(("transport 20x20", layer.backend, B, *run_loop(layer, ot_inputs, T)))

    print(f"{T} steps, batch {B}; times are totals over steps 2..{T}\n")
    print("| problem | path | B | iterations cold | iterations warm | time cold (s) | "
          "time warm (s) | speed-up | max |warm − cold| |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, path, b, ic, iw, tc, tw, d in rows:
        print(f"| {name} | {path} | {b} | {ic:.1f} | {iw:.1f} | {tc:.2f} | {tw:.2f} | "
              f"{tc / tw:.2f} | {d:.1e} |")


if __name__ == "__main__":
    main()
