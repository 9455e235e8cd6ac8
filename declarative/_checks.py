"""Argument checks for the front doors, run before any solve.

Every message names the argument (its position and name), what arrived and
what was expected, so a user can fix the call without reading our code.
Shape and batch messages keep the phrases cvxpylayers users search for.

Dtype rule: float32 and float64 are accepted; mixing them promotes to
float64 (as torch's type promotion does), and outputs come back in the
promoted dtype. Integer, boolean, complex and half-precision tensors are
refused: a silent cast would hide a modelling mistake.

Value rule. A value is refused only where no solve could use it; the check is
per sample, so ``on_failure="mask"`` marks just the offending samples
invalid_input (NaN outputs, zero gradient) and "raise" names the parameter
and the first batch index. Per attribute of a ``cp.Parameter``:

- non-finite entries (NaN, ±inf): always refused; −inf is accepted where it
  can only mask a logit (softmax-type entropy problems).
- nonneg, pos, boolean / nonpos, neg: checked (as ≥ 0 / ≤ 0) only where the
  problem is convex *because of* that sign, e.g. ``a * norm(x)``; CVXPY's
  rules then assumed it, and a wrong sign would make the problem nonconvex.
  Elsewhere (``norm(x - a)``, a λ = 0 start of a sweep on a pos=True λ) the
  value is used as given, as cvxpylayers does. The strict signs (pos, neg)
  never matter for convexity; a geometric program (gp=True) takes the log of
  its coefficients, so those must be > 0.
- PSD / NSD: the matrix the upper triangle defines must be semidefinite up to
  round-off (√eps of the dtype, relative), again only where the problem relies
  on it (``quad_form(x, P)``); ``trace(P @ X)`` takes any symmetric value.
- symmetric (and PSD / NSD): never refused. The upper triangle is the value
  and the lower one is ignored, as cvxpylayers does (`canon.parameters`).
- diag: off-diagonal entries must be 0; CVXPY keeps only the diagonal, so
  anything else would be dropped silently.
- integer, boolean integrality and bounds: not checked; CVXPY's convexity
  rules do not read them, so any value gives the convex problem as written.

Which checks a parameter needs is decided once, at compile time
(`canon.parameters.needed_checks`); under torch.func transforms the checks
read the values through the transform's wrappers and raise (masking needs the
layer's own batch dimension).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backends.functorch import any_wrapped, unwrap
from .errors import ParameterTypeError

FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class BatchInfo:
    size: int  # B; 1 when nothing is batched
    batched: bool  # whether any input carried a batch dimension
    per_input: tuple[bool, ...]  # which inputs carried one
    dtype: torch.dtype
    device: torch.device


def functorch_active(*tensors) -> bool:
    """Any tensor wrapped by a torch.func transform (vmap, grad, jacrev, ...)?

    Value checks then read the values through `backends.functorch.unwrap`, and
    the paths skip host-side status reads there.
    """
    return any_wrapped(*tensors)


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    shape = getattr(value, "shape", None)
    return type(value).__name__ + (f" of shape {tuple(shape)}" if shape is not None else "")


def sparse_values(label: str, value: torch.Tensor, shape, index, cache: dict) -> torch.Tensor:
    """The nnz values of a fixed-pattern parameter, in the compiled order: (nnz,) or (B, nnz).

    ``value`` may be a torch sparse tensor (COO, CSR, ...), batched as (B, m, n)
    with the same pattern in every sample, or dense (its entries outside the
    pattern are ignored). Gradients flow back in the input's layout: a sparse
    input gets a sparse gradient with its own pattern.
    """
    rows, cols = index
    m, n = shape
    if value.layout == torch.strided:
        if value.dim() not in (2, 3) or tuple(value.shape[-2:]) != (m, n):
            raise ValueError(f"Invalid parameter shape for {label}: expected ({m}, {n}) or "
                             f"(batch, {m}, {n}), got {tuple(value.shape)}.")
        r = torch.as_tensor(rows, device=value.device)
        c = torch.as_tensor(cols, device=value.device)
        return value[..., r, c]
    if value.layout != torch.sparse_coo:
        value = value.to_sparse_coo()
    if value.dim() not in (2, 3) or tuple(value.shape[-2:]) != (m, n) or value.dense_dim():
        raise ValueError(f"Invalid parameter shape for {label}: expected a sparse ({m}, {n}) or "
                         f"(batch, {m}, {n}) tensor, got {tuple(value.shape)}.")
    value = value.coalesce()
    idx, vals = value.indices(), value.values()
    key = cache.get("key")
    if key is None or key.device != idx.device:
        ours = torch.as_tensor(rows * n + cols, device=idx.device)
        order = torch.argsort(ours)
        cache["key"] = key = ours[order]
        cache["rank"] = torch.argsort(order)
    batch = value.shape[0] if value.dim() == 3 else None
    got = idx[-2] * n + idx[-1]
    if batch is None:
        expected = key
    else:
        expected = key.repeat(batch)
        if not torch.equal(idx[0], torch.arange(batch, device=idx.device).repeat_interleave(
                key.numel())):
            raise ValueError(f"{label}: every sample of a batched sparse tensor must hold the "
                             f"declared pattern of {key.numel()} entries.")
    if got.numel() != expected.numel() or not torch.equal(got, expected):
        raise ValueError(f"{label} has a different sparsity pattern from its Parameter's "
                         f"({got.numel()} stored entries, {key.numel()} declared): pass a "
                         "tensor with exactly the declared pattern (explicit zeros are fine).")
    rank = cache["rank"]
    return vals[rank] if batch is None else vals.reshape(batch, -1)[:, rank]


def check_tensor(label: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        hint = (" Convert it with torch.as_tensor(value)."
                if value is not None else " Every parameter needs a value.")
        raise ParameterTypeError(f"{label} must be a torch.Tensor, got {describe(value)}.{hint}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{label} must be a float32 or float64 tensor, got dtype {value.dtype}. "
            "Cast it explicitly, e.g. value.double()."
        )
    return value


def promote(values: Sequence[torch.Tensor], labels: Sequence[str]):
    """Common dtype and device of the inputs (see the module's dtype rule)."""
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    devices = {v.device for v in values}
    if len(devices) > 1:
        listing = ", ".join(f"{lab} on {v.device}" for lab, v in zip(labels, values))
        raise ValueError(f"All parameters must be on one device; got {listing}. "
                         "Move them with .to(device).")
    device = next(iter(devices)) if devices else torch.device("cpu")
    return dtype, device


def check_batch(values: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]],
                labels: Sequence[str]) -> BatchInfo:
    """Each value has its parameter's shape, optionally with one leading batch dimension."""
    batch_sizes = []
    for value, shape, label in zip(values, shapes, labels):
        if value.dim() == len(shape):
            if tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"Invalid parameter shape for {label}: expected {tuple(shape)} or "
                    f"(batch, {', '.join(map(str, shape))}), got {tuple(value.shape)}."
                )
            batch_sizes.append(None)
        elif value.dim() == len(shape) + 1:
            if tuple(value.shape[1:]) != tuple(shape):
                raise ValueError(
                    f"Invalid parameter shape for {label}: expected batched shape "
                    f"(batch, {', '.join(map(str, shape))}), got {tuple(value.shape)}."
                )
            batch_sizes.append(int(value.shape[0]))
        else:
            raise ValueError(
                f"Invalid parameter dimensionality for {label}: expected {len(shape)} "
                f"(unbatched) or {len(shape) + 1} (batched) dimensions, got {value.dim()} "
                f"(shape {tuple(value.shape)})."
            )
    given = {b for b in batch_sizes if b is not None}
    if len(given) > 1:
        listing = ", ".join(f"{lab}: {b}" for lab, b in zip(labels, batch_sizes)
                            if b is not None)
        raise ValueError(f"Inconsistent batch sizes: {listing}. Batched parameters must share "
                         "one leading batch size; unbatched ones broadcast.")
    size = given.pop() if given else 1
    if size == 0:
        raise ValueError("Empty batch: the batched parameters have batch size 0.")
    dtype, device = promote(values, labels)
    return BatchInfo(size, bool(batch_sizes) and any(b is not None for b in batch_sizes),
                     tuple(b is not None for b in batch_sizes), dtype, device)


