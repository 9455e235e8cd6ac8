"""4×4 Sudoku learned end to end with a QP layer, as in OptNet (Amos & Kolter, 2017, §5.2).

A board is 16 cells × 4 digits, one-hot: z ∈ R⁶⁴. The layer solves

    minimize   ½ ε‖z‖² − pᵀz
    subject to A z = A z₀,   z ≥ 0,

where p is the puzzle (one-hot of the given digits, zero rows for the blanks),
ε = 0.1, and the equality constraints A (40 × 64) and the feasible point
z₀ = exp(log z₀) > 0 (so b = A z₀ is always reachable) are LEARNED: the layer is
never told the rules of Sudoku. Training minimizes ‖z*(p) − y‖² against the
one-hot solutions y, backpropagating through the QP by the implicit function
theorem (`declarative.QPFunction`, the qpth drop-in).

The true rules (each cell holds one digit; each row, column and 2×2 box holds
each digit once) are 64 equalities of rank 40, so 40 learned rows can represent
them exactly. The script first checks that the same QP with the TRUE rules
solves every test puzzle (the relaxation is exact on these puzzles), then
trains from a random A and reports board accuracy on puzzles built from
solution grids never seen in training.

    python examples/sudoku_4x4.py            # 400 steps: 30 s on an idle 2-core machine
    python examples/sudoku_4x4.py --quick    # the first 80 of those steps: checks progress only

Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import torch

from declarative import QPFunction

DTYPE = torch.float64
EPS_Q = 0.1  # ε of the objective's ½ε‖z‖²: keeps the QP strictly convex (OptNet's Qpenalty)
N_EQ = 40  # learned equality rows = rank of the true Sudoku constraints
QUICK_STEPS = 80  # --quick: the first steps of the full schedule (about 15 s)


# ---------------------------------------------------------------------------
# Data: all 288 4×4 Sudoku grids, puzzles with a unique solution
# ---------------------------------------------------------------------------


def all_grids() -> torch.Tensor:
    """Every valid 4×4 Sudoku grid, digits 0..3: shape (288, 4, 4)."""
    def valid(g):
        cols = all(len({g[r][c] for r in range(4)}) == 4 for c in range(4))
        boxes = all(len({g[r + a][c + b] for a in (0, 1) for b in (0, 1)}) == 4
                    for r in (0, 2) for c in (0, 2))
        return cols and boxes

    rows = list(itertools.permutations(range(4)))
    return torch.tensor([g for g in itertools.product(rows, repeat=4) if valid(g)])


def sudoku_constraints() -> torch.Tensor:
    """The rules as equalities on the one-hot z (index (row·4 + col)·4 + digit): (64, 64)."""
    def index(r, c, d):
        return (r * 4 + c) * 4 + d

    groups = [[index(r, c, d) for d in range(4)] for r in range(4) for c in range(4)]
    for d in range(4):
        groups += [[index(r, c, d) for c in range(4)] for r in range(4)]
        groups += [[index(r, c, d) for r in range(4)] for c in range(4)]
        groups += [[index(r + a, c + b, d) for a in (0, 1) for b in (0, 1)]
                   for r in (0, 2) for c in (0, 2)]
    A = torch.zeros(len(groups), 64, dtype=DTYPE)
    for i, g in enumerate(groups):
        A[i, g] = 1.0
    return A


def make_puzzles(grids: torch.Tensor, ids, per_grid: int, blanks: int, gen: torch.Generator):
    """Blank up to ``blanks`` cells of each grid, keeping the solution unique.

    Returns puzzles p (N, 64) and one-hot solutions y (N, 64).
    """
    flat = grids.reshape(len(grids), 16)
    P, Y = [], []
    for i in ids:
        solution = flat[i]
        onehot = torch.nn.functional.one_hot(solution, 4).to(DTYPE)  # (16, 4)
        for _ in range(per_grid):
            given = torch.ones(16, dtype=torch.bool)
            for cell in torch.randperm(16, generator=gen).tolist():
                if int((~given).sum()) >= blanks:
                    break
                given[cell] = False
                # Unique iff exactly one grid agrees with every given cell.
                if int(((flat == solution) | ~given).all(1).sum()) > 1:
                    given[cell] = True
            P.append((onehot * given.unsqueeze(1)).reshape(64))
            Y.append(onehot.reshape(64))
    return torch.stack(P), torch.stack(Y)


def board_accuracy(z: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of boards whose every cell's argmax digit is right."""
    right = z.reshape(-1, 16, 4).argmax(-1) == y.reshape(-1, 16, 4).argmax(-1)
    return right.all(1).double().mean().item()


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


class SudokuQP(torch.nn.Module):
    """z*(p) = argmin ½ε‖z‖² − pᵀz  s.t.  A z = A exp(log_z0),  z ≥ 0;  A and z₀ learned."""

    def __init__(self, gen: torch.Generator, A: torch.Tensor | None = None):
        super().__init__()
        self.A = torch.nn.Parameter(torch.rand(N_EQ, 64, dtype=DTYPE, generator=gen)
                                    if A is None else A.clone())
        self.log_z0 = torch.nn.Parameter(torch.full((64,), math.log(0.25), dtype=DTYPE))
        self.register_buffer("Q", EPS_Q * torch.eye(64, dtype=DTYPE))
        self.register_buffer("G", -torch.eye(64, dtype=DTYPE))
        self.register_buffer("h", torch.zeros(64, dtype=DTYPE))
        self.qp = QPFunction(verbose=-1)

    def forward(self, puzzles: torch.Tensor):
        b = self.A @ self.log_z0.exp()
        z, info = self.qp(self.Q, -puzzles, self.G, self.h, self.A, b, return_info=True)
        return z, info


