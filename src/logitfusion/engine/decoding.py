"""The one decoding loop. CLI, Python API, evaluation and server all decode through `Batch`.

Each step: every model the solver needs runs one forward on its own context (own prompt
template, own left padding, own KV cache: context.py), the solver turns their logits into fused
logits, one token is picked per sequence (sampling.py) and appended to every model's context.
A batch that may speculate runs speculative rounds instead (speculation.py).

A `Batch` is step-wise so that a server can batch dynamically: sequences join (their prompts
are prefilled and merged into the running caches) and leave (finished rows are dropped) at step
boundaries. `decode` is the whole loop for a fixed list of prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from . import limits
from .compat import warn_once
from .context import Context, Retokenizer
from .detokenize import Detokenizer, find_stop
from .members import Member, Members, ModelSet
from .sampling import DecodingError, Rows, SamplingParams, seeds_for
from .solvers import Choice, Solver, SolverError
from .speculation import (ACCEPT_PRIOR, DRAFT_COST, can_speculate, check_draft_cost, check_speculate, observe_plain,
                          pick, plan_round, refusal, speculative_round)
from .stacking import lora_stack, shared_stack

TOP_TOKENS = 5  # tokens per model shown in a trace


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
    acceptance: float = ACCEPT_PRIOR  # running estimate of how often its drafts are accepted
    detok: Detokenizer | None = None  # see `text`

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Finish now (e.g. the client went away); the row leaves at the next step boundary."""
        if not self.done:
            self.finish_reason = "cancelled"

    def text(self, tokenizer) -> Detokenizer:
        """The sequence's text so far, decoded incrementally (for stop strings and streams)."""
        if self.detok is None:
            self.detok = Detokenizer(tokenizer)
        self.detok.read(self.tokens)
        return self.detok

    def emit(self, verdict: tuple, step: StepTrace | None, tokenizer) -> bool:
        """Append one token (a `Batch.verdicts` row) and decide whether the sequence finished.
        False if none was appended."""
        token, bad, is_eos, logprob = verdict
        if self.done:  # cancelled while waiting
            return False
        if bad is not None:
            self.finish_reason = "error"
            self.error = (f"{bad} produced NaN/inf logits at step {len(self.tokens)}; sequence "
                          "stopped (check the model's weights and dtype)")
            return False
        self.tokens.append(token)
        if self.params.logprobs:
            self.logprobs.append(logprob)
        if self.trace and step is not None:
            self.steps.append(step)
        if is_eos and not self.params.ignore_eos:
            self.finish_reason = "eos"
        elif self.params.stop and (cut := find_stop(tokenizer, self)) is not None:
            self.finish_reason, self.stop_at = "stop", cut
        elif len(self.tokens) >= self.budget:
            self.finish_reason = "length"
        return True

    def result(self, tokenizer) -> Generation:
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop_at is not None:
            text = text[: self.stop_at]
        return Generation(self.prompt, text, list(self.tokens), self.finish_reason or "length", self.error,
                          self.steps if self.trace else None)



# ---------------------------------------------------------------- prompts and forward planning

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


def members_for(models: ModelSet, solver: Solver) -> Members:
    """The models a solver reads, by kind."""
    members = models.select(solver.reads, solver.experts)
    lacking = members.lacking()
    if lacking is not None:
        raise SolverError(f"method {solver.name!r} needs {lacking.missing}")
    return members


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




def plan_forwards(models: ModelSet, members: Iterable[Member], share_forwards: bool = True) \
        -> tuple[list[list[Member]], list, list[Retokenizer | None]]:
    """How the members run: (groups of members that share one forward, the module each group
    runs, its Retokenizer when the group has a tokenizer of its own).

    Members on one module (the small base and its LoRA experts) run as one forward, and so do
    full-weight copies of the small model (the small base, full experts) on one module with their
    weights stacked; unless share_forwards is off (then every model runs alone; used to check
    both agree). A PEFT group runs its adapters stacked (bmm) rather than through PEFT's
    per-adapter loop, where they can be.
    """
    stack, stacked = shared_stack(models, members) if share_forwards else (None, [])
    groups: dict[int | str, list[Member]] = {}
    for m in members:
        key = "stack" if any(m is s for s in stacked) else id(m.model) if share_forwards else id(m)
        groups.setdefault(key, []).append(m)
    modules = [stack if key == "stack" else lora_stack(models, g) if share_forwards and g[0].adapter
               else g[0].model for key, g in groups.items()]
    # Members with their own tokenizer follow the user's text through a Retokenizer.
    retoks = [Retokenizer(g[0], models.tokenizer) if g[0].foreign else None for g in groups.values()]
    return list(groups.values()), modules, retoks


