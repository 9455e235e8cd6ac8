"""Eliminations of the interior point's Newton system, factored once per iteration.

Every Newton step, and the backward pass, solves the symmetric system

    [ Q   Gᵀ   Aᵀ ] [dz]   [r_z]
    [ G   -W   0  ] [dλ] = [r_λ]          W = diag(s / λ) > 0
    [ A   0    0  ] [dν]   [r_ν]

Two exact eliminations, chosen by cost (see `choose`):

`SchurKKT` (Q positive definite). With Q = LLᵀ and w = Lᵀz the Hessian becomes
I and G, A become C_G = G L⁻ᵀ, C_A = A L⁻ᵀ. Eliminating dw leaves the dual
system with K = C Cᵀ, formed once per call; eliminating dν with the constant
block K_AA = C_A C_Aᵀ (also once per call) leaves, per iteration, one p×p
Cholesky of K̃ + W with K̃ = K_GG − K_GA K_AA⁻¹ K_AG constant. When Q and G are
shared by the batch, K̃ is a single matrix: only W differs per sample.

`ReducedKKT` (any PSD Q, including Q = 0). Eliminating dλ = W⁻¹(G dz − r_λ)
gives H = Q + Gᵀ W⁻¹ G; adding ρAᵀA (exact, since A dz = r_ν) makes H
positive definite whenever the KKT matrix is nonsingular; the equality block
is then eliminated with S = A H⁻¹ Aᵀ. One n×n and one m×m Cholesky per iteration.

Both fall back to a diagonal shift when a Cholesky fails (redundant rows in A,
numerically singular matrices), retried with growing shifts per sample.
"""

from __future__ import annotations

import copy

import torch

from .. import linalg
from ..linalg import backward_solve, chol_solve, forward_solve
from .data import QPData, mv, mv_rows, rmv
from .settings import QPSettings


def cholesky(M: torch.Tensor, settings: QPSettings, out: torch.Tensor | None = None):
    return linalg.cholesky(M, settings.regularization, settings.regularization_tries, out=out)


class KKTSystem:
    """Operators of the working space plus the factor/solve of its Newton system.

    The interior point runs in the working space (variables x); `to_original`
    maps x back to z, `rhs_to_working` and `dir_to_original` map a backward
    right-hand side in and its solution out. `subset` restricts the system to
    some samples (the active ones), gathering each batched tensor once.
    """

    name = "base"
    # Per-sample tensors (leading batch dimension when batched): matrices are
    # batched when 3-D, vectors when 2-D.
    matrices: tuple[str, ...] = ()
    vectors: tuple[str, ...] = ("q", "h", "b")

    def __init__(self, data: QPData, settings: QPSettings):
        self.settings = settings
        self.p, self.m, self.n = data.p, data.m, data.n
        self.batch = data.batch
        self.q, self.h, self.b = data.q, data.h, data.b
        # Scratch matrices reused across iterations (shared with subsets): a fresh
        # 10 MB tensor per iteration costs as much in page faults as the copy itself.
        self._scratch: dict = {}

    def scratch(self, name: str, shape, like: torch.Tensor) -> torch.Tensor | None:
        """A reusable (shape) buffer, or None when autograd must see fresh tensors."""
        if torch.is_grad_enabled() and like.requires_grad:
            return None
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != tuple(shape[1:]) \
                or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
            self._scratch[name] = buf
        return buf[: shape[0]]

    def to(self, dtype: torch.dtype) -> KKTSystem:
        """A copy with every tensor in ``dtype`` (the matrix-free float32 backward
        runs its Krylov solve in float64)."""
        other = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(other, name, value.to(dtype))
        other._scratch = {}
        return other

    # Matrices only the maps out of the working space use (`to_original`, ...):
    # the interior point's active subsets skip gathering them.
    output_matrices: tuple[str, ...] = ()

    def subset(self, idx: torch.Tensor, iteration_only: bool = False) -> KKTSystem:
        """The samples ``idx``; ``iteration_only``: enough to factor and solve the
        Newton system, not to map results back (saves gathering B×n×n matrices)."""
        sub = copy.copy(self)
        sub.batch = int(idx.numel())
        for name in self.matrices:
            t = getattr(self, name)
            if iteration_only and name in self.output_matrices:
                setattr(sub, name, None)
            elif t is not None and t.dim() == 3:
                setattr(sub, name, t.index_select(0, idx))
        for name in self.vectors:
            t = getattr(self, name)
            if t.dim() == 2:
                setattr(sub, name, t.index_select(0, idx))
        return sub

    def vec(self, name: str) -> torch.Tensor:
        """A vector of the working problem, expanded to (batch, ·)."""
        t = getattr(self, name)
        return t.unsqueeze(0).expand(self.batch, -1) if t.dim() == 1 else t

    def apply(self, F: dict, dz, dl, dn):
        """The Newton matrix times (dz, dλ, dν), in the working space."""
        w = F["w"]
        top = self.hess(dz) + self.GT(dl)
        if self.m:
            top = top + self.AT(dn)
            bottom = self.A(dz)
        else:
            bottom = dn
        return top, self.G(dz) - w * dl, bottom

    def rhs_products(self, r_z):
        """Products with r_z that `solve` may reuse for a second right-hand side with
        the same r_z (the predictor and corrector share it); None: nothing to reuse."""
        return None

    def constraint_products(self, x, r_z):
        """((G x, A x), rhs_products(r_z)); A x is None without equalities."""
        return (self.G(x), self.A(x) if self.m else None), self.rhs_products(r_z)

    def newton_solve(self, F: dict, r_z, r_l, r_n, pre=None):
        """The interior point's (corrector) direction; see `ReducedKKT.newton_solve`."""
        return self.solve(F, r_z, r_l, r_n, pre=pre)

    def solve_refined(self, F: dict, r_z, r_l, r_n, steps: int = 1):
        """`solve` plus ``steps`` of iterative refinement with exact products.

        Near the solution W spans many orders of magnitude: the reduced matrix
        Q + GᵀW⁻¹G is then ill-conditioned and one solve with its factor is only
        accurate to a few digits; each refinement step reuses the factorization
        and contracts the error by the factor's relative inaccuracy.
        """
        dz, dl, dn = self.solve(F, r_z, r_l, r_n)
        for _ in range(steps):
            top, mid, bottom = self.apply(F, dz, dl, dn)
            if self.m:  # (without equalities the third block is empty)
                e_z, e_l, e_n = self.solve(F, r_z - top, r_l - mid, r_n - bottom)
                dn = dn + e_n
            else:
                e_z, e_l, _ = self.solve(F, r_z - top, r_l - mid, r_n)
            dz, dl = dz + e_z, dl + e_l
        return dz, dl, dn

    def G(self, x):
        return mv(self.Gm, x)

    def GT(self, y):
        return rmv(self.Gm, y)

    def A(self, x):
        return mv(self.Am, x)

    def AT(self, y):
        return rmv(self.Am, y)


