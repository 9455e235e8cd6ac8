"""CvxpyLayer vs its peers on problems written in CVXPY as users write them.

    python benchmarks/bench_layers.py                   # the front door: auto route, 14 families
    python benchmarks/bench_layers.py --suite conic     # forced onto diffcp + SCS, same solver_args
    python benchmarks/bench_layers.py --suite entropy --threads 1   # softmax, sparsemax vs torch
    python benchmarks/bench_layers.py --quick           # B = 1, 4, 2 rounds, memory at B <= 32
    python benchmarks/bench_layers.py --families lasso,relu-200 --batch 16 --repeats 5

A suite (frontdoor, conic, cone, qp, sparse, warmstart, entropy, transport) fixes
the route ours takes (`backend=`), its families (`families.FAMILIES`), batch
sizes, solver_args settings, passes, threads and peer columns (cvxpylayers with
the row's solver_args and its own; torch's direct solution; qpth); every option
overrides it. With --threads N, torch runs N threads and diffcp's worker pools N
workers. Errors (untimed): max |x − x_ref| over the first --ref-samples samples,
x_ref a closed form where the family has one (then also the gradient's error
against autograd through it), else CVXPY's QP form polished on its active set,
else Clarabel at 1e-12. --memory rows run each library in a fresh process: the
time and memory of building the layer and of its calls. Suites, columns and
references: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import cvxpy as cp
import harness as h
import numpy as np
import torch
from families import FAMILIES
from references import qp_polished_reference, reference_solve

from declarative.torch import CvxpyLayer

CLARABEL_REF = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10,
                    max_iter=500)
MEMORY_TIMEOUT = 900  # seconds for one fresh-process row of the memory table
SCS = {"solve_method": "SCS"}  # left alone, diffcp picks ECOS without PSD or exp cones


@dataclass(frozen=True)
class Suite:
    """What a suite times: ours forced onto ``backend``, its families and batches, the
    solver_args settings (given to every column), the peer columns (cvxpylayers with
    these solver_args on top), and the defaults of the options."""

    title: str
    backend: str
    families: str
    batch: str
    threads: int | None
    repeats: int
    warmup: int = 1
    settings: dict[str, dict] = field(default_factory=lambda: {"default": {}})
    peers: dict[str, dict] = field(default_factory=lambda: {"cvxpylayers": {}})
    passes: str = "fwd+bwd"
    memory: str = ""  # rows family@batch of the fresh-process time and memory table
    warm_steps: int = 0  # > 0: a drifting sequence of that many problems, warm vs cold
    torch: bool = False  # a column solving the problem directly in torch (`torch_form`)
    qpth: bool = False  # a qpth column where the family has a `qp_form`
    # (rounds, rounds on `large` families) of slow peers timed apart (`harness.Case`).
    peer_rounds: tuple[int, int] | None = None
    large: str = ""


ENTROPY_PEERS = {"cvxpyl SCS": SCS | {"eps": 1e-8, "max_iters": 100_000},
                 "cvxpyl Clarabel": h.CVXPYL_CLARABEL_TIGHT}
SUITES = {
    "frontdoor": Suite(
        "Front door: CvxpyLayer (auto) vs cvxpylayers, forward + backward", "auto",
        "box-ls,lasso,huber,elastic-net,mpc-10,mpc-30,markowitz,svm,relu-200,relu-2000,"
        "tv-100,tv-1000,socp,logistic", "1,16,64", 1, 3,
        peers={"cvxpylayers": {}, "cvxpyl tight": h.CVXPYL_CLARABEL_TIGHT}, memory="relu-200@300"),
    "conic": Suite(
        "Conic route vs cvxpylayers (SCS via diffcp, identical solver_args)", "conic",
        "ridge-box,lp,socp,softmax-10,softmax-100,psd-proj", "1,16", None, 5,
        settings={"default": SCS, "eps=1e-8": SCS | {"eps": 1e-8}, "lsqr": SCS | {"mode": "lsqr"},
                  "dense": SCS | {"mode": "dense"}}, passes="fwd,fwd+bwd"),
    "cone": Suite(
        "The batched cone engine (cone route) vs cvxpylayers", "cone",
        "socp-reg,portfolio,robust-lp,logistic-30,maxent", "16,64", 1, 7, warmup=2),
    "qp": Suite(
        "Dense QPs (OptNet's shape): CvxpyLayer (auto) vs cvxpylayers with SCS", "auto",
        "qp-0,qp-50", "16", None, 3, peers={"cvxpylayers": SCS}),
    # Build time and memory where a dense parameter would not fit. cvxpylayers on Clarabel:
    # SCS at its defaults takes thousands of iterations on this problem's cone form.
    "sparse": Suite(
        "Sparse parameters: building and calling the layer", "auto", "", "1", 1, 1,
        peers={"cvxpylayers": {"solve_method": "Clarabel"}},
        memory="ls-250@1,ls-500@1,sparse-ls-1000@1,sparse-ls-2000@1,sparse-ls-4000@1"),
    "warmstart": Suite(
        "Warm starts on slowly drifting parameters: warm-started (ours) vs cold", "auto",
        "mpc-10,ot-20x20", "16", None, 3, warm_steps=20,
        settings={"default": {}, "eps=1e-6": {"eps": 1e-6, "max_iters": 20_000}}),
    "entropy": Suite(
        "Softmax and sparsemax: CvxpyLayer (auto) vs torch, qpth and cvxpylayers", "auto",
        "softmax-10,softmax-100,softmax-1000,sparsemax-10,sparsemax-100,sparsemax-1000", "16",
        None, 15, peers=ENTROPY_PEERS, torch=True, qpth=True, peer_rounds=(3, 2),
        large="softmax-1000,sparsemax-1000"),
    # SCS at eps 1e-8 takes about a minute a call on the transport problem: 1e-6.
    "transport": Suite(
        "Entropic transport: CvxpyLayer (auto) vs log-domain Sinkhorn and cvxpylayers", "auto",
        "ot-50x50", "2", None, 15, torch=True, peer_rounds=(2, 2), large="ot-50x50",
        peers=ENTROPY_PEERS | {"cvxpyl SCS": ENTROPY_PEERS["cvxpyl SCS"] | {"eps": 1e-6}}),
}
DEFAULT_SETTINGS = {"conic": "default,eps=1e-8,lsqr", "warmstart": "default"}


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


def reference(name: str, values: list[np.ndarray], w: np.ndarray):
    """One sample: (x_ref, the gradient of Σ w·x_ref in each parameter, or None)."""
    fam = FAMILIES[name]
    if fam.closed_form is not None:
        p = [torch.tensor(v, requires_grad=True) for v in values]
        x = fam.closed_form(p)
        return x.detach().numpy(), [g.numpy() for g in torch.autograd.grad(
            (torch.as_tensor(w) * x).sum(), p, allow_unused=True, materialize_grads=True)]
    problem, params, (x,) = _reference_problem(name)
    if problem.is_qp():
        with contextlib.suppress(RuntimeError, np.linalg.LinAlgError):
            return qp_polished(problem, params, values, x), None
    for tol in (1e-12, 1e-10, 1e-8):  # the tightest Clarabel reaches (SOCs stop short)
        with contextlib.suppress(RuntimeError):
            opts = dict(tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
            return reference_solve(problem, params, values, [x], **CLARABEL_REF | opts)[0], None
    raise RuntimeError("no reference: Clarabel fails at tolerance 1e-8")


@dataclass
class Row:
    """One family at one batch (1: unbatched inputs) and setting: each column as a
    function of the pass; ours' layer and arguments, the inputs and loss weights."""

    name: str
    batch: int
    columns: dict[str, Callable[[str], Callable] | None]
    ours: tuple[object, dict]
    tensors: list[torch.Tensor]
    weights: list[torch.Tensor]


