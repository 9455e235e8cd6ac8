"""Reliability: every bad input gets a clear error, every solver failure a per-sample status,
nothing silent.

Each test runs under the watchdog of ``conftest.py`` (SIGALRM after 60 s), so a hang
fails instead of blocking CI. Sections:

1. Per-sample status on every path (simplex, entropy, qp, conic) and in QPFunction:
   ``return_info``, ``on_failure="raise" | "mask"``, iteration caps, ``strict``.
2. Input validation before any solve. CvxpyLayer's own argument errors are in
   ``test_layer_errors.py`` (parameter lists, non-tensors, dtypes, shapes, batch
   sizes, empty batch, NaN/inf, attributes, conic-path solver_args) and the first
   QPFunction shape errors in ``test_qp.py``; this file adds what they leave out.
3. Solver outcomes: infeasible/unbounded mixes, huge values, near-infeasible
   problems under a time limit, ties and degenerate or singular KKT systems, NaN in
   the upstream gradient.
4. Autograd and concurrency plumbing: threads, forked DataLoader workers, shared
   Parameters, retain_graph, double backward, no_grad / inference_mode.
5. Properties (hypothesis, derandomized): random LPs, QPs and SOCPs against Clarabel
   and central differences on every path that accepts them.

Library bugs found here are kept as ``xfail(strict=True, reason="BUG: ...")``.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import cvxpy as cp
import diffcp
import numpy as np
import pytest
import torch
from helpers import SCS_TIGHT, as_tensor, qp_reference, reference_solve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import declarative
from declarative import CvxpyLayer, ParameterTypeError, QPFunction, SolverError, Status

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.watchdog(60),
    # diffcp's own warning on SCS's capped runs (our max_iter warning is asserted instead).
    pytest.mark.filterwarnings("ignore:Solved/Inaccurate"),
]

DT = torch.float64
E = torch.Tensor()  # qpth's spelling of an absent (A, b) or (G, h)
QP_NAMES = ("Q", "p", "G", "h", "A", "b")
SCS_ARGS = {"eps": 1e-10, "max_iters": 100_000}



def _xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=f"BUG: {reason}")


def _quiet(fn, *args, **kwargs):
    """Call with warnings silenced (max_iter / inaccurate warnings are tested elsewhere)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------
# A zoo of small problems, one per path, each with a way to fail one sample
# ----------------------------------------------------------------------------


@functools.cache
def _problem(kind: str):
    """(cvxpy problem, parameters, variables, layer kwargs) for a path.

    simplex  sparsemax with a radius:   min ‖z − y‖²  s.t. Σz = r, z ≥ 0    (r < 0: infeasible)
    softmax  max θᵀz + H(z)  s.t. Σz = 1                                   (θ = −inf row: invalid)
    entropy  max θᵀz + H(z)  s.t. Σz = 1, aᵀz = β   (dual Newton)          (β ∉ [−1, 2]: infeasible)
    qp/conic min ‖x‖²  s.t. x ≥ p, Σx ≤ 1                                  (Σp > 1: infeasible)
    """
    n = 4
    if kind == "simplex":
        y, r, z = cp.Parameter(n, name="y"), cp.Parameter(name="r"), cp.Variable(n)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(z - y)), [cp.sum(z) == r, z >= 0])
        return prob, [y, r], [z], {}
    if kind == "softmax":
        th, z = cp.Parameter(n, name="theta"), cp.Variable(n)
        prob = cp.Problem(cp.Maximize(th @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1])
        return prob, [th], [z], {}
    if kind == "entropy":
        th, beta, z = cp.Parameter(n, name="theta"), cp.Parameter(name="beta"), cp.Variable(n)
        a = np.array([1.0, -1.0, 0.0, 2.0])
        prob = cp.Problem(cp.Maximize(th @ z + cp.sum(cp.entr(z))),
                          [cp.sum(z) == 1, a @ z == beta])
        return prob, [th, beta], [z], {}
    p, x = cp.Parameter(n, name="p"), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= p, cp.sum(x) <= 1])
    if kind in ("qp", "sparse_qp"):  # both QP engines, forced: auto chooses by cost
        return prob, [p], [x], {"backend": kind}
    assert kind == "conic"
    return prob, [p], [x], {"backend": "conic", "solver_args": SCS_ARGS}


BACKEND_OF = {"simplex": "simplex", "softmax": "entropy", "entropy": "entropy", "qp": "qp",
              "sparse_qp": "sparse_qp", "conic": "conic"}
KINDS = list(BACKEND_OF)


@functools.cache
def _layer(kind: str) -> CvxpyLayer:
    prob, params, outs, kw = _problem(kind)
    layer = CvxpyLayer(prob, params, outs, **kw)
    assert layer.backend == BACKEND_OF[kind]
    return layer


def _batch(kind: str, fail: tuple[int, ...] = (), B: int = 3, seed: int = 0):
    """Batched inputs (numpy) for ``kind``; samples in ``fail`` have no solution."""
    rng = np.random.default_rng(seed)
    n = 4
    if kind == "simplex":
        r = np.array([1.0 + 0.5 * i for i in range(B)])
        r[list(fail)] = -1.0
        return [rng.standard_normal((B, n)), r]
    if kind == "softmax":
        th = rng.standard_normal((B, n))
        th[list(fail)] = -np.inf
        return [th]
    if kind == "entropy":
        beta = rng.uniform(-0.5, 1.5, B)
        beta[list(fail)] = 5.0
        return [rng.standard_normal((B, n)), beta]
    p = rng.uniform(-0.5, 0.2, (B, n))
    p[list(fail)] = 0.5  # Σp = 2 > 1
    return [p]


FAIL_STATUS = {"simplex": Status.INFEASIBLE, "softmax": Status.INVALID_INPUT,
               "entropy": Status.INFEASIBLE, "qp": Status.INFEASIBLE,
               "sparse_qp": Status.INFEASIBLE, "conic": Status.INFEASIBLE}


def _weights(shape, seed=1):
    return torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# 0. The watchdog itself
# ----------------------------------------------------------------------------


@pytest.mark.watchdog(0.5)
def test_watchdog_turns_a_hang_into_a_timeout_error():
    with pytest.raises(TimeoutError, match="exceeded its 0.5 s watchdog"):
        time.sleep(30)


# ----------------------------------------------------------------------------
# 1. Per-sample status
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_return_info_reports_per_sample_status_iterations_and_residuals(kind):
    layer = _layer(kind)
    args = [as_tensor(a) for a in _batch(kind)]
    (x,), info = layer(*args, return_info=True)
    assert isinstance(info, declarative.SolveInfo)
    assert info.backend == BACKEND_OF[kind]
    assert info.status == (Status.OPTIMAL,) * 3 and info.ok
    assert info.iterations.shape == (3,) and np.issubdtype(info.iterations.dtype, np.integer)
    assert (info.iterations >= 0).all()
    if kind in ("qp", "sparse_qp", "conic", "entropy"):  # iterative solvers did some work
        assert (info.iterations >= 1).all()
    assert info.residuals.shape == (3, 3)
    assert np.isfinite(info.residuals).all() and (info.residuals >= 0).all()
    assert info.residuals.max() < 1e-6
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kind", KINDS)
def test_failed_sample_raises_solver_error_with_indices_and_statuses(kind):
    layer = _layer(kind)
    args = [as_tensor(a) for a in _batch(kind, fail=(1,))]
    with pytest.raises(SolverError) as err:
        layer(*args)
    e = err.value
    assert isinstance(e, diffcp.SolverError)  # cvxpylayers' except clauses keep working
    assert e.indices == [1] and e.statuses == [FAIL_STATUS[kind]]
    assert f"1: {FAIL_STATUS[kind]}" in str(e) and "0:" not in str(e)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_keeps_other_samples_equal_to_solo_solves_nan_and_zero_grad_in_failed(kind):
    layer = _layer(kind)
    raw = _batch(kind, fail=(1,))
    args = [as_tensor(a, grad=True) for a in raw]
    (x,), info = layer(*args, on_failure="mask", return_info=True)
    assert info.status[1] is FAIL_STATUS[kind] and not info.ok
    assert info.status[0] is Status.OPTIMAL and info.status[2] is Status.OPTIMAL
    assert torch.isnan(x[1]).all() and torch.isfinite(x[[0, 2]]).all()
    w = _weights(x.shape)
    grads = torch.autograd.grad(x, args, w, allow_unused=True)
    g = grads[0]
    assert torch.isfinite(g).all()
    assert (g[1] == 0).all()
    for i in (0, 2):
        solo = [as_tensor(a[i], grad=True) for a in raw]
        (xi,) = layer(*solo)
        (gi,) = torch.autograd.grad(xi, solo[0], w[i])
        assert (xi - x[i]).abs().max() < 1e-9
        assert (gi - g[i]).abs().max() < 1e-7


