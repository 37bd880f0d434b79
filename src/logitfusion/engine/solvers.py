"""Weight solvers: given one step's logits, choose the fusion weights a (per sequence).

Every solver is a pure function of logits and returns a `Choice`: the logits to decode from,
the chosen weights [B, T] and the objective J [B] (None where there is no objective), so that
callers can trace them. Which kinds of model a solver reads is declared (`reads`), and it gets
their logits by kind (`members.Logits`), so that "large alone" or "expert alone" run only that
model through the same decoding loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from . import search
from .errors import SolverError
from .fusion import fuse, grid_search, objective, one_expert_candidates, product_candidates
from .limits import MAX_GRID_POINTS, MAX_WEIGHT, weight_problem
from .members import Logits

@dataclass
class Choice:
    logits: Tensor  # [B, V] logits to decode from
    weights: Tensor | None = None  # [B, T]
    objective: Tensor | None = None  # [B]


def make_grid(start: float = 0.0, stop: float = 2.0, step: float = 0.1) -> list[float]:
    """Inclusive arithmetic grid, rounded so that 0.1 steps give 0.3 and not 0.30000000000000004."""
    if not all(math.isfinite(x) for x in (start, stop, step)):
        raise SolverError(f"grid start, stop and step must be finite numbers, got {start}:{stop}:{step}")
    if step <= 0:
        raise SolverError(f"grid step must be > 0, got {step}")
    if stop < start:
        raise SolverError(f"grid stop ({stop}) is below its start ({start})")
    points = (stop - start) / step + 1
    if points > MAX_GRID_POINTS + 1:  # counted before any list is built: 1e-12 steps would be 2e12 values
        raise SolverError(f"grid {start}:{stop}:{step} has {points:.3g} values, more than {MAX_GRID_POINTS}; "
                          "use a larger step (0:2:0.1 has 21)")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(n)]


def check_grid(grid: Sequence[float], a_max: float) -> None:
    if len(grid) == 0:
        raise SolverError("the weight grid is empty; give at least one value, e.g. 0:2:0.1")
    if len(grid) > MAX_GRID_POINTS:
        raise SolverError(f"the weight grid has {len(grid)} values, more than {MAX_GRID_POINTS}; use fewer")
    problem = weight_problem("grid values", grid)
    if problem:
        raise SolverError(problem)
    if not (math.isfinite(a_max) and a_max <= MAX_WEIGHT):
        raise SolverError(f"a_max must be a finite number no larger than {MAX_WEIGHT:g}, got {a_max}")
    bad = [a for a in grid if not (math.isfinite(a) and 0.0 <= a <= a_max)]
    if bad:
        raise SolverError(
            f"grid values {bad[:5]} are outside [0, a_max={a_max}]; "
            "use non-negative weights no larger than a_max (or raise a_max)"
        )


def refine(z_large: Tensor, z_small: Tensor, z_experts: Tensor, start: Tensor, a_max: float,
           steps: int = 30, step_size: float = 0.2) -> tuple[Tensor, Tensor]:
    """Continuous box-constrained descent on J from `start` [B, T], per sequence.

    Projected normalised-gradient steps with a per-sequence step size that grows on success and
    shrinks on failure; a step is kept only if it lowers J, so the result is never worse than
    `start`.
    """
    # Callers may run under inference_mode (the server does), where autograd cannot record:
    # leave it, and clone the logits into ordinary tensors.
    with torch.inference_mode(False), torch.enable_grad():
        z_large, z_small, z_experts = (z.detach().float().clone() for z in (z_large, z_small, z_experts))
        start = start.clone()

        def j_of(a: Tensor) -> Tensor:  # [B, T] -> [B]
            return objective(z_large, z_small, z_experts, a[:, None, :])[:, 0]

        a = start.detach().float().clone()
        j = j_of(a).detach()
        lr = torch.full_like(j, step_size)
        for _ in range(steps):
            a_req = a.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(j_of(a_req).sum(), a_req)
            direction = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            trial = (a - lr[:, None] * direction).clamp(0.0, a_max)
            j_trial = j_of(trial).detach()
            better = j_trial < j
            a = torch.where(better[:, None], trial, a)
            j = torch.where(better, j_trial, j)
            lr = torch.where(better, lr * 1.5, lr * 0.5)
    return a, j


class Solver:
    """A weight rule: `solver(z) -> Choice`, z the step's logits of the models it reads, by kind
    (members.Logits: .large, .small [B, V], .experts [B, T, V], .delta). It declares which kinds
    it reads, whether it can run speculatively and how it drafts."""

    name = "solver"
    reads: frozenset[str] = frozenset({"large", "small", "expert"})  # member kinds (members.KINDS) it reads
    experts: tuple[int, ...] | None = None  # indices of the experts read; None = all

    def __call__(self, z: Logits) -> Choice:
        raise NotImplementedError

    def check(self, n_experts: int) -> None:
        """Raise SolverError if this solver cannot run with n_experts experts."""

    def speculation_refusal(self) -> str | None:
        """Why speculative decoding cannot run with this solver, or None when it can (then `draft`
        gives the small side's proposals)."""
        return f"the {self.name} solver has no weights to draft with on the small side"

    def draft(self, z: Logits, choice: Choice) -> Tensor:
        """Speculative drafting: the small side's proposal logits [B, V] at a drafted position, from
        the small side's logits there (z.small, z.experts) and this round's exact `choice`."""
        raise SolverError(self.speculation_refusal() or f"{self.name} cannot draft", field="speculate")


class Linear(Solver):
    """A solver whose choice is linear weights on the experts' shifts (static and dynamic fusion):
    it drafts with the small base standing in for the large model, z_S + sum_t a_t (z_t - z_S),
    at the weights of the round's exact step."""

    def speculation_refusal(self) -> str | None:
        return None

    def draft(self, z: Logits, choice: Choice) -> Tensor:
        return fuse(z.small, z.small, z.experts, choice.weights)


class Rule(Solver):
    """A solver from a function of the step's logits (z: Logits) -> Choice, reading `reads`; the
    quickest way to try a new weight rule (register a spec whose `build` returns one)."""

    def __init__(self, name: str, fn, reads=("large", "small", "expert")):
        self.name, self.fn, self.reads = name, fn, frozenset(reads)

    def __call__(self, z: Logits) -> Choice:
        return self.fn(z)


@dataclass
class Static(Linear):
    """Fixed weights (proxy-tuning is one expert with a = 1). One weight per expert, or one for all."""

    weights: Sequence[float] = (1.0,)
    name: str = "static"

    def check(self, n_experts: int) -> None:
        if n_experts == 0:
            raise SolverError("the static solver needs at least one expert (and a small base)")
        if len(self.weights) not in (1, n_experts):
            raise SolverError(
                f"static solver got {len(self.weights)} weights for {n_experts} experts; "
                "give one weight per expert, or a single weight for all")
        problem = weight_problem("static weights", list(self.weights))
        if problem:
            raise SolverError(problem)

    def __call__(self, z: Logits) -> Choice:
        batch, n_experts = z.experts.shape[:2]
        w = torch.tensor(list(self.weights), dtype=torch.float32, device=z.large.device)
        w = w.expand(n_experts).expand(batch, n_experts)
        return Choice(fuse(z.large, z.small, z.experts, w), w, None)


@dataclass
class Dynamic(Linear):
    """Per-step, per-sequence weights by KL matching (method.md §3-4).

    strategy "fast": the paper's one-expert-per-step search (T x G candidates in one op).
    strategy "joint": all weights together: the exact product grid when it has at most
    `max_product` points, else a continuous box-constrained descent started from the fast
    path's answer. Either way J is never worse than the fast path's.

    search (the fast path, and one expert): "scan" evaluates J at every grid point (the
    reference); "exact" finds the same answer, bit for bit, from a few points (search.py);
    "auto" takes "exact" where it pays: a compiler for its kernel and a scan of at least
    search.PAYS elements (so the bundled zoo's small vocabulary keeps the scan).
    """

    grid: Sequence[float] = field(default_factory=lambda: make_grid(0.0, 2.0, 0.1))
    strategy: str = "fast"
    a_max: float | None = None  # box for the continuous solver; defaults to max(grid)
    max_product: int = 4096
    refine_steps: int = 30
    search: str = "auto"
    name: str = "dynamic"

    def __post_init__(self):
        self.grid = [float(a) for a in self.grid]
        if self.a_max is None and self.grid:
            self.a_max = max(self.grid)
        if self.strategy not in ("fast", "joint"):
            raise SolverError(f"unknown dynamic strategy {self.strategy!r}; use 'fast' or 'joint'")
        if self.search not in ("auto", "scan", "exact"):
            raise SolverError(f"unknown dynamic search {self.search!r}; use 'auto', 'scan' or 'exact'")
        check_grid(self.grid, self.a_max if self.a_max is not None else 0.0)
        self._grid_cache: dict[tuple, Tensor] = {}

    def check(self, n_experts: int) -> None:
        if n_experts == 0:
            raise SolverError("the dynamic solver needs at least one expert (and a small base)")

    def _candidates(self, kind: str, n_experts: int, device) -> Tensor:
        """kind "fast": one non-zero weight; "joint": the fast candidates first, then the product
        grid (without them a grid lacking 0 has no one-expert vectors, and joint could end up
        worse than fast)."""
        key = (kind, n_experts, str(device))
        if key not in self._grid_cache:  # built once, not per step
            grid = torch.tensor(sorted(self.grid), dtype=torch.float32, device=device)
            fast = one_expert_candidates(grid, n_experts)
            self._grid_cache[key] = fast if kind == "fast" else torch.cat([fast, product_candidates(grid, n_experts)])
        return self._grid_cache[key]

    def _exact(self, z_large: Tensor, n_experts: int) -> bool:
        if self.search != "auto":
            return self.search == "exact"
        return search.pays(z_large.shape[0] * n_experts * len(self.grid) * z_large.shape[1])

    def solve(self, z_large: Tensor, z_small: Tensor, z_experts: Tensor) -> tuple[Tensor, Tensor]:
        n_experts = z_experts.shape[1]
        if self.strategy == "fast" or n_experts == 1:
            if self._exact(z_large, n_experts):
                grid = self._candidates("fast", 1, z_large.device)[:, 0]  # the sorted grid
                return search.exact_search(z_large, z_small, z_experts, grid)
            return grid_search(z_large, z_small, z_experts,
                               self._candidates("fast", n_experts, z_large.device))
        if len(self.grid) ** n_experts <= self.max_product:
            return grid_search(z_large, z_small, z_experts,
                               self._candidates("joint", n_experts, z_large.device))
        start, _ = grid_search(z_large, z_small, z_experts,
                               self._candidates("fast", n_experts, z_large.device))
        return refine(z_large, z_small, z_experts, start, self.a_max, steps=self.refine_steps)

    def __call__(self, z: Logits) -> Choice:
        weights, j = self.solve(z.large, z.small, z.experts)
        return Choice(fuse(z.large, z.small, z.experts, weights), weights, j)


@dataclass
class Alone(Solver):
    """Decode from one model alone (the large base, or one expert) through the same loop."""

    member: str = "large"  # "large" or "expert"
    expert: int = 0
    name: str = "alone"

    def __post_init__(self):
        if self.member not in ("large", "expert"):
            raise SolverError(f"Alone(member={self.member!r}): use 'large' or 'expert'")
        self.reads = frozenset({self.member})
        self.experts = (self.expert,) if self.member == "expert" else ()

    def check(self, n_experts: int) -> None:
        if self.member == "expert" and not 0 <= self.expert < n_experts:
            raise SolverError(f"expert index {self.expert} out of range for {n_experts} experts")

    def __call__(self, z: Logits) -> Choice:
        return Choice((z.large if self.member == "large" else z.experts[:, 0]).float())

    def speculation_refusal(self) -> str | None:
        return f"the {self.member} model alone is not a fusion: the small side has nothing to draft for it"


@dataclass
class Delta(Solver):
    """Cross-model control (method.md §7): decode from log_softmax(z_user) + a * z_delta, where the
    user model is the recipe's `large` and z_delta is already in the user's vocabulary (mapped,
    0 where unmapped, when the delta has another tokenizer)."""

    strength: float = 1.0
    name: str = "delta"
    reads = frozenset({"large", "delta"})
    experts = ()

    def check(self, n_experts: int) -> None:
        if not math.isfinite(self.strength):
            raise SolverError(f"delta strength must be finite, got {self.strength}")

    def __call__(self, z: Logits) -> Choice:
        return Choice(z.large.float().log_softmax(-1) + self.strength * z.delta.float())

    def speculation_refusal(self) -> str | None:
        return "the delta solver reads no small base to draft with"


def parse_grid(text: str) -> list[float]:
    """'0:2:0.1' (start:stop:step, inclusive) or '0,0.5,1' (explicit values)."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SolverError(f"bad grid {text!r}; write start:stop:step (e.g. 0:2:0.1) or values (0,0.5,1)") from None
    if ":" in text:
        return make_grid(start, stop, step)
    if not values:
        raise SolverError(f"the grid {text!r} has no values; write start:stop:step (e.g. 0:2:0.1) or values (0,0.5,1)")
    check_grid(values, max(values))
    return values
