"""Recognize entropy-regularized linear programs and simplex projections.

Two structures are read off the problem as the user wrote it, for one
variable z (a vector or a matrix, x = vec_F(z) of size n):

EntropyProgram — the seed's softmax problem and its relatives

    maximize    θᵀx + τ Σᵢ entr(xᵢ)        (or minimize its negation)
    subject to  A x = b                    (x ≥ 0 optional: entr implies it)

with τ > 0 a constant temperature (``cp.entr`` or ``-cp.rel_entr(z, 1)``),
A constant and θ, b affine in the parameters. Softmax is A = 1ᵀ, b = 1;
entropic optimal transport has the row and column sums of a matrix z.

SimplexProjection — sparsemax and its scaled relatives

    minimize    α ‖σx + e‖² + cᵀx          (σ = ±1, α > 0 constant)
    subject to  1ᵀx = r,  x ≥ 0

i.e. the Euclidean projection of y = −σe − c/(2α) onto the simplex of
radius r, with e, c, r affine in the parameters.

All parameter-affine pieces are extracted with CVXPY's own canonicalization
of small auxiliary problems (never by hand), so every map is in the same θ
layout as the other forms. Anything that does not match returns None and the
problem falls through to the QP or conic form.
"""

from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
from cvxpy.atoms.affine.add_expr import AddExpression
from cvxpy.atoms.affine.binary_operators import DivExpression, multiply
from cvxpy.atoms.affine.sum import Sum
from cvxpy.atoms.affine.unary_operators import NegExpression
from cvxpy.atoms.elementwise.entr import entr
from cvxpy.atoms.elementwise.rel_entr import rel_entr
from cvxpy.atoms.quad_over_lin import quad_over_lin
from cvxpy.constraints import Equality, Inequality, NonNeg, Zero

from .cone import cone_dict_from_dims, from_param_cone_prog, leading_rows


@dataclass(frozen=True)
class EntropyProgram:
    n: int
    tau: float
    A: np.ndarray  # (m, n) constant, all equality rows
    independent: np.ndarray  # indices of a maximal independent subset of A's rows
    theta_map: sp.csr_array  # n × len θ : the linear objective's coefficients
    b_map: sp.csr_array  # m × len θ
    kind: str  # "softmax", "transport" or "general"
    transport_shape: tuple[int, int] | None = None  # (rows, cols) of z for "transport"


@dataclass(frozen=True)
class SimplexProjection:
    n: int
    y_map: sp.csr_array  # n × len θ : the point projected
    r_map: sp.csr_array  # 1 × len θ : the simplex radius


def _terms(expr, coef: float = 1.0):
    """Split a sum of scaled terms into (coefficient, term) pairs."""
    if isinstance(expr, AddExpression):
        for arg in expr.args:
            yield from _terms(arg, coef)
    elif isinstance(expr, NegExpression):
        yield from _terms(expr.args[0], -coef)
    elif isinstance(expr, multiply) and _scalar_constant(expr.args[0]) is not None:
        yield from _terms(expr.args[1], coef * _scalar_constant(expr.args[0]))
    elif isinstance(expr, multiply) and _scalar_constant(expr.args[1]) is not None:
        yield from _terms(expr.args[0], coef * _scalar_constant(expr.args[1]))
    elif isinstance(expr, DivExpression) and _scalar_constant(expr.args[1]):
        yield from _terms(expr.args[0], coef / _scalar_constant(expr.args[1]))
    else:
        yield coef, expr


def _scalar_constant(expr):
    if isinstance(expr, cp.Constant) and expr.size == 1:
        return float(np.asarray(expr.value).ravel()[0])
    return None


def _entropy_coefficient(term, z) -> float | None:
    """τ for Σ entr(z) (+1) or Σ rel_entr(z, 1) (−1), else None."""
    if not isinstance(term, Sum) or term.axis is not None:
        return None
    inner = term.args[0]
    if isinstance(inner, entr) and inner.args[0] is z:
        return 1.0
    if (isinstance(inner, rel_entr) and inner.args[0] is z
            and _scalar_constant(inner.args[1]) == 1.0):
        return -1.0
    return None


