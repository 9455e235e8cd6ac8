"""Every property on every route: the cases of `problems.CASES` crossed with the
behaviours the front doors promise whatever route runs.

A property that only some routes have says so in its own test (warm starts,
torch.func); the rest must hold everywhere.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from helpers import as_tensor
from problems import CASES

from declarative import CvxpyLayer, Status
from declarative.export import ExportedLayer

DT = torch.float64
IDS = [c.name for c in CASES]


@functools.cache
def _layer(name):
    case = next(c for c in CASES if c.name == name)
    prob, params, variables = case.build()
    return case, CvxpyLayer(prob, params, variables, **case.kwargs)


def _values(case, B=3, seed=0, dtype=DT, grad=False):
    raw = case.values(np.random.default_rng(seed), B)
    return [as_tensor(v, grad=grad, dtype=dtype) for v in raw]


def _close(a, b, tol):
    return all(torch.allclose(x, y, atol=tol, rtol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("name", IDS)
def test_auto_picks_the_expected_route(name):
    case, layer = _layer(name)
    assert layer.backend == case.route


@pytest.mark.parametrize("name", IDS)
def test_export_round_trip_matches_the_layer(name, tmp_path):
    """Outputs, statuses, warm starts and gradients of a reloaded export equal the layer's."""
    case, layer = _layer(name)
    path = tmp_path / "layer.pt"
    torch.save(layer.export().state_dict(), path)
    module = ExportedLayer()
    module.load_state_dict(torch.load(path))
    args = _values(case, grad=True)
    ours, info = layer(*args, return_info=True)
    theirs, info2 = module(*[a.detach().clone().requires_grad_(True) for a in args],
                           return_info=True)
    assert info.status == info2.status and info.backend == info2.backend
    assert _close(ours, theirs, 1e-12)
    w = [torch.randn_like(o) for o in ours]
    g1 = torch.autograd.grad(sum((a * b).sum() for a, b in zip(w, ours)), args)
    args2 = [a.detach().clone().requires_grad_(True) for a in args]
    out2 = module(*args2)
    g2 = torch.autograd.grad(sum((a * b).sum() for a, b in zip(w, out2)), args2)
    assert _close(g1, g2, 1e-10)
    if case.warm:
        again = module(*[a.detach() for a in args], warm_start=info2)
        assert _close(again, [o.detach() for o in theirs], case.tol)


@pytest.mark.parametrize("name", IDS)
def test_batch_equals_one_sample_at_a_time(name):
    case, layer = _layer(name)
    args = _values(case, B=3)
    batch = layer(*args)
    for i in range(3):
        solo = layer(*[a[i:i + 1] for a in args])
        assert all(s.shape[0] == 1 for s in solo)  # a batch of 1 keeps its dimension
        assert _close([b[i:i + 1] for b in batch], solo, case.tol)
    single = layer(*[a[0] for a in args])  # unbatched: no batch dimension
    assert _close([b[0] for b in batch], single, case.tol)


@pytest.mark.parametrize("name", IDS)
def test_float32_in_float32_out_and_close_to_float64(name):
    case, layer = _layer(name)
    out64 = layer(*_values(case))
    out32 = layer(*_values(case, dtype=torch.float32))
    assert all(o.dtype == torch.float32 for o in out32)
    assert _close([o.double() for o in out32], out64, 1e-4)


@pytest.mark.parametrize("name", IDS)
def test_warm_start_from_a_previous_call_gives_the_same_answer(name):
    case, layer = _layer(name)
    args = _values(case)
    cold, info = layer(*args, return_info=True)
    nearby = [a + 1e-3 * torch.ones_like(a) for a in args]
    warm, info2 = layer(*nearby, warm_start=info, return_info=True)
    fresh = layer(*nearby)
    assert _close(warm, fresh, 10 * case.tol)
    if not case.warm:
        return  # a closed form or a solver that takes no start: the info is accepted
    assert info.warm_start is not None
    assert np.mean(info2.iterations) <= np.mean(info.iterations) + 1
    with pytest.raises(ValueError, match="does not fit this layer"):
        layer(*_values(case, B=2), warm_start=info)


