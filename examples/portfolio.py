"""A portfolio layer with a second-order-cone risk constraint, learned end to end.

Markowitz with a risk budget: given expected returns μ, hold

    w*(μ) = argmax_w  μᵀw − γ‖Lᵀw‖²   s.t.   ‖Lᵀw‖₂ ≤ σ,   1ᵀw = 1,   w ≥ 0,

where Σ = LLᵀ is the returns' covariance (known here), γ the risk aversion and
σ a hard volatility budget. The norm constraint is a second-order cone, so
`CvxpyLayer` takes the conic path (diffcp + SCS, the cvxpylayers default) and
differentiates w* by the implicit function theorem on the cone program's
residual map. (Without the σ budget the problem is a QP and the layer would
take the batched torch QP path instead.)

μ is not known: it is predicted from features by a linear model, μ̂ = f(x),
and the model is trained END TO END on what matters, the realized utility of
the portfolio it induces, mean_t [r_tᵀw_t − γ w_tᵀΣw_t] with w_t = w*(f(x_t)),
rather than on the prediction error of μ̂. The two-stage baseline (least
squares for μ̂, then plug in) and the oracle (true μ) are reported beside it.
Here the linear model is well specified and the data plentiful, so the
two-stage baseline is as good as it gets and end to end comes close to it;
decision-focused training pays off when the model is misspecified.

The script checks the layer's gradient against central finite differences,
trains, and compares realized returns and utilities on held-out periods.

    python examples/portfolio.py           # 150 steps, about 30 s on 2 cores
    python examples/portfolio.py --quick   # 15 steps

Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import time

import cvxpy as cp
import torch

from declarative.torch import CvxpyLayer

DTYPE = torch.float64
N_ASSETS, N_FEATURES, N_FACTORS = 8, 4, 3
GAMMA = 1.0  # risk aversion γ
# Constraint violation allowed in the returned portfolios (SCS's default eps is 1e-4).
FEASIBILITY_TOL = 1e-3
# The gradient check solves to this accuracy, so finite differences with step
# FD_STEP resolve the derivative to about 1e-6 relative.
CHECK_ARGS = {"eps": 1e-10, "max_iters": 100_000}
FD_STEP = 1e-5


def market(gen: torch.Generator):
    """A factor-model covariance Σ = FFᵀ + D and a linear signal μ(x) = W x + c."""
    F = 0.1 * torch.randn(N_ASSETS, N_FACTORS, dtype=DTYPE, generator=gen)
    D = torch.diag(0.01 + 0.02 * torch.rand(N_ASSETS, dtype=DTYPE, generator=gen))
    Sigma = F @ F.T + D
    W = 0.05 * torch.randn(N_ASSETS, N_FEATURES, dtype=DTYPE, generator=gen)
    c = 0.01 * torch.ones(N_ASSETS, dtype=DTYPE)
    return Sigma, W, c


def sample(T: int, L, W, c, gen):
    """Features x_t, true means μ_t and realized returns r_t ~ N(μ_t, Σ)."""
    X = torch.randn(T, N_FEATURES, dtype=DTYPE, generator=gen)
    mu = X @ W.T + c
    R = mu + torch.randn(T, N_ASSETS, dtype=DTYPE, generator=gen) @ L.T
    return X, mu, R


def build_layer(L: torch.Tensor, sigma: float):
    mu = cp.Parameter(N_ASSETS, name="mu")
    w = cp.Variable(N_ASSETS, name="w")
    Lt = L.numpy().T
    objective = cp.Maximize(mu @ w - GAMMA * cp.sum_squares(Lt @ w))
    problem = cp.Problem(objective, [cp.norm(Lt @ w, 2) <= sigma, cp.sum(w) == 1, w >= 0])
    return CvxpyLayer(problem, parameters=[mu], variables=[w])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 training steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 150)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    steps = args.steps or (15 if args.quick else 150)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()

    Sigma, W_true, c_true = market(gen)
    L = torch.linalg.cholesky(Sigma)
    # σ between the minimum-variance portfolio's volatility and the least volatile
    # asset's: no single asset is allowed, so the risk constraint is always active.
    w_mv = torch.linalg.solve(Sigma, torch.ones(N_ASSETS, dtype=DTYPE))
    vol_mv = float((w_mv / w_mv.sum()) @ Sigma @ (w_mv / w_mv.sum())) ** 0.5
    vol_min = float(Sigma.diagonal().sqrt().min())
    sigma = 0.5 * (vol_mv + vol_min)
    layer = build_layer(L, sigma)
    X_train, _, R_train = sample(512, L, W_true, c_true, gen)
    X_test, mu_test, R_test = sample(1024, L, W_true, c_true, gen)
    print("Portfolio layer: max mu'w - gamma ||L'w||^2  s.t. ||L'w|| <= sigma, sum(w) = 1, w >= 0")
    print(f"  {N_ASSETS} assets, gamma = {GAMMA}, sigma = {sigma:.4f} (min-variance {vol_mv:.4f}, "
          f"least volatile asset {vol_min:.4f}); path: {layer.backend}")
    print("  512 training periods, 1024 held-out periods")
    checks = {}

    # 1. Gradient of the SOC layer against central finite differences.
    mu0 = mu_test[:8].clone().requires_grad_()
    v = torch.randn(8, N_ASSETS, dtype=DTYPE, generator=gen)
    d = torch.randn(8, N_ASSETS, dtype=DTYPE, generator=gen)
    (w0,) = layer(mu0, solver_args=CHECK_ARGS)
    (v * w0).sum().backward()
    analytic = float((mu0.grad * d).sum())
    h = FD_STEP
    with torch.no_grad():
        up = (v * layer(mu_test[:8] + h * d, solver_args=CHECK_ARGS)[0]).sum()
        down = (v * layer(mu_test[:8] - h * d, solver_args=CHECK_ARGS)[0]).sum()
    numeric = float(up - down) / (2 * h)
    rel = abs(analytic - numeric) / max(abs(numeric), 1e-12)
    on_budget = int(((w0.detach() @ L).norm(dim=1) > sigma - 1e-6).sum())
    print(f"  gradient check (batch of 8, {on_budget} on the risk budget): IFT {analytic:+.6f}, "
          f"central difference {numeric:+.6f}, relative difference {rel:.1e}")
    checks["IFT gradient matches finite differences (rel < 1e-4)"] = rel < 1e-4

    def utility(w, R):
        """Realized mean-variance utility per period, mean_t r_tᵀw_t − γ w_tᵀΣw_t (a tensor)."""
        return (w * R).sum(1).mean() - GAMMA * ((w @ L) ** 2).sum(1).mean()

    def realized(w, R):
        return utility(w, R).item()

    def mean_return(w, R):
        return (w * R).sum(1).mean().item()

    with torch.no_grad():
        (w_oracle,) = layer(mu_test)
        equal = realized(torch.full_like(R_test, 1.0 / N_ASSETS), R_test)
        oracle = realized(w_oracle, R_test)
        # Two-stage: fit μ̂ = W x + c by least squares on the returns, then plug in.
        Xa = torch.cat([X_train, torch.ones(len(X_train), 1, dtype=DTYPE)], 1)
        coef = torch.linalg.lstsq(Xa, R_train).solution
        Xa_test = torch.cat([X_test, torch.ones(len(X_test), 1, dtype=DTYPE)], 1)
        (w_two,) = layer(Xa_test @ coef)
        two_stage = realized(w_two, R_test)

    # 2. End to end: μ̂ = f(x) trained on realized return through the layer.
    model = torch.nn.Linear(N_FEATURES, N_ASSETS).to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)

    def evaluate():
        with torch.no_grad():
            (w,), info = layer(model(X_test), return_info=True)
        return w, info

    w_init, _ = evaluate()
    start = realized(w_init, R_test)
    t_train = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(X_train), (args.batch,), generator=gen)
        (w,) = layer(model(X_train[idx]))
        loss = -utility(w, R_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0:
            print(f"    step {step:4d}: training batch utility {-loss.item():+.4f}", flush=True)
    train_s = time.perf_counter() - t_train
    w_e2e, info = evaluate()
    e2e = realized(w_e2e, R_test)

    risk = (w_e2e @ L).norm(dim=1)
    violation = max((risk - sigma).max().item(), (w_e2e.sum(1) - 1).abs().max().item(),
                    (-w_e2e).max().item())
    print(f"  trained {steps} steps, batch {args.batch} ({train_s:.1f} s)")
    print("  held-out periods:             utility   mean return")
    rows = (("equal weight", equal, torch.full_like(R_test, 1.0 / N_ASSETS)),
            ("end to end, untrained", start, w_init), ("two-stage (LS, plug in)", two_stage, w_two),
            ("end to end, trained", e2e, w_e2e), ("oracle (true mu)", oracle, w_oracle))
    for name, u, w in rows:
        print(f"    {name:<25} {u:+.4f}   {mean_return(w, R_test):+.4f}")
    print(f"  end to end reaches {e2e / oracle:.1%} of the oracle's utility")
    print(f"  largest constraint violation of the learned portfolios: {violation:.1e}; "
          f"portfolio volatility {risk.mean():.4f} (budget {sigma:.4f})")

    checks["portfolios are feasible"] = violation < FEASIBILITY_TOL
    checks["every solve optimal"] = info.ok
    checks["training improved the held-out utility"] = e2e > start
    if not args.quick:
        checks["end to end beats equal weight"] = e2e > equal
        checks["end to end reaches 80% of the oracle"] = e2e > 0.8 * oracle
    ok = all(checks.values())
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    print(f"  total {time.perf_counter() - t_start:.1f} s")
    print("  OK" if ok else "  CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