def _single_variable(problem):
    """The problem's only variable; attributes other than nonneg=True rule a match out."""
    variables = problem.variables()
    if len(variables) != 1:
        return None
    z = variables[0]
    other = {k for k, v in z.attributes.items() if v and k != "nonneg"}
    return None if other else z


def _constraints(problem, z):
    """Equalities, and whether z ≥ 0 is stated; None when anything else appears."""
    eqs, nonneg = [], bool(z.attributes.get("nonneg"))
    for con in problem.constraints:
        if isinstance(con, (Equality, Zero)):
            eqs.append(con)
        elif isinstance(con, Inequality) and _is_nonneg(con, z):
            nonneg = True
        elif isinstance(con, NonNeg) and con.args[0] is z:
            nonneg = True
        else:
            return None, False
    return eqs, nonneg


def _is_nonneg(con, z) -> bool:
    lhs, rhs = con.args  # lhs <= rhs: z ≥ 0 is 0 <= z
    return rhs is z and _scalar_constant(lhs) == 0.0


def _linear_data(objective_expr, eqs, z, S_fn):
    """(c_map, A_scs, A_map, b_map) of ``minimize objective_expr s.t. eqs``.

    ``objective_expr`` is affine in z; the auxiliary LP is canonicalized by
    CVXPY. Returns None if CVXPY added variables (z would not be all of x).
    """
    aux = cp.Problem(cp.Minimize(objective_expr), eqs)
    if not aux.is_dpp():
        return None
    data, chain, _ = aux.get_problem_data(cp.DIFFCP)
    param_prob = data[cp.settings.PARAM_PROB]
    var_ids = {k: v[0] for k, v in chain.compose_var_id_map().items()}
    if param_prob.x.size != z.size or param_prob.var_id_to_col.get(
            var_ids.get(z.id, z.id)) != 0:
        return None
    S = S_fn(param_prob, {k: v[0] for k, v in chain.compose_param_id_map().items()})
    m = sum(c.size for c in eqs)
    dims = data["dims"]
    # Only the equalities, plus z ≥ 0 rows from a nonneg attribute, may appear.
    if dims.zero != m or dims.soc or dims.psd or dims.exp or dims.p3d:
        return None
    cone = from_param_cone_prog(param_prob, S, cone_dict_from_dims(dims))
    return leading_rows(cone, m)


def _constant(M: sp.csr_array, user_cols: int) -> bool:
    coo = M.tocoo()
    return not np.any((coo.col < user_cols) & (coo.data != 0))


def _sparse_A(cone) -> sp.csc_array:
    """The constant A (SCS sign convention: Ax = b for the zero cone), kept sparse:
    recognition must stay O(nnz) (a sparsemax over 10⁵ entries has an n×n identity)."""
    vals = cone.A_map[:, [cone.A_map.shape[1] - 1]].toarray().ravel()
    A = sp.csc_array((vals, cone.indices, cone.indptr), shape=(cone.m, cone.n))
    A.eliminate_zeros()
    return A


def _dense_A(cone) -> np.ndarray:
    return _sparse_A(cone).toarray()


def _is_scaled_identity(M: sp.csc_array, n: int, scale: float) -> bool:
    """M == scale · I (n×n), checked on the stored entries only."""
    if M.shape != (n, n) or M.nnz != n:
        return False
    M = sp.csc_array(M)
    M.sum_duplicates()
    return (M.nnz == n and np.array_equal(M.indptr, np.arange(n + 1))
            and np.array_equal(M.indices, np.arange(n)) and bool(np.all(M.data == scale)))


def recognize_entropy(problem, S_fn, user_cols: int) -> EntropyProgram | None:
    z = _single_variable(problem)
    if z is None:
        return None
    sign = 1.0 if isinstance(problem.objective, cp.Maximize) else -1.0
    tau = 0.0
    linear = []
    for coef, term in _terms(problem.objective.expr, sign):
        k = _entropy_coefficient(term, z)
        if k is not None:
            tau += coef * k
        elif term.is_affine():
            linear.append(coef * term)
        else:
            return None
    if tau <= 0:
        return None
    eqs, _ = _constraints(problem, z)
    if eqs is None or not eqs:
        return None
    lin = cp.sum(linear) if linear else cp.Constant(0.0) * cp.sum(z)
    cone = _linear_data(-lin, eqs, z, S_fn)  # minimize −θᵀx: c = −θ
    if cone is None or not _constant(cone.A_map, user_cols):
        return None
    A = _dense_A(cone)
    theta_map = sp.csr_array(-cone.c_map)
    independent = _independent_rows(A)
    kind, shape = _classify(A, z, cone.b_map, user_cols)
    return EntropyProgram(z.size, float(tau), A, independent, theta_map,
                          sp.csr_array(cone.b_map), kind, shape)


