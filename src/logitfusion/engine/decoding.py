"""The one decoding loop. CLI, Python API, evaluation and server all decode through `Batch`.

Each step: every model the solver needs runs one forward on its own context (own prompt
template, own left padding, own KV cache), the solver turns their logits into fused logits,
one token is picked per sequence and appended to every model's context.

A `Batch` is step-wise so that a server can batch dynamically: sequences join (their prompts
are prefilled and merged into the running caches) and leave (finished rows are dropped) at step
boundaries. `decode` is the whole loop for a fixed list of prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import limits
from .models import Member, ModelSet
from .stacking import lora_stack, shared_stack
from .fusion import fuse
from .solvers import Choice, Solver, SolverError

TOP_TOKENS = 5  # tokens per model shown in a trace


class DecodingError(ValueError):
    """Bad decoding input (empty prompt, prompt too long, bad sampling parameters...)."""


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

    def check(self) -> None:
        """Raise DecodingError naming the first bad field (bounds: limits.py)."""
        problem = (limits.int_problem("max_new_tokens", self.max_new_tokens, 1, limits.MAX_NEW_TOKENS)
                   or self._temperature_problem()
                   or limits.int_problem("top_k", self.top_k, 0, limits.MAX_TOP_K, " (0 = off)")
                   or self._top_p_problem() or self._stop_problem() or self._seed_problem())
        if problem:
            raise DecodingError(problem)

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


def check_speculate(speculate) -> None:
    problem = limits.int_problem("speculate", speculate, 0, limits.MAX_SPECULATE, " (0 = off)")
    if problem:
        raise DecodingError(problem)


def check_batch_size(batch_size) -> None:
    problem = limits.int_problem("batch_size", batch_size, 1, limits.MAX_BATCH_SIZE)
    if problem:
        raise DecodingError(problem)


@dataclass
class StepTrace:
    weights: list[float] | None  # one per expert
    objective: float | None  # J at the chosen weights
    top: dict[str, list[tuple[int, float]]]  # model role (and "fused") -> top (token id, prob)


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length" | "error" | "cancelled"
    error: str | None = None
    trace: list[StepTrace] | None = None

    @property
    def weights(self) -> list[list[float]]:
        """Per step, the weight of each expert (empty without a trace or without fusion)."""
        return [s.weights for s in (self.trace or []) if s.weights is not None]


@dataclass
class Seq:
    """One sequence being decoded: its request and its running state."""

    prompt: str
    params: SamplingParams  # seed: this sequence's own int seed (or None when greedy)
    trace: bool = False
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    steps: list[StepTrace] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # when params.logprobs
    stop_at: int | None = None  # character offset of the stop string in the text
    budget: int = 0  # tokens it may still generate (max_new_tokens, capped by context)
    generator: torch.Generator | None = None
    rejected_q: Tensor | None = None  # speculative sampling: the rejected draft's distribution [V]
    detok: "Detokenizer | None" = None  # see `text`

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Finish now (e.g. the client went away); the row leaves at the next step boundary."""
        if not self.done:
            self.finish_reason = "cancelled"

    def text(self, tokenizer) -> "Detokenizer":
        """The sequence's text so far, decoded incrementally (for stop strings and streams)."""
        if self.detok is None:
            self.detok = Detokenizer(tokenizer)
        self.detok.read(self.tokens)
        return self.detok

    def result(self, tokenizer) -> Generation:
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop_at is not None:
            text = text[: self.stop_at]
        return Generation(self.prompt, text, list(self.tokens), self.finish_reason or "length", self.error,
                          self.steps if self.trace else None)


# ---------------------------------------------------------------- members with another tokenizer

@dataclass
class Row:
    """One row of a cross-vocabulary member: its own token ids, kept in step with the user's text."""

    prompt: list[int]  # the templated prompt in the member's tokens
    ids: list[int]  # everything it has read so far (prompt + the generation, in its tokens)
    user: list[int] = field(default_factory=list)  # the generated tokens, in the user's (large) vocabulary


class Retokenizer:
    """Keeps a member with another tokenizer (a delta model, or a cross-vocabulary small side)
    reading the same text as the user model (method.md §8). When the user model emits a token
    with an exact counterpart, the member reads that token: its ids and cache simply grow by
    one. Otherwise the generation is decoded to text and re-tokenised with the member's
    tokenizer after its own prompt, and its cache is rebuilt from those ids."""

    def __init__(self, member: Member, user_tokenizer):
        from .vocab import BYTE, EXACT, SPECIAL
        self.tokenizer, self.user_tokenizer, self.map = member.tokenizer, user_tokenizer, member.vocab_map
        self.index = self.map.index.tolist()
        self.exact = [k in (SPECIAL, BYTE, EXACT) for k in self.map.kinds.tolist()]
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def follow(self, row: Row, token: int) -> bool:
        """Append user token `token` to the row. True when its ids grew by exactly that one token
        (the cache can be extended), False when they were re-tokenised (rebuild the cache)."""
        row.user.append(token)
        if self.exact[token]:
            row.ids = row.ids + [self.index[token]]
            return True
        text = self.user_tokenizer.decode(row.user)
        row.ids = row.prompt + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return False

    def encode(self, context: str | Sequence[int]) -> list[int]:
        """Token ids of the user's context (text, or user token ids) in the member's vocabulary."""
        if not isinstance(context, str):
            context = self.user_tokenizer.decode(list(context))
        return self.tokenizer(context)["input_ids"]


