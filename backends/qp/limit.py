"""The KKT system at the solution, solved by the implicit backward.

At a solution (z, s, λ, ν) every inequality row is active (s = 0) or inactive
(λ = 0, s > 0). Differentiating the KKT conditions (OptNet's equations; Amos &
Kolter 2017) in the limit μ → 0 of the interior point, an inactive row keeps
λ = 0 and drops out, and an active row holds as an equality, so the adjoint
a = M⁻¹g of the backward solves the equality-constrained system

    [ Q   Cᵀ ] [a_z]   [g_z]
    [ C   0  ] [a_C] = [g_C]        C = [G_active; A],   a_λ = 0 on inactive rows.

Which rows are active is read off the final iterate of the equilibrated problem:
row i is active when its normalized slack ŝᵢ/(1 + |ĥᵢ|) is below its multiplier
λ̂ᵢ. The interior point stops only when one of the two is at the tolerance
(see `ipm`), so the test is decided by many orders of magnitude everywhere except
at weakly active rows (both zero at the solution). There the solution map has
only one-sided derivatives and either side is a valid generalized derivative.
The rule is the same whatever the final status and never looks at other samples.

Each sample's rows C are gathered into a (k, n) block, k the largest count of
kept rows in the batch (padding rows are identity rows with zero right-hand
side), and factored once:

- Q positive definite (the Schur working space w = Lᵀz, where Q = I): one k×k
  Cholesky of K = C Cᵀ;
- any PSD Q: H = Q + CᵀC (positive definite exactly when the solution is unique),
  then S = C H⁻¹ Cᵀ (positive definite exactly when C has full row rank).

A singular factor means a tie: a non-unique solution (H) or dependent active rows
(S, K; duplicated or degenerate constraints). The factor is then taken of the
matrix plus a small multiple of the identity, and iterative refinement with the
exact operator converges to the minimum-norm solution along the tie's directions
(iterated Tikhonov): a finite generalized derivative, zero along the tie. A
sample whose refined residual still misses (an inconsistent right-hand side on a
tie) is solved by the pseudo-inverse, one sample at a time: rare by construction.
"""

from __future__ import annotations

import torch

from ..linalg import chol_solve

# Pivot ratio (min/max diagonal of the Cholesky factor, squared) below which a
# factor counts as singular, i.e. a tie; equilibrated data make it scale-free.
TIE_RATIO = 1e-12
# Relative shift of the diagonal of a singular factor (iterated Tikhonov).
TIE_SHIFT = 1e-9
# Iterative refinement with the exact operator: steps and target (relative residual).
REFINE_STEPS = 3
REFINE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def active_rows(s: torch.Tensor, lam: torch.Tensor, h: torch.Tensor,
                free: torch.Tensor | None) -> torch.Tensor:
    """(B, p) mask of the rows held as equalities at the solution (scaled data)."""
    active = s / (1.0 + h.abs()) < lam
    if free is not None:
        active = active & ~free
    return active


def _factor(M: torch.Tensor):
    """Cholesky with tie detection: (L, tie); a tie's factor is of M + shift·I.
    M (B, k, k), or (k, k) for a batch of one (tie is (B,) either way)."""
    if M.dim() == 2:
        L, tie = _factor(M.unsqueeze(0))
        return L[0], tie
    L, info = torch.linalg.cholesky_ex(M)
    diag = L.diagonal(dim1=-2, dim2=-1).abs()
    if diag.shape[-1]:
        ratio = (diag.amin(-1) / diag.amax(-1).clamp_min(1e-300)) ** 2
        tie = (info != 0) | ~(ratio >= TIE_RATIO)
    else:
        tie = info != 0
    if bool(tie.any()):
        idx = tie.nonzero().flatten()
        Mt = M[idx]
        scale = Mt.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        shift = TIE_SHIFT
        for _ in range(8):  # the shift only has to make the factor exist
            Lt, info_t = torch.linalg.cholesky_ex(Mt + (shift * scale)[:, None, None] * eye)
            if not bool((info_t != 0).any()):
                break
            shift *= 100.0
        L = L.index_copy(0, idx, Lt)
    return L, tie


def _solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return chol_solve(L, r)