CAPS = {
    "qp": {"max_iter": 2},
    # The sparse engine starts elsewhere: its iterate is within the usable limits
    # of the status policy after 3 iterations (after 1 or 2 it is a failure).
    "sparse_qp": {"max_iter": 3},
    # An iterate within the usable limits of the conic status policy; after 5
    # iterations it is 74 % infeasible, which is a failure (test_conic_layer).
    "conic": {"max_iters": 40},
}


@pytest.mark.parametrize("kind", list(CAPS))
def test_iteration_cap_returns_the_iterate_with_a_warning_never_optimal(kind):
    layer = _layer(kind)
    args = [as_tensor(a, grad=True) for a in _batch(kind)]
    with pytest.warns(UserWarning, match=r"status max_iter"):
        (x,), info = layer(*args, solver_args=CAPS[kind], return_info=True)
    assert all(s is Status.MAX_ITER for s in info.status)
    assert torch.isfinite(x).all()
    (g,) = torch.autograd.grad(x, args, _weights(x.shape))
    assert torch.isfinite(g).all()
    with pytest.raises(SolverError) as err:
        layer(*args, solver_args=CAPS[kind], strict=True)
    assert err.value.indices == [0, 1, 2] and set(err.value.statuses) == {Status.MAX_ITER}
    # strict + mask: NaN for the capped samples, no warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*status max_iter")
        (xm,) = layer(*args, solver_args=CAPS[kind], strict=True, on_failure="mask")
    assert torch.isnan(xm).all()


def _qpfunction_batch(fail=(1,)):
    """qpth form of the qp zoo problem: Q = 2I, p = 0, G = [−I; 1ᵀ], h = [−lo; 1]."""
    (lo,) = _batch("qp", fail=fail)
    n = lo.shape[1]
    Q = 2 * torch.eye(n, dtype=DT)
    G = as_tensor(np.vstack([-np.eye(n), np.ones((1, n))]))
    h = as_tensor(np.hstack([-lo, np.ones((lo.shape[0], 1))]), grad=True)
    return Q, torch.zeros(n, dtype=DT), G, h, E, E


def test_qpfunction_statuses_raise_mask_and_solo_solves():
    Q, p, G, h, A, b = _qpfunction_batch()
    with pytest.raises(SolverError) as err:
        QPFunction(verbose=-1)(Q, p, G, h, A, b)
    assert err.value.indices == [1] and err.value.statuses == [Status.INFEASIBLE]
    z, info = QPFunction(verbose=-1, on_failure="mask")(Q, p, G, h, A, b, return_info=True)
    assert info.status == [Status.OPTIMAL, Status.INFEASIBLE, Status.OPTIMAL]
    assert tuple(info.iterations.shape) == (3,) and tuple(info.residuals.shape) == (3, 3)
    assert float(info.residuals[[0, 2]].max()) < 1e-8
    assert torch.isnan(z[1]).all() and torch.isfinite(z[[0, 2]]).all()
    w = _weights(z.shape)
    (gh,) = torch.autograd.grad(z, h, w)
    assert torch.isfinite(gh).all() and (gh[1] == 0).all()
    for i in (0, 2):
        hi = h[i].detach().clone().requires_grad_(True)
        zi = QPFunction(verbose=-1)(Q, p, G, hi, A, b)
        (gi,) = torch.autograd.grad(zi, hi, w[i:i + 1])
        assert (zi[0] - z[i]).abs().max() < 1e-12 and (gi - gh[i]).abs().max() < 1e-9


def test_qpfunction_iteration_cap_warns_and_strict_raises():
    Q, p, G, h, A, b = _qpfunction_batch(fail=())
    with pytest.warns(UserWarning, match=r"status max_iter"):
        z, info = QPFunction(verbose=0, maxIter=2)(Q, p, G, h, A, b, return_info=True)
    assert info.status == [Status.MAX_ITER] * 3 and torch.isfinite(z).all()
    with pytest.raises(SolverError) as err:
        QPFunction(verbose=0, maxIter=2, strict=True)(Q, p, G, h, A, b)
    assert err.value.statuses == [Status.MAX_ITER] * 3
    z = QPFunction(verbose=0, maxIter=2, strict=True, on_failure="mask")(Q, p, G, h, A, b)
    assert torch.isnan(z).all()
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'mask'"):
        QPFunction(on_failure="ignore")


# ----------------------------------------------------------------------------
# 2. Input validation (QPFunction; CvxpyLayer's is in test_layer_errors.py)
# ----------------------------------------------------------------------------


def _qp_valid():
    """A valid batched qpth call with every block batched (B = 2, nz = 3, 3 ineq, 1 eq)."""
    rng = np.random.default_rng(3)
    B, n = 2, 3
    Q = as_tensor(np.broadcast_to(np.eye(n), (B, n, n)).copy())
    G = as_tensor(rng.standard_normal((B, 3, n)))
    h = as_tensor(np.ones((B, 3)))
    A = as_tensor(np.ones((B, 1, n)))
    return [Q, as_tensor(rng.standard_normal((B, n))), G, h, A, as_tensor(np.zeros((B, 1)))]


def _qp_with(k, fn):
    args = _qp_valid()
    args[k] = fn(args[k])
    return args


NOT_TENSORS = {"None": lambda t: None, "numpy": lambda t: t.numpy(), "list": lambda t: t.tolist()}


@pytest.mark.parametrize("kind", list(NOT_TENSORS))
@pytest.mark.parametrize("k", range(6), ids=QP_NAMES)
def test_qpfunction_non_tensor_argument_names_it(k, kind):
    with pytest.raises(ParameterTypeError,
                       match=rf"^{QP_NAMES[k]} \(argument {k}\) must be a torch.Tensor"):
        QPFunction(verbose=-1)(*_qp_with(k, NOT_TENSORS[kind]))


BAD_DTYPES = [torch.float16, torch.bfloat16, torch.int32, torch.bool, torch.complex128]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("k", range(6), ids=QP_NAMES)
def test_qpfunction_integer_half_bool_complex_dtypes_are_refused(k, dtype):
    with pytest.raises(TypeError, match=rf"^{QP_NAMES[k]} \(argument {k}\) must be a float32 "
                                        rf"or float64 tensor, got dtype {dtype}"):
        QPFunction(verbose=-1)(*_qp_with(k, lambda t: t.to(dtype)))


@pytest.mark.parametrize("k", range(6), ids=QP_NAMES)
def test_qpfunction_too_many_dimensions_names_the_argument(k):
    with pytest.raises(ValueError, match=rf"^{QP_NAMES[k]} must have shape"):
        QPFunction(verbose=-1)(*_qp_with(k, lambda t: t[None]))


def _wrong_last_dim(t):
    return torch.cat([t, t[..., :1]], dim=-1)


# The argument the message names: a wrong trailing size of h or b is reported against G, A.
@pytest.mark.parametrize("k, named", [(0, "Q"), (1, "p"), (2, "G"), (3, "h"), (4, "A"),
                                      (5, "b")], ids=QP_NAMES)
def test_qpfunction_wrong_trailing_size_names_the_argument(k, named):
    with pytest.raises(ValueError, match=rf"^{named} must have shape") as err:
        QPFunction(verbose=-1)(*_qp_with(k, _wrong_last_dim))
    assert str(tuple(_wrong_last_dim(_qp_valid()[k]).shape)) in str(err.value)


@pytest.mark.parametrize("k", range(6), ids=QP_NAMES)
def test_qpfunction_inconsistent_batch_size_names_the_argument(k):
    with pytest.raises(ValueError, match=rf"Inconsistent batch sizes: .*{QP_NAMES[k]}: 3"):
        QPFunction(verbose=-1)(*_qp_with(k, lambda t: torch.cat([t, t[:1]])))


@pytest.mark.parametrize("k", range(6), ids=QP_NAMES)
def test_qpfunction_one_empty_batch_names_the_argument(k):
    with pytest.raises(ValueError, match=rf"Inconsistent batch sizes: .*{QP_NAMES[k]}: 0"):
        QPFunction(verbose=-1)(*_qp_with(k, lambda t: t[:0]))


def test_qpfunction_all_empty_batch_is_refused():
    with pytest.raises(ValueError, match="Empty batch: nBatch is 0"):
        QPFunction(verbose=-1)(*[t[:0] for t in _qp_valid()])


def _set_entry(value):
    def fn(t):
        t = t.clone()
        t[(-1,) * t.dim()] = value  # last sample: the message names batch index 1
        return t
    return fn


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("k", range(6), ids=QP_NAMES)
def test_qpfunction_non_finite_entries_are_refused_except_plus_inf_in_h(k, value):
    args = _qp_with(k, _set_entry(value))
    if QP_NAMES[k] == "h" and value == float("inf"):
        z = QPFunction(verbose=-1)(*args)  # h = +inf: the row is absent
        assert torch.isfinite(z).all()
        return
    kind = "NaN" if np.isnan(value) else "±inf"
    with pytest.raises(ValueError, match=rf"^{QP_NAMES[k]} contains {kind} at batch index 1"):
        QPFunction(verbose=-1)(*args)


