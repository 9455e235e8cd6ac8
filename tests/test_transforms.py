"""torch.func.vmap, torch.func.jacrev and torch.compile on the QP and entropy paths.

Every transform is checked against the plain call (vmap against the batched
layer, jacrev against torch.autograd.functional.jacobian, compile against eager).
The conic path runs diffcp in numpy and must refuse the transforms clearly.
"""

import cvxpy as cp
import numpy as np
import pytest
import torch

from declarative import CvxpyLayer

DT = torch.float64
N = 4


def _layers():
    x = cp.Variable(N)
    q = cp.Parameter(N)
    qp = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(x) + q @ x),
                               [x >= -0.3, cp.sum(x) == 0.5]), [q], [x], backend="qp")
    th = cp.Parameter(N)
    z = cp.Variable(N)
    softmax = CvxpyLayer(cp.Problem(cp.Maximize(th @ z + cp.sum(cp.entr(z))),
                                    [cp.sum(z) == 1]), [th], [z])
    A = np.vstack([np.ones(N), np.arange(N)])
    general = CvxpyLayer(cp.Problem(cp.Maximize(th @ z + cp.sum(cp.entr(z))),
                                    [A @ z == np.array([1.0, 1.5])]), [th], [z])
    sparsemax = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(z - th)),
                                      [cp.sum(z) == 1, z >= 0]), [th], [z])
    t = cp.Variable()
    socp = cp.Problem(cp.Minimize(t + cp.sum_squares(x - q)), [cp.norm(x) <= t])
    cone = CvxpyLayer(socp, [q], [x], backend="cone")
    conic = CvxpyLayer(socp, [q], [x], backend="conic")
    return {"qp": qp, "softmax": softmax, "general": general, "sparsemax": sparsemax,
            "cone": cone, "conic": conic}


LAYERS = _layers()
TORCH_PATHS = ["qp", "softmax", "general", "sparsemax", "cone"]
EXPECTED = {"qp": "qp", "softmax": "entropy", "general": "entropy", "sparsemax": "simplex",
            "cone": "cone", "conic": "conic"}


def _input(seed=0, batch=3):
    return torch.randn(batch, N, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _f(name):
    layer = LAYERS[name]
    return lambda a: layer(a)[0]


@pytest.mark.parametrize("name", list(LAYERS))
def test_routes(name):
    assert LAYERS[name].backend == EXPECTED[name]


@pytest.mark.parametrize("name", TORCH_PATHS)
def test_vmap_equals_the_batched_call(name):
    f, t = _f(name), _input()
    assert torch.allclose(torch.func.vmap(f)(t), f(t), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", TORCH_PATHS)
def test_jacrev_equals_autograd_jacobian(name):
    f, t = _f(name), _input(1)
    for point in (t[0], t):  # unbatched and batched inputs
        J = torch.func.jacrev(f)(point)
        ref = torch.autograd.functional.jacobian(f, point)
        assert torch.allclose(J, ref, atol=1e-10, rtol=0)
        assert J.abs().max() > 1e-3  # a real Jacobian, not zeros


@pytest.mark.parametrize("name", TORCH_PATHS)
def test_vmap_of_grad_per_sample_gradients(name):
    """Per-sample gradients (the usual reason for vmap): equal to a loop of backward calls."""
    f = _f(name)
    t = _input(2)
    w = torch.randn(N, dtype=DT, generator=torch.Generator().manual_seed(5))
    per_sample = torch.func.vmap(torch.func.grad(lambda a: (w * f(a)).sum()))(t)
    for i in range(t.shape[0]):
        a = t[i].clone().requires_grad_()
        (g,) = torch.autograd.grad((w * f(a)).sum(), a)
        assert torch.allclose(per_sample[i], g, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", TORCH_PATHS)
def test_torch_compile_matches_eager(name):
    f = _f(name)
    t = _input(3).requires_grad_()
    compiled = torch.compile(f)
    out = compiled(t)
    ref = f(t)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    w = torch.randn_like(ref)
    (g1,) = torch.autograd.grad((w * out).sum(), t)
    (g2,) = torch.autograd.grad((w * ref).sum(), t)
    assert torch.allclose(g1, g2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("transform, message", [
    (torch.func.vmap, "vmap"), (torch.func.jacrev, "grad/jacrev")])
def test_conic_path_refuses_transforms_by_name(transform, message):
    f = _f("conic")
    with pytest.raises(NotImplementedError, match=message):
        transform(f)(_input(4))
