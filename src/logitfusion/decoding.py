"""The one decoding loop. CLI, Python API, evaluation and server all decode through `decode`.

Each step: every model the solver needs runs one forward on its own context (own prompt
template, own left padding, own KV cache), the solver turns their logits into fused logits,
one token is picked per sequence and appended to every model's context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .models import Member, ModelSet
from .solvers import Solver

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
    finish_reason: str  # "eos" | "stop" | "length" | "error"
    error: str | None = None
    trace: list[StepTrace] | None = None

    @property
    def weights(self) -> list[list[float]]:
        """Per step, the weight of each expert (empty without a trace or without fusion)."""
        return [s.weights for s in (self.trace or []) if s.weights is not None]


# ---------------------------------------------------------------- one model's context and cache

class Context:
    """One model's token buffer, attention mask and KV cache for a batch, left padded.

    Buffers are allocated once for prompt + max_new_tokens; steps write into them in place.
    """

    def __init__(self, member: Member, prompts: list[list[int]], max_new: int, vocab: int,
                 pad_id: int, use_cache: bool):
        from transformers import DynamicCache
        self.member, self.vocab, self.use_cache = member, vocab, use_cache
        device = member.device
        batch, width = len(prompts), max(len(p) for p in prompts)
        self.ids = torch.full((batch, width + max_new), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, width + max_new), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.ids[i, width - len(p):width] = torch.tensor(p, device=device)
            self.mask[i, width - len(p):width] = 1
        self.length = width
        self.cache = DynamicCache(config=member.model.config) if use_cache else None
        self.kwargs = member.forward_kwargs(batch)

    def _forward(self, start: int) -> Tensor:
        mask = self.mask[:, : self.length]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, start:]
        out = self.member.model(input_ids=self.ids[:, start: self.length], attention_mask=mask,
                                position_ids=positions, past_key_values=self.cache,
                                use_cache=self.use_cache, logits_to_keep=1, **self.kwargs)
        return out.logits[:, -1, : self.vocab]  # padded embedding rows dropped

    def prefill(self) -> Tensor:
        return self._forward(0)

    def step(self, tokens: Tensor) -> Tensor:
        self.ids[:, self.length] = tokens.to(self.ids.device)
        self.mask[:, self.length] = 1
        self.length += 1
        # With a cache only the new token is run; without, the whole sequence is recomputed.
        return self._forward(self.length - 1 if self.use_cache else 0)


# ---------------------------------------------------------------- token choice

def pick_tokens(logits: Tensor, params: SamplingParams, generators: list[torch.Generator] | None) -> Tensor:
    """Greedy argmax, or sampling with temperature / top-k / top-p. logits [B, V] -> [B].

    Sampling draws each row's noise from that sequence's own generator (Gumbel-max), so a
    sequence samples the same tokens whatever else is in the batch.
    """
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p  # always keeps the top token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    noise = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(logits.device)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
    return (logits + gumbel).argmax(-1)


def seeds_for(seed: int | Sequence[int] | None, n: int) -> list[int]:
    if seed is None:
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        return [base + i for i in range(n)]
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    if len(seed) != n:
        raise DecodingError(f"got {len(seed)} seeds for {n} prompts")
    return [int(s) for s in seed]


# ---------------------------------------------------------------- the loop

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


def members_for(models: ModelSet, solver: Solver) -> tuple[Member | None, Member | None, list[Member]]:
    large = models.large if solver.uses_large else None
    small = models.small if solver.uses_small else None
    idx = range(len(models.experts)) if solver.experts is None else solver.experts
    return large, small, [models.experts[i] for i in idx]


def validate_prompts(models: ModelSet, prompts: Sequence[str], solver: Solver) -> dict[str, list[list[int]]]:
    """Check every prompt against every model the solver runs; returns token ids per model role.

    Cheap (tokenisation only), so callers can validate a whole input file before writing output.
    """
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise DecodingError(f"prompt {i} is empty; give some text to continue")
    solver.check(len(models.experts))
    large, small, experts = members_for(models, solver)
    return {m.role: encode_prompts(models, m, prompts) for m in (large, small, *experts) if m is not None}


def decode(models: ModelSet, prompts: Sequence[str], solver: Solver, params: SamplingParams,
           trace: bool = False, use_cache: bool = True,
           on_step: Callable[[int], None] | None = None) -> list[Generation]:
    """Decode one batch of prompts. Returns one Generation per prompt, in order."""
    params.check()
    encoded = validate_prompts(models, prompts, solver)
    large, small, experts = members_for(models, solver)
    running = [m for m in (large, small, *experts) if m is not None]
    tok = models.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batch = len(prompts)
    # A sequence also stops when any model's context is full.
    budget = [min([params.max_new_tokens] + [m.context - len(encoded[m.role][i])
                                             for m in running if m.context is not None])
              for i in range(batch)]
    max_new = max(budget)
    contexts = {m.role: Context(m, encoded[m.role], max_new, models.vocab_size, pad_id, use_cache)
                for m in running}
    fusion_device = running[0].device
    generators = ([torch.Generator().manual_seed(s) for s in seeds_for(params.seed, batch)]
                  if params.temperature > 0 else None)
    eos = torch.tensor(sorted(models.eos_token_ids) or [-1], device=fusion_device)
    stop_window = max((len(s) for s in params.stop), default=0) + 8  # tokens re-decoded per check

    tokens_out: list[list[int]] = [[] for _ in range(batch)]
    finish: list[str | None] = [None] * batch
    errors: list[str | None] = [None] * batch
    traces: list[list[StepTrace]] | None = [[] for _ in range(batch)] if trace else None
    stop_cut: list[int | None] = [None] * batch

    with torch.no_grad():
        logits = {role: c.prefill().to(fusion_device) for role, c in contexts.items()}
        for step in range(max_new):
            z_large = logits[large.role] if large else None
            z_small = logits[small.role] if small else None
            z_experts = torch.stack([logits[m.role] for m in experts], 1) if experts else None
            choice = solver(z_large, z_small, z_experts)
            next_tokens = pick_tokens(choice.logits, params, generators)
            # Everything the host needs this step travels in one transfer.
            finite = torch.stack([logits[m.role].isfinite().all(-1) for m in running]
                                 + [choice.logits.isfinite().all(-1)])  # [M + 1, B]
            is_eos = (next_tokens[:, None] == eos).any(-1)
            host = torch.cat([next_tokens[None], finite.long(), is_eos.long()[None]]).cpu()
            if traces is not None:
                _record(traces, finish, choice, logits, running)
            for i in range(batch):
                if finish[i] is not None:
                    continue
                bad = [role for role, ok in zip([m.role for m in running] + ["fused"], host[1:-1, i]) if not ok]
                if bad:
                    finish[i], errors[i] = "error", (f"{bad[0]} produced NaN/inf logits at step {step}; "
                                                     "sequence stopped (check the model's weights and dtype)")
                    continue
                tokens_out[i].append(int(host[0, i]))
                if host[-1, i]:
                    finish[i] = "eos"
                elif params.stop and (cut := _find_stop(tok, tokens_out[i], params.stop, stop_window)) is not None:
                    finish[i], stop_cut[i] = "stop", cut
                elif len(tokens_out[i]) >= budget[i]:
                    finish[i] = "length"
            if on_step is not None:
                on_step(step)
            if all(f is not None for f in finish):
                break
            logits = {role: c.step(next_tokens).to(fusion_device) for role, c in contexts.items()}

    gens = []
    for i in range(batch):
        text = tok.decode(tokens_out[i], skip_special_tokens=True)
        if stop_cut[i] is not None:
            text = text[: stop_cut[i]]
        gens.append(Generation(prompts[i], text, tokens_out[i], finish[i] or "length", errors[i],
                               traces[i] if traces is not None else None))
    return gens


def _find_stop(tok, ids: list[int], stops: Sequence[str], window: int) -> int | None:
    """Character offset where the first stop string starts in the decoded text, if one appeared."""
    tail = tok.decode(ids[-window:], skip_special_tokens=True)
    if not any(s in tail for s in stops):
        return None
    text = tok.decode(ids, skip_special_tokens=True)
    return min(text.find(s) for s in stops if s in text)


def _record(traces, finish, choice, logits, running) -> None:
    tops = {}
    for role, z in [(m.role, logits[m.role]) for m in running] + [("fused", choice.logits)]:
        p, ids = z.float().softmax(-1).topk(TOP_TOKENS, -1)
        tops[role] = (ids.cpu().tolist(), p.cpu().tolist())
    # Rounded so that a grid value 1.2 reads 1.2, not its float32 1.2000000476837158.
    weights = choice.weights.double().round(decimals=6).tolist() if choice.weights is not None else None
    objective = choice.objective.cpu().tolist() if choice.objective is not None else None
    for i, tr in enumerate(traces):
        if finish[i] is None:
            tr.append(StepTrace(weights[i] if weights else None, objective[i] if objective else None,
                                {r: list(zip(ids[i], p[i])) for r, (ids, p) in tops.items()}))