def test_qpfunction_plus_inf_h_row_equals_dropping_the_row():
    rng = np.random.default_rng(4)
    n = 3
    Q = as_tensor(np.eye(n) * 2 + 0.1)
    q = as_tensor(rng.standard_normal((2, n)) * 3)
    G = as_tensor(rng.standard_normal((4, n)))
    h = as_tensor(np.ones((2, 4)))
    h_inf = h.clone()
    h_inf[:, 2] = float("inf")
    hi = h_inf.clone().requires_grad_(True)
    qi = q.clone().requires_grad_(True)
    z_inf = QPFunction(verbose=-1)(Q, qi, G, hi, E, E)
    keep = [0, 1, 3]
    hd = h[:, keep].clone().requires_grad_(True)
    qd = q.clone().requires_grad_(True)
    z_drop = QPFunction(verbose=-1)(Q, qd, G[keep], hd, E, E)
    assert (z_inf - z_drop).abs().max() < 1e-9
    w = _weights(z_inf.shape)
    g_inf = torch.autograd.grad(z_inf, [qi, hi], w)
    g_drop = torch.autograd.grad(z_drop, [qd, hd], w)
    assert (g_inf[0] - g_drop[0]).abs().max() < 1e-8
    assert (g_inf[1][:, keep] - g_drop[1]).abs().max() < 1e-8
    assert g_inf[1][:, 2].abs().max() < 1e-12  # an absent row: (numerically) zero gradient


@pytest.mark.parametrize("k", range(6), ids=QP_NAMES)
def test_qpfunction_mixed_float32_float64_promotes_to_float64(k):
    args = _qp_with(k, lambda t: t.float().requires_grad_(True))
    z = QPFunction(verbose=-1)(*args)
    assert z.dtype == torch.float64
    (g,) = torch.autograd.grad(z.sum(), args[k])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    ref = QPFunction(verbose=-1)(*[t.double() for t in args])
    assert (z - ref).abs().max() < 1e-6


def test_qpfunction_all_float32_stays_float32():
    z = QPFunction(verbose=-1)(*[t.float() for t in _qp_valid()])
    assert z.dtype == torch.float32


