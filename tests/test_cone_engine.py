"""The batched conic interior point (`declarative.backends.cone`): solutions against
Clarabel, gradients against central differences, statuses, dtypes and batches.

Problems come from CVXPY through `declarative.canon` (the conic form's
parameter-affine data, made dense per sample by `ProgramData`), so the engine
sees exactly what a layer route will give it.
"""

from __future__ import annotations

import warnings

import clarabel
import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from declarative.backends.cone import ConeSettings, ConeSpec, solve_cone
from declarative.backends.cone.data import ProgramData
from declarative.backends.status import Status
from declarative.canon import compile_problem
from helpers import CLARABEL_TIGHT, central_differences, rel_err

# Tiny problems: intra-op threads only add overhead (and spin-waits on a loaded machine).
pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------
# Problems and references
# ---------------------------------------------------------------------------


class Compiled:
    """A CVXPY problem's conic form: θ from parameter values, dense data, outputs."""

    def __init__(self, problem, params, variables, gp=False):
        self.problem, self.params, self.variables, self.gp = problem, params, variables, gp
        form = compile_problem(problem, params, variables, gp=gp).form("conic")
        self.program = form.program
        self.data = ProgramData(form.program)
        self.R = torch.tensor(form.outputs[0].matrix.toarray())

    def theta(self, values, dtype=torch.float64):
        """θ (B, len θ) from per-sample values [(B, *shape) per parameter]."""
        flat = [torch.as_tensor(v, dtype=dtype).reshape(v.shape[0], -1) for v in values]
        logs = [f.log() for f in flat] if self.gp else []
        B = flat[0].shape[0]
        return torch.cat(flat + logs + [torch.ones(B, 1, dtype=dtype)], 1)

    def solve(self, values, dtype=torch.float64, settings=None):
        """(user variable (B, size), (x, y, s), result) for per-sample values (tensors)."""
        A, b, c = self.data(self.theta(values, dtype))
        (x, y, s), res = solve_cone(A, b, c, self.program.cone_dict, settings)
        out = x @ self.R.T.to(x.dtype)
        if self.gp:
            out = out.exp()
        return out, (x, y, s), res


def clarabel_reference(comp: Compiled, values):
    """The requested variable by CVXPY + Clarabel (tight), per sample."""
    out = []
    for i in range(values[0].shape[0]):
        for p, v in zip(comp.params, values):
            p.value = np.asarray(v[i], dtype=np.float64)
        with warnings.catch_warnings():  # "may be inaccurate": see the SOCP test
            warnings.simplefilter("ignore")
            comp.problem.solve(solver=cp.CLARABEL, gp=comp.gp, **CLARABEL_TIGHT)
        assert comp.problem.status in ("optimal", "optimal_inaccurate"), comp.problem.status
        out.append(np.asarray(comp.variables[0].value, dtype=np.float64).ravel())
    return np.stack(out)


def kkt_violation(A, b, c, cone_dict, x, y, s) -> float:
    """Largest scaled violation of the optimality conditions of one sample, in numpy
    (an independent check): Ax + s = b, Aᵀy + c = 0, s ∈ K, y ∈ K*, sᵀy = 0 per cone."""
    A, b, c, x, y, s = (np.asarray(t, dtype=np.float64) for t in (A, b, c, x, y, s))
    scale = 1 + max(np.abs(A).max(), np.abs(b).max(), np.abs(c).max())
    worst = [np.abs(A @ x + s - b).max(), np.abs(A.T @ y + c).max()]
    z, row = int(cone_dict.get("z", 0)), 0
    worst.append(np.abs(s[:z]).max() if z else 0.0)
    row = z
    lp = int(cone_dict.get("l", 0))
    worst += [max(0.0, -s[row:row + lp].min(initial=0)),
              max(0.0, -y[row:row + lp].min(initial=0)),
              np.abs(s[row:row + lp] * y[row:row + lp]).max(initial=0)]
    row += lp
    for q in cone_dict.get("q", []):
        sq, yq = s[row:row + q], y[row:row + q]
        # The Jordan product s∘y = (sᵀy, s₀y₁ + y₀s₁), not only sᵀy: a small sᵀy
        # still lets s₁ and −y₁ be √(sᵀy) apart in angle, and x with them.
        jordan = np.concatenate([[sq @ yq], sq[0] * yq[1:] + yq[0] * sq[1:]])
        worst += [max(0.0, np.linalg.norm(sq[1:]) - sq[0]),
                  max(0.0, np.linalg.norm(yq[1:]) - yq[0]), np.abs(jordan).max()]
        row += q
    return float(max(worst) / scale)


