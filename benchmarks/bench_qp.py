"""Dense QP: declarative.QPFunction vs qpth's QPFunction vs cvxpylayers.

    python benchmarks/bench_qp.py                       # B = 128, 2–5 min on 2 cores
    python benchmarks/bench_qp.py --threads 1           # steadier on a busy shared machine
    python benchmarks/bench_qp.py --quick               # B = 32, a smoke run (about 30 s)
    python benchmarks/bench_qp.py --batch 256 --repeats 9 --out qp.md
    python benchmarks/bench_qp.py --neq 50 --modes shared --filter fwd+bwd
    python benchmarks/bench_qp.py --neq 0 --modes all --profile     # where our time goes
    python benchmarks/bench_qp.py --device cuda --dtype float32 --cvx-batch 0   # (gpu_check.py)

The problem (float64 unless --dtype, CPU unless --device): for each sample

    minimize ½ zᵀQz + pᵀz   s.t.  Gz ≤ h,  Az = b

with n = 100 variables, 100 inequalities and 0 or 50 equalities. Q = LLᵀ/n +
0.1·I (L Gaussian), G and A Gaussian / √n, h = G z₀ + s₀ with s₀ ~ U(0.1, 1)
(strictly feasible; about 35–45 of the 100 inequalities end up active),
b = A z₀, p Gaussian. Two batchings:

    all      every input batched: (B, n, n), (B, n), ...
    shared   only p and h batched; Q, G, A, b are single unbatched tensors

Every input (shared ones too) requires grad. ``fwd`` is a forward pass,
``fwd+bwd`` adds ``autograd.grad`` of ``sum(w * z)`` for a fixed random w
with respect to all inputs.

Columns (timed in the same interleaved rounds, see `harness`):

    ours         declarative.QPFunction(verbose=-1): its defaults (eps 1e-10 on
                 scaled residuals in float64, maxIter 50, notImprovedLim 8)
    qpth         qpth.qp.QPFunction(verbose=-1, maxIter=100): qpth's default
                 eps = 1e-12 (absolute, on the sum of residual norms + nineq·μ,
                 for the whole batch) and notImprovedLim = 3. qpth never meets
                 that eps on these problems; it stops on notImprovedLim after
                 about 15 iterations (the ``qpth iters`` column), so maxIter=100
                 only guarantees that its default of 20 is not what stops it.
    cvxpylayers  cvxpylayers.torch.CvxpyLayer on the same QP written in CVXPY,
                 diffcp + SCS with SCS's default tolerances (solve_method="SCS",
                 diffcp's default "lsqr" adjoint). diffcp cannot take a
                 parametric quad_form, so the objective is written
                 ½‖Lz‖² + pᵀz with L = chol(Q)ᵀ as the parameter (the same QP).
                 It is slow, so it runs in a second table at --cvx-batch
                 (default 16) with fewer rounds (--cvx-repeats, default 3), with
                 ``ours`` re-timed at that batch in the same rounds; the summary
                 also scales it linearly to --batch (diffcp solves samples
                 independently, so its time is linear in B).

qpth's LU trap (benchmarks/README.md): torch's batched LU on CPU with 2 threads can
fail or hang at 150×150 and above, and qpth factors (nineq + neq)-sized
systems, 150 at neq = 50. With ``--qpth-threads auto`` (default) each such
qpth column is first probed in a subprocess (3 fwd+bwd calls, 2 threads,
checked against ours, 120 s timeout); if the probe hangs, fails or returns
garbage the column runs under ``torch.set_num_threads(1)`` and the table says
so. Every timed qpth call is also checked (finite, within 1e-4 of ours), so a
garbage result marks the column failed instead of timing nonsense.

Accuracy (computed once per instance, untimed):

    z err ours / qpth / cvxpyl   max |z − z_ref| over the first --ref-samples
                                 samples; cvxpylayers at its batch. z_ref:
                                 CVXPY + Clarabel at tolerances 1e-12, then
                                 polished: the KKT system solved exactly on
                                 Clarabel's active set (used when consistent)
    Clarabel raw err             max |z_Clarabel − z_ref|: Clarabel's own error
                                 (up to 2e-8 where a constraint is weakly
                                 active; see `clarabel_solution`)
    grad FD rel (ours)           ours vs central differences (step 1e-5, the
                                 forward re-solved by ours at eps 1e-12) on
                                 --fd-coords coordinates of each input, on a
                                 sub-batch of 2 samples: ‖g − g_FD‖ / ‖g_FD‖
                                 over the sampled coordinates, worst input
    grad ours-qpth rel           ‖g_ours − g_qpth‖ / ‖g_ours‖, worst input; qpth
                                 averages the gradient of a shared input over
                                 the batch, so its shared gradients are
                                 multiplied by B first
    grad ours-cvxpyl rel         the same against cvxpylayers, for p, G, h (A, b)
                                 (its Q-gradient is with respect to L)
    ours iters / qpth iters      largest iteration count in the batch

Every ratio is a peer's time over ours (``qpth / ours``, ``cvxpylayers / ours``):
above 1 means we are faster. The summary under the tables restates the
fwd+bwd ratios (cvxpylayers' also scaled to --batch) and our accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import faulthandler
import io
import json
import math
import os
import pstats
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import cache

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
    ratio,
    run,
    select,
    with_threads,
)

from declarative import QPFunction

N, NINEQ = 100, 100
QPTH_MAXITER = 100
QPTH_PROBE_TIMEOUT = 120  # seconds
# torch's batched LU on CPU with 2 threads gives wrong pivots or hangs from this size on.
LU_TRAP_SIZE = 150
GARBAGE_TOL = 1e-4  # a qpth z this far from ours is garbage, not round-off
CLARABEL_TIGHT = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12,
                      tol_ktratio=1e-10, max_iter=500)
FD_EPS, FD_STEP, FD_BATCH = 1e-12, 1e-5, 2
NAMES = ("Q", "p", "G", "h", "A", "b")
SHARED = ("Q", "G", "A", "b")  # unbatched in mode "shared"
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

@dataclass
class Instance:
    """One QP family at one batch size: numpy data, torch inputs, weights."""

    neq: int
    mode: str  # "all" or "shared"
    batch: int
    data: dict[str, np.ndarray]  # leading batch dim unless shared
    inputs: list[torch.Tensor]  # the six qpth-style inputs (empty A, b when neq = 0)
    weights: torch.Tensor  # (B, n)
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    cache: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"neq={self.neq} {self.mode}"

    def is_batched(self, name: str) -> bool:
        return not (self.mode == "shared" and name in SHARED)

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample i's data (numpy, float64)."""
        return {k: (v[i] if self.is_batched(k) else v) for k, v in self.data.items()}

    def grad_inputs(self) -> list[torch.Tensor]:
        return [t for t in self.inputs if t.requires_grad]

    def grad_names(self) -> list[str]:
        return [k for k, t in zip(NAMES, self.inputs) if t.requires_grad]

    def sliced(self, k: int) -> Instance:
        """The first k samples (shared inputs stay shared), fresh tensors."""
        data = {name: (v[:k] if self.is_batched(name) else v) for name, v in self.data.items()}
        return _instance(self.neq, self.mode, k, data, self.weights[:k].cpu().numpy(),
                         self.device, self.dtype)


