"""The batched conic interior point (`declarative.backends.cone`) against cvxpylayers.

    python benchmarks/bench_cone.py                         # B = 16 and 64, one thread
    python benchmarks/bench_cone.py --batch 16 --problems portfolio --repeats 9
    python benchmarks/bench_cone.py --filter "logistic | 64" --profile

Rows are (problem, batch); each row times forward + backward of the same loss
Σ w·x (x the problem's variable, w fixed random) in two columns, interleaved
in the same rounds (`harness`): ``ours`` (θ -> dense data -> `solve_cone` ->
the variable, gradients to the parameters by autograd through the engine's
implicit backward) and ``cvxpylayers`` (``cvxpylayers.torch.CvxpyLayer`` with
its defaults: diffcp, SCS at its default tolerance, LSQR adjoint).
``cvxpylayers / ours`` is the ratio of the medians: above 1 means we are
faster. torch runs on one thread (``torch.set_num_threads(1)``).

Accuracy (untimed, once per row): ``err ours`` and ``err cvxpyl`` are the
largest relative error of the solution over the batch against CVXPY +
Clarabel at 1e-10 (note: on second-order cones Clarabel's own x is only
~1e-6 accurate, its s and y being aligned only to √gap; ``kkt ours`` is the
largest violation of our point's optimality conditions, measured in numpy,
with the cone complementarity as the Jordan product s∘y).

Problems (parameters in brackets):

    socp-reg    min ‖Fx − g‖₂ + 0.1‖x‖₁ s.t. ‖x‖₂ ≤ 1               [F 20×10, g]
    portfolio   max μᵀw − ‖Lᵀw‖₂ s.t. 1ᵀw = 1, 0 ≤ w ≤ 0.25        [μ 20, L 20×20]
    robust-lp   min cᵀx s.t. aᵢᵀx + 0.2‖x‖₂ ≤ bᵢ, ‖x‖∞ ≤ 1          [c 10, a 15×10, b]
    logistic    min (1/N) Σ log(1 + exp(−yᵢ aᵢᵀθ)) + 0.1‖θ‖²       [a 30×5]
    maxent      max Σ entr(p) s.t. 1ᵀp = 1, l ≤ Fp ≤ u               [F 4×12, l, u]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import warnings
from pathlib import Path

import cvxpy as cp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from declarative.backends.cone import solve_cone  # noqa: E402
from declarative.backends.cone.data import ProgramData  # noqa: E402
from declarative.canon import compile_problem  # noqa: E402

CLARABEL_REF = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, tol_ktratio=1e-10,
                    max_iter=500)


# ---------------------------------------------------------------------------
# Problems: (CVXPY problem, parameters, variable, values(rng, B) -> arrays)
# ---------------------------------------------------------------------------


def socp_reg():
    n, m = 10, 20
    x, F, g = cp.Variable(n), cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(cp.norm(F @ x - g, 2) + 0.1 * cp.norm(x, 1)),
                      [cp.norm(x, 2) <= 1])

    def values(rng, B):
        Fv = rng.standard_normal((B, m, n))
        xt = rng.uniform(-0.4, 0.4, (B, n))
        return [Fv, np.einsum("bmn,bn->bm", Fv, xt) + 0.3 * rng.standard_normal((B, m))]
    return prob, [F, g], x, values


def portfolio():
    n = 20
    w, mu, L = cp.Variable(n), cp.Parameter(n), cp.Parameter((n, n))
    prob = cp.Problem(cp.Maximize(mu @ w - cp.norm(L.T @ w, 2)),
                      [cp.sum(w) == 1, w >= 0, w <= 0.25])

    def values(rng, B):
        return [rng.uniform(0.5, 1.5, (B, n)), 0.3 * rng.standard_normal((B, n, n))]
    return prob, [mu, L], w, values


def robust_lp():
    n, m = 10, 15
    x, c, a, b = cp.Variable(n), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(c @ x), [a @ x + 0.2 * cp.norm(x, 2) <= b, cp.abs(x) <= 1])

    def values(rng, B):
        return [rng.standard_normal((B, n)), rng.standard_normal((B, m, n)),
                rng.uniform(1.0, 2.0, (B, m))]
    return prob, [c, a, b], x, values


def logistic():
    N, n = 30, 5
    theta, a = cp.Variable(n), cp.Parameter((N, n))
    labels = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    loss = cp.sum(cp.logistic(-cp.multiply(labels, a @ theta))) / N
    prob = cp.Problem(cp.Minimize(loss + 0.1 * cp.sum_squares(theta)))

    def values(rng, B):
        return [rng.standard_normal((B, N, n)) + 0.5 * labels[None, :, None]]
    return prob, [a], theta, values


def maxent():
    n, k = 12, 4
    p, F, lo, hi = cp.Variable(n), cp.Parameter((k, n)), cp.Parameter(k), cp.Parameter(k)
    prob = cp.Problem(cp.Maximize(cp.sum(cp.entr(p))),
                      [cp.sum(p) == 1, F @ p >= lo, F @ p <= hi])

    def values(rng, B):
        Fv = rng.standard_normal((B, k, n))
        p0 = rng.dirichlet(np.ones(n), B)
        m0 = np.einsum("bkn,bn->bk", Fv, p0)
        return [Fv, m0 - rng.uniform(0.05, 0.2, (B, k)), m0 + rng.uniform(0.05, 0.2, (B, k))]
    return prob, [F, lo, hi], p, values


PROBLEMS = {"socp-reg": socp_reg, "portfolio": portfolio, "robust-lp": robust_lp,
            "logistic": logistic, "maxent": maxent}


# ---------------------------------------------------------------------------
# Columns
# ---------------------------------------------------------------------------


class Ours:
    """θ -> (A, b, c) -> solve_cone -> the variable, compiled once."""

    def __init__(self, prob, params, var):
        form = compile_problem(prob, params, [var]).form("conic")
        self.data = ProgramData(form.program)
        self.cone_dict = form.program.cone_dict
        self.R = torch.tensor(form.outputs[0].matrix.toarray())

    def __call__(self, *tensors):
        B = tensors[0].shape[0]
        theta = torch.cat([t.reshape(B, -1) for t in tensors]
                          + [torch.ones(B, 1, dtype=tensors[0].dtype)], 1)
        A, b, c = self.data(theta)
        (x, y, s), res = solve_cone(A, b, c, self.cone_dict)
        self.last = (A, b, c, x, y, s, res)
        return x @ self.R.T


def fwd_bwd(layer, values, weight, unpack=False):
    def run():
        tensors = [torch.tensor(v, requires_grad=True) for v in values]
        out = layer(*tensors)
        out = out[0] if unpack else out
        return torch.autograd.grad((weight * out).sum(), tensors)
    return run


def reference(prob, params, var, values):
    out = []
    for i in range(values[0].shape[0]):
        for p, v in zip(params, values):
            p.value = v[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prob.solve(solver=cp.CLARABEL, **CLARABEL_REF)
        out.append(np.asarray(var.value).ravel())
    return np.stack(out)


def max_rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(max(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12) for x, y in zip(a, b)))


def kkt_ours(ours: Ours) -> float:
    """Largest violation of the optimality conditions of our points (numpy)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_cone_engine import kkt_violation

    A, b, c, x, y, s, _ = ours.last
    worst = 0.0
    for i in range(b.shape[0]):
        Ai = A if A.dim() == 2 else A[i]
        worst = max(worst, kkt_violation(Ai.detach(), b[i].detach(), c[i].detach(),
                                         ours.cone_dict, x[i].detach(), y[i].detach(),
                                         s[i].detach()))
    return worst