def clarabel_cone(A, b, c, cone_dict):
    """Clarabel on the cone program itself (status string, x, y, s)."""
    cones = []
    if cone_dict.get("z", 0):
        cones.append(clarabel.ZeroConeT(int(cone_dict["z"])))
    if cone_dict.get("l", 0):
        cones.append(clarabel.NonnegativeConeT(int(cone_dict["l"])))
    cones += [clarabel.SecondOrderConeT(int(q)) for q in cone_dict.get("q", [])]
    cones += [clarabel.ExponentialConeT() for _ in range(int(cone_dict.get("ep", 0)))]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    for key, val in CLARABEL_TIGHT.items():
        setattr(settings, key, val)
    n = A.shape[1]
    sol = clarabel.DefaultSolver(sp.csc_matrix((n, n)), np.asarray(c, dtype=np.float64),
                                 sp.csc_matrix(np.asarray(A, dtype=np.float64)),
                                 np.asarray(b, dtype=np.float64), cones, settings).solve()
    return str(sol.status), np.array(sol.x), np.array(sol.z), np.array(sol.s)


def lp_problem(n=6, m=8):
    """min qᵀx s.t. Gx ≤ h, ‖x‖∞ ≤ 1; parameters G, h, q."""
    x = cp.Variable(n)
    G, h, q = cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(q @ x), [G @ x <= h, cp.abs(x) <= 1])
    return Compiled(problem, [G, h, q], [x])


def lp_values(rng, B, n=6, m=8):
    G = rng.standard_normal((B, m, n))
    x0 = rng.uniform(-0.5, 0.5, (B, n))
    h = np.einsum("bmn,bn->bm", G, x0) + rng.uniform(0.1, 1.0, (B, m))
    return [torch.tensor(v) for v in (G, h, rng.standard_normal((B, n)))]


def socp_problem(n=5, m=7):
    """Regularized regression in a ball: min ‖Fx − g‖₂ + 0.3‖x‖₁ s.t. ‖x‖₂ ≤ 1, x ≥ −0.2."""
    x = cp.Variable(n)
    F, g = cp.Parameter((m, n)), cp.Parameter(m)
    objective = cp.norm(F @ x - g, 2) + 0.3 * cp.norm(x, 1)
    problem = cp.Problem(cp.Minimize(objective), [cp.norm(x, 2) <= 1.0, x >= -0.2])
    return Compiled(problem, [F, g], [x])


def socp_values(rng, B, n=5, m=7):
    F = rng.standard_normal((B, m, n))
    g = np.einsum("bmn,bn->bm", F, rng.uniform(-0.6, 0.6, (B, n))) + 0.3 * rng.standard_normal(
        (B, m))
    return [torch.tensor(F), torch.tensor(g)]


def portfolio_problem(n=6):
    """max μᵀw − ‖Lᵀw‖₂ s.t. 1ᵀw = 1, w ≥ 0 (zero, orthant and second-order cones)."""
    w = cp.Variable(n)
    mu, L = cp.Parameter(n), cp.Parameter((n, n))
    problem = cp.Problem(cp.Maximize(mu @ w - cp.norm(L.T @ w, 2)), [cp.sum(w) == 1, w >= 0])
    return Compiled(problem, [mu, L], [w])


def portfolio_values(rng, B, n=6):
    return [torch.tensor(rng.uniform(0.5, 1.5, (B, n))),
            torch.tensor(0.5 * rng.standard_normal((B, n, n)))]


def sample(A, i):
    return A if A.dim() == 2 else A[i]


# ---------------------------------------------------------------------------
# Solutions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("B", [1, 7])
def test_lp_matches_clarabel(B):
    rng = np.random.default_rng(B)
    comp = lp_problem()
    values = lp_values(rng, B)
    out, _, res = comp.solve(values)
    assert res.status == [Status.OPTIMAL] * B
    ref = clarabel_reference(comp, [v.numpy() for v in values])
    assert np.abs(ref).max() > 0.1  # a non-trivial reference
    for i in range(B):
        assert rel_err(out[i], ref[i]) <= 1e-8


