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

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from . import limits
from .compat import warn_once
from .config import EngineConfig
from .detokenize import Detokenizer, find_stop
from .members import Member, Members, ModelSet
from .sampling import DecodingError, Rows, SamplingParams, pick
from .solvers import Choice, Solver, SolverError
from .speculation import ACCEPT_PRIOR, Round, can_speculate, observe_plain, plan_round, refusal, speculative_round
from .runner import HFRunner, Prefilled

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
    prompt_tokens: int = 0  # the first member's (the large model's) prompt length, for usage figures
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
            self.error = (f"{bad} produced NaN or +inf logits, or no finite logit, at step {len(self.tokens)}; "
                          "sequence stopped (check the model's weights and dtype; -inf alone is a mask)")
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
            raise DecodingError(f"prompt {i} is empty for {member.role} after templating; give some text",
                                field="prompt")
        if member.context is not None and len(ids) >= member.context:
            raise DecodingError(f"prompt {i} is {len(ids)} tokens for {member.role}, whose context is "
                                f"{member.context} tokens; shorten the prompt (or its template)", field="prompt")
        out.append(ids)
    return out


def members_for(models: ModelSet, solver: Solver) -> Members:
    """The models a solver reads, by kind."""
    members = models.select(solver.reads, solver.experts)
    lacking = members.lacking()
    if lacking is not None:
        raise SolverError(f"method {solver.name!r} needs {lacking.missing}")
    return members


@dataclass(frozen=True)
class Encoded:
    """A prompt checked and tokenised for the models one solver runs: its text and, per member role,
    its templated token ids. Batch.prefill takes these as they are (a prompt is tokenised once)."""

    text: str
    ids: dict[str, list[int]]


def validate_prompts(models: ModelSet, prompts: Sequence[str | Encoded], solver: Solver) -> list[Encoded]:
    """Check every prompt against every model the solver runs, tokenising each once (an Encoded
    prompt is taken as it is). Cheap, so callers can validate a whole input file before writing output."""
    solver.check(len(models.experts))
    members = members_for(models, solver)
    texts = [p.text if isinstance(p, Encoded) else p for p in prompts]
    for i, p in enumerate(texts):
        problem = limits.text_problem(f"prompt {i}", p)
        if problem:
            raise DecodingError(problem, field="prompt")
        if not p:
            raise DecodingError(f"prompt {i} is empty; give some text to continue", field="prompt")
    todo = [i for i, p in enumerate(prompts) if not (isinstance(p, Encoded) and all(m.role in p.ids for m in members))]
    fresh = {m.role: encode_prompts(models, m, [texts[i] for i in todo]) for m in members}
    out = list(prompts)
    for j, i in enumerate(todo):
        out[i] = Encoded(texts[i], {role: ids[j] for role, ids in fresh.items()})
    return out


def usable(z: Tensor) -> Tensor:
    """Rows of logits [N, V] that can be decoded from: no NaN, no +inf, at least one finite logit
    (-inf masks a token) -> [N] bool."""
    return z.amax(-1).isfinite()


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
    rows: Prefilled  # their rows in the runner