def _other_device():
    """A second device: CUDA when present, else PyTorch's meta device (no data)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")


@pytest.mark.parametrize("k", range(6), ids=QP_NAMES)
def test_qpfunction_mixed_devices_are_refused_naming_the_argument(k):
    dev = _other_device()
    with pytest.raises(ValueError, match=rf"must be on one device; .*{QP_NAMES[k]} on {dev.type}"):
        QPFunction(verbose=-1)(*_qp_with(k, lambda t: t.to(dev)))


def test_cvxpylayer_mixed_devices_are_refused_naming_the_parameter():
    dev = _other_device()
    layer = _layer("entropy")
    th, beta = (as_tensor(a) for a in _batch("entropy"))
    with pytest.raises(ValueError, match=r"one device; .*parameter 1 \('beta'\) on " + dev.type):
        layer(th, beta.to(dev))


@pytest.mark.cuda
def test_qpfunction_accepts_cpu_empty_placeholders_with_cuda_inputs():
    Q, p, G, h = (t.detach().cuda() for t in _qpfunction_batch(fail=())[:4])
    z = QPFunction(verbose=-1)(Q, p, G, h, E, E)  # E: CPU empty tensors, as in qpth's docs
    assert z.device.type == "cuda"


# Solver arguments on CvxpyLayer's torch paths (the conic path's are in test_layer_errors.py).


@pytest.mark.parametrize("when", ["construction", "call"])
def test_qp_path_unknown_solver_args_key_lists_accepted_keys(when):
    prob, params, outs, _ = _problem("qp")
    with pytest.raises(ValueError, match=r"unknown key 'epsilon' for the 'qp' path") as err:
        if when == "construction":
            CvxpyLayer(prob, params, outs, solver_args={"epsilon": 1e-6})
        else:
            _layer("qp")(*[as_tensor(a) for a in _batch("qp")], solver_args={"epsilon": 1e-6})
    msg = str(err.value)
    assert "Accepted keys" in msg and "'max_iter'" in msg and "'time_limit'" in msg


WRONG_TYPES = {"max_iter": 2.5, "eps": "tight", "time_limit": "1", "kkt": 3,
               "fixed_iterations": 1, "max_iters": True}


@pytest.mark.parametrize("when", ["construction", "call"])
@pytest.mark.parametrize("key", list(WRONG_TYPES))
def test_qp_path_wrongly_typed_solver_args_value_names_the_key(key, when):
    args = {key: WRONG_TYPES[key]}
    prob, params, outs, _ = _problem("qp")
    with pytest.raises(TypeError, match=rf"solver_args\['{key}'\] must be"):
        if when == "construction":
            CvxpyLayer(prob, params, outs, solver_args=args)
        else:
            _layer("qp")(*[as_tensor(a) for a in _batch("qp")], solver_args=args)


@pytest.mark.parametrize("args", [{"max_iter": 0}, {"eps": -1.0}, {"time_limit": 0},
                                  {"eps": float("nan")}, {"kkt": "lu"}, {"backward": "adjoint"}],
                         ids=["max_iter=0", "eps<0", "time_limit=0", "eps=nan", "kkt", "backward"])
def test_qp_path_out_of_range_solver_args_value_names_the_key(args):
    (key,) = args
    with pytest.raises(ValueError, match=rf"^{key} must"):
        _layer("qp")(*[as_tensor(a) for a in _batch("qp")], solver_args=args)


def test_qp_path_float_keys_accept_ints():
    # (regularization: an int 0 is a valid setting; infeas_tol must be positive)
    _layer("qp")(*[as_tensor(a) for a in _batch("qp")], solver_args={"regularization": 0})


@pytest.mark.parametrize("kind", ["simplex", "softmax", "entropy"])
def test_structured_paths_check_call_time_solver_args(kind):
    prob, params, outs, _ = _problem(kind)
    with pytest.raises(ValueError, match="unknown key 'epsilon'"):
        CvxpyLayer(prob, params, outs, solver_args={"epsilon": 1e-6})
    with pytest.raises(ValueError, match="unknown key 'epsilon'"):
        _layer(kind)(*[as_tensor(a) for a in _batch(kind)], solver_args={"epsilon": 1e-6})


# Invalid values: one bad sample is invalid_input on every path, the rest untouched.

FIRST_PARAM = {"simplex": "y", "softmax": "theta", "entropy": "theta", "qp": "p",
               "sparse_qp": "p", "conic": "p"}
# Solo-vs-batch agreement: the paths compute in the input's dtype (conic: float64, cast).
TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-5, 1e-4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_sample_raises_or_is_masked_as_invalid_input(kind, dtype):
    layer = _layer(kind)
    raw = _batch(kind)
    raw[0][1, 0] = np.nan
    args = [as_tensor(a, grad=True, dtype=dtype) for a in raw]
    with pytest.raises(ValueError, match=rf"^parameter 0 \('{FIRST_PARAM[kind]}'\) contains "
                                         r"NaN at batch index 1"):
        layer(*args)
    (x,), info = layer(*args, on_failure="mask", return_info=True)
    assert info.status == (Status.OPTIMAL, Status.INVALID_INPUT, Status.OPTIMAL)
    assert info.iterations[1] == 0 and np.isnan(info.residuals[1]).all()
    assert torch.isnan(x[1]).all() and torch.isfinite(x[[0, 2]]).all()
    w = _weights(x.shape).to(dtype)
    grads = torch.autograd.grad(x, args, w)
    for g in grads:
        assert torch.isfinite(g).all() and (g[1] == 0).all()
    tol_x, tol_g = TOL[dtype]
    largest = 0.0
    for i in (0, 2):
        solo = [as_tensor(a[i], grad=True, dtype=dtype) for a in raw]
        (xi,) = layer(*solo)
        gi = torch.autograd.grad(xi, solo, w[i])
        assert (xi - x[i]).abs().max() < tol_x
        for g, g_solo in zip(grads, gi):
            largest = max(largest, float(g_solo.abs().max()))
            assert (g_solo - g[i]).abs().max() < tol_g
    assert largest > 0  # a real derivative (on the qp zoo, sample 0's is exactly 0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_sample_invalid_is_masked_without_a_solve_error(kind):
    """No good sample to stand in: a neutral value is solved, and all are invalid_input."""
    layer = _layer(kind)
    raw = [a[:1] for a in _batch(kind)]
    raw[0][0, -1] = np.inf
    args = [as_tensor(a, grad=True) for a in raw]
    (x,), info = layer(*args, on_failure="mask", return_info=True)
    assert info.status == (Status.INVALID_INPUT,)
    assert torch.isnan(x).all()
    for g in torch.autograd.grad(x, args, torch.ones_like(x)):
        assert (g == 0).all()


def _needs_sign():
    y = cp.Variable(2, name="y")
    a = cp.Parameter(nonneg=True, name="a")
    c = cp.Parameter(2, name="c")
    return cp.Problem(cp.Minimize(cp.sum_squares(y - c) + a * cp.norm1(y))), [a, c], [y]


@pytest.mark.parametrize("backend", ["qp", "conic"])
def test_a_sample_breaking_a_needed_sign_is_masked_as_invalid_input(backend):
    prob, params, outs = _needs_sign()
    kw = {"solver_args": SCS_ARGS} if backend == "conic" else {}
    layer = CvxpyLayer(prob, params, outs, backend=backend, **kw)
    a = as_tensor([0.5, -1.0, 0.0], grad=True)
    c = as_tensor([[1.0, -2.0], [0.3, 0.1], [0.2, -0.4]], grad=True)
    with pytest.raises(ValueError, match=r"'a'\) was declared nonneg=True.*batch index 1"):
        layer(a, c)
    (y,), info = layer(a, c, on_failure="mask", return_info=True)
    assert info.status == (Status.OPTIMAL, Status.INVALID_INPUT, Status.OPTIMAL)
    # Soft-thresholding: y = sign(c)·max(|c| − a/2, 0).
    exact = torch.sign(c) * torch.clamp(c.abs() - a[:, None] / 2, min=0)
    assert (y[[0, 2]] - exact[[0, 2]]).abs().max() < 1e-6 and torch.isnan(y[1]).all()
    ga, gc = torch.autograd.grad(y, [a, c], torch.ones_like(y))
    assert ga[1] == 0 and (gc[1] == 0).all() and torch.isfinite(ga).all()


def test_qpfunction_non_finite_sample_raises_or_is_masked_as_invalid_input():
    Q, p, G, h, A, b = _qpfunction_batch(fail=())
    h = h.detach().clone()
    h[1, 0] = np.nan
    h.requires_grad_(True)
    with pytest.raises(ValueError, match=r"^h contains NaN at batch index 1"):
        QPFunction(verbose=-1)(Q, p, G, h, A, b)
    z, info = QPFunction(verbose=-1, on_failure="mask")(Q, p, G, h, A, b, return_info=True)
    assert info.status == [Status.OPTIMAL, Status.INVALID_INPUT, Status.OPTIMAL]
    assert torch.isnan(z[1]).all() and torch.isfinite(z[[0, 2]]).all()
    w = _weights(z.shape)
    (gh,) = torch.autograd.grad(z, h, w)
    assert torch.isfinite(gh).all() and (gh[1] == 0).all()
    largest = 0.0
    for i in (0, 2):
        hi = h[i].detach().clone().requires_grad_(True)
        zi = QPFunction(verbose=-1)(Q, p, G, hi, A, b)
        (gi,) = torch.autograd.grad(zi, hi, w[i:i + 1])
        largest = max(largest, float(gi.abs().max()))
        assert (zi[0] - z[i]).abs().max() < 1e-12 and (gi - gh[i]).abs().max() < 1e-9
    assert largest > 0  # a real derivative (sample 0 has no active bound: its is 0)
    # A broadcast Q with NaN spoils every sample: all invalid, zero gradient, no solve error.
    Qn = Q.clone().requires_grad_(True)
    with torch.no_grad():
        Qn[0, 0] = np.nan
    z, info = QPFunction(verbose=-1, on_failure="mask")(Qn, p, G, h, A, b, return_info=True)
    assert info.status == [Status.INVALID_INPUT] * 3 and torch.isnan(z).all()
    (gQ,) = torch.autograd.grad(z, Qn, w)
    assert (gQ == 0).all()


@pytest.mark.cuda
def test_masking_invalid_samples_keeps_the_device():
    layer = _layer("qp")
    raw = _batch("qp")
    raw[0][1, 0] = np.nan
    p = as_tensor(raw[0]).cuda().requires_grad_(True)
    (x,), info = layer(p, on_failure="mask", return_info=True)
    assert x.device.type == "cuda" and info.status[1] is Status.INVALID_INPUT
    (g,) = torch.autograd.grad(x, p, torch.ones_like(x))
    assert g.device.type == "cuda" and (g[1] == 0).all() and torch.isfinite(g).all()
    z, info = QPFunction(verbose=-1, on_failure="mask")(
        *[t.detach().cuda() if t.numel() else t for t in _qpfunction_batch(fail=())[:3]],
        torch.where(torch.arange(3)[:, None] == 1, float("nan"),
                    _qpfunction_batch(fail=())[3].detach()).cuda(), E, E, return_info=True)
    assert z.device.type == "cuda" and info.status[1] is Status.INVALID_INPUT


def _vmap_layers():
    prob, params, outs = _needs_sign()
    D = cp.Parameter((2, 2), diag=True, name="D")
    y = cp.Variable(2)
    diag = cp.Problem(cp.Minimize(cp.sum_squares(y - D @ np.array([1.0, 2.0]))), [y <= 5])
    P, q, x = cp.Parameter((2, 2), PSD=True, name="P"), cp.Parameter(2), cp.Variable(2)
    with cp.utilities.scopes.quad_form_dpp_scope():
        quad = cp.Problem(cp.Minimize(cp.quad_form(x, P) + q @ x), [x >= -1, x <= 1])
    return (CvxpyLayer(prob, params, outs), CvxpyLayer(diag, [D], [y]),
            CvxpyLayer(quad, [P, q], [x]))


def test_value_checks_run_under_torch_func_transforms():
    sign, diag, quad = _vmap_layers()
    c = as_tensor([1.0, -2.0])
    f = torch.func.vmap(lambda a: sign(a, c)[0])
    good = as_tensor([0.5, 1.0])
    assert (f(good) - sign(good, c)[0]).abs().max() < 1e-9
    msg = r"'a'\) was declared nonneg=True.*in a sample of a torch.func transform"
    with pytest.raises(ValueError, match=msg):
        f(as_tensor([0.5, -5.0]))
    with pytest.raises(ValueError, match=msg):
        torch.func.jacrev(lambda a: sign(a, c)[0])(as_tensor(-5.0))
    with pytest.raises(ValueError, match=r"'a'\) contains NaN in a sample"):
        f(as_tensor([np.nan, 1.0]))
    # Nested vmap over a batched call, with the mapped dimension last.
    bad = torch.diag(as_tensor([1.0, 2.0])).expand(3, 2, 2).clone()
    bad[2, 0, 1] = 5.0
    g = torch.func.vmap(torch.func.vmap(lambda d: diag(d)[0]), in_dims=4)
    ok = torch.diag(as_tensor([1.0, 2.0])).expand(3, 2, 2)
    assert (g(torch.stack([ok, 2 * ok], dim=-1)[None])[:, 0]
            - as_tensor([[[1.0, 4.0]] * 3, [[2.0, 5.0]] * 3])).abs().max() < 1e-8
    with pytest.raises(ValueError, match=r"'D'\) was declared diag=True.*torch.func"):
        g(torch.stack([ok, bad], dim=-1)[None])
    # PSD: the eigenvalue check sees the matrices whatever dimension vmap maps.
    Ps = torch.stack([torch.eye(2, dtype=DT), as_tensor([[2.0, 0.5], [0.5, 1.0]])], dim=-1)
    h = torch.func.vmap(lambda P: quad(P, c)[0], in_dims=2)
    ref = quad(Ps.permute(2, 0, 1), c)[0]
    assert (h(Ps) - ref).abs().max() < 1e-9
    Ps[..., 1] = as_tensor([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match=r"'P'\) was declared PSD=True.*torch.func"):
        h(Ps)


# ----------------------------------------------------------------------------
# 3. Solver outcomes
# ----------------------------------------------------------------------------


@functools.cache
def _mixed_problem():
    """min cᵀx + ‖x₀,₁‖²  s.t. x ≥ l, x₀ + x₁ ≤ u.

    Infeasible when l₀ + l₁ > u; unbounded when c₂ < 0 (x₂ has no upper bound).
    """
    x, c, lo, u = cp.Variable(3), cp.Parameter(3), cp.Parameter(3), cp.Parameter()
    prob = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(x[:2])), [x >= lo, x[0] + x[1] <= u])
    return prob, [c, lo, u], [x]


MIXED = {  # sample: (c, l, u)
    "feasible": ([1.0, -1.0, 0.5], [-1.0, -1.0, 0.0], 1.0),
    "infeasible": ([1.0, -1.0, 0.5], [1.0, 1.0, 0.0], 1.0),
    "unbounded": ([1.0, -1.0, -0.5], [-1.0, -1.0, 0.0], 1.0),
    "feasible 2": ([0.5, 2.0, 1.0], [0.0, -2.0, 1.0], -0.5),
    "both": ([1.0, -1.0, -0.5], [1.0, 1.0, 0.0], 1.0),  # infeasible and dual infeasible
}
MIXED_BACKENDS = {"qp": {}, "conic": {"backend": "conic", "solver_args": SCS_ARGS},
                  "conic-clarabel": {"backend": "conic", "solver": "CLARABEL"}}


@pytest.mark.parametrize("backend", list(MIXED_BACKENDS))
def test_batch_mixing_feasible_infeasible_and_unbounded_samples(backend):
    prob, params, outs = _mixed_problem()
    layer = CvxpyLayer(prob, params, outs, **MIXED_BACKENDS[backend])
    names = list(MIXED)
    args = [as_tensor([MIXED[k][j] for k in names], grad=True) for j in range(3)]
    with pytest.raises(SolverError) as err:
        layer(*args)
    assert err.value.indices == [1, 2, 4]
    assert err.value.statuses[:2] == [Status.INFEASIBLE, Status.UNBOUNDED]
    assert err.value.statuses[2] in (Status.INFEASIBLE, Status.UNBOUNDED)
    (x,), info = layer(*args, on_failure="mask", return_info=True)
    assert [s.has_solution for s in info.status] == [True, False, False, True, False]
    assert torch.isnan(x[[1, 2, 4]]).all() and torch.isfinite(x[[0, 3]]).all()
    w = _weights(x.shape)
    grads = torch.autograd.grad(x, args, w)
    for g in grads:
        assert torch.isfinite(g).all() and (g[[1, 2, 4]] == 0).all()
    for i in (0, 3):
        solo = [a[i].detach().clone().requires_grad_(True) for a in args]
        (xi,) = layer(*solo)
        gi = torch.autograd.grad(xi, solo, w[i])
        (ref,) = reference_solve(prob, params, [a.detach().numpy() for a in solo], outs)
        tol = 1e-4 if backend == "conic-clarabel" else 1e-6  # Clarabel's default tolerances
        assert (xi - x[i]).abs().max() < 1e-9 and np.abs(xi.detach().numpy() - ref).max() < tol
        for g, g_solo in zip(grads, gi):
            assert (g[i] - g_solo).abs().max() < 1e-7


def test_qpfunction_batch_mixing_feasible_infeasible_and_unbounded_samples():
    """The same five samples in qpth form: Q = diag(2, 2, 0), G = [−I; e₀ + e₁]."""
    names = list(MIXED)
    c = as_tensor([MIXED[k][0] for k in names])
    lo = np.array([MIXED[k][1] for k in names])
    u = np.array([MIXED[k][2] for k in names])
    Q = torch.diag(as_tensor([2.0, 2.0, 0.0]))
    G = as_tensor(np.vstack([-np.eye(3), [[1.0, 1.0, 0.0]]]))
    h = as_tensor(np.hstack([-lo, u[:, None]]))
    with pytest.raises(SolverError) as err:
        QPFunction(verbose=-1)(Q, c, G, h, E, E)
    assert err.value.indices == [1, 2, 4]
    z, info = QPFunction(verbose=-1, on_failure="mask")(Q, c, G, h, E, E, return_info=True)
    assert info.status[:3] == [Status.OPTIMAL, Status.INFEASIBLE, Status.UNBOUNDED]
    for i in (0, 3):
        z_ref, _, _ = qp_reference(Q.numpy(), c[i].numpy(), G.numpy(), h[i].numpy(),
                                   np.zeros((0, 3)), np.zeros(0))
        assert np.abs(z[i].numpy() - z_ref).max() < 1e-7


def _projection_problem():
    """min ‖x − c‖²  s.t.  Ax ≤ b  (n = 3, two rows): its solution scales exactly."""
    x, c, A, b = cp.Variable(3), cp.Parameter(3), cp.Parameter((2, 3)), cp.Parameter(2)
    return cp.Problem(cp.Minimize(cp.sum_squares(x - c)), [A @ x <= b]), [c, A, b], [x]


A0 = np.array([[1.0, -0.5, 0.25], [0.3, 1.0, -1.0]])
C0 = np.array([2.0, 1.0, -1.0])
B0 = np.array([0.5, -0.5])


def _exact_projection(A, c, b):
    """By enumerating active sets (two rows): the reference at any scale."""
    for active in ([], [0], [1], [0, 1]):
        x = c
        if active:
            As = A[active]
            lam = np.linalg.solve(As @ As.T, As @ c - b[active])
            if (lam < 0).any():
                continue
            x = c - As.T @ lam
        if (A @ x - b).max() <= 1e-9 * (1 + np.abs(b).max()):
            return x
    raise AssertionError("no feasible active set")


def _scaled(which, s):
    """(c, A, b) with entries scaled to ~s, and the exact solution."""
    if which == "c,b":  # x*(sc, A, sb) = s·x*(c, A, b)
        return (C0 * s, A0, B0 * s), s * _exact_projection(A0, C0, B0)
    if which == "A":  # {sAx ≤ b} = {Ax ≤ b/s}
        return (C0, A0 * s, B0), _exact_projection(A0, C0, B0 / s)
    return (C0, A0, B0 * s), _exact_projection(A0, C0, B0 * s)  # "b"


HUGE_CASES = [pytest.param(backend, which, s, id=f"{backend}-{which}-{s:.0e}")
              for backend in ("qp", "conic")
              for which in ("c,b", "A", "b")
              for s in ((1e4, 1e6, 1e8, 1e12) if which == "b" else (1e8, 1e12))]


@pytest.mark.parametrize("backend, which, scale", HUGE_CASES)
def test_huge_values_never_give_a_wrong_point_labelled_optimal(backend, which, scale):
    """Huge finite parameters: 'optimal' means a feasible point with the optimal objective
    (relative 1e-3); anything else must carry a non-optimal status."""
    prob, params, outs = _projection_problem()
    layer = CvxpyLayer(prob, params, outs, backend=backend, on_failure="mask")
    (c, A, b), x_ref = _scaled(which, scale)
    (x,), info = _quiet(layer, as_tensor(c), as_tensor(A), as_tensor(b), return_info=True)
    status = info.status[0]
    if not status.has_solution:
        assert torch.isnan(x).all()
        return
    x = x.numpy()
    assert np.isfinite(x).all()
    if status is Status.OPTIMAL:
        Ax = A @ x
        assert (Ax - b).max() <= 1e-3 * (1 + max(np.abs(b).max(), np.abs(Ax).max()))
        f, f_ref = ((x - c) ** 2).sum(), ((x_ref - c) ** 2).sum()
        assert abs(f - f_ref) <= 1e-3 * (1 + f_ref)


NEAR_INFEASIBLE = {
    "qp": dict(backend="qp", solver_args={"eps": 1e-14, "max_iter": 10**7,
                                          "not_improved_lim": 10**7, "time_limit": 0.5}),
    "scs": dict(backend="conic", solver_args={"eps": 1e-14, "max_iters": 10**9,
                                              "time_limit": 0.5}),
    "clarabel": dict(backend="conic", solver="CLARABEL", solver_args={
        "tol_gap_abs": 1e-14, "tol_gap_rel": 1e-14, "tol_feas": 1e-14, "max_iter": 10**6,
        "time_limit": 0.5}),
}


@pytest.mark.parametrize("margin", [1e-9, -1e-9], ids=["barely-feasible", "barely-infeasible"])
@pytest.mark.parametrize("solver", list(NEAR_INFEASIBLE))
def test_near_infeasible_with_extreme_tolerance_returns_within_the_time_limit(solver, margin):
    """x ≥ p, Σx ≤ r with Σp = r ∓ 1e-9 and eps = 1e-14: a result (max_iter with a warning,
    inaccurate, optimal) or a failure status, within a few seconds, never a hang."""
    n = 6
    p, r, x = cp.Parameter(n), cp.Parameter(), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= p, cp.sum(x) <= r])
    kw = dict(NEAR_INFEASIBLE[solver])
    args = kw.pop("solver_args")
    layer = CvxpyLayer(prob, [p, r], [x], on_failure="mask", **kw)
    pv = np.linspace(-1.0, 1.0, n) / 3 + 1.0 / n
    pt = as_tensor(pv, grad=True)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (xs,), info = layer(pt, as_tensor(pv.sum() + margin), solver_args=args, return_info=True)
    elapsed = time.monotonic() - start
    assert elapsed < 4.0  # limit 0.5 s; SCS may run twice (see the xfail below)
    status = info.status[0]
    if status.has_solution:
        assert torch.isfinite(xs).all()
        (g,) = torch.autograd.grad(xs.sum(), pt)
        assert torch.isfinite(g).all()
        if status is not Status.OPTIMAL:
            assert any(str(status) in str(w.message) for w in caught)
    else:
        assert status in (Status.INFEASIBLE, Status.NUMERICAL_ERROR) and torch.isnan(xs).all()
    if margin < 0:
        assert status is not Status.OPTIMAL or float((pv - xs.detach().numpy()).max()) <= 1e-8


@pytest.mark.slow
def test_scs_time_limit_bounds_the_wall_time():
    n = 6
    p, r, x = cp.Parameter(n), cp.Parameter(), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= p, cp.sum(x) <= r])
    layer = CvxpyLayer(prob, [p, r], [x], backend="conic", on_failure="mask")
    pv = np.linspace(-1.0, 1.0, n) / 3 + 1.0 / n
    start = time.monotonic()
    _quiet(layer, as_tensor(pv), as_tensor(pv.sum() - 1e-9),
           solver_args={"eps": 1e-14, "max_iters": 10**9, "time_limit": 1.0})
    assert time.monotonic() - start < 1.6


@pytest.mark.parametrize("backend", ["qp", "conic"])
def test_lp_with_two_optimal_vertices_gives_finite_outputs_and_the_value_derivative(backend):
    """max x₀ + x₁ s.t. x₀ + x₁ ≤ u, 0 ≤ x ≤ 1: a whole edge is optimal. Any point of it is
    a valid answer; cᵀx* = −u on the edge, so d(cᵀx*)/du = −1 whichever point is chosen."""
    x, c, u = cp.Variable(2), cp.Parameter(2), cp.Parameter()
    prob = cp.Problem(cp.Minimize(c @ x), [x[0] + x[1] <= u, x >= 0, x <= 1])
    kw = {"backend": "conic", "solver_args": SCS_ARGS} if backend == "conic" else {}
    layer = CvxpyLayer(prob, [c, u], [x], **kw)
    ct, ut = as_tensor([-1.0, -1.0], grad=True), as_tensor(1.2, grad=True)
    (xs,) = layer(ct, ut)
    xd = xs.detach()
    assert torch.isfinite(xd).all()
    assert abs(float(xd.sum()) - 1.2) < 1e-6 and float(xd.min()) > -1e-6
    assert float(xd.max()) < 1 + 1e-6
    gc, gu = torch.autograd.grad(xs, [ct, ut], ct.detach())
    assert torch.isfinite(gc).all() and abs(float(gu) + 1.0) < 1e-5


@pytest.mark.parametrize("backend", ["qp", "conic"])
def test_weakly_active_constraint_gives_a_generalized_derivative(backend):
    """x* = min(y, 0) (projection onto x ≤ 0) at y with zero entries: the constraint is active
    with a zero multiplier. dxᵢ/dyᵢ must lie in [0, 1] (Clarke's generalized Jacobian); the
    strictly active and inactive coordinates keep their exact 0 and 1."""
    y, x = cp.Parameter(3), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x <= 0])
    kw = {"backend": "conic", "solver_args": SCS_ARGS} if backend == "conic" else {}
    layer = CvxpyLayer(prob, [y], [x], **kw)
    yt = as_tensor([0.0, -1.0, 1.0], grad=True)
    (xs,) = layer(yt)
    assert (xs - as_tensor([0.0, -1.0, 0.0])).abs().max() < 1e-6
    J = torch.stack([torch.autograd.grad(xs[i], yt, retain_graph=True)[0] for i in range(3)])
    assert torch.isfinite(J).all()
    assert -1e-6 <= float(J[0, 0]) <= 1 + 1e-6
    off = J - torch.diag(torch.diag(J))
    assert off.abs().max() < 1e-6
    assert abs(float(J[1, 1]) - 1) < 1e-5 and abs(float(J[2, 2])) < 1e-5


def test_simplex_tie_gives_the_documented_support_restricted_jacobian():
    """Sparsemax at y = (1, 0, −1), r = 1: x = (1, 0, 0) and y₁ = t exactly. Documented
    (backends.entropy): the support excludes ties, so ∇y = s∘(ḡ − sᵀḡ/|S|) = 0 here and
    ∇r = ḡ₀."""
    yt, rt = as_tensor([[1.0, 0.0, -1.0, -2.0]], grad=True), as_tensor([1.0], grad=True)
    (xs,) = _layer("simplex")(yt, rt)
    assert torch.equal(xs, as_tensor([[1.0, 0.0, 0.0, 0.0]]))
    g = as_tensor([[0.3, -1.2, 0.7, 2.0]])
    gy, gr = torch.autograd.grad(xs, [yt, rt], g)
    assert (gy == 0).all() and torch.allclose(gr, as_tensor([0.3]))


SINGULAR = ["duplicated inequalities", "redundant equalities, Q = 0", "ill-conditioned Q"]


def _singular_problem(case):
    """Problems whose KKT matrix is singular or nearly so, with closed-form solutions."""
    x, y = cp.Variable(3), cp.Parameter(3)
    if case == "duplicated inequalities":  # x* = min(y, 0.5), dx/dy = [y < 0.5]
        cons = [x <= 0.5, x <= 0.5, 2 * x <= 1.0]
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), cons)
        return prob, y, x, lambda v: np.minimum(v, 0.5), lambda v: np.diag(v < 0.5) * 1.0
    if case == "redundant equalities, Q = 0":
        # LP: min yᵀx over {Σx = 1, 2Σx = 2, Σx = 1, 0 ≤ x ≤ 1}: the vertex at argmin y.
        cons = [cp.sum(x) == 1, 2 * cp.sum(x) == 2, cp.sum(x) == 1, x >= 0, x <= 1]
        prob = cp.Problem(cp.Minimize(y @ x), cons)
        return (prob, y, x, lambda v: np.eye(3)[np.argmin(v)],
                lambda v: np.zeros((3, 3)))
    # min Σ dᵢ(xᵢ − yᵢ)² with d = (1, 1e-3, 1e-6) s.t. x ≤ 0.5: x* = min(y, 0.5)
    d = np.array([1.0, 1e-3, 1e-6])
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(d, cp.square(x - y)))), [x <= 0.5])
    return prob, y, x, lambda v: np.minimum(v, 0.5), lambda v: np.diag(v < 0.5) * 1.0


@pytest.mark.parametrize("backend", ["qp", "conic"])
@pytest.mark.parametrize("case", SINGULAR)
def test_singular_or_ill_conditioned_kkt_gives_finite_outputs_or_a_clear_error(case, backend):
    prob, y, x, solution, jacobian = _singular_problem(case)
    kw = {"backend": "conic", "solver_args": SCS_ARGS} if backend == "conic" else {}
    layer = CvxpyLayer(prob, [y], [x], **kw)
    yv = np.array([0.2, 0.9, -0.4])
    yt = as_tensor(yv, grad=True)
    try:
        (xs,), info = _quiet(layer, yt, return_info=True)
    except SolverError as err:  # a clear, per-sample error is acceptable
        assert err.indices == [0]
        return
    assert info.status[0] is Status.OPTIMAL and torch.isfinite(xs).all()
    assert np.abs(xs.detach().numpy() - solution(yv)).max() < 1e-6
    J = torch.stack([torch.autograd.grad(xs[i], yt, retain_graph=True)[0] for i in range(3)])
    assert torch.isfinite(J).all()
    assert np.abs(J.numpy() - jacobian(yv)).max() < 1e-4


SCALE_SOLVERS = {"qp": {}, "scs": {"backend": "conic"},
                 "clarabel": {"backend": "conic", "solver": "CLARABEL"},
                 "ecos": {"backend": "conic", "solver": "ECOS"}}


@pytest.mark.parametrize("solver, scale", [
    pytest.param(solver, s, id=f"{solver}-{s:.0e}")
    for solver in SCALE_SOLVERS for s in (1e-2, 1e-4, 1e-6)])
def test_small_objective_scale_gives_the_right_answer_or_a_non_optimal_status(solver, scale):
    """Default settings, a badly scaled but well-posed projection: 'optimal' must mean the
    solution (1e-3) and its derivative (1e-2); otherwise the status must say so."""
    x, y = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(scale * cp.sum_squares(x - y)), [x <= 0.5])
    layer = CvxpyLayer(prob, [y], [x], on_failure="mask", **SCALE_SOLVERS[solver])
    yv = np.array([0.2, 0.9, -0.4])
    yt = as_tensor(yv, grad=True)
    (xs,), info = _quiet(layer, yt, return_info=True)
    if info.status[0] is not Status.OPTIMAL:
        return
    assert np.abs(xs.detach().numpy() - np.minimum(yv, 0.5)).max() < 1e-3
    J = torch.stack([torch.autograd.grad(xs[i], yt, retain_graph=True)[0] for i in range(3)])
    assert np.abs(J.numpy() - np.diag(yv < 0.5)).max() < 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_nan_in_the_upstream_gradient_stays_in_its_own_sample(kind):
    layer = _layer(kind)
    args = [as_tensor(a, grad=True) for a in _batch(kind, B=3)]
    (x,) = layer(*args)
    w = _weights(x.shape)
    w_nan = w.clone()
    w_nan[1, 2] = float("nan")
    g_nan = torch.autograd.grad(x, args[0], w_nan, retain_graph=True)[0]
    g = torch.autograd.grad(x, args[0], w)[0]
    assert torch.isfinite(g_nan[[0, 2]]).all()
    assert (g_nan[[0, 2]] - g[[0, 2]]).abs().max() < 1e-12


# ----------------------------------------------------------------------------
# 4. Concurrency and autograd plumbing
# ----------------------------------------------------------------------------


def _solve_and_grad(layer, raw):
    args = [as_tensor(a, grad=True) for a in raw]
    (x,) = layer(*args)
    (g,) = torch.autograd.grad((x * x).sum(), args[0])
    return x.detach(), g


@pytest.mark.parametrize("kind", ["qp", "entropy", "simplex"])
def test_layer_shared_across_threads_gives_the_serial_answers(kind):
    """The conic path's version is in test_conic_layer.py."""
    layer = _layer(kind)
    batches = [_batch(kind, seed=s) for s in range(8)]
    serial = [_solve_and_grad(layer, raw) for raw in batches]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda raw: _solve_and_grad(layer, raw), batches))
    for (xa, ga), (xb, gb) in zip(serial, parallel):
        assert (xa - xb).abs().max() < 1e-12 and (ga - gb).abs().max() < 1e-12


