"""Equilibration of sparse QP data: the interior point runs on unit-sized rows.

The same scaling as the dense engine (`backends.qp.scaling`, where the
reasoning is written out), computed on the stored entries: for each sample,
positive diagonal D (variables), E (rows of G), F (rows of A) and a cost scale
c > 0 give the equivalent problem in ẑ = D⁻¹z

    Q̂ = c·DQD,   q̂ = c·Dq,   Ĝ = EGD,   ĥ = Eh,   Â = FAD,   b̂ = Fb,

whose solution maps back as z = Dẑ, s = E⁻¹ŝ, λ = Eλ̂/c, ν = Fν̂/c; the KKT
matrix transforms by the congruence P = diag(√c·D, F/√c, E/√c) (variable
order z, ν, λ), so the backward's adjoint is a = P M̂⁻¹ (P g).

E and F first take every row of G and A to unit 2-norm, then Ruiz's sweeps on
the KKT matrix balance D against them; c takes Q's mean diagonal (‖q‖∞ for
an LP) to 1. Everything is per sample (the values differ), vectorized over the
batch: a norm is a segment sum over the stored entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pattern import SparsePattern

# As the dense engine (`backends.qp.scaling`): sweeps, per-sweep clamp, cost clamp.
RUIZ_SWEEPS = 2
SWEEP_CLAMP = (1e-4, 1e4)
COST_CLAMP = (1e-6, 1e6)


def segment_sum(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """out[b, j] = Σ_k values[b, k] over the k with index[k] = j; values (B, K) -> (B, size)."""
    B = values.shape[0]
    if size == 0 or values.shape[1] == 0:
        return np.zeros((B, size))
    flat = (np.arange(B)[:, None] * size + index[None, :]).ravel()
    return np.bincount(flat, weights=values.ravel(), minlength=B * size).reshape(B, size)


def _norm_factor(squared: np.ndarray) -> np.ndarray:
    """1/√‖·‖ from squared 2-norms (one Ruiz step); zero rows and columns left alone."""
    with np.errstate(divide="ignore"):
        f = np.where(squared > 0, np.maximum(squared, 1e-300) ** -0.25, 1.0)
    return np.clip(f, *SWEEP_CLAMP)


@dataclass
class Scaling:
    """D (B, n), E (B, p), F (B, m), c (B,)."""

    D: np.ndarray
    E: np.ndarray
    F: np.ndarray
    c: np.ndarray

    def apply(self, pattern: SparsePattern, Qv, q, Gv, h, Av, b):
        """The scaled data (same shapes); h = +inf stays +inf."""
        D, E, F, c = self.D, self.E, self.F, self.c[:, None]
        qr, qc = pattern.rows("Q"), pattern.cols("Q")
        gr, gc = pattern.rows("G"), pattern.cols("G")
        ar, ac = pattern.rows("A"), pattern.cols("A")
        return (Qv * c * D[:, qr] * D[:, qc], q * D * c, Gv * E[:, gr] * D[:, gc], h * E,
                Av * F[:, ar] * D[:, ac], b * F)

    def solution(self, x, s, lam, nu):
        """Scaled (ẑ, ŝ, λ̂, ν̂) -> the user's (z, s, λ, ν)."""
        c = self.c[:, None]
        return x * self.D, s / self.E, lam * self.E / c, nu * self.F / c

    def scaled_point(self, z, s, lam, nu):
        """The user's (z, s, λ, ν) -> scaled: a warm start enters the scaled space."""
        c = self.c[:, None]
        return z / self.D, s * self.E, lam * c / self.E, nu * c / self.F

    def congruence(self, gz, gn, gl):
        """P·(g_z, g_ν, g_λ), P = diag(√c·D, F/√c, E/√c) (its own transpose)."""
        root = np.sqrt(self.c)[:, None]
        return gz * self.D * root, gn * self.F / root, gl * self.E / root


def equilibrate(pattern: SparsePattern, Qv, Gv, Av, q, sweeps: int = RUIZ_SWEEPS) -> Scaling:
    """Rows to unit norm, Ruiz sweeps for D, then the cost scale; arrays (B, ·)."""
    lay = pattern.layout
    n, p, m = pattern.n, pattern.p, pattern.m
    gr, gc = pattern.rows("G"), pattern.cols("G")
    ar, ac = pattern.rows("A"), pattern.cols("A")
    Qs = Qv @ lay.S_sym_T if Qv.shape[1] else np.zeros((Qv.shape[0], 0))  # symmetric Q
    sr, sc = lay.Qsym_rows, lay.Qsym_cols
    G2, A2 = Gv * Gv, Av * Av
    E = _norm_factor(segment_sum(G2, gr, p)) ** 2
    F = _norm_factor(segment_sum(A2, ar, m)) ** 2
    D = np.ones((Qv.shape[0], n))
    on_diag = sr == sc
    diag = segment_sum(Qs[:, on_diag], sr[on_diag], n)
    c0 = _cost_scale(diag, q, D)
    Q2 = Qs * Qs * (c0 ** 2)[:, None]
    for _ in range(sweeps):
        D2 = D * D
        col = (segment_sum(D2[:, sr] * Q2, sc, n) + segment_sum((E * E)[:, gr] * G2, gc, n)
               + segment_sum((F * F)[:, ar] * A2, ac, n))
        D = D * _norm_factor(D2 * col)
        D2 = D * D
        E = E * _norm_factor(E * E * segment_sum(G2 * D2[:, gc], gr, p))
        F = F * _norm_factor(F * F * segment_sum(A2 * D2[:, ac], ar, m))
    c = c0 * _cost_scale(diag * c0[:, None], q * c0[:, None], D)
    return Scaling(D, E, F, c)


def _cost_scale(diag: np.ndarray, q: np.ndarray, D: np.ndarray) -> np.ndarray:
    """c = 1/(mean diagonal of DQD), or 1/‖Dq‖∞ where Q = 0 (an LP); (B,).

    The diagonal bounds every entry of a semidefinite Q (|Qᵢⱼ| ≤ √(QᵢᵢQⱼⱼ)).
    """
    size = np.abs(diag * D * D).mean(axis=1)
    lp = np.abs(q * D).max(axis=1, initial=0.0)
    size = np.where(size > 0, size, lp)
    with np.errstate(divide="ignore"):
        c = np.where(size > 0, 1.0 / np.maximum(size, 1e-300), 1.0)
    return np.clip(c, *COST_CLAMP)
