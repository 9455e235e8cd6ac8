"""Conic path vs cvxpylayers: same problems, same solver (SCS via diffcp), same solver_args.

    python benchmarks/bench_conic.py                      # B = 1 and 16, about 2.5 min on 2 cores
    python benchmarks/bench_conic.py --batch 1,32 --repeats 7 --out conic.md
    python benchmarks/bench_conic.py --problems softmax-10,softmax-100 --settings lsqr
    python benchmarks/bench_conic.py --filter "softmax-100 | n=100 | 1 | default" --profile

Rows are (problem, batch, solver_args, pass). Columns ``ours`` and
``cvxpylayers`` are timed in the same interleaved rounds (see `harness`);
``cvxpylayers / ours`` is the ratio of their medians: above 1 means we are
faster. The issue's target is ours / cvxpylayers <= 1.1 on every row, i.e.
``cvxpylayers / ours`` >= 0.91.

Both layers receive the identical ``solver_args`` dict, always with
``solve_method="SCS"``: cvxpylayers leaves the choice to diffcp, which picks
ECOS for problems without PSD or dual-exponential cones, so without it the
two would not run the same solver. Settings:

    default    {"solve_method": "SCS"}: SCS's tolerances (1e-4); the
               differentiation modes differ: ours "auto" (the deflated dense
               adjoint of `cone_derivative` at these sizes, softmax-100 is
               LSQR), cvxpylayers diffcp's "lsqr"
    eps=1e-8   as default with {"eps": 1e-8}
    lsqr       {"mode": "lsqr"}: the same adjoint in both, apples to apples
    dense      {"mode": "dense"} (not run unless named in --settings)

``ours`` is forced onto the conic path (``backend="conic"``); ``--auto``
adds a column ``ours auto`` for the default route where it differs (the QP
path for box-ls and lp, the entropy path for softmax), given the row's
tolerance without diffcp's keys.

Passes: ``fwd`` is a training forward (inputs require grad, so both build
the adjoint's data), ``fwd+bwd`` adds ``autograd.grad`` of ``sum(w * x)``
for a fixed random ``w``; ``infer`` (under ``no_grad``) runs only when named.

Accuracy columns (max absolute error over the batch, computed once per row,
untimed) compare each library with an independent reference, a closed form
differentiated by torch autograd: softmax; the PSD cone projection through
``eigh``; the ellipsoid-constrained linear objective; and for the box least
squares and the LP, the closed form on the active set found by a tight
Clarabel solve (``x_F = (A_Fᵀ A_F + λI)⁻¹ A_Fᵀ(b − A_U x_U)``, ``x = G_act⁻¹ h_act``).
``sol err`` is on ``fwd`` rows, gradient errors on ``fwd+bwd`` rows, and
``grad ours-cvxpyl`` is the largest difference between the two libraries'
gradients.
"""

from __future__ import annotations

import cProfile
import inspect
import io
import math
import pstats
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import cvxpy as cp
import numpy as np
import torch
from harness import (
    Case,
    argument_parser,
    emit,
    environment,
    markdown_table,
    optional_import,
    ratio,
    run,
    select,
)

from declarative.torch import CvxpyLayer

SETTINGS: dict[str, dict] = {
    "default": {"solve_method": "SCS"},
    "eps=1e-8": {"solve_method": "SCS", "eps": 1e-8},
    "lsqr": {"solve_method": "SCS", "mode": "lsqr"},
    "dense": {"solve_method": "SCS", "mode": "dense"},
}
DEFAULT_SETTINGS = ("default", "eps=1e-8", "lsqr")
PASSES = ("fwd", "fwd+bwd", "infer")
DEFAULT_PASSES = ("fwd", "fwd+bwd")
TARGET = 1.1  # ours / cvxpylayers, ratio of medians
# Tight interior-point tolerances for the reference's active-set detection.
CLARABEL_TIGHT = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=500)
ACTIVE_TOL = 1e-6  # |constraint slack| below this counts as active at the reference


