"""CvxpyLayer's errors: the right type, and a message that names the argument.

Messages keep the phrases cvxpylayers users search for (``must exactly match
problem.parameters``, ``Inconsistent batch sizes``, ...); every test checks the
exception type and that the message names the offending argument.
"""

import pickle

import cvxpy as cp
import diffcp
import numpy as np
import pytest
import torch
from cvxpy.utilities import scopes
from declarative.canon import compile_problem
from helpers import CLARABEL_ARGS, SCS_TIGHT, as_tensor, conic_layer, reference_solve

import declarative
from declarative import (
    CvxpyLayer,
    NonconvexError,
    NotDPPError,
    ParameterTypeError,
    ProblemError,
    QPFunction,
    Status,
)

DT = torch.float64



@pytest.fixture
def simple():
    """min ||x - alpha||² + beta·Σx  s.t. x >= -1, with named parameters."""
    x = cp.Variable(3, name="x")
    alpha = cp.Parameter(3, name="alpha")
    beta = cp.Parameter(nonneg=True, name="beta")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - alpha) + beta * cp.sum(x)), [x >= -1])
    layer = conic_layer(prob, [alpha, beta], [x])
    return layer, prob, (alpha, beta), x


# ----------------------------------------------------------------------------
# Problem and argument lists (construction)
# ----------------------------------------------------------------------------


def test_parameter_list_mismatch_names_missing_and_extra():
    x = cp.Variable(2)
    a = cp.Parameter(2, name="aa")
    b = cp.Parameter(2, name="bb")
    stray = cp.Parameter(2, name="stray")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + b @ x))
    with pytest.raises(ProblemError, match="must exactly match problem.parameters") as err:
        conic_layer(prob, [a, stray], [x])
    msg = str(err.value)
    assert "missing 'bb'" in msg and "'stray'" in msg and "'aa'" not in msg
    assert isinstance(err.value, ValueError)  # as cvxpylayers raised
    with pytest.raises(ProblemError, match="missing 'bb'"):
        conic_layer(prob, [a], [x])


def test_variable_not_in_problem_is_named():
    x = cp.Variable(2, name="x")
    ghost = cp.Variable(2, name="ghost")
    a = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)))
    with pytest.raises(ProblemError, match="must be a subset of problem.variables") as err:
        conic_layer(prob, [a], [x, ghost])
    assert "variables[1] ('ghost')" in str(err.value)


def test_non_variable_output_and_non_list_arguments_are_refused(simple):
    _, prob, (alpha, beta), x = simple
    with pytest.raises(ProblemError, match=r"variables\[0\] must be a cvxpy.Variable") as err:
        conic_layer(prob, [alpha, beta], [x + 1])
    assert "AddExpression" in str(err.value)
    with pytest.raises(ProblemError, match="parameters must be provided as a list"):
        conic_layer(prob, alpha, [x])
    with pytest.raises(ProblemError, match="variables must be provided as a list"):
        conic_layer(prob, [alpha, beta], x)
    with pytest.raises(TypeError, match="problem must be a cvxpy.Problem"):
        conic_layer("not a problem", [alpha, beta], [x])


def test_duplicate_parameter_is_named(simple):
    _, prob, (alpha, beta), x = simple
    with pytest.raises(ProblemError, match="twice") as err:
        conic_layer(prob, [alpha, beta, alpha], [x])
    assert "alpha" in str(err.value)


def test_not_dpp_constraint_names_the_constraint_and_expression():
    x = cp.Variable(2)
    a = cp.Parameter(nonneg=True, name="aa")
    b = cp.Parameter(nonneg=True, name="bb")
    prob = cp.Problem(cp.Minimize(cp.sum(x)), [x >= 0, (a * b) * x <= 1])
    with pytest.raises(NotDPPError, match="must be DPP") as err:
        conic_layer(prob, [a, b], [x])
    msg = str(err.value)
    assert "Constraint 1" in msg and "`aa * bb`" in msg
    assert not isinstance(err.value, NonconvexError)


def test_not_dpp_objective_names_the_objective():
    x = cp.Variable(3)
    a = cp.Parameter(name="alpha")
    prob = cp.Problem(cp.Minimize(cp.exp(a) * cp.sum(x)), [x >= 1])  # a inside exp
    with pytest.raises(NotDPPError, match="must be DPP") as err:
        conic_layer(prob, [a], [x])
    msg = str(err.value)
    assert "objective" in msg and "exp(alpha)" in msg
    assert not isinstance(err.value, NonconvexError)


