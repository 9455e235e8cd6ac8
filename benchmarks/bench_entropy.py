"""Entropy and simplex paths: softmax, sparsemax and entropic transport vs peers.

    python benchmarks/bench_entropy.py                  # about 70 s on 2 cores, most of it peers
    python benchmarks/bench_entropy.py --threads 1      # steadier on a busy shared machine
    python benchmarks/bench_entropy.py --quick          # n = 10, 100 and a 20×20 transport (10 s)
    python benchmarks/bench_entropy.py --problems sparsemax --sizes 100 --no-qpth
    python benchmarks/bench_entropy.py --problems softmax --sizes 1000 --profile

Forward + backward (``autograd.grad`` of ``sum(w * z)``), float64, CPU, of
problems written in CVXPY as a user would; ``ours`` is CvxpyLayer with
``backend="auto"`` (the row names the route it took). ``ours`` and ``torch``
(the problem solved directly in torch) are timed together without a
gc.collect() before each call; the peers (qpth, cvxpylayers) in fewer rounds.
Columns, settings and references: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cvxpy as cp
import harness as h
import numpy as np
import torch
from references import log_sinkhorn, simplex_projection, sparsemax, sparsemax_jacobian

from declarative.torch import CvxpyLayer

DT = torch.float64
OT_TAU = 0.1
QPTH_MAXITER = 100
SINKHORN_TOL, SINKHORN_SWEEPS = 1e-12, 50
REF_SINKHORN_TOL, REF_SINKHORN_SWEEPS = 1e-14, 300
CVX_SETTINGS = {
    "scs": ("cvxpyl SCS", {"solve_method": "SCS", "eps": 1e-8, "max_iters": 100_000}),
    "clarabel": ("cvxpyl Clarabel", h.CVXPYL_CLARABEL_TIGHT),
    "scs-default": ("cvxpyl SCS default", {"solve_method": "SCS"}),
}
FAST = ("ours", "torch")
LARGE_N = 1000  # from this n (and on transport) the peers get --large-repeats rounds


@dataclass
class Row:
    """One problem at one size: the differentiated input, the calls and the reference."""

    name: str  # "softmax-1000"
    kind: str  # softmax | sparsemax | ot
    size: str
    batch: int
    large: bool
    calls: dict[str, Callable | None]
    reference: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    route: str
    notes: list[str] = field(default_factory=list)
    record: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _columns(problem, params, variables, tensors, theta, w, peer, settings, torch_fn):
    """ours, torch and one column per cvxpylayers setting, each (z, ∇θ) after fwd+bwd."""
    ours = CvxpyLayer(problem, parameters=params, variables=variables)
    calls = {"ours": h.fwd_bwd(lambda: ours(*tensors)[0], [theta], [w]),
             "torch": h.fwd_bwd(torch_fn, [theta], [w])}
    layer = None if peer is None else peer.CvxpyLayer(problem, parameters=params,
                                                      variables=variables)
    for name, args in settings:
        calls[name] = None if layer is None else h.fwd_bwd(
            lambda a=args: layer(*tensors, solver_args=dict(a))[0], [theta], [w])
    return calls, ours.backend


def _data(seed, shape):
    rng = np.random.default_rng(seed)
    theta = torch.tensor(rng.standard_normal(shape), dtype=DT, requires_grad=True)
    return theta, torch.tensor(rng.standard_normal(shape), dtype=DT)


def _autograd_reference(fn, theta, w):
    def reference():
        x = theta.detach().clone().requires_grad_()
        z = fn(x)
        return z.detach(), torch.autograd.grad((w * z).sum(), x)[0]

    return reference


def softmax_row(n: int, batch: int, peer, settings) -> Row:
    theta, w = _data([0, n, 1], (batch, n))
    th, z = cp.Parameter(n, name="theta"), cp.Variable(n, name="z")
    problem = cp.Problem(cp.Maximize(th @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1])
    calls, route = _columns(problem, [th], [z], [theta], theta, w, peer, settings,
                            lambda: torch.softmax(theta, -1))
    return Row(f"softmax-{n}", "softmax", f"n={n}", batch, n >= LARGE_N, calls,
               _autograd_reference(lambda x: torch.softmax(x, -1), theta, w), route)


def sparsemax_qp_data(n: int):
    """Sparsemax as qpth's QP: Q = 2I, p = −2θ, G = −I, h = 0, A = 1ᵀ, b = 1."""
    eye = torch.eye(n, dtype=DT)
    return (2.0 * eye, -eye, torch.zeros(n, dtype=DT), torch.ones(1, n, dtype=DT),
            torch.ones(1, dtype=DT))


