"""One sample's scaled operators and its sparse KKT factorization.

Every Newton step, the polish and the backward solve the symmetric system
(variable order z, ν, λ; `pattern` for the layout)

    [ Q   Aᵀ   Gᵀ ] [dz]   [r_z]
    [ A   0    0  ] [dν] = [r_ν]          K₀ = the exact matrix
    [ G   0   −W  ] [dλ]   [r_λ]

with W = diag(s/λ) in the interior point, and in the limit system (`limit`)
W = 0 on active rows while inactive (and h = +inf) rows are identity rows:
their G entries zeroed and −1 on the diagonal, so that their dλ = −r_λ = 0.

K₀ need not be definite, nor even nonsingular (an LP's Q = 0, dependent rows
of A). What is factored is the quasi-definite K₀ + diag(δI, −δI, −δI): by
Vanderbei's theorem its LDLᵀ factorization exists in any symmetric order,
without pivoting, so the fill-reducing order and the elimination tree are
fixed by the pattern alone. qdldl (the LDLᵀ of OSQP) computes both (AMD) when
a sample's solver is built, once per call, and refactors in place (`update`)
each iteration. The static δ is then removed by iterative refinement with K₀
itself (OSQP and Clarabel do the same): each step contracts the error by about
δ‖K₀⁻¹‖, and where K₀ is singular the iteration converges to the solution of
least norm along the null directions (iterated Tikhonov) for a consistent
right-hand side.
"""

from __future__ import annotations

import numpy as np
import qdldl
import scipy.sparse as sp

from .pattern import SparsePattern
from .settings import SparseQPSettings

try:  # scipy's compiled product kernels, called without the operator's dispatch
    from scipy.sparse import _sparsetools
except ImportError:  # pragma: no cover - a scipy that moved them: use `@`
    _sparsetools = None

# Growth of δ after a breakdown (a zero or non-finite pivot).
REGULARIZATION_GROWTH = 100.0


def product(fmt: str, shape: tuple, indptr, indices, data):
    """x ↦ M x for the float64 CSR or CSC matrix (``fmt``) with these arrays, which it
    shares (so it follows later in-place changes of ``data``). Small problems make
    about 160 such products per call, and scipy's matrix objects cost several times
    the product itself at these sizes: building one validates its arrays, and
    `M @ x`'s type and shape dispatch was a third of a batch-of-one call."""
    def matrix():  # for what the kernel does not take (several columns, other dtypes)
        kind = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
        return kind((data, indices, indptr), shape=shape)

    if _sparsetools is None:
        return matrix().__matmul__
    kernel = _sparsetools.csr_matvec if fmt == "csr" else _sparsetools.csc_matvec
    n_row, n_col = shape

    def apply(x):
        if x.ndim != 1 or x.dtype != np.float64:
            return matrix() @ x
        y = np.zeros(n_row)
        kernel(n_row, n_col, indptr, indices, data, np.ascontiguousarray(x), y)
        return y

    return apply


def products(C, values: np.ndarray):
    """(x ↦ M x, y ↦ Mᵀ y) for the `pattern.Compressed` matrix M with one sample's
    given values (Mᵀ: the same arrays read as CSC)."""
    data = C.S @ values
    return (product("csr", C.shape, C.indptr, C.indices, data),
            product("csc", C.shape[::-1], C.indptr, C.indices, data))


class Breakdown(RuntimeError):
    """The factorization failed at every regularization tried."""


