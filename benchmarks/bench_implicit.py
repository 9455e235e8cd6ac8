"""Implicit versus unrolled differentiation: backward memory and time against K and n.

    python benchmarks/bench_implicit.py                 # table + figure
    python benchmarks/bench_implicit.py --quick --threads 1
    python benchmarks/bench_implicit.py --compare-only  # dense vs iterative backward at n = 500
    python benchmarks/bench_implicit.py --figure docs/implicit_vs_unroll.png   # the README's

Two inner solvers, each differentiated both ways, every configuration in a fresh
process: the QP engine run for exactly K iterations (backward="implicit", which
reuses the final KKT factorization, vs "unroll", autograd through every
iteration), and K gradient-descent steps on f(x; θ, M) = ½xᵀMx − θᵀx with θ and M
learned (unrolled by autograd vs declarative.implicit with MINRES; with a constant
M unrolling would keep only M and look free). "Memory for backward" counts every
tensor autograd saves, once per storage, plus the QP's kept factorization: the
trace implicit differentiation does without, free of the allocator's noise. A
second table compares the dense and the iterative backward at n = 500.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from harness import HERE, argument_parser, emit, run_child

FIGURE = os.path.join(HERE, "results", "implicit_vs_unroll.png")  # default output
COMPARE_K = 300  # gradient-descent steps of the dense-vs-iterative comparison


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


def _qp_run(spec: dict, mode: str):
    """n variables, n inequalities: Q = LLᵀ/n + I, h = Gz₀ + U(0, 1); K fixed iterations,
    or (compare) solved to convergence with G scaled by 1/√n."""
    import torch
    from declarative.backends.qp import QPSettings, solve_qp
    from references import random_qp_arrays

    n, B, K = spec["n"], spec["B"], spec.get("K")
    d = random_qp_arrays(1 if K is None else 0, n, n, 0, B, ridge=1.0, slack=(0.0, 1.0),
                         row_scale=1.0 if K else n ** -0.5, q_scale=1.0)
    Q, q, G, h, A, b = (torch.tensor(d[k]) for k in ("Q", "q", "G", "h", "A", "b"))
    w = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    backward = {"dense": "implicit"}.get(mode, mode)
    settings = (QPSettings(backward=backward) if K is None
                else QPSettings(backward=backward, fixed_iterations=True, max_iter=K))

    def run():
        ins = [t.clone().requires_grad_() for t in (Q, q, G, h)]
        t0 = time.perf_counter()
        saved, ((z, _, _), result) = _saved_bytes(
            lambda: solve_qp(*ins, A, b, batch=B, settings=settings))
        factor = getattr(result, "factor", None)  # kept by the Function beside saved tensors
        saved += sum(t.untyped_storage().nbytes() for t in (factor or {}).values())
        t1 = time.perf_counter()
        grads = torch.autograd.grad((w * z).sum(), ins)
        return t1 - t0, time.perf_counter() - t1, grads, saved

    return run


def _gd_run(spec: dict, mode: str):
    """K steps x ← x − η(Mx − θ), unrolled, or declarative.implicit on ∇f = Mx − θ."""
    import torch

    from declarative import implicit

    n, B, K = spec["n"], spec["B"], spec.get("K") or COMPARE_K
    g = torch.Generator().manual_seed(0 if spec.get("K") else 1)
    R = torch.randn(n, n, dtype=torch.float64, generator=g) / n ** 0.5
    M = R @ R.T + torch.eye(n, dtype=torch.float64)  # eigenvalues in [1, ~5]
    eta = 1.0 / float(torch.linalg.eigvalsh(M).max())
    theta0, w = (torch.randn(B, n, dtype=torch.float64, generator=g) for _ in range(2))

    def descend(theta, Mp):
        x = torch.zeros_like(theta)
        for _ in range(K):
            x = x - eta * (x @ Mp - theta)
        return x

    solver = implicit(descend, lambda x, theta, Mp: x @ Mp - theta,
                      method="dense" if mode == "dense" else "iterative", symmetric=True,
                      tol=1e-12, residual_tol=None)

    def run():
        theta, Mp = theta0.clone().requires_grad_(), M.clone().requires_grad_()
        t0 = time.perf_counter()
        saved, x = _saved_bytes(lambda: (descend if mode == "unroll" else solver)(theta, Mp))
        t1 = time.perf_counter()
        grads = torch.autograd.grad((w * x).sum(), [theta, Mp])
        return t1 - t0, time.perf_counter() - t1, grads, saved

    return run


def child(spec: dict) -> dict:
    """One configuration (both modes when comparing): medians after a warm-up call."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    out = {}
    for mode in ("dense", "iterative") if spec["mode"] == "compare" else (spec["mode"],):
        run = (_qp_run if spec["solver"] == "qp" else _gd_run)(spec, mode)
        run()  # warm-up: imports, caches, first-call costs
        fwd, bwd, grads, saved = zip(*(run() for _ in range(spec["repeats"])))
        out[mode] = {"mb": saved[-1] / 2**20, "fwd_ms": 1e3 * statistics.median(fwd),
                     "bwd_ms": 1e3 * statistics.median(bwd), "grads": grads[-1],
                     "finite": all(bool(torch.isfinite(g).all()) for g in grads[-1])}
    if spec["mode"] == "compare":
        out["gap"] = max(float((a - b).norm() / b.norm().clamp_min(1e-300)) for a, b in
                         zip(out["iterative"]["grads"], out["dense"]["grads"]))
    return {k: {f: x for f, x in v.items() if f != "grads"} if isinstance(v, dict) else v
            for k, v in out.items()}


