"""The adjoint derivative of a cone program's solution map, at a solver's point.

Convention: `declarative.canon.cone` (primal Ax + s = b, s ∈ K; dual Aᵀy + c = 0,
y ∈ K*), cones in SCS order: zero, nonnegative, second-order, PSD, exponential,
dual exponential, power.

A primal-dual solution (x, y, s) is a zero of the residual map of the
homogeneous self-dual embedding (Busseti, Moursi & Boyd 2019; Agrawal et al.,
"Differentiating through a cone program", 2019), N = n + m + 1:

    R(z) = ((Q − I) Π + I)(z),    z = (x, y − s, 1),
    Q = [[0, Aᵀ, c], [−A, 0, b], [−cᵀ, −bᵀ, 0]]       (skew-symmetric),
    Π(z) = (x, Π_K*(y − s), max(1, 0)),

and the solution moves with the data as M dz = −dQ Π(z), M = DR(z) = (Q − I) DΠ(z) + I.
The adjoint of a gradient (dx, dy, ds) is r = M⁻ᵀ g with
g = (dx, DΠ_K*ᵀ(dy + ds) − ds, −(xᵀdx + yᵀdy + sᵀds)), and then
dA_ij = π_x,j r_y,i − π_y,i r_x,j,  db = π_y r_w − π_w r_y,  dc = π_x r_w − π_w r_x.

**M is singular at every solution**, and this is where accuracy is won or lost.
R is positively homogeneous, so M z = R(z) = 0; and Mᵀ Π(z) = 0 (from
Q Π(z) = Π(z) − z, DΠ(z) z = Π(z) and DΠ(z) Π(z) = Π(z)). The adjoint is still
well defined: g ⟂ z by construction, and a multiple of Π(z) added to r cancels
in the formulas for dA, db, dc (their skew form). At a solver's point, which is
optimal only to its tolerance (SCS: 1e-4), M is nonsingular by a margin of the
size of the residuals, and g has a component of that size along the near-null
direction; an exact solve of Mᵀ r = g (diffcp's dense mode forms (M Mᵀ)⁻¹ M g)
divides that component by the near-zero singular value and returns an O(1)
error: 40 % on the dual of a second-order cone. LSQR escapes only by stopping
before it resolves that direction. We remove the null directions instead
(deflation): with unit vectors p = Π(z)/‖Π(z)‖ and q = z/‖z‖,

    M̃ = M + β p qᵀ

is nonsingular with conditioning set by the rest of M's spectrum, and any
solution of M̃ᵀ r = g solves Mᵀ r = g up to a multiple of p when g ⟂ z (take
the inner product with z: zᵀMᵀ = 0, so β‖z‖ pᵀr = zᵀg). At a not-quite-optimal
point the error is then of the order of the residuals, as it should be.
Where M̃ has a further direction weaker than the point's accuracy (SCS stopped
inside a nearly optimal face of a degenerate LP), the dense solve drops it
(truncated SVD) instead of dividing by it; see `ConeAdjoint._dense_solver`.

Methods: "dense" factors M̃ once (LU; small programs); "lsqr" runs diffcp's
LSQR on M itself (a least-squares method never resolves the near-null
direction: its stopping rule ends first, so it needs no deflation); "lsmr",
and LSQR with power cones, run scipy's solver on the deflated operator. Power
cones, which diffcp does not differentiate, get their projection and its
derivative here (`power_projection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import diffcp._diffcp as _diffcp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from diffcp import cones as diffcp_cones
from scipy.linalg import lapack

ADJOINT_METHODS = ("dense", "lsqr", "lsmr")
# The accuracy assumed of even an exact point: M̃'s directions weaker than this
# (relative to its largest singular value) are treated as null.
ACCURACY_FLOOR = 1e-12
# The dense solve checks σ_min/σ_max of M̃ with this many inverse (and power)
# iterations, and takes the truncated SVD when the estimate is below
# SVD_TRIGGER_MARGIN × accuracy (the estimate of σ_min converges from above).
SINGULAR_VALUE_ITERATIONS = 6
SVD_TRIGGER_MARGIN = 2.0
# scipy's LSQR/LSMR on the deflated operator (power cones, or mode "lsmr"): it is
# nonsingular, so a tight tolerance converges.
LSQR_TOL = 1e-12
LSQR_MAX_ITER_FACTOR = 10  # iterations at most this many times N
# Power-cone projection: halvings of the bracket [0, |z₀|] for the boundary's |z|
# (100 take it below double precision).
POWER_BISECTION_ITERS = 100


# ---------------------------------------------------------------------------
# Power cones (diffcp has no projection derivative for them)
# ---------------------------------------------------------------------------

def power_projection(v: np.ndarray, alpha: np.ndarray):
    """Projection onto K_α = {(x, y, z): x^α y^(1−α) ≥ |z|, x, y ≥ 0} and its Jacobian.

    ``v`` (k, 3), ``alpha`` (k,) in (0, 1). Returns (p (k, 3), D (k, 3, 3)).

    Outside K_α and its polar −K_α*, the projection is on the boundary: with
    r = |z| and μ = |z₀| − r the multiplier of x^α y^(1−α) ≥ |z|, stationarity
    gives x(r) = ½(x₀ + √(x₀² + 4α r μ)), y(r) likewise with 1 − α, and r is the
    root in [0, |z₀|] of x(r)^α y(r)^(1−α) = r (bisection; the left side minus r
    decreases from ≥ 0 to < 0). The Jacobian differentiates that stationarity
    system, [[I − μ∇²φ, −∇φ], [∇φᵀ, 0]] (dp, dμ) = (dv, 0) with
    φ(p) = x^α y^(1−α) − |z|.
    """
    v = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    k = v.shape[0]
    x0, y0, z0 = v[:, 0], v[:, 1], v[:, 2]
    a, b = alpha, 1.0 - alpha
    p = np.zeros_like(v)
    D = np.zeros((k, 3, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = (x0 >= 0) & (y0 >= 0) & (np.power(np.maximum(x0, 0), a)
                                          * np.power(np.maximum(y0, 0), b) >= np.abs(z0))
        polar = (x0 <= 0) & (y0 <= 0) & (np.power(np.maximum(-x0, 0) / a, a)
                                         * np.power(np.maximum(-y0, 0) / b, b) >= np.abs(z0))
    p[inside] = v[inside]
    D[inside] = np.eye(3)
    rest = ~(inside | polar)
    flat = rest & (z0 == 0)  # the projection is (x₀₊, y₀₊, 0)
    p[flat, 0], p[flat, 1] = np.maximum(x0[flat], 0), np.maximum(y0[flat], 0)
    D[flat, 0, 0], D[flat, 1, 1] = (x0[flat] > 0), (y0[flat] > 0)
    edge = rest & ~flat
    if edge.any():
        p[edge], D[edge] = _power_boundary(v[edge], alpha[edge])
    return p, D


def _power_boundary(v, alpha):
    x0, y0, z0 = v[:, 0], v[:, 1], v[:, 2]
    a, b = alpha, 1.0 - alpha
    az = np.abs(z0)

    def xy(r):
        mu = az - r
        return (0.5 * (x0 + np.sqrt(x0 * x0 + 4 * a * r * mu)),
                0.5 * (y0 + np.sqrt(y0 * y0 + 4 * b * r * mu)))

    lo, hi = np.zeros_like(az), az.copy()
    for _ in range(POWER_BISECTION_ITERS):
        r = 0.5 * (lo + hi)
        x, y = xy(r)
        above = np.power(x, a) * np.power(y, b) > r
        lo = np.where(above, r, lo)
        hi = np.where(above, hi, r)
    r = 0.5 * (lo + hi)
    x, y = xy(r)
    mu = az - r
    sign = np.sign(z0)
    p = np.stack([x, y, sign * r], axis=1)
    # ∇φ and ∇²φ of φ = x^a y^b − |z| at p (g = x^a y^b = r on the boundary).
    g = r
    grad = np.stack([a * g / x, b * g / y, -sign], axis=1)
    H = np.zeros((len(r), 3, 3))
    H[:, 0, 0] = a * (a - 1) * g / (x * x)
    H[:, 0, 1] = H[:, 1, 0] = a * b * g / (x * y)
    H[:, 1, 1] = b * (b - 1) * g / (y * y)
    J = np.zeros((len(r), 4, 4))
    J[:, :3, :3] = np.eye(3) - mu[:, None, None] * H
    J[:, :3, 3] = -grad
    J[:, 3, :3] = grad
    rhs = np.zeros((len(r), 4, 3))
    rhs[:, :3, :] = np.eye(3)
    D = np.linalg.solve(J, rhs)[:, :3, :]
    return p, D


def _dual_power_blocks(v: np.ndarray, alphas) -> tuple[np.ndarray, np.ndarray]:
    """Π_K* and DΠ_K* on the power-cone rows (k, 3) of v, by Moreau.

    SCS's "p" entries: α > 0 is K_α (whose dual is K_α*), α < 0 the dual cone
    K_|α|* (whose dual is K_|α|). Π_K*(v) = v + Π_K(−v); for K = K_α*, whose dual is
    K_α, it is Π_K_α(v) directly.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    primal = alphas > 0
    out = np.empty_like(v)
    D = np.empty((v.shape[0], 3, 3))
    if primal.any():
        p, Dp = power_projection(-v[primal], alphas[primal])
        out[primal] = v[primal] + p
        D[primal] = np.eye(3) - Dp
    if (~primal).any():
        out[~primal], D[~primal] = power_projection(v[~primal], -alphas[~primal])
    return out, D