def test_non_dcp_is_nonconvex_not_not_dpp():
    x = cp.Variable(2)
    p = cp.Parameter(2, name="pp")
    prob = cp.Problem(cp.Maximize(cp.sum_squares(x - p)), [x <= 1])
    with pytest.raises(NonconvexError, match="nonconvex") as err:
        conic_layer(prob, [p], [x])
    assert not isinstance(err.value, NotDPPError)
    assert "not DPP" not in str(err.value) and "objective" in str(err.value)

    # Nonconvex in a constraint, with a parameter product as well: nonconvexity wins.
    a = cp.Parameter(nonneg=True)
    b = cp.Parameter(nonneg=True)
    prob2 = cp.Problem(cp.Minimize(cp.sum(x)), [cp.sum_squares(x) >= a * b, x <= 1])
    with pytest.raises(NonconvexError, match="Constraint 0"):
        conic_layer(prob2, [a, b], [x])


def _complex_cases():
    x, p = cp.Variable(2, name="x"), cp.Parameter(2, name="p")
    xc = cp.Variable(2, complex=True, name="xc")
    pi = cp.Parameter(2, imag=True, name="pi")
    H = cp.Parameter((2, 2), hermitian=True, name="H")
    X = cp.Variable((2, 2), symmetric=True)
    return [
        (cp.Problem(cp.Minimize(cp.sum_squares(xc - p))), [p], [xc], "Variable 'xc'"),
        (cp.Problem(cp.Minimize(cp.norm(x - cp.real(pi), 2))), [pi], [x], "Parameter 'pi'"),
        (cp.Problem(cp.Minimize(cp.real(cp.trace(H @ X))), [X >> 0, cp.trace(X) == 1]), [H],
         [X], "Parameter 'H'"),
        (cp.Problem(cp.Minimize(cp.sum_squares(cp.real(1j * x) - p) + cp.sum_squares(x))), [p],
         [x], "complex constant"),
    ]


@pytest.mark.parametrize("case", range(4))
def test_complex_problems_are_refused_at_construction_naming_the_leaf(case):
    prob, params, outs, named = _complex_cases()[case]
    for kw in ({}, {"backend": "conic"}):
        with pytest.raises(ProblemError, match="real-valued problems only") as err:
            CvxpyLayer(prob, params, outs, **kw)
        assert named in str(err.value)


@pytest.mark.parametrize("kind", ["integer", "boolean"])
def test_mixed_integer_problems_are_refused_at_construction(kind):
    z = cp.Variable(2, name="z", **{kind: True})
    p = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - p)))
    for kw in ({}, {"backend": "conic"}):
        with pytest.raises(ProblemError, match=rf"Variable 'z' is declared {kind}=True.*"
                                               "mixed-integer"):
            CvxpyLayer(prob, [p], [z], **kw)


def test_non_dgp_with_gp_true_is_nonconvex():
    x = cp.Variable(pos=True)
    y = cp.Variable(pos=True)
    a = cp.Parameter(pos=True)
    prob = cp.Problem(cp.Minimize(x - y), [x * y >= a])  # a difference is not DGP
    with pytest.raises(NonconvexError, match="not DGP"):
        conic_layer(prob, [a], [x], gp=True)


# ----------------------------------------------------------------------------
# Call arguments
# ----------------------------------------------------------------------------


def test_wrong_number_of_tensors(simple):
    layer, *_ = simple
    with pytest.raises(ValueError,
                       match="A tensor must be provided for each CVXPY parameter") as err:
        layer(as_tensor(np.zeros(3)))
    assert "received 1 tensors, expected 2" in str(err.value)
    assert "'alpha'" in str(err.value) and "'beta'" in str(err.value)


@pytest.mark.parametrize("bad", [np.zeros(3), [0.0, 0.0, 0.0], None, 1.0],
                         ids=["numpy", "list", "None", "float"])
def test_non_tensor_argument_is_parameter_type_error(simple, bad):
    layer, *_ = simple
    with pytest.raises(ParameterTypeError, match="must be a torch.Tensor") as err:
        layer(bad, as_tensor(1.0))
    assert isinstance(err.value, TypeError) and isinstance(err.value, AttributeError)
    assert "parameter 0 ('alpha')" in str(err.value)
    with pytest.raises(AttributeError, match=r"parameter 1 \('beta'\)"):  # cvxpylayers' type
        layer(as_tensor(np.zeros(3)), bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float16,
                                   torch.complex64])
