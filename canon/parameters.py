"""The user's parameter vector θ and its map onto CVXPY's parameter vector.

Convention. The front door flattens the user's parameter tensors, in the order
the user listed them, each in row-major (C) order, and appends a constant 1:

    θ = [vec_C(p_0), vec_C(p_1), ..., vec_C(p_{k-1}), 1]      (length ``size``)

For geometric programs (``gp=True``) CVXPY's log-space reformulation uses
log(p) where p is a coefficient and p itself where it is an exponent, so θ
carries both: after the raw values come vec_C(log p_i) for every parameter
that has a log-space copy, then the constant 1.

CVXPY's canonical parameter vector differs in three ways: its own column
order, column-major (Fortran) flattening, and lowered representations for
parameters with dimension-reducing attributes (a symmetric or PSD n×n
parameter becomes its n(n+1)/2 upper triangle). All three are linear, so they
fold into one sparse selection matrix ``S`` with ``θ_cvxpy = S @ θ``, built
once here and composed into every data map at compile time; nothing is
reshaped per call.

A symmetric (or PSD/NSD) parameter is read from its upper triangle, as
cvxpylayers reads it: the lowered entry (i, j), i ≤ j, is P_ij, and the strictly
lower triangle is ignored, so a non-symmetric value P stands for the symmetric
matrix triu(P) + triu(P, 1)ᵀ. Gradients follow: with G the gradient with
respect to that symmetric matrix, an upper entry receives G_ij + G_ji (G_ii on
the diagonal) and a lower entry 0. A finite-difference check that perturbs one
entry at a time therefore agrees with the analytic gradient.

A parameter with a fixed sparsity pattern (``cp.Parameter(shape, sparsity=...)``)
occupies only its nnz values in θ, in CVXPY's ``sparse_idx`` order; the front
door extracts them from a sparse (or dense) tensor, so no map ever has a column
per zero entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

SYMMETRIC_ATTRIBUTES = ("symmetric", "PSD", "NSD", "hermitian")
# Attributes CVXPY reads when it decides curvature (DCP/DGP sign and PSD rules),
# and the value check that keeps the problem convex where it relies on one. A
# strict sign (pos, neg) only ever matters as the weak one: no convexity rule
# needs a nonzero value (the log of a geometric program's coefficient does;
# that is the separate "pos" check).
CURVATURE_ATTRIBUTES = {"nonneg": "nonneg", "pos": "nonneg", "boolean": "nonneg",
                        "nonpos": "nonpos", "neg": "nonpos", "PSD": "psd", "NSD": "nsd"}
# The value checks a slot may carry (the front door runs them, `declarative._checks`):
# "nonneg", "nonpos" (a sign the problem's convexity relies on), "pos" (a geometric
# program's log-space coefficient), "psd", "nsd" (the upper triangle's matrix),
# "diag" (off-diagonal entries are zero).
VALUE_CHECK_NAMES = ("nonneg", "nonpos", "pos", "psd", "nsd", "diag")


@dataclass(frozen=True)
class ParameterSlot:
    """Where one user parameter sits in θ, and what its values must satisfy."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    attributes: dict = field(default_factory=dict, compare=False)
    # (row indices, column indices) of a parameter with a fixed sparsity pattern.
    sparse_index: tuple | None = field(default=None, compare=False)
    # The value checks (VALUE_CHECK_NAMES) the front door runs on this slot.
    checks: tuple[str, ...] = field(default=(), compare=False)

    @property
    def stop(self) -> int:
        return self.offset + self.size

    @property
    def value_shape(self) -> tuple[int, ...]:
        """Shape of this slot's values in θ (the nnz values for a sparse parameter)."""
        return (self.size,) if self.sparse_index is not None else self.shape


class ParameterLayout:
    """Positions of the user's parameters in θ, in the user's order.

    ``log_space[i]`` adds a slot for log(p_i) (geometric programs).
    ``needed`` maps a parameter to the curvature checks the problem relies on
    (`needed_checks`); by default every declared curvature attribute is checked.
    """

    def __init__(self, parameters, log_space=None, needed=None):
        log_space = tuple(log_space) if log_space is not None else (False,) * len(parameters)
        slots, log_slots = [], []
        offset = 0
        for p, log in zip(parameters, log_space):
            shape = tuple(int(d) for d in p.shape)
            size = int(np.prod(shape, dtype=np.int64))
            attrs = {k: v for k, v in p.attributes.items()
                     if v is not None and v is not False and k != "sparsity"}
            index = _sparse_index(p)
            if index is not None:
                size = int(index[0].size)
            curvature = needed.get(p, ()) if needed is not None else _curvature(attrs)
            checks = _slot_checks(attrs, curvature, log, index is not None)
            slots.append(ParameterSlot(p.name(), shape, offset, size, attrs, index,
                                       checks=checks))
            offset += size
        for slot, log in zip(slots, log_space):
            if log:
                log_slots.append(ParameterSlot(f"log({slot.name})", slot.shape, offset,
                                               slot.size, slot.attributes, slot.sparse_index))
                offset += slot.size
            else:
                log_slots.append(None)
        self.slots: tuple[ParameterSlot, ...] = tuple(slots)
        self.log_slots: tuple[ParameterSlot | None, ...] = tuple(log_slots)
        self.log_space = log_space
        self.user_size = offset
        # θ carries one trailing constant 1 for the affine offsets.
        self.size = offset + 1

    def __len__(self) -> int:
        return len(self.slots)

    def to_cvxpy(self, entries, param_id_to_col, total_param_size) -> sp.csr_array:
        """Sparse S, (total_param_size + 1) × self.size, with θ_cvxpy = S @ θ.

        ``entries`` lists (parameter, slot, cvxpy id): the id under which CVXPY's
        canonical program knows that slot's values (after attribute lowering).
        """
        rows, cols, vals = [], [], []
        for param, slot, pid in entries:
            if pid not in param_id_to_col:
                continue  # not in this program: it has no effect here
            col0 = param_id_to_col[pid]
            r, c, v = _lowering(param, slot)
            rows.append(r + col0)
            cols.append(c + slot.offset)
            vals.append(v)
        rows.append(np.array([total_param_size]))
        cols.append(np.array([self.user_size]))
        vals.append(np.array([1.0]))
        S = sp.coo_array(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(total_param_size + 1, self.size),
        )
        return S.tocsr()