@pytest.mark.parametrize("make, values", [(socp_problem, socp_values),
                                          (portfolio_problem, portfolio_values)])
def test_socp_exact_optimality(make, values):
    """Second-order cone programs: our point satisfies every optimality condition to
    rounding (the polish makes s∘y = 0 exactly), and agrees with Clarabel to
    Clarabel's own accuracy. Clarabel at 1e-10 stops with sᵀy ≈ 1e-10 but s₁, −y₁
    up to ~1e-5 apart in angle, so its x is only that close (its Jordan-product
    violation below shows it); the KKT check is the reference that decides."""
    rng = np.random.default_rng(3)
    comp, B = make(), 6
    vals = values(rng, B)
    out, (x, y, s), res = comp.solve(vals)
    assert res.status == [Status.OPTIMAL] * B
    A, b, c = comp.data(comp.theta(vals))
    ref = clarabel_reference(comp, [v.numpy() for v in vals])
    for i in range(B):
        ours = kkt_violation(sample(A, i), b[i], c[i], comp.program.cone_dict, x[i], y[i], s[i])
        assert ours <= 1e-13
        assert rel_err(out[i], ref[i]) <= 1e-4


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------

PROBLEMS = {"lp": (lp_problem, lp_values), "socp": (socp_problem, socp_values),
            "portfolio": (portfolio_problem, portfolio_values)}


def _grad_check(comp, values, rng, tol=1e-6, h=1e-6):
    """Autograd through θ -> data -> solve against central differences of re-solves."""
    inputs = [v.clone().requires_grad_(True) for v in values]
    out, _, res = comp.solve(inputs)
    assert all(s == Status.OPTIMAL for s in res.status)
    weight = torch.tensor(rng.standard_normal(out.shape))
    grads = torch.autograd.grad((weight * out).sum(), inputs)

    def fn(*vals):
        with torch.no_grad():
            return [comp.solve(list(vals))[0]]

    fd = central_differences(fn, [v.detach() for v in values], [weight], eps=h)
    g_all = torch.cat([g.flatten() for g in grads])
    f_all = torch.cat([f.flatten() for f in fd])
    assert float(f_all.abs().max()) > 1e-2  # the derivative is not trivially zero
    assert rel_err(g_all, f_all) <= tol


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gradients_match_central_differences(name):
    rng = np.random.default_rng(11)
    make, values = PROBLEMS[name]
    _grad_check(make(), values(rng, 2), rng)