def _route_taken(layer, tensors) -> str:
    """The route a call of this batch takes once the layer has seen two (untimed)
    calls: auto chooses per call, and corrects its prediction from what a call
    measured (`declarative.routes.cost`)."""
    info = None
    for _ in range(2):
        _, info = layer(*[t.detach() for t in tensors], return_info=True)
    return info.backend


def accuracy(row: Row, ref_samples: int) -> dict:
    """Per column: max |x − x_ref| (and of the gradient where x_ref is a closed form)
    over the first ref_samples samples; ours' mean iteration count."""
    def batched(t):  # numpy, with the batch dimension that B = 1 leaves out
        a = t.detach().numpy()
        return a[None] if row.batch == 1 else a

    values, w = [batched(t) for t in row.tensors], batched(row.weights[0])
    refs = [reference(row.name, [v[i] for v in values], w[i])
            for i in range(min(row.batch, ref_samples))]
    out = {}
    for col, column in row.columns.items():
        if column is None:
            continue
        (x,), grads = column("fwd+bwd")()
        x = x.detach().numpy().reshape((row.batch,) + refs[0][0].shape)
        out[f"err {col}"] = max(float(np.abs(x[i] - r).max()) for i, (r, _) in enumerate(refs))
        if refs[0][1] is not None:
            g = [gi.numpy().reshape((row.batch,) + r.shape) for gi, r in zip(grads, refs[0][1])]
            out[f"grad err {col}"] = max(float(np.abs(gi[i] - r).max()) for i, (_, rg) in
                                         enumerate(refs) for gi, r in zip(g, rg))
    layer, args = row.ours
    _, info = layer(*[t.detach() for t in row.tensors], solver_args=args, return_info=True)
    out["iters ours"] = f"{np.mean(np.asarray(info.iterations, dtype=float)):.1f}"
    return out


