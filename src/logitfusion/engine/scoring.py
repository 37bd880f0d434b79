"""Teacher-forced scoring: fused log-probabilities of continuation tokens after a context, the
engine's second way through the models beside decoding (what lm-eval's loglikelihood needs).

One batched forward per model over (its own templated context + the shared continuation), run
exactly as decoding prefills (context.Context); the weights are solved per position by the same
solver objects as decoding, since solvers are pure functions of [B, V] logits: all positions of
a batch are solved as one flattened [N, V] batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .context import Context, Retokenizer, Row
from .decoding import members_for, render
from .errors import DecodingError
from .fusion import MAX_CHUNK_ELEMENTS
from .members import Logits, Member, ModelSet
from .solvers import Choice, Solver


@dataclass
class Scored:
    """One continuation scored under teacher forcing with the fused distribution."""

    logprobs: Tensor  # [n] fused log-prob of each continuation token
    greedy: Tensor  # [n] bool: the token is the fused argmax at its position
    last: Tensor  # [V] fused log-probs at the last position (choices that differ only there)
    weights: Tensor | None  # [n, T] the solved weights per position (None: no fusion)
    objective: Tensor | None  # [n] J at the chosen weights

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    def with_last(self, token: int) -> tuple[float, bool]:
        """(log-prob, is greedy) of the same continuation with its last token replaced."""
        prefix = float(self.logprobs[:-1].sum())
        return prefix + float(self.last[token]), bool(self.greedy[:-1].all()) and int(self.last.argmax()) == token


def prefix_token_id(tokenizer) -> int:
    """What an empty context is conditioned on (as lm-eval's hf backend): BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def context_ids(models: ModelSet, member: Member, context: str | Sequence[int]) -> list[int]:
    """A model's context tokens: text goes through the model's own prompt template (as in
    decoding); token ids are used as they are (no template). A member with its own tokenizer
    reads token contexts as their decoded text."""
    tok = member.tokenizer or models.tokenizer
    if isinstance(context, str):
        ids = tok(render(member.template, context))["input_ids"]
    elif member.foreign:
        ids = tok(models.tokenizer.decode(list(context)))["input_ids"]
    else:
        ids = list(context)
    return ids or [prefix_token_id(tok)]


def _fit(ids: list[int], n_cont: int, member: Member) -> list[int]:
    """Left-truncate a context so that context + continuation[:-1] fits the model's positions."""
    if member.context is None or len(ids) + n_cont - 1 <= member.context:
        return ids
    room = member.context - (n_cont - 1)
    if room < 1:
        raise DecodingError(f"a continuation of {n_cont} tokens does not fit {member.role}'s context of "
                        f"{member.context} tokens")
    return ids[-room:]


def _forward_last(member: Member, rows: list[list[int]], keep: int, vocab: int, pad_id: int) -> Tensor:
    """One forward over left-padded rows, exactly as decoding prefills them; logits of the last
    `keep` positions, [B, keep, V]."""
    _, logits = Context.prefill([member], [rows], 0, vocab, pad_id, use_cache=False, keep=keep)
    return logits[0] if keep > 1 else logits[0][:, None]


def _foreign_positions(member: Member, retok: Retokenizer, rows: list[tuple[list[int], list[int]]]) -> list[Tensor]:
    """Teacher forcing for a member with its own tokenizer: rows are (its context ids, the
    continuation in user tokens). Its ids at each position follow the decoding rule (extend on
    an exact token, else re-tokenise), so the ids of successive positions form runs that extend
    one another; each run is one forward row whose last positions give the logits. Returns per
    row the mapped logits [len(continuation), V_user]."""
    runs, owner = [], []  # (ids, positions it gives), row it belongs to
    for r, (prompt, cont) in enumerate(rows):
        row = Row(list(prompt), list(prompt))
        runs.append([list(row.ids), 1])
        owner.append(r)
        for t in cont[:-1]:
            if retok.follow(row, t):
                runs[-1] = [list(row.ids), runs[-1][1] + 1]
            else:
                runs.append([list(row.ids), 1])
                owner.append(r)
    keep = max(n for _, n in runs)
    _, logits = Context.prefill([member], [[ids for ids, _ in runs]], 0, member.vocab, retok.pad_id,
                                use_cache=False, keep=keep, retok=retok)
    logits = logits[0] if keep > 1 else logits[0][:, None]  # [runs, keep, V_user]
    out: list[list[Tensor]] = [[] for _ in rows]
    for (_, n), r, z in zip(runs, owner, logits):
        out[r].append(z[keep - n:])
    return [torch.cat(parts) for parts in out]


def solve_positions(solver: Solver, z: Logits) -> Choice:
    """The solver on [N, V] logits of every model it reads, in row chunks that bound its
    [rows, candidates, V] work. Rows are independent, so chunking changes nothing."""
    n, vocab = z.shape
    rows = max(1, MAX_CHUNK_ELEMENTS // (vocab * 32))
    parts = []
    for start in range(0, n, rows):
        parts.append(solver(z.rows(slice(start, start + rows))))

    def cat(field: str):
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Choice(cat("logits"), cat("weights"), cat("objective"))


@torch.no_grad()
def fused_logprobs(models: ModelSet, solver: Solver, contexts: Sequence[str | Sequence[int]],
                   continuations: Sequence[Sequence[int]], batch_size: int = 8) -> list[Scored]:
    """Score each continuation (token ids, shared by every model) after its context.

    A text context goes through each model's own template, as prompts do in decoding; a token
    context is used as is by every model. Requests are batched longest first; per batch, each
    model the solver reads runs one forward, and the solver runs once on the logits of every
    continuation position of the batch, flattened to [N, V].
    """
    if len(contexts) != len(continuations):
        raise DecodingError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if any(len(c) == 0 for c in continuations):
        raise DecodingError("empty continuation: there is nothing to score")
    solver.check(len(models.experts))
    members = members_for(models, solver)
    device = members.first.device
    tok = models.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else prefix_token_id(tok)
    by_template: dict[tuple, list[list[int]]] = {}  # models sharing a template and tokenizer share its tokens
    key = lambda m: (m.template, id(m.tokenizer))  # noqa: E731
    for m in members:
        if key(m) not in by_template:
            by_template[key(m)] = [context_ids(models, m, c) for c in contexts]
    longest = [max(len(ids[i]) for ids in by_template.values()) + len(continuations[i]) for i in range(len(contexts))]
    order = sorted(range(len(contexts)), key=lambda i: -longest[i])
    out: list[Scored | None] = [None] * len(contexts)
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        conts = [list(continuations[i]) for i in batch]
        keep = max(len(c) for c in conts)
        z = {}  # per member role, [N, V]
        for m in members:
            if m.foreign:
                pairs = [(_fit(by_template[key(m)][i], len(c), m), c) for i, c in zip(batch, conts)]
                z[m.role] = torch.cat(_foreign_positions(m, Retokenizer(m, tok), pairs)).to(device)
                continue
            rows = [_fit(by_template[key(m)][i], len(c), m) + c[:-1] for i, c in zip(batch, conts)]
            logits = _forward_last(m, rows, keep, models.vocab_size, pad_id).to(device)
            z[m.role] = torch.cat([logits[b, keep - len(c):] for b, c in enumerate(conts)])
        choice = solve_positions(solver, members.logits(z))
        logp = choice.logits.float().log_softmax(-1)  # [N, V]
        targets = torch.tensor([t for c in conts for t in c], device=logp.device)
        token_lp = logp.gather(-1, targets[:, None])[:, 0]
        greedy = logp.argmax(-1) == targets
        ends = torch.tensor([len(c) for c in conts]).cumsum(0).tolist()
        for i, end, c in zip(batch, ends, conts):
            span = slice(end - len(c), end)
            out[i] = Scored(token_lp[span].cpu(), greedy[span].cpu(), logp[end - 1].cpu(),
                            None if choice.weights is None else choice.weights[span].cpu(),
                            None if choice.objective is None else choice.objective[span].cpu())
    return out  # type: ignore[return-value]
