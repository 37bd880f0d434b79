"""Token choice: the sampling parameters a request carries (`SamplingParams`, checked against
limits.py), their per-row tensors (`Rows`), and turning fused logits into tokens (`warp`,
`sample`, `pick`) with each sequence's own seeded generator, including speculative sampling's
test of a draft (`accept`) and the residual a rejected draft leaves (`residual`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from . import limits
from .errors import DecodingError, first_problem



class Seq(Protocol):
    """What token choice reads and keeps of a sequence (decoding.Seq): its sampling parameters, its
    own generator, and the draft distribution of a rejected speculative draft."""

    params: "SamplingParams"
    generator: torch.Generator | None
    rejected_q: Tensor | None


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | Sequence[int] | None = None  # int: sequence i of a call uses seed + i
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks)
    logprobs: bool = False  # record each chosen token's log-probability under the fused distribution

    def check(self) -> "SamplingParams":
        """Raise DecodingError naming the first bad field (bounds: limits.py); returns self."""
        found = first_problem([
            ("max_new_tokens", limits.int_problem("max_new_tokens", self.max_new_tokens, 1, limits.MAX_NEW_TOKENS)),
            ("temperature", self._temperature_problem()),
            ("top_k", limits.int_problem("top_k", self.top_k, 0, limits.MAX_TOP_K, " (0 = off)")),
            ("top_p", self._top_p_problem()), ("stop", self._stop_problem()), ("seed", self._seed_problem()),
            ("ignore_eos", self._bool_problem("ignore_eos")), ("logprobs", self._bool_problem("logprobs"))])
        if found:
            raise DecodingError(found[1], field=found[0])
        return self

    def _bool_problem(self, name: str) -> str | None:
        value = getattr(self, name)
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"

    def per_prompt(self, n: int) -> list["SamplingParams"]:
        """The one seed rule: these parameters for each of n prompts, each with its own int seed.
        An int seed gives prompt i seed + i; a list gives one per prompt; no seed draws a base from
        the global RNG when sampling. Greedy rows get no seed (and draw nothing)."""
        self.check()
        draw = self.temperature > 0 or self.seed is not None  # a given list is still checked when greedy
        seeds = seeds_for(self.seed, n) if draw else [None] * n
        if self.temperature == 0:
            seeds = [None] * n
        return [dataclasses.replace(self, seed=seed, stop=tuple(self.stop)) for seed in seeds]

    def _temperature_problem(self) -> str | None:
        t = self.temperature
        if not (limits.is_real(t) and math.isfinite(t) and t >= 0):
            return f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}"
        return None

    def _top_p_problem(self) -> str | None:
        if not (limits.is_real(self.top_p) and 0 < self.top_p <= 1):
            return f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}"
        return None

    def _stop_problem(self) -> str | None:
        # A lone string is a sequence of one-character stop strings: never what was meant.
        if isinstance(self.stop, (str, bytes)) or not isinstance(self.stop, (list, tuple)):
            return f"stop must be a list of strings, e.g. stop=[{self.stop!r}], got {type(self.stop).__name__}"
        if len(self.stop) > limits.MAX_STOP:
            return f"at most {limits.MAX_STOP} stop strings, got {len(self.stop)}"
        for s in self.stop:
            problem = limits.text_problem("a stop string", s)
            if problem:
                return problem
            if not s or len(s) > limits.MAX_STOP_CHARS:
                return f"stop strings must be 1 to {limits.MAX_STOP_CHARS} characters, got {len(s)}"
        return None

    def _seed_problem(self) -> str | None:
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]
        for seed in seeds:
            if seed is not None:
                problem = limits.int_problem("seed", seed, limits.SEED_MIN, limits.SEED_MAX)
                if problem:
                    return problem
        return None


def check_batch_size(batch_size) -> None:
    problem = limits.int_problem("batch_size", batch_size, 1, limits.MAX_BATCH_SIZE)
    if problem:
        raise DecodingError(problem)


# ---------------------------------------------------------------- per-row parameters and token choice

@dataclass
class Rows:
    """Each row's sampling parameters as tensors, built when rows join or leave (not per step),
    with what `warp` and `sample` need to know on the host."""

    temperature: Tensor  # [B] (1 for greedy rows: their mass goes to the argmax anyway)
    top_k: Tensor  # [B], a huge number where off
    top_p: Tensor  # [B]
    greedy: Tensor  # [B] bool
    generators: list[tuple[int, torch.Generator]]  # (row, its generator) for sampled rows
    min_top_k: int | None  # smallest top_k set, None if none
    any_top_p: bool
    any_greedy: bool

    @classmethod
    def of(cls, seqs: Sequence[Seq], device) -> "Rows":
        p = [s.params for s in seqs]
        top_k = [x.top_k for x in p if x.top_k > 0]
        return cls(torch.tensor([x.temperature or 1.0 for x in p], device=device),
                   torch.tensor([x.top_k or 2**62 for x in p], device=device),
                   torch.tensor([x.top_p for x in p], device=device),
                   torch.tensor([x.temperature == 0 for x in p], dtype=torch.bool, device=device),
                   [(i, s.generator) for i, s in enumerate(seqs) if s.generator is not None],
                   min(top_k, default=None), any(x.top_p < 1 for x in p), any(x.temperature == 0 for x in p))

    def __len__(self) -> int:
        return self.temperature.shape[0]

    @property
    def sampled(self) -> bool:
        return bool(self.generators)

    def repeat(self, k: int) -> "Rows":
        """Every row k times in a row (rows [B * k], as for the k positions of a speculative round)."""
        return dataclasses.replace(
            self, temperature=self.temperature.repeat_interleave(k), top_k=self.top_k.repeat_interleave(k),
            top_p=self.top_p.repeat_interleave(k), greedy=self.greedy.repeat_interleave(k),
            generators=[(i * k + j, g) for i, g in self.generators for j in range(k)])

    def uniform(self, n: int, device, greedy_value: float, counts: Sequence[int] | None = None) -> Tensor:
        """[B, n] uniform draws, each sampled row from its own generator (so a sequence draws the same
        numbers whatever else is in the batch); greedy rows get greedy_value. `counts`: sampled
        row i draws only its first counts[i] numbers (the rest are greedy_value). Per-row
        generators have no batched draw in torch, so this is the one loop, over sampled rows
        only, writing in place."""
        shape = (len(self), n)
        partial = counts is not None and any(counts[i] < n for i, _ in self.generators)
        full = self.any_greedy or partial
        out = torch.full(shape, greedy_value, device=device) if full else torch.empty(shape, device=device)
        rows = out.unbind(0)
        for i, g in self.generators:
            count = n if counts is None else min(counts[i], n)
            if count:
                rows[i][:count].uniform_(generator=g)  # what torch.rand(count, generator=g) draws
        return out


def warp(logits: Tensor, rows: Rows) -> Tensor:
    """The log-probabilities each row samples from: logits / temperature, then top-k and top-p
    (the most likely token is always kept). Greedy rows put all mass on the argmax. [B, V] -> [B, V]"""
    device, vocab = logits.device, logits.shape[-1]
    # Shifted so that the best token is 0 before dividing: a tiny temperature (1e-40, or 1e-300,
    # which is 0 in float32) then sends every other token to -inf (greedy) instead of making
    # inf - inf = NaN.
    logits = logits.float()
    temp = rows.temperature.clamp_min(torch.finfo(torch.float32).tiny)
    scaled = (logits - logits.amax(-1, keepdim=True)) / temp[:, None]
    if (rows.min_top_k is not None and rows.min_top_k < vocab) or rows.any_top_p:  # a sort only when truncating
        sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        rank = torch.arange(vocab, device=device)[None]
        keep = (rank < rows.top_k[:, None]) & ((probs.cumsum(-1) - probs) < rows.top_p[:, None])
        logp = sorted_logits.masked_fill(~keep, -math.inf).log_softmax(-1)
        logp = torch.empty_like(logp).scatter_(-1, order, logp)
    else:
        logp = scaled.log_softmax(-1)
    if rows.any_greedy:
        argmax = torch.full_like(logp, -math.inf).scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
        logp = torch.where(rows.greedy[:, None], argmax, logp)
    return logp


def sample(logp: Tensor, rows: Rows, drawing: Sequence[bool] | None = None) -> Tensor:
    """One token per row from log-probabilities [B, V] -> [B] (Gumbel-max), the noise from each
    row's own generator (`Rows.uniform`); greedy rows, and rows not `drawing`, take the argmax."""
    vocab = logp.shape[-1]
    counts = None if drawing is None else [vocab if draws else 0 for draws in drawing]
    noise = rows.uniform(vocab, logp.device, 0.5, counts)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
    return (logp + gumbel).argmax(-1)