# ---------------------------------------------------------------- one model's context and cache

@functools.cache
def _reserved_layer():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """Keys and values live in a buffer with room for the whole context: a step writes its
        position in place, where DynamicLayer's torch.cat copies the whole cache every step
        (steps 1.2x faster at batch 8 over 400 tokens on the zoo, CPU; `bench speed`). They stay
        views of that buffer; code that replaces them (rows joining or leaving) gets a new
        buffer at the next update."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.buffer = capacity, None

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = (self.keys.shape[-2] if self.keys.dim() == 4 else 0), key_states.shape[-2]
            k, v = self.buffer or (None, None)
            if (k is None or self.keys.data_ptr() != k.data_ptr() or self.keys.shape[:-2] != k.shape[:-2]
                    or n + t > k.shape[-2]):
                shape = (*key_states.shape[:-2], max(self.capacity, 2 * (n + t)), key_states.shape[-1])
                k, v = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    k[..., :n, :], v[..., :n, :] = self.keys, self.values
                self.buffer = (k, v)
            k[..., n:n + t, :], v[..., n:n + t, :] = key_states, value_states
            self.keys, self.values = k[..., :n + t, :], v[..., :n + t, :]
            return self.keys, self.values

    return ReservedLayer


def reserved_cache(config, capacity: int):
    """A DynamicCache whose plain layers reserve room for `capacity` positions up front (see
    ReservedLayer). Other layer kinds (sliding windows...) are left as transformers makes them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_reserved_layer()(capacity) for _ in cache.layers]
    return cache