# ---------------------------------------------------------------------------
# Progress bar (print and carriage return; no dependency)
# ---------------------------------------------------------------------------


class Progress:
    def __init__(self, total: int, width: int = 30):
        self.total, self.width = total, width
        self.start = time.perf_counter()
        self.tty = sys.stdout.isatty()
        self.every = 1 if self.tty else max(1, total // 10)

    def update(self, step: int, text: str) -> None:
        if step % self.every and step != self.total:
            return
        filled = self.width * step // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        line = f"  [{bar}] {step}/{self.total} {text}  {elapsed:.0f}s, eta {eta:.0f}s"
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.tty:
            print()


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="run only the first 80 steps of the schedule; check progress only")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 400)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--blanks", type=int, default=10, help="blank cells per puzzle")
    parser.add_argument("--seed", type=int, default=0)
    # The QPs here are small (64 variables, batch 50): one thread avoids the
    # OpenMP synchronization that dominates at this size (and stalls badly on
    # a busy machine).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    steps = args.steps or 400  # length of the learning-rate schedule
    run = min(steps, QUICK_STEPS) if args.quick else steps
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()

    grids = all_grids()
    order = torch.randperm(len(grids), generator=gen).tolist()
    train_ids, test_ids = order[:200], order[200:]  # test grids are never seen in training
    P_train, Y_train = make_puzzles(grids, train_ids, 10, args.blanks, gen)
    P_test, Y_test = make_puzzles(grids, test_ids, 2, args.blanks, gen)
    blanks = (P_test.reshape(-1, 16, 4).sum(-1) == 0).sum(1).double().mean().item()
    print("4x4 Sudoku with a learned QP layer (OptNet)")
    print(f"  {len(grids)} grids: {len(train_ids)} for training ({len(P_train)} puzzles), "
          f"{len(test_ids)} held out ({len(P_test)} puzzles); {blanks:.1f} blanks per puzzle")

    # 1. The model class can represent the answer: the QP with the true rules.
    A_true = sudoku_constraints()
    rank = int(torch.linalg.matrix_rank(A_true))
    oracle = SudokuQP(gen, A=A_true)
    with torch.no_grad():
        z_oracle, _ = oracle(P_test)
    acc_oracle = board_accuracy(z_oracle, Y_test)
    print(f"  true rules: {A_true.shape[0]} equalities of rank {rank}; the QP with them "
          f"solves {acc_oracle:.1%} of the test puzzles")

    # 2. Learn A (and z0) from puzzles and solutions alone.
    model = SudokuQP(gen)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    with torch.no_grad():
        z0, _ = model(P_test)
    print(f"  random A: test accuracy {board_accuracy(z0, Y_test):.1%}, "
          f"test loss {((z0 - Y_test) ** 2).mean().item():.4f}")
    losses, failed = [], 0
    bar = Progress(run)
    for step in range(1, run + 1):
        idx = torch.randint(0, len(P_train), (args.batch,), generator=gen)
        z, info = model(P_train[idx])
        failed += sum(not s.has_solution for s in info.status)
        loss = ((z - Y_train[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(step, f"loss {loss.item():.4f}")
    bar.close()

    with torch.no_grad():
        z_test, info = model(P_test)
    acc = board_accuracy(z_test, Y_test)
    cells = (z_test.reshape(-1, 16, 4).argmax(-1)
             == Y_test.reshape(-1, 16, 4).argmax(-1)).double().mean().item()
    test_loss = ((z_test - Y_test) ** 2).mean().item()
    # How much of the true rules' row space the learned rows span (0 = all of it).
    Qb, _ = torch.linalg.qr(model.A.detach().T)
    missed = (A_true.T - Qb @ (Qb.T @ A_true.T)).norm() / A_true.norm()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    elapsed = time.perf_counter() - t_start
    print(f"  trained {run} of {steps} steps (batch {args.batch}, Adam lr {args.lr}, cosine "
          "decay): "
          f"train loss {first:.4f} -> {last:.4f}")
    print(f"  held-out puzzles: board accuracy {acc:.1%}, cell accuracy {cells:.1%}, "
          f"loss {test_loss:.4f}")
    print(f"  true rules outside the learned row space: {missed.item():.1%} (relative norm)")
    print(f"  QP samples without a solution during training: {failed}; total {elapsed:.1f} s")

    checks = {
        "the QP with the true rules solves every test puzzle": acc_oracle == 1.0,
        "training loss fell by at least 30%": last < 0.7 * first,
        "no QP failed": failed == 0 and all(s.has_solution for s in info.status),
    }
    if not args.quick:
        checks["held-out board accuracy >= 90%"] = acc >= 0.9
    ok = all(checks.values())
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    print("  OK" if ok else "  CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