class _LayerDataset(torch.utils.data.Dataset):
    def __init__(self, layer, rows):
        self.layer, self.rows = layer, rows

    def __len__(self):
        return len(self.rows[0])

    def __getitem__(self, i):
        (x,) = self.layer(*[r[i] for r in self.rows])
        return x


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="no fork start method on this platform")
@pytest.mark.parametrize("kind", ["qp", "entropy", "conic"])
def test_forked_dataloader_workers_give_the_serial_answers(kind):
    layer = _layer(kind)
    rows = [as_tensor(a) for a in _batch(kind, B=8)]
    serial = torch.stack([layer(*[r[i] for r in rows])[0] for i in range(8)])  # warm: threads
    loader = torch.utils.data.DataLoader(_LayerDataset(layer, rows), batch_size=2,
                                         num_workers=2, multiprocessing_context="fork")
    forked = torch.cat(list(loader))
    assert (forked - serial).abs().max() < 1e-12


def test_two_qp_layers_sharing_parameters_do_not_interfere():
    p = cp.Parameter(3, name="p")
    x1, x2 = cp.Variable(3), cp.Variable(3)
    prob1 = cp.Problem(cp.Minimize(cp.sum_squares(x1 - p)), [x1 <= 0.5])
    prob2 = cp.Problem(cp.Minimize(cp.sum_squares(x2 + p)), [cp.sum(x2) == 1])
    l1, l2 = CvxpyLayer(prob1, [p], [x1]), CvxpyLayer(prob2, [p], [x2])
    assert l1.backend == l2.backend == "qp"
    rng = np.random.default_rng(5)
    values = [rng.standard_normal((2, 3)) for _ in range(3)]
    alone1 = [_solve_and_grad(l1, [v]) for v in values]
    alone2 = [_solve_and_grad(l2, [v]) for v in values]
    for v, one, two in zip(values, alone1, alone2):  # now interleaved, other values between
        _solve_and_grad(l2, [-v])
        got1 = _solve_and_grad(l1, [v])
        _solve_and_grad(l1, [2 * v])
        got2 = _solve_and_grad(l2, [v])
        for got, ref in zip(got1 + got2, one + two):
            assert torch.equal(got, ref)
        assert (got1[0] - torch.minimum(as_tensor(v), as_tensor(0.5))).abs().max() < 1e-8
    assert p.value is None  # the layers never write Parameter.value


