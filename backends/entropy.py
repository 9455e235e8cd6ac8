"""Exact solvers for entropy-regularized programs and simplex projections.

Conventions (see `canon.entropy`): per sample, x ∈ Rⁿ,

  entropy:  maximize θᵀx + τ Σ entr(xᵢ)  s.t.  Ax = b
            Its optimum is x = exp(a − Aᵀν), a = θ/τ − 1, for the scaled
            multiplier ν, which minimizes the smooth convex dual
            g(ν) = Σ exp(a − Aᵀν) + bᵀν  (size m, the number of equalities).
            Softmax (A = 1ᵀ, b = 1) is x = softmax(θ/τ) in closed form.

  simplex:  x = argmin ‖x − y‖²  s.t.  1ᵀx = r, x ≥ 0  (sparsemax for r = 1),
            x = max(y − t, 0) with t from a sort (Duchi et al. 2008).

Backward passes, from the implicit function theorem on the KKT conditions:

  entropy:  with H = A X Aᵀ (X = diag(x)) and κ = H⁺ A X ḡ,
            ∇θ = X(ḡ − Aᵀκ)/τ,  ∇b = κ           (a system of size m, not n)
            For softmax this is (diag(x) − x xᵀ)ḡ/τ, the seed's equation (9).
            H⁺ is the inverse where every xᵢ > 0; on a face (below) it is the
            pseudo-inverse, the minimum-norm choice along the b-directions that
            would leave the face (there the solution map has no derivative).
  simplex:  with S the support (xᵢ > 0) and s its indicator,
            ∇y = s ∘ (ḡ − (sᵀḡ)/|S|),  ∇r = (sᵀḡ)/|S|.
            At ties (yᵢ = t exactly) the support excludes i: a valid element of
            the generalized Jacobian.

How the entropy solve goes (all samples at once, in float64 whatever the
input dtype: exp overflows float32 at 88). The minimizer ν exists only when
some x > 0 has Ax = b, so the face of the orthant that Ax = b leaves matters:
coordinates every feasible x holds at 0 (1ᵀx = 1 with x₀ = 0, a zero transport
marginal, sum(x) = 0) are fixed at 0 (logit −inf) and the Hessian gets the
projector on its structural null space added, so Newton and the backward work
on the face.

  1. What the data say at once. Transport: a zero marginal holds its row or
     column at 0; a negative one, or unequal totals, is infeasible. General A:
     the dependent rows' b must follow from the kept rows' (else infeasible).
  2. Direct damped Newton at τ where max|θ/τ| ≤ LOGIT_DIRECT (always for 0/1
     systems, started from Sinkhorn sweeps): direction −H⁻¹∇g, step length by a
     safeguarded 1-D search for the minimum of g along it (exp makes t = 1 far
     too short from above, far too long from below), the first trial capped so
     that no exponent grows by more than STEP_EXPONENT_CAP; a step that stops
     past the minimum is checked on the exact change Σ xᵢ expm1(t sᵢ) − t bᵀd.
  3. The face, for general A. A converged solution with every free xᵢ ≥
     CERTIFY_MIN·max x certifies the whole orthant; otherwise the
     maximum-entropy point (θ = 0) may; otherwise one LP decides (HiGHS through
     scipy, per distinct b): max Σtᵢ s.t. Ax = s·b, 0 ≤ t ≤ x, t ≤ 1, s ≥ 1 is
     infeasible exactly when the equalities are, and its optimal t is the
     indicator of the coordinates some feasible x makes positive.
  4. Samples that did not converge, whose face step 3 shrank, or whose logits
     exceed LOGIT_DIRECT (small τ) are solved by continuation in τ: from
     τ₀ = τ·max|θ/τ|/LOGIT_DIRECT down by CONTINUATION_RATIO per stage, each
     stage started from the last one's unscaled multiplier λ = τν.

Statuses are decided here as a tensor of the shared status codes
(`backends.solution`: no per-sample Python, one device-to-host copy when the
caller reads them). The criterion, with dtype the input's:

  entropy:  INFEASIBLE when steps 1 or 3 find no x ≥ 0 with Ax = b. Otherwise x is
            stationary by construction (it is exp(a − Aᵀν)), so what is left is
              r  = ‖Ax − b‖∞ / (1 + ‖b‖∞)             (all rows, dependent ones too)
              δx = ‖X Aᵀ H⁺(b − Ax)‖∞ / (1 + ‖x‖∞)    (how far one more Newton step
                                                         would move x: its error)
            OPTIMAL when both are ≤ OPTIMAL_BOUND[dtype], OPTIMAL_INACCURATE when
            both are ≤ INACCURATE_BOUND[dtype], NUMERICAL_ERROR (a failure) otherwise.
  softmax:  OPTIMAL; INVALID_INPUT for a row with no finite logit, a +inf or a NaN.
  simplex:  INFEASIBLE for r < 0; otherwise OPTIMAL when |1ᵀx − r| ≤
            SIMPLEX_RESIDUAL·n·ε·|r| (the closed form's round-off), NUMERICAL_ERROR
            otherwise (a NaN sum from a non-finite y included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .autograd import ImplicitSolve
from .linalg import chol_solve, cholesky
from .solution import INACCURATE, INFEASIBLE, INVALID, NUMERICAL, OPTIMAL, Solution
from .status import Box

# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

WORK_DTYPE = torch.float64
# Newton stops when ‖Ax − b‖∞ ≤ NEWTON_TOL·(1 + ‖b‖∞) and the next step would
# move x by at most NEWTON_TOL·(1 + ‖x‖∞); float64 gets there in a few steps.
NEWTON_TOL = 1e-13
NEWTON_MAX_ITER = 100  # per continuation stage
# Status bounds on r and δx (see the module docstring), by the input's dtype.
OPTIMAL_BOUND = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3,
                 torch.bfloat16: 1e-2}
INACCURATE_BOUND = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2,
                    torch.bfloat16: 1e-1}
# Line search: minimize g along the Newton direction until its slope
# φ'(t) = Σ xᵢ sᵢ e^{t sᵢ} − bᵀd is this small against its two terms (they
# balance at the minimum), or the bracket this narrow relative to t, in at most
# LINE_SEARCH_STEPS evaluations. Not the usual |φ'(t)| ≤ 0.1|φ'(0)|: with exp that
# stops at t = 4 where the minimum is 500 away; near the solution t = 1 meets it.
LINE_SEARCH_BALANCE = 0.1
LINE_SEARCH_STEPS = 60
# A slope at t = 0 below this many ε of its terms is round-off: no search.
ROUNDOFF_SLOPE = 1e3
# The first trial step grows no exponent by more than this (exp(30) ≈ 1e13):
# far from the optimum the Newton step is wildly long (exponents of θ/τ ~ 1e3).
STEP_EXPONENT_CAP = 30.0
# Logits |θ/τ| up to this are solved directly; larger ones (small τ) by
# continuation in τ, the temperature falling by CONTINUATION_RATIO per stage
# (exp overflows float64 at 709: a start off by more cannot even be evaluated).
LOGIT_DIRECT = 30.0
CONTINUATION_RATIO = 10.0
MAX_STAGES = 20  # beyond CONTINUATION_RATIO**MAX_STAGES the ratio grows instead
# A solution certifies that every coordinate can be positive (the face is the
# whole orthant) when its smallest entry is at least this fraction of its largest.
CERTIFY_MIN = 1e-6
# Sinkhorn-style sweeps that initialize ν when A is a 0/1 matrix (sums of entries):
# at least INIT_SWEEPS, then on while the residual shrinks by SINKHORN_CONTRACTION
# every SINKHORN_CHECK sweeps, to the tolerance or SINKHORN_MAX_SWEEPS.
INIT_SWEEPS = 20
SINKHORN_CHECK = 5
SINKHORN_CONTRACTION = 0.5
SINKHORN_MAX_SWEEPS = 500
# Transport: marginal totals must agree to this (relative to 1 + Σ|a|).
TOTALS_TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
# Rank decisions on the face (singular values relative to the largest).
RANK_TOL = 1e-10
# Simplex: the closed form's residual bound, in units of n·ε·r (its round-off:
# n terms of size at most r, and the threshold's).
SIMPLEX_RESIDUAL = 8.0
# Softmax: θ/τ is formed directly while max|θ| ≤ τ·SOFTMAX_SAFE·(the dtype's max).
SOFTMAX_SAFE = 0.5


# ---------------------------------------------------------------------------
# Status codes
# ---------------------------------------------------------------------------


def _failed(codes: torch.Tensor) -> torch.Tensor:
    """Samples without a point (the shared codes of `backends.solution`)."""
    return (codes != OPTIMAL) & (codes != INACCURATE)


def _bound(table, dtype) -> float:
    return table.get(dtype, table[torch.float32])


# ---------------------------------------------------------------------------
# Equality operators: x ↦ Ax, ν ↦ Aᵀν and the dual Hessian A X Aᵀ
# ---------------------------------------------------------------------------


class DenseEqualities:
    """A constant dense (m, n) matrix, restricted to its independent rows."""

    kind = "general"

    def __init__(self, A: torch.Tensor, independent: torch.Tensor):
        self.full = A
        self.A = A[independent]
        self.independent = independent
        keep = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
        keep[independent] = True
        self.dependent = (~keep).nonzero().flatten()
        # Dependent rows as combinations of the kept ones (A_dep = C A_ind): their b
        # must follow by the same combination, or no x satisfies all rows.
        if self.dependent.numel():
            sol = torch.linalg.lstsq(self.A.T.double(), A[self.dependent].T.double())
            self.combination = sol.solution.T.to(A.dtype)
        else:
            self.combination = None

    def to(self, dtype):
        return self if self.full.dtype == dtype else DenseEqualities(self.full.to(dtype),
                                                                      self.independent)

    def matvec(self, x):
        return x @ self.A.T

    def rmatvec(self, nu):
        return nu @ self.A

    def full_matvec(self, x):
        return x @ self.full.T

    def dense(self):
        return self.A

    def hessian(self, x):
        return (self.A * x.unsqueeze(1)) @ self.A.T

    def nonnegative(self) -> bool:
        return bool((self.A >= 0).all()) and bool((self.A.sum(0) > 0).all())

    def column_weight(self):
        return self.A.sum(0)  # (Aᵀ1)ᵢ over the kept rows

    def binary(self) -> bool:
        return bool(((self.A == 0) | (self.A == 1)).all()) and bool((self.A.sum(0) > 0).all())

    def inconsistent(self, b, scale, bound):
        """Samples whose dependent rows' b does not follow from the kept rows'."""
        if self.combination is None:
            return torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        gap = b[:, self.dependent] - b[:, self.independent] @ self.combination.T
        return gap.abs().amax(-1) > bound * scale

    def sweeps(self, a, log_b, nu):
        return _DenseSweeps(self, a, log_b, nu)


class _DenseSweeps:
    """Damped Jacobi sweeps of exact row updates for 0/1 rows (Sinkhorn's step),
    on ν (B, m) for logits a (B, n) and targets log b (B, m)."""

    def __init__(self, eq, a, log_b, nu):
        self.eq, self.a, self.log_b, self.nu = eq, a, log_b, nu
        self.mask = torch.where(eq.A > 0, 0.0, -torch.inf).to(a)
        self.cover = eq.A.sum(0).amax()  # rows touching one entry at most: damp by it

    def step(self):
        e = self.a - self.eq.rmatvec(self.nu)
        row_lse = torch.logsumexp(e.unsqueeze(1) + self.mask, dim=-1)  # (B, m)
        self.nu = self.nu + (row_lse - self.log_b) / self.cover

    def residual(self, b):
        x = torch.exp(self.a - self.eq.rmatvec(self.nu))
        return (self.eq.matvec(x) - b).abs().amax(-1)

    def multiplier(self):
        return self.nu


class TransportEqualities:
    """Row and column sums of an r×c matrix stored column-major (x[i + j r] = X[i, j])."""

    kind = "transport"

    def __init__(self, r: int, c: int, independent: torch.Tensor):
        self.r, self.c = r, c
        self.independent = independent
        self._dense = None

    def to(self, dtype):
        return self

    def _X(self, x):
        return x.reshape(x.shape[0], self.c, self.r).transpose(1, 2)  # (B, r, c)

    def full_matvec(self, x):
        X = self._X(x)
        return torch.cat([X.sum(2), X.sum(1)], dim=1)

    def matvec(self, x):
        return self.full_matvec(x)[:, self.independent]

    def rmatvec(self, nu):
        full = torch.zeros(nu.shape[0], self.r + self.c, dtype=nu.dtype, device=nu.device)
        full[:, self.independent] = nu
        f, g = full[:, : self.r], full[:, self.r:]
        return (f.unsqueeze(2) + g.unsqueeze(1)).transpose(1, 2).reshape(nu.shape[0], -1)

    def dense(self):
        """The kept rows as a dense (m, r c) matrix (for faces only)."""
        if self._dense is None:
            eye = torch.eye(len(self.independent), dtype=WORK_DTYPE,
                            device=self.independent.device)
            self._dense = self.rmatvec(eye)
        return self._dense

    def hessian(self, x):
        X = self._X(x)
        B = X.shape[0]
        H = torch.zeros(B, self.r + self.c, self.r + self.c, dtype=x.dtype, device=x.device)
        H[:, : self.r, : self.r] = torch.diag_embed(X.sum(2))
        H[:, self.r:, self.r:] = torch.diag_embed(X.sum(1))
        H[:, : self.r, self.r:] = X
        H[:, self.r:, : self.r] = X.transpose(1, 2)
        idx = self.independent
        return H[:, idx][:, :, idx]

    def nonnegative(self) -> bool:
        return True

    def binary(self) -> bool:
        return True

    def marginal_face(self, b, scale, dtype):
        """(infeasible (B,), held (B, n)): a negative marginal or unequal totals
        leave nothing feasible; a zero marginal holds its row or column at 0."""
        a_, c_ = b[:, : self.r], b[:, self.r:]
        totals = (a_.sum(-1) - c_.sum(-1)).abs() > _bound(TOTALS_TOL, dtype) * (
            1 + a_.abs().sum(-1))
        negative = (b < 0).any(-1)
        zero_rows, zero_cols = a_ <= 0, c_ <= 0
        held = (zero_rows.unsqueeze(2) | zero_cols.unsqueeze(1)).transpose(1, 2)
        return negative | totals, held.reshape(b.shape[0], -1)

    def sweeps(self, a, log_b, nu):
        return _TransportSweeps(self, a, log_b, nu)

    def column_weight(self):
        # On the device of the kept rows' index (a CPU vector indexed with a CUDA one fails).
        ones = torch.ones(1, len(self.independent), dtype=torch.float64,
                          device=self.independent.device)
        return self.rmatvec(ones)[0]  # (Aᵀ1)ᵢ over the kept rows


class _TransportSweeps:
    """Log-domain Sinkhorn on the full potentials: X = exp(K − f ⊕ g) with K the
    logits as an (r, c) matrix; each sweep makes the row sums, then the column
    sums, exact (two logsumexps, no scatter: 30 % faster than sweeping ν).

    One marginal is redundant (equal totals) and its multiplier is held at 0 in
    ν. Holding it out of the sweep slows Sinkhorn to a crawl (residual 1e-4
    after 20 sweeps on 50×50 where the full sweep reaches 1e-10 in 18), so every
    potential is updated, the held-out target taken from the totals, and the
    gauge (f + t, g − t leaves X unchanged) puts it back at 0 in `multiplier`.
    Where that target is not positive the potential stays where it started.
    """

    def __init__(self, eq, a, log_b, nu):
        B, r, c = a.shape[0], eq.r, eq.c
        self.eq, self.r = eq, r
        self.K = eq._X(a).contiguous()  # (B, r, c)
        full = torch.zeros(B, r + c, dtype=a.dtype, device=a.device)
        full[:, eq.independent] = nu
        self.f, self.g = full[:, :r], full[:, r:]
        target = torch.zeros_like(full)
        target[:, eq.independent] = log_b
        keep = torch.zeros(r + c, dtype=torch.bool, device=a.device)
        keep[eq.independent] = True
        dropped = (~keep).nonzero().flatten().tolist()
        self.dropped = dropped[0] if len(dropped) == 1 else None
        if self.dropped is not None:
            mass = torch.where(keep, target.exp(), torch.zeros_like(target))
            rows, cols = mass[:, :r].sum(-1), mass[:, r:].sum(-1)
            held_out = (rows - cols) if self.dropped >= r else (cols - rows)
            if bool((held_out > 0).all()):
                target[:, self.dropped] = held_out.log()
                keep[self.dropped] = True
        self.log_rows, self.log_cols = target[:, :r], target[:, r:]
        self.keep = None if bool(keep.all()) else (keep[:r], keep[r:])

    def step(self):
        f = torch.logsumexp(self.K - self.g.unsqueeze(1), dim=2) - self.log_rows
        if self.keep is not None:
            f = torch.where(self.keep[0], f, self.f)
        g = torch.logsumexp(self.K - f.unsqueeze(2), dim=1) - self.log_cols
        if self.keep is not None:
            g = torch.where(self.keep[1], g, self.g)
        self.f, self.g = f, g

    def residual(self, b):
        X = torch.exp(self.K - self.f.unsqueeze(2) - self.g.unsqueeze(1))
        full = torch.cat([X.sum(2), X.sum(1)], dim=1)
        return (full[:, self.eq.independent] - b).abs().amax(-1)

    def multiplier(self):
        full = torch.cat([self.f, self.g], dim=1)
        if self.dropped is not None:
            r = self.r
            t = full[:, self.dropped:self.dropped + 1]
            sign = torch.ones_like(full[:1])
            sign[:, r:] = -1.0
            full = full - t * (sign if self.dropped < r else -sign)
        return full[:, self.eq.independent]


# ---------------------------------------------------------------------------
# Entropy programs: damped dual Newton
# ---------------------------------------------------------------------------


@dataclass
class _Data:
    """A batch for the dual Newton, in float64.

    a (B, n): logits θ/τ − 1, −inf where x is held at 0; b (B, m): the kept rows'
    targets; scale (B,): 1 + ‖b‖∞ over all rows; null (B, m, m) or None: the
    projector on the Hessian's structural null space (nonzero on faces only),
    added to the Hessian so that its inverse there is the pseudo-inverse.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    null: torch.Tensor | None = None

    def rows(self, idx):
        if idx is None:
            return self
        return _Data(self.a[idx], self.b[idx], self.scale[idx],
                     None if self.null is None else self.null[idx])

    def tempered(self, f):
        """The same problem at temperature τ/f (f ∈ (0, 1], per sample)."""
        return _Data((self.a + 1.0) * f.unsqueeze(-1) - 1.0, self.b, self.scale, self.null)


@dataclass
class _Iterate:
    nu: torch.Tensor  # (B, m)
    x: torch.Tensor  # (B, n)
    res: torch.Tensor  # (B,) ‖b − Ax‖∞ / scale over the kept rows
    dx: torch.Tensor  # (B,) the next Newton step's move of x, relative
    iterations: torch.Tensor  # (B,) steps taken
    factor: torch.Tensor  # (B, m, m) chol(H + null) at x

    def converged(self, bound):
        return (self.res <= bound) & (self.dx <= bound)

    def put(self, idx, other):
        """Overwrite samples ``idx`` (None: all) with ``other``'s point (iteration
        counts add up separately: a sample may be solved by several routes in turn)."""
        for k in ("nu", "x", "res", "dx", "factor"):
            _assign(self, k, idx, getattr(other, k))

    def take(self, mask):
        return _Iterate(self.nu[mask], self.x[mask], self.res[mask], self.dx[mask],
                        self.iterations[mask], self.factor[mask])


def _sel(t, idx):
    """Rows ``idx`` of t; None stands for all (no copy: the common whole-batch case)."""
    return t if idx is None else t[idx]


def _assign(obj, name, idx, value):
    if idx is None:
        setattr(obj, name, value)
    else:
        getattr(obj, name)[idx] = value


def _empty_iterate(B, n, m, device, x=None, nu=None):
    """Nothing solved yet: infinite residuals, factor I (a finite stand-in)."""
    z = dict(dtype=WORK_DTYPE, device=device)
    inf = torch.full((B,), torch.inf, **z)
    return _Iterate(torch.zeros(B, m, **z) if nu is None else nu,
                    torch.zeros(B, n, **z) if x is None else x, inf, inf.clone(),
                    torch.zeros(B, dtype=torch.long, device=device),
                    torch.eye(m, **z).expand(B, m, m).clone())


def _line_search(x, s, grad, d, b, skip, held: bool):
    """Step t for ν ← ν − t d (exponents move by +t s): the minimizer of the convex
    φ(t) = g(ν − t d) = Σ xᵢ e^{t sᵢ} − t bᵀd + const, by a safeguarded 1-D Newton.

    Newton's t = 1 is far from it where exp dominates: from e^{99} too high, t = 1
    lowers the exponents by about 1 (99 steps); the minimizer along d is found in
    a few evaluations: doubling t until φ' ≥ 0, then inside the bracket Newton
    while it halves the bracket, bisection otherwise (rtsafe's rule: from the
    steep side of an exponential, Newton creeps by 1/|s|). φ' < 0 on [0, lo]
    (convexity), so t = lo always decreases g. The search stops when φ'(t)'s two
    terms balance to LINE_SEARCH_BALANCE, or the bracket is that narrow (then
    t = lo, the side known to descend). Returns 0 where ``skip`` (converged
    samples: their round-off slopes would hold up the batch's search) or where
    φ'(0) is not negative beyond round-off (no descent).
    """
    slope0 = -(grad * d).sum(-1)  # φ'(0) = −∇gᵀH⁻¹∇g ≤ 0
    bd = (b * d).sum(-1)
    # Entries held at 0 must stay out of the sums (0·e^{t s} is NaN where e^{t s}
    # overflows); without any, the masks are skipped.
    live = (x > 0) if held else None
    zero = torch.zeros_like(x)

    def masked(v):
        return v if live is None else torch.where(live, v, zero)

    grow = masked(s).amax(-1)
    t = (STEP_EXPONENT_CAP / grow.clamp_min(1e-300)).clamp(max=1.0)
    lo, hi = torch.zeros_like(t), torch.full_like(t, torch.inf)
    width = torch.full_like(t, torch.inf)  # the bracket's width one step earlier
    # No descent, or one below round-off (its two terms cancel to ε): nothing to
    # search for; the sample has converged as far as float64 goes, or stalled.
    scale0 = (x * s).sum(-1).abs() + bd.abs()
    flat = skip | ~(slope0 < -ROUNDOFF_SLOPE * torch.finfo(x.dtype).eps * scale0)
    done, use_lo = flat.clone(), torch.zeros_like(flat)
    for _ in range(LINE_SEARCH_STEPS):
        w = masked(x * torch.exp(t.unsqueeze(-1) * s))
        ws = w * s
        slope = ws.sum(-1) - bd
        curve = (ws * s).sum(-1)
        ok = torch.isfinite(slope) & torch.isfinite(curve)
        below = ok & (slope < 0)
        lo = torch.where(~done & below, t, lo)
        hi = torch.where(~done & ~below, t, hi)
        balanced = ok & (slope.abs() <= LINE_SEARCH_BALANCE * (ws.sum(-1).abs() + bd.abs()))
        narrow = torch.isfinite(hi) & (hi - lo <= LINE_SEARCH_BALANCE * hi)
        use_lo = use_lo | (~done & narrow & ~balanced)
        done = done | balanced | narrow
        if bool(done.all()):
            if not bool((use_lo | (slope > 0)).any()):
                # φ' ≤ 0 at every t: g decreased (convexity), nothing to check.
                return torch.where(flat, torch.zeros_like(t), t)
            break
        newton = t - slope / curve
        bracketed = torch.isfinite(hi)
        fast = ok & (newton > lo) & (newton < hi) & (hi - lo <= 0.5 * width)
        width = torch.where(bracketed, hi - lo, width)
        # Unbracketed (φ' < 0 so far): at least double t (from far above, φ'
        # concave, Newton's step in t is about 1/|s|, no more).
        expand = torch.where(torch.isfinite(newton), torch.maximum(newton, 2.0 * t), 2.0 * t)
        within = torch.where(fast, newton, 0.5 * (lo + hi))
        t = torch.where(done, t, torch.where(bracketed, within, expand))
    # A stop just past the minimizer (slope > 0 but small) must still decrease g:
    # checked on the exact change Σ xᵢ expm1(t sᵢ) − t bᵀd (no large-value cancellation).
    rise = masked(x * torch.expm1(t.unsqueeze(-1) * s)).sum(-1) - t * bd
    accept = done & ~use_lo & torch.isfinite(t) & (t <= hi) & (rise < 0)
    t = torch.where(accept, t, lo)
    return torch.where(flat, torch.zeros_like(t), t)


def _newton(data: _Data, eq, nu, max_iter: int = NEWTON_MAX_ITER) -> _Iterate:
    """Damped Newton on g(ν) = Σ exp(a − Aᵀν) + bᵀν from ν, every sample at once.

    A sample stops when converged (NEWTON_TOL on the residual and on the next
    step's move of x), when no step decreases g (stalled: at round-off, or no
    minimizer), or after ``max_iter`` steps; the last evaluation is at the
    returned x, so its factor serves the backward pass. ``active`` is None while
    every sample iterates (no gathers), else the indices still iterating.
    """
    B, m = nu.shape
    out = _empty_iterate(B, data.a.shape[1], m, nu.device, x=torch.exp(data.a - eq.rmatvec(nu)),
                         nu=nu.clone())
    previous_dx = torch.full((B,), torch.inf, dtype=WORK_DTYPE, device=nu.device)
    finite = torch.isfinite(out.x).all(-1)  # overflowed starts: not solved
    active = None if bool(finite.all()) else finite.nonzero().flatten()
    held = bool(torch.isneginf(data.a).any())
    for it in range(max_iter + 1):
        if active is not None and active.numel() == 0:
            break
        sub = data.rows(active)
        x, nu_a = _sel(out.x, active), _sel(out.nu, active)
        grad = sub.b - eq.matvec(x)
        H = eq.hessian(x)
        if sub.null is not None:
            H = H + sub.null
        L, _ = cholesky(H)
        d = chol_solve(L, grad)
        s = eq.rmatvec(d)
        res = grad.abs().amax(-1) / sub.scale
        dx = (x * s.abs()).amax(-1) / (1.0 + x.amax(-1))
        for name, value in (("res", res), ("dx", dx), ("factor", L)):
            _assign(out, name, active, value)
        converged = (res <= NEWTON_TOL) & (dx <= NEWTON_TOL)
        # At round-off the residual is met but the step no longer shrinks: stop.
        stalled = (res <= NEWTON_TOL) & (dx > 0.5 * _sel(previous_dx, active))
        _assign_tensor(previous_dx, active, dx)
        go = ~converged & ~stalled
        if it == max_iter or not bool(go.any()):
            break
        t = _line_search(x, s, grad, d, sub.b, skip=~go, held=held)
        go = go & (t > 0)
        step = (t * go).unsqueeze(-1)
        _assign(out, "nu", active, nu_a - step * d)
        x_new = torch.exp(sub.a - eq.rmatvec(_sel(out.nu, active)))
        _assign(out, "x", active, torch.where(go.unsqueeze(-1), x_new, x))
        counts = _sel(out.iterations, active) + go.long()
        _assign(out, "iterations", active, counts)
        if not bool(go.all()):
            active = go.nonzero().flatten() if active is None else active[go]
    return out


def _assign_tensor(t, idx, value):
    if idx is None:
        t.copy_(value)
    else:
        t[idx] = value


def _sinkhorn_start(a, b, eq, tol, scale, start=None):
    """ν from log-domain Sinkhorn sweeps (0/1 A, b > 0), and the sweeps run.

    They continue past INIT_SWEEPS while they contract fast (by
    SINKHORN_CONTRACTION per SINKHORN_CHECK sweeps), up to the tolerance: at
    moderate temperatures that is the whole solve (50×50 transport, τ = 0.1:
    ~25 sweeps), and Newton finishes where the sweeps slow down (small τ).
    ``start`` (a warm start, finite rows only) begins the sweeps there and
    checks from the first SINKHORN_CHECK sweeps.
    """
    B, m = b.shape
    nu = torch.zeros(B, m, dtype=a.dtype, device=a.device)
    first_check = INIT_SWEEPS
    if start is not None:
        nu = torch.where(torch.isfinite(start).all(-1, keepdim=True), start, nu)
        first_check = SINKHORN_CHECK
    previous = None
    state = eq.sweeps(a, torch.log(b), nu)
    for sweep in range(1, SINKHORN_MAX_SWEEPS + 1):
        state.step()
        if sweep < first_check or sweep % SINKHORN_CHECK:
            continue
        residual = (state.residual(b) / scale).nan_to_num(torch.inf)
        if bool((residual <= tol).all()):
            break
        worst = float(residual.max())
        if previous is not None and not worst <= SINKHORN_CONTRACTION * previous:
            break  # slow contraction: dual Newton takes over
        previous = worst
    nu = state.multiplier()
    return torch.where(torch.isfinite(nu), nu, torch.zeros_like(nu)), sweep


def _start(data: _Data, eq, warm):
    """A starting ν with a finite, well-scaled dual, and the Sinkhorn sweeps run.

    0/1 systems with b > 0 and nothing held: Sinkhorn sweeps. Otherwise the warm
    start where given, else ν with every exponent a − Aᵀν ≤ 0 when A ≥ 0, else 0.
    """
    a, b = data.a, data.b
    B, m = b.shape
    if warm is not None:
        warm = warm.to(dtype=a.dtype, device=a.device)
    if eq.binary() and bool((b > 0).all()) and bool(torch.isfinite(a).all()):
        return _sinkhorn_start(a, b, eq, NEWTON_TOL, data.scale, start=warm)
    if eq.nonnegative():
        finite = torch.where(torch.isfinite(a), a, torch.full_like(a, -torch.inf))
        t = (finite / eq.column_weight().to(a)).amax(-1, keepdim=True)
        nu = torch.where(torch.isfinite(t), t, torch.zeros_like(t)).expand(B, m).clone()
    else:
        nu = torch.zeros(B, m, dtype=a.dtype, device=a.device)
    if warm is not None:
        nu = torch.where(torch.isfinite(warm).all(-1, keepdim=True), warm, nu)
    return nu, 0


def _reach(a):
    """max |θ/τ| = max |a + 1| over the finite logits per sample (0 when none)."""
    finite = torch.isfinite(a)
    return torch.where(finite, (a + 1.0).abs(), torch.zeros_like(a)).amax(-1)


def _continuation(data: _Data, eq, nu, reach) -> _Iterate:
    """Solve at τ by a sequence of temperatures τ/f, f = LOGIT_DIRECT/reach rising
    to 1 by CONTINUATION_RATIO (more per stage past MAX_STAGES), each stage started
    from the last one's unscaled multiplier λ = τν (ν scales by the ratio)."""
    B = nu.shape[0]
    f = (LOGIT_DIRECT / reach.clamp_min(1e-300)).clamp(max=1.0)
    ratio = torch.maximum(torch.full_like(f, CONTINUATION_RATIO),
                          (1.0 / f) ** (1.0 / MAX_STAGES))
    out = _empty_iterate(B, data.a.shape[1], nu.shape[1], nu.device)
    todo = torch.arange(B, device=nu.device)
    while todo.numel():
        stage = _newton(data.rows(todo).tempered(f[todo]), eq, nu[todo])
        final = f[todo] >= 1.0
        out.iterations[todo] += stage.iterations
        out.put(todo[final], stage.take(final))
        grow = torch.minimum(f[todo] * ratio[todo], torch.ones_like(f[todo]))
        nu[todo] = stage.nu * (grow / f[todo]).unsqueeze(-1)
        f[todo] = grow
        todo = todo[~final]
    return out


# ---------------------------------------------------------------------------
# Feasibility and the face of the orthant
# ---------------------------------------------------------------------------


def _certified(x, held, b):
    """Every coordinate not held at 0 is comfortably positive: the face is all of them.

    Relative to the largest entry: coordinates forced to 0 shrink while the
    others stay of the order of b. Unless b = 0, where all may shrink together
    (1ᵀx = 0): never certified here, the LP decides.
    """
    free_min = torch.where(held, torch.full_like(x, torch.inf), x).amin(-1)
    return (free_min >= CERTIFY_MIN * x.amax(-1)) & (b != 0).any(-1)


def _null_projector(eq, held):
    """(k, m, m): I − P, P the projector on the range of the kept rows of A
    restricted to the free columns, i.e. on the Hessian A X Aᵀ's range on that face."""
    A = eq.dense().to(WORK_DTYPE)
    gram = (A.unsqueeze(0) * (~held).unsqueeze(1).to(A.dtype)) @ A.T  # A_S A_Sᵀ
    w, V = torch.linalg.eigh(gram)
    keep = w > RANK_TOL * w.amax(-1, keepdim=True).clamp_min(0)
    keep = keep & (w > 0)
    V = V * keep.unsqueeze(1).to(V.dtype)
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return eye - V @ V.mT


def _face_null(eq, held):
    """The Data.null term for a batch: I − P on samples with held coordinates."""
    faces = held.any(-1)
    if not bool(faces.any()):
        return None
    m = len(eq.independent)
    null = torch.zeros(held.shape[0], m, m, dtype=WORK_DTYPE, device=held.device)
    null[faces] = _null_projector(eq, held[faces])
    return null


def _lp_face(A, b, held):
    """Feasibility and face of {x ≥ 0 : Ax = b, x_held = 0} by one LP (numpy in and out).

    max Σt  s.t.  Ax = s b,  0 ≤ t ≤ 1,  t ≤ x,  x ≥ 0,  s ≥ 1: the set {(x, s)} is
    a cone (s unbounded), so any coordinate some feasible x makes positive reaches
    t = 1 and the others stay at 0. Returns (False, None) when infeasible,
    (True, forced) otherwise, None when the LP solver does not finish.
    """
    import numpy as np
    import scipy.optimize
    import scipy.sparse as sp

    m, n = A.shape
    M = np.hstack([A, -b[:, None]])
    norms = np.abs(M).max(1)
    M = M / np.where(norms > 0, norms, 1.0)[:, None]  # unit rows help HiGHS's tolerances
    A_eq = sp.hstack([sp.csr_matrix(M[:, :n]), sp.csr_matrix((m, n)), sp.csr_matrix(M[:, n:])])
    eye = sp.identity(n, format="csr")
    A_ub = sp.hstack([-eye, eye, sp.csr_matrix((n, 1))])
    c = np.concatenate([np.zeros(n), -np.ones(n), [0.0]])
    bounds = ([(0.0, 0.0) if h else (0.0, None) for h in held] + [(0.0, 1.0)] * n
              + [(1.0, None)])
    res = scipy.optimize.linprog(c, A_ub=A_ub, b_ub=np.zeros(n), A_eq=A_eq, b_eq=np.zeros(m),
                                 bounds=bounds, method="highs")
    if res.status == 2:
        return False, None
    if res.status != 0:
        return None
    return True, res.x[n:2 * n] < 0.5


def _decide_faces(eq, b, held):
    """(infeasible, held, undecided) for samples (k,) by the LP, one per distinct (b, held)."""
    keys = torch.cat([b, held.to(b.dtype)], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    A = eq.full.detach().cpu().double().numpy()
    m = b.shape[1]
    infeasible = torch.zeros(len(unique), dtype=torch.bool)
    undecided = torch.zeros(len(unique), dtype=torch.bool)
    forced = unique[:, m:].cpu() > 0
    for u, row in enumerate(unique.cpu().numpy()):
        answer = _lp_face(A, row[:m], row[m:] > 0)
        if answer is None:
            undecided[u] = True
        elif not answer[0]:
            infeasible[u] = True
        else:
            forced[u] |= torch.as_tensor(answer[1])
    inverse = inverse.cpu()
    device = b.device
    return (infeasible[inverse].to(device), forced[inverse].to(device),
            undecided[inverse].to(device))


def _max_entropy(data: _Data, eq) -> _Iterate:
    """The maximum-entropy point (θ = 0) of each sample's constraints: converged with
    every free coordinate comfortably positive certifies the face."""
    a = torch.where(torch.isneginf(data.a), data.a, torch.full_like(data.a, -1.0))
    flat = _Data(a, data.b, data.scale, data.null)
    nu, _ = _start(flat, eq, None)
    return _newton(flat, eq, nu)


# ---------------------------------------------------------------------------
# The solve: faces, direct Newton, continuation, statuses
# ---------------------------------------------------------------------------


@dataclass
class EntropyResult(Solution):
    """``residuals``: (r, δx, 0) of the module docstring; ``iterations``: Sinkhorn
    sweeps plus Newton steps."""

    x: torch.Tensor = None  # (B, n) in the input's dtype
    x_work: torch.Tensor = None  # (B, n) float64, what the backward uses
    nu: torch.Tensor = None  # (B, m) float64
    factor: torch.Tensor = None  # (B, m, m) chol(A X Aᵀ + null) at x

    def warm_start(self) -> dict:
        return {"nu": self.nu.detach()}


class _Batch:
    """The state of one entropy solve: data, what is held at 0, the best point."""

    def __init__(self, data, eq, held, b, out):
        self.data, self.eq, self.held, self.b, self.out = data, eq, held, b, out

    def record(self, idx, it: _Iterate, extra_iterations=0):
        """Samples ``idx`` (None: all) take ``it``'s point; iterations add up."""
        self.out.put(idx, it)
        _assign(self.out, "iterations", idx,
                _sel(self.out.iterations, idx) + it.iterations + extra_iterations)

    def hold(self, idx, forced):
        """Fix more coordinates at 0 on samples ``idx`` (the face found by the LP)."""
        self.held[idx] = forced
        self.data.a[idx] = self.data.a[idx].masked_fill(forced, -torch.inf)
        null = _face_null(self.eq, self.held)
        self.data.null = null


def _direct(batch: _Batch, idx, warm, bound):
    """Newton at the target temperature on samples ``idx`` (None: all); returns
    (converged, face certified) for them."""
    sub = batch.data.rows(idx)
    nu, sweeps = _start(sub, batch.eq, None if warm is None else _sel(warm, idx))
    it = _newton(sub, batch.eq, nu)
    batch.record(idx, it, sweeps)
    converged = it.converged(bound)
    if batch.eq.kind == "transport":  # the marginals told the face exactly
        return converged, torch.ones_like(converged)
    return converged, converged & _certified(it.x, _sel(batch.held, idx), _sel(batch.b, idx))


def _settle_faces(batch: _Batch, idx, infeasible, bound):
    """Certify the face of dense samples ``idx``, by the maximum-entropy point or
    else the LP. Returns (ν to start a re-solve from, whether the LP fixed more
    coordinates at 0)."""
    eq = batch.eq
    flat = _max_entropy(batch.data.rows(idx), eq)
    sure = flat.converged(bound) & _certified(flat.x, batch.held[idx], batch.b[idx])
    changed = torch.zeros_like(sure)
    unsure = idx[~sure]
    if unsure.numel():
        # An LP that does not finish leaves the face as it was: the status then
        # rests on the residuals, as for any sample.
        lp_infeasible, forced, _ = _decide_faces(eq, batch.b[unsure], batch.held[unsure])
        infeasible[unsure] |= lp_infeasible
        changed[~sure] = (forced & ~batch.held[unsure]).any(-1)
        batch.hold(unsure, forced)
        again = _max_entropy(batch.data.rows(unsure), eq)
        flat.nu[~sure] = again.nu
        flat.iterations[~sure] += again.iterations
    batch.out.iterations[idx] += flat.iterations
    return flat.nu, changed


def _codes(r, dx, infeasible, invalid, dtype):
    opt, inacc = _bound(OPTIMAL_BOUND, dtype), _bound(INACCURATE_BOUND, dtype)
    worst = torch.maximum(r, dx).nan_to_num(torch.inf)
    codes = torch.where(worst <= opt, OPTIMAL, torch.where(worst <= inacc, INACCURATE, NUMERICAL))
    codes = torch.where(infeasible, INFEASIBLE, codes)
    return torch.where(invalid, INVALID, codes)


def solve_entropy(theta, b, tau: float, eq, need_factor: bool = True,
                  warm_nu: torch.Tensor | None = None) -> EntropyResult:
    """All samples at once (θ: (B, n), b: (B, m_full)); see the module docstring.

    ``warm_nu`` (B, m) starts the direct solve from a previous multiplier where
    finite. ``need_factor`` is kept for the callers: the factor at the solution is
    a by-product of the last Newton evaluation.
    """
    out_dtype, device = theta.dtype, theta.device
    eq = eq.to(WORK_DTYPE)
    theta, b = theta.to(WORK_DTYPE), b.to(WORK_DTYPE)
    B, n = theta.shape
    a = theta / tau - 1.0
    if bool(torch.isfinite(a).all()):  # the common case: nothing masked or invalid
        invalid = torch.zeros(B, dtype=torch.bool, device=device)
        held = torch.zeros(B, n, dtype=torch.bool, device=device)
    else:
        invalid = torch.isnan(a).any(-1) | torch.isposinf(a).any(-1)
        a = torch.where(invalid.unsqueeze(-1), torch.zeros_like(a), a)
        held = torch.isneginf(a)
    scale = 1.0 + b.abs().amax(-1)
    if eq.kind == "transport":
        infeasible, forced = eq.marginal_face(b, scale, out_dtype)
        held = held | forced
    else:
        infeasible = eq.inconsistent(b, scale, _bound(INACCURATE_BOUND, out_dtype))
    data = _Data(a.masked_fill(held, -torch.inf), b[:, eq.independent], scale)
    data.null = _face_null(eq, held)
    batch = _Batch(data, eq, held, b, _empty_iterate(B, n, len(eq.independent), device))
    bound = _bound(OPTIMAL_BOUND, out_dtype)
    todo = ~infeasible & ~invalid
    converged = torch.zeros_like(todo)
    certified = torch.full_like(todo, eq.kind == "transport")
    direct = todo & (True if eq.binary() else _reach(data.a) <= LOGIT_DIRECT)
    if bool(direct.all()):  # the common case: every sample at once, no gathers
        converged, certified = _direct(batch, None, warm_nu, bound)
    elif bool(direct.any()):
        idx = direct.nonzero().flatten()
        converged[idx], certified[idx] = _direct(batch, idx, warm_nu, bound)
    # A dense system's face: certified by the solution, else settled now; a solve
    # that converged on a face the LP then confirms needs nothing more.
    start = torch.zeros(B, len(eq.independent), dtype=WORK_DTYPE, device=device)
    changed = torch.zeros_like(todo)
    check = todo & ~certified
    if bool(check.any()):
        idx = check.nonzero().flatten()
        start[idx], changed[idx] = _settle_faces(batch, idx, infeasible, bound)
    again = todo & ~infeasible & (~converged | changed)
    if bool(again.any()):
        idx = again.nonzero().flatten()
        it = _continuation(batch.data.rows(idx), eq, start[idx], _reach(batch.data.a[idx]))
        batch.record(idx, it)
    return _finish(batch, infeasible, invalid, out_dtype)


def _finish(batch: _Batch, infeasible, invalid, out_dtype) -> EntropyResult:
    out, eq = batch.out, batch.eq
    r = (eq.full_matvec(out.x) - batch.b).abs().amax(-1) / batch.data.scale
    codes = _codes(r, out.dx, infeasible, invalid, out_dtype)
    failed = _failed(codes)
    x, factor = out.x, out.factor
    if bool(failed.any()):
        # Failed samples: a finite stand-in (x = 0, factor I) keeps the backward finite.
        x = torch.where(failed.unsqueeze(-1), torch.zeros_like(x), x)
        eye = torch.eye(factor.shape[-1], dtype=WORK_DTYPE, device=x.device)
        factor = torch.where(failed[:, None, None], eye, factor)
    residuals = torch.stack([r, out.dx, torch.zeros_like(r)], -1)
    return EntropyResult(codes, out.iterations, residuals, x=x.to(out_dtype), x_work=x,
                         nu=out.nu, factor=factor)


# ---------------------------------------------------------------------------
# Autograd wiring for the dual Newton path
# ---------------------------------------------------------------------------


class EntropyProblem:
    """The dual-Newton solve as `autograd.ImplicitSolve` sees it: inputs (θ (B, n),
    b (B, m)), output x; backward by the reduced IFT system of size m."""

    name = "entropy (dual Newton) path"
    ranks = (1, 1)

    def __init__(self, batch: int, tau: float, eq, warm_nu=None):
        self.batch, self.tau, self.eq, self.warm_nu = batch, tau, eq, warm_nu

    def solve(self, theta, b):
        if theta.dim() == 1:  # a shared input (vmap): one copy per sample
            theta = theta.expand(self.batch, -1)
        if b.dim() == 1:
            b = b.expand(self.batch, -1)
        result = solve_entropy(theta, b, self.tau, self.eq, warm_nu=self.warm_nu)
        return (result.x,), _EntropySolved(result, self.tau, self.eq.to(WORK_DTYPE), b.shape)

    def folded(self, V: int) -> EntropyProblem:
        return EntropyProblem(V * self.batch, self.tau, self.eq)


class _EntropySolved:
    def __init__(self, result, tau, eq, b_shape):
        self.result, self.tau, self.eq, self.b_shape = result, tau, eq, b_shape
        self.batch = result.x.shape[0]
        self.ok = (~_failed(result.codes)).unsqueeze(-1)

    def adjoint(self, cotangents, needs, shared):
        (gx,) = cotangents
        x, eq = self.result.x_work, self.eq
        g = torch.where(self.ok, gx.to(WORK_DTYPE), torch.zeros_like(x))
        kappa = chol_solve(self.result.factor, eq.matvec(x * g))
        dtheta = x * (g - eq.rmatvec(kappa)) / self.tau
        db = torch.zeros(self.b_shape, dtype=WORK_DTYPE, device=x.device)
        db[:, eq.independent] = kappa
        grads = [dtheta.to(gx.dtype), db.to(gx.dtype)]
        return tuple(g.sum(0) if sh else g for g, sh in zip(grads, shared))


def entropy_solve(theta, b, tau: float, eq, warm_nu=None):
    """(x, EntropyResult), differentiable in θ and b (torch.func too)."""
    box = Box()
    problem = EntropyProblem(theta.shape[0], tau, eq, warm_nu)
    (x,) = ImplicitSolve.apply(problem, box, theta, b)
    return x, box.result


# ---------------------------------------------------------------------------
# Softmax: the closed form
# ---------------------------------------------------------------------------


def softmax(theta, tau: float, inspect: bool = True):
    """(x, codes or None): softmax(θ/τ), as softmax((θ − max θ)/τ) where θ/τ could
    overflow.

    θ/τ overflows for tiny τ (1e9/1e-300, or 50/1e-37 in float32) and gives NaN;
    θ − max θ ≤ 0 divided by τ does not, and softmax is shift-invariant. The max
    is detached: the shift's exact derivative is zero. One reduction, max |θ|,
    tells both whether that can happen and whether some logit is ±inf or NaN:
    then a row with no finite logit or a +inf one is INVALID_INPUT and gets
    stand-in logits 0 (a finite backward); −inf logits are masks (weight 0).
    ``inspect=False`` (inside torch.func transforms: nothing to look at) always
    shifts and reports nothing: the closed form has no other failure mode. Its
    autograd Jacobian is (diag(x) − x xᵀ)/τ.
    """
    codes = None
    if inspect:
        peak = float(theta.detach().abs().amax())  # NaN propagates (vector_norm: 6× slower)
        if peak <= tau * SOFTMAX_SAFE * torch.finfo(theta.dtype).max:
            return torch.softmax(theta / tau, dim=-1), None  # finite, no overflow
        lg = theta.detach()
        bad = ~torch.isfinite(lg).any(-1) | torch.isposinf(lg).any(-1) | torch.isnan(lg).any(-1)
        codes = torch.where(bad, INVALID, OPTIMAL)
        theta = torch.where(bad.unsqueeze(-1), torch.zeros_like(theta), theta)
    top = theta.detach().amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.softmax((theta - top) / tau, dim=-1), codes


# ---------------------------------------------------------------------------
# Simplex projection (sparsemax)
# ---------------------------------------------------------------------------


def project_simplex(y: torch.Tensor, r: torch.Tensor, inspect: bool = True):
    """(x, codes or None): argmin ‖x − y‖² over {x ≥ 0, 1ᵀx = r}; y (B, n), r (B, 1).

    r < 0 is INFEASIBLE (x = 0 stands in), r = 0 gives x = 0 (the only point);
    a sum off by more than the round-off bound (or NaN, from non-finite y) is
    NUMERICAL_ERROR. None: every sample optimal (one check, one sync).
    """
    x = _SimplexProjection.apply(y, r)
    if not inspect:
        return x, None
    with torch.no_grad():
        r_ = r.detach().squeeze(-1)
        bound = SIMPLEX_RESIDUAL * y.shape[-1] * torch.finfo(x.dtype).eps
        mass = x.detach().sum(-1)
        # One test for the common case: |sum − r| ≤ bound·r fails for r < 0 (a
        # negative right side) and for NaN as well as for a sum off by more.
        if bool(((mass - r_).abs() <= bound * r_).all()):
            return x, None
        good = (mass - r_.clamp_min(0)).abs() <= bound * r_.abs()
        codes = torch.where(good, OPTIMAL, NUMERICAL)
        codes = torch.where(r_ < 0, INFEASIBLE, codes)
    return x, codes


class _SimplexProjection(torch.autograd.Function):
    # Sort, cumsum, gather and where all vmap: torch.func derives the rule.
    generate_vmap_rule = True

    @staticmethod
    def forward(y, r):
        # Shift by max(y) first: the threshold is found among entries near the top,
        # which a large common offset would otherwise drown in round-off (float32
        # y = 1e3 + 1e-3·randn lost 2 % of the mass). Partial sums in float64.
        v = y - y.amax(-1, keepdim=True)
        u, _ = torch.sort(v, dim=-1, descending=True)
        if y.dtype != torch.float64:
            u, r = u.double(), r.double()
        css = torch.cumsum(u, dim=-1) - r
        k = torch.arange(1, y.shape[-1] + 1, dtype=u.dtype, device=y.device)
        cond = u * k > css  # u_k − (css_k)/k > 0
        # Size of the support; at least 1 so that r ≤ 0 gives t = max(v) − r and
        # x = 0 (r = 0: the only feasible point; r < 0: infeasible, reported by the caller).
        rho = cond.sum(-1, keepdim=True).clamp_min(1)
        t = (css.gather(-1, rho - 1) / rho.to(u.dtype)).to(y.dtype)
        x = torch.clamp(v - t, min=0)
        return torch.where(r > 0, x, torch.zeros_like(x))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = (x > 0).to(g.dtype)
        size = s.sum(-1, keepdim=True).clamp_min(1)
        mean = (s * g).sum(-1, keepdim=True) / size
        return s * (g - mean), mean
