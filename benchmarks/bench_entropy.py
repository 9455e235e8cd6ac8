"""Entropy and simplex paths: softmax, sparsemax and entropic transport vs peers (issue 4).

    python benchmarks/bench_entropy.py                  # about 70 s on 2 cores, most of it peers
    python benchmarks/bench_entropy.py --threads 1      # steadier on a busy shared machine
    python benchmarks/bench_entropy.py --quick          # n = 10, 100 and a 20×20 transport (10 s)
    python benchmarks/bench_entropy.py --problems softmax --sizes 1000 --repeats 30
    python benchmarks/bench_entropy.py --problems sparsemax --sizes 100 --no-qpth
    python benchmarks/bench_entropy.py --problems softmax --sizes 1000 --profile

Every row is a forward + backward pass: the layer's output z for a batch of
inputs, then ``autograd.grad`` of ``sum(w * z)`` for a fixed random w. All
data are float64 on the CPU.

Problems (written in CVXPY exactly as a user would; ``ours`` is
``declarative.torch.CvxpyLayer`` with the default ``backend="auto"``, which
routes them off the conic path, and the row says where):

    softmax-n     maximize θᵀz + Σ entr(z) s.t. Σz = 1      (entropy path: closed form)
                  batch 16; z = softmax(θ)
    sparsemax-n   minimize ‖z − θ‖² s.t. Σz = 1, z ≥ 0      (simplex path: sort + threshold)
                  batch 16
    ot-RxC        maximize −⟨C, Z⟩ + τ Σ entr(Z) s.t. Z1 = a, Zᵀ1 = b, τ = 0.1
                  (entropy path: dual Newton); C ~ U[0, 1), a, b positive with
                  equal totals; batch 2; the gradient is taken with respect to C
                  only (in a, b it is defined only up to the direction that
                  breaks Σa = Σb)

Columns:

    ours             declarative.torch.CvxpyLayer, default settings
    torch            the problem solved directly in torch, differentiated by
                     autograd: torch.softmax; the sort-based sparsemax closed
                     form (Held et al.; Duchi et al. 2008); for transport a
                     log-domain Sinkhorn run to marginal error 1e-12 under
                     no_grad, then 50 differentiated sweeps from the converged
                     potentials (so its gradient is the implicit one)
    qpth             sparsemax only, as a QP: Q = 2I, p = −2θ, G = −I, h = 0,
                     A = 1ᵀ, b = 1 (Q, G, h, A, b shared), maxIter = 100, qpth's
                     default eps = 1e-12. qpth factors (n + 1)-sized systems with
                     torch's batched LU, which fails with 2 threads from about
                     150×150 (shared/NOTES.md; at n = 1000 it raises "Pivots
                     given to lu_solve must all be greater or equal to 1" after
                     MKL's "Parameter 6 was incorrect on entry to DLASWP"). Such
                     a column is probed first in a subprocess (one fwd+bwd, 2
                     threads, 120 s timeout); if the probe fails it runs under
                     torch.set_num_threads(1) and a note says so.
    cvxpyl SCS       cvxpylayers.torch.CvxpyLayer, diffcp + SCS with
                     eps = 1e-8 (eps_abs = eps_rel), max_iters = 100000: tight
                     enough that SCS's error is visible rather than its default
                     1e-4 tolerance; on the transport row eps = 1e-6 (--ot-scs-eps;
                     at 1e-8 one call of batch 2 takes about a minute)
    cvxpyl Clarabel  the same layer with solve_method="Clarabel" and
                     tol_gap_abs = tol_gap_rel = tol_feas = 1e-10, tol_ktratio = 1e-8
    (--cvx-settings adds "cvxpyl SCS default", SCS with its own tolerances)

Timing. ``ours`` and ``torch`` are fast: they are timed together in
--repeats interleaved rounds (harness), without the harness's gc.collect()
before each call (a full collection over CVXPY's objects leaves the caches
cold: it made a 60 µs torch.softmax read 500 µs; one collection precedes
the group instead). The peers (qpth, cvxpylayers) take
up to seconds per call: they are timed together in --slow-repeats rounds
(3; at n = 1000 and on the transport row --large-repeats = 2 rounds with no
warmup call). The ratio ``X / ours`` divides medians from the two groups;
above 1 means we are faster.

Accuracy (a second table): for every column, max |z − z_ref| and max
|∇θ − ∇θ_ref| (absolute, over the batch), from the column's own last timed
call. References: softmax — torch.softmax and its autograd gradient;
sparsemax — the sort-based projection computed row by row in numpy and its
Jacobian diag(s) − ssᵀ/|S| (s the support) applied to w; transport — the
log-domain Sinkhorn at marginal error 1e-14 with 300 differentiated sweeps.

Targets (issue 4), checked in the summary: at n = 1000, batch 16, the softmax
layer's forward + backward within 5× of torch.softmax and ≥ 1000× faster than
cvxpylayers, with errors ≤ 1e-10.
"""