def generate(neq: int, mode: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, neq, 0 if mode == "all" else 1])
    shared = mode == "shared"
    lead = () if shared else (batch,)

    L = rng.standard_normal(lead + (N, N)) / math.sqrt(N)
    Q = L @ np.swapaxes(L, -1, -2) + 0.1 * np.eye(N)
    G = rng.standard_normal(lead + (NINEQ, N)) / math.sqrt(N)
    A = rng.standard_normal(lead + (neq, N)) / math.sqrt(N)
    z0 = 0.5 * rng.standard_normal(lead + (N,))
    s0 = rng.uniform(0.1, 1.0, (batch, NINEQ))
    p = rng.standard_normal((batch, N))
    h = np.einsum("...ij,...j->...i", G, z0) + s0  # broadcasts a shared Gz₀ over B
    b = np.einsum("...ij,...j->...i", A, z0)
    return {"Q": Q, "p": p, "G": G, "h": h, "A": A, "b": b}


def _instance(neq, mode, batch, data, weights, device="cpu", dtype=torch.float64) -> Instance:
    inputs = []
    for name in NAMES:
        v = data[name]
        if neq == 0 and name in ("A", "b"):
            inputs.append(torch.empty(0, dtype=dtype, device=device))
        else:
            inputs.append(torch.tensor(v, dtype=dtype, device=device, requires_grad=True))
    w = torch.tensor(weights, dtype=dtype, device=device)
    return Instance(neq, mode, batch, data, inputs, w, device, dtype)


