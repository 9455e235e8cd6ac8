"""Sparse parameters: construction memory and solve time where dense ones would not fit.

    python benchmarks/bench_sparse.py [--sizes 1000,2000,4000] [--solve-method SCS]

``minimize ‖Ax − b‖² + 0.1‖x‖² s.t. x ≥ 0`` with A an n×n parameter of about 5
nonzeros per row, declared ``cp.Parameter((n, n), sparsity=pattern)`` and passed
as a torch sparse tensor (θ holds only the nonzeros; the gradient comes back
sparse), against the same problem with a dense parameter (what cvxpylayers
requires) at small n. Each configuration runs in a fresh process (--threads, 1);
"build peak MB" is the growth of its peak resident memory while the layer is
built. Every row solves through diffcp with Clarabel (``--solve-method``): SCS
at its defaults takes thousands of iterations on this cone form (6500 at
n = 2000, 400 s at n = 4000) and stops inaccurate, where Clarabel takes about 25.
"""

from __future__ import annotations

import argparse
import json
import time

from harness import argument_parser, csv_list, emit, peak_rss_mb, run_child


def child(spec: dict) -> dict:
    import cvxpy as cp
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    n, sparse = spec["n"], spec["kind"] == "sparse"
    rng = np.random.default_rng(0)
    pattern = np.unique(np.stack([np.repeat(np.arange(n), 5), rng.integers(0, n, 5 * n)]), axis=1)
    x, b = cp.Variable(n), cp.Parameter(n)
    A = cp.Parameter((n, n), sparsity=(pattern[0], pattern[1])) if sparse else cp.Parameter((n, n))
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)), [x >= 0])
    base, t0 = peak_rss_mb(), time.perf_counter()
    if spec["lib"] == "ours":
        from declarative import CvxpyLayer

        layer = CvxpyLayer(prob, [A, b], [x], backend="conic")
    else:
        from cvxpylayers.torch import CvxpyLayer as Peer

        layer = Peer(prob, [A, b], [x])
    build, peak = time.perf_counter() - t0, peak_rss_mb() - base
    At = torch.sparse_coo_tensor(torch.as_tensor(pattern), torch.tensor(
        rng.standard_normal(pattern.shape[1]) / 5 ** 0.5), (n, n))
    At = (At.coalesce() if sparse else At.to_dense()).requires_grad_()
    bt = torch.tensor(rng.standard_normal(n), requires_grad=True)
    t0 = time.perf_counter()
    (xs,) = layer(At, bt, solver_args={"solve_method": spec["solve_method"]})
    xs.sum().backward()
    g = At.grad
    return {"build_s": build, "build_peak_mb": peak, "solve_s": time.perf_counter() - t0,
            "grad": "sparse" if g.is_sparse else "dense", "nnz": int(pattern.shape[1]),
            "grad_nnz": int(g._nnz()) if g.is_sparse else int((g != 0).sum())}


def main(argv=None):
    p = argument_parser(__doc__.splitlines()[0], repeats=None, warmup=None, threads=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="1000,2000,4000", help="n of the sparse rows")
    p.add_argument("--dense-sizes", default="250,500", help="n of the dense rows")
    p.add_argument("--timeout", type=float, default=600, help="seconds per process")
    p.add_argument("--solve-method", default="Clarabel", help="diffcp's solve_method")
    args = p.parse_args(argv)
    if args.child:
        return print(json.dumps(child(json.loads(args.child))))
    if args.quick:
        args.sizes, args.dense_sizes = "1000", "250"
    rows = [(n, "dense", lib) for n in csv_list(args.dense_sizes, int)
            for lib in ("ours", "cvxpylayers")]
    rows += [(n, "sparse", "ours") for n in csv_list(args.sizes, int)]
    lines = [f"solve_method {args.solve_method}\n",
             "| n | parameter | library | nnz(A) | build (s) | build peak MB | "
             "solve + backward (s) | gradient |", "|---:|---|---|---:|---:|---:|---:|---|"]
    for n, kind, lib in rows:
        ok, r = run_child(__file__, dict(n=n, kind=kind, lib=lib, threads=args.threads,
                                         solve_method=args.solve_method), args.timeout)
        lines.append(f"| {n} | {kind} | {lib} | " + (
            f"{r['nnz']} | {r['build_s']:.1f} | {r['build_peak_mb']:.0f} | {r['solve_s']:.2f} | "
            f"{r['grad']} ({r['grad_nnz']} nonzeros) |" if ok else f" | failed: {r} | | | |"))
    lines.append("\nA dense n×n parameter is n² numbers per sample in θ alone (n = 4000: "
                 "128 MB); its compiled maps grow with it (see the dense rows).")
    emit("\n".join(lines) + "\n", args.out, __file__)


if __name__ == "__main__":
    main()