@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_raw_engine(shared):
    """torch's gradcheck on (A, b, c) directly (every entry of A, the structural zeros
    too), A per sample or shared by the batch; zero, orthant and second-order cones.
    The problem determines every variable (an auxiliary that the solution leaves free
    would have no derivative)."""
    rng = np.random.default_rng(5)
    x = cp.Variable(3)
    F, g = cp.Parameter((4, 3)), cp.Parameter(4)
    problem = cp.Problem(cp.Minimize(cp.norm(F @ x - g, 2)), [x >= -0.2, cp.sum(x) == 0.3])
    comp = Compiled(problem, [F, g], [x])
    A, b, c = comp.data(comp.theta(socp_values(rng, 2, n=3, m=4)))
    if shared:
        A = A[0]
    cd = comp.program.cone_dict
    assert cd["z"] and cd["l"] and cd["q"]
    A, b, c = (t.detach().clone().requires_grad_(True) for t in (A, b, c))

    def f(A, b, c):
        return solve_cone(A, b, c, cd)[0]

    assert torch.autograd.gradcheck(f, (A, b, c), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradients_against_the_conic_route():
    """The same gradient through a different route: CvxpyLayer(backend="conic")
    (diffcp's derivative at Clarabel's solution), to that route's accuracy."""
    from declarative.torch import CvxpyLayer

    rng = np.random.default_rng(8)
    comp = portfolio_problem()
    values = portfolio_values(rng, 3)
    layer = CvxpyLayer(comp.problem, comp.params, comp.variables, backend="conic")
    weight = torch.tensor(rng.standard_normal((3, 6)))
    a = [v.clone().requires_grad_(True) for v in values]
    b = [v.clone().requires_grad_(True) for v in values]
    (w_ref,) = layer(*a, solver_args={"solve_method": "Clarabel", **CLARABEL_TIGHT})
    (weight * w_ref).sum().backward()
    out, _, _ = comp.solve(b)
    (weight * out).sum().backward()
    assert rel_err(out.detach(), w_ref.detach()) <= 1e-4
    for ga, gb in zip(a, b):
        assert float(ga.grad.abs().max()) > 1e-2
        assert rel_err(gb.grad, ga.grad) <= 1e-3


# ---------------------------------------------------------------------------
# Statuses and certificates
# ---------------------------------------------------------------------------


def test_infeasible_samples_get_a_certificate():
    rng = np.random.default_rng(2)
    comp = lp_problem()
    G, h, q = lp_values(rng, 4)
    h = h.clone()
    h[1, 0] = -100.0  # G₀x ≤ −100 with ‖x‖∞ ≤ 1: no point fits
    h[3, 2] = -100.0
    _, (x, y, s), res = comp.solve([G, h, q])
    assert res.status == [Status.OPTIMAL, Status.INFEASIBLE, Status.OPTIMAL, Status.INFEASIBLE]
    A, b, c = comp.data(comp.theta([G, h, q]))
    for i in (1, 3):
        assert torch.isnan(x[i]).all() and torch.isnan(s[i]).all()
        assert float((b[i] * y[i]).sum()) == pytest.approx(-1.0)  # bᵀy = −1
        assert float((sample(A, i).T @ y[i]).abs().max()) <= 1e-7  # Aᵀy = 0
        assert float(y[i].min()) >= -1e-9  # y ∈ K* (all orthant rows here)
    assert torch.isfinite(x[0]).all() and torch.isfinite(x[2]).all()


def test_unbounded_samples_get_a_ray():
    """min cᵀx s.t. x ≥ 0, x₁ + x₂ ≤ 1 + x₃: bounded for c ≥ 0; with c = (−1, 0, ½)
    the ray x = (1, 0, 1)·t gives cᵀx = −t/2: unbounded."""
    A = torch.tensor([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0], [1.0, 1.0, -1.0]],
                     dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.0, 0.5], [1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    (x, y, s), res = solve_cone(A, b, c, {"l": 4})
    assert res.status == [Status.OPTIMAL, Status.UNBOUNDED, Status.OPTIMAL]
    ray = x[1]
    assert float(c[1] @ ray) == pytest.approx(-1.0)
    assert float((A @ ray + s[1]).abs().max()) <= 1e-7  # Ax + s = 0
    assert float(s[1].min()) >= -1e-9
    assert torch.isnan(y[1]).all()
    assert torch.allclose(x[0], torch.zeros(3, dtype=torch.float64), atol=1e-9)


# ---------------------------------------------------------------------------
# Dtypes, batches, scaling, warm starts, errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lp", "portfolio"])
def test_float32_matches_float64(name):
    """float32 inputs: float32 outputs (computed in float64 inside), equal to the
    float64 solve up to the inputs' rounding; gradients likewise."""
    rng = np.random.default_rng(4)
    make, values = PROBLEMS[name]
    comp = make()
    v64 = values(rng, 3)
    v32 = [v.float().requires_grad_(True) for v in v64]
    v64 = [v.float().double().requires_grad_(True) for v in v64]  # the same numbers
    out32, _, res = comp.solve(v32, dtype=torch.float32)
    out64, _, _ = comp.solve(v64)
    assert out32.dtype == torch.float32 and res.status == [Status.OPTIMAL] * 3
    assert rel_err(out32.detach(), out64.detach()) <= 1e-6
    weight = torch.tensor(rng.standard_normal(out64.shape))
    (weight.float() * out32).sum().backward()
    (weight * out64).sum().backward()
    for a, b in zip(v32, v64):
        assert a.grad.dtype == torch.float32
        assert rel_err(a.grad, b.grad) <= 1e-4


def test_batch_256_matches_one_at_a_time_and_clarabel():
    """A sample's answer does not depend on its batch-mates (per-sample scaling,
    statuses, active sets); spot checks against Clarabel."""
    rng = np.random.default_rng(6)
    comp = socp_problem()
    values = socp_values(rng, 256)
    out, _, res = comp.solve(values)
    assert res.status == [Status.OPTIMAL] * 256
    for i in (0, 17, 255):
        single, _, _ = comp.solve([v[i:i + 1] for v in values])
        assert rel_err(out[i], single[0]) <= 1e-10
    ref = clarabel_reference(comp, [v[:8].numpy() for v in values])
    for i in range(8):
        assert rel_err(out[i], ref[i]) <= 1e-4


def test_badly_scaled_data():
    """Rows of G and h multiplied by 1e4 and 1e-3, the cost by 1e5: the same problem,
    the same solution (equilibration), and gradients that scale accordingly."""
    rng = np.random.default_rng(9)
    comp = lp_problem()
    G, h, q = lp_values(rng, 2)
    rows = torch.tensor([1e4, 1e-3] * 4, dtype=torch.float64).unsqueeze(-1)
    out, _, res = comp.solve([G, h, q])
    scaled, _, res2 = comp.solve([G * rows, h * rows.squeeze(-1), q * 1e5])
    assert res2.status == [Status.OPTIMAL] * 2
    assert rel_err(scaled, out) <= 1e-9


def test_warm_start_reaches_the_same_point():
    rng = np.random.default_rng(10)
    comp = socp_problem()
    values = socp_values(rng, 4)
    A, b, c = comp.data(comp.theta(values))
    cd = comp.program.cone_dict
    (x, y, s), res = solve_cone(A, b, c, cd)
    nudged = [values[0] * 1.01, values[1]]
    A2, b2, c2 = comp.data(comp.theta(nudged))
    (xc, _, _), cold = solve_cone(A2, b2, c2, cd)
    (xw, _, _), warm = solve_cone(A2, b2, c2, cd, warm=res.warm_start())
    assert warm.status == [Status.OPTIMAL] * 4
    assert rel_err(xw @ comp.R.T, xc @ comp.R.T) <= 1e-9
    assert int(warm.iterations.sum()) <= int(cold.iterations.sum())


def test_bad_input_is_refused_with_a_clear_error():
    A = torch.zeros(3, 2, dtype=torch.float64)
    b, c = torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="PSD"):
        solve_cone(A, b, c, {"l": 0, "s": [2]})
    with pytest.raises(ValueError, match="the cones have 2 rows"):
        solve_cone(A, b, c, {"l": 2})
    with pytest.raises(ValueError, match="batch sizes disagree"):
        solve_cone(torch.zeros(2, 3, 2, dtype=torch.float64), torch.zeros(4, 3,
                   dtype=torch.float64), c, {"l": 3})
    with pytest.raises(ValueError, match="b has 2 entries"):
        solve_cone(A, b[:2], c, {"l": 3})
    assert ConeSpec.from_dict({"z": 1, "l": 2, "q": [3], "ep": 1, "s": [], "p": []}).m == 9
    with pytest.raises(ValueError, match="step_fraction"):
        ConeSettings(step_fraction=1.5)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    rng = np.random.default_rng(12)
    comp = portfolio_problem()
    values = portfolio_values(rng, 5)
    out, _, _ = comp.solve(values)
    A, b, c = comp.data(comp.theta(values))
    (x, y, s), res = solve_cone(A.cuda(), b.cuda(), c.cuda(), comp.program.cone_dict)
    assert x.device.type == "cuda" and res.status == [Status.OPTIMAL] * 5
    assert rel_err((x @ comp.R.T.cuda()).cpu(), out) <= 1e-9