# ---------------------------------------------------------------------------
# The dual-cone projection and its derivative, cone by cone
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _DualProjection:
    """Π_K*(v) and DΠ_K*(v) (symmetric) for one program's cone."""

    value: np.ndarray  # (m,)
    v0: np.ndarray  # v on the diffcp rows
    diffcp_rows: int  # rows handled by diffcp (all cones but the power cones)
    diffcp_op: object  # diffcp LinearOperator on those rows, or None
    power: np.ndarray  # (k, 3, 3) power-cone blocks
    cones: list = field(repr=False)

    def dense(self) -> np.ndarray:
        m0 = self.diffcp_rows
        k = self.power.shape[0]
        D = np.zeros((m0 + 3 * k, m0 + 3 * k))
        if m0:
            D[:m0, :m0] = np.asarray(_diffcp.dprojection_dense(self.v0, self.cones, True))
        for i in range(k):
            j = m0 + 3 * i
            D[j:j + 3, j:j + 3] = self.power[i]
        return D

    def matvec(self, u: np.ndarray) -> np.ndarray:
        m0 = self.diffcp_rows
        out = np.empty_like(u)
        if m0:
            out[:m0] = self.diffcp_op.matvec(u[:m0])
        if self.power.shape[0]:
            out[m0:] = np.einsum("kij,kj->ki", self.power, u[m0:].reshape(-1, 3)).ravel()
        return out

    rmatvec = matvec  # projections onto convex sets have symmetric Jacobians


