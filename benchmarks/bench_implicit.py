"""Implicit versus unrolled differentiation: backward memory and time against K and n.

The case for implicit differentiation (docs/theory.md, section 6) made
measurable. For an iterative solver run for K iterations, differentiating by
storing its trace costs memory that grows with K; the implicit function
theorem needs only the solution.

Two inner solvers, each differentiated both ways:

  qp   the batched interior-point QP engine run for exactly K iterations
       (QPSettings(fixed_iterations=True)): backward="implicit" (KKT system at
       the solution, reusing the final factorization) vs backward="unroll"
       (autograd through every iteration); n variables, n inequalities, batch B.
  gd   K gradient-descent steps on a strongly convex quadratic
       f(x; θ, M) = ½ xᵀMx − θᵀx with θ and M both learned, unrolled by autograd
       vs declarative.implicit with the residual ∇f = Mx − θ (matrix-free MINRES);
       batch B. (M is differentiated too: with a constant M autograd would keep
       only M, the same storage K times, and unrolling would look free.)

Each configuration runs in a fresh subprocess. "Memory for backward" is what the
forward pass keeps alive for the backward: every tensor autograd saves (counted
once per storage with `torch.autograd.graph.saved_tensors_hooks`), plus, for the
implicit QP, the final KKT factorization its Function keeps beside them. That is
the trace that implicit differentiation does without; it is exact and immune to the allocator's
and the imports' noise that a process-level RSS reading carries. Times are
medians of repeats, after one warm-up call. Run:

    python benchmarks/bench_implicit.py                 # table + figure
    python benchmarks/bench_implicit.py --quick         # smaller sweep
    python benchmarks/bench_implicit.py --compare-only  # just the n = 500 comparison
    python benchmarks/bench_implicit.py --threads 1     # each child process on one thread
    python benchmarks/bench_implicit.py --update-docs-figure   # redraw the README's figure

A second table compares the dense and the iterative backward on n = 500
problems, solved to convergence: the QP engine's backward="implicit" (it reuses
the forward's final factorization) against backward="iterative" (MINRES on KKT
products, no factorization kept), and declarative.implicit's method="dense"
(the n×n Jacobian assembled from n products, then factored) against
method="iterative" (MINRES): backward time, memory kept for the backward, and
the relative gap between the two gradients (worst input).

Each child process runs with --threads torch threads (default: what this
process has, i.e. torch's default or OMP_NUM_THREADS). The figure (memory kept
for the backward pass against K, linear axes: unrolling grows linearly, the
implicit backward stays flat) goes to benchmarks/results/implicit_vs_unroll.png,
or to --figure PATH; --update-docs-figure writes the README's copy,
docs/implicit_vs_unroll.png, instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE = os.path.join(HERE, "results", "implicit_vs_unroll.png")  # default output
DOCS_FIGURE = os.path.join(HERE, "..", "docs", "implicit_vs_unroll.png")  # the README's


# ---------------------------------------------------------------------------
# One configuration, measured inside a child process
# ---------------------------------------------------------------------------


def _saved_bytes(fn):
    """Run ``fn`` under saved-tensor hooks: (bytes saved for backward, fn's result)."""
    import torch

    seen = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _qp_case(K: int, n: int, B: int, mode: str, repeats: int):
    import torch
    from declarative.backends.qp import QPSettings, solve_qp

    torch.manual_seed(0)
    dt = torch.float64
    L = torch.randn(B, n, n, dtype=dt) / n ** 0.5
    Q = L @ L.mT + torch.eye(n, dtype=dt)
    q = torch.randn(B, n, dtype=dt)
    G = torch.randn(B, n, n, dtype=dt)
    z0 = torch.randn(B, n, dtype=dt)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, n, dtype=dt)
    A, b = torch.zeros(B, 0, n, dtype=dt), torch.zeros(B, 0, dtype=dt)
    w = torch.randn(B, n, dtype=dt)
    settings = QPSettings(backward=mode, fixed_iterations=True, max_iter=K)

    def run(measure=False):
        ins = [t.clone().requires_grad_() for t in (Q, q, G, h)]
        t0 = time.perf_counter()
        saved, ((z, _, _), result) = _saved_bytes(
            lambda: solve_qp(*ins, A, b, batch=B, settings=settings))
        if result.factor is not None:  # kept by the Function beside the saved tensors
            saved += sum(t.untyped_storage().nbytes() for t in result.factor.values())
        t1 = time.perf_counter()
        grads = torch.autograd.grad((w * z).sum(), ins)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, grads, saved

    return run