# ---------------------------------------------------------------------------
# Exponential cones
# ---------------------------------------------------------------------------


def logistic_problem(N=12, n=3):
    """ℓ₂-regularized logistic regression: min (1/N) Σ log(1 + exp(−yᵢ aᵢᵀθ)) + 0.1‖θ‖²."""
    theta, a = cp.Variable(n), cp.Parameter((N, n))
    labels = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    loss = cp.sum(cp.logistic(-cp.multiply(labels, a @ theta))) / N
    problem = cp.Problem(cp.Minimize(loss + 0.1 * cp.sum_squares(theta)))
    return Compiled(problem, [a], [theta])


def logistic_values(rng, B, N=12, n=3):
    labels = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    return [torch.tensor(rng.standard_normal((B, N, n)) + 0.5 * labels[None, :, None])]


def maxent_problem(n=6, k=2):
    """Maximum entropy with moment bounds: max Σ entr(p) s.t. 1ᵀp = 1, l ≤ Fp ≤ u."""
    p, F, lo, hi = cp.Variable(n), cp.Parameter((k, n)), cp.Parameter(k), cp.Parameter(k)
    problem = cp.Problem(cp.Maximize(cp.sum(cp.entr(p))), [cp.sum(p) == 1, F @ p >= lo,
                                                            F @ p <= hi])
    return Compiled(problem, [F, lo, hi], [p])


