"""Differentiable batched sparse QP solve: forward by interior point, backward by the IFT.

The backward is the dense engine's (`backends.qp.function`): for upstream
gradients ḡ = (ḡ_z, ḡ_ν, ḡ_λ) one solve a = M⁻¹ḡ with the limit system M at
the solution (`limit`, factored in the forward and kept) gives

    ∇q = −a_z,   ∇h = a_λ,   ∇b = a_ν,
    ∇Q = −½(a_z zᵀ + z a_zᵀ),   ∇G = −(λ a_zᵀ + a_λ zᵀ),   ∇A = −(ν a_zᵀ + a_ν zᵀ),

read here at the stored entries only: the gradient of a value array is that
matrix gradient at each entry's position (twice it off the diagonal for
``Q_part="upper"``, where one entry stands for Q_ij and Q_ji). The solve runs in
the equilibrated problem, a = P M̂⁻¹ (P ḡ) (`scaling`). A shared (1-D) input
receives the sum over the batch; samples without a solution receive zero.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import solution
from ..autograd import ImplicitSolve
from ..functorch import any_wrapped
from ..status import Box
from ..threads import run_samples
from . import engine
from .limit import solve_limit
from .pattern import SparsePattern
from .settings import SparseQPSettings

NAMES = ("Q_vals", "q", "G_vals", "h", "A_vals", "b")


class SparseQPProblem:
    """The sparse QP solve as `autograd.ImplicitSolve` sees it: inputs (Q_vals, q,
    G_vals, h, A_vals, b), each (B, k) or (k,) shared."""

    name = "sparse QP layer"
    ranks = (1, 1, 1, 1, 1, 1)

    def __init__(self, pattern: SparsePattern, batch: int, settings: SparseQPSettings,
                 warm: dict | None, need_grad: bool):
        self.pattern, self.batch, self.settings = pattern, batch, settings
        self.warm, self.need_grad = warm, need_grad

    def solve(self, *inputs):
        dtype, device = _result_type(inputs), inputs[0].device
        values = {k: _host(t, self.batch) for k, t in zip("QqGhAb", inputs)}
        warm = None if self.warm is None else {k: _host(v, self.batch)
                                               for k, v in self.warm.items()}
        result = engine.run(self.pattern, values, self.settings, self.need_grad, warm)
        outputs = tuple(t.to(dtype=dtype, device=device)
                        for t in (result.z, result.lam, result.nu))
        return outputs, _Solved(result, dtype, device)

    def folded(self, V: int) -> SparseQPProblem:
        return SparseQPProblem(self.pattern, V * self.batch, self.settings, None,
                               self.need_grad)


def _result_type(inputs) -> torch.dtype:
    dtype = inputs[0].dtype
    for t in inputs[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _host(t: torch.Tensor, batch: int) -> np.ndarray:
    """A (batch, k) float64 array (a shared input broadcast)."""
    a = t.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.ascontiguousarray(np.broadcast_to(a, (batch, a.shape[-1])))


class _Solved:
    """What the backward needs from a forward solve (kept off the autograd graph)."""

    def __init__(self, result: engine.SparseQPResult, dtype, device):
        self.result, self.dtype, self.device = result, dtype, device
        self.batch = result.z.shape[0]

    def adjoint(self, cotangents, needs, shared):
        grads = _adjoint(self.result, [_host(g, self.batch) for g in cotangents], needs)
        out = []
        for g, need, sh in zip(grads, needs, shared):
            if not need:
                out.append(None)
                continue
            g = torch.from_numpy(g.sum(0) if sh else g)
            out.append(g.to(dtype=self.dtype, device=self.device))
        return tuple(out)


def _adjoint_solves(result: engine.SparseQPResult, gz, gl, gn, ok):
    """a = M⁻¹ ḡ per sample in the user's units (z, ν, λ parts; zero where not ``ok``)."""
    B = gz.shape[0]
    sc = result.scaling
    rz, rn, rl = sc.congruence(gz, gn, gl)
    a = np.zeros((B, rz.shape[1] + rn.shape[1] + rl.shape[1]))

    def one(i):
        state = result.samples[i]
        if not ok[i] or state.op is None:
            return
        a[i] = solve_limit(state.op, state.active, np.concatenate([rz[i], rn[i], rl[i]]))

    flops = result.pattern.symbolic()["factor_flops"]
    run_samples(one, B, result.settings.workers(B, flops))
    n, m = rz.shape[1], rn.shape[1]
    return sc.congruence(a[:, :n], a[:, n:n + m], a[:, n + m:])