def sparsemax_row(n: int, batch: int, peer, qpth_qp, qpth_threads, settings) -> Row:
    theta, w = _data([0, n, 2], (batch, n))
    y, z = cp.Parameter(n, name="theta"), cp.Variable(n, name="z")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == 1, z >= 0])
    calls, route = _columns(problem, [y], [z], [theta], theta, w, peer, settings,
                            lambda: sparsemax(theta))
    calls["qpth"], notes = None, []
    if qpth_qp is not None and qpth_threads != "off":
        Q, *GhAb = sparsemax_qp_data(n)
        fn = qpth_qp.QPFunction(verbose=-1, maxIter=QPTH_MAXITER)
        threads, note = h.lu_trap_threads(f"sparsemax-{n}", n + 1, __file__,
                                          {"n": n, "batch": batch}, qpth_threads)
        notes += [note] if note else []
        calls["qpth"] = h.with_threads(h.fwd_bwd(lambda: fn(Q, -2.0 * theta, *GhAb), [theta],
                                                 [w]), threads)

    def reference():  # row by row: z = max(y − t, 0), ∇ = (diag(s) − ssᵀ/|S|) w
        zs, gs = [], []
        for yi, wi in zip(theta.detach().numpy(), w):
            zi, _, s = simplex_projection(yi)
            zs.append(torch.from_numpy(zi))
            gs.append(sparsemax_jacobian(s) @ wi)
        return torch.stack(zs), torch.stack(gs)

    return Row(f"sparsemax-{n}", "sparsemax", f"n={n}", batch, n >= LARGE_N, calls, reference,
               route, notes)


def ot_row(r: int, c: int, batch: int, peer, settings, scs_eps: float) -> Row:
    """maximize −⟨C, Z⟩ + τ Σ entr(Z) s.t. Z1 = a, Zᵀ1 = b; the gradient is in C only
    (in a, b it is defined only up to the direction that breaks Σa = Σb)."""
    rng = np.random.default_rng([0, r, c, 3])
    C = torch.tensor(rng.random((batch, r, c)), dtype=DT, requires_grad=True)
    a, b = (torch.tensor(x / x.sum(-1, keepdims=True), dtype=DT)
            for x in (rng.random((batch, r)) + 0.1, rng.random((batch, c)) + 0.1))
    w = torch.tensor(rng.standard_normal((batch, r, c)), dtype=DT)
    Cp, ap, bp = cp.Parameter((r, c), name="C"), cp.Parameter(r, name="a"), cp.Parameter(c)
    Z = cp.Variable((r, c), name="Z")
    problem = cp.Problem(cp.Maximize(-cp.sum(cp.multiply(Cp, Z)) + OT_TAU * cp.sum(cp.entr(Z))),
                         [cp.sum(Z, axis=1) == ap, cp.sum(Z, axis=0) == bp])
    settings = [(name, dict(args, eps=scs_eps) if "eps" in args else args)
                for name, args in settings]
    calls, route = _columns(problem, [Cp, ap, bp], [Z], [C, a, b], C, w, peer, settings,
                            lambda: log_sinkhorn(C, a, b, OT_TAU, SINKHORN_TOL, SINKHORN_SWEEPS))
    reference = _autograd_reference(
        lambda x: log_sinkhorn(x, a, b, OT_TAU, REF_SINKHORN_TOL, REF_SINKHORN_SWEEPS), C, w)
    return Row(f"ot-{r}x{c}", "ot", f"{r}x{c}, τ={OT_TAU:g}", batch, True, calls, reference,
               route, [f"ot-{r}x{c}: cvxpyl SCS runs at eps = {scs_eps:g} here (--ot-scs-eps)."])