def _Cx(C: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """C x per sample: C (k, n) shared or (B, k, n), x (B, n)."""
    return x @ C.T if C.dim() == 2 else (C @ x.unsqueeze(-1)).squeeze(-1)


def _CTy(C: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cᵀ y per sample: C (k, n) shared or (B, k, n), y (B, k)."""
    return y @ C if C.dim() == 2 else (C.mT @ y.unsqueeze(-1)).squeeze(-1)


class LimitSystem:
    """The factored limit system of one solve; see the module docstring.

    ``kkt`` is the interior point's elimination (for its working space and its
    exact products); ``active`` the (B, p) mask of active inequality rows.

    Layouts of the factors: with padding (samples keep different numbers of
    rows) ``order`` (B, k), ``valid`` (B, k) and C (B, k, n); without (every
    sample keeps k rows) ``valid`` is None; a batch of one keeps its rows as
    ``rows`` (k,) and C (k, n) and its factors 2-D, so that each product is one
    plain matrix product (the batch-of-one solve is made of such small steps).
    """

    def __init__(self, kkt, active: torch.Tensor, factor: bool = True):
        self.kkt = kkt
        B, m = active.shape[0], kkt.m
        self.active = active
        self.stale = False  # some sample's active set changed after this was built
        self.tie = torch.zeros(B, dtype=torch.bool, device=active.device)
        self.factors: dict = {}
        if not factor:
            return
        kept = torch.cat([active, torch.ones(B, m, dtype=torch.bool, device=active.device)], -1)
        stacked = (torch.cat([_rows(kkt.Gm, B), _rows(kkt.Am, B)], -2)
                   if kkt.Gm.dim() == 3 or kkt.Am.dim() == 3
                   else torch.cat([kkt.Gm, kkt.Am], -2))
        if B == 1:
            rows = kept[0].nonzero().squeeze(-1)
            C = (stacked if stacked.dim() == 2 else stacked[0]).index_select(0, rows)
            self.factors = {"rows": rows, "valid": None, "C": C}
        else:
            counts = kept.sum(-1)
            k_min, k = torch.stack([counts.amin(), counts.amax()]).tolist()
            # Each sample's kept rows first (stable: in their original order).
            order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[:, :k]
            C = _gather_rows(stacked, order)
            valid = None
            if k_min < k:  # padding rows: identity rows with zero right-hand side
                valid = kept.gather(1, order)
                C = C * valid.unsqueeze(-1)
            self.factors = {"order": order, "valid": valid, "C": C}
        valid = self.factors["valid"]
        pad = 0.0 if valid is None else torch.diag_embed((~valid).to(C.dtype))
        if kkt.name == "schur":
            self.factors["L"], self.tie = _factor(C @ C.mT + pad)
        else:
            Q = kkt.Qm if kkt.Qm.dim() == 3 or C.dim() == 2 else kkt.Qm.expand(B, -1, -1)
            if C.dim() == 2 and Q.dim() == 3:
                Q = Q[0]
            L_H, tie_h = _factor(Q + C.mT @ C)
            Y = torch.linalg.solve_triangular(L_H, C.mT, upper=False)
            L_S, tie_s = _factor(Y.mT @ Y + pad)
            self.factors.update(L=L_H, L_S=L_S)
            self.tie = tie_h | tie_s

    # ---- the exact operator (matrix-free, full coordinates) ------------------
    def apply(self, a_z, a_l, a_n):
        """The limit KKT matrix times (a_z, a_λ, a_ν) in the working space; inactive
        rows are identity rows (their right-hand side is set to zero)."""
        kkt, act = self.kkt, self.active
        a_act = torch.where(act, a_l, torch.zeros_like(a_l))
        top = kkt.hess(a_z) + kkt.GT(a_act)
        if kkt.m:
            top = top + kkt.AT(a_n)
        mid = torch.where(act, kkt.G(a_z), a_l)
        bottom = kkt.A(a_z) if kkt.m else a_n
        return top, mid, bottom

    def rhs(self, g_z, g_l, g_n):
        """The right-hand side with the inactive rows' entries removed."""
        return g_z, torch.where(self.active, g_l, torch.zeros_like(g_l)), g_n

    # ---- gathered coordinates: (a_z, a_c), a_c on each sample's kept rows -----
    def gather(self, g_l, g_n):
        f = self.factors
        g = torch.cat([g_l, g_n], -1) if g_n.shape[-1] else g_l
        if "rows" in f:
            return g.index_select(-1, f["rows"])
        g = g.gather(1, f["order"])
        return g if f["valid"] is None else g * f["valid"]

    def scatter(self, a_c, p: int):
        f = self.factors
        full = torch.zeros(a_c.shape[0], p + self.kkt.m, dtype=a_c.dtype, device=a_c.device)
        if "rows" in f:
            full = full.index_copy(-1, f["rows"], a_c)
        else:
            full = full.scatter(1, f["order"], a_c if f["valid"] is None else a_c * f["valid"])
        return full[:, :p], full[:, p:]

    def apply_gathered(self, a_z, a_c):
        """[[Q, Cᵀ], [C, 0]] (a_z, a_c), padding rows as identity rows: reads only
        the kept rows C, not all of G."""
        C, valid = self.factors["C"], self.factors["valid"]
        top = self.kkt.hess(a_z) + _CTy(C, a_c)
        bottom = _Cx(C, a_z)
        return top, (bottom if valid is None else torch.where(valid, bottom, a_c))

    def solve_gathered(self, g_z, g_c):
        f, C = self.factors, self.factors["C"]
        if self.kkt.name == "schur":
            a_c = _solve(f["L"], _Cx(C, g_z) - g_c)
            a_z = g_z - _CTy(C, a_c)
        else:
            t = g_z + _CTy(C, g_c)
            u = _solve(f["L"], t)
            a_c = _solve(f["L_S"], _Cx(C, u) - g_c)
            a_z = _solve(f["L"], t - _CTy(C, a_c))
        return a_z, a_c

    def solve(self, g_z, g_l, g_n):
        """The direct solve in full coordinates (inactive rows' entries are dropped)."""
        a_z, a_c = self.solve_gathered(g_z, self.gather(g_l, g_n))
        return (a_z, *self.scatter(a_c, g_l.shape[-1]))

    def solve_refined(self, g_z, g_l, g_n, steps: int = 1):
        """`solve` plus at least ``steps`` (at most REFINE_STEPS) steps of iterative
        refinement, until the residual's norm is within REFINE_TOL; returns
        (a, converged). A caller that checks entries one by one (the polish) asks
        for more steps where that check fails (`refine` continues a refinement): a
        right-hand side with entries of very different sizes (a cost of 1e12 on one
        variable) has a norm that hides the small entries' residuals, which keep
        improving after it stops."""
        run = self.refinement(g_z, g_l, g_n)
        self.refine(run, steps)
        return run.solution(), run.converged()

    def refinement(self, g_z, g_l, g_n) -> Refinement:
        """The direct solve of a right-hand side, ready for `refine` (no steps yet)."""
        rhs = (g_z, self.gather(g_l, g_n))
        tol = REFINE_TOL.get(g_z.dtype, 1e-12)
        scale = _norm(rhs).clamp_min(torch.finfo(g_z.dtype).tiny)
        run = Refinement(self, rhs, tol, scale, g_l.shape[-1])
        run.set(self.solve_gathered(*rhs))
        return run

    def refine(self, run: Refinement, steps: int) -> None:
        """Refinement steps on ``run`` until it has taken at least ``steps`` and its
        residual is within tolerance, or REFINE_STEPS in all. A second call with more
        ``steps`` continues where the first stopped: the same iterates as one call."""
        while run.k < REFINE_STEPS and not (run.k >= steps and run.converged_all()):
            run.set(tuple(s + e for s, e in zip(run.sol, self.solve_gathered(*run.resid))))
            run.k += 1


class Refinement:
    """Iterative refinement in progress: the solution in gathered coordinates, its
    residual and relative error, and the steps taken (``k``)."""

    def __init__(self, system: LimitSystem, rhs, tol: float, scale, p: int):
        self.system, self.rhs, self.tol, self.scale, self.p = system, rhs, tol, scale, p
        self.k = 0

    def set(self, sol) -> None:
        self.sol = sol
        self.resid = [r - a for r, a in zip(self.rhs, self.system.apply_gathered(*sol))]
        self.err = _norm(self.resid) / self.scale

    def converged(self) -> torch.Tensor:
        return self.err <= self.tol

    def converged_all(self) -> bool:
        return bool(self.converged().all())

    def solution(self):
        """(a_z, a_λ, a_ν) in full coordinates."""
        return (self.sol[0], *self.system.scatter(self.sol[1], self.p))


def _rows(M: torch.Tensor, B: int) -> torch.Tensor:
    return M if M.dim() == 3 else M.unsqueeze(0).expand(B, -1, -1)


def _gather_rows(M: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows ``order`` (B, k) of M ((r, n) shared or (B, r, n)) -> (B, k, n)."""
    if M.dim() == 2:
        return M[order]
    return M.gather(1, order.unsqueeze(-1).expand(-1, -1, M.shape[-1]))


def _norm(parts) -> torch.Tensor:
    return torch.cat(list(parts), -1).norm(dim=-1)


def min_norm(system: LimitSystem, rhs, samples: torch.Tensor):
    """Pseudo-inverse solutions of the limit system for a few ``samples`` (full coordinates)."""
    kkt = system.kkt
    g_z, g_l, g_n = system.rhs(*rhs)
    n, p, m = g_z.shape[-1], g_l.shape[-1], g_n.shape[-1]
    eye = torch.eye(n + p + m, dtype=g_z.dtype, device=g_z.device)
    out = [t.clone() for t in (g_z, g_l, g_n)]
    for i in samples.tolist():
        sub = _Single(system, i)
        cols = [torch.cat(sub.apply(*torch.split(e.unsqueeze(0), [n, p, m], -1)), -1)[0]
                for e in eye]
        M = torch.stack(cols, -1)
        sol = torch.linalg.pinv(M) @ torch.cat([g_z[i], g_l[i], g_n[i]])
        out[0][i], out[1][i], out[2][i] = torch.split(sol, [n, p, m])
    del kkt
    return tuple(out)


class _Single:
    """The limit operator of one sample (for the pseudo-inverse fallback)."""

    def __init__(self, system: LimitSystem, i: int):
        idx = torch.tensor([i], device=system.active.device)
        self.inner = LimitSystem(system.kkt.subset(idx, iteration_only=True),
                                 system.active[i:i + 1], factor=False)

    def apply(self, a_z, a_l, a_n):
        return self.inner.apply(a_z, a_l, a_n)
