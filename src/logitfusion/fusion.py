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
    """
    target_fwd, target_rev = kl_targets(z_small, z_experts)  # [B, T]
    deltas = z_experts.float() - z_small.float()[:, None]  # [B, T, V]
    log_p = torch.log_softmax(z_large.float(), -1)[:, None]  # [B, 1, V]
    candidates = candidates.float().expand(deltas.shape[0], -1, -1)  # [B, C, T]
    shift = torch.einsum("bct,btv->bcv", candidates, deltas)  # [B, C, V]
    log_pa = torch.log_softmax(z_large.float()[:, None] + shift, -1)  # [B, C, V]
    moved_fwd = kl(log_pa, log_p)[..., None]  # [B, C, 1]  KL(P_a || P)
    moved_rev = kl(log_p, log_pa)[..., None]  # [B, C, 1]  KL(P || P_a)
    return ((moved_fwd - target_fwd[:, None]) ** 2 + (moved_rev - target_rev[:, None]) ** 2).sum(-1)
