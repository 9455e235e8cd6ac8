"""`declarative.implicit` and the QP engine's three backward modes, against references.

The seed's thesis (sections 1–4): the implicit function theorem differentiates the
output of an iterative solver from its optimality condition F(x, θ) = 0 alone,

    dx/dθ = −(∂F/∂x)⁻¹ ∂F/∂θ,

valid where F vanishes at the returned point (condition 1) and ∂F/∂x is nonsingular
(condition 3), and it stores none of the solver's iterations. Every derivative here
is checked against something `implicit` does not compute: a closed form (the unit
circle's −θ/x, softmax's diag(z) − zzᵀ, the roots of a cubic, M⁻¹ for a quadratic),
autograd through the unrolled iterations, or central differences by re-solving.
The QP engine's backward="implicit" | "iterative" | "unroll" are checked against
one another and against central differences; memory is counted with
``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import warnings
import weakref

import numpy as np
import pytest
import torch
from declarative.backends.qp import QPSettings, solve_qp
from helpers import central_differences, directional_difference, random_qp, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

# (The function, not a module: the implementation lives in declarative._implicit.)
from declarative import ImplicitFunctionError, implicit

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems
KKTS = ("schur", "reduced")
# (method, symmetric): dense LU, GMRES, MINRES.
METHODS = [("dense", False), ("iterative", False), ("iterative", True)]
METHOD_IDS = ["dense", "gmres", "minres"]


# ----------------------------------------------------------------------------
# Small tools
# ----------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _batched_jacobian(fn, theta):
    """J[b, i, j] = ∂fn(θ)[b, i] / ∂θ[b, j] for a map whose samples do not interact."""
    theta = theta.detach().clone().requires_grad_()
    x = fn(theta)
    rows = [torch.autograd.grad(x[:, i].sum(), theta, retain_graph=True)[0]
            for i in range(x.shape[1])]
    return torch.stack(rows, 1)


def _max_abs(a, b) -> float:
    return float((a.detach() - b.detach()).abs().max())


def _saved_bytes(fn):
    """(bytes that autograd keeps saved for backward after ``fn()``, fn's output).

    Every tensor autograd saves passes through the pack hook; those still alive once
    ``fn`` has returned (held by the graph of its output) are counted, each storage
    once. Tensors a custom Function keeps on ``ctx`` outside ``save_for_backward``
    are not seen here.
    """
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    gc.collect()
    storages = {}
    for ref in refs:
        t = ref()
        if t is not None:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values()), out


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a dict (an `QPResult.factor`), 0 for None."""
    if not obj:
        return 0
    return sum(v.numel() * v.element_size() for v in obj.values() if torch.is_tensor(v))


# ----------------------------------------------------------------------------
# 1. The unit circle F(θ, x) = θ² + x² − 1 (seed, section 3)
# ----------------------------------------------------------------------------


def _circle_residual(x, theta):
    return theta ** 2 + x ** 2 - 1


def _circle(branch, **options):
    """x = ±√(1 − θ²), the solver's output, differentiable through F only."""
    return implicit(lambda th: branch * torch.sqrt(1 - th ** 2), _circle_residual, **options)


@pytest.mark.parametrize("branch", [1.0, -1.0], ids=["upper", "lower"])
@pytest.mark.parametrize(("method", "symmetric"), METHODS, ids=METHOD_IDS)
def test_unit_circle_slope_is_minus_theta_over_x(branch, method, symmetric):
    theta = torch.tensor([-0.999, -0.6, -0.1, 0.0, 0.3, 0.8, 0.999], dtype=DT,
                         requires_grad=True)
    circle = _circle(branch, method=method, symmetric=symmetric)
    x = circle(theta)
    x_ref = branch * torch.sqrt(1 - theta.detach() ** 2)
    assert _max_abs(x, x_ref) == 0.0
    (g,) = torch.autograd.grad(x.sum(), theta)
    slope = -theta.detach() / x_ref  # the seed's dx/dθ, up to ±22 near θ = ±1
    assert torch.allclose(g, slope, rtol=1e-12, atol=1e-14)
    # And the derivative of the branch itself, f₁,₂(θ) = ±√(1 − θ²), by autograd.
    th = theta.detach().clone().requires_grad_()
    (g_branch,) = torch.autograd.grad((branch * torch.sqrt(1 - th ** 2)).sum(), th)
    assert torch.allclose(g, g_branch, rtol=1e-12, atol=1e-14)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(st.floats(-0.995, 0.995), min_size=1, max_size=6),
       st.sampled_from([1.0, -1.0]))