def default_checks(attributes: dict, log: bool) -> tuple[str, ...]:
    """Every declared curvature attribute checked (for layouts built without a problem)."""
    return _slot_checks(attributes, _curvature(attributes), log, False)


def _curvature(attributes: dict) -> tuple[str, ...]:
    return tuple(sorted({c for a, c in CURVATURE_ATTRIBUTES.items() if attributes.get(a)}))


def _slot_checks(attributes, curvature, log: bool, sparse: bool) -> tuple[str, ...]:
    checks = set(curvature)
    if log:
        checks.discard("nonneg")
        checks.add("pos")
    if attributes.get("diag"):
        checks.add("diag")
    if sparse:  # θ holds the nnz values: only sign checks apply
        checks &= {"nonneg", "nonpos", "pos"}
    return tuple(sorted(checks))


def needed_checks(problem, parameters, passes) -> dict:
    """The curvature checks each parameter's values need for ``problem`` to stay convex.

    A curvature attribute (`CURVATURE_ATTRIBUTES`) matters only where CVXPY's
    rules used it: ``a * norm(x)`` is convex because ``a`` is nonneg, while
    ``norm(x - a)`` is convex for any ``a``. Starting from the problem with
    every such attribute in place, drop one parameter's attributes at a time
    (replacing the parameter by an attribute-free copy) and keep the drop
    whenever ``passes`` (the compile check: DCP/DGP and DPP) still holds. The
    parameters left form a set whose attributes alone make the problem convex,
    so a value of any other parameter cannot break it; that also covers
    attributes needed only together (``maximum(a, b) * norm(x)``).
    Returns {parameter: checks} for the parameters that need some.
    """
    candidates = [p for p in parameters
                  if any(p.attributes.get(a) for a in CURVATURE_ATTRIBUTES)]

    def still_convex(without) -> bool:
        trial = _without_curvature(problem, without)
        # A parameter held in an atom's data (power's exponent) is not replaced:
        # then its attributes stay in force, and so does its check.
        left = {q.id for q in trial.parameters()} & {p.id for p in without}
        return not left and passes(trial)

    if not candidates or still_convex(candidates):
        return {}
    dropped: list = []  # (a list, not a set: == on CVXPY leaves builds constraints)
    for p in candidates:
        if still_convex(dropped + [p]):
            dropped.append(p)
    kept = {p.id for p in candidates} - {p.id for p in dropped}
    return {p: _curvature(p.attributes) for p in candidates if p.id in kept}


def _without_curvature(problem, parameters):
    """``problem`` with ``parameters`` replaced by copies lacking curvature attributes.

    Only an atom's arguments are rewritten; a parameter held in its data stays.
    """
    import cvxpy as cp
    from cvxpy.expressions.leaf import Leaf

    swap = {}
    for p in parameters:
        attrs = {k: v for k, v in p.attributes.items()
                 if k not in CURVATURE_ATTRIBUTES and v is not None and v is not False}
        if p.attributes.get("PSD") or p.attributes.get("NSD"):
            attrs["symmetric"] = True
        swap[p.id] = cp.Parameter(p.shape, name=p.name(), **attrs)

    def copy(expr):
        if isinstance(expr, cp.Parameter):
            return swap.get(expr.id, expr)
        if isinstance(expr, Leaf):
            return expr
        return expr.copy([copy(a) for a in expr.args])

    objective = problem.objective
    return cp.Problem(objective.copy([copy(a) for a in objective.args]),
                      [con.copy([copy(a) for a in con.args]) for con in problem.constraints])


def _sparse_index(param):
    """(rows, cols) of a parameter declared with a sparsity pattern, else None."""
    if param.attributes.get("sparsity") is None or param.attributes.get("sparsity") is False:
        return None
    index = getattr(param, "sparse_idx", None)
    if index is None or len(index) != 2:
        raise NotImplementedError(f"parameter {param.name()}: only 2-D sparsity patterns "
                                  "are supported.")
    return tuple(np.asarray(i, dtype=np.int64) for i in index)


def _lowering(param, slot: ParameterSlot):
    """(rows, cols, values) of the map vec_C(P) -> CVXPY's value for P."""
    shape = slot.shape
    attrs = param.attributes
    if len(shape) == 2 and any(attrs.get(a) for a in SYMMETRIC_ATTRIBUTES):
        # CVXPY's lowered value is the row-major upper triangle; read it off P as is.
        n = shape[0]
        iu, ju = np.triu_indices(n)
        return np.arange(iu.size), iu * n + ju, np.ones(iu.size)
    if attrs.get("diag"):
        n = shape[0]
        k = np.arange(n)
        return k, k * n + k, np.ones(n)
    if slot.sparse_index is not None:
        # θ holds the nnz values in CVXPY's own order: the lowering is the identity.
        k = np.arange(slot.size)
        return k, k, np.ones(slot.size)
    # Plain parameter: CVXPY flattens column-major, θ row-major.
    c_index = np.arange(slot.size)
    f_index = np.ravel_multi_index(np.unravel_index(c_index, shape, order="C"), shape, order="F") \
        if shape else c_index
    return f_index, c_index, np.ones(slot.size)