def check_dense(label: str, value: torch.Tensor, slot) -> None:
    if slot.sparse_index is None and value.layout != torch.strided:
        raise ValueError(
            f"{label} is a sparse tensor ({value.layout}), but its Parameter was declared "
            "dense. Pass value.to_dense(), or declare the Parameter with sparsity=... to "
            "pass its nonzeros sparsely.")


# ---------------------------------------------------------------------------
# Value checks: non-finite entries and the attribute rule (module docstring)
# ---------------------------------------------------------------------------


def value_failures(label: str, value: torch.Tensor, slot, batched: bool,
                   allow_neginf: bool = False, allow_posinf: bool = False):
    """Samples whose values no solve can use: (mask, message) or None.

    ``mask`` is a bool tensor over the leading dimensions (the batch; also any
    torch.func vmapped ones), True where a sample fails; ``message`` names the
    parameter, the first failing sample and what was expected. ``slot`` gives
    ``value_shape``, ``checks`` and ``attributes`` (a `ParameterSlot`).
    """
    inside = functorch_active(value)
    v = unwrap(value) if inside else value.detach()
    ndim = len(slot.value_shape)
    failures = []  # (mask over samples, message head, message tail)
    # One reduction settles the common case: the sum of finite values is finite
    # (barring overflow, which falls through to the exact check).
    if not bool(torch.isfinite(v.sum())):
        finite = torch.isfinite(v)
        if allow_neginf:
            finite = finite | (v == float("-inf"))
        if allow_posinf:
            finite = finite | (v == float("inf"))
        if not bool(finite.all()):
            kinds = "NaN" if bool(torch.isnan(v).any()) else "±inf"
            entry = "" if inside else \
                f" (first bad entry at index {tuple((~finite).nonzero()[0].tolist())})"
            failures.append((_any_entry(~finite, ndim), f"contains {kinds}",
                             f"{entry}. Parameters must be finite"))
        v = torch.where(finite, v, torch.zeros_like(v))  # the checks below see finite values
    for check in slot.checks:
        fails = _ATTRIBUTE_CHECKS[check](v, ndim)
        if fails is not None and bool(fails.any()):
            failures.append((fails, *_attribute_message(check, slot)))
    if not failures:
        return None
    bad = failures[0][0]
    for mask, _, _ in failures[1:]:
        bad = bad | mask
    if inside:
        head, tail = failures[0][1:]
        return bad, f"{label} {head} in a sample of a torch.func transform{tail}."
    if not batched:
        head, tail = failures[0][1:]
        return bad, f"{label} {head}{tail}."
    first = int(bad.nonzero()[0, 0])
    head, tail = next(f[1:] for f in failures if bool(f[0][first]))
    return bad, f"{label} {head} at batch index {first}{tail}."