def make_columns(name, ours, theirs, tensors, w, args, suite: Suite, jobs: dict, qpth_qp,
                 route: str, notes: list[str]):
    """ours, then torch, qpth and the cvxpylayers columns where the suite has them:
    each a function of the pass (a qpth column's thread note goes to ``notes``)."""
    fam, grad_inputs = FAMILIES[name], [t for t in tensors if t.requires_grad]
    ours_args = args | (jobs if route == "conic" else {})
    columns = {"ours": lambda pass_: h.layer_call(ours, tensors, w, ours_args, pass_)}
    if suite.torch:
        form = fam.torch_form or fam.closed_form
        columns["torch"] = lambda pass_: h.fwd_bwd(lambda: form(tensors), grad_inputs, w, pass_)
    if suite.qpth and fam.qp_form is not None:
        threads, note = h.qpth_threads(name, fam.qp_form(tensors)[2].shape[-2] + 1)
        notes += [note] if note else []
        solve = None if qpth_qp is None else qpth_qp.QPFunction(verbose=-1, maxIter=100)
        columns["qpth"] = None if solve is None else lambda pass_: h.with_threads(h.fwd_bwd(
            lambda: solve(*fam.qp_form(tensors)), grad_inputs, w, pass_), threads)
    for peer, extra in suite.peers.items():
        columns[peer] = None if theirs is None else (
            lambda pass_, a=args | extra | jobs: h.layer_call(theirs, tensors, w, a, pass_))
    return columns, (ours, ours_args)


def warm_case(ours, tensors, args: dict, steps: int, labels: dict) -> h.Case:
    """The first parameter drifts by a small random walk over ``steps`` problems, each
    solved warm-started from the previous step's solution (``ours``) or cold; extras:
    mean iterations per call after the first step, the largest |warm − cold|."""
    walk = np.random.default_rng(1).standard_normal((steps,) + tuple(tensors[0].shape))
    drift = torch.tensor(0.02 * walk).cumsum(0)
    rest = [t.detach() for t in tensors[1:]]

    def loop(warm: bool):
        def run():
            info, out = None, []
            for d in drift:
                start = info if warm and info is not None else False
                (x,), info = ours(tensors[0].detach() + d, *rest, solver_args=args,
                                  return_info=True, warm_start=start)
                out.append((x, np.mean(np.asarray(info.iterations, dtype=float))))
            return out
        return run

    def extras():
        warm, cold = loop(True)(), loop(False)()
        return {"iters cold": f"{np.mean([i for _, i in cold[1:]]):.1f}",
                "iters ours": f"{np.mean([i for _, i in warm[1:]]):.1f}",
                "max |warm − cold|": max(float((a - b).abs().max())
                                         for (a, _), (b, _) in zip(warm, cold))}

    return h.Case(labels, {"ours": loop(True), "cold": loop(False)}, extras)


def build_cases(args, suite: Suite, peer, qpth_qp, notes) -> list[h.Case]:
    jobs = {"n_jobs_forward": args.threads, "n_jobs_backward": args.threads} if args.threads \
        else {}
    top, cases, large = max(args.batch), [], suite.large.split(",")
    for name in args.families:
        fam = FAMILIES[name]
        problem, params, variables = fam.build()
        ours = CvxpyLayer(problem, params, variables, backend=args.backend or suite.backend)
        theirs = None if peer is None else peer.CvxpyLayer(problem, params, variables)
        full = fam.sample(np.random.default_rng(args.seed), top)
        for B in args.batch:
            values = [v[:B] if B > 1 else v[0] for v in full]  # B = 1: unbatched inputs
            k = len(values) if fam.differentiable is None else fam.differentiable
            tensors = [torch.tensor(v, requires_grad=i < k) for i, v in enumerate(values)]
            w = [torch.tensor(np.random.default_rng([args.seed, 1]).standard_normal(
                ((B,) if B > 1 else ()) + variables[0].shape))]
            route = _route_taken(ours, tensors)
            for setting in args.settings:
                labels = {"family": name, "size": fam.size, "B": str(B), "route": route}
                labels |= {"solver_args": setting} if len(args.settings) > 1 else {}
                if suite.warm_steps:
                    cases.append(warm_case(ours, tensors, suite.settings[setting],
                                           suite.warm_steps, labels))
                    continue
                row_notes = list(notes)
                columns, ours_args = make_columns(name, ours, theirs, tensors, w,
                                                  suite.settings[setting], suite, jobs, qpth_qp,
                                                  route, row_notes)
                row = Row(name, B, columns, ours_args, tensors, w)
                acc = cache(lambda r=row: accuracy(r, args.ref_samples))
                rounds = None if suite.peer_rounds is None else (
                    (suite.peer_rounds[1], 0) if name in large
                    else (suite.peer_rounds[0], args.warmup))
                for pass_ in args.passes:
                    row_labels = labels | ({"pass": pass_} if len(args.passes) > 1 else {})
                    cases.append(h.Case(row_labels, {c: f and f(pass_) for c, f in columns.items()},
                                        None if pass_ == "infer" else acc, row_notes, rounds))
    return cases