def sweep(quick: bool, repeats: int, threads: int, lines: list[str]):
    """Memory and time against K (n fixed), then against n (K fixed)."""
    Ks = [10, 25, 50, 100] if quick else [10, 25, 50, 100, 200]
    ns = {"qp": [25, 50, 100] if quick else [25, 50, 100, 150],
          "gd": [100, 300, 1000] if quick else [100, 300, 1000, 2000]}
    configs = [(s, K, n) for s, n in (("qp", 100), ("gd", 1000)) for K in Ks
               if not (s == "qp" and K > 100 and quick)]
    configs += [(s, K, n) for s, K in (("qp", 50), ("gd", 100)) for n in ns[s]]
    rows = []
    for solver, K, n in configs:
        for mode in ("implicit", "unroll"):
            spec = dict(solver=solver, K=K, n=n, B=128, mode=mode, repeats=repeats,
                        threads=threads)
            ok, res = run_child(__file__, spec)
            cells = (f"{res[mode]['mb']:.1f} | {res[mode]['fwd_ms']:.1f} | "
                     f"{res[mode]['bwd_ms']:.1f} | {'yes' if res[mode]['finite'] else 'NO'}"
                     if ok else f"failed: {res[:60]} | | |")
            lines.append(f"| {solver} | {K} | {n} | 128 | {mode} | {cells} |")
            print(lines[-1], flush=True, file=sys.stderr)
            rows.append((spec, res[mode] if ok else {}))
    return rows


def figure(rows, path: str) -> None:
    """Memory kept for the backward against K, linear axes: unrolling's memory is a
    straight line in K, the implicit backward's is flat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, solver, n, title in ((axes[0], "qp", 100, "QP engine (n = 100, B = 128)"),
                                 (axes[1], "gd", 1000, "gradient descent (n = 1000, B = 128)")):
        for mode, style in (("implicit", "o-"), ("unroll", "s--")):
            pts = dict(sorted((s["K"], r["mb"]) for s, r in rows if s["solver"] == solver
                              and s["mode"] == mode and s["n"] == n and "mb" in r))
            if pts:
                ax.plot(list(pts), list(pts.values()), style, label=mode)
        ax.set(xlabel="iterations K", ylabel="memory kept for backward (MB)", title=title)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure written to {os.path.relpath(path)}")


def compare(quick: bool, repeats: int, threads: int, lines: list[str]) -> None:
    """Iterative against dense backward at n = 500: time, memory and agreement."""
    n = 200 if quick else 500
    for solver, label, B in (("qp", "QP engine: MINRES vs the kept factorization", 8),
                             ("gd", "implicit(): MINRES vs the assembled Jacobian", 32)):
        ok, res = run_child(__file__, dict(solver=solver, mode="compare", n=n, B=B,
                                           repeats=repeats, threads=threads))
        if not ok:
            lines.append(f"| {label} | {n} | {B} | failed: {res[:60]} | | | | |")
        else:
            d, it = res["dense"], res["iterative"]
            lines.append(f"| {label} | {n} | {B} | {d['bwd_ms']:.1f} | {it['bwd_ms']:.1f} | "
                         f"{d['bwd_ms'] / it['bwd_ms']:.2f} | {d['mb']:.1f} / {it['mb']:.1f} | "
                         f"{res['gap']:.1e} |")
        print(lines[-1], flush=True, file=sys.stderr)


def main(argv=None):
    p = argument_parser(__doc__.splitlines()[0], repeats=3, warmup=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--no-figure", action="store_true", help="skip the figure")
    p.add_argument("--figure", default=FIGURE, help="where the figure goes (default "
                   "benchmarks/results/implicit_vs_unroll.png)")
    p.add_argument("--compare-only", action="store_true",
                   help="only the dense-versus-iterative table at n = 500")
    args = p.parse_args(argv)
    if args.child:
        return print(json.dumps(child(json.loads(args.child))))
    if args.threads is None:  # each child gets this process's (OMP_NUM_THREADS applies)
        import torch

        args.threads = torch.get_num_threads()
    lines = [f"torch threads per child process: {args.threads}, {args.repeats} timed calls "
             "each (median)\n"]
    if not args.compare_only:
        lines += ["| solver | K | n | B | backward | memory for backward (MB) | forward ms | "
                  "backward ms | grads finite |", "|---|---:|---:|---:|---|---:|---:|---:|---|"]
        rows = sweep(args.quick, args.repeats, args.threads, lines)
        if not args.no_figure:
            figure(rows, args.figure)
        lines.append("")
    lines += ["| problem | n | B | dense backward ms | iterative backward ms | dense / iterative "
              "| memory dense / iterative (MB) | gradient gap (relative) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    compare(args.quick, args.repeats, args.threads, lines)
    emit("\n".join(lines) + "\n", args.out, __file__)


if __name__ == "__main__":
    main()