# ---------------------------------------------------------------------------
# Problems. Each builds a fresh CVXPY problem (so the reference's own solves
# never touch the layers' Parameters), samples a batch of parameter values,
# and gives a per-sample reference in torch, differentiable by autograd.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    name: str
    build: Callable[[], tuple[cp.Problem, list, list]]
    sample: Callable[[np.random.Generator, int], list[np.ndarray]]  # leading batch dim
    reference: Callable[[list[torch.Tensor]], list[torch.Tensor]]  # one sample


def _tight_solve(spec_name: str, values: list[np.ndarray]) -> list[np.ndarray]:
    problem, params, variables = _reference_problem(spec_name)
    for p, v in zip(params, values):
        p.value = v
    problem.solve(solver=cp.CLARABEL, **CLARABEL_TIGHT)
    if problem.status != cp.OPTIMAL:
        raise RuntimeError(f"reference solve of {spec_name}: status {problem.status}")
    return [np.asarray(v.value, dtype=np.float64) for v in variables]


@cache
def _reference_problem(spec_name: str):
    return SPECS[spec_name].build()


# (a) ridge least squares in a box: a QP written as a cone program (SOC).
BOX_N, BOX_M, BOX_LAM = 30, 40, 0.1


def _box_build():
    A = cp.Parameter((BOX_M, BOX_N), name="A")
    b = cp.Parameter(BOX_M, name="b")
    x = cp.Variable(BOX_N, name="x")
    obj = cp.sum_squares(A @ x - b) + BOX_LAM * cp.sum_squares(x)
    return cp.Problem(cp.Minimize(obj), [x >= -1, x <= 1]), [A, b], [x]


def _box_sample(rng, B):
    return [rng.standard_normal((B, BOX_M, BOX_N)) / math.sqrt(BOX_M),
            2.0 * rng.standard_normal((B, BOX_M))]


def _box_reference(p):
    A, b = p
    (x_star,) = _tight_solve("box-ls", [A.detach().numpy(), b.detach().numpy()])
    upper, lower = x_star > 1 - ACTIVE_TOL, x_star < -1 + ACTIVE_TOL
    free = ~(upper | lower)
    fixed = torch.zeros(BOX_N, dtype=A.dtype)
    fixed[torch.from_numpy(upper)] = 1.0
    fixed[torch.from_numpy(lower)] = -1.0
    F = torch.from_numpy(np.flatnonzero(free))
    AF = A[:, F]
    rhs = AF.T @ (b - A @ fixed)
    xF = torch.linalg.solve(AF.T @ AF + BOX_LAM * torch.eye(F.numel(), dtype=A.dtype), rhs)
    return [fixed.index_put((F,), xF)]


# (b) an LP with a box: the solution is a vertex, x = G_act⁻¹ h_act.
LP_N, LP_M = 20, 15


def _lp_build():
    c = cp.Parameter(LP_N, name="c")
    A = cp.Parameter((LP_M, LP_N), name="A")
    b = cp.Parameter(LP_M, name="b")
    x = cp.Variable(LP_N, name="x")
    return cp.Problem(cp.Minimize(c @ x), [A @ x <= b, x >= 0, x <= 1]), [c, A, b], [x]


def _lp_sample(rng, B):
    A = rng.standard_normal((B, LP_M, LP_N))
    b = A @ np.full(LP_N, 0.5) + rng.uniform(0.1, 1.0, (B, LP_M))  # x = ½ strictly feasible
    return [rng.standard_normal((B, LP_N)), A, b]


def _lp_reference(p):
    c, A, b = p
    (x_star,) = _tight_solve("lp", [t.detach().numpy() for t in p])
    eye = torch.eye(LP_N, dtype=A.dtype)
    G = torch.cat([A, -eye, eye])
    h = torch.cat([b, torch.zeros(LP_N, dtype=A.dtype), torch.ones(LP_N, dtype=A.dtype)])
    slack = h.detach().numpy() - G.detach().numpy() @ x_star
    active = torch.from_numpy(np.flatnonzero(np.abs(slack) < ACTIVE_TOL))
    if active.numel() != LP_N:
        raise RuntimeError(f"LP reference: {active.numel()} active constraints, expected "
                           f"{LP_N} (degenerate vertex)")
    x = torch.linalg.solve(G[active], h[active])
    return [x + 0.0 * c.sum()]  # x does not depend on c: its gradient there is 0