def _any_entry(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """Any over the parameter's own (trailing) dimensions: one flag per sample."""
    return mask.flatten(-ndim).any(-1) if ndim else mask


# What a failed attribute check says, before and after the failing batch index;
# {declared} is the attribute as written.
_FAILURES = {
    "nonneg": ("was declared {declared}, and the problem is convex only with that sign "
               "(CVXPY's rules relied on it), but its value is negative", ""),
    "nonpos": ("was declared {declared}, and the problem is convex only with that sign "
               "(CVXPY's rules relied on it), but its value is positive", ""),
    "pos": ("enters the geometric program through its log, so it must be strictly positive, "
            "but its value is ≤ 0", ""),
    "psd": ("was declared PSD=True, and the problem is convex only for such values (as in "
            "quad_form(x, P)), but the symmetric matrix its upper triangle defines has a "
            "clearly negative eigenvalue", ""),
    "nsd": ("was declared NSD=True, and the problem is convex only for such values, but the "
            "symmetric matrix its upper triangle defines has a clearly positive eigenvalue", ""),
    "diag": ("was declared diag=True, but its value has nonzero off-diagonal entries",
             ", which would be dropped; pass a diagonal matrix"),
}


def _attribute_message(check: str, slot) -> tuple[str, str]:
    declared = " / ".join(f"{k}=True" for k in ATTRIBUTE_NAMES[check]
                          if slot.attributes.get(k)) or check
    head, tail = _FAILURES[check]
    return head.format(declared=declared), tail


def _sign(v, ndim, fails):
    return _any_entry(fails(v), ndim)


def _semidefinite(v, ndim, sign: float):
    """Eigenvalues of the matrix the upper triangle defines, against round-off."""
    if ndim != 2 or v.shape[-1] != v.shape[-2]:
        return None
    sym = torch.triu(v) + torch.triu(v, 1).mT
    eig = torch.linalg.eigvalsh(sign * sym.to(torch.float64))
    tol = semidefinite_tolerance(v.dtype) * eig.abs().amax(-1, keepdim=True)
    return (eig < -tol).any(-1)


def semidefinite_tolerance(dtype: torch.dtype) -> float:
    """Relative round-off allowed below zero in a semidefinite value: √eps of its dtype.

    √eps (1.5e-8 in float64, 3.5e-4 in float32) admits a Gram matrix AAᵀ
    computed in that precision, and refuses a clearly indefinite one.
    """
    return float(torch.finfo(dtype).eps) ** 0.5


def _off_diagonal(v, ndim):
    if ndim != 2:
        return None
    off = ~torch.eye(v.shape[-2], v.shape[-1], dtype=torch.bool, device=v.device)
    return ((v != 0) & off).flatten(-2).any(-1)


_ATTRIBUTE_CHECKS = {
    "nonneg": lambda v, d: _sign(v, d, lambda t: t < 0),
    "nonpos": lambda v, d: _sign(v, d, lambda t: t > 0),
    "pos": lambda v, d: _sign(v, d, lambda t: t <= 0),
    "psd": lambda v, d: _semidefinite(v, d, 1.0),
    "nsd": lambda v, d: _semidefinite(v, d, -1.0),
    "diag": _off_diagonal,
}
# The declared attributes behind each check (for messages).
ATTRIBUTE_NAMES = {"nonneg": ("nonneg", "pos", "boolean"), "nonpos": ("nonpos", "neg"),
                   "pos": ("pos",), "psd": ("PSD",), "nsd": ("NSD",), "diag": ("diag",)}


def stand_in(slot, like: torch.Tensor) -> torch.Tensor:
    """A value that passes ``slot``'s checks, for samples no good sample can stand in for.

    ±identity for square matrices with a matrix attribute, ±ones otherwise; the
    sign follows the slot's sign checks. The sample it stands in for is reported
    invalid_input whatever its solve gives.
    """
    shape = slot.value_shape
    sign = -1.0 if {"nonpos", "nsd"} & set(slot.checks) else 1.0
    if len(shape) == 2 and shape[0] == shape[1] and {"psd", "nsd", "diag"} & set(slot.checks):
        base = torch.eye(shape[0], dtype=like.dtype, device=like.device)
    else:
        base = torch.ones(shape, dtype=like.dtype, device=like.device)
    return sign * base