def seeds_for(seed: int | Sequence[int] | None, n: int) -> list[int]:
    if seed is None:
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        return [base + i for i in range(n)]
    if limits.is_int(seed):
        return [seed + i for i in range(n)]
    if not isinstance(seed, (list, tuple)):
        raise DecodingError(f"seed must be an int or a list of ints (one per prompt), got {seed!r}")
    if len(seed) != n:
        raise DecodingError(f"got {len(seed)} seeds for {n} prompts")
    for s in seed:
        problem = limits.int_problem("seed", s, limits.SEED_MIN, limits.SEED_MAX)
        if problem:
            raise DecodingError(problem)
    return list(seed)


# ---------------------------------------------------------------- token choice across speculative rounds

def pick(logits: Tensor, rows: Rows, seqs: Sequence[Seq]) -> Tensor:
    """Each row's next token from fused logits [B, V] -> [B]: greedy, or sampled, where a row
    whose last draft was rejected draws from the residual (as the next round's d_0 does)."""
    return sample(residual(warp(logits, rows), seqs), rows) if rows.sampled else logits.argmax(-1)


def kept_probability(logp: Tensor, logq: Tensor) -> Tensor:
    """The probability speculative sampling keeps a draft drawn from q when p is the target:
    sum_v min(p, q) (1 or 0 when both are one-hot, as for greedy rows). [..., V] -> [...]"""
    return torch.minimum(logp, logq).exp().sum(-1)