def make_instance(neq: int, mode: str, batch: int, device="cpu", dtype=torch.float64,
                  seed: int = 0) -> Instance:
    data = generate(neq, mode, batch, seed)
    weights = np.random.default_rng([seed, 99]).standard_normal((batch, N))
    return _instance(neq, mode, batch, data, weights, device, dtype)


# ---------------------------------------------------------------------------
# The three libraries as calls
# ---------------------------------------------------------------------------

def ours_fn(eps: float | None = None):
    return QPFunction(verbose=-1, eps=eps)


def qpth_fn(qpth_qp):
    return qpth_qp.QPFunction(verbose=-1, maxIter=QPTH_MAXITER)


def make_call(fn, inst: Instance, pass_: str, check: torch.Tensor | None = None):
    """A timed column: fwd or fwd+bwd of ``fn`` on the instance's inputs.

    ``check`` (a reference z): raise when the output is not finite or further
    than GARBAGE_TOL from it, so a broken peer is reported, not timed.
    """
    inputs, w = inst.inputs, inst.weights
    grads = inst.grad_inputs()

    def verify(z):
        if check is not None:
            bad = not bool(torch.isfinite(z).all()) or float((z.detach() - check).abs().max()) \
                > GARBAGE_TOL * (1 if inst.dtype == torch.float64 else 1e3)
            if bad:
                err = float((z.detach() - check).abs().max())
                raise RuntimeError(f"garbage output: max |z - z_ours| = {err:.3g}")
        return z

    sync = torch.cuda.synchronize if inst.device != "cpu" else (lambda: None)

    def fwd():
        z = verify(fn(*inputs))
        sync()  # CUDA kernels are asynchronous: the time must include them
        return z

    def fwd_bwd():
        z = verify(fn(*inputs))
        g = torch.autograd.grad((w * z).sum(), grads)
        sync()
        return g

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}[pass_]


class CvxpyLayersQP:
    """cvxpylayers on the instance's QP: ½‖Lz‖² + pᵀz, L = chol(Q)ᵀ as the parameter."""

    def __init__(self, peer, inst: Instance):
        import cvxpy as cp

        n, neq = N, inst.neq
        Lp, pp = cp.Parameter((n, n), name="L"), cp.Parameter(n, name="p")
        Gp, hp = cp.Parameter((NINEQ, n), name="G"), cp.Parameter(NINEQ, name="h")
        z = cp.Variable(n, name="z")
        cons, params = [Gp @ z <= hp], [Lp, pp, Gp, hp]
        if neq:
            Ap, bp = cp.Parameter((neq, n), name="A"), cp.Parameter(neq, name="b")
            cons.append(Ap @ z == bp)
            params += [Ap, bp]
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp @ z) + pp @ z), cons)
        self.layer = peer.CvxpyLayer(problem, parameters=params, variables=[z])
        Q = inst.data["Q"]
        L = np.swapaxes(np.linalg.cholesky(Q), -1, -2)  # Q = LᵀL
        values = [L] + [inst.data[k] for k in ("p", "G", "h")]
        if neq:
            values += [inst.data["A"], inst.data["b"]]
        self.names = ["L", "p", "G", "h"] + (["A", "b"] if neq else [])
        self.inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]

    def __call__(self, *_ignored):
        (z,) = self.layer(*self.inputs, solver_args={"solve_method": "SCS"})
        return z


def make_cvx_call(layer: CvxpyLayersQP, inst: Instance, pass_: str):
    w = inst.weights

    def fwd():
        return layer()

    def fwd_bwd():
        return torch.autograd.grad((w * layer()).sum(), layer.inputs)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}[pass_]


# ---------------------------------------------------------------------------
# qpth's LU trap: probe a column in a subprocess before timing it
# ---------------------------------------------------------------------------

def qpth_needs_probe(neq: int) -> bool:
    return NINEQ + neq >= LU_TRAP_SIZE


@cache
def probe_qpth(neq: int, mode: str, batch: int, threads: int) -> tuple[bool, str]:
    """Run 3 qpth fwd+bwd calls with ``threads`` in a subprocess; (ok, reason)."""
    return probe([sys.executable, os.path.abspath(__file__), "--probe-qpth",
                  json.dumps({"neq": neq, "mode": mode, "batch": batch, "threads": threads})],
                 QPTH_PROBE_TIMEOUT)


