"""The exact weight search: the full grid scan's answer, bit for bit, from a few grid points.

The reference (`solvers.grid_search` over one-expert candidates) evaluates J at every grid
value of every expert. Here, per sequence and expert, t's one-dimensional problem over a sorted
grid a_0 <= ... <= a_{G-1} (a >= 0) is

    J(a) = phi_F(F(a)) + phi_R(R(a)),   phi_F(x) = sum_s (x - KL(Q_s||Q))^2,   F(a) = KL(P_a||P)
                                        phi_R(y) = sum_s (y - KL(Q||Q_s))^2,   R(a) = KL(P||P_a)

With K(a) = log E_P[e^{a d}] (d = z_t - z_S), F = a K' - K and R = K - a K'(0), so F' = a K'' >= 0
and R' = K'(a) - K'(0) >= 0: both never decrease on a >= 0. So between two evaluated grid points
l < i < h, F(a_i) lies in [F(a_l), F(a_h)] (and below the first evaluated point or above the
last, in a half-line), which bounds J(a_i) from below without evaluating it: the smallest phi
over a box. A point whose lower bound exceeds some evaluated point's upper bound cannot be the
argmin; every other point is a candidate, and J is taken at the candidates with the reference's
own code (`fusion.objective_of`), which gives the same bits as the full scan. The earliest
minimum among them is the scan's answer, ties included: a point that ties the minimum always
stays a candidate.

Rounding: every float F and R here (the kernel's and the reference's) is treated as the exact
one to within its bound (the kernel's per-point bound where it ran, `global_bounds` elsewhere), and R's monotonicity as holding up to the rounding of
E_P[d] (measured in float64). The bounds are a first-order rounding model, checked against
float64 (tests/test_exact_search.py: the worst measured error is under 1/40 of eps). Where
anything is not finite, or too many points stay candidates, the search runs the full scan.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import Tensor

from .fusion import grid_search, objective_of, one_expert_candidates, one_expert_moves, prepare

log = logging.getLogger(__name__)

U = 2.0 ** -24  # float32 unit roundoff
# The kernel's per-point rounding bounds are first order and worst case; the worst error measured
# against float64 is under 2/3 of them (tests/test_exact_search.py), so 3x leaves 4.5x headroom.
SAFETY = 3.0
# Scans of fewer [B, T * G, V] elements cost less than the search's fixed cost (a few small
# ops per round) and its kernel's compile; measured on a 2-core CPU (docs/performance.md).
PAYS = 2**21


# ---------------------------------------------------------------- the kernel, compiled once

_compiled: dict = {}  # function -> torch.compile(function), shared by every shape (dynamic shapes)
_compile_failed = False


def compiled_available() -> bool:
    """torch.compile may be used (LOGITFUSION_COMPILE=0 turns it off) and has not failed."""
    return not _compile_failed and os.environ.get("LOGITFUSION_COMPILE", "1") != "0"


def pays(scan_elements: int) -> bool:
    """Whether the compiled search beats the scan at this size (Dynamic's search="auto")."""
    return scan_elements >= PAYS and compiled_available()


def run_kernel(compiled: bool, fn, *args: Tensor):
    """fn(*args), through torch.compile if asked and possible, else eager (after one log line if
    compiling failed, e.g. no C++ compiler). Shapes are dynamic, so a new batch size or
    vocabulary does not compile again (a size of 1 gets its own specialisation: a few compiles
    per process at most, each ~5-20 s on a 2-core CPU)."""
    global _compile_failed
    if compiled and compiled_available():
        try:
            if fn not in _compiled:
                _compiled[fn] = torch.compile(fn, dynamic=True)
            return _compiled[fn](*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
            _compile_failed = True
            log.warning("logitfusion: torch.compile of the weight search failed (%s: %s); "
                        "using the eager kernel", type(err).__name__, str(err).splitlines()[0][:200])
    return fn(*args)


def evaluate(compiled: bool, *args: Tensor) -> tuple[Tensor, ...]:
    """`fusion.one_expert_moves(*args)`, compiled or not."""
    return run_kernel(compiled, one_expert_moves, *args)


# ---------------------------------------------------------------- bounds

def global_bounds(deltas: Tensor, log_p: Tensor, mean_p: Tensor, a_max: float,
                  compiled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per sequence and expert [B, T], float64: eps_f, eps_r bound the reference's rounding error
    of F and R at any grid point, evaluated or not; slope bounds how fast R may fall.

    First-order model, a priori (the kernel's per-point bounds are far tighter, but exist only
    where it ran): with S = a_max max|d|, the terms that matter have |x| <= 3S + log V + 100, so
    each exp term is off by a relative u (4S + ...), which moves E_{P_a}[s] by u S^2 and the
    log-partition by u S; sums add u log V. The factors (64, 256) leave over 40x headroom over
    the worst error measured against float64 on adversarial logits (tests/test_exact_search.py).
    """
    s = a_max * deltas.abs().amax(-1).double()  # [B, T]
    n = math.log(deltas.shape[-1]) + 1.0
    eps_f = 64 * U * (s * s + s + n)
    eps_r = 256 * U * (s + n)
    # R' = E_{P_a}[d] - mean_p >= E_P[d] - mean_p: the float mean_p may sit slightly above the
    # exact E_P[d], and R then falls by at most that much per unit of a.
    mean, abs_mean = run_kernel(compiled, exact_mean, log_p, deltas)
    slope = (mean_p.double() - mean).clamp_min(0.0) + 4 * U * abs_mean  # [B, T]
    return eps_f, eps_r, slope


def exact_mean(log_p: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """E_P[d] and E_P[|d|] with float64 sums, P normalised: each term is off by at most 3u
    (exp, then the product), so E_P[d] by 3u E_P[|d|]. [B, V], [B, T, V] -> two [B, T] float64"""
    p = log_p.exp()[:, None]  # [B, 1, V]
    total = p.sum(-1, dtype=torch.float64)  # [B, 1]
    return (p * deltas).sum(-1, dtype=torch.float64) / total, (p * deltas.abs()).sum(-1, dtype=torch.float64) / total


def box(values: Tensor, errors: Tensor, known: Tensor, own_unknown: Tensor) -> tuple[Tensor, Tensor]:
    """Where the reference's value of a non-decreasing quantity can lie at each grid index.
    Evaluated: the kernel's value, give or take its error bound twice (the kernel's and the
    reference's). Not evaluated: between the nearest evaluated neighbours' exact values (each
    within its bound), widened by `own_unknown`: the reference's a-priori error there plus what
    rounding allows against monotonicity; a half-line beyond the first or last one.
    values, errors: [..., G] float64 (anything where not known); known: [..., G] bool;
    own_unknown: [..., 1] -> (lo, hi), each [..., G]"""
    g = known.shape[-1]
    idx = torch.arange(g, device=known.device)
    below = torch.where(known, idx, -1).cummax(-1).values.expand_as(values)  # nearest evaluated at or below
    above = torch.where(known, idx, g).flip(-1).cummin(-1).values.flip(-1).expand_as(values)  # at or above
    own = torch.where(known, errors, own_unknown)  # the reference's error here
    lo = torch.where(below >= 0, (values - errors).gather(-1, below.clamp_min(0)) - own, -math.inf)
    hi = torch.where(above < g, (values + errors).gather(-1, above.clamp_max(g - 1)) + own, math.inf)
    return lo, hi


def phi_range(lo: Tensor, hi: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """min and max of phi(x) = sum_s (x - targets_s)^2 over x in [lo, hi] (max inf if unbounded).
    lo, hi: [..., B, T, G]; targets: [..., B, S] float64 -> two [..., B, T, G]"""
    t = targets[..., None, None, :]  # [..., B, 1, 1, S]
    centre = targets.mean(-1)[..., None, None]  # phi's minimiser  [..., B, 1, 1]

    def phi(x):
        return ((x[..., None] - t) ** 2).sum(-1)

    low = phi(torch.maximum(torch.minimum(centre, hi), lo))
    ends = torch.maximum(phi(lo.clamp_min(-1e300)), phi(hi.clamp_max(1e300)))
    high = torch.where(torch.isfinite(lo) & torch.isfinite(hi), ends, math.inf)
    return low, high


# ---------------------------------------------------------------- the search

def exact_search(z_large: Tensor, z_small: Tensor, z_experts: Tensor, grid: Tensor,
                 compiled: bool | None = None, per_round: int = 4) -> tuple[Tensor, Tensor]:
    """argmin_a J(a) over the one-expert candidates of a sorted grid >= 0 [G]: exactly what
    `grid_search(..., one_expert_candidates(grid, T))` returns -> (weights [B, T], J [B]).
    compiled: run the kernel through torch.compile (None: where it pays, see `pays`)."""
    batch, n_experts = z_experts.shape[:2]
    g = grid.shape[0]
    if compiled is None:
        compiled = pays(batch * n_experts * g * z_large.shape[-1])
    prepared = prepare(z_large, z_small, z_experts)
    target_fwd, target_rev, deltas, log_p, mean_p = prepared
    a_max = float(grid[-1])
    eps_f, eps_r, slope = global_bounds(deltas, log_p, mean_p, a_max, compiled)
    everything = one_expert_candidates(grid, n_experts)  # [T * G, T], the scan's order

    def scan():
        return grid_search(z_large, z_small, z_experts, everything)

    if everything.shape[0] == 1:  # one grid point, one expert: nothing to search
        return scan()

    # Beyond u S ~ 1e-4 the first-order model is no longer safe (logits in the thousands).
    if not torch.isfinite(target_fwd.sum() + target_rev.sum() + eps_f.sum() + slope.sum()) \
            or (U * a_max * deltas.abs().amax()) > 1e-4:
        return scan()
    # F and R side by side: [2, B, T, G] for values and bounds; the reference's error where
    # nothing was evaluated (R's widened by how far it may fall over the grid); the targets.
    own_unknown = torch.stack([eps_f, eps_r + slope * a_max])[..., None]  # [2, B, T, 1]
    targets = torch.stack([target_fwd, target_rev]).double()  # [2, B, T]

    known = torch.zeros(batch, n_experts * g, dtype=torch.bool, device=grid.device)
    found = torch.zeros(4, batch, n_experts * g, dtype=torch.float64, device=grid.device)  # F, R, their bounds

    def run(expert: Tensor, index: Tensor) -> bool:  # [B, K] each: evaluate, remember; False if not finite
        values = torch.stack(evaluate(compiled, log_p, deltas, mean_p, expert, grid[index]))  # [4, B, K]
        flat = expert * g + index  # [B, K]
        found.scatter_(2, flat.expand(4, -1, -1), values)
        known.scatter_(1, flat, True)
        return bool(torch.isfinite(values.sum()))

    # First round: `per_round` evenly spread points of every expert's grid.
    first = torch.linspace(0, g - 1, per_round + 2, device=grid.device)[1:-1].round().long().unique()
    finite = run(torch.arange(n_experts, device=grid.device).repeat_interleave(first.numel()).expand(batch, -1),
                 first.repeat(n_experts).expand(batch, -1))
    idx = torch.arange(g, device=grid.device)
    for _ in range(g):  # each round evaluates at least one new point per unsettled row
        if not finite:
            return scan()
        shaped = found.view(4, batch, n_experts, g)
        lo, hi = box(shaped[:2], SAFETY * shaped[2:], known.view(batch, n_experts, g), own_unknown)
        if (lo > hi).any():  # not monotone within the bounds: distrust them
            return scan()
        low, high = phi_range(lo, hi, targets)  # [2, B, T, G]
        lower = low.sum(0) * (1 - 1e-5)  # J's own rounding: a few float32 operations
        upper = high.sum(0) * (1 + 1e-5)
        best = upper.view(batch, -1).amin(-1)  # [B]
        candidate = lower.view(batch, -1) <= best[:, None]  # [B, T * G]; a tie with the minimum stays in
        todo = candidate & ~known
        if not todo.any():
            break
        # Evaluate the unknown candidates nearest the best known point of their expert first
        # (the neighbours that prune the rest), the best expert's before the others'.
        centre = torch.where(known.view(batch, n_experts, g), upper, math.inf).argmin(-1, keepdim=True)
        far = (idx - centre).abs().double() + g * (upper.amin(-1, keepdim=True) > best[:, None, None])
        order = torch.where(todo, far.view(batch, -1), math.inf)  # [B, T * G]
        want = int(todo.sum(-1).max())
        k = min(max(2, min(per_round * n_experts, want)), n_experts * g)  # (K = 1 would compile again)
        pick = order.topk(k, -1, largest=False).indices  # [B, k]
        # Rows with fewer unknown candidates evaluate one of theirs again: harmless.
        pick = torch.where(torch.isfinite(order.gather(1, pick)), pick, pick[:, :1])
        finite = run(pick // g, pick % g)

    return at_candidates(prepared, everything, candidate, scan)


def at_candidates(prepared: tuple[Tensor, ...], everything: Tensor, candidate: Tensor,
                  scan) -> tuple[Tensor, Tensor]:
    """J at each row's candidates with the reference's code, the earliest minimum winning.
    Rows with a few candidates share one call, the others another (the reference's J of a row
    depends neither on the other rows nor on the other candidates, as long as each reduction
    has several outputs).
    everything: [C, T]; candidate: [B, C] bool -> (weights [B, T], J [B])"""
    batch, n = candidate.shape
    count = candidate.sum(-1)  # [B]
    order = torch.where(candidate, torch.arange(n, device=candidate.device), n).sort(-1).values
    few = count <= 4
    weights = torch.empty(batch, everything.shape[1], device=candidate.device)
    j_best = torch.empty(batch, device=candidate.device)
    for rows in (few.nonzero().flatten(), (~few).nonzero().flatten()):
        if rows.numel() == 0:
            continue
        # At least two outputs per reduction, as in the scan: torch splits a one-output sum
        # over V across threads (another order, other bits).
        width = max(int(count[rows].max()), 2 if rows.numel() == 1 else 1)
        chosen = order[rows, :width]  # ascending: the scan's order
        # Short rows repeat their first candidate: equal J in a later place never wins the tie.
        chosen = torch.where(chosen < n, chosen, chosen[:, :1])
        cands = everything[chosen]  # [b, width, T]
        j = objective_of(tuple(x[rows] for x in prepared), cands)  # [b, width]
        if not torch.isfinite(j).all():
            return scan()
        j_min, pos = j.min(-1)
        weights[rows] = cands[torch.arange(rows.numel()), pos]
        j_best[rows] = j_min
    return weights, j_best
