"""Conic path vs cvxpylayers: same problems, same solver (SCS via diffcp), same solver_args.

    python benchmarks/bench_conic.py                      # B = 1 and 16, about 2.5 min on 2 cores
    python benchmarks/bench_conic.py --batch 1,32 --repeats 7 --out conic.md
    python benchmarks/bench_conic.py --problems softmax-10,softmax-100 --settings lsqr
    python benchmarks/bench_conic.py --filter "softmax-100 | n=100 | 1 | default" --profile

Rows are (problem, batch, solver_args, pass); ``ours`` is forced onto the conic
path (``backend="conic"``), both layers get the identical ``solver_args``, always
with ``solve_method="SCS"`` (left alone, diffcp picks ECOS without PSD or
exponential cones). Errors (untimed, max abs over the batch) are against closed
forms differentiated by autograd. Settings, columns and references:
benchmarks/README.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import cvxpy as cp
import harness as h
import numpy as np
import torch
from references import reference_solve

from declarative.torch import CvxpyLayer

SETTINGS: dict[str, dict] = {
    "default": {"solve_method": "SCS"},
    "eps=1e-8": {"solve_method": "SCS", "eps": 1e-8},
    "lsqr": {"solve_method": "SCS", "mode": "lsqr"},
    "dense": {"solve_method": "SCS", "mode": "dense"},
}
DEFAULT_SETTINGS = ("default", "eps=1e-8", "lsqr")
PASSES = ("fwd", "fwd+bwd", "infer")
SLOWER = 0.91  # the summary lists rows where ours is more than 10 % slower
# Tight interior-point tolerances for the reference's active-set detection.
CLARABEL_REF = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=500)
ACTIVE_TOL = 1e-6  # |constraint slack| below this counts as active at the reference


@dataclass(frozen=True)
class Spec:
    """A problem: a fresh CVXPY build, a batch sampler, a per-sample reference in torch."""

    name: str
    size: str
    build: Callable[[], tuple[cp.Problem, list, list]]
    sample: Callable[[np.random.Generator, int], list[np.ndarray]]  # leading batch dim
    reference: Callable[[list[torch.Tensor]], list[torch.Tensor]]  # one sample


@cache
def _reference_problem(name: str):  # its own Parameters: the layers' are never touched
    return SPECS[name].build()


def _tight_solve(name: str, values: list[torch.Tensor]) -> np.ndarray:
    problem, params, variables = _reference_problem(name)
    return reference_solve(problem, params, [v.detach().numpy() for v in values], variables,
                           **CLARABEL_REF)[0]


# (a) ridge least squares in a box: a QP written as a cone program (SOC).
BOX_N, BOX_M, BOX_LAM = 30, 40, 0.1


def _box_build():
    A, b = cp.Parameter((BOX_M, BOX_N), name="A"), cp.Parameter(BOX_M, name="b")
    x = cp.Variable(BOX_N, name="x")
    obj = cp.sum_squares(A @ x - b) + BOX_LAM * cp.sum_squares(x)
    return cp.Problem(cp.Minimize(obj), [x >= -1, x <= 1]), [A, b], [x]


def _box_reference(p):
    """x_F = (A_Fᵀ A_F + λI)⁻¹ A_Fᵀ(b − A_U x_U) on the bounds found by Clarabel."""
    A, b = p
    x_star = _tight_solve("box-ls", p)
    fixed = torch.from_numpy(np.where(x_star > 1 - ACTIVE_TOL, 1.0, 0.0)
                             - np.where(x_star < -1 + ACTIVE_TOL, 1.0, 0.0))
    F = torch.from_numpy(np.flatnonzero(fixed.numpy() == 0))
    AF = A[:, F]
    xF = torch.linalg.solve(AF.T @ AF + BOX_LAM * torch.eye(F.numel(), dtype=A.dtype),
                            AF.T @ (b - A @ fixed))
    return [fixed.index_put((F,), xF)]


# (b) an LP with a box: the solution is a vertex, x = G_act⁻¹ h_act.
LP_N, LP_M = 20, 15


def _lp_build():
    c, A, b = (cp.Parameter(LP_N, name="c"), cp.Parameter((LP_M, LP_N), name="A"),
               cp.Parameter(LP_M, name="b"))
    x = cp.Variable(LP_N, name="x")
    return cp.Problem(cp.Minimize(c @ x), [A @ x <= b, x >= 0, x <= 1]), [c, A, b], [x]


def _lp_sample(rng, B):
    A = rng.standard_normal((B, LP_M, LP_N))
    b = A @ np.full(LP_N, 0.5) + rng.uniform(0.1, 1.0, (B, LP_M))  # x = ½ strictly feasible
    return [rng.standard_normal((B, LP_N)), A, b]


def _lp_reference(p):
    c, A, b = p
    eye = torch.eye(LP_N, dtype=A.dtype)
    G = torch.cat([A, -eye, eye])
    rhs = torch.cat([b, torch.zeros(LP_N, dtype=A.dtype), torch.ones(LP_N, dtype=A.dtype)])
    slack = rhs.detach().numpy() - G.detach().numpy() @ _tight_solve("lp", p)
    active = torch.from_numpy(np.flatnonzero(np.abs(slack) < ACTIVE_TOL))
    if active.numel() != LP_N:
        raise RuntimeError(f"LP reference: {active.numel()} active constraints, expected "
                           f"{LP_N} (degenerate vertex)")
    return [torch.linalg.solve(G[active], rhs[active]) + 0.0 * c.sum()]  # x is flat in c


# (c) an SOCP: minimize cᵀx s.t. ||Ax − b|| <= 1, so x = A⁻¹(b − w/||w||), w = A⁻ᵀc.
SOC_N = 20


def _soc_build():
    c, A, b = (cp.Parameter(SOC_N, name="c"), cp.Parameter((SOC_N, SOC_N), name="A"),
               cp.Parameter(SOC_N, name="b"))
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
        theta, z = cp.Parameter(n, name="theta"), cp.Variable(n, name="z")
        return cp.Problem(cp.Maximize(theta @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1]), \
            [theta], [z]

    return Spec(f"softmax-{n}", f"n={n}", build, lambda rng, B: [rng.standard_normal((B, n))],
                lambda p: [torch.softmax(p[0], dim=-1)])


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
    evals, V = torch.linalg.eigh((p[0] + p[0].T) / 2)
    return [(V * evals.clamp(min=0)) @ V.T]


SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("box-ls", f"n={BOX_N}, m={BOX_M}", _box_build,
         lambda rng, B: [rng.standard_normal((B, BOX_M, BOX_N)) / math.sqrt(BOX_M),
                         2.0 * rng.standard_normal((B, BOX_M))], _box_reference),
    Spec("lp", f"n={LP_N}, m={LP_M}+box", _lp_build, _lp_sample, _lp_reference),
    Spec("socp", f"n={SOC_N}", _soc_build, _soc_sample, _soc_reference),
    _softmax_spec(10),
    _softmax_spec(100),
    Spec("psd-proj", f"{PSD_K}x{PSD_K}", _psd_build, _psd_sample, _psd_reference),
]}


@dataclass
class Instance:
    """One problem at one batch size (1: unbatched inputs): layers, inputs, loss weights."""

    spec: Spec
    batch: int
    layers: dict[str, object]  # ours (conic), cvxpyl, auto (where it leaves the conic path)
    params: list[torch.Tensor]
    weights: list[torch.Tensor]


def make_instance(spec: Spec, batch: int, peer, with_auto: bool, seed: int = 0) -> Instance:
    problem, params, variables = spec.build()
    layers = {"ours": CvxpyLayer(problem, params, variables, backend="conic")}
    if peer is not None:
        layers["cvxpyl"] = peer.CvxpyLayer(problem, parameters=params, variables=variables)
    auto = CvxpyLayer(problem, params, variables) if with_auto else None
    if auto is not None and auto.backend != "conic":
        layers["auto"] = auto
    rng = np.random.default_rng(seed)
    values = [v if batch > 1 else v[0] for v in spec.sample(rng, batch)]
    lead = (batch,) if batch > 1 else ()
    weights = [torch.tensor(rng.standard_normal(lead + tuple(v.shape))) for v in variables]
    return Instance(spec, batch, layers, [torch.tensor(v, requires_grad=True) for v in values],
                    weights)


def auto_args(args: dict) -> dict:
    """The settings for the auto route: the tolerance, without diffcp's own keys."""
    return {k: v for k, v in args.items() if k not in ("solve_method", "mode")}