# (c) an SOCP: minimize cᵀx s.t. ||Ax − b|| <= 1, so x = A⁻¹(b − w/||w||), w = A⁻ᵀc.
SOC_N = 20


def _soc_build():
    c = cp.Parameter(SOC_N, name="c")
    A = cp.Parameter((SOC_N, SOC_N), name="A")
    b = cp.Parameter(SOC_N, name="b")
    x = cp.Variable(SOC_N, name="x")
    return cp.Problem(cp.Minimize(c @ x), [cp.norm(A @ x - b, 2) <= 1]), [c, A, b], [x]


def _soc_sample(rng, B):
    A = np.eye(SOC_N) + 0.3 * rng.standard_normal((B, SOC_N, SOC_N)) / math.sqrt(SOC_N)
    return [rng.standard_normal((B, SOC_N)), A, rng.standard_normal((B, SOC_N))]


def _soc_reference(p):
    c, A, b = p
    w = torch.linalg.solve(A.T, c)
    return [torch.linalg.solve(A, b - w / torch.linalg.norm(w))]


# (d) softmax as an entropy-regularised argmax (exponential cone).
def _softmax_spec(n: int) -> Spec:
    def build():
        theta = cp.Parameter(n, name="theta")
        z = cp.Variable(n, name="z")
        obj = cp.Maximize(theta @ z + cp.sum(cp.entr(z)))
        return cp.Problem(obj, [cp.sum(z) == 1]), [theta], [z]

    def sample(rng, B):
        return [rng.standard_normal((B, n))]

    def reference(p):
        return [torch.softmax(p[0], dim=-1)]

    return Spec(f"softmax-{n}", build, sample, reference)


# (e) an SDP: the projection of a symmetric Y onto the PSD cone.
PSD_K = 8


def _psd_build():
    Y = cp.Parameter((PSD_K, PSD_K), name="Y")
    X = cp.Variable((PSD_K, PSD_K), symmetric=True, name="X")
    return cp.Problem(cp.Minimize(cp.sum_squares(X - Y)), [X >> 0]), [Y], [X]


def _psd_sample(rng, B):
    G = rng.standard_normal((B, PSD_K, PSD_K))
    return [(G + G.transpose(0, 2, 1)) / 2]


def _psd_reference(p):
    (Y,) = p
    evals, V = torch.linalg.eigh((Y + Y.T) / 2)
    return [(V * evals.clamp(min=0)) @ V.T]


SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("box-ls", _box_build, _box_sample, _box_reference),
    Spec("lp", _lp_build, _lp_sample, _lp_reference),
    Spec("socp", _soc_build, _soc_sample, _soc_reference),
    _softmax_spec(10),
    _softmax_spec(100),
    Spec("psd-proj", _psd_build, _psd_sample, _psd_reference),
]}
SIZES = {
    "box-ls": f"n={BOX_N}, m={BOX_M}", "lp": f"n={LP_N}, m={LP_M}+box",
    "socp": f"n={SOC_N}", "softmax-10": "n=10", "softmax-100": "n=100",
    "psd-proj": f"{PSD_K}x{PSD_K}",
}


# ---------------------------------------------------------------------------
# Calls and accuracy
# ---------------------------------------------------------------------------

@dataclass
class Instance:
    """One problem at one batch size: the layers, the inputs and the loss weights."""

    spec: Spec
    batch: int  # 1 means unbatched inputs
    ours: CvxpyLayer  # forced onto the conic path
    theirs: object | None
    auto: CvxpyLayer | None  # backend="auto", where it routes elsewhere (--auto)
    params: list[torch.Tensor]
    weights: list[torch.Tensor]

    @property
    def batched(self) -> bool:
        return self.batch > 1


