"""Weight rules beyond the paper's (issue 24): the maths as pure functions of one step's logits,
then the solvers built on them (registered as kinds at the end of registry.py).

- plausible: any linear rule (static, dynamic) restricted to the tokens with at least alpha x the
  top probability under a chosen model; the others get -inf (a mask, not an error).
- nudge (Fei et al. 2024, token level): the large model decodes where its top probability is at
  least gamma; elsewhere the expert (or a linear rule) does.
- keep: the large model decodes unless the expert objects to its top token (under beta x the
  expert's top probability); where it objects, a linear rule restricted to the expert's
  plausible set. The expert brings the format, the large model keeps its content.
- route: several experts, no task label. Each step, each expert is scored by the direction of its
  shift: how far fine-tuning moved the small model toward what the large model predicts,
  E_P[log Q_t - log Q] = KL(P||Q) - KL(P||Q_t). Only experts that move toward P count; the best
  (or a softmax over them) forms one virtual expert, weighed by a linear rule.

Shapes: B = batch, T = experts, V = vocabulary. Everything in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import SolverError
from .fusion import fuse
from .members import Logits
from .solvers import Choice, Linear, Solver

BY = ("expert", "large", "small", "either")  # which model's plausible set restricts a rule


# ---------------------------------------------------------------- maths

def plausible(z: Tensor, alpha: float) -> Tensor:
    """Tokens with p(v) >= alpha * max p under logits z: [..., V] -> bool [..., V].
    p(v) >= alpha p_max  <=>  z_v >= max z + log(alpha), so no softmax is needed."""
    return z.float() >= z.float().amax(-1, keepdim=True) + math.log(alpha)


def plausible_set(z: Logits, by: str, alpha: float) -> Tensor:
    """The plausible set under the model `by` names: [B, V] bool. "expert": plausible under at
    least one expert; "either": under the large model or an expert."""
    if by == "large":
        return plausible(z.large, alpha)
    if by == "small":
        return plausible(z.small, alpha)
    experts = plausible(z.experts, alpha).any(1)  # [B, T, V] -> [B, V]
    return experts | plausible(z.large, alpha) if by == "either" else experts


def restrict(z: Tensor, keep: Tensor) -> Tensor:
    """Logits [B, V] with -inf outside keep [B, V]."""
    return z.float().masked_fill(~keep, -math.inf)


def unsure(z_large: Tensor, gamma: float) -> Tensor:
    """Rows where the large model's top probability is below gamma: [B, V] -> bool [B]."""
    return z_large.float().log_softmax(-1).amax(-1) < math.log(gamma)


def objects(z_large: Tensor, z_experts: Tensor, beta: float) -> Tensor:
    """Rows where no expert finds the large model's top token plausible at beta:
    z_large [B, V], z_experts [B, T, V] -> bool [B]."""
    top = z_large.argmax(-1)  # [B]
    ok = plausible(z_experts, beta).gather(-1, top[:, None, None].expand(-1, z_experts.shape[1], 1))  # [B, T, 1]
    return ~ok[..., 0].any(-1)


def toward(z_large: Tensor, z_small: Tensor, z_experts: Tensor) -> Tensor:
    """How far fine-tuning moved the small model toward the large model's prediction, per expert:
    E_P[log Q_t - log Q] = KL(P||Q) - KL(P||Q_t). [B, V], [B, V], [B, T, V] -> [B, T]"""
    p = z_large.float().softmax(-1)[:, None]  # [B, 1, V]
    shift = z_experts.float().log_softmax(-1) - z_small.float().log_softmax(-1)[:, None]  # [B, T, V]
    return (p * shift).sum(-1)


def route_weights(score: Tensor, temperature: float) -> Tensor:
    """Mixture weights [B, T] over the experts with a positive score [B, T]: all on the best one
    (temperature 0), else softmax(score / temperature) over them; zeros where none is positive."""
    positive = score > 0
    if temperature == 0:
        w = torch.zeros_like(score).scatter_(-1, score.argmax(-1, keepdim=True), 1.0)
        return w * positive
    w = (score / temperature).masked_fill(~positive, -math.inf).softmax(-1)
    return torch.nan_to_num(w, nan=0.0)  # a row with no positive score: softmax of all -inf


# ---------------------------------------------------------------- solvers

