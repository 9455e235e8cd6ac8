"""Problems as users write them in CVXPY: one registry for every benchmark.

A `Family` builds a fresh problem (its own Parameters, so a reference solve never
touches a layer's), samples parameter values with a leading batch dimension, and
may know one sample's solution in closed form: a torch function of that sample's
parameter values, differentiable by autograd, which is then the reference for the
solution and for its gradient. The problems the route calibration measures
(`declarative.routes.calibrate`) are taken from there, so the benchmarks time
the formulations the cost model was fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import cvxpy as cp
import harness  # noqa: F401  (puts tests/ on sys.path for `references`)
import numpy as np
import references
import torch

from declarative.routes import calibrate

ACTIVE_TOL = 1e-6  # |slack| below this counts as active at the reference point
# Tight interior-point tolerances for the active set that a closed form is evaluated on.
CLARABEL_ACTIVE = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=500)


@dataclass(frozen=True)
class Family:
    size: str
    build: Callable[[], tuple[cp.Problem, list, list]]  # fresh problem, Parameters, [x]
    sample: Callable[[np.random.Generator, int], list[np.ndarray]]  # leading batch dim
    closed_form: Callable[[list[torch.Tensor]], torch.Tensor] | None = None  # one sample
    # How a user would solve it directly in torch, batched (default: the closed form).
    torch_form: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    # The problem as qpth's batched (Q, p, G, h, A, b), for a qpth column.
    qp_form: Callable[[list[torch.Tensor]], tuple] | None = None
    differentiable: int | None = None  # only the first k parameters (None: all)


def _normal(*shapes):
    """A sampler of standard normal values, one array per shape (after the batch)."""
    return lambda rng, B: [rng.standard_normal((B,) + s) for s in shapes]


def _active_point(build) -> Callable[[list[torch.Tensor]], np.ndarray]:
    """x at the given values, solved tightly by Clarabel on the family's own problem:
    the active set a closed form is evaluated on."""
    own = cache(build)

    def solve(values):
        problem, params, variables = own()
        return references.reference_solve(problem, params, [v.detach().numpy() for v in values],
                               variables, **CLARABEL_ACTIVE)[0]

    return solve


def regression(m: int, n: int, l1: float = 0.0, ridge: float = 0.0, box: bool = False):
    """`calibrate.regression`; in a box without the ℓ₁ term it has a closed form on the
    active set: x_F = (A_Fᵀ A_F + ridge·I)⁻¹ A_Fᵀ(b − A_U x_U), the bounds found by
    Clarabel."""
    build, sample = calibrate.regression(m, n, l1, ridge, box)

    def on_active_set(p):
        A, b = p
        x_star = active(p)
        fixed = torch.from_numpy(np.where(x_star > 1 - ACTIVE_TOL, 1.0, 0.0)
                                 - np.where(x_star < -1 + ACTIVE_TOL, 1.0, 0.0))
        F = torch.from_numpy(np.flatnonzero(fixed.numpy() == 0))
        AF = A[:, F]
        xF = torch.linalg.solve(AF.T @ AF + ridge * torch.eye(F.numel(), dtype=A.dtype),
                                AF.T @ (b - A @ fixed))
        return fixed.index_put((F,), xF)

    active = _active_point(build)
    return Family(f"A {m}x{n}", build, sample, on_active_set if box and not l1 else None)


def huber(m=60, n=20) -> Family:
    A = np.random.default_rng(7).standard_normal((m, n)) / math.sqrt(m)

    def build():
        b, x = cp.Parameter(m, name="b"), cp.Variable(n)
        return cp.Problem(cp.Minimize(cp.sum(cp.huber(A @ x - b, 1.0)))), [b], [x]

    return Family(f"A {m}x{n} fixed", build, lambda rng, B: [2.0 * rng.standard_normal((B, m))])


def markowitz(n=50, k=10) -> Family:
    def build():
        mu, F, w = cp.Parameter(n, name="mu"), cp.Parameter((k, n), name="F"), cp.Variable(n)
        return cp.Problem(cp.Maximize(mu @ w - cp.sum_squares(F @ w)), [cp.sum(w) == 1, w >= 0]), \
            [mu, F], [w]

    return Family(f"n={n}, {k} factors", build, lambda rng, B: [
        0.3 * rng.standard_normal((B, n)), rng.standard_normal((B, k, n)) / math.sqrt(n)])


def denoise(n: int, tv: bool) -> Family:
    """`calibrate.denoise`: total variation, or the projection max(y, 0) (a ReLU)."""
    return Family(f"n={n}", *calibrate.denoise(n, tv),
                  None if tv else lambda p: p[0].clamp_min(0.0))


def lp(n=20, m=15) -> Family:
    """min cᵀx s.t. Ax ≤ b, 0 ≤ x ≤ 1: the solution is a vertex, x = G_act⁻¹ h_act."""
    def build():
        c, A = cp.Parameter(n, name="c"), cp.Parameter((m, n), name="A")
        b, x = cp.Parameter(m, name="b"), cp.Variable(n, name="x")
        return cp.Problem(cp.Minimize(c @ x), [A @ x <= b, x >= 0, x <= 1]), [c, A, b], [x]

    def sample(rng, B):
        A = rng.standard_normal((B, m, n))
        b = A @ np.full(n, 0.5) + rng.uniform(0.1, 1.0, (B, m))  # x = ½ strictly feasible
        return [rng.standard_normal((B, n)), A, b]

    def vertex(p):
        c, A, b = p
        eye = torch.eye(n, dtype=A.dtype)
        G = torch.cat([A, -eye, eye])
        rhs = torch.cat([b, torch.zeros(n, dtype=A.dtype), torch.ones(n, dtype=A.dtype)])
        slack = rhs.detach().numpy() - G.detach().numpy() @ active(p)
        act = torch.from_numpy(np.flatnonzero(np.abs(slack) < ACTIVE_TOL))
        if act.numel() != n:
            raise RuntimeError(f"LP reference: {act.numel()} active constraints, expected "
                               f"{n} (degenerate vertex)")
        return torch.linalg.solve(G[act], rhs[act]) + 0.0 * c.sum()  # x is flat in c

    active = _active_point(build)
    return Family(f"n={n}, m={m}+box", build, sample, vertex)


def ellipsoid_socp(n=20) -> Family:
    """min cᵀx s.t. ‖Ax − b‖ ≤ 1, so x = A⁻¹(b − w/‖w‖), w = A⁻ᵀc."""
    def build():
        c, A = cp.Parameter(n, name="c"), cp.Parameter((n, n), name="A")
        b, x = cp.Parameter(n, name="b"), cp.Variable(n, name="x")
        return cp.Problem(cp.Minimize(c @ x), [cp.norm(A @ x - b, 2) <= 1]), [c, A, b], [x]

    def sample(rng, B):
        A = np.eye(n) + 0.3 * rng.standard_normal((B, n, n)) / math.sqrt(n)
        return [rng.standard_normal((B, n)), A, rng.standard_normal((B, n))]

    def closed(p):
        c, A, b = p
        w = torch.linalg.solve(A.T, c)
        return torch.linalg.solve(A, b - w / torch.linalg.norm(w))

    return Family(f"n={n}", build, sample, closed)


def portfolio(n=20) -> Family:
    """max μᵀw − ‖Lᵀw‖₂ s.t. 1ᵀw = 1, 0 ≤ w ≤ 0.25."""
    def build():
        w, mu, L = cp.Variable(n), cp.Parameter(n), cp.Parameter((n, n))
        return cp.Problem(cp.Maximize(mu @ w - cp.norm(L.T @ w, 2)),
                          [cp.sum(w) == 1, w >= 0, w <= 0.25]), [mu, L], [w]

    return Family(f"n={n}", build, lambda rng, B: [
        rng.uniform(0.5, 1.5, (B, n)), 0.3 * rng.standard_normal((B, n, n))])


def robust_lp(n=10, m=15) -> Family:
    """min cᵀx s.t. aᵢᵀx + 0.2‖x‖₂ ≤ bᵢ, ‖x‖∞ ≤ 1."""
    def build():
        x, c, a, b = cp.Variable(n), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
        return cp.Problem(cp.Minimize(c @ x), [a @ x + 0.2 * cp.norm(x, 2) <= b,
                                               cp.abs(x) <= 1]), [c, a, b], [x]

    return Family(f"n={n}, m={m}", build, lambda rng, B: [
        rng.standard_normal((B, n)), rng.standard_normal((B, m, n)),
        rng.uniform(1.0, 2.0, (B, m))])


def maxent(n=12, k=4) -> Family:
    """max Σ entr(p) s.t. 1ᵀp = 1, l ≤ Fp ≤ u."""
    def build():
        p, F, lo, hi = cp.Variable(n), cp.Parameter((k, n)), cp.Parameter(k), cp.Parameter(k)
        return cp.Problem(cp.Maximize(cp.sum(cp.entr(p))),
                          [cp.sum(p) == 1, F @ p >= lo, F @ p <= hi]), [F, lo, hi], [p]

    def sample(rng, B):
        F = rng.standard_normal((B, k, n))
        m0 = np.einsum("bkn,bn->bk", F, rng.dirichlet(np.ones(n), B))
        return [F, m0 - rng.uniform(0.05, 0.2, (B, k)), m0 + rng.uniform(0.05, 0.2, (B, k))]

    return Family(f"F {k}x{n}", build, sample)


def softmax(n: int) -> Family:
    """Softmax as an entropy-regularised argmax (exponential cones)."""
    def build():
        theta, z = cp.Parameter(n, name="theta"), cp.Variable(n, name="z")
        return cp.Problem(cp.Maximize(theta @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1]), \
            [theta], [z]

    return Family(f"n={n}", build, _normal((n,)), lambda p: torch.softmax(p[0], dim=-1))


def sparsemax(n: int) -> Family:
    """The Euclidean projection onto the probability simplex."""
    def build():
        y, z = cp.Parameter(n, name="theta"), cp.Variable(n, name="z")
        return cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == 1, z >= 0]), [y], [z]

    def qp_form(p):  # Q = 2I, p = −2θ, G = −I, h = 0, 1ᵀz = 1
        eye = torch.eye(n, dtype=p[0].dtype)
        return (2.0 * eye, -2.0 * p[0], -eye, torch.zeros(n, dtype=eye.dtype),
                torch.ones(1, n, dtype=eye.dtype), torch.ones(1, dtype=eye.dtype))

    return Family(f"n={n}", build, _normal((n,)), lambda p: references.sparsemax(p[0]),
                  qp_form=qp_form)


def transport(r: int, c: int, tau: float) -> Family:
    """maximize −⟨C, Z⟩ + τ Σ entr(Z) s.t. Z1 = a, Zᵀ1 = b (entropic optimal transport)."""
    def build():
        C, a, b = cp.Parameter((r, c), name="C"), cp.Parameter(r, name="a"), cp.Parameter(c)
        Z = cp.Variable((r, c), name="Z")
        return cp.Problem(cp.Maximize(-cp.sum(cp.multiply(C, Z)) + tau * cp.sum(cp.entr(Z))),
                          [cp.sum(Z, axis=1) == a, cp.sum(Z, axis=0) == b]), [C, a, b], [Z]

    def sample(rng, B):  # costs in [0, 1), marginals positive, each summing to 1
        a, b = rng.random((B, r)) + 0.1, rng.random((B, c)) + 0.1
        return [rng.random((B, r, c)), a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True)]

    def sinkhorn(tol, sweeps):  # log-domain Sinkhorn: `sweeps` differentiated past `tol`
        return lambda p: references.log_sinkhorn(*p, tau, tol, sweeps)

    # The gradient is in C only: in a, b it is defined only up to the direction that
    # breaks Σa = Σb.
    return Family(f"{r}x{c}, τ={tau:g}", build, sample, sinkhorn(1e-14, 300),
                  sinkhorn(1e-12, 50), differentiable=1)


def psd_projection(k=8) -> Family:
    """The projection of a symmetric Y onto the PSD cone (an SDP)."""
    def build():
        Y = cp.Parameter((k, k), name="Y")
        X = cp.Variable((k, k), symmetric=True, name="X")
        return cp.Problem(cp.Minimize(cp.sum_squares(X - Y)), [X >> 0]), [Y], [X]

    def sample(rng, B):
        G = rng.standard_normal((B, k, k))
        return [(G + G.transpose(0, 2, 1)) / 2]

    def closed(p):
        evals, V = torch.linalg.eigh((p[0] + p[0].T) / 2)
        return (V * evals.clamp(min=0)) @ V.T

    return Family(f"{k}x{k}", build, sample, closed)


def dense_qp(n: int, nineq: int, neq: int) -> Family:
    """OptNet's shape: min ½‖Lz‖² + pᵀz s.t. Gz ≤ h, Az = b with every input a parameter
    (L = chol(Q)ᵀ: diffcp refuses a parametric quad_form); the data of
    `references.random_qp_arrays` as `bench_qp.py` draws them."""
    def build():
        z = cp.Variable(n, name="z")
        L, p = cp.Parameter((n, n), name="L"), cp.Parameter(n, name="p")
        G, h = cp.Parameter((nineq, n), name="G"), cp.Parameter(nineq, name="h")
        A, b = cp.Parameter((neq, n), name="A"), cp.Parameter(neq, name="b")
        cons = [G @ z <= h] + ([A @ z == b] if neq else [])
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ z) + p @ z), cons), \
            [L, p, G, h] + ([A, b] if neq else []), [z]

    def sample(rng, B):
        d = references.random_qp_arrays(rng.integers(2**32), n, nineq, neq, B, ridge=0.1,
                                        row_scale=n ** -0.5, z0_scale=0.5, slack=(0.1, 0.9),
                                        q_scale=1.0)
        L = np.swapaxes(np.linalg.cholesky(d["Q"]), -1, -2)
        return [L, d["q"], d["G"], d["h"]] + ([d["A"], d["b"]] if neq else [])

    return Family(f"n={n}, nineq={nineq}, neq={neq}", build, sample)


def least_squares(n: int, sparse: bool) -> Family:
    """min ‖Ax − b‖² + 0.1‖x‖² s.t. x ≥ 0, A an n×n parameter of about 5 nonzeros per row,
    declared with its sparsity pattern (θ holds only the nonzeros) or dense."""
    rng = np.random.default_rng(0)
    rows, cols = np.unique(np.stack([np.repeat(np.arange(n), 5), rng.integers(0, n, 5 * n)]),
                           axis=1)

    def build():
        A = cp.Parameter((n, n), sparsity=(rows, cols)) if sparse else cp.Parameter((n, n))
        x, b = cp.Variable(n), cp.Parameter(n)
        return cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)),
                          [x >= 0]), [A, b], [x]

    def sample(rng, B):
        A = np.zeros((B, n, n))
        A[:, rows, cols] = rng.standard_normal((B, rows.size)) / 5 ** 0.5
        return [A, rng.standard_normal((B, n))]

    return Family(f"n={n}, {rows.size} nonzeros", build, sample)


FAMILIES: dict[str, Family] = {
    "box-ls": regression(40, 20, box=True),
    "lasso": regression(100, 50, l1=0.1),
    "huber": huber(),
    "elastic-net": regression(100, 50, l1=0.1, ridge=0.1),
    "mpc-10": Family("4 states, 2 inputs, T=10", *calibrate.mpc(10)),
    "mpc-30": Family("4 states, 2 inputs, T=30", *calibrate.mpc(30)),
    "markowitz": markowitz(),
    "svm": Family("X 50x10", *calibrate.classifier(50, 10, "hinge")),
    "relu-200": denoise(200, tv=False),
    "relu-2000": denoise(2000, tv=False),
    "tv-100": denoise(100, tv=True),
    "tv-1000": denoise(1000, tv=True),
    "socp": ellipsoid_socp(20),
    "logistic": Family("X 50x10", *calibrate.classifier(50, 10, "logistic")),
    "ridge-box": regression(40, 30, ridge=0.1, box=True),
    "lp": lp(),
    "softmax-10": softmax(10),
    "softmax-100": softmax(100),
    "softmax-1000": softmax(1000),
    "sparsemax-10": sparsemax(10),
    "sparsemax-100": sparsemax(100),
    "sparsemax-1000": sparsemax(1000),
    "ot-20x20": transport(20, 20, 0.1),
    "ot-50x50": transport(50, 50, 0.1),
    "psd-proj": psd_projection(),
    "socp-reg": Family("F 20x10", *calibrate.socp_regression(10, 20)),
    "portfolio": portfolio(),
    "robust-lp": robust_lp(),
    "logistic-30": Family("X 30x5", *calibrate.classifier(30, 5, "logistic")),
    "maxent": maxent(),
    "ls-250": least_squares(250, sparse=False),
    "ls-500": least_squares(500, sparse=False),
    "sparse-ls-1000": least_squares(1000, sparse=True),
    "sparse-ls-2000": least_squares(2000, sparse=True),
    "sparse-ls-4000": least_squares(4000, sparse=True),
    "qp-0": dense_qp(100, 100, 0),
    "qp-50": dense_qp(100, 100, 50),
}
