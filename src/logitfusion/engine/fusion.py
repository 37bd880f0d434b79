"""Fusion maths as pure functions of logits (method.md §2-4). No model is needed to use them.

Shapes: B = batch, T = experts, C = candidate weight vectors, V = vocabulary.
Everything is computed in float32, whatever dtype the models ran in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fuse(z_large: Tensor, z_small: Tensor, z_experts: Tensor, weights: Tensor) -> Tensor:
    """z_L + sum_t a_t (z_t - z_S).

    z_large, z_small: [B, V]; z_experts: [B, T, V]; weights: [B, T] or [T] -> [B, V]
    """
    deltas = z_experts.float() - z_small.float()[:, None]  # [B, T, V]
    weights = weights.float().expand(deltas.shape[0], deltas.shape[1])  # [B, T]
    return z_large.float() + torch.einsum("bt,btv->bv", weights, deltas)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) over the last axis, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_targets(z_small: Tensor, z_experts: Tensor) -> tuple[Tensor, Tensor]:
    """How far fine-tuning moved the small model, both ways: (KL(Q_t||Q), KL(Q||Q_t)), each [B, T]."""
    log_q = torch.log_softmax(z_small.float(), -1)[:, None]  # [B, 1, V]
    log_qt = torch.log_softmax(z_experts.float(), -1)  # [B, T, V]
    return kl(log_qt, log_q), kl(log_q, log_qt)


def prepare(z_large: Tensor, z_small: Tensor, z_experts: Tensor) -> tuple[Tensor, ...]:
    """What J needs besides the candidates, computed once per step for any number of them:
    the KL targets [B, T] (both ways), deltas z_t - z_S [B, T, V], log P [B, V] and
    E_P[z_t - z_S] [B, T]."""
    target_fwd, target_rev = kl_targets(z_small, z_experts)  # [B, T]
    deltas = z_experts.float() - z_small.float()[:, None]  # [B, T, V]
    log_p = torch.log_softmax(z_large.float(), -1)  # [B, V]
    mean_p = torch.einsum("bv,btv->bt", log_p.exp(), deltas)  # E_P[z_t - z_S]  [B, T]
    return target_fwd, target_rev, deltas, log_p, mean_p


def objective(z_large: Tensor, z_small: Tensor, z_experts: Tensor, candidates: Tensor) -> Tensor:
    """J(a) of method.md §4 (§3 when T = 1) for every candidate weight vector.

    candidates: [C, T] (shared by the batch) or [B, C, T] -> J: [B, C]
    J(a) = sum_t (KL(P_a||P) - KL(Q_t||Q))^2 + (KL(P||P_a) - KL(Q||Q_t))^2
    (the two KL of P_a: `moves_of`)
    """
    return objective_of(prepare(z_large, z_small, z_experts), candidates)


def objective_of(prepared: tuple[Tensor, ...], candidates: Tensor) -> Tensor:
    """`objective` from `prepare`'s output: the same operations, so the same bits, whether J is
    taken at every grid point (the reference scan) or at a few (the exact search)."""
    target_fwd, target_rev = prepared[:2]
    moved_fwd, moved_rev = moves_of(prepared, candidates)  # [B, C] each
    return ((moved_fwd[..., None] - target_fwd[:, None]) ** 2
            + (moved_rev[..., None] - target_rev[:, None]) ** 2).sum(-1)


def moves_of(prepared: tuple[Tensor, ...], candidates: Tensor) -> tuple[Tensor, Tensor]:
    """How far each candidate moves the large model, both ways: (KL(P_a||P), KL(P||P_a)), [B, C].

    With the shift s = sum_t a_t (z_t - z_S), log P_a = log P + s - D where D = log E_P[e^s], so
    KL(P_a||P) = E_{P_a}[s] - D and KL(P||P_a) = D - E_P[s]. One exp pass over [B, C, V] gives
    D and E_{P_a}[s]: no log-softmax or KL of the fused distributions is ever materialised
    (decoding is memory-bound, and at batch 8 with a 32k vocabulary those [B, C, V] temporaries
    cost more than the small models' forwards).
    """
    _, _, deltas, log_p, mean_p = prepared
    candidates = candidates.float().expand(deltas.shape[0], -1, -1)  # [B, C, T]
    shift = torch.einsum("bct,btv->bcv", candidates, deltas)  # [B, C, V]
    x = log_p[:, None] + shift  # log P + s  [B, C, V]
    top = x.detach().amax(-1, keepdim=True)  # [B, C, 1], a constant for autograd (refine)
    # In place: P e^s / e^top, unnormalised. The clamp drops nothing measurable (terms below
    # e^-87 of a sum that is >= 1) but keeps exp off its underflow path, 35x slower on CPUs.
    e = x.sub_(top).clamp_min_(-87.0).exp_()  # [B, C, V]
    total = e.sum(-1)  # [B, C]
    log_partition = total.log() + top[..., 0]  # D  [B, C]
    moved_fwd = torch.linalg.vecdot(e, shift) / total - log_partition  # KL(P_a || P)  [B, C]
    moved_rev = log_partition - torch.einsum("bct,bt->bc", candidates, mean_p)  # KL(P || P_a)  [B, C]
    return moved_fwd, moved_rev


def one_expert_moves(log_p: Tensor, deltas: Tensor, mean_p: Tensor, expert: Tensor,
                     weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KL(P_a||P) and KL(P||P_a), the two quantities J matches to its targets, at K one-expert
    weight vectors per sequence (weight[b, k] on expert[b, k] alone), with a bound on the rounding
    error of each, for this kernel and for `moves_of` alike: the exact search's kernel. Compiled,
    it is one pass over the logits per call with no [B, K, V] temporary. Its terms are moves_of's
    float32 arithmetic; its sums accumulate in float64.

    The bound, first order in u = 2^-24: each term P e^s / e^top is off by a relative u A, where
    A = |s| + |x| + |x - top| + 2 counts the roundings of s, x = log P + s, x - top and exp.
    Then log-partition D is off by E_w[u A] (w: the normalised terms), E_{P_a}[s] by
    E_w[u A |s - E|] <= u sqrt(E_w[A^2] Var_w[s]), and each float32 sum of V terms by
    (log2 V + 8) u of its absolute terms. A peaked P_a has tiny bounds: the terms that matter
    share one s.

    log_p [B, V], deltas [B, T, V], mean_p [B, T], expert [B, K] (long), weight [B, K]
    -> (KL(P_a||P), KL(P||P_a), bound on the first's error, bound on the second's), each [B, K]
    float64
    """
    rows = deltas.gather(1, expert[..., None].expand(-1, -1, deltas.shape[-1]))  # [B, K, V]
    shift = weight[..., None] * rows  # [B, K, V]
    x = log_p[:, None] + shift
    top = x.amax(-1, keepdim=True)  # [B, K, 1]
    e = (x - top).clamp_min(-87.0).exp()
    # Clamped terms are e^-87 exactly in both codes: no rounding to count (and x may be -inf).
    size = torch.where(x - top > -87.0, shift.abs() + x.abs() + (x - top).abs() + 2.0, 0.0)

    def mean(v):  # float64 sum of e * v  [B, K]
        return (e * v).sum(-1, dtype=torch.float64)

    total = e.sum(-1, dtype=torch.float64)
    moved_s, moved_s2 = mean(shift) / total, mean(shift * shift) / total  # E_w[s], E_w[s^2]
    abs_s, size1, size2 = mean(shift.abs()) / total, mean(size) / total, mean(size * size) / total
    log_partition = total.log() + top[..., 0]
    moved_fwd = moved_s - log_partition
    moved_rev = log_partition - weight * mean_p.gather(1, expert)
    u, sums = 2.0 ** -24, math.log2(deltas.shape[-1]) + 8.0
    err_d = u * (size1 + sums + 2 * total.log().abs() + log_partition.abs())
    err_s = u * ((size2 * (moved_s2 - moved_s ** 2).clamp_min(0.0)).sqrt()
                 + (sums + 1) * (abs_s + moved_s.abs()))
    err_fwd = err_s + err_d + u * (moved_fwd.abs() + moved_s.abs() + log_partition.abs())
    err_rev = err_d + u * (2 * (moved_rev - log_partition).abs() + moved_rev.abs())
    return moved_fwd, moved_rev, err_fwd, err_rev


# ---------------------------------------------------------------- searching candidate weights

# Float32 elements of one [B, C, V] objective chunk (~128 MB). A 21-point grid at batch 8 and a
# 32k vocabulary is 5.4M elements: one chunk, i.e. one batched op. Only product grids of several
# experts are split, so memory stays bounded. (Cache-sized chunks were measured on a CPU too:
# slower than one op at every size tried, up to 3x at batch 1 with a 32k vocabulary.)
MAX_CHUNK_ELEMENTS = 2**25


def one_expert_candidates(grid: Tensor, n_experts: int) -> Tensor:
    """The paper's fast path: only one a_t is non-zero per candidate. [T * G, T]"""
    eye = torch.eye(n_experts, dtype=grid.dtype, device=grid.device)  # [T, T]
    return (eye[:, None, :] * grid[None, :, None]).reshape(-1, n_experts)


def product_candidates(grid: Tensor, n_experts: int) -> Tensor:
    """Every combination of grid values. [G ** T, T]"""
    return torch.cartesian_prod(*([grid] * n_experts)).reshape(-1, n_experts)


def grid_search(z_large: Tensor, z_small: Tensor, z_experts: Tensor, candidates: Tensor,
                max_elements: int = MAX_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """argmin_a J(a) over candidates [C, T], per sequence -> (weights [B, T], J [B]).

    Ties go to the earliest candidate (the smallest weights with a sorted grid).
    """
    batch, vocab = z_large.shape
    chunk = max(1, max_elements // (batch * vocab))
    best_j = torch.full((batch,), math.inf, device=z_large.device)
    best_a = torch.zeros(batch, candidates.shape[1], device=z_large.device)
    for part in candidates.split(chunk):  # one iteration unless the candidate set is huge
        j = objective(z_large, z_small, z_experts, part)  # [B, c]
        j_min, idx = j.min(-1)
        better = j_min < best_j
        best_j = torch.where(better, j_min, best_j)
        best_a = torch.where(better[:, None], part[idx], best_a)
    return best_a, best_j
