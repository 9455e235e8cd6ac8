"""Dense QP: declarative.QPFunction vs qpth's QPFunction.

    python benchmarks/bench_qp.py                  # B = 128, 2–5 min on 2 cores
    python benchmarks/bench_qp.py --threads 1      # steadier on a busy shared machine
    python benchmarks/bench_qp.py --quick          # B = 32, a smoke run (about 30 s)
    python benchmarks/bench_qp.py --neq 0 --modes all --profile
    python benchmarks/bench_qp.py --device cuda --dtype float32

``minimize ½ zᵀQz + pᵀz s.t. Gz ≤ h, Az = b``, n = 100, 100 inequalities, 0 or
50 equalities, every input batched ("all") or only p, h ("shared"); ``fwd`` and
``fwd+bwd`` (``autograd.grad`` of ``sum(w * z)`` in every input). The data,
qpth's settings and the accuracy columns are described in benchmarks/README.md
(against cvxpylayers: `bench_layers.py --suite qp`).
"""

from __future__ import annotations

import math
import time

import harness as h
import numpy as np
import torch
from references import central_differences, qp_polished_reference, random_qp_arrays
from references import rel_err as _rel

from declarative import QPFunction

N, NINEQ = 100, 100
QPTH_MAXITER = 100
GARBAGE_TOL = 1e-4  # a qpth z this far from ours is garbage, not round-off
FD_EPS, FD_STEP, FD_BATCH = 1e-12, 1e-5, 2
NAMES = ("Q", "p", "G", "h", "A", "b")
SHARED = ("Q", "G", "A", "b")  # unbatched in mode "shared"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
FWD_COLS = ("z err ours", "z err qpth", "ours iters")
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


def reference_z(inst: Instance, i: int) -> np.ndarray:
    """Sample i: Clarabel polished on its active set (`references.qp_polished_reference`)."""
    if i not in inst.cache:
        d = inst.sample(i)
        inst.cache[i] = qp_polished_reference(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"])[0]
    return inst.cache[i]


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


def forward_accuracy(inst, qpth_qp, threads, samples) -> dict:
    z, info = QPFunction(verbose=-1)(*inst.inputs, return_info=True)
    out = {"z err ours": z_error(inst, z, samples), "ours iters": str(int(info.iterations.max()))}
    if qpth_qp is not None:
        zq = h.with_threads(lambda: qpth_fn(qpth_qp)(*inst.inputs), threads)()
        out["z err qpth"] = z_error(inst, zq, samples)
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


def build(args, qpth_qp, qpth_note) -> list[h.Case]:
    cases = []
    for neq in args.neq:
        for mode in args.modes:
            inst = make_instance(neq, mode, args.batch, args.device, DTYPES[args.dtype])
            notes, threads = [qpth_note] if qpth_note else [], None
            if qpth_qp is not None and args.device == "cpu":  # the trap is MKL's CPU LU
                threads, note = h.qpth_threads(f"neq={neq} {mode}", NINEQ + neq)
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

                cases.append(h.Case(label | {"B": str(args.batch), "pass": pass_},
                                    {"ours": make_call(ours_fn(), inst, pass_), "qpth": qpth},
                                    None if args.no_accuracy else extras, notes))
    return cases


def main(argv=None) -> None:
    p = h.argument_parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--batch", type=int, default=128, help="batch size B (default 128)")
    p.add_argument("--neq", default="0,50", help="equality counts (default 0,50)")
    p.add_argument("--modes", default="all,shared", help="all, shared (only p, h batched)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd (default both)")
    p.add_argument("--ref-samples", type=int, default=4, help="samples checked against Clarabel")
    p.add_argument("--fd-coords", type=int, default=3, help="finite-difference entries per input")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy columns")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile ours (cProfile + torch.profiler)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.ref_samples, args.fd_coords = 32, 3, 2, 2
    args.neq = h.csv_list(args.neq, int)
    args.modes = h.csv_list(args.modes, str, {"all", "shared"})
    args.passes = h.csv_list(args.passes, str, {"fwd", "fwd+bwd"})
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    h.setup(args.threads)
    qpth_qp, qpth_note = h.optional_import("qpth.qp")
    start = time.perf_counter()
    cases = h.select(build(args, qpth_qp, qpth_note), args.filter)
    if args.profile:
        return h.emit(h.profile(cases, max(1, min(args.repeats, 3)), ("ours",)), args.out,
                      __file__)
    results = h.run(cases, args.repeats, args.warmup, not args.no_gc)
    dev = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    text = h.header(f"Dense QP: declarative.QPFunction vs qpth ({args.dtype}, {dev})", args,
                    ["qpth", "clarabel", "numpy"],
                    f"; errors: max |z − z_ref| over the first {args.ref_samples} samples (z_ref: "
                    "Clarabel polished on its active set), gradient errors relative")
    text += h.markdown_table(results, "ours", FWD_COLS + BWD_COLS)
    h.emit(text + f"\n(total {time.perf_counter() - start:.0f} s)\n", args.out, __file__)


if __name__ == "__main__":
    main()