def test_non_float_dtype_is_refused_naming_the_parameter(simple, dtype):
    layer, *_ = simple
    with pytest.raises(TypeError, match=r"parameter 1 \('beta'\)") as err:
        layer(as_tensor(np.zeros(3)), torch.ones((), dtype=dtype))
    assert str(dtype) in str(err.value)


def test_invalid_parameter_shape(simple):
    layer, *_ = simple
    with pytest.raises(ValueError, match="Invalid parameter shape") as err:
        layer(as_tensor(np.zeros(4)), as_tensor(1.0))
    assert "parameter 0 ('alpha')" in str(err.value) and "(4,)" in str(err.value)
    with pytest.raises(ValueError, match=r"Invalid parameter shape for parameter 0 \('alpha'\)"):
        layer(as_tensor(np.zeros((2, 4))), as_tensor(1.0))


def test_invalid_parameter_dimensionality(simple):
    layer, *_ = simple
    with pytest.raises(ValueError, match="Invalid parameter dimensionality") as err:
        layer(as_tensor(np.zeros((2, 2, 3))), as_tensor(1.0))
    assert "parameter 0 ('alpha')" in str(err.value)
    with pytest.raises(ValueError, match=r"Invalid parameter dimensionality for parameter 1 "
                                         r"\('beta'\)"):
        layer(as_tensor(np.zeros(3)), as_tensor(np.ones((2, 2))))


def test_inconsistent_batch_sizes(simple):
    layer, *_ = simple
    with pytest.raises(ValueError, match="Inconsistent batch sizes") as err:
        layer(as_tensor(np.zeros((2, 3))), as_tensor(np.ones(3)))
    msg = str(err.value)
    assert "parameter 0 ('alpha'): 2" in msg and "parameter 1 ('beta'): 3" in msg


def test_empty_batch_is_refused(simple):
    layer, *_ = simple
    with pytest.raises(ValueError, match="batch size 0"):
        layer(as_tensor(np.zeros((0, 3))), as_tensor(1.0))


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_parameter_names_parameter_and_batch_index(simple, kind):
    layer, *_ = simple
    a = np.zeros((3, 3))
    a[2, 1] = float(kind)
    with pytest.raises(ValueError, match=r"parameter 0 \('alpha'\) contains") as err:
        layer(as_tensor(a), as_tensor(1.0))
    assert "batch index 2" in str(err.value)
    assert ("NaN" if kind == "nan" else "inf") in str(err.value)
    with pytest.raises(ValueError, match=r"parameter 1 \('beta'\) contains NaN"):
        layer(as_tensor(np.zeros(3)), as_tensor(float("nan")))


def _sign_problem(factor: bool):
    """min (y − 1)² + a·|y| (convex only for a ≥ 0) or (y − a)² + |y| (any a)."""
    y = cp.Variable(name="y")
    a = cp.Parameter(nonneg=True, name="a")
    obj = cp.square(y - 1) + a * cp.abs(y) if factor else cp.square(y - a) + cp.abs(y)
    return cp.Problem(cp.Minimize(obj)), a, y


def _solo(prob, param, value, y):
    """CVXPY + Clarabel with an attribute-free copy of ``param`` (any sign accepted)."""
    free = cp.Parameter(param.shape)
    sub = cp.Problem(cp.Minimize(cp.square(y - free) + cp.abs(y)))
    return reference_solve(sub, [free], [value], [y])[0]


@pytest.mark.parametrize("backend", ["qp", "conic"])
def test_sign_attribute_is_checked_only_where_convexity_relies_on_it(backend):
    kw = {"backend": backend, "solver_args": SCS_TIGHT} if backend == "conic" else {}
    prob, a, y = _sign_problem(factor=True)
    layer = CvxpyLayer(prob, [a], [y], **kw)
    assert layer.compiled.layout.slots[0].checks == ("nonneg",)
    with pytest.raises(ValueError, match=r"parameter 0 \('a'\) was declared nonneg=True.*"
                                         r"convex only with that sign.*batch index 1"):
        layer(as_tensor([0.5, -5.0, 1.0]))
    (y0,) = layer(as_tensor(0.0))  # the boundary value is fine: (y − 1)² → y = 1
    assert abs(float(y0) - 1.0) < 1e-6
    # Here the sign of a plays no part in convexity: a negative value is solved as given.
    prob, a, y = _sign_problem(factor=False)
    layer = CvxpyLayer(prob, [a], [y], **kw)
    assert layer.compiled.layout.slots[0].checks == ()
    (ys,) = layer(as_tensor([-3.0, 2.0]))
    ref = [_solo(prob, a, v, y) for v in (-3.0, 2.0)]
    assert abs(float(ys[0]) + 2.5) < 1e-6 and abs(float(ys[1]) - 1.5) < 1e-6  # shrinkage
    assert np.allclose(ys.numpy(), ref, atol=1e-6)