def test_property_unit_circle_dense_equals_iterative_equals_closed_form(thetas, branch):
    theta = torch.tensor(thetas, dtype=DT)
    slope = -theta / (branch * torch.sqrt(1 - theta ** 2))
    for method in ("dense", "iterative"):
        th = theta.clone().requires_grad_()
        (g,) = torch.autograd.grad(_circle(branch, method=method)(th).sum(), th)
        assert torch.allclose(g, slope, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("edge", [1.0, -1.0])
def test_unit_circle_dense_raises_at_x_zero_naming_the_condition(edge):
    # θ = ±1: x = 0 and ∂F/∂x = 2x = 0, the seed's point p₂ where dx/dθ is undefined.
    theta = torch.tensor([0.5, edge, -0.3], dtype=DT, requires_grad=True)
    x = _circle(1.0)(theta)
    assert float(x.detach()[1]) == 0.0
    with pytest.raises(ImplicitFunctionError,
                       match=r"(?s)singular at sample 1.*invertibility condition"):
        torch.autograd.grad(x.sum(), theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["gmres", "minres"])
def test_unit_circle_iterative_raises_at_x_zero_naming_the_sample(symmetric, dtype):
    """θ = 1: ∂F/∂x = 0 and dx/dθ = −θ/x does not exist (it is −∞).

    The Krylov solve of (∂F/∂x)ᵀ w = g stalls at relative residual 1; that is a refusal
    naming the sample, as the dense method's, never a finite number with a warning.
    """
    theta = torch.tensor([0.5, 1.0, -0.3], dtype=dtype, requires_grad=True)
    x = _circle(1.0, method="iterative", symmetric=symmetric, max_iter=50)(theta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImplicitFunctionError,
                           match=r"(?s)failed at sample 1: relative residual 1\.0e\+00.*"
                                 r"singular"):
            torch.autograd.grad(x.sum(), theta)
    # Without the singular sample the same layer is exact.
    ok = theta.detach()[[0, 2]].clone().requires_grad_()
    x_ok = _circle(1.0, method="iterative", symmetric=symmetric)(ok)
    (g,) = torch.autograd.grad(x_ok.sum(), ok)
    slope = -ok.detach() / x_ok.detach()
    assert float(slope.abs().min()) > 0.3
    assert torch.allclose(g, slope, rtol=1e-5 if dtype == torch.float32 else 1e-12)


# ----------------------------------------------------------------------------
# 2. Softmax through its KKT residual (the seed's equation (3))
# ----------------------------------------------------------------------------
#
# Stationarity θ − log z − 1 + u·1 + v = 0, u(zᵀ1 − 1) = 0, diag(v) z = 0. For z > 0
# the solution has v = 0 and u = 1 − logsumexp(θ); "zu" drops v (and the third block),
# "zuv" keeps the seed's full 2n + 1 system.


def _softmax_solve(form):
    def solve(theta):
        z = torch.softmax(theta, -1)
        u = 1 - torch.logsumexp(theta, -1, keepdim=True)
        parts = [z, u] + ([torch.zeros_like(z)] if form == "zuv" else [])
        return torch.cat(parts, -1)

    return solve


def _softmax_residual(form, n):
    def residual(x, theta):
        z, u = x[:, :n], x[:, n:n + 1]
        v = x[:, n + 1:] if form == "zuv" else 0.0
        rows = [theta - torch.log(z) - 1 + u + v, u * (z.sum(-1, keepdim=True) - 1)]
        if form == "zuv":
            rows.append(v * z)
        return torch.cat(rows, -1)

    return residual


@pytest.mark.parametrize("form", ["zu", "zuv"])
@pytest.mark.parametrize(("method", "tol"), [("dense", 1e-12), ("iterative", 1e-9)])
def test_softmax_kkt_jacobian_is_diag_z_minus_z_zT(form, method, tol):
    B, n = 4, 5
    theta = 1.5 * torch.randn(B, n, dtype=DT, generator=_gen(0))
    layer = implicit(_softmax_solve(form), _softmax_residual(form, n), method=method)
    J = _batched_jacobian(lambda th: layer(th)[:, :n], theta)
    z = torch.softmax(theta, -1)
    closed_form = torch.diag_embed(z) - z.unsqueeze(-1) * z.unsqueeze(-2)
    assert _max_abs(J, closed_form) <= tol
    # Independent of the closed form: autograd through torch.softmax.
    assert _max_abs(J, _batched_jacobian(lambda th: torch.softmax(th, -1), theta)) <= tol
    # The multiplier u = 1 − logsumexp θ differentiates to −z.
    Ju = _batched_jacobian(lambda th: layer(th)[:, n:n + 1], theta)
    assert _max_abs(Ju[:, 0], -z) <= tol


def test_softmax_kkt_is_singular_where_u_is_zero():
    """The seed says u > 0; in fact u = 1 − logsumexp θ has either sign, and the row
    u(zᵀ1 − 1) of equation (3) makes ∂F/∂x singular at u = 0 (logsumexp θ = 1)."""
    n = 4
    theta = torch.stack([torch.full((n,), 1 - float(np.log(n)), dtype=DT),
                         torch.randn(n, dtype=DT, generator=_gen(1))])
    layer = implicit(_softmax_solve("zu"), _softmax_residual("zu", n))
    th = theta.clone().requires_grad_()
    x = layer(th)
    assert abs(float(x.detach()[0, n])) < 1e-15
    with pytest.raises(ImplicitFunctionError, match="singular at sample 0"):
        torch.autograd.grad(x[:, :n].sum(), th)


def test_softmax_kkt_iterative_float32_default_tolerance_does_not_warn():
    B, n = 3, 5
    theta = torch.randn(B, n, generator=_gen(2))  # float32, torch's default dtype
    layer = implicit(_softmax_solve("zu"), _softmax_residual("zu", n), method="iterative")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        J = _batched_jacobian(lambda th: layer(th)[:, :n], theta)
    z = torch.softmax(theta, -1)
    assert _max_abs(J, torch.diag_embed(z) - z.unsqueeze(-1) * z.unsqueeze(-2)) <= 1e-5


# ----------------------------------------------------------------------------
# 3. K gradient-descent steps on f(x; θ, M) = ½xᵀMx − θᵀx
# ----------------------------------------------------------------------------
#
# x_{k+1} = x_k − η(Mx_k − θ), x_0 = 0. Unrolled autograd differentiates x_K exactly:
# dx_K/dθ = (I − (I − ηM)^K) M⁻¹, so its gap to the implicit M⁻¹ is (I − ηM)^K M⁻¹,
# geometric with ratio ρ = 1 − η λ_min(M). With eigenvalues in [1, 4] and η = 1/4,
# ρ = 3/4.

GD_N, GD_B, GD_ETA, GD_RHO = 6, 3, 0.25, 0.75
GD_STEPS = (5, 10, 20, 40, 80, 120)


def _gd_problem():
    g = _gen(3)
    U, _ = torch.linalg.qr(torch.randn(GD_N, GD_N, dtype=DT, generator=g))
    M = U @ torch.diag(torch.linspace(1.0, 4.0, GD_N, dtype=DT)) @ U.T
    M = 0.5 * (M + M.T)
    theta = torch.randn(GD_B, GD_N, dtype=DT, generator=g)
    w = torch.randn(GD_B, GD_N, dtype=DT, generator=g)
    return M, theta, w


def _gd_grad_f(x, theta, M):
    return x @ M - theta  # ∇f, row-major: (Mx)ᵀ = xᵀM for symmetric M


def _descend(K):
    def run(theta, M):
        x = torch.zeros_like(theta)
        for _ in range(K):
            x = x - GD_ETA * _gd_grad_f(x, theta, M)
        return x

    return run


def _gd_grads(K, how, symmetric=True):
    """∇_θ and ∇_M of Σ w·x_K: unrolled, or implicit through ∇f = Mx − θ."""
    M0, theta0, w = _gd_problem()
    theta, M = theta0.clone().requires_grad_(), M0.clone().requires_grad_()
    if how == "unroll":
        x = _descend(K)(theta, M)
    else:
        layer = implicit(_descend(K), _gd_grad_f, method=how, symmetric=symmetric,
                         tol=1e-14, residual_tol=None)
        x = layer(theta, M)
    g_theta, g_M = torch.autograd.grad((w * x).sum(), (theta, M))
    return g_theta, g_M, x.detach()


@pytest.mark.parametrize(("method", "symmetric"), METHODS, ids=METHOD_IDS)
def test_gradient_descent_implicit_matches_unrolled_as_k_grows(method, symmetric):
    M, theta, w = _gd_problem()
    Minv = torch.linalg.inv(M)
    I = torch.eye(GD_N, dtype=DT)
    gaps_theta, gaps_M = [], []
    for K in GD_STEPS:
        gi_t, gi_M, xK = _gd_grads(K, method, symmetric)
        gu_t, gu_M, xu = _gd_grads(K, "unroll")
        assert _max_abs(xK, xu) == 0.0
        # Implicit ∇θ is M⁻¹w whatever K (∂F/∂x = M at every x); ∇M is −Σ_b x_K,b (M⁻¹w_b)ᵀ
        # evaluated at the solver's output (F_i = Σ_j x_j M_ji).
        a = w @ Minv
        assert _max_abs(gi_t, a) <= 1e-13
        assert _max_abs(gi_M, -(xK.T @ a)) <= 1e-13
        # The unrolled gap to it: exactly (I − ηM)^K M⁻¹ w for θ.
        gap_t = _max_abs(gu_t, gi_t)
        predicted = float((torch.linalg.matrix_power(I - GD_ETA * M, K) @ Minv @ w.T)
                          .abs().max())
        assert abs(gap_t - predicted) <= 1e-6 * predicted + 1e-14, (K, gap_t, predicted)
        gaps_theta.append(gap_t)
        gaps_M.append(_max_abs(gu_M, gi_M))
    # Geometric shrinkage: ρ^ΔK per step for θ, (K₂/K₁)ρ^ΔK allowing the polynomial
    # factor that ∇M carries (it sums K terms); then both at round-off.
    for k in range(3):
        K1, K2 = GD_STEPS[k], GD_STEPS[k + 1]
        assert gaps_theta[k + 1] <= 1.5 * GD_RHO ** (K2 - K1) * gaps_theta[k]
        assert gaps_M[k + 1] <= 3 * (K2 / K1) * GD_RHO ** (K2 - K1) * gaps_M[k]
    assert gaps_theta[0] > 0.1 and gaps_M[0] > 0.1
    assert gaps_theta[-1] <= 1e-12 and gaps_M[-1] <= 1e-12
    # At large K both agree with the exact solution map x*(θ, M) = θM⁻¹.
    x_star = theta @ Minv
    assert _max_abs(gi_M, -(x_star.T @ (w @ Minv))) <= 1e-12


def test_gradient_descent_dense_and_minres_agree_on_m_gradient():
    for K in (7, 60):
        dense = _gd_grads(K, "dense")
        minres = _gd_grads(K, "iterative", symmetric=True)
        gmres = _gd_grads(K, "iterative", symmetric=False)
        for a, b, c in zip(dense[:2], minres[:2], gmres[:2]):
            assert _max_abs(a, b) <= 1e-13 and _max_abs(a, c) <= 1e-13


def test_gradient_descent_with_few_steps_fails_condition_1():
    """After 5 steps ∇f(x_5) ≠ 0: the default residual_tol refuses the point."""
    M, theta, _ = _gd_problem()
    layer = implicit(_descend(5), _gd_grad_f, method="iterative", symmetric=True)
    with pytest.raises(ImplicitFunctionError, match="condition 1"):
        layer(theta.clone().requires_grad_(), M)
    # At K = 200 the same layer passes the check (ρ^200 ≈ 1e-25).
    x = implicit(_descend(200), _gd_grad_f, method="iterative", symmetric=True)(theta, M)
    assert _max_abs(x, theta @ torch.linalg.inv(M)) <= 1e-12


# ----------------------------------------------------------------------------
# 4. Nonlinear solvers that are no convex program
# ----------------------------------------------------------------------------


def _tanh_problem():
    g = _gen(4)
    n, B = 5, 4
    W = torch.randn(n, n, dtype=DT, generator=g)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)  # a contraction: unique fixed point
    theta = torch.randn(B, n, dtype=DT, generator=g)
    weights = torch.randn(B, n, dtype=DT, generator=g)
    return theta, W, weights


