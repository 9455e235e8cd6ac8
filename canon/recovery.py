"""Maps from a solver's solution vector to the variables the user asked for.

Each requested output (a primal variable, or a constraint's dual variable)
is a sparse matrix R with

    vec_C(value) = R @ v,      v = x (primal) or y (dual) of the cone program,

and its adjoint ``Rᵀ`` maps a gradient of the value back to the solution
vector. Both directions live in `Recovery`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .parameters import SYMMETRIC_ATTRIBUTES


@dataclass(frozen=True)
class Recovery:
    name: str
    shape: tuple[int, ...]
    source: str  # "x" (primal) or "y" (dual)
    matrix: sp.csr_array  # size × len(source vector)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_primal(self) -> bool:
        return self.source == "x"

    def apply(self, v: np.ndarray) -> np.ndarray:
        """v (B, len) -> values (B, size), row-major within each sample."""
        return np.asarray(self.matrix @ v.T).T

    def adjoint(self, g: np.ndarray) -> np.ndarray:
        """g (B, size) -> (B, len)."""
        return np.asarray(self.matrix.T @ g.T).T


def _selection(size: int, positions: np.ndarray, length: int, vals=None) -> sp.csr_array:
    """Rows 0..size-1 each reading one entry ``positions[row]`` of a length-``length`` vector."""
    rows = np.arange(size)
    vals = np.ones(size) if vals is None else vals
    return sp.csr_array((vals, (rows, positions)), shape=(size, length))


def primal_recovery(var, start: int, x_size: int) -> Recovery:
    """Variable ``var`` whose canonical block starts at column ``start`` of x."""
    shape = tuple(int(d) for d in var.shape)
    size = int(np.prod(shape, dtype=np.int64))
    attrs = var.attributes
    if len(shape) == 2 and any(attrs.get(a) for a in SYMMETRIC_ATTRIBUTES):
        # CVXPY keeps the upper triangle (np.triu_indices order).
        n = shape[0]
        k = np.zeros((n, n), dtype=np.int64)
        iu, ju = np.triu_indices(n)
        k[iu, ju] = np.arange(iu.size)
        k[ju, iu] = np.arange(iu.size)
        R = _selection(size, start + k.ravel(), x_size)
    elif attrs.get("diag"):
        n = shape[0]
        rows = np.arange(n) * n + np.arange(n)
        R = sp.csr_array((np.ones(n), (rows, start + np.arange(n))), shape=(size, x_size))
    elif attrs.get("sparsity") not in (None, False):
        raise NotImplementedError(
            f"variable {var.name()} has a sparsity attribute; requesting it as a layer "
            "output is not supported. Return a dense Variable tied to it by an equality."
        )
    else:
        c_index = np.arange(size)
        f_index = (np.ravel_multi_index(np.unravel_index(c_index, shape), shape, order="F")
                   if shape else c_index)
        R = _selection(size, start + f_index, x_size)
    return Recovery(var.name(), shape, "x", R)


def dual_recovery(dual_var, constraint, canonical, start: int, y_size: int) -> Recovery:
    """Dual variable ``dual_var`` of the user's ``constraint``.

    ``canonical`` is the constraint as it appears in the cone program and
    ``start`` its first row in y.
    """
    from cvxpy.constraints import PSD, SvecPSD

    shape = tuple(int(d) for d in dual_var.shape)
    size = int(np.prod(shape, dtype=np.int64))
    if isinstance(canonical, SvecPSD) or isinstance(canonical, PSD):
        return Recovery(dual_var.name(), shape, "y", _psd_dual(shape[0], start, y_size))
    positions = _probe_dual_layout(dual_var, constraint)
    return Recovery(dual_var.name(), shape, "y", _selection(size, start + positions, y_size))


def _psd_dual(n: int, start: int, y_size: int) -> sp.csr_array:
    """Full n×n dual matrix from SCS's svec (lower triangle, column-major, √2 off-diagonal)."""
    k = 0
    rows, cols, vals = [], [], []
    for j in range(n):
        for i in range(j, n):
            scale = 1.0 if i == j else 1.0 / np.sqrt(2.0)
            rows.append(i * n + j)
            cols.append(start + k)
            vals.append(scale)
            if i != j:
                rows.append(j * n + i)
                cols.append(start + k)
                vals.append(scale)
            k += 1
    return sp.csr_array((vals, (rows, cols)), shape=(n * n, y_size))


def _probe_dual_layout(dual_var, constraint) -> np.ndarray:
    """Where each entry of ``dual_var`` (row-major) sits within its constraint's rows.

    The layout is whatever CVXPY's own ``save_dual_value`` does (reshapes,
    transposes, interleaving for SOC and exponential cones). We run it on a
    copy of the constraint, so the user's objects are never written, with the
    row labels 1..L as the "dual value", and read the labels back.
    """
    clone = constraint.copy()
    L = constraint.size
    labels = np.arange(1, L + 1, dtype=np.float64)
    clone.save_dual_value(labels if L > 1 else labels.item())
    index = [v.id for v in constraint.dual_variables].index(dual_var.id)
    value = np.asarray(clone.dual_variables[index].value, dtype=np.float64)
    shape = tuple(int(d) for d in dual_var.shape)
    if value.shape != shape:
        value = value.reshape(shape, order="F")
    return value.ravel().astype(np.int64) - 1