def maxent_values(rng, B, n=6, k=2):
    F = rng.standard_normal((B, k, n))
    m0 = np.einsum("bkn,bn->bk", F, rng.dirichlet(np.ones(n), B))
    return [torch.tensor(F), torch.tensor(m0 - rng.uniform(0.05, 0.2, (B, k))),
            torch.tensor(m0 + rng.uniform(0.05, 0.2, (B, k)))]


def gp_problem():
    """A geometric program (gp=True), a box of largest volume: max xyz s.t.
    2(xy + xz + yz) ≤ a, x ≤ b·y, y ≤ b·x, z ≤ 3x."""
    x, y, z = cp.Variable(pos=True), cp.Variable(pos=True), cp.Variable(pos=True)
    a, b = cp.Parameter(pos=True), cp.Parameter(pos=True)
    problem = cp.Problem(cp.Maximize(x * y * z), [2 * (x * y + x * z + y * z) <= a,
                                                   x <= b * y, y <= b * x, z <= 3 * x])
    return Compiled(problem, [a, b], [x], gp=True)


def gp_values(rng, B):
    return [torch.tensor(rng.uniform(8.0, 12.0, (B,))), torch.tensor(rng.uniform(1.5, 3.0, (B,)))]


EXP_PROBLEMS = {"logistic": (logistic_problem, logistic_values),
                "maxent": (maxent_problem, maxent_values), "gp": (gp_problem, gp_values)}


def newton_logistic(a, lam=0.1):
    """The logistic regression's optimum by Newton's method on its smooth objective
    (an independent, exact reference)."""
    N, n = a.shape
    labels = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    theta = np.zeros(n)
    for _ in range(60):
        p = 1 / (1 + np.exp(labels * (a @ theta)))
        grad = a.T @ (-labels * p) / N + 2 * lam * theta
        hess = (a.T * (p * (1 - p))) @ a / N + 2 * lam * np.eye(n)
        theta = theta - np.linalg.solve(hess, grad)
    return theta


@pytest.mark.parametrize("B", [1, 5])
def test_logistic_regression_is_exact(B):
    """Exponential cones: the solution equals Newton's method on the smooth objective
    to 1e-8 (the normal-map polish; the interior point alone, like Clarabel at
    1e-10, stops ~1e-6 away: sᵀz small leaves the cones' pairs misaligned)."""
    rng = np.random.default_rng(13)
    comp = logistic_problem()
    assert comp.program.cone_dict["ep"] > 0
    vals = logistic_values(rng, B)
    out, _, res = comp.solve(vals)
    assert res.status == [Status.OPTIMAL] * B
    for i in range(B):
        exact = newton_logistic(vals[0][i].numpy())
        assert np.abs(exact).max() > 0.05
        assert rel_err(out[i], exact) <= 1e-8


@pytest.mark.parametrize("name", list(EXP_PROBLEMS))
def test_exponential_cones_match_clarabel(name):
    """Maximum entropy, logistic regression and a geometric program (gp=True)
    against Clarabel, to Clarabel's accuracy on exponential cones (see above)."""
    rng = np.random.default_rng(13)
    make, values = EXP_PROBLEMS[name]
    comp = make()
    assert comp.program.cone_dict["ep"] > 0
    vals = values(rng, 4)
    out, _, res = comp.solve(vals)
    assert res.status == [Status.OPTIMAL] * 4
    ref = clarabel_reference(comp, [v.numpy() for v in vals])
    for i in range(4):
        assert rel_err(out[i], ref[i]) <= 2e-5


@pytest.mark.parametrize("name", list(EXP_PROBLEMS))
def test_exponential_cone_gradients(name):
    rng = np.random.default_rng(14)
    make, values = EXP_PROBLEMS[name]
    _grad_check(make(), values(rng, 2), rng)


def test_exponential_cones_float32():
    rng = np.random.default_rng(15)
    comp = maxent_problem()
    v64 = maxent_values(rng, 3)
    v32 = [v.float() for v in v64]
    out32, _, res = comp.solve(v32, dtype=torch.float32)
    out64, _, _ = comp.solve([v.double() for v in v32])
    assert out32.dtype == torch.float32 and res.status == [Status.OPTIMAL] * 3
    assert rel_err(out32, out64) <= 1e-6
