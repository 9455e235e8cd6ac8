"""The QP engine's per-call shortcuts give what the long way gives.

At small batches the engine's cost is its count of tensor operations, so it
takes shortcuts: a batch of one runs on 2-D matrices, the limit system skips
padding it does not need, a polish whose active sets did not move is reused,
a refinement continues instead of restarting, fixed blocks of the QP route are
built once. Each test here compares a shortcut with an independent reference
(numpy, a dense solve, the batched path, Clarabel).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from declarative.backends.qp import QPSettings, ipm, limit, solve_qp
from declarative.backends.qp import engine as qp_engine
from declarative.backends.qp.kkt import ReducedKKT, SchurKKT
from declarative.backends.qp.scaling import _fits
from helpers import reference_solve
from scipy import sparse

from declarative._maps import LinearMap, coo_arrays
from declarative.torch import CvxpyLayer

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _random_qp(B, n, p, m, seed, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g, dtype=dtype)
    Q = L @ L.mT / n + 0.1 * torch.eye(n, dtype=dtype)
    G = torch.randn(B, p, n, generator=g, dtype=dtype)
    A = torch.randn(B, m, n, generator=g, dtype=dtype)
    z0 = torch.randn(B, n, generator=g, dtype=dtype)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, p, generator=g, dtype=dtype)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    q = torch.randn(B, n, generator=g, dtype=dtype)
    return [Q, q, G, h, A, b]


def _step_reference(v, dv):
    """Largest α ≤ 1 with v + α dv ≥ 0, by brute force over the entries (numpy)."""
    v, dv = v.numpy(), dv.numpy()
    out = []
    for vi, dvi in zip(v, dv):
        neg = dvi < 0
        out.append(min(1.0, float(np.min(vi[neg] / -dvi[neg])) if neg.any() else 1.0))
    return np.array(out)


@pytest.mark.parametrize("graph", [False, True], ids=["no-graph", "graph"])
def test_step_to_boundary_matches_brute_force(graph):
    g = torch.Generator().manual_seed(3)
    s = torch.rand(5, 12, generator=g, dtype=DT) + 0.1
    lam = torch.rand(5, 12, generator=g, dtype=DT) + 0.1
    ds = torch.randn(5, 12, generator=g, dtype=DT)
    dl = torch.randn(5, 12, generator=g, dtype=DT)
    # Free rows: λ = dλ = 0 (their slack never moves); a sample with no blocking entry.
    lam[:, :2], dl[:, :2], ds[:, :2] = 0.0, 0.0, 0.0
    ds[4], dl[4] = ds[4].abs(), dl[4].abs()
    ref = np.minimum(_step_reference(s, ds), _step_reference(lam[:, 2:], dl[:, 2:]))
    assert ref[4] == 1.0 and (ref[:4] < 1.0).all()  # both cases present
    if graph:
        ds.requires_grad_(True)
        with torch.enable_grad():
            alpha = ipm._step_to_boundary(s, ds, lam, dl)
        alpha.sum().backward()
        assert torch.isfinite(ds.grad).all()  # no inf/NaN from the masked division
    else:
        alpha = ipm._step_to_boundary(s, ds, lam, dl)
    assert alpha.shape == (5, 1)
    np.testing.assert_allclose(alpha.detach().squeeze(-1).numpy(), ref, rtol=1e-15)


def test_outer_fits_is_broadcast_shapes():
    cases = [((3, 4, 5), (1, 1, 5)), ((3, 4, 5), (3, 1, 5)), ((4, 5), (3, 1, 5)),
             ((4, 5), (1, 5)), ((3, 4, 5), (2, 1, 5)), ((0, 5), (1, 5)), ((4, 0), (1, 0)),
             ((2, 4, 5), (4, 5)), ((4, 5), (1, 1, 1))]
    for shape, other in cases:
        try:
            expected = torch.broadcast_shapes(shape, other) == torch.Size(shape)
        except RuntimeError:
            expected = False
        assert _fits(torch.Size(shape), torch.Size(other)) == expected, (shape, other)


def _limit_dense_solve(kkt, active, g):
    """The limit system solved densely per sample (numpy): active rows as equalities,
    inactive ones as identity rows with zero right-hand side."""
    gz, gl, gn = (t.numpy() for t in g)
    H = kkt.Qm if kkt.name == "reduced" else None
    out = []
    for i in range(active.shape[0]):
        G = (kkt.Gm if kkt.Gm.dim() == 2 else kkt.Gm[i]).numpy()
        A = (kkt.Am if kkt.Am.dim() == 2 else kkt.Am[i]).numpy()
        n, p, m = G.shape[1], G.shape[0], A.shape[0]
        Qi = np.eye(n) if H is None else (H if H.dim() == 2 else H[i]).numpy()
        act = active[i].numpy()
        M = np.zeros((n + p + m, n + p + m))
        M[:n, :n] = Qi
        M[:n, n:n + p] = (G * act[:, None]).T
        M[n:n + p, :n] = G * act[:, None]
        M[n:n + p, n:n + p] = np.diag(~act)
        M[:n, n + p:] = A.T
        M[n + p:, :n] = A
        rhs = np.concatenate([gz[i], np.where(act, gl[i], 0.0), gn[i]])
        out.append(np.linalg.solve(M, rhs))
    return np.stack(out)


@pytest.mark.parametrize("elimination", ["schur", "reduced"])
def test_limit_system_layouts_agree_with_a_dense_solve(elimination):
    """Padded (different active counts), unpadded (equal counts) and batch-of-one
    (2-D) layouts of the limit system against a dense solve of each sample."""
    B, n, p, m = 4, 6, 8, 2
    Q, q, G, h, A, b = _random_qp(B, n, p, m, seed=11)
    data = qp_engine.prepare(Q, q, G, h, A, b, B, QPSettings())
    if elimination == "schur":
        kkt = SchurKKT(data, QPSettings(), torch.linalg.cholesky(data.Q))
    else:
        kkt = ReducedKKT(data, QPSettings())
    gen = torch.Generator().manual_seed(5)
    g = (torch.randn(B, n, generator=gen, dtype=DT), torch.randn(B, p, generator=gen, dtype=DT),
         torch.randn(B, m, generator=gen, dtype=DT))
    # At most n − m rows kept (no ties): 1, 3, 0 and 2 active rows, or 3 each.
    padded = torch.zeros(B, p, dtype=torch.bool)
    padded[0, 4], padded[1, [0, 2, 7]], padded[3, [1, 5]] = True, True, True
    equal = torch.zeros(B, p, dtype=torch.bool)
    equal[:, 2:5] = True
    for active in (padded, equal):
        system = limit.LimitSystem(kkt, active)
        assert (system.factors["valid"] is None) == (active is equal)
        (a_z, a_l, a_n), ok = system.solve_refined(*g)
        assert bool(ok.all())
        ref = _limit_dense_solve(kkt, active, g)
        got = torch.cat([a_z, a_l, a_n], -1).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-10)
        assert np.abs(ref).max() > 1e-2  # a non-trivial reference
        for i in range(B):  # each sample alone: the 2-D layout
            one = limit.LimitSystem(kkt.subset(torch.tensor([i])), active[i:i + 1])
            assert one.factors["C"].dim() == 2
            (o_z, o_l, o_n), _ = one.solve_refined(*(t[i:i + 1] for t in g))
            np.testing.assert_allclose(torch.cat([o_z, o_l, o_n], -1).numpy(), ref[i:i + 1],
                                       rtol=1e-9, atol=1e-10)


def test_refinement_continues_where_it_stopped():
    B, n, p, m = 3, 5, 7, 1
    Q, q, G, h, A, b = _random_qp(B, n, p, m, seed=2)
    data = qp_engine.prepare(Q, q, G, h, A, b, B, QPSettings())
    kkt = ReducedKKT(data, QPSettings())
    active = torch.rand(B, p, generator=torch.Generator().manual_seed(1)) < 0.5
    system = limit.LimitSystem(kkt, active)
    g = (q, h, b)
    once = system.refinement(*g)
    system.refine(once, steps=limit.REFINE_STEPS)
    twice = system.refinement(*g)
    system.refine(twice, steps=0)
    system.refine(twice, steps=limit.REFINE_STEPS)
    assert once.k == twice.k == limit.REFINE_STEPS
    for a, c in zip(once.solution(), twice.solution()):
        assert torch.equal(a, c)
    ref = _limit_dense_solve(kkt, active, g)
    np.testing.assert_allclose(torch.cat(once.solution(), -1).numpy(), ref, rtol=1e-9)


@pytest.mark.parametrize("m", [0, 3], ids=["ineq", "ineq+eq"])
@pytest.mark.parametrize("kkt", ["schur", "reduced"])
def test_batch_of_one_runs_as_in_a_batch(kkt, m):
    """Sample i solved alone (2-D matrices, 2-D factors) and inside a batch: the same
    solution, duals, status, iteration count and gradients."""
    B = 3
    data = _random_qp(B, 7, 9, m, seed=21)
    settings = QPSettings(kkt=kkt)
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(B, 7, generator=gen, dtype=DT)
    wl = torch.randn(B, 9, generator=gen, dtype=DT)

    def run(blocks, rows):
        ins = [t.clone().requires_grad_(t.numel() > 0) for t in blocks]
        (z, lam, nu), res = solve_qp(*ins, batch=ins[1].shape[0], settings=settings)
        loss = (w[rows] * z).sum() + (wl[rows] * lam).sum()
        grads = torch.autograd.grad(loss, [t for t in ins if t.requires_grad])
        return (z, lam, nu), res, grads

    (zb, lb, nb), rb, gb = run(data, slice(None))
    for i in range(B):
        (z, lam, nu), r, g1 = run([t[i:i + 1] for t in data], slice(i, i + 1))
        assert r.codes.tolist() == rb.codes[i:i + 1].tolist()
        assert r.iterations.tolist() == rb.iterations[i:i + 1].tolist()
        for a, c in zip((z, lam, nu), (zb, lb, nb)):
            torch.testing.assert_close(a, c[i:i + 1], rtol=1e-9, atol=1e-10)
        for a, c in zip(g1, gb):
            torch.testing.assert_close(a, c[i:i + 1], rtol=1e-8, atol=1e-9)
    assert zb.abs().max() > 1e-2 and gb[0].abs().max() > 1e-3


def test_a_polish_that_fails_on_a_tie_builds_one_limit_system(monkeypatch):
    """MPC with |u| ≤ 1 written through CVXPY's abs: its epigraph variables are not
    unique, the polish fails on the tie, the interior point goes on; the second
    polish and the backward reuse the first system (same active sets). The result
    still matches Clarabel."""
    rng = np.random.default_rng(0)
    nx, nu, T = 3, 1, 6
    Ad = np.eye(nx) + 0.1 * rng.standard_normal((nx, nx))
    Bd = rng.standard_normal((nx, nu))
    x0 = cp.Parameter(nx)
    X, U = cp.Variable((nx, T + 1)), cp.Variable((nu, T))
    cons = [X[:, 0] == x0] + [X[:, t + 1] == Ad @ X[:, t] + Bd @ U[:, t] for t in range(T)]
    cons += [cp.abs(U) <= 1]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X) + cp.sum_squares(U)), cons)
    layer = CvxpyLayer(prob, [x0], [U], backend="qp")  # the dense engine's polish
    built = []
    original = limit.LimitSystem.__init__

    def counting(self, *args, **kwargs):
        built.append(kwargs.get("factor", args[2] if len(args) > 2 else True))
        original(self, *args, **kwargs)

    monkeypatch.setattr(limit.LimitSystem, "__init__", counting)
    value = torch.tensor([0.5, -0.3, 0.8], dtype=DT, requires_grad=True)
    (u,), = [layer(value)]
    torch.autograd.grad(u.sum(), value)
    assert len(built) == 1
    ref = reference_solve(prob, [x0], [value.detach().numpy()], [U])[0]
    np.testing.assert_allclose(u.detach().numpy(), ref, atol=1e-6)
    assert np.abs(ref).max() > 0.1


def test_linear_map_constant_follows_its_tensors():
    M = sparse.random(5, 4, density=0.6, random_state=0, format="csr")
    arrays, meta = coo_arrays(M)
    tensors = {k: torch.as_tensor(v) for k, v in arrays.items()}
    lmap = LinearMap(tensors["rows"], tensors["cols"], tensors["vals"], meta)
    dense = M.toarray()
    c = lmap.constant(DT, torch.device("cpu"))
    np.testing.assert_allclose(c.numpy(), dense[:, -1])
    assert lmap.constant(DT, torch.device("cpu")) is c  # built once
    tensors["vals"].mul_(2.0)  # the map's own values change (a loaded state dict)
    np.testing.assert_allclose(lmap.constant(DT, torch.device("cpu")).numpy(), 2 * dense[:, -1])
    x = torch.randn(3, 4, dtype=torch.float32)
    np.testing.assert_allclose(lmap(x).numpy(), x.numpy() @ (2 * dense).T, rtol=1e-5)