@pytest.mark.parametrize("name", IDS)
def test_a_non_finite_sample_is_masked_and_the_others_are_untouched(name):
    case, layer = _layer(name)
    args = _values(case)
    bad = [a.clone() for a in args]
    bad[0][1].reshape(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN at batch index 1"):
        layer(*bad)
    out, info = layer(*bad, on_failure="mask", return_info=True)
    assert info.status[1] is Status.INVALID_INPUT
    assert all(torch.isnan(o[1]).all() for o in out)
    clean = layer(*args)
    assert _close([o[[0, 2]] for o in out], [c[[0, 2]] for c in clean], case.tol)


@pytest.mark.parametrize("name", IDS)
def test_torch_func_runs_or_is_refused_clearly(name):
    case, layer = _layer(name)
    args = _values(case)
    first = args[0]

    def f(v):
        return layer(v, *[a[0] for a in args[1:]])[0]

    if case.route == "conic":
        with pytest.raises(NotImplementedError, match="not supported on the conic path"):
            torch.func.vmap(f)(first)
        return
    mapped = torch.func.vmap(f)(first)
    looped = torch.stack([f(first[i]) for i in range(first.shape[0])])
    assert torch.allclose(mapped, looped, atol=case.tol)
    jac = torch.func.jacrev(f)(first[0])
    assert torch.isfinite(jac).all()


@pytest.mark.parametrize("name", IDS)
def test_gradient_matches_central_differences(name):
    case, layer = _layer(name)
    args = _values(case, B=2, seed=3, grad=True)
    out = layer(*args)
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(o.shape, dtype=DT, generator=gen) for o in out]
    grads = torch.autograd.grad(sum((a * b).sum() for a, b in zip(w, out)), args)
    d = [torch.randn(a.shape, dtype=DT, generator=gen) for a in args]
    ours = sum(float((g * v).sum()) for g, v in zip(grads, d))
    h = 1e-5

    def value(t):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = layer(*[(a + t * v).detach() for a, v in zip(args, d)])
        return sum(float((a * b).sum()) for a, b in zip(w, o))

    fd = (value(h) - value(-h)) / (2 * h)
    assert abs(fd) > 1e-6  # a real derivative, not zeros compared
    assert abs(ours - fd) <= 1e-4 * max(1.0, abs(fd)), (ours, fd)


# ---------------------------------------------------------------------------
# The one status criterion, on tensors (batched routes) and on numpy arrays (the
# per-sample routes judge on the host)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_array", [torch.tensor, np.asarray], ids=["torch", "numpy"])
def test_judge_gives_each_sample_the_status_its_point_earns(as_array):
    from declarative.backends import solution as sol

    codes = [sol.OPTIMAL, sol.OPTIMAL, sol.OPTIMAL, sol.MAX_ITER, sol.MAX_ITER,
             sol.INACCURATE, sol.INFEASIBLE, sol.OPTIMAL, sol.OPTIMAL]
    residuals = [[1e-12, 1e-12, 1e-12],  # optimal stays optimal
                 [5e-3, 1e-12, 1e-12],  # beyond optimal's residual: inaccurate
                 [1e-12, 1e-12, 5e-2],  # beyond optimal's gap: inaccurate
                 [5e-3, 5e-3, 5e-2],  # a usable max_iter point
                 [0.5, 1e-12, 1e-12],  # max_iter beyond the usable line: no solution
                 [1e-12, 0.5, 1e-12],  # so is an inaccurate one beyond it
                 [np.nan, np.nan, np.nan],  # a certificate's code is not judged by its point
                 [1e-12, np.inf, 1e-12],  # a non-finite measure never passes
                 [1e-12, 1e-12, np.nan]]
    certificate = [0, 0, 0, 0, sol.INFEASIBLE, 0, 0, 0, 0]
    expected = [sol.OPTIMAL, sol.INACCURATE, sol.INACCURATE, sol.MAX_ITER, sol.INFEASIBLE,
                sol.NUMERICAL, sol.INFEASIBLE, sol.NUMERICAL, sol.NUMERICAL]
    got = sol.judge(as_array(np.array(codes, dtype=np.int64)), as_array(np.array(residuals)),
                    as_array(np.array(certificate, dtype=np.int64)))
    assert type(got) is type(as_array(np.zeros(1)))
    assert [int(c) for c in got] == expected
    # No failing sample: the codes come back as judged, nothing made NUMERICAL.
    ok = sol.judge(as_array(np.array(codes[:4], dtype=np.int64)), as_array(np.array(residuals[:4])))
    assert [int(c) for c in ok] == expected[:4]