def _gd_case(K: int, n: int, B: int, mode: str, repeats: int):
    import torch

    from declarative import implicit

    torch.manual_seed(0)
    dt = torch.float64
    R = torch.randn(n, n, dtype=dt) / n ** 0.5
    M = R @ R.T + torch.eye(n, dtype=dt)  # eigenvalues in [1, ~5]
    eta = 1.0 / float(torch.linalg.eigvalsh(M).max())
    theta0 = torch.randn(B, n, dtype=dt)
    w = torch.randn(B, n, dtype=dt)

    def descend(theta, Mp):
        x = torch.zeros_like(theta)
        for _ in range(K):
            x = x - eta * (x @ Mp - theta)
        return x

    solver = implicit(descend, lambda x, theta, Mp: x @ Mp - theta, method="iterative",
                      symmetric=True, tol=1e-12, residual_tol=None)

    def run():
        theta = theta0.clone().requires_grad_()
        Mp = M.clone().requires_grad_()
        t0 = time.perf_counter()
        saved, x = _saved_bytes(
            lambda: descend(theta, Mp) if mode == "unroll" else solver(theta, Mp))
        t1 = time.perf_counter()
        grads = torch.autograd.grad((w * x).sum(), [theta, Mp])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, grads, saved

    return run


def _compare_case(solver: str, n: int, B: int, repeats: int) -> dict:
    """Dense versus iterative backward on the same n-dimensional problems: the
    median backward time and memory of each, and the gradients' relative gap."""
    import torch
    from declarative.backends.qp import QPSettings, solve_qp

    from declarative import implicit

    torch.manual_seed(1)
    dt = torch.float64
    w = torch.randn(B, n, dtype=dt)
    if solver == "qp":  # n variables, n inequalities, solved to convergence
        L = torch.randn(B, n, n, dtype=dt) / n ** 0.5
        Q = L @ L.mT + torch.eye(n, dtype=dt)
        q = torch.randn(B, n, dtype=dt)
        G = torch.randn(B, n, n, dtype=dt) / n ** 0.5
        h = (G @ torch.randn(B, n, 1, dtype=dt)).squeeze(-1) + torch.rand(B, n, dtype=dt)
        A, b = torch.zeros(B, 0, n, dtype=dt), torch.zeros(B, 0, dtype=dt)

        def run(mode):
            ins = [t.clone().requires_grad_() for t in (Q, q, G, h)]
            saved, ((z, _, _), result) = _saved_bytes(lambda: solve_qp(
                *ins, A, b, batch=B, settings=QPSettings(backward=mode)))
            if result.factor is not None:
                saved += sum(t.untyped_storage().nbytes() for t in result.factor.values())
            t0 = time.perf_counter()
            grads = torch.autograd.grad((w * z).sum(), ins)
            return time.perf_counter() - t0, grads, saved

        modes = {"dense": "implicit", "iterative": "iterative"}
    else:  # the fixed point of gradient descent, through declarative.implicit
        R = torch.randn(n, n, dtype=dt) / n ** 0.5
        M = R @ R.T + torch.eye(n, dtype=dt)
        eta = 1.0 / float(torch.linalg.eigvalsh(M).max())
        theta0 = torch.randn(B, n, dtype=dt)

        def descend(theta, Mp):
            x = torch.zeros_like(theta)
            for _ in range(300):
                x = x - eta * (x @ Mp - theta)
            return x

        solvers = {m: implicit(descend, lambda x, theta, Mp: x @ Mp - theta, method=m,
                               symmetric=True, tol=1e-12, residual_tol=None)
                   for m in ("dense", "iterative")}

        def run(mode):
            theta, Mp = theta0.clone().requires_grad_(), M.clone().requires_grad_()
            saved, x = _saved_bytes(lambda: solvers[mode](theta, Mp))
            t0 = time.perf_counter()
            grads = torch.autograd.grad((w * x).sum(), [theta, Mp])
            return time.perf_counter() - t0, grads, saved

        modes = {"dense": "dense", "iterative": "iterative"}
    out = {}
    for name, mode in modes.items():
        run(mode)  # warm-up
        times, grads, saved = [], None, 0
        for _ in range(repeats):
            t, grads, saved = run(mode)
            times.append(t)
        out[name] = {"bwd_ms": 1e3 * statistics.median(times), "mb": saved / 2**20,
                     "grads": grads}
    gap = max(float((a - b_).norm() / b_.norm().clamp_min(1e-300))
              for a, b_ in zip(out["iterative"]["grads"], out["dense"]["grads"]))
    return {k: {"bwd_ms": v["bwd_ms"], "mb": v["mb"]} for k, v in out.items()} | {"gap": gap}


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    if spec["solver"].endswith("-compare"):
        return _compare_case(spec["solver"].split("-")[0], spec["n"], spec["B"],
                             spec["repeats"])
    make = {"qp": _qp_case, "gd": _gd_case}[spec["solver"]]
    run = make(spec["K"], spec["n"], spec["B"], spec["mode"], spec["repeats"])
    run()  # warm-up: imports, caches, first-call costs
    fwd, bwd = [], []
    grads, saved = None, 0
    for _ in range(spec["repeats"]):
        f, b_, grads, saved = run()
        fwd.append(f)
        bwd.append(b_)
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    checksum = float(sum(g.double().abs().sum() for g in grads))
    return {"peak_mb": saved / 2**20, "fwd_ms": 1e3 * statistics.median(fwd),
            "bwd_ms": 1e3 * statistics.median(bwd), "finite": finite, "checksum": checksum}


def measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Sweep, table, figure
# ---------------------------------------------------------------------------