def _has_warm_start() -> bool:
    return "warm_start" in inspect.signature(CvxpyLayer.forward).parameters


@pytest.mark.skipif(not _has_warm_start(), reason="CvxpyLayer has no warm_start")
@pytest.mark.parametrize("kind", [
    "qp",
    "entropy", "conic"])
def test_warm_start_never_changes_the_answer_or_the_status(kind):
    """A warm start may change how fast a solve converges, never its answer (tolerance)."""
    layer = _layer(kind)
    batches = [[as_tensor(a) for a in _batch(kind, seed=s)] for s in range(6)]
    cold = [layer(*args, return_info=True) for args in batches]
    for i, args in enumerate(batches):
        (x,), info = layer(*args, warm_start=cold[i - 1][1], return_info=True,
                           on_failure="mask")
        assert info.status == cold[i][1].status
        assert (x - cold[i][0][0]).abs().max() < 1e-7


@pytest.mark.skipif("warm_start" not in inspect.signature(QPFunction()).parameters,
                    reason="QPFunction has no warm_start")
def test_qpfunction_warm_start_never_changes_the_answer_or_the_status():
    Q, p, G, _, A, b = _qpfunction_batch(fail=())
    fn = QPFunction(verbose=-1, on_failure="mask")
    hs = []
    for seed in range(6):
        (lo,) = _batch("qp", seed=seed)
        hs.append(as_tensor(np.hstack([-lo, np.ones((lo.shape[0], 1))])))
    cold = [fn(Q, p, G, h, A, b, return_info=True) for h in hs]
    for i, h in enumerate(hs):
        z, result = fn(Q, p, G, h, A, b, return_info=True, warm_start=cold[i - 1][1])
        assert result.status == cold[i][1].status
        assert (z - cold[i][0]).abs().max() < 1e-7