def make_case(name: str, B: int, peer) -> harness.Case:
    prob, params, var, values_fn = PROBLEMS[name]()
    rng = np.random.default_rng(0)
    values = values_fn(rng, B)
    ours = Ours(prob, params, var)
    weight = torch.tensor(rng.standard_normal((B, var.size)))
    columns = {"ours": fwd_bwd(ours, values, weight)}
    notes = []
    if peer is not None:
        layer = peer.CvxpyLayer(prob, params, [var])
        columns["cvxpylayers"] = fwd_bwd(layer, values, weight, unpack=True)
    else:
        columns["cvxpylayers"] = None

    def extras():
        ref = reference(prob, params, var, values)
        tensors = [torch.tensor(v) for v in values]
        out = {"err ours": max_rel(ours(*tensors).detach(), ref), "kkt ours": kkt_ours(ours),
               "iters ours": float(ours.last[-1].iterations.float().mean())}
        if peer is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (xp,) = layer(*tensors)
            out["err cvxpyl"] = max_rel(xp.detach(), ref)
        return out

    return harness.Case({"problem": name, "B": str(B)}, columns, extras, notes)


def main(argv=None):
    p = harness.argument_parser(__doc__.splitlines()[0], repeats=7, warmup=2)
    p.add_argument("--batch", default="16,64", help="batch sizes (default 16,64)")
    p.add_argument("--problems", default=",".join(PROBLEMS),
                   help=f"comma-separated, from {list(PROBLEMS)}")
    p.add_argument("--profile", action="store_true", help="profile our column of each case")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    peer, note = harness.optional_import("cvxpylayers.torch")
    cases = [make_case(name, B, peer)
             for name in harness.csv_list(args.problems, allowed=PROBLEMS)
             for B in harness.csv_list(args.batch, int)]
    cases = harness.select(cases, args.filter)
    if args.profile:
        for case in cases:
            case.columns["ours"]()
            prof = cProfile.Profile()
            prof.runcall(case.columns["ours"])
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
            print(case.name, text.getvalue())
        return
    results = harness.run(cases, repeats=args.repeats, warmup=args.warmup,
                          collect=not args.no_gc)
    table = harness.markdown_table(results, baseline="ours",
                                   extra_columns=["err ours", "err cvxpyl", "kkt ours",
                                                  "iters ours"])
    ratios = [harness.ratio(r, "cvxpylayers", "ours") for r in results]
    ratios = [q for q in ratios if q]
    summary = ""
    if ratios:
        gm = float(np.exp(np.mean(np.log(ratios))))
        summary = (f"\ncvxpylayers / ours: geometric mean {gm:.1f}x, smallest "
                   f"{min(ratios):.1f}x over {len(ratios)} rows\n")
    env = harness.environment(["cvxpy", "cvxpylayers", "diffcp", "scs", "clarabel"])
    harness.emit(f"{env}\n\n{table}{summary}" + (f"\n{note}\n" if note else ""), args.out)


if __name__ == "__main__":
    main()