def accept(d: Tensor, logp: Tensor, logq: Tensor, rows: Rows, seqs: Sequence[Seq],
           caps: Sequence[int] | None = None) -> Tensor:
    """Speculative sampling's test. d [B, k] drafts; logp [B, k, V] the fused (warped)
    distribution at positions 1..k; logq [B, k - 1, V] the draft distributions of d_1..d_{k-1};
    caps: row i keeps at most caps[i] - 1 drafts, and draws only that many numbers.
    Returns the accepted count m [B]; a row that rejected d_{m+1} keeps q_{m+1} for `residual`."""
    k = d.shape[1]
    caps = [k] * len(seqs) if caps is None else caps
    drafted = d[:, 1:, None]  # [B, k - 1, 1]
    ratio = (logp[:, :-1].gather(-1, drafted) - logq.gather(-1, drafted))[..., 0].exp()  # [B, k - 1]
    # Greedy rows: ratio is 1 (the draft is the fused argmax) or 0, and u = 0 keeps exactly those.
    u = rows.uniform(k - 1, ratio.device, 0.0, [cap - 1 for cap in caps])
    accepted = (u < ratio).long().cumprod(-1).sum(-1).clamp_max(torch.tensor(caps, device=u.device) - 1)  # [B]
    for i, (seq, m) in enumerate(zip(seqs, accepted.tolist())):
        seq.rejected_q = logq[i, m].exp() if m < caps[i] - 1 and seq.generator is not None else None
    return accepted


def residual(logp: Tensor, seqs: Sequence[Seq]) -> Tensor:
    """Rows whose last draft was rejected draw from max(0, p - q), renormalised, where q is the
    rejected draft's distribution: with the accepted drafts this makes every token exactly
    p-distributed. logp [B, V] -> [B, V]."""
    rejected = [i for i, seq in enumerate(seqs) if seq.rejected_q is not None]
    if not rejected:
        return logp
    rows = torch.tensor(rejected, device=logp.device)
    q = torch.stack([seqs[i].rejected_q for i in rejected])  # [R, V]
    rest = (logp[rows].exp() - q).clamp_min(0)
    total = rest.sum(-1, keepdim=True)  # 0 only when p == q, where no draft is ever rejected
    logp[rows] = torch.where(total > 0, (rest / total).log(), logp[rows])  # no host sync per row
    for i in rejected:
        seqs[i].rejected_q = None
    return logp
