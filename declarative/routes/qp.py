"""The QP route: CVXPY's quadratic form, solved by the batched torch interior point."""

from __future__ import annotations

import torch

from ..backends.functorch import unwrap
from ..backends.qp import QPSettings, solve_qp
from ..backends.solution import INFEASIBLE, OPTIMAL, Solution
from ..backends.solver_args import check_type
from .base import Route, add_map, refuse_keys

BLOCKS = ("Q", "q", "G", "h", "A", "b")
# QPSettings fields a caller may set through solver_args, with their types.
_NUM = (int, float)
QP_KEYS = {
    "eps": _NUM, "max_iter": int, "time_limit": _NUM, "step_fraction": _NUM,
    "step_fraction_max": _NUM,
    "infeas_tol": _NUM, "not_improved_lim": int, "kkt": str, "regularization": _NUM,
    "regularization_tries": int, "schur_max_condition": _NUM,
    "fixed_iterations": bool, "backward": str, "iterative_tol": _NUM,
    "iterative_max_iter": int,
}
# Conic-solver spellings the QP engine understands (drop-in code passes them).
QP_ALIASES = {"max_iters": "max_iter", "time_limit_secs": "time_limit"}


def qp_settings(*arg_dicts) -> QPSettings:
    """QPSettings from solver_args: QP keys checked by name and type, conic-solver
    keys accepted and ignored, anything else an error listing the accepted keys.
    ``eps`` only tightens the default tolerance (code written for SCS passes
    eps=1e-6 meaning "at least this accurate")."""
    merged = refuse_keys("qp", *arg_dicts, accepted=set(QP_KEYS) | set(QP_ALIASES))
    changes = {"eps_tightens": True}
    for key, value in merged.items():
        name = QP_ALIASES.get(key, key)
        if name in QP_KEYS:
            check_type("solver_args", key, value, QP_KEYS[name])
            changes[name] = value.item() if hasattr(value, "item") else value
    return QPSettings(**changes)


class QPRoute(Route):
    """CVXPY's QP form, presolved (`canon.presolve`: variables its equalities define
    are substituted away at each call, in torch), solved by the batched interior
    point, or in closed form when what is left is a box QP."""

    kind = "qp"

    @classmethod
    def _compile(cls, form, layout, arrays, meta):
        from ..canon import presolve  # numpy side only: the export never imports it

        program = form.program
        elim = presolve.find(program)
        meta.update(n=program.n, p=program.p, m=program.m,
                    batched={k: bool(program.batched[k]) for k in BLOCKS},
                    presolve=not elim.empty, box=elim.box)
        for k in BLOCKS:
            add_map(arrays, meta, k, program.maps[k])
        if not elim.empty:
            for name in ("keep", "pivots", "pivot_rows", "rest_rows"):
                arrays[f"presolve.{name}"] = getattr(elim, name)

    def __init__(self, tensors, meta):
        super().__init__(tensors, meta)
        self.maps = {k: self.map(k) for k in BLOCKS}
        n, p, m = meta["n"], meta["p"], meta["m"]
        self.shapes = {"Q": (n, n), "q": (n,), "G": (p, n), "h": (p,), "A": (m, n), "b": (m,)}
        self.elimination = (Substitution(*(tensors[f"presolve.{k}"] for k in
                                           ("keep", "pivots", "pivot_rows", "rest_rows")), n)
                            if meta.get("presolve") else None)

    def settings(self, layer_args, call_args=None, solver=None):
        return qp_settings(layer_args, call_args)

    def warm_shapes(self):
        n, p, m = self.meta["n"], self.meta["p"], self.meta["m"]
        if self.elimination is not None:  # the reduced problem's sizes
            n, m = self.elimination.keep.numel(), self.elimination.rest_rows.numel()
        return {"z": n, "lam": p, "s": p, "nu": m}

    def blocks(self, theta: torch.Tensor):
        """The six QP blocks; parameter-free blocks stay unbatched (shared)."""
        B = theta.shape[0]
        out = []
        for k in BLOCKS:
            lmap, shape = self.maps[k], self.shapes[k]
            if self.meta["batched"][k]:
                out.append(lmap(theta).reshape((B,) + shape))
            else:
                out.append(lmap.constant(theta.dtype, theta.device).reshape(shape))
        return out

    def solve(self, theta, settings, warm):
        blocks = self.blocks(theta)
        B = theta.shape[0]
        if self.elimination is None:
            (x, lam, nu), result = solve_qp(*blocks, batch=B, settings=settings, warm=warm)
        else:
            sub = self.elimination.at(*blocks)
            reduced = sub.reduced()
            closed = box_solve(*reduced[:4], B) if self.meta["box"] else None
            if closed is not None:
                (x_k, lam, nu_k), result = closed
            else:
                (x_k, lam, nu_k), result = solve_qp(*reduced, batch=B, settings=settings,
                                                    warm=warm)
            x, nu = sub.expand(x_k, lam, nu_k)
        y = torch.cat([nu, lam], dim=-1)  # CVXPY's row order: zero cone, then nonneg
        return self.read(x, y), result