def test_pos_parameter_at_zero_is_accepted_where_only_its_sign_matters():
    """A regularisation sweep starting at λ = 0 on a pos=True λ (cvxpylayers solves it)."""
    x = cp.Variable(3)
    lam = cp.Parameter(pos=True, name="lam")
    c = cp.Parameter(3, name="c")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - c) + lam * cp.norm1(x)))
    for backend in ("qp", "conic"):
        kw = {"solver_args": SCS_TIGHT} if backend == "conic" else {}
        layer = CvxpyLayer(prob, [lam, c], [x], backend=backend, **kw)
        assert layer.compiled.layout.slots[0].checks == ("nonneg",)  # the weak sign only
        cv = as_tensor([0.5, -2.0, 0.1])
        (x0,) = layer(as_tensor(0.0), cv)
        assert (x0 - cv).abs().max() < 1e-6
        with pytest.raises(ValueError, match=r"'lam'\) was declared pos=True"):
            layer(as_tensor(-0.1), cv)


def test_sign_checks_are_decided_per_parameter():
    """(a + b)·‖x‖₁ needs both signs; a·‖x‖₁ + b·Σx only a's; c none."""
    x = cp.Variable(2)
    a, b = cp.Parameter(nonneg=True, name="a"), cp.Parameter(nonneg=True, name="b")
    c = cp.Parameter(2, nonpos=True)
    fit = cp.sum_squares(x - c)
    both = cp.Problem(cp.Minimize(fit + (a + b) * cp.norm1(x)))
    one = cp.Problem(cp.Minimize(fit + a * cp.norm1(x) + b * cp.sum(x)))
    checks = [[s.checks for s in compile_problem(p, [a, b, c], [x]).layout.slots]
              for p in (both, one)]
    assert checks == [[("nonneg",), ("nonneg",), ()], [("nonneg",), (), ()]]


def _quad_form_layer(backend="auto"):
    P = cp.Parameter((2, 2), PSD=True, name="P")
    q = cp.Parameter(2, name="q")
    x = cp.Variable(2, name="x")
    with scopes.quad_form_dpp_scope():
        obj = 0.5 * cp.quad_form(x, P) + q @ x
    prob = cp.Problem(cp.Minimize(obj), [x >= -1, x <= 1])
    return CvxpyLayer(prob, [P, q], [x], backend=backend)


def test_psd_parameter_is_checked_where_quad_form_needs_it_up_to_round_off():
    layer = _quad_form_layer()
    assert layer.backend == "qp" and layer.compiled.layout.slots[0].checks == ("psd",)
    q = as_tensor([1.0, -1.0])
    indefinite = as_tensor([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match=r"'P'\) was declared PSD=True.*negative eigenvalue at "
                                         r"batch index 1"):
        layer(torch.stack([torch.eye(2, dtype=DT), indefinite]), q)
    # A Gram matrix with a round-off negative eigenvalue passes, in both precisions.
    v = np.array([[0.6, 0.8]])
    for dtype, eps in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        gram = torch.tensor(v.T @ v - eps * np.eye(2), dtype=dtype)
        assert float(torch.linalg.eigvalsh(gram.double()).min()) < 0
        (x,) = layer(gram, q.to(dtype))
        assert torch.isfinite(x).all()


def test_psd_value_is_free_where_the_problem_does_not_rely_on_it():
    """trace(P X) over a spectraplex is convex for any symmetric P: no eigenvalue check."""
    P = cp.Parameter((2, 2), PSD=True, name="P")
    X = cp.Variable((2, 2), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.trace(P @ X)), [X >> 0, cp.trace(X) == 1])
    layer = conic_layer(prob, [P], [X], solver_args=SCS_TIGHT)
    assert layer.compiled.layout.slots[0].checks == ()
    (Xs,) = layer(as_tensor([[1.0, 2.0], [2.0, 1.0]]))  # eigenvalues 3, −1
    # The minimiser is the eigenvector of the smallest eigenvalue: (1, −1)/√2.
    assert (Xs - as_tensor([[0.5, -0.5], [-0.5, 0.5]])).abs().max() < 1e-5


