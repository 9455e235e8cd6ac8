"""`QPFunction`: a drop-in for ``qpth.qp.QPFunction`` on the batched IPM engine.

    from declarative import QPFunction
    z = QPFunction(verbose=-1)(Q, p, G, h, A, b)        # (nBatch, nz)

solves, for each sample, ``minimize ½ zᵀQz + pᵀz  s.t.  Gz ≤ h, Az = b``.
Shapes as qpth: Q (nBatch, nz, nz) or (nz, nz); p (nBatch, nz) or (nz,);
G (nBatch, nineq, nz) or (nineq, nz); h (nBatch, nineq) or (nineq,);
A (nBatch, neq, nz) or (neq, nz); b (nBatch, neq) or (neq,). An empty tensor
(``torch.Tensor()``) stands for absent A and b (or G and h). The output is
always (nBatch, nz).

Deviations from qpth, each deliberate:

- A broadcast (unbatched) input receives the **sum** of the per-sample
  gradients, as autograd does for any broadcast; qpth returns the mean.
- Q only needs to be positive **semi**definite (Q = 0 is an LP);
  ``check_Q_spd=True`` checks semidefiniteness and raises naming Q if Q is
  indefinite. A non-symmetric Q is replaced by (Q + Qᵀ)/2, which defines the
  same objective; its gradient is symmetric.
- Equality-only and unconstrained problems are accepted.
- An infeasible or unbounded sample raises `declarative.SolverError` with its
  batch index (``on_failure="mask"`` returns NaN for it instead); qpth returns
  a wrong point silently.
- A NaN or ±inf entry (+inf in h means "no constraint" and is fine) raises a
  ValueError naming the argument and batch index; with ``on_failure="mask"``
  that sample is reported invalid_input (NaN output, zero gradient) and the
  others are solved as they would be alone.
- ``eps`` is a tolerance on scaled residuals (default 1e-10 in float64, 1e-5 in
  float32), ``maxIter`` defaults to 50 and ``notImprovedLim`` to 8; qpth's
  defaults (1e-12 absolute, 20, 3) stop some well-posed batches early.
- ``solver=QPSolvers.CVXPY`` is accepted and uses the same engine.
"""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace

import torch

from . import _checks
from ._pipeline import check_on_failure, resolve_warm_start, settle
from .backends import solution
from .backends.qp import QPSettings, solve_qp

NAMES = ("Q", "p", "G", "h", "A", "b")


class QPSolvers(Enum):
    """qpth's solver enum, accepted for compatibility (both use the batched IPM)."""

    PDIPM_BATCHED = 1
    CVXPY = 2


def QPFunction(eps: float | None = None, verbose: int = 0, notImprovedLim: int | None = None,
               maxIter: int | None = None, solver=QPSolvers.PDIPM_BATCHED,
               check_Q_spd: bool = True, *, on_failure: str = "raise", strict: bool = False,
               backward: str | None = None, settings: QPSettings | None = None):
    """Build the QP function; call it as ``fn(Q, p, G, h, A, b)``.

    The returned function also takes ``return_info=True`` (returns (z, result)) and
    ``warm_start=result`` (a previous call's result, same batch size).

    Extra keyword arguments beyond qpth's: ``on_failure`` ("raise" or "mask"),
    ``strict`` (max_iter and inaccurate samples count as failures), ``backward``
    ("implicit", "unroll" or "iterative"; default: the settings' own, "implicit")
    and a full `QPSettings`.
    """
    if not isinstance(solver, QPSolvers) and solver not in (1, 2):
        raise ValueError(f"solver must be a QPSolvers value, got {solver!r}.")
    check_on_failure(on_failure)
    base = settings or QPSettings()
    changes = {} if backward is None else {"backward": backward}
    if eps is not None:
        changes["eps"] = float(eps)
    if maxIter is not None:
        changes["max_iter"] = int(maxIter)
    if notImprovedLim is not None:
        changes["not_improved_lim"] = int(notImprovedLim)
    changes["check_psd"] = bool(check_Q_spd)
    qp_settings = base.with_(**changes)

    def qp_function(Q, p, G, h, A, b, return_info: bool = False, warm_start=None):
        inputs, batch = check_qp_inputs(Q, p, G, h, A, b)
        inputs, invalid = _invalid_samples(inputs, batch, on_failure)
        Q, _, G, _, A, _ = inputs
        shapes = {"z": Q.shape[-1], "lam": G.shape[-2], "s": G.shape[-2], "nu": A.shape[-2]}
        warm = resolve_warm_start(warm_start, None, "qp", batch, shapes)
        (z, _, _), result = solve_qp(*inputs, batch=batch, settings=qp_settings, warm=warm)
        if invalid:
            result.codes = result.codes.index_fill(
                0, torch.tensor(invalid, device=result.codes.device), solution.INVALID)
        status = result.status
        if verbose and verbose > 0:
            its = result.iterations.tolist()
            print(f"declarative.QPFunction: batch {batch}, kkt={result.kkt.name}, "
                  f"iterations min/max {min(its)}/{max(its)}, statuses "
                  f"{ {str(s): status.count(s) for s in set(status)} }")
        # verbose governs printing only: the policy's warnings stay warnings. A fresh
        # tensor: editing it in place must not touch what the backward saved.
        (z,) = settle([z.clone()], status, on_failure, strict)
        return (z, result) if return_info else z

    return qp_function