class Substitution:
    """x_C = A[R, C]⁻¹ (b_R − A[R, K] x_K) applied to the QP blocks (`canon.presolve`).

    Blocks may be shared (unbatched) or batched; matmul broadcasts, so shared
    blocks give shared reduced blocks. Everything is torch: autograd carries the
    gradients through the substitution to the original blocks.
    """

    def __init__(self, keep, pivots, pivot_rows, rest_rows, n: int):
        self.keep, self.pivots, self.pivot_rows, self.rest_rows = keep, pivots, pivot_rows, \
            rest_rows
        self.n = n

    def at(self, Q, q, G, h, A, b) -> _Substituted:
        return _Substituted(self, Q, q, G, h, A, b)


class _Substituted:
    """One call's substitution: P = −D⁻¹ A[R, K], r = D⁻¹ b_R with D = A[R, C]."""

    def __init__(self, sub: Substitution, Q, q, G, h, A, b):
        dev = Q.device
        K, C, R, rest = (t.to(dev) for t in (sub.keep, sub.pivots, sub.pivot_rows,
                                              sub.rest_rows))
        self.sub, self.idx = sub, (K, C, R, rest)
        self.blocks = (Q, q, G, h, A, b)
        A_R = A.index_select(-2, R)
        self.D = A_R.index_select(-1, C)  # upper triangular, constant diagonal
        self.P = -torch.linalg.solve_triangular(self.D, A_R.index_select(-1, K), upper=True)
        self.r = torch.linalg.solve_triangular(
            self.D, b.index_select(-1, R).unsqueeze(-1), upper=True).squeeze(-1)

    def reduced(self):
        """The blocks of the QP in x_K (its equality rows: the non-pivot ones)."""
        Q, q, G, h, A, b = self.blocks
        K, C, _, rest = self.idx
        P, r = self.P, self.r
        Q_KC = Q.index_select(-2, K).index_select(-1, C)
        Q_CC = Q.index_select(-2, C).index_select(-1, C)
        QP = Q_KC @ P
        Qr = Q.index_select(-2, K).index_select(-1, K) + QP + QP.mT + P.mT @ Q_CC @ P
        q_C = q.index_select(-1, C) + _mv(Q_CC, r)
        qr = q.index_select(-1, K) + _mv(Q_KC, r) + _mv(P.mT, q_C)
        G_C = G.index_select(-1, C)
        Gr = G.index_select(-1, K) + G_C @ P
        hr = h - _mv(G_C, r)
        A_rest = A.index_select(-2, rest)
        return Qr, qr, Gr, hr, A_rest.index_select(-1, K), b.index_select(-1, rest)

    def expand(self, x_K, lam, nu_rest):
        """The full primal x and equality multipliers ν from the reduced solution; the
        pivot rows' ν from stationarity on the pivot columns, Dᵀ ν_R = −(Qx + q + Gᵀλ
        + A_restᵀ ν_rest)_C."""
        Q, q, G, h, A, b = self.blocks
        K, C, R, rest = self.idx
        B = x_K.shape[0]
        x_C = _mv(self.P, x_K) + self.r
        x = x_K.new_zeros(B, self.sub.n).index_copy(1, K, x_K).index_copy(1, C, x_C)
        grad = _mv(Q, x) + q + _mv(G.mT, lam) + _mv(A.index_select(-2, rest).mT, nu_rest)
        nu_R = -torch.linalg.solve_triangular(
            self.D.mT, grad.index_select(-1, C).unsqueeze(-1), upper=False).squeeze(-1)
        nu = x_K.new_zeros(B, A.shape[-2]).index_copy(1, R, nu_R).index_copy(1, rest, nu_rest)
        return x, nu