class Context:
    """Token buffers, attention mask and KV cache of one model module, left padded.

    For a batch of B sequences it holds one block of B rows per member that runs on this module:
    the small base and its LoRA experts share one module and so run as ONE forward, each row
    with its own adapter (stacked adapters, stacking.stack_lora, or PEFT's mixed-adapter batch).
    Buffers have room for `capacity` tokens; steps write into them in place, and they are
    reallocated only when rows join or leave.
    """

    def __init__(self, members: list[Member], ids: Tensor, mask: Tensor, length: int, vocab: int,
                 use_cache: bool, cache=None, retok: Retokenizer | None = None, module=None):
        self.members, self.vocab, self.use_cache = members, vocab, use_cache
        self.ids, self.mask, self.length, self.cache = ids, mask, length, cache
        # The module to run: the members' shared one, or their stacked weights or adapters (stacking.py).
        self.model = module if module is not None else members[0].model
        # Cross-vocabulary members: logits are mapped into the user's vocabulary, and each row
        # (G * B of them, like ids) tracks its own token ids.
        self.retok, self.rows = retok, None
        self._index = retok.map.index.to(ids.device) if retok is not None else None

    @classmethod
    def prefill(cls, members: list[Member], prompts: list[list[list[int]]], room: int, vocab: int, pad_id: int,
                use_cache: bool, keep: int = 1, retok: Retokenizer | None = None,
                module=None) -> tuple["Context", Tensor]:
        """prompts[g][i]: token ids of sequence i for member g. Returns the context and the logits
        of the last position [G, B, V] (or of the last `keep` positions, [G, B, keep, V]); V is the
        user's vocabulary (a cross-vocabulary member's logits are mapped into it)."""
        rows = [p for per_member in prompts for p in per_member]
        device, width = members[0].device, max(len(p) for p in rows)
        ids = torch.full((len(rows), width + room), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):
            ids[i, width - len(p):width] = torch.tensor(p, device=device)
            mask[i, width - len(p):width] = 1
        cache = reserved_cache(members[0].model.config, width + room) if use_cache else None
        ctx = cls(members, ids, mask, width, vocab, use_cache, cache, retok, module)
        if retok is not None:
            ctx.rows = [Row(list(p), list(p)) for p in rows]
        return ctx, ctx._forward(0, keep)

    @property
    def seqs(self) -> int:
        return self.ids.shape[0] // len(self.members)

    def _forward(self, start: int, keep: int = 1) -> Tensor:
        """Run columns start..length; logits of the last `keep` positions, [G, B, V] (keep = 1)
        or [G, B, keep, V]."""
        mask = self.mask[:, : self.length]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, start:]
        adapters = {}
        if self.members[0].adapter is not None and self.model is self.members[0].model:
            # PEFT's mixed-adapter batch picks each row's adapter; a stacked-LoRA module knows its groups.
            adapters["adapter_names"] = [m.adapter for m in self.members for _ in range(self.seqs)]
        out = self.model(input_ids=self.ids[:, start: self.length], attention_mask=mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=self.use_cache, logits_to_keep=keep, **adapters)
        logits = out.logits[:, -keep:, : self.vocab]  # padded embedding rows dropped
        if self.retok is not None:  # into the user's vocabulary: a gather, 0 where unmapped
            logits = logits.index_select(-1, self._index.clamp_min(0)).masked_fill(self._index < 0, 0)
        logits = logits.view(len(self.members), self.seqs, keep, -1)
        return logits[:, :, 0] if keep == 1 else logits

    def step(self, tokens: Tensor) -> Tensor:
        """Append tokens [B] (one per sequence, the same for every member) -> logits [G, B, V]."""
        if self.retok is not None:
            return self._follow(tokens)
        return self._append(tokens.to(self.ids.device).repeat(len(self.members))[:, None])

    def _append(self, ids: Tensor, keep: int = 1) -> Tensor:
        """Write ids [rows, k] after the context and run them -> logits of the last `keep` (as _forward)."""
        k = ids.shape[1]
        self.ensure_room(k)  # only short after rows joined with a larger budget, or speculation
        self.ids[:, self.length: self.length + k] = ids
        self.mask[:, self.length: self.length + k] = 1
        self.length += k
        # With a cache only the new tokens are run; without, the whole sequence is recomputed.
        return self._forward(self.length - k if self.use_cache else 0, keep)

    def _follow(self, tokens: Tensor) -> Tensor:
        """A cross-vocabulary step: every row reads the user token in its own tokens. When all rows
        just grew by one token, that is one cached step; when any row was re-tokenised, every row
        is prefilled again from its ids (rows are independent, so results do not depend on
        batching; the member is small and re-tokenisation is the exception)."""
        user = tokens.tolist() * len(self.members)
        extended = [self.retok.follow(row, t) for row, t in zip(self.rows, user)]
        if all(extended):
            return self._append(torch.tensor([[row.ids[-1]] for row in self.rows], device=self.ids.device))
        rows, n = self.rows, self.seqs
        room = max(self.ids.shape[1] - self.length, 1)
        ctx, logits = Context.prefill(self.members, [[r.ids for r in rows[g * n:(g + 1) * n]]
                                                     for g in range(len(self.members))],
                                      room, self.vocab, self.retok.pad_id, self.use_cache,
                                      retok=self.retok, module=self.model)
        self.ids, self.mask, self.length, self.cache = ctx.ids, ctx.mask, ctx.length, ctx.cache
        self.rows = rows  # keep their generation history (prefill starts new rows)
        return logits

    def extend(self, tokens: Tensor) -> Tensor:
        """Append k tokens per sequence ([B, k]) in one forward -> logits [G, B, k, V]."""
        if self.retok is not None:
            raise NotImplementedError("speculative drafts are not run on cross-vocabulary members")
        return self._append(tokens.to(self.ids.device).repeat(len(self.members), 1), keep=tokens.shape[1])

    def ensure_room(self, k: int) -> None:
        if self.length + k > self.ids.shape[1]:
            self._resize(self.length + k + 16)

    def mask_holes(self, start: int, accepted: Tensor) -> None:
        """Columns start..start+k were fed; keep the first accepted + 1 of each sequence, mask the
        rest (rejected speculative drafts)."""
        k = self.length - start
        hole = torch.arange(k, device=self.mask.device)[None] > accepted.to(self.mask.device)[:, None]
        self.mask[:, start: self.length] *= (~hole).long().repeat(len(self.members), 1)

    # -- rows joining and leaving (dynamic batching)

    def _resize(self, capacity: int) -> None:
        extra = capacity - self.ids.shape[1]
        self.ids = F.pad(self.ids, (0, extra), value=0)
        self.mask = F.pad(self.mask, (0, extra), value=0)

    def _left_pad(self, n: int) -> None:
        """Shift everything right by n masked columns, so that lengths line up for a merge."""
        if n == 0:
            return
        self.ids, self.mask = F.pad(self.ids, (n, 0)), F.pad(self.mask, (n, 0))
        self.length += n
        for layer in self._layers():
            layer.keys = F.pad(layer.keys, (0, 0, n, 0))
            layer.values = F.pad(layer.values, (0, 0, n, 0))

    def _layers(self):
        if self.cache is None:
            return []
        layers = self.cache.layers
        if any(type(layer).__name__ not in ("DynamicLayer", "ReservedLayer") for layer in layers):
            raise NotImplementedError("joining a running batch needs a plain dynamic KV cache "
                                      f"({self.members[0].role} uses {type(layers[0]).__name__})")
        return layers

    def merge(self, other: "Context") -> None:
        """Add other's sequences after ours (both keep their own left padding)."""
        target = max(self.length, other.length)
        self._left_pad(target - self.length)
        other._left_pad(target - other.length)
        capacity = max(self.ids.shape[1], other.ids.shape[1])
        self._resize(capacity)
        other._resize(capacity)
        # Rows stay grouped by member: [member 0: ours, theirs; member 1: ours, theirs; ...]
        n, m, groups = self.seqs, other.seqs, len(self.members)
        order = torch.cat([torch.cat([torch.arange(g * n, (g + 1) * n), groups * n + torch.arange(g * m, (g + 1) * m)])
                           for g in range(groups)]).to(self.ids.device)
        self.ids, self.mask = torch.cat([self.ids, other.ids])[order], torch.cat([self.mask, other.mask])[order]
        if self.rows is not None:
            both = self.rows + other.rows
            self.rows = [both[i] for i in order.tolist()]
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([mine.keys, theirs.keys])[order]
            mine.values = torch.cat([mine.values, theirs.values])[order]

    def select(self, seqs: Tensor) -> None:
        """Keep only these sequences, and drop leading columns that no remaining row uses."""
        seqs = seqs.to(self.ids.device)
        rows = torch.cat([g * self.seqs + seqs for g in range(len(self.members))])
        self.ids, self.mask = self.ids[rows], self.mask[rows]
        if self.rows is not None:
            self.rows = [self.rows[i] for i in rows.tolist()]
        used = self.mask[:, : self.length].any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.ids, self.mask, self.length = self.ids[:, start:], self.mask[:, start:], self.length - start
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[rows, :, start:], layer.values[rows, :, start:]