class SchurKKT(KKTSystem):
    name = "schur"
    matrices = ("L", "Gm", "Am", "K", "Z", "L_AA")
    output_matrices = ("L",)

    def __init__(self, data: QPData, settings: QPSettings, L: torch.Tensor):
        super().__init__(data, settings)
        self.L = L  # chol(Q): (n, n) or (B, n, n)
        # C = [G; A] L⁻ᵀ, i.e. Cᵀ = L⁻¹ [G; A]ᵀ: the constraint matrices in w = Lᵀz.
        self.Gm = torch.linalg.solve_triangular(L, data.G.mT, upper=False).mT
        self.Am = torch.linalg.solve_triangular(L, data.A.mT, upper=False).mT
        if L.dim() == 2 and data.q.dim() == 1:
            self.q = forward_solve(L, data.q.unsqueeze(0)).squeeze(0)
        else:
            self.q = forward_solve(L, data.expand_vector("q"))
        K_GG = self.Gm @ self.Gm.mT
        self.Z = self.L_AA = None
        if self.m:
            # With K_AA = C_A C_Aᵀ = L_AA L_AAᵀ and Z = K_GA L_AA⁻ᵀ (= C_G Yᵀ for the
            # orthonormalized rows Y = L_AA⁻¹ C_A): K̃ = K_GG − Z Zᵀ, one triangular
            # solve and one product (K_GA K_AA⁻¹ K_AG formed directly costs two
            # solves and a product more).
            K_GA = self.Gm @ self.Am.mT
            K_AA = self.Am @ self.Am.mT
            self.L_AA, _ = cholesky(K_AA, settings)
            self.Z = torch.linalg.solve_triangular(self.L_AA, K_GA.mT, upper=False).mT
            # Q and G may be shared while A is batched (or the reverse): broadcast.
            self.K = torch.addmm(K_GG, self.Z, self.Z.T, alpha=-1) if self.Z.dim() == 2 \
                else K_GG - self.Z @ self.Z.mT
        else:
            self.K = K_GG

    def hess(self, x):
        return x

    def factor(self, w: torch.Tensor) -> dict:
        K = self.K
        if w.shape[0] == 1 and K.dim() == 2:  # one sample, shared K: a 2-D factor
            shape, w_diag = (self.p, self.p), w[0]
        else:
            shape, w_diag = (w.shape[0], self.p, self.p), w
        M = self.scratch("K+W", shape, w)
        if M is None:
            M = K.expand(shape).clone()
        else:
            M.copy_(K.expand(shape))
        M.diagonal(dim1=-2, dim2=-1).add_(w_diag)
        L, shifted = cholesky(M, self.settings, out=self.scratch("L", shape, w))
        return {"L": L, "w": w, "shifted": shifted}

    def rhs_products(self, r_z):
        return self.G(r_z), (self.A(r_z) if self.m else None)

    def constraint_products(self, x, r_z):
        # Two vectors per pass over each matrix: these products are memory-bound
        # (B×p×n read for a few flops per entry), so this saves a pass per iteration.
        X = torch.stack([x, r_z], -2)
        GX = mv_rows(self.Gm, X)
        AX = mv_rows(self.Am, X) if self.m else None
        return ((GX[:, 0], None if AX is None else AX[:, 0]),
                (GX[:, 1], None if AX is None else AX[:, 1]))

    def solve(self, F: dict, r_z, r_l, r_n, primal: bool = True, pre=None):
        Gr, Ar = pre if pre is not None else self.rhs_products(r_z)
        # dν from the equality block: L_AAᵀ dν = L_AA⁻¹u_ν − Zᵀ dλ (see __init__).
        u_l = Gr - r_l
        if self.m:
            y_n = forward_solve(self.L_AA, Ar - r_n)
            rhs = u_l - mv(self.Z, y_n)
        else:
            rhs = u_l
        dl = chol_solve(F["L"], rhs)
        dn = backward_solve(self.L_AA, y_n - rmv(self.Z, dl)) if self.m else r_n
        if not primal:
            return None, dl, dn
        dz = r_z - self.GT(dl)
        if self.m:
            dz = dz - self.AT(dn)
        return dz, dl, dn

    # maps between spaces
    def to_original(self, x):
        return backward_solve(self.L, x)

    def from_original(self, z):
        """w = Lᵀz."""
        L = self.L
        return z @ L if L.dim() == 2 else torch.bmm(z.unsqueeze(-2), L).squeeze(-2)

    def rhs_to_working(self, g):
        return forward_solve(self.L, g)

    dir_to_original = to_original