def _probe_main(spec: str) -> None:
    cfg = json.loads(spec)
    torch.set_num_threads(cfg["threads"])
    qpth_qp, note = optional_import("qpth.qp")
    if qpth_qp is None:
        raise SystemExit(note)
    inst = make_instance(cfg["neq"], cfg["mode"], cfg["batch"])
    ref = ours_fn()(*inst.inputs).detach()
    call = make_call(qpth_fn(qpth_qp), inst, "fwd+bwd", check=ref)
    for _ in range(3):
        grads = call()
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            raise SystemExit("non-finite gradient")
    print("ok")


def qpth_threads_for(neq: int, mode: str, batch: int, choice: str,
                     device: str = "cpu") -> tuple[int | None, str]:
    """The thread count for a qpth column and a note ('' when nothing special)."""
    if choice != "auto":
        k = int(choice)
        return k, (f"qpth columns run with torch.set_num_threads({k}) (--qpth-threads)."
                   if k != torch.get_num_threads() else "")
    if device != "cpu" or not qpth_needs_probe(neq) or torch.get_num_threads() == 1:
        return None, ""  # the trap is MKL's CPU LU; CUDA qpth factors without pivoting
    ok, reason = probe_qpth(neq, mode, batch, torch.get_num_threads())
    if ok:
        return None, (f"neq={neq} {mode}: qpth's {NINEQ + neq}×{NINEQ + neq} batched LU passed the "
                      f"2-thread probe (3 fwd+bwd calls, checked against ours); timed with "
                      f"{torch.get_num_threads()} threads like ours.")
    return 1, (f"neq={neq} {mode}: qpth with {torch.get_num_threads()} threads {reason} in the "
               f"probe (torch's batched LU with 2 threads is unreliable from {LU_TRAP_SIZE}×"
               f"{LU_TRAP_SIZE} on); its column "
               "runs with torch.set_num_threads(1), ours keeps 2.")


# ---------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------

def clarabel_solution(inst: Instance, i: int) -> np.ndarray:
    """Sample i's reference: Clarabel at tight tolerances, polished on its active set.

    Clarabel stops with complementarity ~1e-12, which leaves z off by up to
    ~2e-8 where a constraint is weakly active (a multiplier ~1e-4): the
    interior-point error scales like √μ there. So the reference takes
    Clarabel's active set (slack < 1e-7·max(1, ‖h‖∞), or λ > slack) and solves
    the equality-constrained KKT system on it exactly; it is used when the
    result is consistent (active λ ≥ −1e-9, every slack ≥ −1e-9), else
    Clarabel's own z is kept. ``inst.cache[("clarabel raw", i)]`` keeps
    max |z_Clarabel − z_reference| and ``("polished", i)`` whether it was used.
    """
    import cvxpy as cp

    key = ("clarabel", i)
    if key not in inst.cache:
        d = inst.sample(i)
        z = cp.Variable(N)
        cons = [d["G"] @ z <= d["h"]]
        if inst.neq:
            cons.append(d["A"] @ z == d["b"])
        obj = 0.5 * cp.quad_form(z, cp.psd_wrap(d["Q"])) + d["p"] @ z
        prob = cp.Problem(cp.Minimize(obj), cons)
        prob.solve(solver=cp.CLARABEL, **CLARABEL_TIGHT)
        if prob.status not in ("optimal", "optimal_inaccurate"):
            raise RuntimeError(f"Clarabel reference, sample {i}: {prob.status}")
        raw = np.asarray(z.value, dtype=np.float64)
        lam = np.asarray(cons[0].dual_value, dtype=np.float64)
        ref, ok = _polish(d, raw, lam, inst.neq)
        inst.cache[key] = ref if ok else raw
        inst.cache[("polished", i)] = ok
        inst.cache[("clarabel raw", i)] = float(np.abs(raw - ref).max()) if ok else 0.0
    return inst.cache[key]