def dual_projection(v: np.ndarray, cone_dict: dict) -> _DualProjection:
    v = np.asarray(v, dtype=np.float64)
    cones = diffcp_cones.parse_cone_dict(cone_dict)
    alphas = list(cone_dict.get("p", []) or [])
    m0 = v.size - 3 * len(alphas)
    value = np.empty_like(v)
    cpp = diffcp_cones.parse_cone_dict_cpp(cones)
    op = None
    if m0:
        value[:m0] = diffcp_cones.pi(v[:m0], cones, dual=True)
        op = _diffcp.dprojection(v[:m0], cpp, True)
    if alphas:
        pv, power = _dual_power_blocks(v[m0:].reshape(-1, 3), alphas)
        value[m0:] = pv.ravel()
    else:
        power = np.zeros((0, 3, 3))
    return _DualProjection(value, v[:m0].copy(), m0, op, power, cpp)


# ---------------------------------------------------------------------------
# The adjoint
# ---------------------------------------------------------------------------

def embedding_matrix(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray) -> sp.csc_matrix:
    """Q (N × N, skew) of the homogeneous embedding."""
    return sp.bmat([[None, A.T, c[:, None]],
                    [-A, None, b[:, None]],
                    [-c[None, :], -b[None, :], None]], format="csr")