def test_symmetric_parameter_reads_its_upper_triangle_and_passes_gradcheck():
    """cvxpylayers' semantics: P stands for triu(P) + triu(P, 1)ᵀ; gradcheck perturbs one
    entry at a time, which a refusal of non-symmetric values would break."""
    c = np.array([1.0, 2.0])
    P = cp.Parameter((2, 2), symmetric=True, name="P")
    x = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - P @ c)), [x <= 20])
    for layer in (CvxpyLayer(prob, [P], [x]), conic_layer(prob, [P], [x], solver_args=SCS_TIGHT)):
        value = as_tensor([[1.0, 5.0], [0.0, 1.0]], grad=True)
        (xs,) = layer(value)
        assert (xs - as_tensor([11.0, 7.0])).abs().max() < 1e-6  # [[1, 5], [5, 1]] @ c
        (g,) = torch.autograd.grad(xs.sum(), value)
        # Σ (P̃c)_i: d/dP_ii = c_i, d/dP_01 = c_1 + c_0 (both positions), lower entry 0.
        assert (g - as_tensor([[1.0, 3.0], [0.0, 2.0]])).abs().max() < 1e-6
        sym = as_tensor([[1.0, 0.5], [0.5, 2.0]], grad=True)
        assert torch.autograd.gradcheck(lambda p, f=layer: f(p)[0], (sym,), atol=1e-5,
                                        rtol=1e-4)


def test_symmetric_parameter_agrees_with_cvxpylayers():
    peer = pytest.importorskip("cvxpylayers.torch")
    X = cp.Variable((2, 2), symmetric=True)
    C = cp.Parameter((2, 2), symmetric=True)
    con = X >> 0
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X)), [con, cp.trace(X) == 1])
    value = as_tensor([[1.0, 0.5], [-3.0, 2.0]], grad=True)  # far from symmetric
    ours = conic_layer(prob, [C], [X, con.dual_variables[0]], solver_args=SCS_TIGHT)
    theirs = peer.CvxpyLayer(prob, parameters=[C], variables=[X, con.dual_variables[0]])
    out, ref = ours(value), theirs(value, solver_args={"eps": 1e-10})
    w = [torch.randn(2, 2, dtype=DT, generator=torch.Generator().manual_seed(k))
         for k in range(2)]
    (g,) = torch.autograd.grad(sum((a * b).sum() for a, b in zip(w, out)), value)
    (g_ref,) = torch.autograd.grad(sum((a * b).sum() for a, b in zip(w, ref)), value)
    for a, b in zip(out, ref):
        assert (a - b).abs().max() < 1e-5
    assert g_ref.abs().max() > 1e-2 and (g - g_ref).abs().max() < 1e-4


def test_diag_parameter_with_off_diagonal_entries_is_refused():
    D = cp.Parameter((2, 2), diag=True, name="D")
    x = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - D @ np.array([1.0, 2.0]))))
    layer = CvxpyLayer(prob, [D], [x])
    good = torch.diag(as_tensor([1.0, 3.0]))
    (xs,) = layer(good)
    assert (xs - as_tensor([1.0, 6.0])).abs().max() < 1e-8
    with pytest.raises(ValueError, match=r"'D'\) was declared diag=True.*off-diagonal "
                                         r"entries at batch index 1, which would be dropped"):
        layer(torch.stack([good, as_tensor([[1.0, 5.0], [0.0, 1.0]])]))


def test_gp_coefficient_must_be_strictly_positive():
    x, y = cp.Variable(pos=True), cp.Variable(pos=True)
    a = cp.Parameter(pos=True, name="a")
    prob = cp.Problem(cp.Minimize(x + y), [x * y >= a])
    layer = conic_layer(prob, [a], [x], gp=True, solver_args=SCS_TIGHT)
    assert layer.compiled.layout.slots[0].checks == ("pos",)
    (xs,) = layer(as_tensor(4.0))
    assert abs(float(xs) - 2.0) < 1e-4  # x = y = √a
    with pytest.raises(ValueError, match=r"'a'\) enters the geometric program through its log.*"
                                         r"≤ 0 at batch index 1"):
        layer(as_tensor([4.0, 0.0]))
    # An exponent sits in power's data, out of reach of the attribute-free rewrite:
    # its declared sign stays checked rather than silently assumed unneeded.
    e = cp.Parameter(pos=True, name="e")
    prob = cp.Problem(cp.Minimize(cp.power(x, e) * a + y), [x * y >= 2])
    slots = compile_problem(prob, [e, a], [x], gp=True).layout.slots
    assert [s.checks for s in slots] == [("nonneg",), ("pos",)]


# ----------------------------------------------------------------------------
# Solver arguments
# ----------------------------------------------------------------------------