from __future__ import annotations

import argparse
import cProfile
import faulthandler
import gc
import io
import json
import os
import pstats
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
import torch
from harness import (
    Case,
    Result,
    argument_parser,
    csv_list,
    emit,
    environment,
    markdown_table,
    optional_import,
    probe,
    run,
    select,
    with_threads,
)

from declarative.torch import CvxpyLayer

DT = torch.float64
BATCH = 16
OT_TAU = 0.1
QPTH_MAXITER = 100
QPTH_PROBE_TIMEOUT = 120
LU_TRAP_SIZE = 150
SINKHORN_TOL, SINKHORN_SWEEPS = 1e-12, 50
REF_SINKHORN_TOL, REF_SINKHORN_SWEEPS = 1e-14, 300
CLARABEL_TIGHT = {"solve_method": "Clarabel", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10,
                  "tol_feas": 1e-10, "tol_ktratio": 1e-8}
CVX_SETTINGS = {
    "scs": ("cvxpyl SCS", {"solve_method": "SCS", "eps": 1e-8, "max_iters": 100_000}),
    "clarabel": ("cvxpyl Clarabel", CLARABEL_TIGHT),
    "scs-default": ("cvxpyl SCS default", {"solve_method": "SCS"}),
}
DEFAULT_CVX = "scs,clarabel"
FAST = ("ours", "torch")
TARGET_TORCH, TARGET_CVXPYL, TARGET_ERR = 5.0, 1000.0, 1e-10


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------

@dataclass
class Row:
    """One problem at one size: the inputs, the calls and the reference."""

    name: str  # "softmax-1000"
    kind: str  # softmax | sparsemax | ot
    size: str
    batch: int
    large: bool
    theta: torch.Tensor  # the differentiated input (θ, or C for transport)
    weights: torch.Tensor
    calls: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]] | None]
    reference: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    notes: list[str] = field(default_factory=list)
    route: str = ""
    record: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _fwd_bwd(solve: Callable[[], torch.Tensor], theta: torch.Tensor, w: torch.Tensor):
    def call():
        z = solve()
        (g,) = torch.autograd.grad((w * z).sum(), theta)
        return z, g

    return call


def _cvx_calls(peer, problem, params, variables, tensors, theta, w, settings):
    """One column per cvxpylayers setting, on a single layer."""
    out = {name: None for name, _ in settings}
    if peer is None:
        return out
    layer = peer.CvxpyLayer(problem, parameters=params, variables=variables)
    for name, args in settings:
        def solve(args=args):
            (z,) = layer(*tensors, solver_args=dict(args))
            return z

        out[name] = _fwd_bwd(solve, theta, w)
    return out


def _ours(problem, params, variables) -> CvxpyLayer:
    return CvxpyLayer(problem, parameters=params, variables=variables)


# softmax ---------------------------------------------------------------------

def softmax_problem(n: int):
    theta = cp.Parameter(n, name="theta")
    z = cp.Variable(n, name="z")
    return cp.Problem(cp.Maximize(theta @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1]), theta, z


def softmax_row(n: int, batch: int, peer, cvx_settings, large_n: int, seed=0) -> Row:
    rng = np.random.default_rng([seed, n, 1])
    theta = torch.tensor(rng.standard_normal((batch, n)), dtype=DT, requires_grad=True)
    w = torch.tensor(rng.standard_normal((batch, n)), dtype=DT)
    problem, th, z = softmax_problem(n)
    ours = _ours(problem, [th], [z])
    calls = {
        "ours": _fwd_bwd(lambda: ours(theta)[0], theta, w),
        "torch": _fwd_bwd(lambda: torch.softmax(theta, -1), theta, w),
    }
    calls.update(_cvx_calls(peer, problem, [th], [z], [theta], theta, w, cvx_settings))

    def reference():
        x = theta.detach().clone().requires_grad_()
        zr = torch.softmax(x, -1)
        (g,) = torch.autograd.grad((w * zr).sum(), x)
        return zr.detach(), g

    return Row(f"softmax-{n}", "softmax", f"n={n}", batch, n >= large_n, theta, w, calls,
               reference, route=ours.backend)


