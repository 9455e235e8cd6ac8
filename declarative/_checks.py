"""Argument checks for the front doors, run before any solve.

Every message names the argument (its position and name), what arrived and
what was expected, so a user can fix the call without reading our code.
Shape and batch messages keep the phrases cvxpylayers users search for.

Dtype rule: float32 and float64 are accepted; mixing them promotes to
float64 (as torch's type promotion does), and outputs come back in the
promoted dtype. Integer, boolean, complex and half-precision tensors are
refused: a silent cast would hide a modelling mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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

    Value-dependent checks (NaN, attributes, statuses read on the host) cannot
    run inside those transforms; the layer skips them there.
    """
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(t, torch.Tensor) and is_wrapped(t) for t in tensors)


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


def check_finite(label: str, value: torch.Tensor, batched: bool, allow_posinf: bool = False,
                 allow_neginf: bool = False):
    # One reduction settles the common case: the sum of finite values is finite
    # (barring overflow, which falls through to the exact check below).
    if bool(torch.isfinite(value.detach().sum())):
        return
    ok = torch.isfinite(value)
    if allow_posinf:
        ok = ok | (value == float("inf"))
    if allow_neginf:
        ok = ok | (value == float("-inf"))
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()[0].tolist()
    where = f" at batch index {bad[0]}" if batched else ""
    kinds = "NaN" if bool(torch.isnan(value).any()) else "±inf"
    raise ValueError(f"{label} contains {kinds}{where} (first bad entry at index {tuple(bad)}). "
                     "Parameters must be finite.")


def check_attributes(label: str, value: torch.Tensor, attributes: dict, batched: bool) -> None:
    """Values must satisfy the Parameter's declared attributes (nonneg, PSD, ...)."""
    def fail(what: str, mask: torch.Tensor):
        idx = mask.nonzero()
        where = f" at batch index {int(idx[0, 0])}" if batched and idx.numel() else ""
        raise ValueError(f"{label} was declared {what} but its value violates that{where}.")

    v = value.detach()
    if attributes.get("nonneg") and bool((v < 0).any()):
        fail("nonneg=True", v < 0)
    if attributes.get("pos") and bool((v <= 0).any()):
        fail("pos=True (strictly positive)", v <= 0)
    if attributes.get("nonpos") and bool((v > 0).any()):
        fail("nonpos=True", v > 0)
    if attributes.get("neg") and bool((v >= 0).any()):
        fail("neg=True (strictly negative)", v >= 0)
    sym = attributes.get("symmetric") or attributes.get("PSD") or attributes.get("NSD")
    if sym and v.dim() >= 2:
        scale = v.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1.0)
        asym = (v - v.transpose(-2, -1)).abs() > 1e-8 * scale
        if bool(asym.any()):
            fail("symmetric", asym.flatten(-2).any(-1, keepdim=True) if batched else asym)
        if attributes.get("PSD") or attributes.get("NSD"):
            eig = torch.linalg.eigvalsh(v.double())
            tol = 1e-8 * eig.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
            bad = (eig < -tol) if attributes.get("PSD") else (eig > tol)
            if bool(bad.any()):
                fail("PSD=True" if attributes.get("PSD") else "NSD=True",
                     bad.any(-1, keepdim=True) if batched else bad)