def test_unknown_solver_args_key_lists_accepted_keys(simple):
    layer, prob, params, x = simple
    with pytest.raises(ValueError, match="unknown key 'epsilon'") as err:
        conic_layer(prob, list(params), [x], solver_args={"epsilon": 1e-3})
    assert "Accepted keys" in str(err.value) and "'eps'" in str(err.value)
    # At call time too, and per solve method (an SCS key is not a Clarabel key).
    with pytest.raises(ValueError, match="unknown key 'epsilon'"):
        layer(as_tensor(np.zeros(3)), as_tensor(1.0), solver_args={"epsilon": 1e-3})
    with pytest.raises(ValueError, match="unknown key 'eps' for solve_method 'Clarabel'") as err:
        conic_layer(prob, list(params), [x], solver="CLARABEL", solver_args={"eps": 1e-3})
    assert "'tol_gap_abs'" in str(err.value)


@pytest.mark.parametrize("args", [{"max_iters": 1.5}, {"max_iters": True}, {"eps": "tight"},
                                  {"verbose": 1}, {"mode": 3}],
                         ids=["float_for_int", "bool_for_int", "str_for_float", "int_for_bool",
                              "int_for_str"])
def test_wrongly_typed_solver_args_value_is_refused(simple, args):
    layer, prob, params, x = simple
    (key,) = args
    with pytest.raises(TypeError, match=rf"solver_args\['{key}'\] must be"):
        conic_layer(prob, list(params), [x], solver_args=args)
    with pytest.raises(TypeError, match=rf"solver_args\['{key}'\] must be"):
        layer(as_tensor(np.zeros(3)), as_tensor(1.0), solver_args=args)


def test_other_bad_options_are_refused(simple):
    layer, prob, params, x = simple
    with pytest.raises(TypeError, match="solver_args must be a dict"):
        conic_layer(prob, list(params), [x], solver_args=[("eps", 1e-3)])
    with pytest.raises(TypeError, match="solver_args must be a dict"):
        layer(as_tensor(np.zeros(3)), as_tensor(1.0), solver_args="eps")
    with pytest.raises(ValueError, match="solver must be one of .* got 'GUROBI'"):
        conic_layer(prob, list(params), [x], solver="GUROBI")
    with pytest.raises(ValueError, match=r"solver_args\['mode'\] must be one of"):
        conic_layer(prob, list(params), [x], solver_args={"mode": "fast"})
    with pytest.raises(ValueError, match="warm_starts"):
        conic_layer(prob, list(params), [x], solver_args={"warm_starts": []})
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'mask', got 'ignore'"):
        conic_layer(prob, list(params), [x], on_failure="ignore")
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'mask', got 'ignore'"):
        layer(as_tensor(np.zeros(3)), as_tensor(1.0), on_failure="ignore")


def test_numpy_scalar_solver_args_are_accepted(simple):
    layer, prob, params, x = simple
    for args in ({"max_iters": np.int64(1000)}, {"eps": np.float32(1e-6)}):
        conic_layer(prob, list(params), [x], solver_args=args)
        layer(as_tensor(np.zeros(3)), as_tensor(1.0), solver_args=args)


def test_unknown_solve_method_names_solve_method(simple):
    _, prob, params, x = simple
    with pytest.raises(ValueError, match="GUROBI"):
        conic_layer(prob, list(params), [x], solver_args={"solve_method": "GUROBI"})


def test_non_string_solve_method_is_type_error(simple):
    _, prob, params, x = simple
    with pytest.raises(TypeError, match=r"solver_args\['solve_method'\]"):
        conic_layer(prob, list(params), [x], solver_args={"solve_method": 3})


def test_solver_that_cannot_handle_the_cones_fails_at_construction():
    P = cp.Parameter((2, 2))
    X = cp.Variable((2, 2), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - P)), [X >> 0])
    with pytest.raises(ValueError, match="ECOS"):
        conic_layer(prob, [P], [X], solver="ECOS")


def _quad_form_only_qp():
    P = cp.Parameter((2, 2), PSD=True)
    q = cp.Parameter(2)
    x = cp.Variable(2)
    with scopes.quad_form_dpp_scope():
        obj = cp.quad_form(x, P) + q @ x
    return cp.Problem(cp.Minimize(obj), [x >= -1]), [P, q], [x]