def _tanh_fixed_point(theta, W):
    """x = tanh(Wx + θ) by plain iteration (0.6²⁰⁰ ≪ machine epsilon)."""
    x = torch.zeros_like(theta)
    for _ in range(200):
        x = torch.tanh(x @ W.T + theta)
    return x


def _tanh_residual(x, theta, W):
    return x - torch.tanh(x @ W.T + theta)


@pytest.mark.parametrize(("method", "symmetric"), METHODS[:2], ids=METHOD_IDS[:2])
def test_tanh_fixed_point_matches_central_differences_with_shared_w(method, symmetric):
    theta, W, weights = _tanh_problem()
    layer = implicit(_tanh_fixed_point, _tanh_residual, method=method, symmetric=symmetric)
    th, Wp = theta.clone().requires_grad_(), W.clone().requires_grad_()
    g_theta, g_W = torch.autograd.grad((weights * layer(th, Wp)).sum(), (th, Wp))
    fd_theta, fd_W = central_differences(lambda t, w: [_tanh_fixed_point(t, w)],
                                         [theta, W], [weights], eps=1e-6)
    assert g_W.shape == W.shape  # the shared parameter gets the sum over the batch
    assert rel_err(g_theta, fd_theta) <= 1e-8
    assert rel_err(g_W, fd_W) <= 1e-8
    # Batch vs one at a time: ∇W is the sum of the per-sample gradients.
    per_sample = torch.zeros_like(W)
    for b in range(theta.shape[0]):
        Wb = W.clone().requires_grad_()
        (gb,) = torch.autograd.grad((weights[b:b + 1] * layer(theta[b:b + 1], Wb)).sum(), Wb)
        per_sample += gb
    assert _max_abs(per_sample, g_W) <= 1e-13