class ReducedKKT(KKTSystem):
    name = "reduced"
    matrices = ("Qm", "Gm", "Am", "H0")

    def __init__(self, data: QPData, settings: QPSettings):
        super().__init__(data, settings)
        self.Qm, self.Gm, self.Am = data.Q, data.G, data.A
        H0 = data.Q
        # ρAᵀA keeps H definite on the null space of Q ∩ ker G, exactly (A dz = r_ν).
        # The data are equilibrated (rows of A and the cost have unit size), so ρ = 1
        # is on the scale of Q for every sample alike.
        self.rho = 1.0
        if self.m:
            H0 = H0 + data.A.mT @ data.A
        self.H0 = H0
        # Every matrix shared (2-D): one sample's Newton matrix is then a plain 2-D
        # matrix, factored and solved without batch reshapes (see `linalg.chol_solve`).
        self.shared = all(M.dim() == 2 for M in (self.Gm, self.Am, H0))

    def hess(self, x):
        return mv(self.Qm, x)

    def factor(self, w: torch.Tensor) -> dict:
        G = self.Gm
        d = w.reciprocal()
        if w.shape[0] == 1 and self.shared:  # one sample, shared matrices: 2-D factors
            GtDG = (G.T * d) @ G
        elif G.dim() == 2:
            GtDG = (G.T.unsqueeze(0) * d.unsqueeze(1)) @ G
        else:
            GtDG = (G.mT * d.unsqueeze(1)) @ G
        H = self.H0 + GtDG
        L, shifted = cholesky(H, self.settings)
        F = {"L": L, "d": d, "w": w, "shifted": shifted}
        if self.m:
            A = self.Am
            if L.dim() == 2:
                At = A.T
            else:
                At = A.mT if A.dim() == 3 else A.T.unsqueeze(0).expand(L.shape[0], -1, -1)
            Y = torch.linalg.solve_triangular(L, At, upper=False)  # L⁻¹Aᵀ
            F["L_S"], _ = cholesky(Y.mT @ Y, self.settings)
        return F

    def solve(self, F: dict, r_z, r_l, r_n, primal: bool = True, pre=None):
        d = F["d"]
        rhs = r_z + self.GT(d * r_l)
        if self.m:
            rhs = rhs + self.rho * self.AT(r_n)
            Hr = chol_solve(F["L"], rhs)
            dn = chol_solve(F["L_S"], self.A(Hr) - r_n)
            dz = chol_solve(F["L"], rhs - self.AT(dn))
        else:
            dn = r_n
            dz = chol_solve(F["L"], rhs)
        dl = d * (self.G(dz) - r_l)
        return dz, dl, dn

    def newton_solve(self, F: dict, r_z, r_l, r_n, pre=None):
        """One refinement step on top of the solve.

        Close to the solution H = Q + GᵀW⁻¹G is ill-conditioned and an
        unrefined direction stops the dual residual a little above 1e-10 (seen
        on random QPs with n = p = 100); one step with the same factor restores
        the accuracy the interior point needs.
        """
        return self.solve_refined(F, r_z, r_l, r_n, steps=3)

    def to_original(self, x):
        return x

    from_original = to_original
    rhs_to_working = to_original
    dir_to_original = to_original