# sparsemax -------------------------------------------------------------------

def sparsemax_problem(n: int):
    y = cp.Parameter(n, name="theta")
    z = cp.Variable(n, name="z")
    return cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == 1, z >= 0]), y, z


def sparsemax_torch(y: torch.Tensor) -> torch.Tensor:
    """Sort-based projection onto the simplex, batched, differentiable by autograd."""
    n = y.shape[-1]
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    k = torch.arange(1, n + 1, dtype=y.dtype, device=y.device)
    rho = (u - css / k > 0).sum(-1, keepdim=True)  # support size (a prefix of u)
    tau = css.gather(-1, rho - 1) / rho
    return (y - tau).clamp_min(0.0)


def sparsemax_reference_np(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row by row: z = max(y − t, 0) and ∇ = s ∘ (w − mean_S w), s the support."""
    zs, gs = [], []
    for yi, wi in zip(y, w):
        u = np.sort(yi)[::-1]
        css = np.cumsum(u) - 1.0
        k = np.arange(1, yi.size + 1)
        rho = int(k[u - css / k > 0].max())
        t = css[rho - 1] / rho
        z = np.maximum(yi - t, 0.0)
        s = (yi > t).astype(np.float64)
        zs.append(z)
        gs.append(s * (wi - (s @ wi) / s.sum()))
    return np.array(zs), np.array(gs)


def sparsemax_row(n: int, batch: int, peer, qpth_qp, qpth_threads, cvx_settings, large_n: int,
                  seed=0) -> Row:
    rng = np.random.default_rng([seed, n, 2])
    theta = torch.tensor(rng.standard_normal((batch, n)), dtype=DT, requires_grad=True)
    w = torch.tensor(rng.standard_normal((batch, n)), dtype=DT)
    problem, y, z = sparsemax_problem(n)
    ours = _ours(problem, [y], [z])
    calls = {
        "ours": _fwd_bwd(lambda: ours(theta)[0], theta, w),
        "torch": _fwd_bwd(lambda: sparsemax_torch(theta), theta, w),
        "qpth": None,
    }
    notes = []
    if qpth_qp is not None and qpth_threads != "off":
        Q, G, h, A, b = sparsemax_qp_data(n)
        fn = qpth_qp.QPFunction(verbose=-1, maxIter=QPTH_MAXITER)
        threads, note = qpth_thread_choice(n, qpth_threads)
        if note:
            notes.append(note)
        calls["qpth"] = with_threads(
            _fwd_bwd(lambda: fn(Q, -2.0 * theta, G, h, A, b), theta, w), threads)
    calls.update(_cvx_calls(peer, problem, [y], [z], [theta], theta, w, cvx_settings))

    def reference():
        zr, g = sparsemax_reference_np(theta.detach().numpy(), w.numpy())
        return torch.from_numpy(zr), torch.from_numpy(g)

    return Row(f"sparsemax-{n}", "sparsemax", f"n={n}", batch, n >= large_n, theta, w, calls,
               reference, notes, route=ours.backend)


def sparsemax_qp_data(n: int):
    eye = torch.eye(n, dtype=DT)
    return (2.0 * eye, -eye, torch.zeros(n, dtype=DT), torch.ones(1, n, dtype=DT),
            torch.ones(1, dtype=DT))


# entropic optimal transport --------------------------------------------------

def transport_problem(r: int, c: int, tau: float):
    C = cp.Parameter((r, c), name="C")
    a = cp.Parameter(r, name="a")
    b = cp.Parameter(c, name="b")
    Z = cp.Variable((r, c), name="Z")
    cons = [cp.sum(Z, axis=1) == a, cp.sum(Z, axis=0) == b]
    obj = cp.Maximize(-cp.sum(cp.multiply(C, Z)) + tau * cp.sum(cp.entr(Z)))
    return cp.Problem(obj, cons), (C, a, b), Z


def log_sinkhorn(C, a, b, tau, tol, sweeps, max_iter=100_000):
    """Z = exp((f ⊕ g − C)/τ): converge under no_grad, then ``sweeps`` differentiated sweeps."""
    K = -C / tau
    la, lb = a.log(), b.log()
    with torch.no_grad():
        f, g = torch.zeros_like(a), torch.zeros_like(b)
        for _ in range(max_iter):
            f = la - torch.logsumexp(K + g[..., None, :], -1)
            g = lb - torch.logsumexp(K + f[..., :, None], -2)
            Z = torch.exp(K + f[..., :, None] + g[..., None, :])
            if float((Z.sum(-1) - a).abs().max()) < tol:
                break
        else:
            raise RuntimeError("log-domain Sinkhorn did not converge")
    for _ in range(sweeps):
        f = la - torch.logsumexp(K + g[..., None, :], -1)
        g = lb - torch.logsumexp(K + f[..., :, None], -2)
    return torch.exp(K + f[..., :, None] + g[..., None, :])


def ot_row(r: int, c: int, batch: int, peer, cvx_settings, scs_eps: float, seed=0) -> Row:
    rng = np.random.default_rng([seed, r, c, 3])
    C = rng.random((batch, r, c))
    a = rng.random((batch, r)) + 0.1
    b = rng.random((batch, c)) + 0.1
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    Ct = torch.tensor(C, dtype=DT, requires_grad=True)
    at, bt = torch.tensor(a, dtype=DT), torch.tensor(b, dtype=DT)
    w = torch.tensor(rng.standard_normal((batch, r, c)), dtype=DT)
    problem, params, Z = transport_problem(r, c, OT_TAU)
    ours = _ours(problem, list(params), [Z])
    calls = {
        "ours": _fwd_bwd(lambda: ours(Ct, at, bt)[0], Ct, w),
        "torch": _fwd_bwd(lambda: log_sinkhorn(Ct, at, bt, OT_TAU, SINKHORN_TOL,
                                               SINKHORN_SWEEPS), Ct, w),
    }
    settings = [(name, dict(args, eps=scs_eps) if args.get("solve_method") == "SCS"
                 and "eps" in args else args) for name, args in cvx_settings]
    calls.update(_cvx_calls(peer, problem, list(params), [Z], [Ct, at, bt], Ct, w, settings))

    def reference():
        x = Ct.detach().clone().requires_grad_()
        zr = log_sinkhorn(x, at, bt, OT_TAU, REF_SINKHORN_TOL, REF_SINKHORN_SWEEPS)
        (g,) = torch.autograd.grad((w * zr).sum(), x)
        return zr.detach(), g

    notes = [f"ot-{r}x{c}: cvxpyl SCS runs at eps = {scs_eps:g} here (--ot-scs-eps)."]
    return Row(f"ot-{r}x{c}", "ot", f"{r}x{c}, τ={OT_TAU:g}", batch, True, Ct, w, calls,
               reference, notes, route=ours.backend)


# ---------------------------------------------------------------------------
# qpth: threads and the LU trap
# ---------------------------------------------------------------------------

_PROBES: dict[int, tuple[bool, str]] = {}


def qpth_thread_choice(n: int, choice: str) -> tuple[int | None, str]:
    if choice != "auto":
        k = int(choice)
        return k, f"sparsemax-{n}: qpth runs with torch.set_num_threads({k}) (--qpth-threads)."
    size = n + 1
    if size < LU_TRAP_SIZE:
        return None, ""
    if torch.get_num_threads() == 1:
        return None, (f"sparsemax-{n}: qpth's {size}×{size} batched LU runs with 1 thread, like "
                      "the whole run (2 threads fail there: NOTES.md's trap).")
    if n not in _PROBES:
        _PROBES[n] = probe([sys.executable, os.path.abspath(__file__), "--probe-qpth",
                            json.dumps({"n": n, "threads": torch.get_num_threads()})],
                           QPTH_PROBE_TIMEOUT)
    ok, reason = _PROBES[n]
    if ok:
        return None, (f"sparsemax-{n}: qpth's {size}×{size} batched LU passed a 2-thread probe; "
                      "timed with 2 threads like ours.")
    return 1, (f"sparsemax-{n}: qpth with {torch.get_num_threads()} threads failed in the probe "
               f"({reason}) — NOTES.md's batched-LU trap at {size}×{size}; its column runs with "
               "torch.set_num_threads(1).")


def _probe_main(spec: str) -> None:
    cfg = json.loads(spec)
    torch.set_num_threads(cfg["threads"])
    qpth_qp, note = optional_import("qpth.qp")
    if qpth_qp is None:
        raise SystemExit(note)
    n = cfg["n"]
    rng = np.random.default_rng(0)
    theta = torch.tensor(rng.standard_normal((BATCH, n)), dtype=DT, requires_grad=True)
    Q, G, h, A, b = sparsemax_qp_data(n)
    z = qpth_qp.QPFunction(verbose=-1, maxIter=QPTH_MAXITER)(Q, -2.0 * theta, G, h, A, b)
    (g,) = torch.autograd.grad(z.sum(), theta)
    zr, _ = sparsemax_reference_np(theta.detach().numpy(), np.zeros((BATCH, n)))
    err = float(np.abs(z.detach().numpy() - zr).max())
    if not err < 1e-6 or not bool(torch.isfinite(g).all()):
        raise SystemExit(f"garbage: max |z - z_ref| = {err:.3g}")
    print("ok")


# ---------------------------------------------------------------------------
# Timing: fast and slow groups, merged into one result per row
# ---------------------------------------------------------------------------

def recording(row: Row, name: str, call):
    def col():
        z, g = call()
        row.record[name] = (z.detach(), g.detach())
        return g

    return col


def time_row(row: Row, args) -> Result:
    labels = {"problem": row.name, "size": row.size, "B": str(row.batch),
              "route (ours)": row.route}
    fast = {k: recording(row, k, c) for k, c in row.calls.items() if k in FAST and c}
    slow = {k: recording(row, k, c) for k, c in row.calls.items() if k not in FAST and c}
    times, failures = {}, {}
    # The fast group runs without a gc.collect() before each call: a full
    # collection over CVXPY's object graph leaves the caches cold and made a
    # 60 µs torch.softmax read 500 µs. One collection before the group instead.
    gc.collect()
    groups = [(fast, args.repeats, args.warmup, False)]
    if slow:
        groups.append((slow, args.large_repeats, 0, not args.no_gc) if row.large
                      else (slow, args.slow_repeats, args.warmup, not args.no_gc))
    for columns, repeats, warmup, collect in groups:
        faulthandler.dump_traceback_later(args.case_timeout, exit=True)
        try:
            (res,) = run([Case(labels, columns)], repeats=repeats, warmup=warmup,
                         collect=collect, progress=None)
        finally:
            faulthandler.cancel_dump_traceback_later()
        times.update(res.times)
        failures.update(res.failures)
    full = Case(labels, {k: (lambda: None) if c else None for k, c in row.calls.items()},
                notes=row.notes)
    return Result(full, times, failures, {})


def accuracy(row: Row) -> dict[str, tuple[float, float]]:
    zr, gr = row.reference()
    out = {}
    for name, (z, g) in row.record.items():
        out[name] = (float((z - zr).abs().max()), float((g - gr).abs().max()))
    return out


def accuracy_table(rows: list[Row], accs: list[dict], columns: list[str]) -> str:
    head = ["problem", "size", "B"] + [f"{c}: z / ∇ err" for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] *
                                                           len(columns)) + "|"]
    for row, acc in zip(rows, accs):
        cells = [row.name, row.size, str(row.batch)]
        for c in columns:
            cells.append(f"{acc[c][0]:.1e} / {acc[c][1]:.1e}" if c in acc else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[Row], results: list[Result], accs: list[dict]) -> str:
    lines = []
    for row, res, acc in zip(rows, results, accs):
        ours = res.median_ms("ours")
        if ours is None:
            continue
        bits = []
        t = res.median_ms("torch")
        if t:
            bits.append(f"ours / torch = {ours / t:.2f}")
        peers = {c: res.median_ms(c) for c in res.times if c not in FAST}
        for c, ms in peers.items():
            if ms:
                bits.append(f"{c} / ours = {ms / ours:,.0f}")
        line = f"- {row.name} (B = {row.batch}): " + "; ".join(bits)
        if row.kind == "softmax" and row.name == "softmax-1000":
            verdicts = []
            if t:
                q = ours / t
                verdicts.append(f"within {TARGET_TORCH:g}× of torch.softmax: "
                                + ("meets" if q <= TARGET_TORCH
                                   else f"MISSES by {q / TARGET_TORCH:.2f}×"))
            for c, ms in peers.items():
                if ms:
                    q = ms / ours
                    verdicts.append(f"≥ {TARGET_CVXPYL:g}× faster than {c}: "
                                    + ("meets" if q >= TARGET_CVXPYL
                                       else f"MISSES by {TARGET_CVXPYL / q:.1f}×"))
            if "ours" in acc:
                e = max(acc["ours"])
                verdicts.append(f"errors ≤ {TARGET_ERR:g}: "
                                + ("meets" if e <= TARGET_ERR else "MISSES")
                                + f" ({e:.1e})")
            line += " — targets: " + "; ".join(verdicts)
        lines.append(line)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------

def _top_functions(prof: cProfile.Profile, calls: int, top: int) -> str:
    """Own time per call in µs (pstats prints seconds to 3 decimals: useless here)."""
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [f"{'µs/call':>9} {'calls/call':>10}  function"]
    for (filename, line, func), (_, ncalls, tottime, _, _) in rows:
        where = f"{os.path.basename(filename)}:{line}({func})" if line else func
        lines.append(f"{1e6 * tottime / calls:9.1f} {ncalls / calls:10.1f}  {where}")
    return "\n".join(lines) + "\n"


def profile(rows: list[Row], top: int = 20) -> str:
    """Time ours and torch per row; cProfile and torch.profiler of ours."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    out = io.StringIO()
    for row in rows:
        k = 5 if row.kind == "ot" else 300
        for name in FAST:
            fn = row.calls.get(name)
            if fn is None:
                continue
            fn()
            start = time.perf_counter()
            for _ in range(k):
                fn()
            plain = 1e3 * (time.perf_counter() - start) / k
            out.write(f"\n## {row.name} B = {row.batch}, {name}: {plain:.3f} ms per call "
                      f"(unprofiled, mean of {k})\n")
            if name != "ours":
                continue
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(k):
                fn()
            prof.disable()
            out.write("\n### cProfile (own time per call, fwd+bwd)\n\n```\n"
                      + _top_functions(prof, k, top) + "```\n")
            out.write("\n### torch.profiler (CPU ops, self time)\n\n```\n")
            with tprofile(activities=[ProfilerActivity.CPU]) as tp:
                for _ in range(k):
                    fn()
            out.write(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
            out.write("\n```\n")
    return out.getvalue()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argument_parser(__doc__.splitlines()[0], repeats=15, warmup=1)
    p.add_argument("--problems", default="softmax,sparsemax,ot",
                   help="comma-separated subset of softmax, sparsemax, ot")
    p.add_argument("--sizes", default="10,100,1000", help="n for softmax and sparsemax")
    p.add_argument("--batch", type=int, default=BATCH, help="batch of softmax, sparsemax (16)")
    p.add_argument("--ot", default="50x50", help="transport size RxC (default 50x50)")
    p.add_argument("--ot-batch", type=int, default=2, help="transport batch (default 2)")
    p.add_argument("--ot-scs-eps", type=float, default=1e-6,
                   help="SCS eps on the transport row (default 1e-6)")
    p.add_argument("--slow-repeats", type=int, default=3,
                   help="rounds for the peers' columns (default 3)")
    p.add_argument("--large-repeats", type=int, default=2,
                   help="rounds for the peers at n >= 1000 and on transport, no warmup (2)")
    p.add_argument("--cvx-settings", default=DEFAULT_CVX,
                   help=f"cvxpylayers columns, subset of {', '.join(CVX_SETTINGS)} "
                        f"(default {DEFAULT_CVX}; empty string: none)")
    p.add_argument("--qpth-threads", default="auto",
                   help="auto (probe the LU trap at n + 1 >= 150), a thread count, or off")
    p.add_argument("--no-qpth", action="store_true", help="skip the qpth column")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the whole run (default: torch's, 2 here); "
                        "1 on a busy shared machine, see README")
    p.add_argument("--case-timeout", type=float, default=900,
                   help="abort (with a traceback) if one group of a row takes longer (s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: n = 10, 100, a 20x20 transport, 5 fast rounds, 2 slow")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile ours (cProfile + torch.profiler)")
    p.add_argument("--probe-qpth", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_qpth:
        _probe_main(args.probe_qpth)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.ot = "10,100", "20x20"
        args.repeats, args.slow_repeats, args.large_repeats = 5, 2, 1
    warnings.simplefilter("ignore")

    peer, peer_note = optional_import("cvxpylayers.torch")
    qpth_qp, qpth_note = (None, None) if args.no_qpth else optional_import("qpth.qp")
    bad = [s for s in csv_list(args.cvx_settings) if s not in CVX_SETTINGS]
    if bad:
        raise SystemExit(f"unknown --cvx-settings {bad}; choose from {list(CVX_SETTINGS)}")
    cvx = [CVX_SETTINGS[s] for s in csv_list(args.cvx_settings)]
    problems = csv_list(args.problems)
    sizes = csv_list(args.sizes, int)
    large_n = 1000
    qpth_threads = "off" if args.no_qpth else args.qpth_threads

    start = time.perf_counter()
    rows: list[Row] = []
    for kind in problems:
        if kind == "softmax":
            rows += [softmax_row(n, args.batch, peer, cvx, large_n) for n in sizes]
        elif kind == "sparsemax":
            rows += [sparsemax_row(n, args.batch, peer, qpth_qp, qpth_threads, cvx, large_n)
                     for n in sizes]
        elif kind == "ot":
            r, c = (int(x) for x in args.ot.lower().split("x"))
            rows.append(ot_row(r, c, args.ot_batch, peer, cvx, args.ot_scs_eps))
        else:
            raise SystemExit(f"unknown problem {kind!r}; choose from softmax, sparsemax, ot")
    if args.filter:
        keep = {id(c.case_row) for c in select(
            [_named(r) for r in rows], args.filter)}
        rows = [r for r in rows if id(r) in keep]
    if args.profile:
        emit(profile(rows), args.out)
        return

    results, accs = [], []
    for i, row in enumerate(rows, 1):
        t0 = time.perf_counter()
        res = time_row(row, args)
        results.append(res)
        accs.append(accuracy(row))
        meds = ", ".join(f"{c} {res.median_ms(c) or float('nan'):.3g}" for c in res.times)
        print(f"[{i}/{len(rows)}] {row.name}: {meds} ms ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr, flush=True)

    for r in rows:
        expected = {"softmax": "entropy", "sparsemax": "simplex", "ot": "entropy"}[r.kind]
        if r.route != expected:
            r.notes.append(f"{r.name}: ours took the {r.route!r} path, not {expected!r}.")
    for res, row in zip(results, rows):
        res.case.notes.extend(n for n in [peer_note, qpth_note if row.kind == "sparsemax"
                                          else None] if n)
    columns = list(dict.fromkeys(c for r in rows for c, f in r.calls.items()))
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    text = (
        "# Entropy and simplex paths vs torch, qpth and cvxpylayers (float64, CPU, fwd+bwd)\n\n"
        f"{environment(['cvxpy', 'cvxpylayers', 'diffcp', 'scs', 'clarabel', 'qpth'])}; "
        f"load average (1, 5, 15 min) at the end: {load}\n"
        f"ours and torch: medians of {args.repeats} interleaved rounds after {args.warmup} "
        f"warmup call(s); peers: {args.slow_repeats} rounds ({args.large_repeats}, no warmup, "
        "at n = 1000 and on transport); X / ours > 1 means ours is faster\n\n"
        + markdown_table(results, baseline="ours")
        + "\n## Accuracy (max abs error of z and of ∇ vs the reference, from each column's "
        "last timed call)\n\n"
        + accuracy_table(rows, accs, columns)
        + "\n## Summary\n\n" + summary(rows, results, accs)
        + f"\n(total {time.perf_counter() - start:.0f} s)\n"
    )
    emit(text, args.out)


@dataclass
class _NamedRow:
    case_row: Row

    @property
    def name(self) -> str:
        return f"{self.case_row.name} | {self.case_row.size} | {self.case_row.batch}"


def _named(row: Row) -> _NamedRow:
    return _NamedRow(row)


if __name__ == "__main__":
    main()