def check_qp_inputs(Q, p, G, h, A, b):
    """Validate qpth-style inputs; return the six tensors (empties sized) and nBatch.

    Semidefiniteness of Q is checked by the solver (``QPSettings.check_psd``),
    which factors Q anyway: the check then costs nothing when Q is definite.
    """
    values = [Q, p, G, h, A, b]
    for i, (name, v) in enumerate(zip(NAMES, values)):
        _checks.check_tensor(f"{name} (argument {i})", v)
    # Empty placeholders (qpth's torch.Tensor() for absent A, b) may sit on the CPU
    # while the data is on a GPU: they take no part in the device check.
    present = [(v, n) for v, n in zip(values, NAMES) if v.numel()]
    dtype, device = _checks.promote([v for v, _ in present] or values,
                                    [n for _, n in present] or NAMES)
    values = [v.to(dtype=dtype, device=device) for v in values]
    Q, p, G, h, A, b = values
    if Q.dim() not in (2, 3) or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"Q must have shape (nz, nz) or (nBatch, nz, nz), got {tuple(Q.shape)}.")
    nz = Q.shape[-1]
    if nz == 0:
        raise ValueError(f"Q has shape {tuple(Q.shape)}: nz = 0, a QP without variables. "
                         "Pass at least one variable.")

    def matrix(name, M, v):
        if M.numel() == 0 and v.numel() == 0:
            return (torch.zeros(0, nz, dtype=dtype, device=device),
                    torch.zeros(0, dtype=dtype, device=device))
        if M.dim() not in (2, 3) or M.shape[-1] != nz:
            raise ValueError(f"{name} must have shape (rows, {nz}) or (nBatch, rows, {nz}), "
                             f"got {tuple(M.shape)}.")
        rows = M.shape[-2]
        vname = {"G": "h", "A": "b"}[name]
        if v.dim() not in (1, 2) or v.shape[-1] != rows:
            raise ValueError(f"{vname} must have shape ({rows},) or (nBatch, {rows}) to match "
                             f"{name} {tuple(M.shape)}, got {tuple(v.shape)}.")
        return M, v

    if p.dim() not in (1, 2) or p.shape[-1] != nz:
        raise ValueError(f"p must have shape ({nz},) or (nBatch, {nz}), got {tuple(p.shape)}.")
    G, h = matrix("G", G, h)
    A, b = matrix("A", A, b)
    sizes = {name: t.shape[0] for name, t, d in zip(NAMES, (Q, p, G, h, A, b), (3, 2, 3, 2, 3, 2))
             if t.dim() == d}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"Inconsistent batch sizes: {listing}.")
    batch = next(iter(sizes.values())) if sizes else 1
    if batch == 0:
        raise ValueError("Empty batch: nBatch is 0.")
    return (Q, p, G, h, A, b), batch


# Trailing dimensions of each input (an extra leading one is the batch).
_NDIM = (2, 1, 2, 1, 2, 1)


def _invalid_samples(inputs, batch: int, on_failure: str):
    """Non-finite samples (+inf in h drops a row and is fine): raise, or stand in for them.

    With ``on_failure="mask"`` each bad sample solves the first good sample's
    QP instead (detached, so it has zero gradient) and is reported
    invalid_input; with no good sample, a QP that is always solvable.
    Returns (inputs, invalid sample indices).
    """
    failed = {}
    for k, (name, t, nd) in enumerate(zip(NAMES, inputs, _NDIM)):
        slot = SimpleNamespace(value_shape=tuple(t.shape[-nd:]), checks=(), attributes={})
        found = _checks.value_failures(name, t, slot, t.dim() > nd, allow_posinf=(name == "h"))
        if found is None:
            continue
        mask, message = found
        if on_failure == "raise" or _checks.functorch_active(t):
            raise ValueError(message + " Pass on_failure='mask' to mark such samples "
                             "invalid_input (NaN outputs) instead.")
        failed[k] = mask.to("cpu").expand(batch)
    if not failed:
        return inputs, ()
    bad = torch.stack(list(failed.values())).any(0)
    good = (~bad).nonzero().flatten()
    neutral = _always_solvable(inputs)
    out = []
    for k, (t, nd) in enumerate(zip(inputs, _NDIM)):
        if good.numel() and t.dim() > nd:
            rows = bad.to(t.device).reshape((-1,) + (1,) * nd)
            t = torch.where(rows, t[int(good[0])].detach(), t)
        elif not good.numel() and k in failed:
            t = torch.where(torch.ones((), dtype=torch.bool, device=t.device), neutral[k], t)
        out.append(t)
    return tuple(out), tuple(bad.nonzero().flatten().tolist())


def _always_solvable(inputs):
    """Q = I, p = 0, G = 0, h = 1, A = [I 0], b = 0: feasible and bounded for rows ≤ nz."""
    Q, p, G, h, A, b = inputs
    nz = Q.shape[-1]
    like = {"dtype": Q.dtype, "device": Q.device}
    A0 = torch.eye(A.shape[-2], nz, **like)
    return (torch.eye(nz, **like), torch.zeros(nz, **like), torch.zeros(G.shape[-2:], **like),
            torch.ones(h.shape[-1], **like), A0, torch.zeros(b.shape[-1], **like))