def _polish(d: dict, z: np.ndarray, lam: np.ndarray, neq: int) -> tuple[np.ndarray, bool]:
    Q, p, G, h = d["Q"], d["p"], d["G"], d["h"]
    slack = h - G @ z
    active = np.flatnonzero((slack < 1e-7 * max(1.0, np.abs(h).max())) | (lam > slack))
    E = np.vstack([G[active]] + ([d["A"]] if neq else []))
    e = np.concatenate([h[active]] + ([d["b"]] if neq else []))
    k = E.shape[0]
    K = np.block([[Q, E.T], [E, np.zeros((k, k))]])
    try:
        sol = np.linalg.solve(K, np.concatenate([-p, e]))
    except np.linalg.LinAlgError:
        return z, False
    zp, lam_a = sol[:N], sol[N:N + active.size]
    ok = (lam_a.size == 0 or lam_a.min() >= -1e-9) and (h - G @ zp).min() >= -1e-9
    return zp, bool(ok)


def clarabel_raw_error(inst: Instance, samples: int) -> float:
    k = min(samples, inst.batch)
    for i in range(k):
        clarabel_solution(inst, i)
    return max(inst.cache[("clarabel raw", i)] for i in range(k))


def z_error(inst: Instance, z: torch.Tensor, samples: int) -> float:
    z = z.detach().double().cpu().numpy()
    k = min(samples, z.shape[0])
    return max(float(np.abs(z[i] - clarabel_solution(inst, i)).max()) for i in range(k))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def solve_and_grad(fn, inst: Instance):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = fn(*inst.inputs)
        g = torch.autograd.grad((inst.weights * z).sum(), inst.grad_inputs())
    return z.detach(), [x.detach() for x in g]


def fd_check(inst: Instance, coords: int, seed: int = 0) -> tuple[float, str]:
    """Ours vs central differences on a sub-batch; (worst relative error, which input)."""
    sub = inst.sliced(min(FD_BATCH, inst.batch))
    _, grads = solve_and_grad(ours_fn(), sub)
    tight = ours_fn(eps=FD_EPS)
    base = [t.detach().clone() for t in sub.inputs]
    w = sub.weights
    rng = np.random.default_rng(seed)
    worst, where = 0.0, ""
    with torch.no_grad():
        for name, g in zip(sub.grad_names(), grads):
            k = NAMES.index(name)
            flat = g.reshape(-1)
            big = torch.nonzero(flat.abs() > 1e-3 * flat.abs().max()).reshape(-1).cpu().numpy()
            pick = rng.choice(big, size=min(coords, big.size), replace=False)
            fd = []
            for j in pick:
                vals = []
                for sign in (1.0, -1.0):
                    x = [t.clone() for t in base]
                    x[k].view(-1)[j] += sign * FD_STEP
                    vals.append(float((w * tight(*x)).sum()))
                fd.append((vals[0] - vals[1]) / (2 * FD_STEP))
            fd_t = torch.tensor(fd, dtype=torch.float64)
            got = flat[torch.as_tensor(pick, device=flat.device)].double().cpu()
            err = _rel(got, fd_t)
            if err >= worst:
                worst, where = err, name
    return worst, where