def reference(inst: Instance):
    """Per-sample closed forms, stacked: (outputs, gradients) of the instance's loss."""
    outs, grads = [], []
    for i in range(inst.batch) if inst.batch > 1 else [None]:
        p = [(t.detach() if i is None else t.detach()[i]).clone().requires_grad_()
             for t in inst.params]
        w = [wt if i is None else wt[i] for wt in inst.weights]
        o = inst.spec.reference(p)
        g = torch.autograd.grad(sum((wi * oi).sum() for wi, oi in zip(w, o)), p)
        outs.append([oi.detach() for oi in o])
        grads.append([gi.detach() for gi in g])
    if inst.batch == 1:
        return outs[0], grads[0]
    return [torch.stack(k) for k in zip(*outs)], [torch.stack(k) for k in zip(*grads)]


def _max_err(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@cache
def accuracy(name: str, batch: int, setting: str) -> dict[str, float | None]:
    inst, args = INSTANCES[(name, batch)], SETTINGS[setting]
    try:
        ref = reference(inst)
    except RuntimeError:  # e.g. a degenerate LP vertex: no closed form to compare with
        ref = None
    runs = {}
    for key, layer in inst.layers.items():
        try:
            outs, grads = h.layer_call(layer, inst.params, inst.weights,
                                       auto_args(args) if key == "auto" else args)()
            runs[key] = ([o.detach() for o in outs], grads)
        except Exception:  # its timing column reports the failure
            pass
    out: dict[str, float | None] = {}
    for key, (x, g) in runs.items() if ref is not None else ():
        out[f"sol err {key}"], out[f"grad err {key}"] = _max_err(x, ref[0]), _max_err(g, ref[1])
    if "cvxpyl" in runs:
        out["grad ours-cvxpyl"] = _max_err(runs["ours"][1], runs["cvxpyl"][1])
    return out


SOLUTION_COLS = ("sol err ours", "sol err cvxpyl", "sol err auto")
GRADIENT_COLS = ("grad err ours", "grad err cvxpyl", "grad ours-cvxpyl", "grad err auto")
INSTANCES: dict[tuple[str, int], Instance] = {}
AUTO_NOTE = ("ours auto: the default backend='auto' route (QP or entropy path) with the "
             "row's tolerance and no diffcp keys; '—' where auto is the conic path.")


def build_cases(args, peer, peer_note) -> list[h.Case]:
    cases = []
    for name in h.csv_list(args.problems, str, SPECS):
        for B in h.csv_list(args.batch, int):
            inst = INSTANCES[(name, B)] = make_instance(SPECS[name], B, peer, args.auto)
            for setting in h.csv_list(args.settings, str, SETTINGS):
                s = SETTINGS[setting]
                for pass_ in h.csv_list(args.passes, str, PASSES):
                    columns = {"ours": h.layer_call(inst.layers["ours"], inst.params,
                                                    inst.weights, s, pass_)}
                    columns["cvxpylayers"] = h.layer_call(inst.layers["cvxpyl"], inst.params,
                                                          inst.weights, s, pass_) \
                        if "cvxpyl" in inst.layers else None
                    if args.auto:
                        columns["ours auto"] = h.layer_call(inst.layers["auto"], inst.params,
                                                            inst.weights, auto_args(s), pass_) \
                            if "auto" in inst.layers else None
                    shown = GRADIENT_COLS if pass_ == "fwd+bwd" else SOLUTION_COLS

                    def extras(n=name, b=B, st=setting, shown=shown):
                        return {k: v for k, v in accuracy(n, b, st).items() if k in shown}

                    labels = {"problem": name, "size": SPECS[name].size, "B": str(B),
                              "solver_args": setting, "pass": pass_}
                    notes = ([peer_note] if peer_note else []) + ([AUTO_NOTE] if args.auto else [])
                    cases.append(h.Case(labels, columns, extras if pass_ != "infer" else None,
                                        notes))
    return cases


def main(argv=None) -> None:
    p = h.argument_parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--problems", default=",".join(SPECS), help=f"subset of {', '.join(SPECS)}")
    p.add_argument("--batch", default="1,16",
                   help="batch sizes; 1 means unbatched inputs (default 1,16)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help=f"subset of {', '.join(SETTINGS)}")
    p.add_argument("--passes", default="fwd,fwd+bwd", help=f"subset of {', '.join(PASSES)}")
    p.add_argument("--auto", action="store_true",
                   help="add a column for backend='auto' where it routes off the conic path")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, cProfile each column of the selected rows")
    args = p.parse_args(argv)
    if args.quick:
        args.problems, args.batch, args.settings, args.repeats = "socp,softmax-10", "1,4", \
            "default", 3
    h.setup(args.threads)
    peer, note = h.optional_import("cvxpylayers.torch")
    cases = h.select(build_cases(args, peer, note), args.filter)
    if args.profile:
        return h.emit(h.profile(cases, args.repeats), args.out, __file__)
    start = time.perf_counter()
    results = h.run(cases, repeats=args.repeats, warmup=args.warmup, collect=not args.no_gc)
    text = (h.header("Conic path vs cvxpylayers (SCS via diffcp, identical solver_args)", args,
                     ["cvxpy", "diffcp", "scs", "cvxpylayers", "numpy", "scipy"],
                     "; errors are max abs vs the closed-form reference")
            + h.markdown_table(results, "ours", [c for c in SOLUTION_COLS + GRADIENT_COLS
                                                 if args.auto or not c.endswith("auto")])
            + "\n" + "\n".join(h.ratio_summary(results, "cvxpylayers", "pass", SLOWER))
            + f"\n\n(total {time.perf_counter() - start:.0f} s)\n")
    h.emit(text, args.out, __file__)


if __name__ == "__main__":
    main()