def _mv(M, v):
    """M v with broadcasting: M (k, n) or (B, k, n), v (n,) or (B, n)."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def box_solve(Q, q, G, h, B: int):
    """The closed form of a box QP (Q diagonal > 0, each row of G one variable):
    x = clamp(−q/d, lo, hi), λ from stationarity. None when some d ≤ 0 (then the
    interior point solves it). Autograd differentiates the clamp: the same
    derivative as the implicit function theorem away from ties."""
    d = Q.diagonal(dim1=-2, dim2=-1)
    if not bool((unwrap(d) > 0).all()):
        return None
    q = q.expand(B, -1) if q.dim() == 1 else q
    n, p = q.shape[-1], h.shape[-1]
    col = (G.detach().abs() > 0).to(torch.int64).argmax(-1)  # each row's variable
    g = G.gather(-1, col.unsqueeze(-1)).squeeze(-1)  # (p,) or (B, p)
    bound = h / torch.where(g == 0, torch.ones_like(g), g)  # no 0/0 in the backward
    g, bound = g.expand(B, p) if g.dim() == 1 else g, bound.expand(B, p)
    col = col.expand(B, p) if col.dim() == 1 else col
    inf = torch.full((B, n), float("inf"), dtype=q.dtype, device=q.device)
    hi = inf.scatter_reduce(1, col, torch.where(g > 0, bound, inf[:, :1].expand(B, p)),
                            "amin", include_self=True)
    lo = (-inf).scatter_reduce(1, col, torch.where(g < 0, bound, -inf[:, :1].expand(B, p)),
                               "amax", include_self=True)
    x = torch.minimum(torch.maximum(-q / d, lo), hi)
    rho = -(d * x + q)  # Σ over this variable's rows of gᵢλᵢ
    at = x.gather(1, col) == bound  # rows holding x at their bound (clamp: exactly)
    push = at & (torch.sign(rho.gather(1, col)) == torch.sign(g))
    share = torch.zeros(B, n, dtype=q.dtype, device=q.device).scatter_add(
        1, col, push.to(q.dtype)).gather(1, col).clamp_min(1)
    lam = torch.where(push, rho.gather(1, col) / (g * share), torch.zeros_like(g))
    nu = torch.zeros(B, 0, dtype=q.dtype, device=q.device)
    return (x, lam, nu), _box_status(x, lo, hi, g, h)


def _box_status(x, lo, hi, g, h) -> BoxSolution:
    """Per-sample codes, read from the plain values under any torch.func transform
    (like the interior point's, one per sample, a vmapped dimension folded in)."""
    lo, hi, g, h, x = (unwrap(t) for t in (lo, hi, g, h, x))
    # A row left with no variable (structurally, or a parameter at zero) reads 0 ≤ h.
    infeasible = (lo > hi).any(-1) | ((g == 0) & (h < 0)).any(-1)
    infeasible = infeasible.expand(x.shape[:-1]).reshape(-1)
    codes = torch.where(infeasible, INFEASIBLE, OPTIMAL)
    iterations = torch.zeros_like(codes)
    return BoxSolution(codes, iterations, x.new_zeros(codes.shape[0], 3))


class BoxSolution(Solution):
    """A box QP's closed form: exact, no iterations (nothing to warm-start)."""