def qpth_gradient_scaled(inst: Instance, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """qpth's gradients in autograd's (sum) convention: shared inputs × B."""
    return [g * inst.batch if not inst.is_batched(n) else g
            for n, g in zip(inst.grad_names(), grads)]


def qpth_iterations(qpth_qp, inst: Instance, threads: int | None) -> int:
    """Iterations qpth ran (its verbose=1 prints one line per iteration)."""
    buf = io.StringIO()
    fn = qpth_qp.QPFunction(verbose=1, maxIter=QPTH_MAXITER)
    with contextlib.redirect_stdout(buf), torch.no_grad():
        with_threads(lambda: fn(*inst.inputs), threads)()
    return sum(1 for line in buf.getvalue().splitlines() if line.startswith("iter:"))


@dataclass
class Accuracy:
    """Lazily computed accuracy of one instance, shared by its rows."""

    inst: Instance
    qpth_qp: object | None
    qpth_threads: int | None
    ref_samples: int
    fd_coords: int
    cvx_inst: Instance | None = None
    cvx_layer: CvxpyLayersQP | None = None
    _fwd: dict | None = None
    _bwd: dict | None = None
    _cvx: dict | None = None

    def forward(self) -> dict:
        if self._fwd is None:
            inst = self.inst
            z, info = QPFunction(verbose=-1)(*inst.inputs, return_info=True)
            out = {"z err ours": z_error(inst, z, self.ref_samples),
                   "Clarabel raw err": clarabel_raw_error(inst, self.ref_samples),
                   "ours iters": str(int(info.iterations.max()))}
            if self.qpth_qp is not None:
                zq = with_threads(lambda: qpth_fn(self.qpth_qp)(*inst.inputs),
                                  self.qpth_threads)()
                out["z err qpth"] = z_error(inst, zq, self.ref_samples)
                out["qpth iters"] = str(qpth_iterations(self.qpth_qp, inst, self.qpth_threads))
            self._fwd = out
        return self._fwd

    def backward(self) -> dict:
        if self._bwd is None:
            inst = self.inst
            _, g_ours = solve_and_grad(ours_fn(), inst)
            out: dict = {}
            if inst.dtype == torch.float64 and self.fd_coords > 0:  # FD needs float64
                err, where = fd_check(inst, self.fd_coords)
                out = {"grad FD rel (ours)": err, "worst input": where}
            if self.qpth_qp is not None:
                _, g_q = with_threads(lambda: solve_and_grad(qpth_fn(self.qpth_qp), inst),
                                      self.qpth_threads)()
                g_q = qpth_gradient_scaled(inst, g_q)
                out["grad ours-qpth rel"] = max(_rel(a, b) for a, b in zip(g_q, g_ours))
            self._bwd = out
        return self._bwd

    def cvx(self) -> dict:
        if self._cvx is None and self.cvx_layer is not None:
            inst, layer = self.cvx_inst, self.cvx_layer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                z = layer()
                g_c = torch.autograd.grad((inst.weights * z).sum(), layer.inputs)
            _, g_ours = solve_and_grad(ours_fn(), inst)
            ours = dict(zip(inst.grad_names(), g_ours))
            cmp = [_rel(g, ours[n]) for n, g in zip(layer.names, g_c) if n != "L"]
            self._cvx = {"z err cvxpyl": z_error(inst, z, self.ref_samples),
                         "grad ours-cvxpyl rel": max(cmp)}
        return self._cvx or {}


FWD_COLS = ("z err ours", "z err qpth", "Clarabel raw err", "ours iters", "qpth iters")
BWD_COLS = ("grad FD rel (ours)", "worst input", "grad ours-qpth rel")
CVX_FWD_COLS = ("z err cvxpyl",)
CVX_BWD_COLS = ("grad ours-cvxpyl rel",)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

@dataclass
class Plan:
    main: list[Case]
    cvx: list[Case]
    accuracy: dict[tuple[int, str], Accuracy]


def build(args, qpth_qp, qpth_note, cvx_peer, cvx_note) -> Plan:
    device, dtype = args.device, DTYPES[args.dtype]
    main, cvx, acc = [], [], {}
    for neq in args.neq:
        for mode in args.modes:
            inst = make_instance(neq, mode, args.batch, device, dtype)
            notes = [qpth_note] if qpth_note else []
            threads, tnote = None, ""
            if qpth_qp is not None:
                threads, tnote = qpth_threads_for(neq, mode, args.batch, args.qpth_threads,
                                                  device)
                if tnote:
                    notes.append(tnote)
            ref_z = ours_fn()(*inst.inputs).detach()
            a = acc[(neq, mode)] = Accuracy(inst, qpth_qp, threads, args.ref_samples,
                                            args.fd_coords)
            for pass_ in args.passes:
                columns = {"ours": make_call(ours_fn(), inst, pass_)}
                columns["qpth"] = None if qpth_qp is None else with_threads(
                    make_call(qpth_fn(qpth_qp), inst, pass_, check=ref_z), threads)
                labels = {"QP": f"n={N}, nineq={NINEQ}, neq={neq}", "batched": _mode_label(mode),
                          "B": str(args.batch), "pass": pass_}
                extras = ((lambda a=a: a.forward()) if pass_ == "fwd"
                          else (lambda a=a: a.backward()))
                if args.no_accuracy:
                    extras = None
                main.append(Case(labels, columns, extras, list(notes)))

            if args.cvx_batch > 0 and device == "cpu":
                k = min(args.cvx_batch, args.batch)
                small = inst.sliced(k)
                layer = None if cvx_peer is None else CvxpyLayersQP(cvx_peer, small)
                a.cvx_inst, a.cvx_layer = small, layer
                for pass_ in args.passes:
                    columns = {"ours": make_call(ours_fn(), small, pass_),
                               "cvxpylayers": None if layer is None
                               else make_cvx_call(layer, small, pass_)}
                    labels = {"QP": f"n={N}, nineq={NINEQ}, neq={neq}",
                              "batched": _mode_label(mode), "B": str(k), "pass": pass_}
                    shown = CVX_FWD_COLS if pass_ == "fwd" else CVX_BWD_COLS

                    def extras(a=a, shown=shown):
                        return {k: v for k, v in a.cvx().items() if k in shown}

                    cvx.append(Case(labels, columns, None if args.no_accuracy else extras,
                                    [cvx_note] if cvx_note else []))
    return Plan(main, cvx, acc)


def _mode_label(mode: str) -> str:
    return "all" if mode == "all" else "p, h only"


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _find(results: list[Result], labels: dict) -> Result | None:
    for r in results:
        if all(r.case.labels.get(k) == v for k, v in labels.items()):
            return r
    return None


NOISY = 0.2  # IQR / median above this: the row was timed while the machine was busy


def _noise(*results: Result | None) -> str:
    spreads = [s for r in results if r is not None
               for s in (r.spread(c) for c in r.times) if s is not None]
    worst = max(spreads, default=0.0)
    return (f" [noisy: IQR/med {100 * worst:.0f} %, rerun this row with --filter]"
            if worst > NOISY else "")


def summary(main: list[Result], cvx: list[Result], batch: int, float64: bool = True) -> str:
    lines = []
    for r in main:
        if r.case.labels["pass"] != "fwd+bwd":
            continue
        q = ratio(r, "qpth", "ours")
        if q is not None:
            lines.append(f"- qpth / ours, fwd+bwd, {r.case.labels['QP']}, "
                         f"{r.case.labels['batched']} batched: {q:.2f}" + _noise(r))
    for r in cvx:
        if r.case.labels["pass"] != "fwd+bwd":
            continue
        k = int(r.case.labels["B"])
        direct = ratio(r, "cvxpylayers", "ours")
        if direct is None:
            continue
        big = _find(main, {"QP": r.case.labels["QP"], "batched": r.case.labels["batched"],
                           "pass": "fwd+bwd"})
        scaled = None
        if big is not None and big.median_ms("ours"):
            scaled = r.median_ms("cvxpylayers") * batch / k / big.median_ms("ours")
        lines.append(
            f"- cvxpylayers / ours, fwd+bwd, {r.case.labels['QP']}, {r.case.labels['batched']} "
            f"batched: {direct:.1f} at B = {k} (both timed at B = {k})"
            + (f"; {scaled:.1f} with cvxpylayers scaled linearly to B = {batch} "
               f"({r.median_ms('cvxpylayers'):.0f} ms × {batch}/{k}) over ours at B = {batch}"
               if scaled is not None else "")
            + _noise(r, big))
    for r in main if float64 else []:  # accuracy lines for float64 runs only
        e = r.extras
        if "z err ours" in e and e["z err ours"] is not None:
            v = e["z err ours"]
            lines.append(f"- z err ours {r.case.labels['QP']}, {r.case.labels['batched']}: "
                         f"{v:.1e}")
        if "grad FD rel (ours)" in e:
            v = e["grad FD rel (ours)"]
            lines.append(f"- grad FD rel (ours) {r.case.labels['QP']}, "
                         f"{r.case.labels['batched']}: {v:.1e} (worst input {e['worst input']})")
    return "\n".join(lines) + ("\n" if lines else "")


# ---------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------

def profile(cases: list[Case], repeats: int, top: int = 20) -> str:
    """cProfile, then torch.profiler, of the ``ours`` column of each case."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    out = io.StringIO()
    for case in cases:
        fn = case.columns.get("ours")
        if fn is None:
            continue
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        plain = (time.perf_counter() - start) / repeats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(repeats):
            fn()
        prof.disable()
        out.write(f"\n## {case.name}: ours {1e3 * plain:.1f} ms per call (unprofiled)\n\n"
                  "### cProfile (own time)\n\n```\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
        out.write("```\n\n### torch.profiler (CPU ops, self time)\n\n```\n")
        with tprofile(activities=[ProfilerActivity.CPU]) as tp:
            for _ in range(repeats):
                fn()
        out.write(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
        out.write("\n```\n")
    return out.getvalue()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argument_parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--batch", type=int, default=128, help="batch size B (default 128)")
    p.add_argument("--neq", default="0,50", help="equality counts (default 0,50)")
    p.add_argument("--modes", default="all,shared",
                   help="all (every input batched), shared (only p, h batched); default both")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd (default both)")
    p.add_argument("--cvx-batch", type=int, default=16,
                   help="batch of the cvxpylayers table (0 skips it; default 16)")
    p.add_argument("--cvx-repeats", type=int, default=3,
                   help="timed rounds of the cvxpylayers table (default 3)")
    p.add_argument("--qpth-threads", default="auto",
                   help="auto (probe the LU trap at size >= 150), or a thread count")
    p.add_argument("--ref-samples", type=int, default=4,
                   help="samples compared with Clarabel (default 4)")
    p.add_argument("--fd-coords", type=int, default=3,
                   help="finite-difference coordinates per input (default 3)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy columns")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the whole run (default: torch's, 2 here)")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--case-timeout", type=float, default=900,
                   help="abort (with a traceback) if one row takes longer, in s (default 900)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: B = 32, cvx batch 4, 3 repeats (2 for cvxpylayers), "
                        "2 reference samples, 2 FD coordinates")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile ours (cProfile + torch.profiler)")
    p.add_argument("--probe-qpth", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.probe_qpth:
        _probe_main(args.probe_qpth)
        return
    if args.quick:
        args.batch, args.cvx_batch = 32, min(args.cvx_batch, 4)
        args.repeats, args.cvx_repeats = 3, 2
        args.ref_samples, args.fd_coords = 2, 2
    args.neq = csv_list(args.neq, int)
    args.modes = csv_list(args.modes, str, {"all", "shared"})
    args.passes = csv_list(args.passes, str, {"fwd", "fwd+bwd"})
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # SCS "Solved/Inaccurate", qpth's deprecations

    qpth_qp, qpth_note = optional_import("qpth.qp")
    cvx_peer, cvx_note = (optional_import("cvxpylayers.torch") if args.cvx_batch > 0
                          else (None, None))
    start = time.perf_counter()
    plan = build(args, qpth_qp, qpth_note, cvx_peer, cvx_note)
    main_cases = select(plan.main, args.filter)
    cvx_cases = select(plan.cvx, args.filter)
    if args.profile:
        emit(profile(main_cases, max(1, min(args.repeats, 3))), args.out)
        return

    def timed(cases, repeats):
        results = []
        for case in cases:  # one at a time, each under a watchdog (a hung LU never returns)
            faulthandler.dump_traceback_later(args.case_timeout, exit=True)
            try:
                results += run([case], repeats=repeats, warmup=args.warmup,
                               collect=not args.no_gc)
            finally:
                faulthandler.cancel_dump_traceback_later()
        return results

    main_results = timed(main_cases, args.repeats)
    cvx_results = timed(cvx_cases, args.cvx_repeats)
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    dev = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    text = (
        "# Dense QP: declarative.QPFunction vs qpth"
        + (" vs cvxpylayers" if cvx_results else "") + f" ({args.dtype}, {dev})\n\n"
        f"{environment(['qpth', 'cvxpylayers', 'cvxpy', 'diffcp', 'scs', 'clarabel', 'numpy'])}; "
        f"load average (1, 5, 15 min) at the end: {load}\n"
        f"medians of {args.repeats} interleaved rounds after {args.warmup} warmup call(s); "
        "every ratio is peer / ours, above 1: ours is faster; errors: max |z − z_ref| over "
        f"the first {args.ref_samples} samples (z_ref: Clarabel polished on its active set), "
        "gradient errors relative (see the module docstring)\n\n"
        + markdown_table(main_results, baseline="ours",
                         extra_columns=list(FWD_COLS + BWD_COLS))
    )
    if cvx_results:
        text += (
            f"\n## cvxpylayers (diffcp + SCS, default tolerances) at B = "
            f"{cvx_cases[0].labels['B']}, {args.cvx_repeats} rounds\n\n"
            + markdown_table(cvx_results, baseline="ours",
                             extra_columns=list(CVX_FWD_COLS + CVX_BWD_COLS))
        )
    text += ("\n## Summary\n\n" + summary(main_results, cvx_results, args.batch,
                                                   args.dtype == "float64")
             + f"\n(total {time.perf_counter() - start:.0f} s)\n")
    emit(text, args.out)


if __name__ == "__main__":
    main()