def _probe_main(spec: dict) -> None:
    """qpth's LU-trap probe (a subprocess): one fwd+bwd, checked against the closed form."""
    torch.set_num_threads(spec["threads"])
    qpth_qp, note = h.optional_import("qpth.qp")
    if qpth_qp is None:
        raise SystemExit(note)
    theta, _ = _data(0, (spec["batch"], spec["n"]))
    z = qpth_qp.QPFunction(verbose=-1, maxIter=QPTH_MAXITER)(
        sparsemax_qp_data(spec["n"])[0], -2.0 * theta, *sparsemax_qp_data(spec["n"])[1:])
    (g,) = torch.autograd.grad(z.sum(), theta)
    err = float((z.detach() - sparsemax(theta.detach())).abs().max())
    if not err < 1e-6 or not bool(torch.isfinite(g).all()):
        raise SystemExit(f"garbage: max |z - z_ref| = {err:.3g}")
    print('"ok"')


def time_row(row: Row, args) -> h.Result:
    labels = {"problem": row.name, "size": row.size, "B": str(row.batch),
              "route (ours)": row.route}

    def recording(name, call):
        def col():
            (z,), (g,) = call()
            row.record[name] = (z.detach(), g.detach())

        return col

    times, failures = {}, {}
    # The fast group runs without a gc.collect() before each call (a full collection
    # over CVXPY's objects leaves the caches cold: it made a 60 µs torch.softmax read
    # 500 µs); one collection precedes the group instead.
    gc.collect()
    fast = {k: recording(k, c) for k, c in row.calls.items() if k in FAST and c}
    slow = {k: recording(k, c) for k, c in row.calls.items() if k not in FAST and c}
    groups = [(fast, args.repeats, args.warmup, False)]
    if slow:
        groups.append((slow, args.large_repeats, 0, not args.no_gc) if row.large
                      else (slow, args.slow_repeats, args.warmup, not args.no_gc))
    for columns, repeats, warmup, collect in groups:
        (res,) = h.run([h.Case(labels, columns)], repeats, warmup, collect, None, args.case_timeout)
        times.update(res.times)
        failures.update(res.failures)
    full = h.Case(labels, {k: (lambda: None) if c else None for k, c in row.calls.items()},
                  notes=row.notes)
    return h.Result(full, times, failures, {})


