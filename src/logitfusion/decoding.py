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
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import Member, ModelSet
from .solvers import Choice, Solver

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
        if self.max_new_tokens < 1:
            raise DecodingError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise DecodingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise DecodingError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise DecodingError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise DecodingError("stop strings must be non-empty")


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

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Finish now (e.g. the client went away); the row leaves at the next step boundary."""
        if not self.done:
            self.finish_reason = "cancelled"

    def result(self, tokenizer) -> Generation:
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop_at is not None:
            text = text[: self.stop_at]
        return Generation(self.prompt, text, list(self.tokens), self.finish_reason or "length", self.error,
                          self.steps if self.trace else None)


# ---------------------------------------------------------------- one model's context and cache

class Context:
    """Token buffers, attention mask and KV cache of one model module, left padded.

    For a batch of B sequences it holds one block of B rows per member that runs on this module:
    the small base and its LoRA experts share one module and so run as ONE forward, each row
    with its own adapter (PEFT mixed-adapter batch). Buffers have room for `capacity` tokens;
    steps write into them in place, and they are reallocated only when rows join or leave.
    """

    def __init__(self, members: list[Member], ids: Tensor, mask: Tensor, length: int, vocab: int,
                 use_cache: bool, cache=None):
        self.members, self.vocab, self.use_cache = members, vocab, use_cache
        self.ids, self.mask, self.length, self.cache = ids, mask, length, cache
        self.model = members[0].model

    @classmethod
    def prefill(cls, members: list[Member], prompts: list[list[list[int]]], room: int, vocab: int, pad_id: int,
                use_cache: bool) -> tuple["Context", Tensor]:
        """prompts[g][i]: token ids of sequence i for member g. Returns the context and the last
        logits [G, B, V]."""
        from transformers import DynamicCache
        rows = [p for per_member in prompts for p in per_member]
        device, width = members[0].device, max(len(p) for p in rows)
        ids = torch.full((len(rows), width + room), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):
            ids[i, width - len(p):width] = torch.tensor(p, device=device)
            mask[i, width - len(p):width] = 1
        cache = DynamicCache(config=members[0].model.config) if use_cache else None
        ctx = cls(members, ids, mask, width, vocab, use_cache, cache)
        return ctx, ctx._forward(0)

    @property
    def seqs(self) -> int:
        return self.ids.shape[0] // len(self.members)

    def _forward(self, start: int) -> Tensor:
        mask = self.mask[:, : self.length]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, start:]
        adapters = {}
        if self.members[0].adapter is not None:
            adapters["adapter_names"] = [m.adapter for m in self.members for _ in range(self.seqs)]
        out = self.model(input_ids=self.ids[:, start: self.length], attention_mask=mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=self.use_cache, logits_to_keep=1, **adapters)
        logits = out.logits[:, -1, : self.vocab]  # padded embedding rows dropped
        return logits.view(len(self.members), self.seqs, -1)

    def step(self, tokens: Tensor) -> Tensor:
        """Append tokens [B] (one per sequence, the same for every member) -> logits [G, B, V]."""
        if self.length == self.ids.shape[1]:  # out of room (only after rows joined with a larger budget)
            self._resize(self.length + 16)
        self.ids[:, self.length] = tokens.to(self.ids.device).repeat(len(self.members))
        self.mask[:, self.length] = 1
        self.length += 1
        # With a cache only the new token is run; without, the whole sequence is recomputed.
        return self._forward(self.length - 1 if self.use_cache else 0)

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
        if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
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
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([mine.keys, theirs.keys])[order]
            mine.values = torch.cat([mine.values, theirs.values])[order]

    def select(self, seqs: Tensor) -> None:
        """Keep only these sequences, and drop leading columns that no remaining row uses."""
        seqs = seqs.to(self.ids.device)
        rows = torch.cat([g * self.seqs + seqs for g in range(len(self.members))])
        self.ids, self.mask = self.ids[rows], self.mask[rows]
        used = self.mask[:, : self.length].any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.ids, self.mask, self.length = self.ids[:, start:], self.mask[:, start:], self.length - start
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[rows, :, start:], layer.values[rows, :, start:]


# ---------------------------------------------------------------- token choice

def pick_tokens(logits: Tensor, seqs: Sequence[Seq]) -> Tensor:
    """Each row greedy or sampled with its own temperature / top-k / top-p. logits [B, V] -> [B].

    Sampling draws each row's noise from that sequence's own generator (Gumbel-max), so a
    sequence samples the same tokens whatever else is in the batch.
    """
    greedy = logits.argmax(-1)
    if all(s.params.temperature == 0 for s in seqs):
        return greedy
    device, vocab = logits.device, logits.shape[-1]
    temp = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=device)
    top_k = torch.tensor([s.params.top_k or vocab for s in seqs], device=device)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    sorted_logits, order = (logits.float() / temp[:, None]).sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    keep = torch.arange(vocab, device=device)[None] < top_k[:, None]
    keep &= (probs.cumsum(-1) - probs) < top_p[:, None]  # the top token is always kept
    noise = torch.stack([torch.rand(vocab, generator=s.generator) if s.generator is not None
                         else torch.full((vocab,), 0.5) for s in seqs]).to(device)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
    sampled = order.gather(-1, (sorted_logits.masked_fill(~keep, -math.inf) + gumbel).argmax(-1, keepdim=True))
    is_greedy = torch.tensor([s.params.temperature == 0 for s in seqs], device=device)
    return torch.where(is_greedy, greedy, sampled[:, 0])


def seeds_for(seed: int | Sequence[int] | None, n: int) -> list[int]:
    if seed is None:
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        return [base + i for i in range(n)]
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    if len(seed) != n:
        raise DecodingError(f"got {len(seed)} seeds for {n} prompts")
    return [int(s) for s in seed]


# ---------------------------------------------------------------- prompts

def render(template: str, prompt: str) -> str:
    return template.replace("{prompt}", prompt)


def encode_prompts(models: ModelSet, member: Member, prompts: Sequence[str]) -> list[list[int]]:
    out = []
    for i, prompt in enumerate(prompts):
        ids = models.tokenizer(render(member.template, prompt))["input_ids"]
        if not ids:
            raise DecodingError(f"prompt {i} is empty for {member.role} after templating; give some text")
        if member.context is not None and len(ids) >= member.context:
            raise DecodingError(f"prompt {i} is {len(ids)} tokens for {member.role}, whose context is "
                                f"{member.context} tokens; shorten the prompt (or its template)")
        out.append(ids)
    return out


def members_for(models: ModelSet, solver: Solver) -> list[Member]:
    """The models a solver reads, in the order large, small, experts."""
    idx = range(len(models.experts)) if solver.experts is None else solver.experts
    return ([models.large] if solver.uses_large else []) + ([models.small] if solver.uses_small else []) \
        + [models.experts[i] for i in idx]


def validate_prompts(models: ModelSet, prompts: Sequence[str], solver: Solver) -> dict[str, list[list[int]]]:
    """Check every prompt against every model the solver runs; returns token ids per model role.

    Cheap (tokenisation only), so callers can validate a whole input file before writing output.
    """
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise DecodingError(f"prompt {i} is empty; give some text to continue")
    solver.check(len(models.experts))
    return {m.role: encode_prompts(models, m, prompts) for m in members_for(models, solver)}


# ---------------------------------------------------------------- the loop

class Batch:
    """Sequences decoded together with one solver. `add` and `step` may interleave freely."""

    def __init__(self, models: ModelSet, solver: Solver, use_cache: bool = True, share_forwards: bool = True):
        solver.check(len(models.experts))
        self.models, self.solver, self.use_cache = models, solver, use_cache
        self.members = members_for(models, solver)
        # Members on one module (the small base and its LoRA experts) run as one forward, unless
        # share_forwards is off (then every model runs alone; used to check both agree).
        groups: dict[int, list[Member]] = {}
        for m in self.members:
            groups.setdefault(id(m.model) if share_forwards else id(m), []).append(m)
        self.groups = list(groups.values())
        self.device = self.members[0].device  # where fusion happens
        tok = models.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.seqs: list[Seq] = []
        self.contexts: list[Context] = []  # one per group, once sequences exist
        self.logits: dict[str, Tensor] = {}  # next-token logits per model role, [B, V]
        self._eos = torch.tensor(sorted(models.eos_token_ids) or [-1], device=self.device)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, prompts: Sequence[str], params: Sequence[SamplingParams], trace: bool = False) -> list[Seq]:
        """Prefill new sequences and merge them into the batch. params: one per prompt, each
        with an int seed (or None when greedy)."""
        for p in params:
            p.check()
        encoded = validate_prompts(self.models, prompts, self.solver)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            room = [m.context - len(encoded[m.role][i]) for m in self.members if m.context is not None]
            seq = Seq(prompt, p, trace, budget=min([p.max_new_tokens] + room))
            if p.temperature > 0:
                seq.generator = torch.Generator().manual_seed(int(p.seed if p.seed is not None else
                                                                  torch.randint(0, 2**31 - 1, ())))
            seqs.append(seq)
        room = max(s.budget for s in seqs)
        joining = bool(self.seqs)
        with torch.no_grad():
            for g, group in enumerate(self.groups):
                ctx, logits = Context.prefill(group, [encoded[m.role] for m in group], room,
                                              self.models.vocab_size, self.pad_id, self.use_cache)
                if joining:
                    self.contexts[g].merge(ctx)
                else:
                    self.contexts.append(ctx)
                for m, z in zip(group, logits.to(self.device)):
                    self.logits[m.role] = torch.cat([self.logits[m.role], z]) if joining else z
        self.seqs += seqs
        return seqs

    def step(self) -> list[tuple[Seq, int]]:
        """Pick one token for every sequence, advance every model. Returns (sequence, token) for
        each token appended; finished sequences leave the batch."""
        self._drop_done()
        if not self.seqs:
            return []
        emitted = []
        with torch.no_grad():
            choice = self._solve()
            tokens = pick_tokens(choice.logits, self.seqs)
            # Everything the host needs this step travels in one transfer.
            finite = torch.stack([self.logits[m.role].isfinite().all(-1) for m in self.members]
                                 + [choice.logits.isfinite().all(-1)])  # [M + 1, B]
            is_eos = (tokens[:, None] == self._eos).any(-1)
            host = torch.cat([tokens[None], finite.long(), is_eos.long()[None]]).cpu()
            if any(s.trace for s in self.seqs):
                self._record(choice)
            if any(s.params.logprobs for s in self.seqs):
                chosen = choice.logits.float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0].cpu().tolist()
            roles = [m.role for m in self.members] + ["fused"]
            for i, seq in enumerate(self.seqs):
                if seq.done:  # cancelled while waiting
                    continue
                bad = [role for role, ok in zip(roles, host[1:-1, i]) if not ok]
                if bad:
                    seq.finish_reason = "error"
                    seq.error = (f"{bad[0]} produced NaN/inf logits at step {len(seq.tokens)}; sequence "
                                 "stopped (check the model's weights and dtype)")
                    continue
                token = int(host[0, i])
                seq.tokens.append(token)
                if seq.params.logprobs:
                    seq.logprobs.append(chosen[i])
                emitted.append((seq, token))
                if host[-1, i] and not seq.params.ignore_eos:
                    seq.finish_reason = "eos"
                elif seq.params.stop and (cut := _find_stop(self.models.tokenizer, seq)) is not None:
                    seq.finish_reason, seq.stop_at = "stop", cut
                elif len(seq.tokens) >= seq.budget:
                    seq.finish_reason = "length"
            self._drop_done()
            if self.seqs:
                keep = torch.tensor([i for i, s in enumerate(self._last_rows) if not s.done], device=self.device)
                tokens = tokens[keep] if len(keep) < len(tokens) else tokens
                self.logits = {m.role: z for ctx in self.contexts
                               for m, z in zip(ctx.members, ctx.step(tokens).to(self.device))}
        return emitted

    def _solve(self) -> Choice:
        z = [self.logits[m.role] for m in self.members]
        z_large = z.pop(0) if self.solver.uses_large else None
        z_small = z.pop(0) if self.solver.uses_small else None
        z_experts = torch.stack(z, 1) if z else None
        self._last_rows = list(self.seqs)
        return self.solver(z_large, z_small, z_experts)

    def _drop_done(self) -> None:
        keep = [i for i, s in enumerate(self.seqs) if not s.done]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.contexts, self.logits = [], {}
            return
        rows = torch.tensor(keep, device=self.device)
        for ctx in self.contexts:
            ctx.select(rows)
        self.logits = {role: z[rows] for role, z in self.logits.items()}

    def _record(self, choice: Choice) -> None:
        tops = {}
        for role, z in [(m.role, self.logits[m.role]) for m in self.members] + [("fused", choice.logits)]:
            p, ids = z.float().softmax(-1).topk(min(TOP_TOKENS, z.shape[-1]), -1)
            tops[role] = (ids.cpu().tolist(), p.cpu().tolist())
        # Rounded so that a grid value 1.2 reads 1.2, not its float32 1.2000000476837158.
        weights = choice.weights.double().round(decimals=6).tolist() if choice.weights is not None else None
        objective = choice.objective.cpu().tolist() if choice.objective is not None else None
        for i, seq in enumerate(self.seqs):
            if seq.trace and not seq.done:
                seq.steps.append(StepTrace(weights[i] if weights else None, objective[i] if objective else None,
                                           {r: list(zip(ids[i], p[i])) for r, (ids, p) in tops.items()}))


def _find_stop(tok, seq: Seq) -> int | None:
    """Character offset where the first stop string starts in the decoded text, if one appeared."""
    window = max(len(s) for s in seq.params.stop) + 8  # every token decodes to >= 1 character
    tail = tok.decode(seq.tokens[-window:], skip_special_tokens=True)
    if not any(s in tail for s in seq.params.stop):
        return None
    text = tok.decode(seq.tokens, skip_special_tokens=True)
    return min(text.find(s) for s in seq.params.stop if s in text)


def decode(models: ModelSet, prompts: Sequence[str], solver: Solver, params: SamplingParams,
           trace: bool = False, use_cache: bool = True, share_forwards: bool = True) -> list[Generation]:
    """Decode a list of prompts together. Returns one Generation per prompt, in order."""
    params.check()
    seeds = seeds_for(params.seed, len(prompts)) if params.temperature > 0 else [None] * len(prompts)
    per_seq = [dataclasses.replace(params, seed=seed, stop=tuple(params.stop)) for seed in seeds]
    batch = Batch(models, solver, use_cache, share_forwards)
    seqs = batch.add(prompts, per_seq, trace)
    while len(batch):
        batch.step()
    return [s.result(models.tokenizer) for s in seqs]
