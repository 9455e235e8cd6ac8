"""`CvxpyLayer`: a CVXPY problem as a differentiable torch module.

A drop-in for ``cvxpylayers.torch.CvxpyLayer``::

    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])
    (x_star,) = layer(A_t, b_t)          # each tensor: shape, or (batch, *shape)

Conventions (as cvxpylayers): each parameter may carry one leading batch
dimension; unbatched ones broadcast and their gradient is the sum over the
batch; a batch of 1 keeps its dimension. Outputs come back in the inputs'
(promoted) dtype and on their device. The layer never writes
``Parameter.value`` and keeps no per-call state, so it may be shared across
threads and two layers may share Parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks
from ._conic import ConicSolve
from ._entropy import EntropyPath, SimplexPath
from ._qp import QPPath, qp_settings
from .backends import conic
from .backends.status import Status
from .canon import CompiledProblem, compile_problem
from .errors import SolverError

ON_FAILURE = ("raise", "mask")
BACKENDS = ("auto", "simplex", "entropy", "qp", "conic")
TORCH_PATHS = {"simplex": SimplexPath, "entropy": EntropyPath, "qp": QPPath}


@dataclass(frozen=True)
class SolveInfo:
    """Per-sample outcome of one call (``layer(..., return_info=True)``)."""

    status: tuple[Status, ...]
    iterations: np.ndarray
    residuals: np.ndarray  # (B, 3): scaled primal, dual residual and gap
    backend: str

    @property
    def ok(self) -> bool:
        return all(s is Status.OPTIMAL for s in self.status)


class CvxpyLayer(torch.nn.Module):
    """Solve a parametrized CVXPY problem in the forward pass; differentiate it by the IFT.

    Args:
        problem: a DPP-compliant ``cvxpy.Problem`` (DGP with ``gp=True``).
        parameters: the problem's Parameters, in the order tensors are passed.
        variables: Variables (or constraints' dual variables) to return, in order.
        solver: conic solver run through diffcp: ``None``/"SCS" (default), "ECOS" or
            "CLARABEL". Naming one asks for the conic path.
        gp: the problem is a disciplined geometric program.
        verbose: print solver output.
        solver_args: default solver arguments; a call's ``solver_args`` override them.
        on_failure: "raise" (default) raises `SolverError` when a sample has no
            solution; "mask" returns NaN for those samples (zero gradient).
        strict: also count samples that stopped at the iteration/time limit
            (max_iter) or solved inaccurately as failures; by default they are
            returned with a UserWarning.
        backend: "auto" (default) takes the most specific exact path the problem's
            structure allows: "simplex" (projection onto a simplex: sparsemax),
            "entropy" (entropy-regularized LP: softmax, optimal transport), "qp"
            (batched torch interior point), "conic" (diffcp); naming one forces it
            (an invalid choice is an error).
    """

    def __init__(self, problem, parameters, variables, solver: str | None = None,
                 gp: bool = False, verbose: bool = False, solver_args: dict | None = None,
                 on_failure: str = "raise", backend: str = "auto", strict: bool = False):
        super().__init__()
        self._compiled: CompiledProblem = compile_problem(problem, parameters, variables, gp=gp)
        self.backend = _resolve_backend(backend, self._compiled, solver, solver_args)
        path = TORCH_PATHS.get(self.backend)
        self._path = path(self._compiled.form(self.backend)) if path else None
        self._labels = tuple(f"parameter {i} ('{s.name}')"
                             for i, s in enumerate(self._compiled.layout.slots))
        # Parameters that may be −inf (masked softmax logits); none elsewhere.
        self._maskable = (self._path.maskable(self._compiled.layout)
                          if hasattr(self._path, "maskable") else
                          (False,) * len(self._compiled.layout))
        self.solver = solver
        self.gp = gp
        self.verbose = verbose
        if solver_args is not None and not isinstance(solver_args, dict):
            raise TypeError(f"solver_args must be a dict, got {type(solver_args).__name__}.")
        self.solver_args = dict(solver_args or {})
        if verbose:
            self.solver_args.setdefault("verbose", True)
        _check_on_failure(on_failure)
        self.on_failure = on_failure
        self.strict = bool(strict)
        # Resolve once so a bad key fails at construction, not at the first call.
        if self.backend == "conic":
            method = self.solver_args.get("solve_method")
            if solver is not None and method is not None and (
                    conic.SOLVE_METHODS.get(str(solver).upper()) !=
                    conic.SOLVE_METHODS.get(str(method).upper())):
                raise ValueError(f"solver={solver!r} conflicts with solver_args['solve_method']="
                                 f"{method!r}; give one of them.")
            settings = conic.ConicSettings.resolve(solver, self.solver_args)
            conic.check_cones(self._compiled.form("conic").program.cone_dict,
                              settings.solve_method)
        else:
            qp_settings(self.solver_args)

    @property
    def compiled(self) -> CompiledProblem:
        return self._compiled

    # ------------------------------------------------------------------
    def forward(self, *params: torch.Tensor, solver_args: dict | None = None,
                return_info: bool = False, on_failure: str | None = None,
                strict: bool | None = None):
        """Solve for a batch of parameter values; returns a tuple in ``variables`` order."""
        layout = self._compiled.layout
        if len(params) != len(layout):
            names = ", ".join(f"'{s.name}'" for s in layout.slots)
            raise ValueError(
                "A tensor must be provided for each CVXPY parameter; "
                f"received {len(params)} tensors, expected {len(layout)} ({names})."
            )
        if solver_args is not None and not isinstance(solver_args, dict):
            raise TypeError(f"solver_args must be a dict, got {type(solver_args).__name__}.")
        on_failure = self.on_failure if on_failure is None else on_failure
        _check_on_failure(on_failure)
        strict = self.strict if strict is None else bool(strict)
        params = tuple(_checks.check_tensor(lab, p) for lab, p in zip(self._labels, params))
        batch = _checks.check_batch(params, [s.shape for s in layout.slots], self._labels)
        for lab, p, slot, b, neginf in zip(self._labels, params, layout.slots, batch.per_input,
                                           self._maskable):
            _checks.check_finite(lab, p, b, allow_neginf=neginf)
            _checks.check_attributes(lab, p, slot.attributes, b)
        if self._path is not None:
            settings = (qp_settings(self.solver_args, solver_args) if self.backend == "qp"
                        else None)
            theta = self._theta(params, batch, batch.dtype)
            flat, result = self._path.solve(theta, settings)
            info = SolveInfo(tuple(result.status), result.iterations.cpu().numpy(),
                             result.residuals.detach().cpu().numpy(), self.backend)
        else:
            settings = conic.ConicSettings.resolve(self.solver, self.solver_args, solver_args)
            form = self._compiled.form("conic")
            conic.check_cones(form.program.cone_dict, settings.solve_method)
            theta = self._theta(params, batch, torch.float64)
            need_derivative = torch.is_grad_enabled() and theta.requires_grad
            box: dict = {}
            flat = ConicSolve.apply(theta, form, settings, need_derivative, box)
            result = box["result"]
            info = SolveInfo(tuple(result.status), result.iterations, result.residuals, "conic")
        flat = _handle_failures(flat, info, on_failure, strict)
        outputs = self._shape_outputs(flat, batch)
        return (outputs, info) if return_info else outputs

    # ------------------------------------------------------------------
    def _theta(self, params, batch: _checks.BatchInfo, dtype: torch.dtype) -> torch.Tensor:
        """The (B, len θ) parameter matrix; see `canon.parameters` for the layout."""
        B = batch.size
        cols, logs = [], []
        for p, batched, log in zip(params, batch.per_input, self._compiled.layout.log_space):
            p = p.to(dtype)
            flat = p.reshape(B, -1) if batched else p.reshape(1, -1).expand(B, -1)
            cols.append(flat)
            if log:
                logs.append(torch.log(flat))
        cols.extend(logs)
        cols.append(torch.ones(B, 1, dtype=dtype, device=batch.device))
        return torch.cat(cols, dim=1)

    def _shape_outputs(self, flat, batch: _checks.BatchInfo):
        outs = []
        for value, rec in zip(flat, self._compiled.form(self.backend).outputs):
            value = value.reshape((batch.size,) + rec.shape)
            if self._compiled.gp and rec.is_primal:
                value = torch.exp(value)
            if not batch.batched:
                value = value[0]
            outs.append(value.to(batch.dtype))
        return tuple(outs)


def _resolve_backend(backend: str, compiled: CompiledProblem, solver, solver_args) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    kinds = compiled.kinds
    if backend == "auto":
        # Naming a conic solver (solver=... or solver_args['solve_method']) asks for it.
        wants_conic = solver is not None or "solve_method" in (solver_args or {})
        return "conic" if wants_conic and "conic" in kinds else kinds[0]
    if backend == "conic":
        compiled.form("conic")  # raises the specific reason when there is none
    if backend not in kinds:
        raise ValueError(
            f"backend={backend!r} is not valid for this problem: its structure allows "
            f"{kinds}. The QP path needs a quadratic (or linear) objective and affine "
            "constraints."
        )
    return backend


def failed_samples(status, strict: bool) -> list[int]:
    """Samples without a usable solution (strict: anything but optimal)."""
    if strict:
        return [i for i, s in enumerate(status) if s is not Status.OPTIMAL]
    return [i for i, s in enumerate(status) if not s.has_solution]


def mask_samples(flat, bad: list[int]):
    """NaN in the rows ``bad``; torch.where gives those rows zero gradient."""
    out = []
    for t in flat:
        mask = torch.zeros(t.shape[0], 1, dtype=torch.bool, device=t.device)
        mask[bad] = True
        out.append(torch.where(mask, torch.full_like(t, float("nan")), t))
    return out


def _check_on_failure(on_failure: str) -> None:
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}.")


def _handle_failures(flat, info: SolveInfo, on_failure: str, strict: bool):
    """Raise, or NaN-mask, the failed samples; warn about the usable-but-imperfect ones."""
    if all(s is Status.OPTIMAL for s in info.status):
        return flat
    bad = failed_samples(info.status, strict)
    if bad and on_failure == "raise":
        raise SolverError(bad, [info.status[i] for i in bad])
    if bad:
        flat = mask_samples(flat, bad)
    if not strict:
        warn_imperfect(info.status, stacklevel=4)
    return flat


def warn_imperfect(status, stacklevel: int = 3) -> None:
    capped = [i for i, s in enumerate(status) if s is Status.MAX_ITER]
    if capped:
        warnings.warn(f"Samples {capped} stopped at the iteration or time limit (status "
                      "max_iter); their solutions are the best iterate. Pass strict=True to "
                      "treat this as a failure.", UserWarning, stacklevel=stacklevel)
    inaccurate = [i for i, s in enumerate(status) if s is Status.OPTIMAL_INACCURATE]
    if inaccurate:
        warnings.warn(f"Samples {inaccurate} were solved inaccurately (status "
                      "optimal_inaccurate); tighten the solver tolerances.", UserWarning,
                      stacklevel=stacklevel)
