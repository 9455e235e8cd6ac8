"""A constrained least-squares layer: gradients checked by finite differences, then fitted.

The layer is simplex-constrained least squares (linear unmixing: the
abundances x of n pure components in an observed spectrum b, each component's
spectrum a column of A):

    x*(A, b) = argmin_x ‖A x − b‖²   s.t.   x ≥ 0,  1ᵀx = 1.

`CvxpyLayer` routes it to the batched torch QP engine (`backend == "qp"`) and
differentiates it by the implicit function theorem on the KKT system at the
solution. The script

1. checks the gradient with respect to A and b three independent ways, at
   points where the active set is stable (strict complementarity, checked with
   the returned dual variables): `torch.autograd.gradcheck` (central finite
   differences of every Jacobian entry, re-solving each time), a directional
   central difference of a scalar loss over a whole batch, and the conic path
   (diffcp + SCS) on the same problem;
2. fits the component matrix A from pairs (b, x) by gradient descent through
   the layer, and reports the error on held-out pairs.

    python examples/constrained_least_squares.py           # 150 fitting steps
    python examples/constrained_least_squares.py --quick   # 30 steps

Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import time

import cvxpy as cp
import torch

from declarative.torch import CvxpyLayer

DTYPE = torch.float64
M, N = 20, 5  # spectrum length, number of components
NOISE = 0.05  # observation noise on b
STRICT = 1e-6  # a bound counts as strictly inactive / strictly active beyond this


def build_layer(**kwargs):
    A = cp.Parameter((M, N), name="A")
    b = cp.Parameter(M, name="b")
    x = cp.Variable(N, name="x")
    nonneg = x >= 0
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [nonneg, cp.sum(x) == 1])
    # The multipliers of x ≥ 0 come back too: they certify the active set.
    return CvxpyLayer(problem, parameters=[A, b], variables=[x, nonneg.dual_variables[0]],
                      **kwargs)


def strictly_complementary(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Per sample: every bound is either clearly inactive (x > δ) or clearly active (λ > δ)."""
    return ((x > STRICT) | (lam > STRICT)).all(-1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 fitting steps")
    parser.add_argument("--steps", type=int, default=None, help="fitting steps (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    # Small batched QPs: one thread avoids OpenMP synchronization overhead.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.quick else 150)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    layer = build_layer()
    print("Constrained least squares  x*(A, b) = argmin ||Ax - b||^2  s.t. x >= 0, sum(x) = 1")
    print(f"  A {M}x{N}, b {M}; path: {layer.backend}")
    checks = {}

    # ------------------------------------------------------------------
    # 1. Gradient checks
    # ------------------------------------------------------------------
    A_true = torch.rand(M, N, dtype=DTYPE)
    dirichlet = torch.distributions.Dirichlet(torch.full((N,), 0.5, dtype=DTYPE))

    def observe(count):
        x = dirichlet.sample((count,))
        return x @ A_true.T + NOISE * torch.randn(count, M, dtype=DTYPE)

    # (a) gradcheck: every entry of dx/dA and dx/db by central differences (eps 1e-6).
    b0 = observe(20)
    (x0, lam0), info = layer(A_true, b0, return_info=True)
    strict = strictly_complementary(x0, lam0)
    # The strictly complementary sample with the most active bounds: the hardest case.
    n_active = (x0 <= STRICT).sum(-1)
    i = int(torch.where(strict, n_active, -1).argmax())
    active = int(n_active[i])
    A_in = A_true.clone().requires_grad_()
    b_in = b0[i].clone().requires_grad_()
    passed = torch.autograd.gradcheck(lambda A, b: layer(A, b)[0], (A_in, b_in),
                                      eps=1e-6, atol=1e-6, rtol=1e-5, raise_exception=False)
    print(f"  (a) torch.autograd.gradcheck on sample {i} ({active} of {N} bounds active, "
          f"{M * N + M} inputs): {'passed' if passed else 'FAILED'}")
    checks["gradcheck of dx/dA and dx/db"] = passed

    # (b) one directional central difference of a scalar loss over the strict samples.
    b_s = b0[strict]
    w = torch.randn(len(b_s), N, dtype=DTYPE)
    dA, db = torch.randn(M, N, dtype=DTYPE), torch.randn(len(b_s), M, dtype=DTYPE)

    def loss_at(A, b):
        return (w * layer(A, b)[0]).sum()

    A_g, b_g = A_true.clone().requires_grad_(), b_s.clone().requires_grad_()
    loss_at(A_g, b_g).backward()
    analytic = float((A_g.grad * dA).sum() + (b_g.grad * db).sum())
    h = 1e-6
    with torch.no_grad():
        numeric = float(loss_at(A_true + h * dA, b_s + h * db)
                        - loss_at(A_true - h * dA, b_s - h * db)) / (2 * h)
    rel = abs(analytic - numeric) / max(abs(numeric), 1e-12)
    print(f"  (b) directional derivative over a batch of {len(b_s)}: IFT {analytic:+.10f}, "
          f"central difference {numeric:+.10f}, relative difference {rel:.1e}")
    checks["directional central difference agrees (rel < 1e-6)"] = rel < 1e-6

    # (c) the same gradients from the conic path (diffcp + SCS at a tight tolerance;
    # SCS's default 1e-4 would limit the agreement to about that).
    conic = build_layer(solver="SCS")
    A_c, b_c = A_true.clone().requires_grad_(), b_s.clone().requires_grad_()
    (x_c, _) = conic(A_c, b_c, solver_args={"eps": 1e-10})
    (w * x_c).sum().backward()
    gap = max((A_c.grad - A_g.grad).abs().max().item(), (b_c.grad - b_g.grad).abs().max().item())
    scale = max(A_g.grad.abs().max().item(), b_g.grad.abs().max().item())
    print(f"  (c) conic path (diffcp + SCS, eps 1e-10) vs QP path: max gradient difference "
          f"{gap:.1e} (gradients up to {scale:.1e})")
    checks["conic path agrees (< 1e-6 relative)"] = gap < 1e-6 * scale

    # ------------------------------------------------------------------
    # 2. Fit A from (b, x) pairs through the layer
    # ------------------------------------------------------------------
    b_train, b_test = observe(200), observe(200)
    with torch.no_grad():
        x_train = layer(A_true, b_train)[0]
        x_test = layer(A_true, b_test)[0]
    A_hat = (A_true + 0.3 * torch.randn(M, N, dtype=DTYPE)).requires_grad_()
    opt = torch.optim.Adam([A_hat], lr=0.01)

    def test_error():
        with torch.no_grad():
            return ((layer(A_hat, b_test)[0] - x_test) ** 2).sum(1).mean().item()

    before = test_error()
    t_fit = time.perf_counter()
    for _ in range(steps):
        loss = ((layer(A_hat, b_train)[0] - x_train) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fit_s = time.perf_counter() - t_fit
    after = test_error()
    print(f"  fit A from 200 (b, x) pairs, {steps} Adam steps ({fit_s:.1f} s): held-out mean "
          f"||x - x_true||^2 {before:.2e} -> {after:.2e} ({before / after:.0f}x smaller)")
    target = 3.0 if args.quick else 100.0
    checks[f"held-out error at least {target:.0f}x smaller"] = after * target < before

    ok = all(checks.values())
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    print(f"  total {time.perf_counter() - t_start:.1f} s")
    print("  OK" if ok else "  CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