def _adjoint(result: engine.SparseQPResult, cotangents, needs):
    """The six gradients (B, ·) as arrays (see the module docstring)."""
    gz, gl, gn = cotangents
    pattern = result.pattern
    ok = np.isin(result.codes.numpy(), solution.WITH_POINT)
    keep = ok[:, None]
    gz, gl, gn = (np.where(keep, g, 0.0) for g in (gz, gl, gn))
    a_z, a_n, a_l = _adjoint_solves(result, gz, gl, gn, ok)
    z, lam, nu = (np.where(keep, t.numpy(), 0.0) for t in (result.z, result.lam, result.nu))
    grads = [None] * 6
    if needs[0]:
        qr, qc = pattern.rows("Q"), pattern.cols("Q")
        g = -0.5 * (a_z[:, qr] * z[:, qc] + z[:, qr] * a_z[:, qc])
        if pattern.Q_part == "upper":
            g = g * np.where(qr != qc, 2.0, 1.0)
        grads[0] = g
    if needs[1]:
        grads[1] = -a_z
    if needs[2]:
        gr, gc = pattern.rows("G"), pattern.cols("G")
        grads[2] = -(lam[:, gr] * a_z[:, gc] + a_l[:, gr] * z[:, gc])
    if needs[3]:
        grads[3] = a_l
    if needs[4]:
        ar, ac = pattern.rows("A"), pattern.cols("A")
        grads[4] = -(nu[:, ar] * a_z[:, ac] + a_n[:, ar] * z[:, ac])
    if needs[5]:
        grads[5] = a_n
    return grads


def _check_inputs(pattern: SparsePattern, inputs) -> int:
    """The batch size; ValueError naming the argument for anything else."""
    sizes = (pattern.nnz("Q"), pattern.n, pattern.nnz("G"), pattern.p, pattern.nnz("A"),
             pattern.m)
    batch = None
    for name, t, k in zip(NAMES, inputs, sizes):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}.")
        if t.dim() not in (1, 2) or t.shape[-1] != k:
            raise ValueError(f"{name} must have shape ({k},) or (batch, {k}) for this pattern, "
                             f"got {tuple(t.shape)}.")
        if t.dim() == 2:
            if batch is not None and t.shape[0] != batch:
                raise ValueError(f"{name} has batch size {t.shape[0]}, an earlier input "
                                 f"{batch}.")
            batch = t.shape[0]
        if any_wrapped(t):
            continue  # values under torch.func are checked after unwrapping (in the solve)
        bad = torch.isnan(t) | (torch.isinf(t) if name != "h" else torch.isneginf(t))
        if bool(bad.any()):
            what = "NaN or -inf" if name == "h" else "NaN or ±inf"
            raise ValueError(f"{name} contains {what} (h may hold +inf: a row without "
                             "constraint).")
    return 1 if batch is None else batch


def sparse_qp_solve(pattern: SparsePattern, Q_vals, q, G_vals, h, A_vals, b,
                    settings: SparseQPSettings | None = None, warm: dict | None = None):
    """Solve ``min ½zᵀQz + qᵀz s.t. Gz ≤ h, Az = b`` for a batch sharing ``pattern``.

    Shapes: Q_vals (B, nnz_Q) or (nnz_Q,), q (B, n) or (n,), G_vals (B, nnz_G),
    h (B, p), A_vals (B, nnz_A), b (B, m), each batched or shared; B = 1 when
    none is batched. h may hold +inf (no constraint). Returns ((z, λ, ν), result):
    z (B, n), λ (B, p), ν (B, m) in the inputs' promoted dtype and device,
    differentiable in all six inputs, and a `SparseQPResult` (per-sample codes,
    iterations, residuals, ``warm_start()``). ``warm``: a previous result's
    ``warm_start()`` of the same batch size.
    """
    settings = settings or SparseQPSettings()
    inputs = (Q_vals, q, G_vals, h, A_vals, b)
    batch = _check_inputs(pattern, inputs)
    if warm is not None:
        sizes = {"z": pattern.n, "lam": pattern.p, "s": pattern.p, "nu": pattern.m}
        for k, size in sizes.items():
            if k not in warm or tuple(warm[k].shape) != (batch, size):
                got = tuple(warm[k].shape) if k in warm else "nothing"
                raise ValueError(f"warm[{k!r}] must have shape ({batch}, {size}), got {got}.")
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    problem = SparseQPProblem(pattern, batch, settings, warm, need_grad)
    box = Box()
    z, lam, nu = ImplicitSolve.apply(problem, box, *inputs)
    return (z, lam, nu), box.result
