"""Quick start: a CVXPY problem as a differentiable PyTorch layer.

Declares ridge regression with parameters (A, b), builds a layer, solves a
batch, backpropagates, and checks solution and gradient against the closed
form x* = (AᵀA + λI)⁻¹ Aᵀ b differentiated by torch itself.
"""

import time

import cvxpy as cp
import torch

from declarative.torch import CvxpyLayer

torch.manual_seed(0)
m, n, lam, batch = 20, 5, 0.1, 8

# 1. Declare the problem with Parameters.
A = cp.Parameter((m, n))
b = cp.Parameter(m)
x = cp.Variable(n)
problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + lam * cp.sum_squares(x)))

# 2. Build the layer once (compiles the problem).
layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])

# 3. Solve a batch: A is batched, b is shared (broadcast) across the batch.
A_t = torch.randn(batch, m, n, dtype=torch.float64, requires_grad=True)
b_t = torch.randn(m, dtype=torch.float64, requires_grad=True)
start = time.perf_counter()
(x_star,) = layer(A_t, b_t, solver_args={"eps": 1e-10})

# 4. Backpropagate a loss through the solution.
loss = (x_star ** 2).sum()
loss.backward()
elapsed = time.perf_counter() - start

# 5. Check against the closed form, differentiated by autograd.
A_c = A_t.detach().clone().requires_grad_()
b_c = b_t.detach().clone().requires_grad_()
eye = torch.eye(n, dtype=torch.float64)
x_closed = torch.linalg.solve(A_c.mT @ A_c + lam * eye, (A_c.mT @ b_c).unsqueeze(-1)).squeeze(-1)
(x_closed ** 2).sum().backward()

err_x = (x_star - x_closed).abs().max().item()
err_A = (A_t.grad - A_c.grad).abs().max().item()
err_b = (b_t.grad - b_c.grad).abs().max().item()
print("declarative quick start: ridge regression as a layer")
print(f"  batch {batch}, A {m}x{n} batched, b shared; solve + backward {elapsed * 1e3:.1f} ms")
print(f"  max |x - x_closed|           = {err_x:.2e}")
print(f"  max |dL/dA - closed form|    = {err_A:.2e}")
print(f"  max |dL/db - closed form|    = {err_b:.2e}  (b broadcast: gradient summed over batch)")
ok = err_x < 1e-6 and err_A < 1e-6 and err_b < 1e-6
print("  OK" if ok else "  MISMATCH")
raise SystemExit(0 if ok else 1)