@pytest.mark.parametrize("kind", KINDS)
def test_backward_twice_with_retain_graph_gives_the_same_gradients(kind):
    layer = _layer(kind)
    args = [as_tensor(a, grad=True) for a in _batch(kind)]
    (x,) = layer(*args)
    loss = (x * _weights(x.shape)).sum()
    g1 = torch.autograd.grad(loss, args[0], retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, args[0])[0]
    assert torch.isfinite(g1).all() and torch.equal(g1, g2)


@pytest.mark.parametrize("kind", ["simplex", "softmax"])
def test_double_backward_is_right_where_supported(kind):
    """The simplex projection and softmax are plain autograd: second derivatives exist."""
    layer = _layer(kind)
    raw = _batch(kind, B=2)
    rest = [as_tensor(a) for a in raw[1:]]
    theta = as_tensor(raw[0], grad=True)
    assert torch.autograd.gradgradcheck(lambda th: layer(th, *rest)[0], (theta,))
    # Hessian of ½‖x‖² along v against the closed form.
    (x,) = layer(theta, *rest)
    (g,) = torch.autograd.grad(0.5 * (x * x).sum(), theta, create_graph=True)
    v = _weights(theta.shape, seed=7)
    (hv,) = torch.autograd.grad((g * v).sum(), theta)
    xd = x.detach()
    if kind == "simplex":  # J = diag(s) − s sᵀ/|S| is a projection: H = JᵀJ = J
        s = (xd > 0).double()
        expected = s * (v - (s * v).sum(-1, keepdim=True) / s.sum(-1, keepdim=True))
    else:  # x = softmax(θ): ∇ = J x, H v = J J v + Σᵢ xᵢ ∇²xᵢ v (by central differences)
        eps = 1e-6
        grad_at = [torch.autograd.grad(0.5 * (layer(th)[0] ** 2).sum(), th)[0] for th in
                   (as_tensor(raw[0] + eps * v.numpy(), grad=True),
                    as_tensor(raw[0] - eps * v.numpy(), grad=True))]
        expected = (grad_at[0] - grad_at[1]) / (2 * eps)
    assert (hv - expected).abs().max() < 1e-6


UNSUPPORTED_DOUBLE = ["entropy", "qp", "conic"]


@pytest.mark.parametrize("kind", UNSUPPORTED_DOUBLE)
def test_double_backward_raises_a_clear_error_where_unsupported(kind):
    """The implicit backward is once-differentiable: a Hessian-vector product through it
    must raise, not return something."""
    layer = _layer(kind)
    args = [as_tensor(a, grad=True) for a in _batch(kind)]
    (x,) = layer(*args)
    (g,) = torch.autograd.grad(0.5 * (x * x).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match=r"(?i)double backward|differentiate twice"):
        (g * g).sum().backward()


