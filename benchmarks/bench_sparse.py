"""Sparse parameters: construction memory and solve time where dense ones would not fit.

Least squares with a sparse n×n matrix parameter (about 5 nonzeros per row),

    minimize ‖A x − b‖² + 0.1‖x‖²   subject to  x ≥ 0,

declared as ``cp.Parameter((n, n), sparsity=pattern)`` and passed as a torch
sparse tensor: θ holds only the nonzeros and the gradient comes back sparse.
For comparison, the same problem with a dense ``cp.Parameter((n, n))`` (what
cvxpylayers requires; it refuses sparsity patterns) is built at small n, and
its growth extrapolated. Each configuration runs in a fresh process; "peak MB"
is the growth of the process's peak resident memory while the layer is built.

    python benchmarks/bench_sparse.py [--sizes 1000,2000,4000] [--solve-method SCS]

Every row solves through diffcp with Clarabel (``--solve-method``), for both
libraries: the problem reaches diffcp as a second-order cone program, on which
SCS at its default settings takes thousands of iterations here (6500 at
n = 2000, 400 s at n = 4000) and stops inaccurate, where Clarabel takes about 25.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(spec: dict) -> dict:
    import resource

    import cvxpy as cp
    import numpy as np
    import torch

    torch.set_num_threads(1)
    n, kind = spec["n"], spec["kind"]
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(n), 5)
    cols = rng.integers(0, n, 5 * n)
    pattern = np.unique(np.stack([rows, cols]), axis=1)
    x = cp.Variable(n)
    b = cp.Parameter(n)
    A = (cp.Parameter((n, n), sparsity=(pattern[0], pattern[1])) if kind == "sparse"
         else cp.Parameter((n, n)))
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)), [x >= 0])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if spec["lib"] == "ours":
        from declarative import CvxpyLayer

        layer = CvxpyLayer(prob, [A, b], [x], backend="conic")
    else:
        from cvxpylayers.torch import CvxpyLayer as Peer

        layer = Peer(prob, [A, b], [x])
    build = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    vals = torch.tensor(rng.standard_normal(pattern.shape[1]) / 5 ** 0.5)
    if kind == "sparse":
        At = torch.sparse_coo_tensor(torch.as_tensor(pattern), vals, (n, n)).coalesce()
    else:
        At = torch.sparse_coo_tensor(torch.as_tensor(pattern), vals, (n, n)).to_dense()
    At.requires_grad_()
    bt = torch.tensor(rng.standard_normal(n), requires_grad=True)
    t0 = time.perf_counter()
    (xs,) = layer(At, bt, solver_args={"solve_method": spec["solve_method"]})
    xs.sum().backward()
    solve = time.perf_counter() - t0
    grad = At.grad
    return {"build_s": build, "build_peak_mb": peak, "solve_s": solve,
            "grad": "sparse" if grad.is_sparse else "dense",
            "grad_nnz": int(grad._nnz()) if grad.is_sparse else int((grad != 0).sum()),
            "nnz": int(pattern.shape[1])}


def measure(spec: dict, timeout: float) -> dict:
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": tail[:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1000,2000,4000")
    parser.add_argument("--dense-sizes", default="250,500")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--solve-method", default="Clarabel",
                        help="diffcp's solve_method for every row (default Clarabel: on this "
                             "least squares in second-order-cone form SCS needs thousands of "
                             "iterations, 400 s at n = 4000, and stops inaccurate)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    for n in [int(v) for v in args.dense_sizes.split(",") if v]:
        for lib in ("ours", "cvxpylayers"):
            rows.append((n, "dense", lib, measure(dict(n=n, kind="dense", lib=lib,
                                                             solve_method=args.solve_method),
                                                  args.timeout)))
    for n in [int(v) for v in args.sizes.split(",") if v]:
        rows.append((n, "sparse", "ours", measure(dict(n=n, kind="sparse", lib="ours",
                                                              solve_method=args.solve_method),
                                                  args.timeout)))
    print(f"solve_method {args.solve_method}\n")
    print("| n | parameter | library | nnz(A) | build (s) | build peak MB | "
          "solve + backward (s) | gradient |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    for n, kind, lib, r in rows:
        if "error" in r:
            print(f"| {n} | {kind} | {lib} | | failed: {r['error']} | | | |")
            continue
        print(f"| {n} | {kind} | {lib} | {r['nnz']} | {r['build_s']:.1f} | "
              f"{r['build_peak_mb']:.0f} | {r['solve_s']:.2f} | {r['grad']} "
              f"({r['grad_nnz']} nonzeros) |")
    print("\nA dense n×n parameter is n² numbers per sample in θ alone (n = 4000: 128 MB); "
          "its compiled maps grow with it (see the dense rows).")


if __name__ == "__main__":
    main()