def sweep(quick: bool, repeats: int, threads: int):
    Ks = [10, 25, 50, 100] if quick else [10, 25, 50, 100, 200]
    rows = []
    for solver, n, B in (("qp", 100, 128), ("gd", 1000, 128)):
        for K in Ks:
            if solver == "qp" and K > 100 and quick:
                continue
            for mode in ("implicit", "unroll"):
                spec = dict(solver=solver, K=K, n=n, B=B, mode=mode, repeats=repeats,
                            threads=threads)
                rows.append((spec, measure(spec)))
                print(_row(*rows[-1]), flush=True)
    ns = {"qp": [25, 50, 100] if quick else [25, 50, 100, 150],
          "gd": [100, 300, 1000] if quick else [100, 300, 1000, 2000]}
    for solver, K, B in (("qp", 50, 128), ("gd", 100, 128)):
        for n in ns[solver]:
            for mode in ("implicit", "unroll"):
                spec = dict(solver=solver, K=K, n=n, B=B, mode=mode, repeats=repeats,
                            threads=threads)
                rows.append((spec, measure(spec)))
                print(_row(*rows[-1]), flush=True)
    return rows


HEADER = ("| solver | K | n | B | backward | memory for backward (MB) | forward ms | backward ms "
          "| grads finite |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|---|")


def _row(spec, res) -> str:
    if "error" in res:
        return (f"| {spec['solver']} | {spec['K']} | {spec['n']} | {spec['B']} | {spec['mode']} "
                f"| failed: {res['error'][:60]} | | | |")
    return (f"| {spec['solver']} | {spec['K']} | {spec['n']} | {spec['B']} | {spec['mode']} | "
            f"{res['peak_mb']:.1f} | {res['fwd_ms']:.1f} | {res['bwd_ms']:.1f} | "
            f"{'yes' if res['finite'] else 'NO'} |")


def figure(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, solver, title in ((axes[0], "qp", "QP engine (n = 100, B = 128)"),
                              (axes[1], "gd", "gradient descent (n = 1000, B = 128)")):
        n_ref = 100 if solver == "qp" else 1000
        for mode, style in (("implicit", "o-"), ("unroll", "s--")):
            pts = sorted((s["K"], r["peak_mb"]) for s, r in rows
                         if s["solver"] == solver and s["mode"] == mode and s["n"] == n_ref
                         and "peak_mb" in r and s["B"] == 128)
            Ks = sorted({k for k, _ in pts})
            best = [max(v for k2, v in pts if k2 == k) for k in Ks]
            if pts:
                ax.plot(Ks, best, style, label=mode)
        ax.set_xlabel("iterations K")
        ax.set_ylabel("memory kept for backward (MB)")
        # Linear axes: unrolling's memory is a straight line in K, the implicit one flat.
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure written to {os.path.relpath(path)}")


COMPARE_HEADER = (
    "| problem | n | B | dense backward ms | iterative backward ms | dense / iterative "
    "| memory dense / iterative (MB) | gradient gap (relative) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|")


def compare(quick: bool, repeats: int, threads: int) -> list[str]:
    """Iterative against dense backward at n = 500: time, memory and agreement."""
    lines = []
    for solver, label, B in (("qp", "QP engine: MINRES vs the kept factorization", 8),
                             ("gd", "implicit(): MINRES vs the assembled Jacobian", 32)):
        n = 200 if quick else 500
        spec = dict(solver=f"{solver}-compare", n=n, B=B, repeats=repeats, threads=threads)
        res = measure(spec)
        if "error" in res:
            lines.append(f"| {label} | {n} | {B} | failed: {res['error'][:60]} | | | | |")
        else:
            d, it = res["dense"], res["iterative"]
            lines.append(f"| {label} | {n} | {B} | {d['bwd_ms']:.1f} | {it['bwd_ms']:.1f} | "
                         f"{d['bwd_ms'] / it['bwd_ms']:.2f} | {d['mb']:.1f} / {it['mb']:.1f} | "
                         f"{res['gap']:.1e} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller sweep")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per configuration; the median is shown (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each child process (default: this process's "
                             "torch.get_num_threads())")
    parser.add_argument("--no-figure", action="store_true", help="skip the figure")
    parser.add_argument("--figure", default=FIGURE,
                        help="where the figure goes (default benchmarks/results/"
                             "implicit_vs_unroll.png)")
    parser.add_argument("--update-docs-figure", action="store_true",
                        help="write the figure to docs/implicit_vs_unroll.png, the README's copy")
    parser.add_argument("--compare-only", action="store_true",
                        help="only the dense-versus-iterative table at n = 500")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    threads = args.threads if args.threads is not None else _default_threads()
    print(f"torch threads per child process: {threads}")
    if args.compare_only:
        print(COMPARE_HEADER)
        compare(args.quick, args.repeats, threads)
        return
    print(HEADER)
    rows = sweep(args.quick, args.repeats, threads)
    if not args.no_figure:
        figure(rows, DOCS_FIGURE if args.update_docs_figure else args.figure)
    print()
    print(COMPARE_HEADER)
    compare(args.quick, args.repeats, threads)


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