@functools.cache
def _curved_layer(kind):
    """A layer whose solution map has curvature: entropy from the zoo; on the QP and conic
    paths min ½Σaᵢxᵢ² − Σxᵢ s.t. x ≤ 10, x* = 1/a (piecewise-affine maps such as the zoo's
    projections have zero second derivative, which would hide a dropped term)."""
    if kind == "entropy":
        values = _batch("entropy")
        return _layer("entropy"), [as_tensor(a) for a in values[1:]], values[0]
    a, x = cp.Parameter(3, pos=True), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(a, cp.square(x))) - cp.sum(x)),
                      [x <= 10])
    kw = {"backend": "conic", "solver_args": SCS_ARGS} if kind == "conic" else {}
    layer = CvxpyLayer(prob, [a], [x], **kw)
    assert layer.backend == kind
    return layer, [], np.array([[1.0, 2.0, 0.5], [1.5, 0.7, 3.0]])


@pytest.mark.parametrize("kind", UNSUPPORTED_DOUBLE)
def test_double_backward_raises_or_is_right_never_silently_wrong(kind):
    """∇²[⟨w, x*(θ)⟩ + ½‖θ‖²]·w must raise, or match central differences of the gradient."""
    layer, rest, theta0 = _curved_layer(kind)
    w = _weights(theta0.shape)

    def grad_at(theta, create_graph=False):
        th = as_tensor(theta, grad=True)
        (x,) = layer(th, *rest)
        (g,) = torch.autograd.grad((w * x).sum() + 0.5 * (th * th).sum(), th,
                                   create_graph=create_graph)
        return th, g

    th, g = grad_at(theta0, create_graph=True)
    try:
        (hw,) = torch.autograd.grad((g * w).sum(), th)
    except RuntimeError:
        return
    eps = 1e-5
    expected = (grad_at(theta0 + eps * w.numpy())[1] - grad_at(theta0 - eps * w.numpy())[1])
    assert (hw - expected / (2 * eps)).abs().max() < 1e-4


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_and_inference_mode_outputs_do_not_require_grad(kind, mode):
    prob, params, outs, kw = _problem(kind)
    layer = CvxpyLayer(prob, params, outs, **kw)  # fresh: its first call is the graph-free one
    args = [as_tensor(a, grad=True) for a in _batch(kind)]
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        (x,), info = layer(*args, return_info=True)
    assert not x.requires_grad and x.grad_fn is None and info.ok
    # ... and a later call with autograd on is unaffected by anything cached then.
    (x2,) = layer(*args)
    assert x2.requires_grad and (x2.detach() - x).abs().max() < 1e-12
    (g,) = torch.autograd.grad(x2, args[0], _weights(x2.shape))
    assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------
# 5. Properties: random feasible problems against Clarabel and central differences
# ----------------------------------------------------------------------------

PROPERTY = dict(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SIZES = [(2, 2), (3, 3), (3, 5)]  # (variables, inequality rows)
PATH_KW = {"qp": {"backend": "qp"}, "conic": {"backend": "conic", "solver_args": SCS_ARGS}}
# Central-difference step and tolerances: the QP engine stops at 1e-10 scaled residuals,
# SCS (eps 1e-10) a little further off, so its step is larger.
FD = {"qp": dict(step=1e-6, sol=1e-6, grad=1e-4), "conic": dict(step=1e-4, sol=1e-5, grad=1e-3)}


@functools.cache
def _lp(n, m, backend):
    """min cᵀx  s.t.  Ax ≤ b,  −1 ≤ x ≤ 1   (bounded by the box)."""
    x, c, A, b = cp.Variable(n), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(c @ x), [A @ x <= b, x <= 1, x >= -1])
    return prob, [c, A, b], [x], CvxpyLayer(prob, [c, A, b], [x], **PATH_KW[backend])


@functools.cache
def _qp(n, m, backend):
    """min ½‖Px‖² + qᵀx  s.t.  Gx ≤ h,  aᵀx = β."""
    x, P, q = cp.Variable(n), cp.Parameter((n, n)), cp.Parameter(n)
    G, h, a, beta = cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter(n), cp.Parameter()
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(P @ x) + q @ x),
                      [G @ x <= h, a @ x == beta])
    params = [P, q, G, h, a, beta]
    return prob, params, [x], CvxpyLayer(prob, params, [x], **PATH_KW[backend])


@functools.cache
def _socp(n):
    """min cᵀx + ‖Fx − g‖₂  s.t.  −1 ≤ x ≤ 1   (F tall: the norm stays positive)."""
    x, c, F, g = cp.Variable(n), cp.Parameter(n), cp.Parameter((n + 2, n)), cp.Parameter(n + 2)
    prob = cp.Problem(cp.Minimize(c @ x + cp.norm(F @ x - g, 2)), [x <= 1, x >= -1])
    return prob, [c, F, g], [x], CvxpyLayer(prob, [c, F, g], [x], **PATH_KW["conic"])


def _lp_values(n, m, rng):
    A = rng.standard_normal((m, n))
    x0 = rng.uniform(-0.5, 0.5, n)  # a Slater point inside the box
    return [rng.standard_normal(n), A, A @ x0 + rng.uniform(0.1, 1.0, m)]


def _qp_values(n, m, rng):
    x0 = rng.uniform(-0.5, 0.5, n)
    G, a = rng.standard_normal((m, n)), rng.standard_normal(n)
    P = np.eye(n) + 0.3 * rng.standard_normal((n, n))
    return [P, 2.0 * rng.standard_normal(n), G, G @ x0 + rng.uniform(0.1, 1.0, m), a,
            np.array(a @ x0)]


def _socp_values(n, rng):
    return [0.5 * rng.standard_normal(n), rng.standard_normal((n + 2, n)),
            rng.standard_normal(n + 2)]


def _reference(prob, params, values, outs):
    """Clarabel through CVXPY (tight); SCS at eps 1e-12 where Clarabel stops 'inaccurate'
    (it does on some small SOCPs, and only on the first solve of a fresh problem)."""
    try:
        return _quiet(reference_solve, prob, params, values, outs)
    except RuntimeError:
        old = [p.value for p in params]
        try:
            for p, v in zip(params, values):
                p.value = np.asarray(v, dtype=np.float64)
            prob.solve(solver=cp.SCS, **SCS_TIGHT)
            assert prob.status == "optimal", prob.status
            return [np.array(v.value, dtype=np.float64) for v in outs]
        finally:
            for p, v in zip(params, old):
                p.value = v


def _check_against_clarabel_and_differences(problem, values, seed, backend):
    """Solution against Clarabel; ⟨∇, v⟩ of a random functional ⟨w, x*⟩ along a random
    direction v in every parameter against a central difference along v."""
    prob, params, outs, layer = problem
    (ref,) = _reference(prob, params, values, outs)
    inputs = [as_tensor(v, grad=True) for v in values]
    (x,), info = layer(*inputs, return_info=True)
    assert info.status == (Status.OPTIMAL,)
    tol = FD[backend]
    assert np.abs(x.detach().numpy() - ref).max() <= tol["sol"] * (1 + np.abs(ref).max())
    rng = np.random.default_rng(seed + 1)
    w = rng.standard_normal(x.shape)
    dirs = [rng.standard_normal(np.shape(v)) for v in values]
    grads = torch.autograd.grad(x, inputs, as_tensor(w))
    got = sum(float((g.numpy() * d).sum()) for g, d in zip(grads, dirs))

    def f(step):
        (xs,) = layer(*[as_tensor(v + step * d) for v, d in zip(values, dirs)])
        return float((xs.numpy() * w).sum())

    h = tol["step"]
    fd = (f(h) - f(-h)) / (2 * h)
    assert abs(got - fd) <= tol["grad"] * (1 + abs(fd)), (got, fd)


@pytest.mark.parametrize("backend", ["qp", "conic"])
@settings(**PROPERTY)
@given(size=st.sampled_from(SIZES), seed=st.integers(0, 2**31 - 1))
def test_property_random_bounded_lps(backend, size, seed):
    n, m = size
    values = _lp_values(n, m, np.random.default_rng(seed))
    _check_against_clarabel_and_differences(_lp(n, m, backend), values, seed, backend)


@pytest.mark.parametrize("backend", ["qp", "conic"])
@settings(**PROPERTY)
@given(size=st.sampled_from(SIZES), seed=st.integers(0, 2**31 - 1))
def test_property_random_qps(backend, size, seed):
    n, m = size
    values = _qp_values(n, m, np.random.default_rng(seed))
    _check_against_clarabel_and_differences(_qp(n, m, backend), values, seed, backend)


@settings(**PROPERTY)
@given(n=st.sampled_from([2, 3]), seed=st.integers(0, 2**31 - 1))
def test_property_random_socps_on_the_conic_path(n, seed):
    values = _socp_values(n, np.random.default_rng(seed))
    _check_against_clarabel_and_differences(_socp(n), values, seed, "conic")