def _newton_cubic(c, a):
    """The real root of x³ + a x − c (a > 0: one root, monotone), by Newton from 0."""
    x = torch.zeros_like(c)
    for _ in range(60):
        x = x - (x ** 3 + a * x - c) / (3 * x ** 2 + a)
    return x


def _cubic_residual(x, c, a):
    return x ** 3 + a * x - c


@pytest.mark.parametrize("method", ["dense", "iterative"])
def test_cubic_root_by_newton_matches_closed_form_and_central_differences(method):
    c = 3.0 * torch.randn(6, dtype=DT, generator=_gen(5))
    a = torch.tensor(0.7, dtype=DT)  # shared scalar parameter
    layer = implicit(_newton_cubic, _cubic_residual, method=method)
    cp, ap = c.clone().requires_grad_(), a.clone().requires_grad_()
    x = layer(cp, ap)
    assert _max_abs(_cubic_residual(x, c, a), torch.zeros_like(c)) <= 1e-12
    g_c, g_a = torch.autograd.grad(x.sum(), (cp, ap))
    xs = x.detach()
    # Differentiating x³ + a x − c = 0: dx/dc = 1/(3x² + a), dx/da = −x/(3x² + a).
    assert torch.allclose(g_c, 1 / (3 * xs ** 2 + a), rtol=1e-13)
    assert abs(float(g_a) - float((-xs / (3 * xs ** 2 + a)).sum())) <= 1e-13
    fd_c, fd_a = central_differences(lambda cc, aa: [_newton_cubic(cc, aa)], [c, a],
                                     [torch.ones_like(c)], eps=1e-6)
    assert rel_err(g_c, fd_c) <= 1e-8 and rel_err(g_a, fd_a) <= 1e-8


# ----------------------------------------------------------------------------
# 5. The conditions `implicit` checks, and its argument errors
# ----------------------------------------------------------------------------


def test_residual_that_does_not_vanish_raises_condition_1():
    # A "solver" that returns points off the circle for sample 2 only.
    def solve(th):
        x = torch.sqrt(1 - th ** 2)
        x[2] = 0.5
        return x

    theta = torch.tensor([0.1, -0.4, 0.6], dtype=DT, requires_grad=True)
    with pytest.raises(ImplicitFunctionError,
                       match=r"(?s)condition 1.*sample 2.*residual_tol"):
        implicit(solve, _circle_residual)(theta)
    # A looser residual_tol accepts it (scaled |F| = |0.36 + 0.25 − 1| / 1.5 = 0.26).
    implicit(solve, _circle_residual, residual_tol=0.3)(theta)
    with pytest.raises(ImplicitFunctionError, match="condition 1"):
        implicit(solve, _circle_residual, residual_tol=0.25)(theta)


@pytest.mark.parametrize("method", ["dense", "iterative"])
def test_residual_tol_none_skips_the_check_and_differentiates_at_the_point(method):
    theta = torch.tensor([0.6, -0.2], dtype=DT, requires_grad=True)
    x_off = torch.tensor([0.5, -2.0], dtype=DT)  # F ≠ 0 at both
    layer = implicit(lambda th: x_off.clone(), _circle_residual, method=method,
                     residual_tol=None)
    x = layer(theta)
    assert _max_abs(x, x_off) == 0.0
    (g,) = torch.autograd.grad(x.sum(), theta)
    # −(∂F/∂x)⁻¹ ∂F/∂θ at the returned point: −2θ / 2x.
    assert torch.allclose(g, -theta.detach() / x_off, rtol=1e-12)


def test_non_finite_residual_raises_condition_1():
    def diverged(th):  # sample 1's solve "diverged" to NaN
        x = torch.sqrt(1 - th ** 2)
        x[1] = float("nan")
        return x

    theta = torch.tensor([0.3, 0.2], dtype=DT)
    with pytest.raises(ImplicitFunctionError, match=r"(?s)condition 1.*sample 1"):
        implicit(diverged, _circle_residual)(theta)


@pytest.mark.parametrize("bad", [0.5, np.array([0.5]), [0.5], None],
                         ids=["float", "ndarray", "list", "None"])
def test_non_tensor_parameter_raises_type_error(bad):
    layer = implicit(lambda c, a: _newton_cubic(c, torch.as_tensor(a, dtype=DT)),
                     _cubic_residual)
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor"):
        layer(torch.tensor([1.0], dtype=DT), bad)


def test_public_name_implicit_is_the_function_whatever_the_import_order():
    code = ("import declarative; declarative.ImplicitFunctionError; "
            "assert callable(declarative.implicit), declarative.implicit")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-300:]


def test_unknown_method_and_non_tensor_solution_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        implicit(_newton_cubic, _cubic_residual, method="lu")
    layer = implicit(lambda th: [0.0], _circle_residual)
    with pytest.raises(TypeError, match="must return a tensor"):
        layer(torch.tensor([0.0], dtype=DT))


# ----------------------------------------------------------------------------
# 5a. Singular ∂F/∂x, scaling, and non-finite upstream gradients
# ----------------------------------------------------------------------------
#
# F = (x₀ − θ₀, (x₁ − θ₁)³ + c (x₁ − θ₁)): the solution is x = θ for every c, so
# dx/dθ = I, but ∂F/∂x = diag(1, c) is singular at c = 0 and the IFT does not apply.

DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


def _cubic_pair_residual(x, theta, c):
    d = x - theta
    return torch.stack([d[:, 0], d[:, 1] ** 3 + c * d[:, 1]], -1)


def _cubic_pair(method, symmetric=False):
    return implicit(lambda th, c: th.clone(), _cubic_pair_residual, method=method,
                    symmetric=symmetric)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("method", "symmetric"), METHODS, ids=METHOD_IDS)
def test_singular_jacobian_is_refused_naming_the_sample(method, symmetric, dtype):
    theta = torch.randn(3, 2, dtype=dtype, generator=_gen(20))
    c = torch.tensor([1.0, 0.0, 2.0], dtype=dtype)  # sample 1 is singular
    th = theta.clone().requires_grad_()
    x = _cubic_pair(method, symmetric)(th, c)
    # Upstream (1, 1) is not in the range of (∂F/∂x)ᵀ = diag(1, 0): no w solves the
    # adjoint system; the finite answer GMRES used to return, (1, 0), was wrong.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImplicitFunctionError, match="singular.*sample 1|sample 1.*singular"):
            torch.autograd.grad(x.sum(), th)
    # The nonsingular samples alone: dx/dθ = I.
    keep = [0, 2]
    th_ok = theta[keep].clone().requires_grad_()
    (g,) = torch.autograd.grad(_cubic_pair(method, symmetric)(th_ok, c[keep]).sum(), th_ok)
    assert torch.allclose(g, torch.ones_like(g), rtol=1e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("symmetric", [False, True], ids=["gmres", "minres"])
def test_iterative_consistent_singular_system_gives_the_exact_derivative(symmetric):
    """The iterative criterion is the adjoint equation itself: where (∂F/∂x)ᵀ w = ∇x ℓ
    is solvable although ∂F/∂x is singular, −(∂F/∂θ)ᵀ w = (dx/dθ)ᵀ ∇x ℓ exactly.
    The dense method keeps the IFT's stricter condition and refuses."""
    theta = torch.randn(2, 2, dtype=DT, generator=_gen(21))
    c = torch.zeros(2, dtype=DT)
    upstream = torch.tensor([[1.5, 0.0], [-2.0, 0.0]], dtype=DT)  # in range(diag(1, 0))
    th = theta.clone().requires_grad_()
    x = _cubic_pair("iterative", symmetric)(th, c)
    (g,) = torch.autograd.grad(x, th, upstream)
    assert torch.equal(g, upstream)  # dx/dθ = I
    x = _cubic_pair("dense")(th, c)
    with pytest.raises(ImplicitFunctionError, match="singular at sample 0"):
        torch.autograd.grad(x, th, upstream)


def _scaled_linear(row_decades, col_decades, dtype, singular=False):
    """F = S A T x − S θ (x = T⁻¹ A⁻¹ θ): the equations scaled by S, the unknowns by T,
    spread over ±decades; A is well conditioned (or rank deficient)."""
    n, B = 6, 3
    g = _gen(22)
    A = torch.eye(n, dtype=DT) + 0.3 * torch.randn(n, n, dtype=DT, generator=g)
    if singular:
        A[-1] = A[0] + A[1]
    S = torch.logspace(-row_decades, row_decades, n, dtype=DT)
    T = torch.logspace(-col_decades, col_decades, n, dtype=DT)
    K = S[:, None] * A * T[None, :]
    theta = torch.randn(B, n, dtype=DT, generator=g)
    weights = torch.randn(B, n, dtype=DT, generator=g)
    reference = None if singular else (weights / T) @ torch.linalg.inv(A)  # ∇θ Σ w·x
    K_, S_ = K.to(dtype), S.to(dtype)
    # The forward is any solver; LU may meet an exact zero pivot on the singular K
    # (it depends on the rounding of the scaled rows), a least-squares solve never does.
    forward = torch.linalg.solve if not singular else (
        lambda M, rhs: torch.linalg.lstsq(M, rhs).solution)

    def layer(method="dense"):
        return implicit(lambda th: forward(K_, (S_ * th).T).T,
                        lambda x, th: x @ K_.T - S_ * th, method=method, residual_tol=None)

    return layer, theta.to(dtype), weights.to(dtype), reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("rows", "cols"), [(0, 0), (14, 0), (0, 14), (14, 14), (5, 9)])
def test_dense_singularity_test_is_invariant_to_scaling(rows, cols, dtype):
    layer, theta, weights, reference = _scaled_linear(rows, cols, dtype)
    th = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad((weights * layer()(th)).sum(), th)
    assert float(reference.abs().max()) > 0.1
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(g.double(), reference) <= tol
    # The same scalings of a singular A are still refused.
    layer, theta, weights, _ = _scaled_linear(rows, cols, dtype, singular=True)
    th = theta.clone().requires_grad_()
    with pytest.raises(ImplicitFunctionError, match="singular at sample 0"):
        torch.autograd.grad((weights * layer()(th)).sum(), th)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", ["dense", "iterative"])
def test_one_equation_scaled_by_1e_minus_14_keeps_the_identity_derivative(method, dtype):
    def residual(x, th):
        return torch.stack([x[:, 0] - th[:, 0], 1e-14 * (x[:, 1] - th[:, 1])], -1)

    th = torch.randn(2, 2, dtype=dtype, generator=_gen(23)).requires_grad_()
    weights = torch.tensor([[2.0, -3.0], [0.5, 4.0]], dtype=dtype)
    x = implicit(lambda t: t.clone(), residual, method=method)(th)
    (g,) = torch.autograd.grad((weights * x).sum(), th)
    assert torch.allclose(g, weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("rows", "cols"), [(0, 0), (6, 0), (14, 0), (0, 14)])
def test_iterative_on_badly_scaled_systems_is_exact_or_refused(rows, cols):
    """Unpreconditioned GMRES is not scale-invariant: it either reaches tol or refuses."""
    layer, theta, weights, reference = _scaled_linear(rows, cols, DT)
    th = theta.clone().requires_grad_()
    try:
        (g,) = torch.autograd.grad((weights * layer("iterative")(th)).sum(), th)
    except ImplicitFunctionError as error:
        assert (rows, cols) != (0, 0)
        assert "failed at sample" in str(error)
    else:
        assert rel_err(g, reference) <= 1e-8