def test_a_solver_the_problem_cannot_use_is_an_error_that_says_why():
    prob, params, outs = _quad_form_only_qp()
    with pytest.raises(ValueError, match=r"solver='SCS' names a conic solver.*quad_form.*"
                                         r"only the QP path"):
        CvxpyLayer(prob, params, outs, solver="SCS")
    with pytest.raises(ValueError, match=r"solver_args\['solve_method'\]='ECOS'.*quad_form"):
        CvxpyLayer(prob, params, outs, solver_args={"solve_method": "ECOS"})
    layer = CvxpyLayer(prob, params, outs)
    values = (torch.eye(2, dtype=DT), as_tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"solve_method'\]='SCS' asks for a conic solver.*"
                                         r"quad_form"):
        layer(*values, solver_args={"solve_method": "SCS"})


def test_a_conic_solver_with_a_forced_torch_backend_is_an_error(simple):
    _, prob, params, x = simple
    with pytest.raises(ValueError, match=r"solver='ECOS' names a conic solver, which "
                                         r"backend='qp' does not use"):
        CvxpyLayer(prob, list(params), [x], backend="qp", solver="ECOS")
    layer = CvxpyLayer(prob, list(params), [x], backend="qp")
    with pytest.raises(ValueError, match=r"built with backend='qp'"):
        layer(as_tensor(np.zeros(3)), as_tensor(1.0), solver_args={"solve_method": "SCS"})


def test_a_call_naming_a_conic_solver_runs_it(simple):
    """backend="auto" picked the QP engine; a call's solve_method runs that conic solver."""
    _, prob, params, x = simple
    layer = CvxpyLayer(prob, list(params), [x])
    assert layer.backend == "qp"
    alpha = as_tensor([[0.3, -2.0, 1.0], [1.0, 0.0, -0.5]], grad=True)
    beta = as_tensor(0.5)
    (x_qp,), info = layer(alpha, beta, return_info=True)
    assert info.backend == "qp"
    (x_cl,), info = layer(alpha, beta, return_info=True, solver_args=CLARABEL_ARGS)
    assert info.backend == "conic"
    # x = max(alpha − β/2, −1): the closed form of the fixture's problem.
    exact = torch.clamp(alpha - 0.25, min=-1.0)
    assert (x_qp - exact).abs().max() < 1e-8 and (x_cl - exact).abs().max() < 1e-5
    (g,) = torch.autograd.grad(x_cl.sum(), alpha)
    assert (g - (alpha - 0.25 > -1).to(DT)).abs().max() < 1e-4


def test_warm_start_that_does_not_fit_the_layer_names_what_differs(simple):
    _, prob, params, x = simple
    # The QP engine's interior point (a box alone is solved in closed form, no state).
    coupled = cp.Problem(prob.objective, [*prob.constraints, cp.sum(x) <= 5])
    layer = CvxpyLayer(coupled, list(params), [x], backend="qp")
    args = (as_tensor(np.zeros(3)), as_tensor(1.0))
    y, q = cp.Variable(5), cp.Parameter(5)
    other = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - q)), [y >= 0, cp.sum(y) <= 1]),
                       [q], [y], backend="qp")
    _, foreign = other(as_tensor(np.ones(5)), return_info=True)
    with pytest.raises(ValueError, match=r"warm_start does not fit this layer: warm_start\['z'\]"
                                         r" has shape \(1, 5\), this call needs \(1, 3\)"):
        layer(*args, warm_start=foreign)
    with pytest.raises(ValueError, match=r"it has keys \['lam'\], this route takes "
                                         r"\['lam', 'nu', 's', 'z'\]"):
        layer(*args, warm_start={"lam": torch.zeros(1, 3, dtype=DT)})
    _, own = layer(*args, return_info=True)
    layer(*args, warm_start=own)  # its own state fits
    with pytest.raises(ValueError, match="has shape"):
        layer(*(torch.stack([a, a]) for a in args), warm_start=own)  # batch 2 vs 1
    # The layer's own cache (warm_start=True) never raises: a misfit starts cold.
    layer(*(torch.stack([a, a]) for a in args), warm_start=True)


def test_sparse_tensor_for_a_dense_parameter_is_refused(simple):
    layer, *_ = simple
    with pytest.raises(ValueError, match=r"parameter 0 \('alpha'\) is a sparse tensor.*"
                                         r"declared dense.*to_dense"):
        layer(as_tensor([1.0, 0.0, 2.0]).to_sparse(), as_tensor(1.0))


def test_qpfunction_without_variables_is_refused():
    E = torch.Tensor()
    with pytest.raises(ValueError, match=r"Q has shape \(0, 0\): nz = 0"):
        QPFunction()(torch.zeros(0, 0, dtype=DT), torch.zeros(0, dtype=DT), E, E, E, E)


# ----------------------------------------------------------------------------
# Solver failures
# ----------------------------------------------------------------------------