def step_traces(members: Iterable[Member], logits: dict[str, Tensor], choice: Choice) -> list[StepTrace]:
    """One StepTrace per row of `choice`: each model's and the fused top tokens, the weights and J."""
    tops = {}
    for role, z in [(m.role, logits[m.role]) for m in members] + [("fused", choice.logits)]:
        p, ids = z.float().softmax(-1).topk(min(TOP_TOKENS, z.shape[-1]), -1)
        tops[role] = (ids.cpu().tolist(), p.cpu().tolist())
    # Rounded so that a grid value 1.2 reads 1.2, not its float32 1.2000000476837158.
    weights = choice.weights.double().round(decimals=6).tolist() if choice.weights is not None else None
    objective = choice.objective.cpu().tolist() if choice.objective is not None else None
    return [StepTrace(weights[i] if weights else None, objective[i] if objective else None,
                      {r: list(zip(ids[i], p[i])) for r, (ids, p) in tops.items()})
            for i in range(choice.logits.shape[0])]


# ---------------------------------------------------------------- the loop

@dataclass
class Joining:
    """Sequences prefilled by `Batch.prefill`, waiting to `join` the batch."""

    seqs: list[Seq]
    contexts: list[tuple]  # per group: (Context, logits [G, B, V])


class Batch:
    """Sequences decoded together with one solver. `add` and `step` may interleave freely."""

    def __init__(self, models: ModelSet, solver: Solver, use_cache: bool = True, share_forwards: bool = True,
                 speculate: int = 0, adaptive: bool = True, draft_cost: float = DRAFT_COST):
        solver.check(len(models.experts))
        check_speculate(speculate)
        check_draft_cost(draft_cost)
        self.models, self.solver, self.use_cache = models, solver, use_cache
        self.speculate = speculate  # draft length k (at most k when adaptive); 0 or 1 = plain decoding
        # adaptive: each round's k from the rows' acceptance (speculation.plan_round), where one
        # more drafted position costs draft_cost plain steps
        self.adaptive, self.draft_cost = adaptive, draft_cost
        self.members = members_for(models, solver)
        self.groups, self.modules, self.retoks = plan_forwards(models, self.members, share_forwards)
        why_not = refusal(self)
        self.speculative = why_not is None  # whether speculate > 1 runs speculative rounds
        if speculate > 1 and why_not:
            warn_once(f"speculate={speculate} ignored, decoding one token per step: {why_not}")
        self.device = self.members.first.device  # where fusion happens
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

    def prefill(self, prompts: Sequence[str], params: Sequence[SamplingParams], trace: bool = False) -> Joining:
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

    def join(self, joining: Joining) -> list[Seq]:
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
        self.drop_done()
        if not self.seqs:
            return []
        with torch.no_grad():
            if can_speculate(self):
                k, caps = plan_round(self)
                if k > 1:
                    return speculative_round(self, k, caps)
            return self._plain_step()

    def _plain_step(self) -> list[tuple[Seq, int]]:
        choice = self.solve(self.logits)
        if can_speculate(self) and self.adaptive:
            observe_plain(self, choice)
        tokens = pick(choice.logits, self.sampling, self.seqs)  # after a round: from the residual
        verdicts = self.verdicts(self.logits, choice, tokens)
        steps = self.trace(self.logits, choice)
        emitted = []
        for i, seq in enumerate(self.seqs):
            if seq.emit(verdicts[i], steps[i] if steps else None, self.models.tokenizer):
                emitted.append((seq, seq.tokens[-1]))
        rows = self.seqs
        self.drop_done()
        if self.seqs:
            keep = torch.tensor([i for i, s in enumerate(rows) if not s.done], device=self.device)
            tokens = tokens[keep] if len(keep) < len(tokens) else tokens
            self.logits = {m.role: z for ctx in self.contexts
                           for m, z in zip(ctx.members, ctx.step(tokens).to(self.device))}
        return emitted

    def solve(self, logits: dict[str, Tensor]) -> Choice:
        return self.solver.on(self.members.logits(logits))

    def verdicts(self, logits: dict[str, Tensor], choice: Choice, tokens: Tensor) -> list[tuple]:
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

    def trace(self, logits: dict[str, Tensor], choice: Choice) -> list[StepTrace] | None:
        """One StepTrace per row of `choice`, or None when no sequence asked for a trace."""
        if not any(s.trace for s in self.seqs):
            return None
        return step_traces(self.members, logits, choice)

    def drop_done(self) -> None:
        """Finished rows leave: their rows go from every context, the logits and the sampling rows."""
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


def decode(models: ModelSet, prompts: Sequence[str], solver: Solver, params: SamplingParams,
           trace: bool = False, use_cache: bool = True, share_forwards: bool = True,
           speculate: int = 0, adaptive: bool = True, draft_cost: float = DRAFT_COST) -> list[Generation]:
    """Decode a list of prompts together. Returns one Generation per prompt, in order."""
    params.check()
    seeds = seeds_for(params.seed, len(prompts)) if params.temperature > 0 else [None] * len(prompts)
    per_seq = [dataclasses.replace(params, seed=seed, stop=tuple(params.stop)) for seed in seeds]
    batch = Batch(models, solver, use_cache, share_forwards, speculate, adaptive, draft_cost)
    seqs = batch.add(prompts, per_seq, trace)
    while len(batch):
        batch.step()
    return [s.result(models.tokenizer) for s in seqs]