def _independent_rows(A: np.ndarray) -> np.ndarray:
    """A maximal linearly independent subset of A's rows (QR with pivoting on Aᵀ)."""
    import scipy.linalg

    if A.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    _, R, piv = scipy.linalg.qr(A.T, mode="economic", pivoting=True)
    d = np.abs(np.diag(R))
    rank = int(np.sum(d > max(A.shape) * np.finfo(float).eps * max(d.max(), 1.0)))
    return np.sort(piv[:rank])


def _classify(A: np.ndarray, z, b_map, user_cols):
    m, n = A.shape
    if m == 1 and np.all(A == 1.0):
        b_const = _constant(b_map, user_cols) and np.isclose(
            b_map[:, [b_map.shape[1] - 1]].toarray().ravel()[0], 1.0)
        if b_const:
            return "softmax", None
    if len(z.shape) == 2:
        r, c = z.shape
        # x = vec_F(z): entry (i, j) sits at i + j r.
        rows = np.zeros((r, n))
        cols = np.zeros((c, n))
        for i in range(r):
            rows[i, i + np.arange(c) * r] = 1.0
        for j in range(c):
            cols[j, j * r + np.arange(r)] = 1.0
        if m == r + c and np.array_equal(A, np.vstack([rows, cols])):
            return "transport", (r, c)
    return "general", None


def recognize_simplex(problem, S_fn, user_cols: int) -> SimplexProjection | None:
    z = _single_variable(problem)
    if z is None or not isinstance(problem.objective, cp.Minimize) or len(z.shape) != 1:
        return None
    alpha, inner, linear = 0.0, None, []
    for coef, term in _terms(problem.objective.expr):
        if isinstance(term, quad_over_lin) and _scalar_constant(term.args[1]) == 1.0:
            if inner is not None:
                return None
            alpha, inner = coef, term.args[0]
        elif term.is_affine():
            linear.append(coef * term)
        else:
            return None
    if inner is None or alpha <= 0:
        return None
    eqs, nonneg = _constraints(problem, z)
    if not nonneg or eqs is None or len(eqs) != 1:
        return None
    # inner = σz + e. CVXPY writes `inner == 0` as Ãx + b̃ = 0 with Ãx + b̃ = inner;
    # in SCS form A = −Ã = −σI and b = b̃ = e.
    cone_inner = _linear_data(cp.Constant(0.0) * cp.sum(z), [inner == 0], z, S_fn)
    lin = cp.sum(linear) if linear else cp.Constant(0.0) * cp.sum(z)
    cone_lin = _linear_data(lin, eqs, z, S_fn)
    if cone_inner is None or cone_lin is None:
        return None
    if not (_constant(cone_inner.A_map, user_cols) and _constant(cone_lin.A_map, user_cols)):
        return None
    M = _sparse_A(cone_inner)  # x-coefficients of −inner
    sigma = -float(M[0, 0]) if M.shape[0] and M.shape[1] else 0.0
    if abs(sigma) != 1.0 or not _is_scaled_identity(M, z.size, -sigma):
        return None
    A = _dense_A(cone_lin)  # one row
    if A.shape != (1, z.size) or not np.all(A == A[0, 0]) or A[0, 0] == 0:
        return None
    e_map = sp.csr_array(cone_inner.b_map)
    c_map = sp.csr_array(cone_lin.c_map)
    y_map = sp.csr_array(-sigma * e_map - c_map / (2.0 * alpha))
    r_map = sp.csr_array(cone_lin.b_map / A[0, 0])
    return SimplexProjection(z.size, y_map, r_map)