def _infeasible_when_sum_p_exceeds_one():
    """min ||x||²  s.t. x >= p, Σx <= 1: infeasible exactly when Σp > 1."""
    x = cp.Variable(2)
    p = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= p, cp.sum(x) <= 1])
    return prob, p, x


SOLVERS = [
    pytest.param(dict(solver_args=SCS_TIGHT), id="SCS"),
    pytest.param(dict(solver="ECOS"), id="ECOS"),
    pytest.param(dict(solver_args=CLARABEL_ARGS), id="Clarabel"),
]


@pytest.mark.parametrize("kw", SOLVERS)
def test_infeasible_raises_solver_error_with_indices_and_statuses(kw):
    prob, p, x = _infeasible_when_sum_p_exceeds_one()
    layer = conic_layer(prob, [p], [x], **kw)
    batch = as_tensor([[0.2, -0.3], [1.0, 1.0], [0.5, 0.1], [2.0, 0.0]])
    with pytest.raises(declarative.SolverError) as err:
        layer(batch)
    e = err.value
    assert isinstance(e, diffcp.SolverError)
    assert e.indices == [1, 3]
    assert e.statuses == [Status.INFEASIBLE, Status.INFEASIBLE]
    assert "1: infeasible" in str(e) and "3: infeasible" in str(e)
    assert "0:" not in str(e) and "2:" not in str(e)
    # Unbatched: index 0.
    with pytest.raises(declarative.SolverError) as err:
        layer(as_tensor([1.0, 1.0]))
    assert err.value.indices == [0] and err.value.statuses == [Status.INFEASIBLE]


@pytest.mark.parametrize("kw", SOLVERS)
def test_unbounded_raises_solver_error(kw):
    q = cp.Parameter(name="q")
    y = cp.Variable()
    prob = cp.Problem(cp.Minimize(q * y), [y >= 0])  # unbounded below when q < 0
    layer = conic_layer(prob, [q], [y], **kw)
    with pytest.raises(declarative.SolverError) as err:
        layer(as_tensor([1.0, -1.0]))
    assert err.value.indices == [1] and err.value.statuses == [Status.UNBOUNDED]
    assert "1: unbounded" in str(err.value)


def test_mask_returns_feasible_samples_and_nan_with_zero_gradient():
    prob, p, x = _infeasible_when_sum_p_exceeds_one()
    layer = conic_layer(prob, [p], [x], solver_args=SCS_TIGHT, on_failure="mask")
    batch = as_tensor([[0.2, -0.3], [1.0, 1.0], [0.5, 0.1]], grad=True)
    (xs,), info = layer(batch, return_info=True)
    assert info.status == (Status.OPTIMAL, Status.INFEASIBLE, Status.OPTIMAL)
    assert not info.ok
    assert torch.isnan(xs[1]).all()
    w = as_tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]])
    (g,) = torch.autograd.grad(xs, batch, w)
    assert torch.equal(g[1], torch.zeros(2, dtype=DT))
    assert torch.isfinite(g).all()
    for i in (0, 2):
        pi = batch[i].detach().clone().requires_grad_(True)
        (xi,) = layer(pi)
        (gi,) = torch.autograd.grad(xi, pi, w[i])
        assert torch.allclose(xs[i], xi, atol=1e-10)
        assert torch.allclose(g[i], gi, atol=1e-8)
    # Closed form on the feasible samples: x = max(p, 0), dx/dp = [p > 0].
    assert torch.allclose(xs[[0, 2]], batch[[0, 2]].clamp(min=0), atol=1e-7)
    assert torch.allclose(g[[0, 2]], w[[0, 2]] * (batch[[0, 2]] > 0), atol=1e-6)

    # on_failure at the call overrides the layer's setting.
    with pytest.raises(declarative.SolverError):
        layer(batch, on_failure="raise")


def test_solver_error_message_lists_indices_and_statuses():
    err = declarative.SolverError([1, 3], [Status.INFEASIBLE, Status.UNBOUNDED])
    assert err.indices == [1, 3]
    assert "1: infeasible" in str(err) and "3: unbounded" in str(err)
    assert "on_failure='mask'" in str(err)


# Exceptions cross process boundaries (DataLoader workers, torch.multiprocessing).
def test_solver_error_round_trips_through_pickle():
    err = declarative.SolverError([1, 3], [Status.INFEASIBLE, Status.UNBOUNDED])
    back = pickle.loads(pickle.dumps(err))
    assert back.indices == [1, 3] and back.statuses == err.statuses
    assert str(back) == str(err)
