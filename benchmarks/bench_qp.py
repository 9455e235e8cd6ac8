"""Dense QP: declarative.QPFunction vs qpth's QPFunction vs cvxpylayers.

    python benchmarks/bench_qp.py                  # B = 128, 2–5 min on 2 cores
    python benchmarks/bench_qp.py --threads 1      # steadier on a busy shared machine
    python benchmarks/bench_qp.py --quick          # B = 32, a smoke run (about 30 s)
    python benchmarks/bench_qp.py --neq 0 --modes all --profile
    python benchmarks/bench_qp.py --device cuda --dtype float32 --cvx-batch 0

``minimize ½ zᵀQz + pᵀz s.t. Gz ≤ h, Az = b``, n = 100, 100 inequalities, 0 or
50 equalities, every input batched ("all") or only p, h ("shared"); ``fwd`` and
``fwd+bwd`` (``autograd.grad`` of ``sum(w * z)`` in every input). The data,
the peers' settings (qpth's batched-LU probe, cvxpylayers on ½‖Lz‖²) and the
accuracy columns are described in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import time

import harness as h
import numpy as np
import torch
from references import central_differences, qp_polished_reference, qp_reference, random_qp_arrays
from references import rel_err as _rel

from declarative import QPFunction

N, NINEQ = 100, 100
QPTH_MAXITER = 100
GARBAGE_TOL = 1e-4  # a qpth z this far from ours is garbage, not round-off
# Clarabel's own answer (the "Clarabel raw err" column) at these tolerances.
CLARABEL_TIGHT = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12,
                      tol_ktratio=1e-10, max_iter=500)
FD_EPS, FD_STEP, FD_BATCH = 1e-12, 1e-5, 2
NAMES = ("Q", "p", "G", "h", "A", "b")
SHARED = ("Q", "G", "A", "b")  # unbatched in mode "shared"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
FWD_COLS = ("z err ours", "z err qpth", "Clarabel raw err", "ours iters", "qpth iters")
BWD_COLS = ("grad FD rel (ours)", "worst input", "grad ours-qpth rel")


class Instance:
    """One QP family at one batch size: numpy data, the six torch inputs, weights."""

    def __init__(self, neq, mode, batch, data, weights, device="cpu", dtype=torch.float64):
        self.neq, self.mode, self.batch, self.data = neq, mode, batch, data
        self.device, self.dtype, self.cache = device, dtype, {}
        self.inputs = [torch.empty(0, dtype=dtype, device=device) if neq == 0 and k in "Ab"
                       else torch.tensor(data[k], dtype=dtype, device=device, requires_grad=True)
                       for k in NAMES]
        self.weights = torch.tensor(weights, dtype=dtype, device=device)

    def is_batched(self, name: str) -> bool:
        return not (self.mode == "shared" and name in SHARED)

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return {k: (v[i] if self.is_batched(k) else v) for k, v in self.data.items()}

    def grad_inputs(self) -> list[torch.Tensor]:
        return [t for t in self.inputs if t.requires_grad]

    def grad_names(self) -> list[str]:
        return [k for k, t in zip(NAMES, self.inputs) if t.requires_grad]

    def sliced(self, k: int) -> Instance:
        """The first k samples (shared inputs stay shared), fresh tensors."""
        data = {n: (v[:k] if self.is_batched(n) else v) for n, v in self.data.items()}
        return Instance(self.neq, self.mode, k, data, self.weights[:k].cpu().numpy(),
                        self.device, self.dtype)


def make_instance(neq, mode, batch, device="cpu", dtype=torch.float64, seed=0) -> Instance:
    """Q = LLᵀ/n + 0.1 I, G, A Gaussian/√n, h = Gz₀ + U(0.1, 1), b = Az₀, p Gaussian."""
    d = random_qp_arrays([seed, neq, 0 if mode == "all" else 1], N, NINEQ, neq, batch,
                         SHARED if mode == "shared" else (), ridge=0.1,
                         row_scale=1 / math.sqrt(N), z0_scale=0.5, slack=(0.1, 0.9),
                         q_scale=1.0)
    data = {("p" if k == "q" else k): v for k, v in d.items()}
    weights = np.random.default_rng([seed, 99]).standard_normal((batch, N))
    return Instance(neq, mode, batch, data, weights, device, dtype)


def ours_fn(eps: float | None = None):
    return QPFunction(verbose=-1, eps=eps)


def qpth_fn(qpth_qp):
    return qpth_qp.QPFunction(verbose=-1, maxIter=QPTH_MAXITER)


def make_call(fn, inst: Instance, pass_: str, check: torch.Tensor | None = None):
    """A timed column; ``check`` (ours' z): a non-finite z or one further than
    GARBAGE_TOL from it raises, so a broken peer is reported, not timed."""
    sync = torch.cuda.synchronize if inst.device != "cpu" else (lambda: None)
    tol = GARBAGE_TOL * (1 if inst.dtype == torch.float64 else 1e3)

    def call():
        z = fn(*inst.inputs)
        if check is not None:
            err = float((z.detach() - check).abs().max())
            if not bool(torch.isfinite(z).all()) or err > tol:
                raise RuntimeError(f"garbage output: max |z - z_ours| = {err:.3g}")
        out = z if pass_ == "fwd" else torch.autograd.grad((inst.weights * z).sum(),
                                                           inst.grad_inputs())
        sync()  # CUDA kernels are asynchronous: the time must include them
        return out

    return call


class CvxpyLayersQP:
    """cvxpylayers on the instance's QP: ½‖Lz‖² + pᵀz, L = chol(Q)ᵀ as the parameter
    (diffcp refuses a parametric quad_form)."""

    def __init__(self, peer, inst: Instance):
        import cvxpy as cp

        neq = inst.neq
        z = cp.Variable(N, name="z")
        self.names = ["L", "p", "G", "h"] + (["A", "b"] if neq else [])
        shapes = {"L": (N, N), "p": N, "G": (NINEQ, N), "h": NINEQ, "A": (neq, N), "b": neq}
        P = {k: cp.Parameter(shapes[k], name=k) for k in self.names}
        cons = [P["G"] @ z <= P["h"]] + ([P["A"] @ z == P["b"]] if neq else [])
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(P["L"] @ z) + P["p"] @ z), cons)
        self.layer = peer.CvxpyLayer(problem, parameters=list(P.values()), variables=[z])
        values = dict(inst.data, L=np.swapaxes(np.linalg.cholesky(inst.data["Q"]), -1, -2))
        self.inputs = [torch.tensor(values[k], dtype=torch.float64, requires_grad=True)
                       for k in self.names]
        self.weights = inst.weights

    def __call__(self):
        (z,) = self.layer(*self.inputs, solver_args={"solve_method": "SCS"})
        return z

    def call(self, pass_: str):
        return self if pass_ == "fwd" else (
            lambda: torch.autograd.grad((self.weights * self()).sum(), self.inputs))


def _probe_main(spec: dict) -> None:
    """qpth's LU-trap probe (a subprocess): 3 fwd+bwd calls checked against ours."""
    torch.set_num_threads(spec["threads"])
    qpth_qp, note = h.optional_import("qpth.qp")
    if qpth_qp is None:
        raise SystemExit(note)
    inst = make_instance(spec["neq"], spec["mode"], spec["batch"])
    call = make_call(qpth_fn(qpth_qp), inst, "fwd+bwd", check=ours_fn()(*inst.inputs).detach())
    for _ in range(3):
        if not all(bool(torch.isfinite(g).all()) for g in call()):
            raise SystemExit("non-finite gradient")
    print('"ok"')


def reference_z(inst: Instance, i: int) -> np.ndarray:
    """Sample i: Clarabel polished on its active set (`references.qp_polished_reference`),
    or Clarabel's own z where the polish fails its KKT check. Caches max
    |z_Clarabel − z_ref| for the "Clarabel raw err" column."""
    if ("ref", i) not in inst.cache:
        d = inst.sample(i)
        raw = qp_reference(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"], CLARABEL_TIGHT)[0]
        try:
            ref = qp_polished_reference(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"])[0]
        except RuntimeError:
            ref = raw
        inst.cache[("ref", i)], inst.cache[("raw", i)] = ref, float(np.abs(raw - ref).max())
    return inst.cache[("ref", i)]


def z_error(inst: Instance, z: torch.Tensor, samples: int) -> float:
    z = z.detach().double().cpu().numpy()
    return max(float(np.abs(z[i] - reference_z(inst, i)).max())
               for i in range(min(samples, z.shape[0])))


def solve_and_grad(fn, inst: Instance):
    z = fn(*inst.inputs)
    return z.detach(), [g.detach() for g in torch.autograd.grad((inst.weights * z).sum(),
                                                                inst.grad_inputs())]


def fd_check(inst: Instance, coords: int, seed: int = 0) -> tuple[float, str]:
    """Ours vs central differences (re-solved by ours at eps 1e-12) on ``coords``
    non-negligible entries of each input, on a sub-batch: (worst relative error, input)."""
    sub = inst.sliced(min(FD_BATCH, inst.batch))
    _, grads = solve_and_grad(ours_fn(), sub)
    rng = np.random.default_rng(seed)
    picks = {}
    for name, g in zip(sub.grad_names(), grads):
        flat = g.reshape(-1).abs()
        big = torch.nonzero(flat > 1e-3 * flat.max()).reshape(-1).cpu().numpy()
        picks[NAMES.index(name)] = (name, g, rng.choice(big, min(coords, big.size), False))
    tight = ours_fn(eps=FD_EPS)
    with torch.no_grad():
        fd = central_differences(lambda *x: [tight(*x)], [t.detach() for t in sub.inputs],
                                 [sub.weights], FD_STEP,
                                 [picks[k][2] if k in picks else [] for k in range(6)])
    errs = [(_rel(g.reshape(-1)[torch.as_tensor(j)].cpu(), fd[k].reshape(-1)[j].cpu()), name)
            for k, (name, g, j) in picks.items()]
    return max(errs)


def qpth_iterations(qpth_qp, inst: Instance, threads: int | None) -> int:
    """Iterations qpth ran (its verbose=1 prints one line per iteration)."""
    buf = io.StringIO()
    fn = qpth_qp.QPFunction(verbose=1, maxIter=QPTH_MAXITER)
    with contextlib.redirect_stdout(buf), torch.no_grad():
        h.with_threads(lambda: fn(*inst.inputs), threads)()
    return sum(1 for line in buf.getvalue().splitlines() if line.startswith("iter:"))


def forward_accuracy(inst, qpth_qp, threads, samples) -> dict:
    z, info = QPFunction(verbose=-1)(*inst.inputs, return_info=True)
    out = {"z err ours": z_error(inst, z, samples), "ours iters": str(int(info.iterations.max()))}
    out["Clarabel raw err"] = max(inst.cache[("raw", i)] for i in range(min(samples, inst.batch)))
    if qpth_qp is not None:
        zq = h.with_threads(lambda: qpth_fn(qpth_qp)(*inst.inputs), threads)()
        out["z err qpth"] = z_error(inst, zq, samples)
        out["qpth iters"] = str(qpth_iterations(qpth_qp, inst, threads))
    return out


def backward_accuracy(inst, qpth_qp, threads, fd_coords) -> dict:
    out: dict = {}
    if inst.dtype == torch.float64 and fd_coords > 0:  # finite differences need float64
        out["grad FD rel (ours)"], out["worst input"] = fd_check(inst, fd_coords)
    if qpth_qp is not None:
        _, g_ours = solve_and_grad(ours_fn(), inst)
        _, g_q = h.with_threads(lambda: solve_and_grad(qpth_fn(qpth_qp), inst), threads)()
        # qpth averages a shared input's gradient over the batch; autograd (and we) sum.
        g_q = [g if inst.is_batched(n) else g * inst.batch for n, g in zip(inst.grad_names(), g_q)]
        out["grad ours-qpth rel"] = max(_rel(a, b) for a, b in zip(g_q, g_ours))
    return out


def cvx_accuracy(inst: Instance, layer: CvxpyLayersQP, samples: int, pass_: str) -> dict:
    z = layer()
    if pass_ == "fwd":
        return {"z err cvxpyl": z_error(inst, z, samples)}
    g_c = torch.autograd.grad((inst.weights * z).sum(), layer.inputs)
    ours = dict(zip(inst.grad_names(), solve_and_grad(ours_fn(), inst)[1]))
    return {"grad ours-cvxpyl rel": max(_rel(g, ours[n]) for n, g in zip(layer.names, g_c)
                                        if n != "L")}  # its Q-gradient is in L


def build(args, qpth_qp, qpth_note, cvx_peer, cvx_note) -> tuple[list[h.Case], list[h.Case]]:
    main, cvx = [], []
    for neq in args.neq:
        for mode in args.modes:
            inst = make_instance(neq, mode, args.batch, args.device, DTYPES[args.dtype])
            notes, threads = [qpth_note] if qpth_note else [], None
            if qpth_qp is not None and args.device == "cpu":  # the trap is MKL's CPU LU
                threads, note = h.lu_trap_threads(
                    f"neq={neq} {mode}", NINEQ + neq, __file__,
                    {"neq": neq, "mode": mode, "batch": args.batch}, args.qpth_threads)
                notes += [note] if note else []
            ref_z = ours_fn()(*inst.inputs).detach()
            label = {"QP": f"n={N}, nineq={NINEQ}, neq={neq}",
                     "batched": "all" if mode == "all" else "p, h only"}
            for pass_ in args.passes:
                qpth = None if qpth_qp is None else h.with_threads(
                    make_call(qpth_fn(qpth_qp), inst, pass_, ref_z), threads)

                def extras(i=inst, t=threads, p=pass_):
                    return (forward_accuracy(i, qpth_qp, t, args.ref_samples) if p == "fwd"
                            else backward_accuracy(i, qpth_qp, t, args.fd_coords))

                main.append(h.Case(label | {"B": str(args.batch), "pass": pass_},
                                   {"ours": make_call(ours_fn(), inst, pass_), "qpth": qpth},
                                   None if args.no_accuracy else extras, list(notes)))
            if args.cvx_batch <= 0 or args.device != "cpu":
                continue
            small = inst.sliced(min(args.cvx_batch, args.batch))
            layer = None if cvx_peer is None else CvxpyLayersQP(cvx_peer, small)
            for pass_ in args.passes:
                columns = {"ours": make_call(ours_fn(), small, pass_),
                           "cvxpylayers": None if layer is None else layer.call(pass_)}

                def cvx_extras(s=small, lay=layer, p=pass_):
                    return cvx_accuracy(s, lay, args.ref_samples, p)

                cvx.append(h.Case(label | {"B": str(small.batch), "pass": pass_}, columns,
                                  None if args.no_accuracy or layer is None else cvx_extras,
                                  [cvx_note] if cvx_note else []))
    return main, cvx


def summary(main, cvx, batch: int, float64: bool) -> str:
    """The fwd+bwd ratios (cvxpylayers' also scaled linearly to ``batch``), our accuracy."""
    lines = []
    rows = [r for r in main if r.case.labels["pass"] == "fwd+bwd"]
    for r in rows:
        q = h.ratio(r, "qpth", "ours")
        if q is not None:
            lines.append(f"- qpth / ours, fwd+bwd, {r.case.labels['QP']}, "
                         f"{r.case.labels['batched']} batched: {q:.2f}" + h.noise_flag(r))
    for r in (r for r in cvx if r.case.labels["pass"] == "fwd+bwd"):
        direct, k = h.ratio(r, "cvxpylayers", "ours"), int(r.case.labels["B"])
        if direct is None:
            continue
        big = next((b for b in rows if b.case.labels["QP"] == r.case.labels["QP"]
                    and b.case.labels["batched"] == r.case.labels["batched"]), None)
        line = (f"- cvxpylayers / ours, fwd+bwd, {r.case.labels['QP']}, "
                f"{r.case.labels['batched']} batched: {direct:.1f} at B = {k}")
        if big is not None and big.median_ms("ours"):
            peer = r.median_ms("cvxpylayers")
            line += (f"; {peer * batch / k / big.median_ms('ours'):.1f} with cvxpylayers scaled "
                     f"linearly to B = {batch} ({peer:.0f} ms × {batch}/{k}) over ours at "
                     f"B = {batch}")
        lines.append(line + h.noise_flag(r, big))
    for r in main if float64 else []:
        where = f"{r.case.labels['QP']}, {r.case.labels['batched']}"
        if r.extras.get("z err ours") is not None:
            lines.append(f"- z err ours {where}: {r.extras['z err ours']:.1e}")
        if "grad FD rel (ours)" in r.extras:
            lines.append(f"- grad FD rel (ours) {where}: {r.extras['grad FD rel (ours)']:.1e} "
                         f"(worst input {r.extras['worst input']})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = h.argument_parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--batch", type=int, default=128, help="batch size B (default 128)")
    p.add_argument("--neq", default="0,50", help="equality counts (default 0,50)")
    p.add_argument("--modes", default="all,shared", help="all, shared (only p, h batched)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd (default both)")
    p.add_argument("--cvx-batch", type=int, default=16,
                   help="batch of the cvxpylayers table (0 skips it; default 16)")
    p.add_argument("--cvx-repeats", type=int, default=3, help="its rounds (default 3)")
    p.add_argument("--qpth-threads", default="auto",
                   help="auto (probe the LU trap at size >= 150), or a thread count")
    p.add_argument("--ref-samples", type=int, default=4, help="samples checked against Clarabel")
    p.add_argument("--fd-coords", type=int, default=3, help="finite-difference entries per input")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy columns")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--case-timeout", type=float, default=900,
                   help="abort (with a traceback) if one row takes longer, in s (default 900)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile ours (cProfile + torch.profiler)")
    p.add_argument("--probe-qpth", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_qpth:
        return _probe_main(json.loads(args.probe_qpth))
    if args.quick:
        args.batch, args.cvx_batch = 32, min(args.cvx_batch, 4)
        args.repeats, args.cvx_repeats, args.ref_samples, args.fd_coords = 3, 2, 2, 2
    args.neq = h.csv_list(args.neq, int)
    args.modes = h.csv_list(args.modes, str, {"all", "shared"})
    args.passes = h.csv_list(args.passes, str, {"fwd", "fwd+bwd"})
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    h.setup(args.threads)
    qpth_qp, qpth_note = h.optional_import("qpth.qp")
    cvx_peer, cvx_note = (h.optional_import("cvxpylayers.torch") if args.cvx_batch > 0
                          else (None, None))
    start = time.perf_counter()
    main_cases, cvx_cases = (h.select(c, args.filter)
                             for c in build(args, qpth_qp, qpth_note, cvx_peer, cvx_note))
    if args.profile:
        return h.emit(h.profile(main_cases, max(1, min(args.repeats, 3)), ("ours",)), args.out,
                      __file__)
    kw = dict(warmup=args.warmup, collect=not args.no_gc, timeout=args.case_timeout)
    main_res = h.run(main_cases, args.repeats, **kw)
    cvx_res = h.run(cvx_cases, args.cvx_repeats, **kw)
    dev = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    peers = "qpth" + (" vs cvxpylayers" if cvx_res else "")
    text = h.header(f"Dense QP: declarative.QPFunction vs {peers} ({args.dtype}, {dev})", args,
                    ["qpth", "cvxpylayers", "cvxpy", "diffcp", "scs", "clarabel", "numpy"],
                    f"; errors: max |z − z_ref| over the first {args.ref_samples} samples (z_ref: "
                    "Clarabel polished on its active set), gradient errors relative")
    text += h.markdown_table(main_res, "ours", FWD_COLS + BWD_COLS)
    if cvx_res:
        text += (f"\n## cvxpylayers (diffcp + SCS, default tolerances) at B = "
                 f"{cvx_cases[0].labels['B']}, {args.cvx_repeats} rounds\n\n"
                 + h.markdown_table(cvx_res, "ours", ("z err cvxpyl", "grad ours-cvxpyl rel")))
    text += ("\n## Summary\n\n" + summary(main_res, cvx_res, args.batch, args.dtype == "float64")
             + f"\n(total {time.perf_counter() - start:.0f} s)\n")
    h.emit(text, args.out, __file__)


if __name__ == "__main__":
    main()
