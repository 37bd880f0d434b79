"""Fusion maths as pure functions of logits (method.md §2-4). No model is needed to use them.

Shapes: B = batch, T = experts, C = candidate weight vectors, V = vocabulary.
Everything is computed in float32, whatever dtype the models ran in.
"""

from __future__ import annotations

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


def objective(z_large: Tensor, z_small: Tensor, z_experts: Tensor, candidates: Tensor) -> Tensor:
    """J(a) of method.md §4 (§3 when T = 1) for every candidate weight vector.

    candidates: [C, T] (shared by the batch) or [B, C, T] -> J: [B, C]
    J(a) = sum_t (KL(P_a||P) - KL(Q_t||Q))^2 + (KL(P||P_a) - KL(Q||Q_t))^2

    With the shift s = sum_t a_t (z_t - z_S), log P_a = log P + s - D where D = log E_P[e^s], so
    KL(P_a||P) = E_{P_a}[s] - D and KL(P||P_a) = D - E_P[s]. One exp pass over [B, C, V] gives
    D and E_{P_a}[s]: no log-softmax or KL of the fused distributions is ever materialised
    (decoding is memory-bound, and at batch 8 with a 32k vocabulary those [B, C, V] temporaries
    cost more than the small models' forwards).
    """
    target_fwd, target_rev = kl_targets(z_small, z_experts)  # [B, T]
    deltas = z_experts.float() - z_small.float()[:, None]  # [B, T, V]
    log_p = torch.log_softmax(z_large.float(), -1)  # [B, V]
    mean_p = torch.einsum("bv,btv->bt", log_p.exp(), deltas)  # E_P[z_t - z_S]  [B, T]
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
    return ((moved_fwd[..., None] - target_fwd[:, None]) ** 2
            + (moved_rev[..., None] - target_rev[:, None]) ** 2).sum(-1)