def pivot(results, peer: str, batches) -> str:
    """``peer / ours`` per row (family, setting, pass) and batch (columns)."""
    cells: dict[str, dict[str, str]] = {}
    for r in results:
        q, key = h.ratio(r, peer, "ours"), dict(r.case.labels)
        row = " ".join([key.pop("family")] + [v for k, v in key.items()
                                              if k in ("solver_args", "pass")])
        cells.setdefault(row, {})[key["B"]] = "—" if q is None else f"{q:.2f}"
    head = ["row"] + [f"B={b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(batches)]
    lines += ["| " + " | ".join([f] + [row.get(str(b), "") for b in batches]) + " |"
              for f, row in cells.items()]
    return f"### {peer} / ours\n\n" + "\n".join(lines) + "\n"


def _memory_child(spec: dict) -> dict:
    """One library on one family at batch B in this fresh process: the time and peak
    memory (RSS) growth of building the layer and of its first call, the time of the
    second call. A Parameter with a sparsity pattern gets a torch sparse tensor."""
    torch.set_num_threads(spec["threads"])
    fam, B = FAMILIES[spec["family"]], spec["batch"]
    problem, params, variables = fam.build()
    base, start = h.peak_rss_mb(), time.perf_counter()
    if spec["lib"] == "ours":
        layer = CvxpyLayer(problem, params, variables, backend=spec["backend"])
    else:
        from cvxpylayers.torch import CvxpyLayer as Peer

        layer = Peer(problem, params, variables)
    out = {"build_s": time.perf_counter() - start, "build_mb": h.peak_rss_mb() - base,
           "route": getattr(layer, "backend", "diffcp")}
    values = [v if B > 1 else v[0] for v in fam.sample(np.random.default_rng(0), B)]
    tensors = [(torch.tensor(v).to_sparse().coalesce() if p.attributes.get("sparsity")
                else torch.tensor(v)).requires_grad_() for p, v in zip(params, values)]
    call = h.layer_call(layer, tensors, [torch.ones(((B,) if B > 1 else ()) + variables[0].shape,
                                                    dtype=torch.float64)], spec["args"])
    base, start = h.peak_rss_mb(), time.perf_counter()
    _, grads = call()
    out |= {"first_s": time.perf_counter() - start, "call_mb": h.peak_rss_mb() - base}
    start = time.perf_counter()
    call()
    g = grads[0]
    return out | {"second_s": time.perf_counter() - start, "grad": (
        f"sparse ({g._nnz()} nonzeros)" if g.is_sparse else f"dense ({g.numel()} entries)")}


def memory_table(args, suite: Suite, libs) -> str:
    """`_memory_child` of each library on each --memory row (family@batch)."""
    lines = ["| library | family | B | route | build (s) | build peak growth (MB) | first call "
             "(s) | its peak growth (MB) | second call (s) | gradient |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    jobs = {"n_jobs_forward": args.threads or 1, "n_jobs_backward": args.threads or 1}
    for family, batch in (row.split("@") for row in h.csv_list(args.memory)):
        setting, peer = suite.settings[args.settings[0]], next(iter(suite.peers.values()))
        for lib in libs:
            spec = {"lib": lib, "family": family, "batch": int(batch), "backend": suite.backend,
                    "threads": args.threads or 1,
                    "args": setting | ({} if lib == "ours" else peer | jobs)}
            ok, r = h.run_child(__file__, spec, MEMORY_TIMEOUT)
            lines.append(f"| {lib} | {family} | {batch} | " + (
                f"{r['route']} | {r['build_s']:.1f} | {r['build_mb']:.0f} | {r['first_s']:.2f} | "
                f"{r['call_mb']:.0f} | {r['second_s']:.2f} | {r['grad']} |" if ok
                else f"failed: {r} | | | | | | |"))
    return "\n".join(lines) + "\n"


def parse(argv) -> tuple[argparse.Namespace, Suite]:
    p = h.argument_parser(__doc__.splitlines()[0], repeats=None, warmup=None)
    p.add_argument("--suite", default="frontdoor", choices=sorted(SUITES))
    p.add_argument("--repeats", type=int, help="timed rounds per row (default: the suite's)")
    p.add_argument("--warmup", type=int, help="untimed calls per column (default: the suite's)")
    p.add_argument("--filter", default=None, help="only rows whose labels contain this text")
    p.add_argument("--no-gc", action="store_true", help="no gc.collect() before timed calls")
    p.add_argument("--backend", help="the route ours is forced onto (default: the suite's)")
    p.add_argument("--families", help=", ".join(FAMILIES))
    p.add_argument("--batch", help="batch sizes; 1: unbatched inputs")
    p.add_argument("--settings", help="solver_args settings of the suite (conic: default, "
                   "eps=1e-8, lsqr, dense)")
    p.add_argument("--passes", help="fwd, fwd+bwd, infer")
    p.add_argument("--ref-samples", type=int, default=4, help="samples checked (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", help="rows family@batch of the memory table ('' skips it)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile each column of the selected rows")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.set_defaults(threads=-1)  # -1: the suite's
    args = p.parse_args(argv)
    suite = SUITES[args.suite]
    args.threads = suite.threads if args.threads == -1 else args.threads
    for key in ("families", "batch", "passes", "repeats", "warmup", "memory"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(suite, key))
    args.settings = args.settings or DEFAULT_SETTINGS.get(args.suite, ",".join(suite.settings))
    if args.quick:
        args.batch, args.repeats, args.ref_samples = "1,4", 2, 2
        args.memory = ",".join(f"{r.split('@')[0]}@{min(int(r.split('@')[1]), 32)}"
                               for r in h.csv_list(args.memory))
    args.families = h.csv_list(args.families, str, FAMILIES)
    args.batch = h.csv_list(args.batch, int)
    args.settings = h.csv_list(args.settings, str, suite.settings)
    args.passes = h.csv_list(args.passes, str, {"fwd", "fwd+bwd", "infer"})
    return args, suite


def main(argv=None) -> None:
    args, suite = parse(argv)
    if args.child:
        return print(json.dumps(_memory_child(json.loads(args.child))))
    h.setup(args.threads)
    report = f"bench_layers_{args.suite}"  # benchmarks/results/<this>.md
    peer, note = h.optional_import("cvxpylayers.torch")
    qpth_qp, qpth_note = h.optional_import("qpth.qp") if suite.qpth else (None, None)
    cases = h.select(build_cases(args, suite, peer, qpth_qp, [n for n in (note, qpth_note) if n]),
                     args.filter)
    if args.profile:
        return h.emit(h.profile(cases, args.repeats), args.out, report)
    start = time.perf_counter()
    results = h.run(cases, args.repeats, args.warmup, not args.no_gc)
    cols = list(dict.fromkeys(c for case in cases for c in case.columns))
    text = h.header(f"{suite.title} ({args.suite} suite)", args,
                    ["cvxpy", "cvxpylayers", "diffcp", "scs", "ecos", "clarabel", "numpy"],
                    f"; err: max |x − x_ref| over the first {args.ref_samples} samples")
    if results:
        text += h.markdown_table(results, "ours", [f"{e} {c}" for e in ("err", "grad err")
                                                   for c in cols] + ["iters ours"] + (
            ["iters cold", "max |warm − cold|"] if suite.warm_steps else []))
        text += "\n## Summary\n\n" + "\n".join(pivot(results, c, args.batch) for c in cols[1:])
    for c in cols[1:]:
        lines = h.ratio_summary(results, c)[:1] + h.ratio_summary(results, c, "B")
        if len(args.passes) > 1:
            lines += h.ratio_summary(results, c, "pass")[:-1]
        text += "\n" + "\n".join(lines)
    if args.memory:
        text += ("\n\n## Each library in a fresh process: time and memory\n\n"
                 + memory_table(args, suite, ["ours"] + (["cvxpylayers"] if peer else [])))
    h.emit(text + f"\n(total {time.perf_counter() - start:.0f} s)\n", args.out, report)


if __name__ == "__main__":
    main()