def _accepts_backend() -> bool:
    return "backend" in inspect.signature(CvxpyLayer.__init__).parameters


def make_instance(spec: Spec, batch: int, peer, with_auto: bool, seed: int = 0) -> Instance:
    problem, params, variables = spec.build()
    # This benchmark measures the conic path: name it, or "auto" may route a
    # QP or an entropy problem to another backend.
    forced = {"backend": "conic"} if _accepts_backend() else {}
    ours = CvxpyLayer(problem, parameters=params, variables=variables, **forced)
    auto = None
    if with_auto and forced:
        auto = CvxpyLayer(problem, parameters=params, variables=variables)
        if getattr(auto, "backend", "conic") == "conic":
            auto = None
    theirs = None if peer is None else peer.CvxpyLayer(problem, parameters=params,
                                                       variables=variables)
    rng = np.random.default_rng(seed)
    values = spec.sample(rng, batch)
    if batch == 1:
        values = [v[0] for v in values]
    tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    lead = (batch,) if batch > 1 else ()
    weights = [torch.tensor(rng.standard_normal(lead + tuple(v.shape)), dtype=torch.float64)
               for v in variables]
    return Instance(spec, batch, ours, theirs, auto, tensors, weights)


def auto_args(args: dict) -> dict:
    """The settings for the auto route: the tolerance, without diffcp's own keys."""
    return {k: v for k, v in args.items() if k not in ("solve_method", "mode")}


def make_call(layer, inst: Instance, args: dict, pass_: str) -> Callable[[], object]:
    params, weights = inst.params, inst.weights

    def fwd():
        return layer(*params, solver_args=dict(args))

    def fwd_bwd():
        outs = layer(*params, solver_args=dict(args))
        loss = sum((w * o).sum() for w, o in zip(weights, outs))
        return torch.autograd.grad(loss, params)

    def infer():
        with torch.no_grad():
            return layer(*params, solver_args=dict(args))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "infer": infer}[pass_]