def accuracy_table(rows: list[Row], columns: list[str]) -> str:
    """max |z − z_ref| / max |∇ − ∇_ref| of each column's last timed call."""
    lines = ["| " + " | ".join(["problem", "size", "B"] + [f"{c}: z / ∇ err" for c in columns])
             + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(columns)) + "|"]
    for row in rows:
        zr, gr = row.reference()
        cells = [row.name, row.size, str(row.batch)]
        for c in columns:
            z, g = row.record.get(c, (None, None))
            cells.append("—" if z is None else
                         f"{float((z - zr).abs().max()):.1e} / {float((g - gr).abs().max()):.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[Row], results: list[h.Result]) -> str:
    lines = []
    for row, res in zip(rows, results):
        ours = res.median_ms("ours")
        if ours:
            qs = {c: res.median_ms(c) / ours for c in res.times if c != "ours" and res.times[c]}
            bits = [f"{c} / ours = {q:,.2f}" if q < 10 else f"{c} / ours = {q:,.0f}"
                    for c, q in qs.items()]
            lines.append(f"- {row.name} (B = {row.batch}): " + "; ".join(bits))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = h.argument_parser(__doc__.splitlines()[0], repeats=15, warmup=1)
    p.add_argument("--problems", default="softmax,sparsemax,ot", help="softmax, sparsemax, ot")
    p.add_argument("--sizes", default="10,100,1000", help="n for softmax and sparsemax")
    p.add_argument("--batch", type=int, default=16, help="batch of softmax, sparsemax (16)")
    p.add_argument("--ot", default="50x50", help="transport size RxC (default 50x50)")
    p.add_argument("--ot-batch", type=int, default=2, help="transport batch (default 2)")
    p.add_argument("--ot-scs-eps", type=float, default=1e-6,
                   help="SCS eps on the transport row (default 1e-6)")
    p.add_argument("--slow-repeats", type=int, default=3, help="rounds for the peers (3)")
    p.add_argument("--large-repeats", type=int, default=2,
                   help="rounds for the peers at n >= 1000 and on transport, no warmup (2)")
    p.add_argument("--cvx-settings", default="scs,clarabel",
                   help=f"cvxpylayers columns, subset of {', '.join(CVX_SETTINGS)}")
    p.add_argument("--qpth-threads", default="auto",
                   help="auto (probe the LU trap at n + 1 >= 150), a thread count, or off")
    p.add_argument("--no-qpth", action="store_true", help="skip the qpth column")
    p.add_argument("--case-timeout", type=float, default=900,
                   help="abort (with a traceback) if one group of a row takes longer (s)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile ours and torch (cProfile, torch.profiler)")
    p.add_argument("--probe-qpth", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_qpth:
        return _probe_main(json.loads(args.probe_qpth))
    if args.quick:
        args.sizes, args.ot = "10,100", "20x20"
        args.repeats, args.slow_repeats, args.large_repeats = 5, 2, 1
    h.setup(args.threads)
    peer, peer_note = h.optional_import("cvxpylayers.torch")
    qpth_qp, qpth_note = (None, None) if args.no_qpth else h.optional_import("qpth.qp")
    cvx = [CVX_SETTINGS[s] for s in h.csv_list(args.cvx_settings, str, CVX_SETTINGS)]
    qpth_threads = "off" if args.no_qpth else args.qpth_threads
    rows: list[Row] = []
    for kind in h.csv_list(args.problems, str, {"softmax", "sparsemax", "ot"}):
        if kind == "ot":
            r, c = (int(x) for x in args.ot.lower().split("x"))
            rows.append(ot_row(r, c, args.ot_batch, peer, cvx, args.ot_scs_eps))
        for n in h.csv_list(args.sizes, int) if kind != "ot" else ():
            rows.append(softmax_row(n, args.batch, peer, cvx) if kind == "softmax" else
                        sparsemax_row(n, args.batch, peer, qpth_qp, qpth_threads, cvx))
    rows = [r for r in rows if not args.filter
            or args.filter.lower() in f"{r.name} | {r.size} | {r.batch}".lower()]
    for r in rows:
        r.notes += [n for n in (peer_note, qpth_note if r.kind == "sparsemax" else None) if n]
        expected = "simplex" if r.kind == "sparsemax" else "entropy"
        r.notes += [f"{r.name}: ours took the {r.route!r} path, not {expected!r}."
                    ] if r.route != expected else []
    if args.profile:
        cases = [h.Case({"problem": r.name, "B": str(r.batch)}, r.calls) for r in rows]
        return h.emit(h.profile(cases, lambda c: 5 if c.name.startswith("ot") else 300, FAST),
                      args.out, __file__)
    start, results = time.perf_counter(), []
    for i, row in enumerate(rows, 1):
        t0 = time.perf_counter()
        results.append(time_row(row, args))
        meds = ", ".join(f"{c} {results[-1].median_ms(c) or float('nan'):.3g}"
                         for c in results[-1].times)
        print(f"[{i}/{len(rows)}] {row.name}: {meds} ms ({time.perf_counter() - t0:.1f} s)",
              flush=True, file=sys.stderr)
    columns = list(dict.fromkeys(c for r in rows for c, f in r.calls.items()))
    text = (
        "# Entropy and simplex paths vs torch, qpth and cvxpylayers (float64, CPU, fwd+bwd)\n\n"
        f"{h.environment(['cvxpy', 'cvxpylayers', 'diffcp', 'scs', 'clarabel', 'qpth'])}\n"
        f"ours and torch: medians of {args.repeats} interleaved rounds after {args.warmup} "
        f"warmup call(s); peers: {args.slow_repeats} rounds ({args.large_repeats}, no warmup, "
        "at n = 1000 and on transport); every ratio is peer / ours, above 1: ours is faster\n\n"
        + h.markdown_table(results, baseline="ours")
        + "\n## Accuracy (max abs error of z and of ∇ vs the reference, from each column's "
        "last timed call)\n\n" + accuracy_table(rows, columns)
        + "\n## Summary\n\n" + summary(rows, results)
        + f"\n(total {time.perf_counter() - start:.0f} s)\n")
    h.emit(text, args.out, __file__)


if __name__ == "__main__":
    main()