# A Q whose Cholesky fails is still taken as semidefinite when Q + δI factors, δ
# relative to its largest diagonal entry and to the precision the data came in: a
# low-rank Q = LLᵀ formed in float32 has eigenvalues near −1e-7·‖Q‖ (round-off,
# not indefiniteness), a Gram matrix assembled in float64 near −1e-13·‖Q‖. The
# bound √eps of the input dtype (1.5e-8 in float64, 3.5e-4 in float32) is the one
# the layer's PSD parameter check uses, so a value it lets through is solved.


def indefinite(Q: torch.Tensor, info: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """Samples whose Q is indefinite (beyond round-off of the input dtype); (B,) or ()."""
    failed = info != 0
    if not bool(failed.any()):
        return failed
    n = Q.shape[-1]
    delta = torch.finfo(input_dtype).eps ** 0.5
    scale = Q.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)
    eye = torch.eye(n, dtype=Q.dtype, device=Q.device)
    shifted = Q + (delta * scale)[..., None, None] * eye
    _, info2 = torch.linalg.cholesky_ex(shifted)
    bad = failed & (info2 != 0)
    if not bool(bad.any()):
        return bad
    # Decide the few remaining ones by their eigenvalues.
    eig_min = torch.linalg.eigvalsh(Q).amin(-1)
    return bad & (eig_min < -delta * scale)


def refuse_indefinite(Q: torch.Tensor, bad: torch.Tensor) -> None:
    """Raise ValueError naming Q (qpth's check_Q_spd) for the first indefinite sample."""
    if not bool(bad.any()):
        return
    i = int(bad.reshape(-1).nonzero()[0]) if bad.dim() else None
    Qi = Q[i] if i is not None and Q.dim() == 3 else Q
    where = f" at batch index {i}" if i is not None and Q.dim() == 3 else ""
    eig = float(torch.linalg.eigvalsh(Qi).amin() if Qi.dim() == 2 else 0.0)
    raise ValueError(f"Q must be positive semidefinite{where}: its smallest eigenvalue is "
                     f"{eig:.3g} (after equilibration). Pass check_Q_spd=False to get a "
                     "numerical_error status for such samples instead.")


def choose(data: QPData, settings: QPSettings, chol=None) -> KKTSystem:
    """The cheaper exact elimination for these shapes (flop count per iteration).

    ``chol``: (L, info) of Q if already computed. The choice is made once for the
    batch; both eliminations solve every sample to the same tolerance, so it
    changes the cost, not the answer.
    """
    if settings.kkt in ("auto", "schur") and chol is None:
        chol = torch.linalg.cholesky_ex(data.Q)
    L = schur_factor(data.n, data.p, data.m, settings, chol)
    return ReducedKKT(data, settings) if L is None else SchurKKT(data, settings, L)


def schur_factor(n: int, p: int, m: int, settings: QPSettings, chol) -> torch.Tensor | None:
    """chol(Q) when the Schur elimination is the one to use (see `choose`), else None.
    ``chol``: (L, info) of the equilibrated Q (None when settings.kkt is "reduced")."""
    method = settings.kkt
    if method not in ("auto", "schur"):
        return None
    L, info = chol
    definite = bool((info == 0).all())
    if definite:
        diag = L.detach().diagonal(dim1=-2, dim2=-1)
        cond = float(((diag.amax(-1) / diag.amin(-1)) ** 2).amax())
        definite = cond < settings.schur_max_condition
    if method == "schur" and not definite:
        raise ValueError("kkt='schur' needs a well-conditioned positive definite Q; "
                         "use kkt='reduced' or 'auto'.")
    if definite:
        schur = p ** 3 / 3 + p * p
        reduced = n * n * p + n ** 3 / 3 + (n * n * m + m ** 3 / 3 if m else 0)
        if method == "schur" or schur <= reduced:
            return L
    return None