@pytest.mark.parametrize(("method", "symmetric"), METHODS, ids=METHOD_IDS)
def test_nan_upstream_gradient_stays_in_its_sample(method, symmetric):
    theta = torch.tensor([0.3, -0.5, 0.7], dtype=DT, requires_grad=True)
    x = _circle(1.0, method=method, symmetric=symmetric)(theta)
    upstream = torch.tensor([1.0, float("nan"), -2.0], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = torch.autograd.grad(x, theta, upstream)
    assert bool(torch.isnan(g[1]))
    ok = [0, 2]
    expected = upstream[ok] * -theta.detach()[ok] / x.detach()[ok]
    assert torch.allclose(g[ok], expected, rtol=1e-12)


def test_dense_non_finite_jacobian_is_refused_naming_the_sample():
    theta = torch.tensor([0.3, -0.5], dtype=DT, requires_grad=True)
    x_off = torch.tensor([0.5, float("inf")], dtype=DT)
    x = implicit(lambda th: x_off.clone(), _circle_residual, residual_tol=None)(theta)
    with pytest.raises(ImplicitFunctionError, match="sample 1 .*non-finite"):
        torch.autograd.grad(x.sum(), theta)


# ----------------------------------------------------------------------------
# 5b. Second and third derivatives (create_graph=True)
# ----------------------------------------------------------------------------
#
# The backward is made of differentiable pieces (an implicit solve whose own backward
# is another implicit solve, plus −∇[aᵀ (∂F/∂x) b]), so Hessians are exact. References:
# closed forms, autograd through torch.softmax, and gradgradcheck (finite differences
# of the first derivative) in float64.


def _sqrt_layer(method, symmetric):
    """x = √(a t) through F = x² − a t: t batched (B,), a a shared scalar."""
    return implicit(lambda t, a: torch.sqrt(a * t), lambda x, t, a: x ** 2 - a * t,
                    method=method, symmetric=symmetric)


def _sqrt_loss_hessian(t, a):
    """Closed-form Hessian of ℓ = Σ sin(3x) + Σ t x² (= Σ sin 3√(at) + a Σ t²) in (t, a)."""
    x = torch.sqrt(a * t)
    d1 = 3 * torch.cos(3 * x) / (2 * x)  # φ'(u), φ(u) = sin 3√u, u = a t
    d2 = -9 * torch.sin(3 * x) / (4 * x ** 2) - 3 * torch.cos(3 * x) / (4 * x ** 3)
    H_tt = torch.diag(a ** 2 * d2 + 2 * a)
    H_ta = d1 + a * t * d2 + 2 * t
    H_aa = (t ** 2 * d2).sum()
    return H_tt, H_ta, H_aa


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("method", "symmetric"), METHODS, ids=METHOD_IDS)
def test_hessian_through_sqrt_matches_closed_form(method, symmetric, dtype, B):
    t = torch.linspace(0.6, 2.4, B, dtype=dtype) if B > 1 else torch.tensor([1.3], dtype=dtype)
    a = torch.tensor(0.8, dtype=dtype)
    layer = _sqrt_layer(method, symmetric)

    def loss(t, a):
        x = layer(t, a)
        return torch.sin(3 * x).sum() + (t * x ** 2).sum()

    (H_tt, H_ta), (_, H_aa) = torch.autograd.functional.hessian(loss, (t, a))
    R_tt, R_ta, R_aa = _sqrt_loss_hessian(t.double(), a.double())
    assert float(R_tt.abs().max()) > 0.5 and float(R_ta.abs().max()) > 0.5
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    assert rel_err(H_tt.double(), R_tt) <= tol
    assert rel_err(H_ta.double(), R_ta) <= tol
    assert rel_err(H_aa.double(), R_aa) <= tol