class SampleKKT:
    """One sample's operators (scaled units) and KKT factor; used by one thread at a time.

    ``Qv``, ``Gv``, ``Av``: the sample's scaled value arrays in the pattern's
    order. Which rows of G are in the matrix is set per factorization
    (`set_matrix`): h = +inf rows never are, inactive rows of the limit neither.
    """

    def __init__(self, pattern: SparsePattern, Qv, Gv, Av, settings: SparseQPSettings):
        lay = pattern.layout
        self.layout, self.settings = lay, settings
        self.n, self.m, self.p, self.N = lay.n, lay.m, lay.p, lay.N
        self.hess, _ = products(lay.Qsym, Qv)
        self.G, self.GT = products(lay.Gc, Gv)
        self.A, self.AT = products(lay.Ac, Av)
        self.Gv, self.g_row = Gv, pattern.rows("G")
        self.base = lay.S_Q @ Qv + lay.S_A @ Av  # K₀ without G and the λ diagonal
        self._g_rows = None  # the rows of G currently in `_g_part`
        self._g_part = None
        self.K0 = np.empty(lay.nnz)
        self.Kreg = np.empty(lay.nnz)
        # K₀'s stored upper triangle applied as CSC and, transposed, as CSR: views
        # of the array, so the products follow its values.
        self._upper = product("csc", (self.N, self.N), lay.indptr, lay.indices, self.K0)
        self._upper_t = product("csr", (self.N, self.N), lay.indptr, lay.indices, self.K0)
        self.Ureg = lay.upper(self.Kreg)
        self.diag = np.concatenate([lay.diag_x, lay.diag_nu, lay.diag_lam])
        self.delta = settings.static_regularization
        self.solver = None
        self.factored = None  # what is factored: "ipm" or the limit's active mask
        self._probe = np.ones(self.N)

    # Products (scaled units): hess(x) = Q x, G(x), GT(y), A(x), AT(y), set above.

    # ---- the matrix and its factorization -----------------------------------
    def set_matrix(self, rows: np.ndarray, lam_diag: np.ndarray) -> None:
        """K₀ with G's ``rows`` (p,) kept (others zeroed) and the λ block's diagonal."""
        if self._g_rows is None or not np.array_equal(rows, self._g_rows):
            keep = rows[self.g_row]
            self._g_part = self.layout.S_G @ np.where(keep, self.Gv, 0.0)
            self._g_rows = rows.copy()
        np.add(self.base, self._g_part, out=self.K0)
        self.K0[self.layout.diag_lam] += lam_diag
        self.d0 = self.K0[self.diag]

    def factor(self) -> None:
        """Factor K₀ + δ-regularization; δ grows after a breakdown."""
        for _ in range(self.settings.regularization_tries + 1):
            np.copyto(self.Kreg, self.K0)
            lay, d = self.layout, self.delta
            self.Kreg[lay.diag_x] += d
            self.Kreg[lay.diag_nu] -= d
            self.Kreg[lay.diag_lam] -= d
            if self._factor_once() and self._pivots_finite():
                return
            self.delta *= REGULARIZATION_GROWTH
        raise Breakdown("the KKT factorization broke down at every regularization")

    def _factor_once(self) -> bool:
        try:
            if self.solver is None:
                self.solver = qdldl.Solver(self.Ureg, upper=True)
            else:
                self.solver.update(self.Ureg, upper=True)
        except RuntimeError:  # a zero pivot while building: qdldl refuses the matrix
            self.solver = None
            return False
        return True

    def _pivots_finite(self) -> bool:
        # qdldl's update does not report a zero pivot; a probe solve shows it.
        return bool(np.isfinite(self.solver.solve(self._probe)).all())

    def apply(self, v: np.ndarray) -> np.ndarray:
        """K₀ v (both triangles from the stored upper one)."""
        return self._upper(v) + self._upper_t(v) - self.d0 * v

    def solve(self, rhs: np.ndarray, steps: int | None = None):
        """K₀⁻¹ rhs by the factor plus iterative refinement; returns (solution, relative
        residual ‖rhs − K₀x‖∞ / ‖rhs‖∞)."""
        s = self.settings
        steps = s.refine_steps if steps is None else steps
        scale = max(float(np.abs(rhs).max(initial=0.0)), 1e-300)
        x = self.solver.solve(rhs)
        r = rhs - self.apply(x)
        err = float(np.abs(r).max(initial=0.0)) / scale
        for _ in range(steps):
            if not err > s.refine_tol:  # also stops on NaN
                break
            x_new = x + self.solver.solve(r)
            r_new = rhs - self.apply(x_new)
            err_new = float(np.abs(r_new).max(initial=0.0)) / scale
            if not err_new < err:
                break
            stalled = err_new > s.refine_stall * err
            x, r, err = x_new, r_new, err_new
            if stalled:
                break
        return x, err

    def split(self, v: np.ndarray):
        n, m = self.n, self.m
        return v[:n], v[n:n + m], v[n + m:]
