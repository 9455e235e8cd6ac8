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

For a symmetric parameter the lowered entry (i, j) is ½(P_ij + P_ji): equal to
P_ij on symmetric input, and its adjoint gives a symmetric gradient.

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
# Attributes the front door checks on incoming values.
SIGN_ATTRIBUTES = ("nonneg", "nonpos", "pos", "neg")


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
    # Scratch for the front door (the pattern's sorted keys per device).
    cache: dict = field(default_factory=dict, compare=False, repr=False)

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
    """

    def __init__(self, parameters, log_space=None):
        log_space = tuple(log_space) if log_space is not None else (False,) * len(parameters)
        slots, log_slots = [], []
        offset = 0
        for p in parameters:
            shape = tuple(int(d) for d in p.shape)
            size = int(np.prod(shape, dtype=np.int64))
            attrs = {k: v for k, v in p.attributes.items()
                     if v is not None and v is not False and k != "sparsity"}
            index = _sparse_index(p)
            if index is not None:
                size = int(index[0].size)
            slots.append(ParameterSlot(p.name(), shape, offset, size, attrs, index))
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
        n = shape[0]
        iu, ju = np.triu_indices(n)
        k = np.arange(iu.size)
        diag = iu == ju
        rows = np.concatenate([k[diag], k[~diag], k[~diag]])
        cols = np.concatenate([iu[diag] * n + ju[diag], iu[~diag] * n + ju[~diag],
                               ju[~diag] * n + iu[~diag]])
        vals = np.concatenate([np.ones(diag.sum()), np.full(2 * (~diag).sum(), 0.5)])
        return rows, cols, vals
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