@pytest.mark.parametrize(("method", "symmetric"), METHODS, ids=METHOD_IDS)
def test_create_graph_gradient_is_differentiable_not_refused_or_dropped(method, symmetric):
    """The pattern of a gradient penalty: ∇θ ℓ with create_graph, then its gradient."""
    t = torch.tensor([0.7, 2.0], dtype=DT, requires_grad=True)
    a = torch.tensor(1.0, dtype=DT)
    x = _sqrt_layer(method, symmetric)(t, a)
    (g,) = torch.autograd.grad((x ** 3).sum(), t, create_graph=True)
    assert g.requires_grad
    (h,) = torch.autograd.grad(g.sum(), t)
    # ℓ = Σ t^{3/2}: ℓ'' = (3/4) t^{-1/2}.
    assert torch.allclose(h, 0.75 * t.detach() ** -0.5, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", ["dense", "iterative"])
def test_softmax_kkt_hessian_matches_autograd_through_softmax(method, dtype):
    B, n = 3, 4
    theta = 1.5 * torch.randn(B, n, dtype=dtype, generator=_gen(24))
    c = torch.randn(B, n, dtype=dtype, generator=_gen(25))
    layer = implicit(_softmax_solve("zu"), _softmax_residual("zu", n), method=method)
    H = torch.autograd.functional.hessian(lambda th: (c * layer(th)[:, :n] ** 2).sum(), theta)
    R = torch.autograd.functional.hessian(lambda th: (c * torch.softmax(th, -1) ** 2).sum(),
                                          theta)
    assert float(R.abs().max()) > 0.05
    assert _max_abs(H, R) <= (5e-5 if dtype == torch.float32 else 1e-10)


def _contraction_residual(x, theta, a, C):
    return x - theta - a * torch.tanh(x @ C.T) - 0.1 * x ** 3 / (1 + x ** 2)


def _contraction_solve(theta, a, C):
    """x = θ + a tanh(Cx) + 0.1 x³/(1 + x²), a contraction here: plain iteration."""
    x = theta.clone()
    for _ in range(300):
        x = theta + a * torch.tanh(x @ C.T) + 0.1 * x ** 3 / (1 + x ** 2)
    return x


@pytest.mark.parametrize("method", ["dense", "iterative"])
def test_gradgradcheck_nonlinear_system_batched_and_shared_parameters(method):
    theta = torch.randn(3, 2, dtype=DT, generator=_gen(26)).requires_grad_()  # batched
    a = torch.tensor(0.8, dtype=DT, requires_grad=True)  # shared scalar
    C = torch.tensor([[0.3, -0.5], [0.4, 0.2]], dtype=DT, requires_grad=True)  # shared
    layer = implicit(_contraction_solve, _contraction_residual, method=method)
    assert torch.autograd.gradcheck(layer, (theta, a, C))
    assert torch.autograd.gradgradcheck(layer, (theta, a, C))

    def gradient(theta, a, C):  # third order: gradgradcheck of the gradient itself
        x = layer(theta, a, C)
        return torch.autograd.grad((x ** 2).sum(), theta, create_graph=True)[0]

    assert torch.autograd.gradgradcheck(gradient, (theta, a, C))


# ----------------------------------------------------------------------------
# 6. The QP engine's three backward modes
# ----------------------------------------------------------------------------


def _qp_weights(data, seed):
    B, n, p, m = data[1].shape[0], data[1].shape[1], data[3].shape[-1], data[5].shape[-1]
    g = _gen(seed)
    return [torch.randn(B, k, dtype=DT, generator=g) for k in (n, p, m)]


def _qp_grads(data, weights, **options):
    """∇ of Σ weights·(z, λ, ν) in all six inputs, and the solve's QPResult."""
    inputs = [t.clone().requires_grad_() for t in data]
    outs, result = solve_qp(*inputs, batch=data[1].shape[0], settings=QPSettings(**options))
    loss = sum((w * o).sum() for w, o in zip(weights, outs))
    return torch.autograd.grad(loss, inputs), result


def _close(got, ref, tol) -> bool:
    """max |got − ref| ≤ tol · max(1, max |ref|) for every pair."""
    return all(_max_abs(a, b) <= tol * max(1.0, float(b.abs().max()))
               for a, b in zip(got, ref))


QP_FD_DIRECTIONS = 6


@pytest.mark.parametrize("kkt", KKTS)
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_qp_backward_modes_agree_and_match_central_differences(kkt, shared):
    data = random_qp(0, shared=shared)
    weights = _qp_weights(data, 0)
    with warnings.catch_warnings():
        # Only the torch float()-on-a-graph warning of the unrolled reduced path (a bug
        # recorded below) may appear.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        implicit_g, res = _qp_grads(data, weights, kkt=kkt, backward="implicit")
        iterative_g, _ = _qp_grads(data, weights, kkt=kkt, backward="iterative")
        unroll_g, _ = _qp_grads(data, weights, kkt=kkt, backward="unroll")
    assert all(s.value == "optimal" for s in res.status)
    assert _close(iterative_g, implicit_g, 1e-8)
    assert _close(unroll_g, implicit_g, 1e-6)
    # Central differences by re-solving (tight tolerance), along random directions in
    # all six inputs at once: ⟨∇, v⟩ against d/dt Σ w·(z, λ, ν)(data + t v).
    fd_settings = QPSettings(kkt=kkt, eps=1e-12)
    g = _gen(10)
    for _ in range(QP_FD_DIRECTIONS):
        v = [torch.randn(t.shape, dtype=DT, generator=g) for t in data]
        fd = directional_difference(
            lambda *d: solve_qp(*d, batch=data[1].shape[0], settings=fd_settings)[0],
            data, v, weights, eps=1e-5)
        for grads in (implicit_g, iterative_g, unroll_g):
            got = sum(float((a * b).sum()) for a, b in zip(grads, v))
            assert abs(got - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), (got, float(fd))


@pytest.mark.parametrize("kkt", KKTS)
@pytest.mark.parametrize("K", [30, 60])
def test_qp_fixed_iterations_unroll_is_finite_and_matches_implicit(kkt, K):
    data = random_qp(1)
    weights = _qp_weights(data, 1)
    reference, _ = _qp_grads(data, weights, kkt=kkt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        unroll_g, res = _qp_grads(data, weights, kkt=kkt, backward="unroll",
                                  fixed_iterations=True, max_iter=K)
    implicit_g, _ = _qp_grads(data, weights, kkt=kkt, fixed_iterations=True, max_iter=K)
    assert res.iterations.tolist() == [K] * 3
    assert all(bool(torch.isfinite(g).all()) for g in unroll_g)
    assert _close(unroll_g, implicit_g, 1e-6)
    assert _close(implicit_g, reference, 1e-8)


@pytest.mark.parametrize("kkt", KKTS)
def test_qp_iterative_backward_warns_when_stopped_early(kkt):
    data = random_qp(2)
    weights = _qp_weights(data, 2)
    with pytest.warns(UserWarning, match="MINRES stopped after"):
        capped, _ = _qp_grads(data, weights, kkt=kkt, backward="iterative",
                              iterative_max_iter=2)
    full, _ = _qp_grads(data, weights, kkt=kkt, backward="iterative")
    assert not _close(capped, full, 1e-3)  # the warning is about a real error


# Three constraints active at orthonormal rows u₀, u₁, u₂ of a rotation U, Q = I, with
# multipliers spread over four decades: z* = 0.7 u₃ and dz*/dq = −u₃u₃ᵀ (projection onto
# the face). The reduced matrix I + GᵀW⁻¹G at the final iterate has condition ~1e20, so
# whether its Cholesky needs the diagonal shift depends on rounding: a batch of eight
# rotations makes the failure certain (it shows in 4 to 8 of them).
SPREAD_BATCH = 8


def _spread_multiplier_qps():
    rotations = [torch.linalg.qr(torch.randn(4, 4, dtype=DT, generator=_gen(s)))[0]
                 for s in range(SPREAD_BATCH)]
    U = torch.stack(rotations)
    G = U[:, :3]
    lam = torch.tensor([1.0, 1e2, 1e4], dtype=DT)
    q = -(0.7 * U[:, 3] + G.mT @ lam)
    B = SPREAD_BATCH
    data = [torch.eye(4, dtype=DT), q, G, torch.zeros(B, 3, dtype=DT),
            torch.zeros(0, 4, dtype=DT), torch.zeros(B, 0, dtype=DT)]
    u3 = U[:, 3]
    return data, -u3.unsqueeze(-1) * u3.unsqueeze(-2)


def _spread_errors(**options):
    """Per sample: max |∇_q ⟨w, z⟩ − wᵀ dz*/dq| for a random w, and the statuses."""
    data, jacobian = _spread_multiplier_qps()
    w = torch.randn(SPREAD_BATCH, 4, dtype=DT, generator=_gen(7))
    inputs = [t.clone() for t in data]
    inputs[1].requires_grad_()
    (z, _, _), result = solve_qp(*inputs, batch=SPREAD_BATCH, settings=QPSettings(**options))
    (g,) = torch.autograd.grad((w * z).sum(), inputs[1])
    reference = torch.einsum("bi,bij->bj", w, jacobian)
    return (g - reference).abs().amax(-1), [s.value for s in result.status]


@pytest.mark.parametrize(("kkt", "backward"), [
    ("schur", "implicit"),
    ("schur", "iterative"),
    ("reduced", "iterative"),
    ("reduced", "implicit"),
])
def test_qp_backward_with_multipliers_spread_over_decades(kkt, backward):
    errors, status = _spread_errors(kkt=kkt, backward=backward)
    assert status == ["optimal"] * SPREAD_BATCH
    assert float(errors.max()) <= 1e-8, errors


@pytest.mark.parametrize("kkt", [
    "schur",
    "reduced",
])
@pytest.mark.parametrize("K", [30, 60])
def test_qp_fixed_iterations_unroll_stays_finite_with_spread_multipliers(kkt, K):
    errors, _ = _spread_errors(kkt=kkt, backward="unroll", fixed_iterations=True, max_iter=K)
    assert bool(torch.isfinite(errors).all()), errors
    assert float(errors.max()) <= 1e-6, errors


def test_qp_unroll_reduced_emits_no_warning():
    data = random_qp(3)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch's warning is once per process otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _qp_grads(data, _qp_weights(data, 3), kkt="reduced", backward="unroll")
    finally:
        torch.set_warn_always(warn_always)


def test_qp_iterative_float32_matches_implicit():
    data = [t.float() for t in random_qp(0)]
    weights = [w.float() for w in _qp_weights(data, 0)]
    reference, _ = _qp_grads(data, weights, kkt="schur")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="iterative backward: MINRES stopped")
        got, _ = _qp_grads(data, weights, kkt="schur", backward="iterative")
    assert _close(got, reference, 1e-4)


def test_qp_iterative_float32_default_settings_do_not_warn():
    data = [t.float() for t in random_qp(0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _qp_grads(data, [w.float() for w in _qp_weights(data, 0)], kkt="schur",
                  backward="iterative")


# ----------------------------------------------------------------------------
# 7. Memory saved for backward against the iteration count K
# ----------------------------------------------------------------------------

MEMORY_STEPS = (10, 20, 40)


def _assert_linear_growth(sizes):
    b10, b20, b40 = sizes
    assert b10 > 0 and b20 > b10
    assert 1.9 <= (b40 - b20) / (b20 - b10) <= 2.1, sizes  # equal cost per iteration


@pytest.mark.parametrize("kkt", KKTS)
def test_qp_saved_memory_grows_with_k_for_unroll_only(kkt):
    data = random_qp(0, n=6, p=8, m=2, B=4)
    sizes = {}
    for mode in ("implicit", "iterative", "unroll"):
        row = []
        for K in MEMORY_STEPS:
            s = QPSettings(backward=mode, kkt=kkt, fixed_iterations=True, max_iter=K)
            inputs = [t.clone().requires_grad_() for t in data]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Converting a tensor with")
                saved, (outs, result) = _saved_bytes(
                    lambda s=s, inputs=inputs: solve_qp(*inputs, batch=4, settings=s))
            # What QPSolve keeps on ctx (the final factorization, W) is outside the
            # hooks' view: count it beside them.
            row.append((saved, _tensor_bytes(result.factor)))
        sizes[mode] = row
    _assert_linear_growth([saved for saved, _ in sizes["unroll"]])
    for mode in ("implicit", "iterative"):
        assert len(set(sizes[mode])) == 1, (mode, sizes[mode])
        # Only (z, λ, ν): B·(n + p + m) float64 numbers.
        assert sizes[mode][0][0] == 4 * (6 + 8 + 2) * 8
    assert sizes["unroll"][0][0] > 100 * sizes["implicit"][0][0]


def test_gradient_descent_saved_memory_grows_with_k_for_unroll_only():
    n, B = 16, 8
    M, _, _ = _gd_problem()
    M = torch.block_diag(*[M] * 3)[:n, :n] + torch.eye(n, dtype=DT)
    theta0 = torch.randn(B, n, dtype=DT, generator=_gen(6))
    unrolled, implicit_sizes = [], []
    for K in MEMORY_STEPS:
        theta, Mp = theta0.clone().requires_grad_(), M.clone().requires_grad_()
        unrolled.append(_saved_bytes(functools.partial(_descend(K), theta, Mp))[0])
        layer = implicit(_descend(K), _gd_grad_f, method="iterative", symmetric=True,
                         residual_tol=None)
        implicit_sizes.append(_saved_bytes(functools.partial(layer, theta, Mp))[0])
    _assert_linear_growth(unrolled)
    # Each unrolled step saves its iterate (B·n) for the product with M: at least that.
    assert (unrolled[2] - unrolled[1]) >= 20 * B * n * 8
    # Implicit saves x*, θ and M, whatever K.
    assert implicit_sizes == [(2 * B * n + n * n) * 8] * 3