def _linear(base: Solver, name: str) -> Solver:
    if not isinstance(base, Linear):
        raise SolverError(f"the {name} rule's base must be a linear rule (static or dynamic), got {base.name!r}")
    return base


class Plausible(Linear):
    """A linear rule restricted to the plausible set of the model `by` names (alpha). Drafts as its
    base does: any proposal is exact under speculative sampling, and a masked token is never kept."""

    def __init__(self, base: Solver, by: str = "expert", alpha: float = 0.1):
        if by not in BY:
            raise SolverError(f"plausible: unknown model {by!r}; use {', '.join(BY)}")
        self.base, self.by, self.alpha, self.name = _linear(base, "plausible"), by, alpha, "plausible"

    def check(self, n_experts: int) -> None:
        self.base.check(n_experts)

    def __call__(self, z: Logits) -> Choice:
        c = self.base(z)
        return Choice(restrict(c.logits, plausible_set(z, self.by, self.alpha)), c.weights, c.objective)


class Nudge(Solver):
    """Token-level nudging: the large model's distribution where it is sure (top probability >=
    gamma), the expert's (one expert) or a linear rule's elsewhere. Weights: the base's where it
    nudged (1 for the expert alone), 0 elsewhere."""

    def __init__(self, gamma: float = 0.3, base: Solver | None = None):
        self.gamma, self.base, self.name = gamma, base and _linear(base, "nudge"), "nudge"
        self.reads = frozenset({"large", "expert"} | ({"small"} if base else set()))
        self.experts = None if base else (0,)  # alone: the first expert, as kind `expert` takes

    def check(self, n_experts: int) -> None:
        if self.base is not None:
            return self.base.check(n_experts)
        if n_experts == 0:
            raise SolverError("the nudge solver needs an expert")

    def __call__(self, z: Logits) -> Choice:
        if self.base is not None:
            c = self.base(z)
            other, weights = c.logits, c.weights
        else:
            other, weights = z.experts[:, 0], torch.ones(z.large.shape[0], 1, device=z.large.device)
        nudged = unsure(z.large, self.gamma)  # [B]
        logits = torch.where(nudged[:, None], other.float().log_softmax(-1), z.large.float().log_softmax(-1))
        return Choice(logits, weights * nudged[:, None], None)

    def speculation_refusal(self) -> str | None:
        return "the nudge solver switches between whole models per step; the small side has no fusion to draft"


class Keep(Linear):
    """The large model decodes unless the experts object to its top token (beta); where they do,
    the base rule restricted to the experts' plausible set (alpha). Weights: the base's where it
    decided, 0 where the large model did (so drafts there are the small base's own)."""

    def __init__(self, base: Solver, beta: float = 0.1, alpha: float = 0.1):
        self.base, self.beta, self.alpha, self.name = _linear(base, "keep"), beta, alpha, "keep"

    def check(self, n_experts: int) -> None:
        self.base.check(n_experts)

    def __call__(self, z: Logits) -> Choice:
        c = self.base(z)
        vetoed = objects(z.large, z.experts, self.beta)  # [B]
        fused = restrict(c.logits, plausible(z.experts, self.alpha).any(1))
        logits = torch.where(vetoed[:, None], fused, z.large.float().log_softmax(-1))
        return Choice(logits, c.weights * vetoed[:, None], c.objective)


class Route(Linear):
    """Several experts, no task label: the experts that move the small model toward the large
    model's prediction (`toward`) form one virtual expert (`route_weights`), which a one-weight
    linear rule weighs. Weights per expert: the rule's weight times the mixture's."""

    def __init__(self, base: Solver, temperature: float = 0.0):
        self.base, self.temperature, self.name = _linear(base, "route"), temperature, "route"

    def check(self, n_experts: int) -> None:
        self.base.check(1)  # the base weighs one (virtual) expert
        if n_experts == 0:
            raise SolverError("the route solver needs at least one expert (and a small base)")

    def __call__(self, z: Logits) -> Choice:
        w = route_weights(toward(z.large, z.small, z.experts), self.temperature)  # [B, T]
        mixed = fuse(z.small, z.small, z.experts, w)[:, None]  # z_S + sum_t w_t (z_t - z_S)  [B, 1, V]
        c = self.base(Logits.of(large=z.large, small=z.small, experts=mixed))
        return Choice(c.logits, c.weights * w, c.objective)