def _singular_value_ratio(M: np.ndarray, lu, piv) -> float:
    """σ_min/σ_max of M, estimated from its LU factors in O(N²) per iteration.

    Inverse iteration on (MᵀM)⁻¹ for σ_min and power iteration on MᵀM for
    σ_max; both converge fast where the ratio matters (an isolated tiny σ).
    LAPACK's 1-norm condition estimate was 20x pessimistic on regular SOCPs.
    """
    start = np.cos(np.arange(M.shape[0]) + 1.0)  # fixed, far from any structure
    v = start / np.linalg.norm(start)
    for _ in range(SINGULAR_VALUE_ITERATIONS):
        w = lapack.dgetrs(lu, piv, lapack.dgetrs(lu, piv, v, trans=1)[0])[0]
        norm = np.linalg.norm(w)
        if not np.isfinite(norm) or norm == 0.0:
            return 0.0
        v = w / norm
    u = v_max = start / np.linalg.norm(start)
    for _ in range(SINGULAR_VALUE_ITERATIONS):
        u = M.T @ (M @ v_max)
        v_max = u / np.linalg.norm(u)
    largest = np.linalg.norm(M @ v_max)
    return float(np.linalg.norm(M @ v) / largest) if largest > 0 else 0.0


@dataclass
class ConeAdjoint:
    """The adjoint derivative of one program at its solver's point (x, y, s).

    ``rows``/``cols`` is A's stored pattern (explicit zeros included); the
    adjoint returns dA's values on it, so they line up with the data map.
    """

    x: np.ndarray
    y: np.ndarray
    s: np.ndarray
    Q: sp.csr_matrix
    proj: _DualProjection
    rows: np.ndarray
    cols: np.ndarray
    method: str  # "dense" (LU of M̃), "lsqr" or "lsmr" (on the deflated operator)
    # Relative accuracy of the point (its largest scaled residual): directions of
    # M̃ weaker than this (relative to σ_max) are not determined by it.
    accuracy: float = ACCURACY_FLOOR
    _solve: object = None
    _op: object = None

    @classmethod
    def at(cls, A: sp.csc_matrix, b, c, cone_dict: dict, x, y, s, rows, cols,
           method: str, accuracy: float = 0.0) -> ConeAdjoint:
        if method not in ADJOINT_METHODS:
            raise ValueError(f"adjoint method must be one of {ADJOINT_METHODS}, got {method!r}.")
        proj = dual_projection(y - s, cone_dict)
        return cls(x, y, s, embedding_matrix(A, b, c), proj, rows, cols, method,
                   max(float(accuracy), ACCURACY_FLOOR))

    @property
    def n(self) -> int:
        return self.x.size

    def _null_vectors(self):
        """Unit right (z) and left (Π(z)) null vectors of M at an exact solution."""
        z = np.concatenate([self.x, self.y - self.s, [1.0]])
        pz = np.concatenate([self.x, self.proj.value, [1.0]])
        return pz / np.linalg.norm(pz), z / np.linalg.norm(z)

    def _scale(self) -> float:
        """β: the deflated direction's singular value, at the scale of Q."""
        return max(1.0, float(np.abs(self.Q.data).max())) if self.Q.nnz else 1.0

    def _dense_matrix(self) -> np.ndarray:
        """M̃ = (Q − I) DΠ + I + β p qᵀ, dense."""
        n, N = self.n, self.Q.shape[0]
        D = np.zeros((N, N))
        D[:n, :n] = np.eye(n)
        D[n:N - 1, n:N - 1] = self.proj.dense()
        D[N - 1, N - 1] = 1.0  # w = 1 > 0
        M = np.asarray(self.Q @ D) - D
        M[np.diag_indices(N)] += 1.0
        p, q = self._null_vectors()
        M += self._scale() * np.outer(p, q)
        return M

    def _dense_solver(self):
        """g ↦ r with M̃ᵀ r = g, factored once (the first backward) and reused.

        LU, unless M̃'s smallest singular value is below the point's accuracy
        (relative to the largest): then that direction of M̃ is not resolved by
        this point, and an exact solve amplifies the point's error along it
        (SCS's point on an edge of a degenerate LP's optimal face, 0.16 from
        the vertex: gradients 1900 off, diffcp's LSQR 200 off). The solve is
        then the truncated SVD, dropping singular values below accuracy·σ_max
        (0.14 off there). The test costs a few O(N²) iterations on the LU.
        """
        if self._solve is None:
            M = self._dense_matrix()
            lu, piv, info = lapack.dgetrf(M)
            suspect = info != 0 or (_singular_value_ratio(M, lu, piv)
                                    < SVD_TRIGGER_MARGIN * self.accuracy)
            if not suspect:
                self._solve = lambda g: lapack.dgetrs(lu, piv, g, trans=1)[0]
            else:
                U, S, Vt = np.linalg.svd(M)
                keep = S > self.accuracy * S[0]
                Uk, Sk, Vk = U[:, keep], S[keep], Vt[keep]
                self._solve = lambda g: Uk @ ((Vk @ g) / Sk)
        return self._solve

    def _operator(self):
        if self._op is None:
            n, N = self.n, self.Q.shape[0]
            Q, proj = self.Q, self.proj
            p, q = self._null_vectors()
            beta = self._scale()

            def dpi(u):
                return np.concatenate([u[:n], proj.matvec(u[n:N - 1]), u[N - 1:]])

            def mv(u):  # M̃ u = (Q − I) DΠ u + u + β p (qᵀu)
                d = dpi(u)
                return Q @ d - d + u + beta * p * (q @ u)

            def rmv(r):  # M̃ᵀ r = DΠ (−Q − I) r + r + β q (pᵀr)
                return dpi(-(Q @ r) - r) + r + beta * q * (p @ r)

            self._op = spla.LinearOperator((N, N), matvec=mv, rmatvec=rmv, dtype=np.float64)
        return self._op

    def __call__(self, dx: np.ndarray, dy: np.ndarray, ds: np.ndarray):
        """(dx, dy, ds) -> (dA values on the pattern, db, dc)."""
        n = self.n
        dw = -(self.x @ dx + self.y @ dy + self.s @ ds)
        g = np.concatenate([dx, self.proj.rmatvec(dy + ds) - ds, [dw]])
        if not np.any(g):
            r = np.zeros_like(g)
        elif self.method == "dense":
            r = self._dense_solver()(g)
        elif self.method == "lsqr" and not self.proj.power.size:
            # diffcp's LSQR (C++, 25x faster per iteration than scipy's) on the
            # undeflated operator: a least-squares method whose stopping rule never
            # resolves the near-null direction, so it needs no deflation.
            M = _diffcp.M_operator(sp.csc_matrix(self.Q), self.proj.cones, self.x,
                                   self.y - self.s, 1.0)
            r = np.asarray(_diffcp.lsqr(M.transpose(), g).solution)
        else:
            solver = spla.lsqr if self.method == "lsqr" else spla.lsmr
            limit = {"iter_lim" if self.method == "lsqr" else "maxiter":
                     LSQR_MAX_ITER_FACTOR * g.size}
            r = solver(self._operator().adjoint(), g, atol=LSQR_TOL, btol=LSQR_TOL, **limit)[0]
        pi_x, pi_y = self.x, self.proj.value
        r_x, r_y, r_w = r[:n], r[n:-1], r[-1]
        dA = pi_x[self.cols] * r_y[self.rows] - pi_y[self.rows] * r_x[self.cols]
        db = pi_y * r_w - r_y
        dc = pi_x * r_w - r_x
        return dA, db, dc