class Batch:
    """Sequences decoded together with one solver. `add` and `step` may interleave freely."""

    def __init__(self, models: ModelSet, solver: Solver, engine: EngineConfig | None = None):
        solver.check(len(models.experts))
        self.engine = (engine or EngineConfig()).check()
        self.models, self.solver = models, solver
        self.members = members_for(models, solver)
        self.runner = HFRunner(models, self.members, self.engine.use_cache, self.engine.share_forwards)
        why_not = refusal(self)
        self.speculative = why_not is None  # whether speculate > 1 runs speculative rounds
        if self.engine.speculate > 1 and why_not:
            warn_once(f"speculate={self.engine.speculate} ignored, decoding one token per step: {why_not}")
        self.device = self.members.first.device  # where fusion happens
        self.seqs: list[Seq] = []
        self.sampling = Rows.of([], self.device)  # the rows' sampling parameters, as seqs change
        self.logits: dict[str, Tensor] = {}  # next-token logits per model role, [B, V]
        self._eos = torch.tensor(sorted(models.eos_token_ids) or [-1], device=self.device)

    def __len__(self) -> int:
        return len(self.seqs)

    # The runner's forward groups and contexts, as speculation and tests see them.
    groups = property(lambda self: self.runner.groups)
    modules = property(lambda self: self.runner.modules)
    retoks = property(lambda self: self.runner.retoks)
    contexts = property(lambda self: self.runner.contexts)

    def add(self, prompts: Sequence[str | Encoded], params: Sequence[SamplingParams], trace: bool | None = None) -> list[Seq]:
        """Prefill new sequences and merge them into the batch. params: one per prompt, each
        with an int seed (or None when greedy; SamplingParams.per_prompt)."""
        return self.join(self.prefill(prompts, params, trace))

    def prefill(self, prompts: Sequence[str | Encoded], params: Sequence[SamplingParams], trace: bool | None = None) -> Joining:
        """Check and prefill new sequences without touching the running ones: whatever fails here
        (a bad prompt or seed, memory) leaves the batch as it was. `join` then merges them."""
        for p in params:
            p.check()
        trace = self.engine.trace if trace is None else trace
        encoded = validate_prompts(self.models, prompts, self.solver)
        seqs = []
        for prompt, p in zip(encoded, params):
            room = [m.context - len(prompt.ids[m.role]) for m in self.members if m.context is not None]
            seq = Seq(prompt.text, p, trace, budget=min([p.max_new_tokens] + room),
                      prompt_tokens=len(prompt.ids[self.members.first.role]))
            if p.temperature > 0:
                # On the device where tokens are picked: drawing noise there needs no host copy.
                seq.generator = torch.Generator(self.device).manual_seed(
                    int(p.seed if p.seed is not None else torch.randint(0, 2**31 - 1, ())))
            seqs.append(seq)
        room = max(s.budget for s in seqs)
        rows = self.runner.prefill({m.role: [e.ids[m.role] for e in encoded] for m in self.members}, room)
        return Joining(seqs, rows)

    def join(self, joining: Joining) -> list[Seq]:
        """Merge prefilled sequences into the batch (at a step boundary)."""
        first = not self.seqs
        for role, z in self.runner.join(joining.rows).items():
            z = z.to(self.device)
            self.logits[role] = z if first else torch.cat([self.logits[role], z])
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
                    return self.apply(speculative_round(self, k, caps))
            return self._plain_step()

    def apply(self, round: Round) -> list[tuple[Seq, int]]:
        """Append a speculative round's tokens to each row, stopping early where a sequence
        finishes; the round's logits are the next step's."""
        emitted = []
        for seq, tokens in zip(self.seqs, round.tokens):
            for verdict, step in tokens:
                if not seq.emit(verdict, step, self.models.tokenizer):
                    break
                emitted.append((seq, seq.tokens[-1]))
                if seq.done:
                    break
        self.logits = round.logits
        self.drop_done()
        return emitted

    def _plain_step(self) -> list[tuple[Seq, int]]:
        choice = self.solve(self.logits)
        if can_speculate(self) and self.engine.speculate_adaptive:
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
            self.logits = {role: z.to(self.device) for role, z in self.runner.step(tokens).items()}
        return emitted

    def solve(self, logits: dict[str, Tensor]) -> Choice:
        return self.solver(self.members.logits(logits))

    def verdicts(self, logits: dict[str, Tensor], choice: Choice, tokens: Tensor) -> list[tuple]:
        """Per row: (token, first model with unusable logits or None, is EOS, fused log-prob).
        Everything the host needs travels in one transfer."""
        # -inf is a mask (top-k, plausibility, grammars); a row is unusable when it holds a NaN or
        # a +inf, or no finite logit: exactly when its max is not finite (amax propagates NaN).
        # A masking rule may hide a model's NaN from the fused logits, so every model is checked too.
        fused_ok = usable(choice.logits)  # [N]
        for m in self.members:
            fused_ok = fused_ok & usable(logits[m.role])
        is_eos = (tokens[:, None] == self._eos).any(-1)
        if any(s.params.logprobs for s in self.seqs):
            logprob = choice.logits.float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
        else:  # not needed: skip a [N, V] log-softmax on every step
            logprob = torch.zeros_like(tokens, dtype=torch.float32)
        host = torch.stack([tokens.double(), fused_ok.double(), is_eos.double(), logprob.double()], -1).cpu().tolist()
        bad = {}
        if not all(ok for _, ok, _, _ in host):
            finite = torch.stack([usable(logits[m.role]) for m in self.members], -1)  # [N, M]
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
            self.runner.select(torch.tensor([], dtype=torch.long))
            self.logits = {}
            return
        rows = torch.tensor(keep, device=self.device)
        self.runner.select(rows)
        self.logits = {role: z[rows] for role, z in self.logits.items()}


def decode(models: ModelSet, prompts: Sequence[str | Encoded], solver: Solver, params: SamplingParams | Sequence[SamplingParams],
           engine: EngineConfig | None = None) -> list[Generation]:
    """Decode a list of prompts together. params: one for all (SamplingParams.per_prompt gives each
    prompt its seed) or one per prompt. Returns one Generation per prompt, in order."""
    per_seq = params.per_prompt(len(prompts)) if isinstance(params, SamplingParams) else list(params)
    batch = Batch(models, solver, engine)
    seqs = batch.add(prompts, per_seq)
    while len(batch):
        batch.step()
    return [s.result(models.tokenizer) for s in seqs]