def solution_and_gradient(layer, inst: Instance, args: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = layer(*inst.params, solver_args=dict(args))
    loss = sum((w * o).sum() for w, o in zip(inst.weights, outs))
    grads = torch.autograd.grad(loss, inst.params)
    return [o.detach() for o in outs], [g.detach() for g in grads]


@cache
def reference(key: tuple[str, int]):
    """Per-sample closed forms, stacked: (outputs, gradients) of the instance's loss."""
    inst = INSTANCES[key]
    samples = range(inst.batch) if inst.batched else [None]
    outs, grads = [], []
    for i in samples:
        p = [(t.detach() if i is None else t.detach()[i]).clone().requires_grad_()
             for t in inst.params]
        w = [wt if i is None else wt[i] for wt in inst.weights]
        o = inst.spec.reference(p)
        g = torch.autograd.grad(sum((wi * oi).sum() for wi, oi in zip(w, o)), p)
        outs.append([oi.detach() for oi in o])
        grads.append([gi.detach() for gi in g])
    if not inst.batched:
        return outs[0], grads[0]
    return ([torch.stack(k) for k in zip(*outs)], [torch.stack(k) for k in zip(*grads)])


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@cache
def accuracy(key: tuple[str, int], setting: str) -> dict[str, float | None]:
    inst = INSTANCES[key]
    args = SETTINGS[setting]
    try:
        ref = reference(key)
    except RuntimeError:  # e.g. a degenerate LP vertex: no closed form to compare with
        ref = None
    runs = {"ours": solution_and_gradient(inst.ours, inst, args)}
    if inst.theirs is not None:
        runs["cvxpyl"] = solution_and_gradient(inst.theirs, inst, args)
    if inst.auto is not None:
        try:
            runs["auto"] = solution_and_gradient(inst.auto, inst, auto_args(args))
        except Exception:  # its timing column reports the failure
            pass
    out: dict[str, float | None] = {}
    if ref is not None:
        for name, (x, g) in runs.items():
            out[f"sol err {name}"] = _max_err(x, ref[0])
            out[f"grad err {name}"] = _max_err(g, ref[1])
    if "cvxpyl" in runs:
        out["grad ours-cvxpyl"] = _max_err(runs["ours"][1], runs["cvxpyl"][1])
    return out


SOLUTION_COLS = ("sol err ours", "sol err cvxpyl", "sol err auto")
GRADIENT_COLS = ("grad err ours", "grad err cvxpyl", "grad ours-cvxpyl", "grad err auto")
INSTANCES: dict[tuple[str, int], Instance] = {}
AUTO_NOTE = ("ours auto: the default backend='auto' route (QP or entropy path) with the "
             "row's tolerance and no diffcp keys; '—' where auto is the conic path.")


def build_cases(problems, batches, settings, passes, peer, peer_note,
                with_auto: bool = False) -> list[Case]:
    cases = []
    for name in problems:
        for B in batches:
            key = (name, B)
            inst = INSTANCES[key] = make_instance(SPECS[name], B, peer, with_auto)
            for setting in settings:
                args = SETTINGS[setting]
                for pass_ in passes:
                    shown = GRADIENT_COLS if pass_ == "fwd+bwd" else SOLUTION_COLS

                    def extras(key=key, setting=setting, shown=shown):
                        acc = accuracy(key, setting)
                        return {k: acc[k] for k in shown if k in acc}

                    columns = {
                        "ours": make_call(inst.ours, inst, args, pass_),
                        "cvxpylayers": (None if inst.theirs is None
                                        else make_call(inst.theirs, inst, args, pass_)),
                    }
                    notes = [peer_note] if peer_note else []
                    if with_auto:
                        columns["ours auto"] = (None if inst.auto is None else make_call(
                            inst.auto, inst, auto_args(args), pass_))
                        notes.append(AUTO_NOTE)
                    labels = {"problem": name, "size": SIZES[name], "B": str(B),
                              "solver_args": setting, "pass": pass_}
                    cases.append(Case(labels, columns,
                                      extras if pass_ != "infer" else None, notes))
    return cases


def summary(results) -> str:
    """Rows that miss the target, and the geometric mean of the ratios per pass."""
    lines = []
    slow = []
    by_pass: dict[str, list[float]] = {}
    for r in results:
        q = ratio(r, "ours", "cvxpylayers")
        if q is None:
            continue
        by_pass.setdefault(r.case.labels["pass"], []).append(q)
        if q > TARGET:
            slow.append(f"{r.case.name} (ours / cvxpylayers = {q:.2f})")
    for p, qs in by_pass.items():
        gm = math.exp(sum(math.log(q) for q in qs) / len(qs))
        lines.append(f"- {p}: geometric mean of ours / cvxpylayers = {gm:.2f} over "
                     f"{len(qs)} rows, worst {max(qs):.2f}")
    if by_pass:
        lines.append(f"- rows above the target ours / cvxpylayers <= {TARGET}: "
                     + ("; ".join(slow) if slow else "none"))
    return "\n".join(lines) + ("\n" if lines else "")


# Where profiled time goes, by the component that spent it (tottime, not cumulative).
COMPONENTS = (
    ("declarative (ours)", ("/declarative/", "/canon/", "/backends/")),
    ("cvxpylayers", ("cvxpylayers",)),
    ("diffcp derivative (C++)", ("_diffcp.",)),
    ("diffcp (python)", ("/diffcp/",)),
    ("scs solve", ("scs",)),
    ("scipy.sparse", ("scipy",)),
    ("threads / pools", ("threading", "concurrent", "multiprocessing", "threadpoolctl",
                         "acquire", "_thread")),
    ("torch", ("torch",)),
    ("numpy", ("numpy",)),
)


def _component(key) -> str:
    filename, _, func = key
    text = f"{filename} {func}"
    for name, needles in COMPONENTS:
        if any(n in text for n in needles):
            return name
    return "other"


def breakdown(stats: pstats.Stats, calls: int) -> str:
    """ms per call spent in each component, largest first."""
    per: dict[str, float] = {}
    for key, (_, _, tottime, _, _) in stats.stats.items():
        per[_component(key)] = per.get(_component(key), 0.0) + tottime
    total = sum(per.values())
    rows = sorted(per.items(), key=lambda kv: -kv[1])
    return "\n".join(f"    {name:<26} {1e3 * t / calls:8.2f} ms  {100 * t / total:5.1f} %"
                     for name, t in rows)


def profile(cases, repeats: int, top: int = 25) -> str:
    """cProfile every column of each case over ``repeats`` calls.

    Reports ms per call by component (`COMPONENTS`) and the top functions by
    own time. Worker threads are not seen by cProfile: run with
    ``--batch 1`` (serial) for a complete picture, or read the B > 1 profile
    as the main thread's share.
    """
    out = io.StringIO()
    for case in cases:
        out.write(f"\n## {case.name}\n")
        for column, fn in case.columns.items():
            if fn is None:
                continue
            fn()  # warm up
            prof = cProfile.Profile()
            start = time.perf_counter()
            prof.enable()
            for _ in range(repeats):
                fn()
            prof.disable()
            elapsed = (time.perf_counter() - start) / repeats
            stats = pstats.Stats(prof, stream=out)
            out.write(f"\n### {column}: {1e3 * elapsed:.2f} ms per call under the profiler\n\n")
            out.write(breakdown(stats, repeats) + "\n\n")
            stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _csv(text: str, allowed=None, cast=str) -> list:
    items = [cast(t.strip()) for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [i for i in items if i not in allowed]
        if bad:
            raise SystemExit(f"unknown {bad}; choose from {sorted(allowed)}")
    return items


def main(argv=None) -> None:
    p = argument_parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--problems", default=",".join(SPECS),
                   help=f"comma-separated subset of {', '.join(SPECS)}")
    p.add_argument("--batch", default="1,16",
                   help="comma-separated batch sizes; 1 means unbatched inputs (default 1,16)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help=f"comma-separated subset of {', '.join(SETTINGS)}")
    p.add_argument("--passes", default=",".join(DEFAULT_PASSES),
                   help=f"comma-separated subset of {', '.join(PASSES)}")
    p.add_argument("--auto", action="store_true",
                   help="add a column for backend='auto' where it routes off the conic path")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, cProfile each column of the selected rows")
    args = p.parse_args(argv)

    peer, note = optional_import("cvxpylayers.torch")
    cases = build_cases(_csv(args.problems, SPECS), _csv(args.batch, cast=int),
                        _csv(args.settings, SETTINGS), _csv(args.passes, PASSES), peer, note,
                        with_auto=args.auto)
    cases = select(cases, args.filter)
    warnings.simplefilter("ignore")  # SCS "Solved/Inaccurate" and our status warnings
    if args.profile:
        emit(profile(cases, args.repeats), args.out)
        return
    start = time.perf_counter()
    results = run(cases, repeats=args.repeats, warmup=args.warmup, collect=not args.no_gc)
    text = (
        "# Conic path vs cvxpylayers (SCS via diffcp, identical solver_args)\n\n"
        f"{environment(['cvxpy', 'diffcp', 'scs', 'cvxpylayers', 'numpy', 'scipy'])}\n"
        f"medians of {args.repeats} interleaved rounds after {args.warmup} warmup call(s); "
        "cvxpylayers / ours > 1 means ours is faster; errors are max abs vs the closed-form "
        "reference\n\n"
        + markdown_table(results, baseline="ours",
                         extra_columns=[c for c in SOLUTION_COLS + GRADIENT_COLS
                                        if args.auto or not c.endswith("auto")])
        + "\n" + summary(results)
        + f"\n(total {time.perf_counter() - start:.0f} s)\n"
    )
    emit(text, args.out)


if __name__ == "__main__":
    main()
