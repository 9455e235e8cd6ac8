"""The front door: CvxpyLayer (backend="auto") vs cvxpylayers on problems users write.

    python benchmarks/bench_frontdoor.py                  # 14 families × B = 1, 16, 64
    python benchmarks/bench_frontdoor.py --quick          # B = 1, 16, 2 rounds, memory at B = 32
    python benchmarks/bench_frontdoor.py --families lasso,relu-200 --batch 16 --repeats 5

Every row is forward + backward (``autograd.grad`` of ``sum(w * x)``), float64, CPU,
of a problem written in CVXPY as a user would, on --threads threads (default 1;
diffcp's worker pools get as many workers, ours where its route is conic). Columns:
``ours`` = declarative.torch.CvxpyLayer with backend="auto" (``route`` names the
path a call of that batch takes after two untimed calls); ``cvxpylayers`` =
cvxpylayers.torch.CvxpyLayer with its defaults
(diffcp picks ECOS, or SCS for PSD and dual exponential cones); ``cvxpyl tight``
= the same layer on Clarabel at tolerances 1e-10. Errors (untimed): max
|x − x_ref| over the first --ref-samples samples; x_ref is the closed form
max(y, 0) for the projection, CVXPY's QP form solved by Clarabel and polished on
its active set for the other QPs (`references.qp_polished_reference`), else
Clarabel at 1e-12. Last table: ours and cvxpylayers on the projection at
n = 200, batch --memory-batch (300), each in a fresh process: the time of a
second call and the peak RSS growth of the first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import cvxpy as cp
import harness as h
import numpy as np
import torch
from bench_conic import SPECS as CONIC
from references import qp_polished_reference, reference_solve

from declarative.torch import CvxpyLayer

CLARABEL_REF = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10,
                    max_iter=500)
PEERS = ("cvxpylayers", "cvxpyl tight")


@dataclass(frozen=True)
class Family:
    size: str
    build: Callable[[], tuple[cp.Problem, list, list]]  # fresh problem, Parameters, [x]
    sample: Callable[[np.random.Generator, int], list[np.ndarray]]  # leading batch dim
    exact: Callable[[list[np.ndarray]], np.ndarray] | None = None  # closed-form x_ref


def _regression(m: int, n: int, penalty=lambda x: 0, box: bool = False) -> Family:
    """min ‖Ax − b‖² + penalty(x) (s.t. −1 ≤ x ≤ 1), A and b parameters."""
    def build():
        A, b, x = cp.Parameter((m, n), name="A"), cp.Parameter(m, name="b"), cp.Variable(n)
        cons = [x >= -1, x <= 1] if box else []
        return cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + penalty(x)), cons), [A, b], [x]

    return Family(f"A {m}x{n}", build, lambda rng, B: [
        rng.standard_normal((B, m, n)) / math.sqrt(m), 2.0 * rng.standard_normal((B, m))])


def _huber(m=60, n=20) -> Family:
    A = np.random.default_rng(7).standard_normal((m, n)) / math.sqrt(m)

    def build():
        b, x = cp.Parameter(m, name="b"), cp.Variable(n)
        return cp.Problem(cp.Minimize(cp.sum(cp.huber(A @ x - b, 1.0)))), [b], [x]

    return Family(f"A {m}x{n} fixed", build, lambda rng, B: [2.0 * rng.standard_normal((B, m))])


def _mpc(T: int, nx=4, nu=2) -> Family:
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

    return Family(f"{nx} states, {nu} inputs, T={T}", build,
                  lambda rng, B: [3.0 * rng.standard_normal((B, nx))])


def _markowitz(n=50, k=10) -> Family:
    def build():
        mu, F, w = cp.Parameter(n, name="mu"), cp.Parameter((k, n), name="F"), cp.Variable(n)
        return cp.Problem(cp.Maximize(mu @ w - cp.sum_squares(F @ w)), [cp.sum(w) == 1, w >= 0]), \
            [mu, F], [w]

    return Family(f"n={n}, {k} factors", build, lambda rng, B: [
        0.3 * rng.standard_normal((B, n)), rng.standard_normal((B, k, n)) / math.sqrt(n)])


def _classifier(m: int, n: int, loss: str) -> Family:
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

    return Family(f"X {m}x{n}", build, lambda rng, B: [
        rng.standard_normal((B, m, n)) + 0.5 * y[:, None] * np.ones(n)])


def _denoise(n: int, tv: bool) -> Family:
    """min ‖x − y‖² + λ‖Dx‖₁ (total variation), or s.t. x ≥ 0 (projection, a ReLU)."""
    def build():
        y, x = cp.Parameter(n, name="y"), cp.Variable(n)
        if tv:
            return cp.Problem(cp.Minimize(cp.sum_squares(x - y) + 0.5 * cp.norm1(cp.diff(x)))), \
                [y], [x]
        return cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0]), [y], [x]

    return Family(f"n={n}", build, lambda rng, B: [rng.standard_normal((B, n))],
                  None if tv else lambda v: np.maximum(v[0], 0.0))


FAMILIES: dict[str, Family] = {
    "box-ls": _regression(40, 20, box=True),
    "lasso": _regression(100, 50, lambda x: 0.1 * cp.norm1(x)),
    "huber": _huber(),
    "elastic-net": _regression(100, 50, lambda x: 0.1 * cp.norm1(x) + 0.1 * cp.sum_squares(x)),
    "mpc-10": _mpc(10),
    "mpc-30": _mpc(30),
    "markowitz": _markowitz(),
    "svm": _classifier(50, 10, "hinge"),
    "relu-200": _denoise(200, tv=False),
    "relu-2000": _denoise(2000, tv=False),
    "tv-100": _denoise(100, tv=True),
    "tv-1000": _denoise(1000, tv=True),
    "socp": Family(CONIC["socp"].size, CONIC["socp"].build, CONIC["socp"].sample,
                   lambda v: CONIC["socp"].reference([torch.tensor(a) for a in v])[0].numpy()),
    "logistic": _classifier(50, 10, "logistic"),
}


@cache
def _reference_problem(name: str):  # its own Parameters: the layers' are never touched
    return FAMILIES[name].build()


def qp_polished(problem, params, values, x) -> np.ndarray:
    """x from CVXPY's QP form (``get_problem_data(OSQP)``: min ½zᵀPz + qᵀz, Az = b,
    Fz ≤ g) solved to round-off by `qp_polished_reference`."""
    old = [p.value for p in params]
    try:
        for p, v in zip(params, values):
            p.value = v
        data, _, inverse = problem.get_problem_data(cp.OSQP)
    finally:
        for p, v in zip(params, old):
            p.value = v
    d = {k: data[k].toarray() if hasattr(data[k], "toarray") else np.asarray(data[k])
         for k in ("P", "q", "A", "b", "F", "G")}
    z = qp_polished_reference(d["P"], d["q"], d["F"], d["G"], d["A"], d["b"])[0]
    start = [i.var_offsets for i in inverse if hasattr(i, "var_offsets")][-1][x.id]
    return z[start:start + x.size].reshape(x.shape, order="F")


@cache
def reference_x(name: str, i: int, seed: int, batch: int) -> np.ndarray:
    fam = FAMILIES[name]
    values = [v[i] for v in fam.sample(np.random.default_rng(seed), batch)]
    if fam.exact is not None:
        return fam.exact(values)
    problem, params, (x,) = _reference_problem(name)
    if problem.is_qp():
        with contextlib.suppress(RuntimeError, np.linalg.LinAlgError):
            return qp_polished(problem, params, values, x)
    return reference_solve(problem, params, values, [x], **CLARABEL_REF)[0]


def _route_taken(layer, tensors) -> str:
    """The route a call of this batch takes once the layer has seen two (untimed)
    calls: auto chooses per call, and corrects its prediction from what a call
    measured (`declarative.routes.cost`)."""
    info = None
    for _ in range(2):
        _, info = layer(*[t.detach() for t in tensors], return_info=True)
    return info.backend


def build_cases(args, peer, note) -> list[h.Case]:
    jobs = {"n_jobs_forward": args.threads, "n_jobs_backward": args.threads}
    top, cases = max(args.batch), []
    for name in args.families:
        fam = FAMILIES[name]
        problem, params, variables = fam.build()
        ours = CvxpyLayer(problem, params, variables)
        theirs = None if peer is None else peer.CvxpyLayer(problem, params, variables)
        full = fam.sample(np.random.default_rng(args.seed), top)
        for B in args.batch:
            values = [v[:B] if B > 1 else v[0] for v in full]  # B = 1: unbatched inputs
            tensors = [torch.tensor(v, requires_grad=True) for v in values]
            lead = (B,) if B > 1 else ()
            w = [torch.tensor(np.random.default_rng([args.seed, 1]).standard_normal(
                lead + variables[0].shape))]
            route = _route_taken(ours, tensors)
            layers = {"ours": (ours, jobs if route == "conic" else None),
                      "cvxpylayers": (theirs, jobs),
                      "cvxpyl tight": (theirs, h.CVXPYL_CLARABEL_TIGHT | jobs)}
            columns = {k: None if lay is None else h.layer_call(lay, tensors, w, a)
                       for k, (lay, a) in layers.items()}

            def extras(layers=layers, tensors=tensors, B=B, name=name):
                k = min(B, args.ref_samples)
                ref = np.stack([reference_x(name, i, args.seed, top) for i in range(k)])
                out = {}
                for col, (lay, a) in layers.items():
                    if lay is not None:  # with grad: diffcp's solve-only path refuses n_jobs
                        (x,) = lay(*tensors, **({} if a is None else {"solver_args": a}))
                        x = x.detach().numpy().reshape((-1,) + ref.shape[1:])[:k]
                        out[f"err {col}"] = float(np.abs(x - ref).max())
                return out

            labels = {"family": name, "size": fam.size, "B": str(B),
                      "route": route}
            cases.append(h.Case(labels, columns, extras, [note] if note else []))
    return cases


def pivot(results, peer: str, batches) -> str:
    """``peer / ours`` per family (rows) and batch (columns)."""
    cells: dict[str, dict[str, str]] = {}
    for r in results:
        q = h.ratio(r, peer, "ours")
        cells.setdefault(r.case.labels["family"], {})[r.case.labels["B"]] = \
            "—" if q is None else f"{q:.2f}"
    head = ["family"] + [f"B={b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(batches)]
    lines += ["| " + " | ".join([f] + [row.get(str(b), "") for b in batches]) + " |"
              for f, row in cells.items()]
    return f"### {peer} / ours\n\n" + "\n".join(lines) + "\n"


def _memory_child(spec: dict) -> dict:
    """One library on the projection at n, batch B: warm up at batch 2, then the peak
    RSS growth of the first call at B and the time of the second."""
    torch.set_num_threads(spec["threads"])
    problem, params, variables = FAMILIES[f"relu-{spec['n']}"].build()
    if spec["lib"] == "ours":
        layer, args = CvxpyLayer(problem, params, variables), None
    else:
        from cvxpylayers.torch import CvxpyLayer as Peer

        layer = Peer(problem, params, variables)
        args = {"n_jobs_forward": spec["threads"], "n_jobs_backward": spec["threads"]}
    rng = np.random.default_rng(0)

    def call(B):
        y = torch.tensor(rng.standard_normal((B, spec["n"])), requires_grad=True)
        return h.layer_call(layer, [y], [torch.ones(B, spec["n"], dtype=torch.float64)], args)()

    call(2)
    base = h.peak_rss_mb()
    call(spec["batch"])
    peak = h.peak_rss_mb() - base
    start = time.perf_counter()
    call(spec["batch"])
    return {"s": time.perf_counter() - start, "mb": peak,
            "route": getattr(layer, "backend", "diffcp")}


def memory_table(args, libs) -> str:
    lines = ["| library | n | B | route | fwd+bwd (s) | peak RSS growth (MB) |",
             "|---|---:|---:|---|---:|---:|"]
    for lib in libs:
        spec = {"lib": lib, "n": 200, "batch": args.memory_batch, "threads": args.threads}
        ok, r = h.run_child(__file__, spec, args.memory_timeout)
        lines.append(f"| {lib} | 200 | {args.memory_batch} | " + (
            f"{r['route']} | {r['s']:.2f} | {r['mb']:.0f} |" if ok else f"failed: {r} | | |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = h.argument_parser(__doc__.splitlines()[0], repeats=3, warmup=1, threads=1)
    p.add_argument("--families", default=",".join(FAMILIES), help=", ".join(FAMILIES))
    p.add_argument("--batch", default="1,16,64", help="batch sizes; 1: unbatched inputs")
    p.add_argument("--ref-samples", type=int, default=4, help="samples checked (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-batch", type=int, default=300,
                   help="batch of the memory table (0 skips it; default 300)")
    p.add_argument("--memory-timeout", type=float, default=600, help="seconds per process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return print(json.dumps(_memory_child(json.loads(args.child))))
    if args.quick:
        args.batch, args.repeats, args.ref_samples = "1,16", 2, 2
        args.memory_batch = min(args.memory_batch, 32)
    args.families = h.csv_list(args.families, str, FAMILIES)
    args.batch = h.csv_list(args.batch, int)
    h.setup(args.threads)
    peer, note = h.optional_import("cvxpylayers.torch")
    start = time.perf_counter()
    results = h.run(h.select(build_cases(args, peer, note), args.filter), args.repeats,
                    args.warmup, not args.no_gc)
    text = h.header("Front door: CvxpyLayer (auto) vs cvxpylayers, forward + backward", args,
                    ["cvxpy", "cvxpylayers", "diffcp", "scs", "ecos", "clarabel", "numpy"],
                    f"; err: max |x − x_ref| over the first {args.ref_samples} samples")
    text += h.markdown_table(results, "ours", [f"err {c}" for c in ("ours",) + PEERS])
    text += "\n## Summary\n\n" + "\n".join(pivot(results, c, args.batch) for c in PEERS)
    for c in PEERS:
        lines = h.ratio_summary(results, c)[:1] + h.ratio_summary(results, c, "B")[:-1]
        text += "\n" + "\n".join(lines)
    if args.memory_batch > 0:
        text += (f"\n\n## Projection n = 200, batch {args.memory_batch}: time and memory\n\n"
                 + memory_table(args, ["ours"] + (["cvxpylayers"] if peer else [])))
    h.emit(text + f"\n(total {time.perf_counter() - start:.0f} s)\n", args.out, __file__)


if __name__ == "__main__":
    main()
