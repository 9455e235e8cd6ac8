"""The cone K of `min cᵀx s.t. Ax + s = b, s ∈ K` and its batched operations.

Convention (SCS's, and `declarative.canon.cone`'s): the rows of s come in the
order zero cone (``z`` rows, s = 0), nonnegative orthant (``l`` rows),
second-order cones (sizes ``q``: (t, u) with ‖u‖₂ ≤ t), exponential cones
(``ep`` triples (r, s, t) with s·exp(r/s) ≤ t, s > 0). Vectors are (B, m) with
the rows in that order; the zero cone's rows are carried but every operation
here leaves them at zero (s = 0 there, and its dual is free).

Second-order cones use the Jordan algebra of the cone (e = (1, 0, …, 0),
u∘v = (uᵀv, u₀v₁ + v₀u₁), det u = u₀² − ‖u₁‖²), each cone of degree 1 as in
Clarabel, so that sᵀz = ν·μ on the central path with ν the total degree.
Per-cone reductions are segment sums over each cone's rows (`index_add_`),
so cones of any mix of sizes run in one batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Cone keys of SCS's dictionary this engine solves; PSD ("s"), dual exponential
# ("ed") and power ("p") cones are refused with a clear error.
SUPPORTED = ("z", "f", "l", "q", "ep")


@dataclass(frozen=True)
class ConeSpec:
    """Sizes of the cone blocks (the SCS cone dictionary, supported keys only)."""

    zero: int = 0
    nonneg: int = 0
    soc: tuple[int, ...] = ()
    exp: int = 0

    @classmethod
    def from_dict(cls, cone_dict: dict) -> ConeSpec:
        unknown = [k for k, v in cone_dict.items() if k not in SUPPORTED and _nonempty(v)]
        if unknown:
            raise ValueError(
                f"cone_dict holds cones {unknown} that the batched conic engine does not "
                f"solve; it takes {SUPPORTED} (zero, nonnegative, second-order, exponential). "
                "Use the diffcp conic backend for PSD, dual-exponential and power cones.")
        soc = tuple(int(d) for d in cone_dict.get("q", ()) or ())
        if any(d < 1 for d in soc):
            raise ValueError(f"cone_dict['q'] must hold positive cone sizes, got {soc}.")
        zero = int(cone_dict.get("z", 0) or 0) + int(cone_dict.get("f", 0) or 0)
        return cls(zero, int(cone_dict.get("l", 0) or 0), soc, int(cone_dict.get("ep", 0) or 0))

    @property
    def m(self) -> int:
        return self.zero + self.nonneg + sum(self.soc) + 3 * self.exp

    @property
    def degree(self) -> int:
        """ν: the barrier parameter of K (the zero cone has none)."""
        return self.nonneg + len(self.soc) + 3 * self.exp


def _nonempty(v) -> bool:
    if isinstance(v, (list, tuple)):
        return len(v) > 0
    return bool(v)


class Cones:
    """Row ranges and index tensors of a `ConeSpec` on one device."""

    def __init__(self, spec: ConeSpec, device):
        self.spec = spec
        self.m = spec.m
        self.l0 = spec.zero
        self.q0 = self.l0 + spec.nonneg
        self.e0 = self.q0 + sum(spec.soc)
        self.nq = len(spec.soc)
        self.ne = spec.exp
        sizes = torch.tensor(spec.soc, dtype=torch.long)
        self.soc_id = torch.repeat_interleave(torch.arange(self.nq), sizes).to(device)
        starts = torch.cumsum(sizes, 0) - sizes
        self.soc_head = starts.to(device)
        head_mask = torch.zeros(int(sizes.sum()), dtype=torch.bool)
        head_mask[starts] = True
        self.soc_head_mask = head_mask.to(device)
        # Same-cone mask of the second-order rows (block-diagonal dense matrices).
        self.soc_block_mask = (self.soc_id.unsqueeze(0) == self.soc_id.unsqueeze(1)).to(
            torch.float64)
        self.degree = spec.degree
        self._units = {}

    # ---- row blocks ---------------------------------------------------------
    def lp(self, v):
        return v[:, self.l0:self.q0]

    def soc(self, v):
        return v[:, self.q0:self.e0]

    def exp(self, v):
        return v[:, self.e0:]

    def join(self, zero, lp, soc, exp):
        """Full (B, m, …) tensor from the four row blocks."""
        return torch.cat([zero, lp, soc, exp], dim=1)

    def zero_like(self, v):
        return v[:, :self.l0].new_zeros(v[:, :self.l0].shape)

    # ---- second-order-cone primitives (rows q0:e0, per-cone scalars (B, nq, …)) ----
    def seg_sum(self, v):
        out = v.new_zeros((v.shape[0], self.nq) + tuple(v.shape[2:]))
        return out.index_add_(1, self.soc_id, v)

    def spread(self, p):
        """Per-cone values (B, nq, …) onto the cone's rows (B, mq, …)."""
        return p.index_select(1, self.soc_id)

    def head(self, v):
        return v.index_select(1, self.soc_head)

    def soc_det(self, u):
        """u₀² − ‖u₁‖² as (u₀ − ‖u₁‖)(u₀ + ‖u₁‖): one cancellation instead of two."""
        u0 = self.head(u)
        tail = (self.seg_sum(u * u) - u0 * u0).clamp_min(0).sqrt()
        return (u0 - tail) * (u0 + tail)

    def soc_min_eig(self, u):
        """u₀ − ‖u₁‖: the smaller of the two spectral values."""
        u0 = self.head(u)
        tail = (self.seg_sum(u * u) - u0 * u0).clamp_min(0).sqrt()
        return u0 - tail

    # ---- vectors of the whole cone --------------------------------------------
    def unit(self, like):
        """e: ones on the orthant, (1, 0, …) on each second-order cone, the exponential
        cone's central point; zero on the zero cone's rows. (B, m), read-only."""
        key = (like.shape, like.dtype, like.device)
        cached = self._units.get(key)
        if cached is None:
            cached = self._units[key] = self._unit(like)
        return cached

    def _unit(self, like):
        e = torch.zeros_like(like)
        e[:, self.l0:self.q0] = 1.0
        if self.nq:
            e[:, self.q0 + self.soc_head] = 1.0
        if self.ne:
            from .exp import CENTRAL

            e[:, self.e0:] = torch.tensor(CENTRAL, dtype=like.dtype,
                                          device=like.device).repeat(self.ne)
        return e

    def dot(self, u, v):
        """uᵀv over the cone's rows (the zero cone's excluded), (B,)."""
        return (u[:, self.l0:] * v[:, self.l0:]).sum(-1)

    def shift_into(self, u, floor):
        """u moved into the interior: where the smallest spectral value α of the
        orthant block (of each second-order cone) is below ``floor`` (a float or
        (B, 1)), u + (floor − α)e there (Clarabel's start). Exponential cones start
        at their central point."""
        lp, soc = self.lp(u), self.soc(u)
        if lp.shape[-1]:
            lp_min = lp.amin(-1, keepdim=True)
            lp = torch.where(lp_min < floor, lp + (floor - lp_min), lp)
        if self.nq:
            alpha = self.soc_min_eig(soc)
            shift = (floor - alpha).clamp_min(0)
            soc = soc + self.spread(shift) * self.soc_head_mask
        exp = self.exp(u)
        if self.ne:
            from .exp import CENTRAL

            exp = torch.tensor(CENTRAL, dtype=u.dtype, device=u.device).repeat(self.ne)
            exp = exp.expand(u.shape[0], -1).clone()
        return self.join(torch.zeros_like(u[:, :self.l0]), lp, soc, exp)

    def max_step(self, u, du):
        """Largest α ≥ 0 (capped at 1e30) with u + α du in K, per sample (u interior)."""
        big = torch.full(u.shape[:1], 1e30, dtype=u.dtype, device=u.device)
        lp, dlp = self.lp(u), self.lp(du)
        if lp.shape[-1]:
            neg = dlp < 0
            ratio = torch.where(neg, -lp / torch.where(neg, dlp, -1.0), 1e30)
            big = torch.minimum(big, ratio.amin(-1))
        if self.nq:
            big = torch.minimum(big, self._soc_step(self.soc(u), self.soc(du)))
        if self.ne:
            from .exp import max_step

            big = torch.minimum(big, max_step(self.exp(u), self.exp(du)))
        return big

    def _soc_step(self, u, du):
        """The smallest positive root of det(u + α du) = aα² + bα + c (c = det u > 0),
        per cone: from the interior a path leaves K (or reaches −K) only through
        det = 0. Written as 2c/(−b + √(b² − 4ac)), which has no cancellation where it
        matters (the other root is farther or negative)."""
        pair = torch.stack([u, du], 1)  # (B, 2, q)
        sums = self.seg_sum((pair.unsqueeze(2) * pair.unsqueeze(1)).flatten(1, 2).mT)
        heads = pair.index_select(2, self.soc_head)  # (B, 2, nq)
        h_u, h_d = heads[:, 0], heads[:, 1]
        s_uu, s_ud, s_dd = sums[..., 0], sums[..., 1], sums[..., 3]
        a = 2 * h_d * h_d - s_dd
        b = 2 * (2 * h_u * h_d - s_ud)
        c = self.soc_det(u).clamp_min(0)
        del s_uu
        root = (b * b - 4 * a * c).clamp_min(0).sqrt()
        den = root - b
        ok = (b * b - 4 * a * c >= 0) & (den > 0)
        alpha = torch.where(ok, 2 * c / torch.where(ok, den, 1.0), 1e30)
        return alpha.amin(-1)

    # ---- Jordan algebra (symmetric cones: orthant and second-order) ----------
    def circ(self, u, v):
        """u∘v on the orthant and second-order rows (others zero)."""
        lp = self.lp(u) * self.lp(v)
        su, sv = self.soc(u), self.soc(v)
        if self.nq:
            dot = self.spread(self.seg_sum(su * sv))
            u0, v0 = self.spread(self.head(su)), self.spread(self.head(sv))
            soc = torch.where(self.soc_head_mask, dot, u0 * sv + v0 * su)
        else:
            soc = su
        return self.join(self.zero_like(u), lp, soc, torch.zeros_like(self.exp(u)))

    def circ_div(self, lam, v):
        """λ \\ v: the x with λ∘x = v (λ interior)."""
        lp = self.lp(v) / self.lp(lam)
        sl, sv = self.soc(lam), self.soc(v)
        if self.nq:
            l0, v0 = self.head(sl), self.head(sv)
            tail_dot = self.seg_sum(sl * sv) - l0 * v0
            x0 = (l0 * v0 - tail_dot) / self.soc_det(sl)
            x0r, l0r = self.spread(x0), self.spread(l0)
            soc = torch.where(self.soc_head_mask, x0r, (sv - x0r * sl) / l0r)
        else:
            soc = sv
        return self.join(self.zero_like(v), lp, soc, torch.zeros_like(self.exp(v)))