# ---------------------------------------------------------------- token choice

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

    def uniform(self, n: int, device, greedy_value: float) -> Tensor:
        """[B, n] uniform draws, each sampled row from its own generator (so a sequence draws the same
        numbers whatever else is in the batch); greedy rows get greedy_value. Per-row generators
        have no batched draw in torch, so this is the one loop, over sampled rows only, writing
        in place."""
        shape = (len(self), n)
        out = torch.full(shape, greedy_value, device=device) if self.any_greedy else torch.empty(shape, device=device)
        rows = out.unbind(0)
        for i, g in self.generators:
            rows[i].uniform_(generator=g)  # what torch.rand(n, generator=g) draws
        return out


def pick_tokens(logits: Tensor, rows: Rows) -> Tensor:
    """Each row greedy or sampled with its own temperature / top-k / top-p. logits [B, V] -> [B]."""
    if not rows.sampled:
        return logits.argmax(-1)
    return sample(warp(logits, rows), rows)


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


def sample(logp: Tensor, rows: Rows) -> Tensor:
    """One token per row from log-probabilities [B, V] -> [B] (Gumbel-max), the noise from each
    row's own generator (`Rows.uniform`); greedy rows take the argmax."""
    noise = rows.uniform(logp.shape[-1], logp.device, 0.5)
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


# ---------------------------------------------------------------- prompts

def render(template: str, prompt: str) -> str:
    return template.replace("{prompt}", prompt)


def encode_prompts(models: ModelSet, member: Member, prompts: Sequence[str]) -> list[list[int]]:
    out, tok = [], member.tokenizer or models.tokenizer
    for i, prompt in enumerate(prompts):
        ids = tok(render(member.template, prompt))["input_ids"]
        if not ids:
            raise DecodingError(f"prompt {i} is empty for {member.role} after templating; give some text")
        if member.context is not None and len(ids) >= member.context:
            raise DecodingError(f"prompt {i} is {len(ids)} tokens for {member.role}, whose context is "
                                f"{member.context} tokens; shorten the prompt (or its template)")
        out.append(ids)
    return out


def members_for(models: ModelSet, solver: Solver) -> list[Member]:
    """The models a solver reads, in the order large, small, experts, delta."""
    idx = range(len(models.experts)) if solver.experts is None else solver.experts
    if solver.uses_delta and models.delta is None:
        raise SolverError("method 'delta' needs a delta model: add a `delta: {path: ...}` section to the recipe")
    return ([models.large] if solver.uses_large else []) + ([models.small] if solver.uses_small else []) \
        + [models.experts[i] for i in idx] + ([models.delta] if solver.uses_delta else [])


def validate_prompts(models: ModelSet, prompts: Sequence[str], solver: Solver) -> dict[str, list[list[int]]]:
    """Check every prompt against every model the solver runs; returns token ids per model role.

    Cheap (tokenisation only), so callers can validate a whole input file before writing output.
    """
    for i, p in enumerate(prompts):
        problem = limits.text_problem(f"prompt {i}", p)
        if problem:
            raise DecodingError(problem)
        if not p:
            raise DecodingError(f"prompt {i} is empty; give some text to continue")
    solver.check(len(models.experts))
    return {m.role: encode_prompts(models, m, prompts) for m in members_for(models, solver)}


# ---------------------------------------------------------------- the loop

@dataclass
class Joining:
    """Sequences prefilled by `Batch.prefill`, waiting to `join` the batch."""

    seqs: list[Seq]
    contexts: list[tuple]  # per group: (Context, logits [G, B, V])


class Batch:
    """Sequences decoded together with one solver. `add` and `step` may interleave freely."""

    def __init__(self, models: ModelSet, solver: Solver, use_cache: bool = True, share_forwards: bool = True,
                 speculate: int = 0):
        solver.check(len(models.experts))
        check_speculate(speculate)
        self.models, self.solver, self.use_cache = models, solver, use_cache
        self.speculate = speculate  # draft length k; 0 or 1 = plain decoding (greedy fusion only)
        self.members = members_for(models, solver)
        # Members on one module (the small base and its LoRA experts) run as one forward, and so do
        # full-weight copies of the small model (the small base, full experts) on one module with
        # their weights stacked; unless share_forwards is off (then every model runs alone; used to
        # check both agree). A PEFT group runs its adapters stacked (bmm) rather than through PEFT's
        # per-adapter loop, where they can be.
        stack, stacked = shared_stack(models, self.members) if share_forwards else (None, [])
        groups: dict[int | str, list[Member]] = {}
        for m in self.members:
            key = "stack" if any(m is s for s in stacked) else id(m.model) if share_forwards else id(m)
            groups.setdefault(key, []).append(m)
        self.groups = list(groups.values())
        self.modules = [stack if key == "stack" else lora_stack(models, g) if share_forwards and g[0].adapter
                        else g[0].model for key, g in groups.items()]
        # Members with their own tokenizer follow the user's text through a Retokenizer.
        self.retoks = [Retokenizer(g[0], models.tokenizer) if g[0].foreign else None for g in self.groups]
        self.device = self.members[0].device  # where fusion happens
        tok = models.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.seqs: list[Seq] = []
        self.sampling = Rows.of([], self.device)  # the rows' sampling parameters, as seqs change
        self.contexts: list[Context] = []  # one per group, once sequences exist
        self.logits: dict[str, Tensor] = {}  # next-token logits per model role, [B, V]
        self._eos = torch.tensor(sorted(models.eos_token_ids) or [-1], device=self.device)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, prompts: Sequence[str], params: Sequence[SamplingParams], trace: bool = False) -> list[Seq]:
        """Prefill new sequences and merge them into the batch. params: one per prompt, each
        with an int seed (or None when greedy)."""
        return self.join(self.prefill(prompts, params, trace))

    def prefill(self, prompts: Sequence[str], params: Sequence[SamplingParams], trace: bool = False) -> "Joining":
        """Check and prefill new sequences without touching the running ones: whatever fails here
        (a bad prompt or seed, memory) leaves the batch as it was. `join` then merges them."""
        for p in params:
            p.check()
        encoded = validate_prompts(self.models, prompts, self.solver)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            room = [m.context - len(encoded[m.role][i]) for m in self.members if m.context is not None]
            seq = Seq(prompt, p, trace, budget=min([p.max_new_tokens] + room))
            if p.temperature > 0:
                # On the device where tokens are picked: drawing noise there needs no host copy.
                seq.generator = torch.Generator(self.device).manual_seed(
                    int(p.seed if p.seed is not None else torch.randint(0, 2**31 - 1, ())))
            seqs.append(seq)
        room = max(s.budget for s in seqs)
        with torch.no_grad():
            contexts = []
            for g, group in enumerate(self.groups):
                retok = self.retoks[g]
                contexts.append(Context.prefill(group, [encoded[m.role] for m in group], room,
                                                group[0].vocab or self.models.vocab_size,
                                                retok.pad_id if retok else self.pad_id, self.use_cache,
                                                retok=retok, module=self.modules[g]))
        return Joining(seqs, contexts)

    def join(self, joining: "Joining") -> list[Seq]:
        """Merge prefilled sequences into the batch (at a step boundary)."""
        first = not self.seqs
        with torch.no_grad():
            for g, (group, (ctx, logits)) in enumerate(zip(self.groups, joining.contexts)):
                if first:
                    self.contexts.append(ctx)
                else:
                    self.contexts[g].merge(ctx)
                for m, z in zip(group, logits.to(self.device)):
                    self.logits[m.role] = z if first else torch.cat([self.logits[m.role], z])
        self.seqs += joining.seqs
        self.sampling = Rows.of(self.seqs, self.device)
        return joining.seqs

    def step(self) -> list[tuple[Seq, int]]:
        """Advance every sequence: one token, or up to `speculate` tokens in a speculative round.
        Returns (sequence, token) for each token appended; finished sequences leave the batch."""
        self._drop_done()
        if not self.seqs:
            return []
        with torch.no_grad():
            if self._can_speculate():
                return self._speculative_round()
            choice = self._solve(self.logits)
            tokens = pick_tokens(choice.logits, self.sampling)
            verdicts = self._verdicts(self.logits, choice, tokens)
            steps = self._trace(self.logits, choice)
            emitted = []
            for i, seq in enumerate(self.seqs):
                if self._emit(seq, verdicts[i], steps[i] if steps else None):
                    emitted.append((seq, seq.tokens[-1]))
            rows = self.seqs
            self._drop_done()
            if self.seqs:
                keep = torch.tensor([i for i, s in enumerate(rows) if not s.done], device=self.device)
                tokens = tokens[keep] if len(keep) < len(tokens) else tokens
                self.logits = {m.role: z for ctx in self.contexts
                               for m, z in zip(ctx.members, ctx.step(tokens).to(self.device))}
        return emitted

    def _solve(self, logits: dict[str, Tensor]) -> Choice:
        return self.solver.on([logits[m.role] for m in self.members])

    def _verdicts(self, logits: dict[str, Tensor], choice: Choice, tokens: Tensor) -> list[tuple]:
        """Per row: (token, first model with NaN/inf logits or None, is EOS, fused log-prob).
        Everything the host needs travels in one transfer."""
        # Every solver's fused logits read every input at every token (0 * inf is NaN too), so
        # one check of them finds any model's NaN/inf; which model it was is looked up only then.
        fused_ok = choice.logits.isfinite().all(-1)  # [N]
        is_eos = (tokens[:, None] == self._eos).any(-1)
        if any(s.params.logprobs for s in self.seqs):
            logprob = choice.logits.float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
        else:  # not needed: skip a [N, V] log-softmax on every step
            logprob = torch.zeros_like(tokens, dtype=torch.float32)
        host = torch.stack([tokens.double(), fused_ok.double(), is_eos.double(), logprob.double()], -1).cpu().tolist()
        bad = {}
        if not all(ok for _, ok, _, _ in host):
            finite = torch.stack([logits[m.role].isfinite().all(-1) for m in self.members], -1)  # [N, M]
            roles = [m.role for m in self.members]
            bad = {i: next((r for r, ok in zip(roles, row) if not ok), "fused")
                   for i, row in enumerate(finite.tolist()) if not host[i][1]}
        return [(int(t), bad.get(i), bool(e), float(lp)) for i, (t, _, e, lp) in enumerate(host)]

    def _emit(self, seq: Seq, verdict: tuple, step: StepTrace | None) -> bool:
        """Append one token to a sequence and decide whether it finished. False if none appended."""
        token, bad, is_eos, logprob = verdict
        if seq.done:  # cancelled while waiting
            return False
        if bad is not None:
            seq.finish_reason = "error"
            seq.error = (f"{bad} produced NaN/inf logits at step {len(seq.tokens)}; sequence "
                         "stopped (check the model's weights and dtype)")
            return False
        seq.tokens.append(token)
        if seq.params.logprobs:
            seq.logprobs.append(logprob)
        if seq.trace and step is not None:
            seq.steps.append(step)
        if is_eos and not seq.params.ignore_eos:
            seq.finish_reason = "eos"
        elif seq.params.stop and (cut := _find_stop(self.models.tokenizer, seq)) is not None:
            seq.finish_reason, seq.stop_at = "stop", cut
        elif len(seq.tokens) >= seq.budget:
            seq.finish_reason = "length"
        return True

    def _drop_done(self) -> None:
        keep = [i for i, s in enumerate(self.seqs) if not s.done]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        self.sampling = Rows.of(self.seqs, self.device)
        if not keep:
            self.contexts, self.logits = [], {}
            return
        rows = torch.tensor(keep, device=self.device)
        for ctx in self.contexts:
            ctx.select(rows)
        self.logits = {role: z[rows] for role, z in self.logits.items()}

    def _trace(self, logits: dict[str, Tensor], choice: Choice) -> list[StepTrace] | None:
        """One StepTrace per row of `choice`, or None when no sequence asked for a trace."""
        if not any(s.trace for s in self.seqs):
            return None
        tops = {}
        for role, z in [(m.role, logits[m.role]) for m in self.members] + [("fused", choice.logits)]:
            p, ids = z.float().softmax(-1).topk(min(TOP_TOKENS, z.shape[-1]), -1)
            tops[role] = (ids.cpu().tolist(), p.cpu().tolist())
        # Rounded so that a grid value 1.2 reads 1.2, not its float32 1.2000000476837158.
        weights = choice.weights.double().round(decimals=6).tolist() if choice.weights is not None else None
        objective = choice.objective.cpu().tolist() if choice.objective is not None else None
        return [StepTrace(weights[i] if weights else None, objective[i] if objective else None,
                          {r: list(zip(ids[i], p[i])) for r, (ids, p) in tops.items()})
                for i in range(choice.logits.shape[0])]

    # -- speculative fused decoding (greedy)

    def _can_speculate(self) -> bool:
        large_alone = any(ctx.members == [self.models.large] for ctx in self.contexts)
        return (self.speculate > 1 and self.solver.uses_large and self.solver.uses_small and large_alone
                and len(self.members) > 2
                and not any(m.foreign for m in self.members))  # drafts are not re-tokenised

    def _speculative_round(self) -> list[tuple[Seq, int]]:
        """The small side drafts k tokens, the large model checks all k in one forward.

        d_0 is the exact fused token. The small models then run k single steps (fed d_0..d_{k-1})
        and propose d_j from z_S + a (z_t - z_S) with this round's weights a, i.e. the fusion
        with the small base standing in for the large model. One large forward over d_0..d_{k-1}
        gives z_L at k positions; weights are solved per position, giving the fused distribution
        p_j at every position j. Fed but rejected drafts become masked holes in every context
        (position ids skip them), so rows may accept different counts with no cache crop.

        Greedy rows draft the argmax and accept d_j while it is the fused argmax, so they emit
        exactly what plain fused decoding emits. Sampled rows draw d_j from the warped draft
        distribution q_j and keep it with probability min(1, p_j(d_j) / q_j(d_j)) (speculative
        sampling, Leviathan et al. 2023); the first rejected draft's q_j is kept, and the next
        round draws its d_0 from max(0, p_j - q_j), renormalised. Every emitted token is thus
        distributed exactly as in plain fused sampling (not the same tokens for a seed: the
        random draws differ).
        """
        k, batch = self.speculate, len(self.seqs)
        large = self.models.large
        large_ctx = next(c for c in self.contexts if c.members == [large])
        draft_ctxs = [c for c in self.contexts if c is not large_ctx]
        small_roles = [m.role for m in self.members if m is not large]
        per_row = self.sampling
        sampling = per_row.sampled
        for ctx in self.contexts:
            ctx.ensure_room(k)
        start = large_ctx.length

        choice0 = self._solve(self.logits)
        drafts = [sample(self._residual(warp(choice0.logits, per_row)), per_row) if sampling
                  else choice0.logits.argmax(-1)]  # [B] each
        draft_logq = []  # sampling: log q_j of the drafts d_1..d_{k-1}, [B, V] each
        small_side = [{r: self.logits[r] for r in small_roles}]  # logits at positions 0..k
        for j in range(k):
            small_side.append({m.role: z for ctx in draft_ctxs
                               for m, z in zip(ctx.members, ctx.step(drafts[-1]).to(self.device))})
            if j < k - 1:
                z = small_side[-1]
                z_s = z[self.models.small.role]
                z_e = torch.stack([z[m.role] for m in self.members[2:]], 1)
                z_draft = fuse(z_s, z_s, z_e, choice0.weights)
                if sampling:
                    draft_logq.append(warp(z_draft, per_row))
                    drafts.append(sample(draft_logq[-1], per_row))
                else:
                    drafts.append(z_draft.argmax(-1))
        d = torch.stack(drafts, 1)  # [B, k]
        z_large = large_ctx.extend(d)[0].to(self.device)  # [B, k, V]: position j + 1 after d_j

        # The fused distribution at positions 1..k for every row, solved as one [B * k] batch.
        side = {r: torch.stack([small_side[j + 1][r] for j in range(k)], 1) for r in small_roles}  # [B, k, V]
        later = {large.role: z_large.reshape(batch * k, -1)}
        later.update({r: z.reshape(batch * k, -1) for r, z in side.items()})
        choice = self._solve(later)
        fused = choice.logits.argmax(-1)  # [B * k]
        if sampling:
            logp = warp(choice.logits, per_row.repeat(k)).view(batch, k, -1)
            accepted = self._accept(d, logp, torch.stack(draft_logq, 1))
            # The token emitted at position j is the draft d_{j+1} (the last position only ever
            # gives the next round's logits).
            fused = torch.cat([d[:, 1:], fused.view(batch, k)[:, -1:]], 1).reshape(-1)
        else:
            f = fused.view(batch, k)
            accepted = (f[:, : k - 1] == d[:, 1:]).long().cumprod(-1).sum(-1)  # [B]: m
        for ctx in self.contexts:
            ctx.mask_holes(start, accepted)

        v0 = self._verdicts(self.logits, choice0, drafts[0])
        vs = self._verdicts(later, choice, fused)
        t0, ts = self._trace(self.logits, choice0), self._trace(later, choice)
        emitted, m_host = [], accepted.tolist()
        for i, seq in enumerate(self.seqs):
            for j in range(m_host[i] + 1):  # d_0 .. d_m
                verdict = v0[i] if j == 0 else vs[i * k + j - 1]
                step = (t0[i] if j == 0 else ts[i * k + j - 1]) if t0 else None
                if not self._emit(seq, verdict, step):
                    break
                emitted.append((seq, seq.tokens[-1]))
                if seq.done:
                    break
        # Next round starts from the prediction after the last accepted token.
        rows = torch.arange(batch, device=self.device)
        self.logits = {large.role: z_large[rows, accepted]}
        self.logits.update({r: z[rows, accepted] for r, z in side.items()})
        self._drop_done()
        return emitted

    def _accept(self, d: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
        """Speculative sampling's test. d [B, k] drafts; logp [B, k, V] the fused (warped)
        distribution at positions 1..k; logq [B, k - 1, V] the draft distributions of d_1..d_{k-1}.
        Returns the accepted count m [B]; a row that rejected d_{m+1} keeps q_{m+1} for `_residual`."""
        k = d.shape[1]
        drafted = d[:, 1:, None]  # [B, k - 1, 1]
        ratio = (logp[:, :-1].gather(-1, drafted) - logq.gather(-1, drafted))[..., 0].exp()  # [B, k - 1]
        # Greedy rows: ratio is 1 (the draft is the fused argmax) or 0, and u = 0 keeps exactly those.
        u = self.sampling.uniform(k - 1, ratio.device, 0.0)
        accepted = (u < ratio).long().cumprod(-1).sum(-1)  # [B]
        for i, (seq, m) in enumerate(zip(self.seqs, accepted.tolist())):
            seq.rejected_q = logq[i, m].exp() if m < k - 1 and seq.generator is not None else None
        return accepted

    def _residual(self, logp: Tensor) -> Tensor:
        """Rows whose last draft was rejected draw from max(0, p - q), renormalised, where q is the
        rejected draft's distribution: with the accepted drafts this makes every token exactly
        p-distributed. logp [B, V] -> [B, V]."""
        rejected = [i for i, seq in enumerate(self.seqs) if seq.rejected_q is not None]
        if not rejected:
            return logp
        rows = torch.tensor(rejected, device=logp.device)
        q = torch.stack([self.seqs[i].rejected_q for i in rejected])  # [R, V]
        rest = (logp[rows].exp() - q).clamp_min(0)
        total = rest.sum(-1, keepdim=True)  # 0 only when p == q, where no draft is ever rejected
        logp[rows] = torch.where(total > 0, (rest / total).log(), logp[rows])  # no host sync per row
        for i in rejected:
            self.seqs[i].rejected_q = None
        return logp


# ---------------------------------------------------------------- text, token by token

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


@functools.lru_cache(maxsize=16)
def _skipped_ids(tok) -> frozenset[int]:
    """Token ids that decode(..., skip_special_tokens=True) drops (asked of the tokenizer itself:
    which ids count as special differs between tokenizer classes)."""
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    candidates = {i for i, t in added.items() if getattr(t, "special", False)} | set(tok.all_special_ids)
    return frozenset(i for i in candidates if tok.decode([i], skip_special_tokens=True) == "")


@functools.lru_cache(maxsize=16)
def _rewrites(tok) -> bool:
    """Whether decoding rewrites earlier text (clean_up_tokenization_spaces: "a ." -> "a." once the
    "." arrives). Asked of the tokenizer: transformers ignores the setting for BPE tokenizers."""
    if not getattr(tok, "clean_up_tokenization_spaces", False):
        return False
    ids = tok("a . b", add_special_tokens=False)["input_ids"]
    return tok.decode(ids, skip_special_tokens=True) != "a . b"


class Detokenizer:
    """The text of a growing token list, equal to tokenizer.decode(tokens, skip_special_tokens=True)
    with each token costing a decode of a few recent tokens, never of the whole list.

    A window of tokens is decoded: `base`, its first tokens whose text is already out (decoded
    alone, so that whatever a decoder does to a leading token, such as SentencePiece's leading
    space, happens in both), then the tokens after it. Text after `base` is final once it does
    not end in U+FFFD (an incomplete multi-byte character a later token may complete); the window
    then moves on to start at those tokens. Special tokens decode to nothing and are left out.
    `stable` is the text without trailing U+FFFD, `pending` those characters (what a full decode
    shows at the end now). Decoders that rewrite text already out (clean_up_tokenization_spaces)
    are decoded whole, as before.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.skip = _skipped_ids(tokenizer)
        self.whole = _rewrites(tokenizer)
        self.n = 0  # tokens read
        self.window: list[int] = []  # recent tokens, specials left out
        self.base_tokens = 0  # the window's first tokens, whose text `base` is out
        self.base = ""
        self.out = 0  # characters of the window after `base` already in `stable`
        self.pieces: list[str] = []  # stable text, joined on demand
        self.length = 0  # len(stable)
        self.pending = ""
        self.last = ""  # decoding whole: the whole text at the last token
        self.offsets: list[int] = []  # per token: len(stable) before it was read
        self.decoded = 0  # tokens handed to the tokenizer's decode (a cost that must stay flat)

    @property
    def stable(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def tail(self, n: int) -> str:
        """The last n characters of the stable text, without joining all of it."""
        out, i = "", len(self.pieces)
        while len(out) < n and i:
            i -= 1
            out = self.pieces[i] + out
        return out[max(len(out) - n, 0):] if n > 0 else ""

    def read(self, tokens: Sequence[int]) -> str:
        """Read the tokens not read yet; returns the new stable text."""
        new = []
        for i in range(self.n, len(tokens)):
            self.offsets.append(self.length)
            if self.whole:
                new.append(self._whole(tokens[: i + 1]))
            elif tokens[i] not in self.skip:
                self.window.append(tokens[i])
                new.append(self._step())
        self.n = len(tokens)
        return "".join(new)

    def _decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens=True)

    def _step(self) -> str:
        text = self._decode(self.window)[len(self.base):]
        stable = text.rstrip(REPLACEMENT)
        delta = stable[self.out:]
        self._append(delta)
        self.out = max(self.out, len(stable))
        self.pending = text[self.out:]
        if text and not self.pending:  # everything out: the window restarts at the tokens just read
            self.window = self.window[self.base_tokens:]
            self.base_tokens, self.out = len(self.window), 0
            self.base = self._decode(self.window)
        return delta

    def _whole(self, tokens: Sequence[int]) -> str:
        text = self.last = self._decode(list(tokens))
        stable = text.rstrip(REPLACEMENT)
        delta = stable[self.length:] if stable.startswith(self.stable) else ""
        self._append(delta)
        self.pending = text[self.length:]
        return delta

    def _append(self, delta: str) -> None:
        if delta:
            self.pieces.append(delta)
            self.length += len(delta)

    def find(self, stops: Sequence[str], fresh: str) -> int | None:
        """Where the first stop string starts in the text (stable + pending), given that none was in
        it before `fresh`, the stable text just read: only the new text and the characters before
        it that could begin a stop string are searched."""
        if not stops:
            return None
        before = self.length - len(fresh)
        lead = min(max(len(s) for s in stops) - 1, before)
        region = self.tail(lead + len(fresh)) + self.pending
        found = [region.find(s) for s in stops if s in region]
        return before - lead + min(found) if found else None


def _find_stop(tok, seq: Seq) -> int | None:
    """Character offset where the first stop string starts in the decoded text, if one appeared.

    Called after every token, so a stop string not seen before ends in the text just read. The
    text is decoded incrementally (`Detokenizer`), which keeps stop strings whose characters span
    several byte-level tokens or are interleaved with special tokens (which decode to '').
    """
    start = seq.detok.length if seq.detok is not None else 0
    detok = seq.text(tok)
    if detok.whole:
        text = detok.last
        found = [text.find(s) for s in seq.params.stop if s in text]
        return min(found) if found else None
    return detok.find(seq.params.stop, detok.tail(detok.length - start))


def decode(models: ModelSet, prompts: Sequence[str], solver: Solver, params: SamplingParams,
           trace: bool = False, use_cache: bool = True, share_forwards: bool = True,
           speculate: int = 0) -> list[Generation]:
    """Decode a list of prompts together. Returns one Generation per prompt, in order."""
    params.check()
    seeds = seeds_for(params.seed, len(prompts)) if params.temperature > 0 else [None] * len(prompts)
    per_seq = [dataclasses.replace(params, seed=seed, stop=tuple(params.stop)) for seed in seeds]
    batch = Batch(models, solver, use_cache, share_forwards, speculate)
    seqs = batch.add(prompts, per_seq, trace)
    while len(batch):
        batch.step()
    return [s.result(models.tokenizer) for s in seqs]
