"""Speculative fused decoding: when a batch may speculate (`can_speculate`), one round
(`speculative_round`) lets the small side draft k tokens and the large model check all k in one
forward; sampled rows keep drafts by speculative sampling's test (`accept`) and redraw a
rejected position from the residual distribution (`residual`).

Adaptive draft length (`plan_round`): each row keeps a running estimate of how often its drafts
are kept (`Seq.acceptance`): in rounds, from each draft's probability of being kept; between
rounds, from plain steps (`observe_plain`: what a draft would have scored there). Each round takes
the k with the most expected tokens per unit of cost summed over the rows, so a poorly accepting
row counts for its one token a round, not for an average acceptance that would drag k down for
everyone; when no k pays, the batch decodes plainly. Drafting and checking run batched, so k is
one per round; a sampled row is capped at the k that pays for it alone, which keeps its tokens
for a seed independent of the rows beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from .config import EngineConfig
from .context import Context
from .members import Members
from .sampling import Rows, accept, kept_probability, pick, sample, warp
from .solvers import Choice, Solver


class Seq(Protocol):
    """What speculation reads and keeps of a sequence (decoding.Seq)."""

    acceptance: float  # running estimate of how often its drafts are kept
    generator: torch.Generator | None
    rejected_q: Tensor | None


class Batch(Protocol):
    """What a speculative round reads of the batch it runs for (decoding.Batch); it changes
    nothing there but the runner's contexts (drafts fed, rejected ones masked) and the rows'
    speculation state, and returns a `Round` that the batch applies."""

    seqs: Sequence[Any]
    members: Members
    models: Any
    solver: Solver
    engine: EngineConfig
    sampling: Rows
    logits: dict[str, Tensor]
    device: torch.device
    contexts: list[Context]
    groups: list
    speculative: bool

    def solve(self, logits: dict[str, Tensor]) -> Choice: ...
    def verdicts(self, logits: dict[str, Tensor], choice: Choice, tokens: Tensor) -> list[tuple]: ...
    def trace(self, logits: dict[str, Tensor], choice: Choice) -> list | None: ...


@dataclass
class Round:
    """What a speculative round decided: per row, the (verdict, trace step) of each token it emits,
    d_0..d_m in order (the batch appends them until a sequence finishes), and the next step's
    logits per member role [B, V] (the prediction after each row's last accepted token)."""

    tokens: list[list[tuple]]
    logits: dict[str, Tensor]


def refusal(batch: Batch) -> str | None:
    """Why this batch's solver and members cannot run speculative rounds, or None."""
    why = batch.solver.speculation_refusal()
    if why:
        return why
    members = batch.members
    if not (members.large and members.small and members.experts):
        return "speculation needs a method that reads the large model, the small one and an expert"
    if not any(len(group) == 1 and group[0] is batch.models.large for group in batch.groups):
        return "the large model does not run a forward of its own"
    if any(m.foreign for m in members):  # drafts are not re-tokenised
        return "a member has a tokenizer of its own"
    return None


def can_speculate(batch: Batch) -> bool:
    return batch.engine.speculate > 1 and batch.speculative


# A new row's assumed acceptance: optimistic enough that a batch tries to speculate at first.
ACCEPT_PRIOR = 0.7
# Weight of each new observation in a row's running acceptance (about the last 10 drafts count).
ACCEPT_MEMORY = 0.1


def expected_tokens(acceptance: Tensor, k_max: int) -> Tensor:
    """Tokens a round emits per row for each draft length k = 1..k_max, if each draft is accepted
    with probability `acceptance` [B] independently: 1 + a + ... + a^(k-1) -> [B, k_max]."""
    powers = acceptance[:, None] ** torch.arange(k_max)  # [B, k_max]
    return powers.cumsum(-1)


def plan_round(batch: Batch) -> tuple[int, list[int]]:
    """(k, caps): the next round's draft length (1: a plain step) and each row's cap on the
    tokens it may emit from it.

    Fixed: k = engine.speculate, no caps. Adaptive: a round of k costs 1 + draft_cost * (k - 1)
    plain steps; k is the draft length with the most expected tokens per unit of cost summed
    over the rows (ties to the shorter). A sampled row drafts only as far as pays for it alone
    (its cap), and k is never below that, so its random draws, hence its tokens for a seed,
    depend on its own history only, not on the rows beside it. Greedy rows emit the same
    tokens whatever k is, and take whatever the round gives them."""
    n, k_max = len(batch.seqs), batch.engine.speculate
    if not batch.engine.speculate_adaptive:
        return k_max, [k_max] * n
    tokens = expected_tokens(torch.tensor([s.acceptance for s in batch.seqs]), k_max)  # [B, k_max]
    cost = 1 + batch.engine.draft_cost * torch.arange(k_max)  # [k_max]: rounds of k = 1..k_max
    own = (tokens / cost).argmax(-1) + 1  # [B] (argmax: the first, i.e. shortest, of ties)
    sampled = torch.tensor([s.generator is not None for s in batch.seqs])
    caps = torch.where(sampled, own, k_max)  # [B]
    shortest = int(own[sampled].max()) if bool(sampled.any()) else 1
    k = torch.arange(k_max)  # [k_max]: k - 1
    capped = tokens.gather(1, torch.minimum(k[None], caps[:, None] - 1))  # [B, k_max]
    value = (capped.sum(0) / cost)[shortest - 1:]
    best = shortest + int(value.argmax())
    return best, caps.clamp_max(best).tolist()


def proposal(batch: Batch, z: dict[str, Tensor], choice: Choice) -> Tensor:
    """The small side's draft logits at a position, by the solver's own drafting rule (for linear
    weights: z_S + a (z_t - z_S), the small base standing in for the large model, at this round's
    weights). z: [B, V] per member role -> [B, V]."""
    return batch.solver.draft(batch.members.logits(z), choice)




def observe(seq: Seq, outcomes) -> None:
    """Fold accept (1) / reject (0) outcomes, or acceptance probabilities, into the row's estimate."""
    for x in outcomes:
        seq.acceptance += ACCEPT_MEMORY * (float(x) - seq.acceptance)


def observe_plain(batch: Batch, choice: Choice, rows: Sequence[int] | None = None) -> None:
    """For rows decoding one token at a time (all rows of a plain step; `rows` of a round), what
    a draft would have scored at this step, nearly for free: the small side's fused proposal
    (this step's weights, the small base standing in for the large model) against the fused
    distribution, as the probability speculative sampling would keep it, sum_v min(p, q) (for
    greedy rows: 1 if the argmaxes agree, else 0)."""
    draft = proposal(batch, batch.logits, choice)
    if batch.sampling.sampled:
        agree = kept_probability(warp(choice.logits, batch.sampling), warp(draft, batch.sampling))  # [B]
    else:
        agree = (draft.argmax(-1) == choice.logits.argmax(-1)).float()
    agree = agree.tolist()
    for i in range(len(batch.seqs)) if rows is None else rows:
        observe(batch.seqs[i], [agree[i]])


def speculative_round(batch: Batch, k: int, caps: Sequence[int]) -> Round:
    """The small side drafts k tokens, the large model checks all k in one forward. Row i emits
    at most caps[i] of them (`plan_round`).

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
    n, large = len(batch.seqs), batch.members.large
    large_ctx = next(c for c in batch.contexts if c.members == [large])
    for ctx in batch.contexts:
        ctx.ensure_room(k)
    start = large_ctx.length

    choice0 = batch.solve(batch.logits)
    if batch.engine.speculate_adaptive:  # rows capped at one token: what their plain step would have observed
        observe_plain(batch, choice0, [i for i, cap in enumerate(caps) if cap == 1])
    d, draft_logq, side = _draft(batch, k, caps, choice0, [c for c in batch.contexts if c is not large_ctx])
    z_large = large_ctx.extend(d)[0].to(batch.device)  # [B, k, V]: position j + 1 after d_j

    # The fused distribution at positions 1..k for every row, solved as one [B * k] batch.
    later = {large.role: z_large.reshape(n * k, -1)}
    later.update({r: z.reshape(n * k, -1) for r, z in side.items()})
    choice = batch.solve(later)
    accepted, fused, agree = _verify(batch, d, choice, draft_logq, caps)
    for ctx in batch.contexts:
        ctx.mask_holes(start, accepted)
    for seq, row, cap in zip(batch.seqs, agree.tolist(), caps):
        observe(seq, row[: cap - 1])

    tokens = _tokens(batch, k, (batch.logits, choice0, d[:, 0]), (later, choice, fused), accepted)
    # Next round starts from the prediction after the last accepted token.
    rows = torch.arange(n, device=batch.device)
    logits = {large.role: z_large[rows, accepted]}
    logits.update({r: z[rows, accepted] for r, z in side.items()})
    return Round(tokens, logits)


def _draft(batch: Batch, k: int, caps: Sequence[int], choice0: Choice,
           draft_ctxs: list[Context]) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """The small side's drafts d [B, k]; for sampled batches the draft distributions log q_j of
    d_1..d_{k-1} ([B, V] each); and the small side's logits at positions 1..k, {role: [B, k, V]}.
    A sampled row draws no random numbers for drafts past its cap."""
    rows = batch.sampling
    drafts = [pick(choice0.logits, rows, batch.seqs)]  # [B] each
    draft_logq: list[Tensor] = []
    side: list[dict[str, Tensor]] = []  # per position 1..k: {role: [B, V]}
    for j in range(k):
        z = {m.role: z for ctx in draft_ctxs for m, z in zip(ctx.members, ctx.step(drafts[-1]).to(batch.device))}
        side.append(z)
        if j == k - 1:
            break
        z_draft = proposal(batch, z, choice0)
        if rows.sampled:
            draft_logq.append(warp(z_draft, rows))
            drafts.append(sample(draft_logq[-1], rows, [cap > j + 1 for cap in caps]))
        else:
            drafts.append(z_draft.argmax(-1))
    return torch.stack(drafts, 1), draft_logq, {r: torch.stack([z[r] for z in side], 1) for r in side[0]}


def _verify(batch: Batch, d: Tensor, choice: Choice, draft_logq: list[Tensor],
            caps: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(accepted count m [B], the token each of the B * k positions emits if reached [B * k],
    how well each draft d_1..d_{k-1} agreed with the fused distribution [B, k - 1]: the
    probability speculative sampling keeps it, sum_v min(p, q), which is 1 or 0 for greedy rows).
    The agreement is an expectation, not the draw's outcome: far less noisy for sampled rows."""
    n, k = d.shape
    fused = choice.logits.argmax(-1)  # [B * k]
    if not batch.sampling.sampled:
        agree = (fused.view(n, k)[:, : k - 1] == d[:, 1:]).long()  # [B, k - 1]
        return agree.cumprod(-1).sum(-1), fused, agree.float()
    logp = warp(choice.logits, batch.sampling.repeat(k)).view(n, k, -1)
    logq = torch.stack(draft_logq, 1)  # [B, k - 1, V]
    accepted = accept(d, logp, logq, batch.sampling, batch.seqs, caps)
    agree = kept_probability(logp[:, :-1], logq)  # [B, k - 1]
    # The token emitted at position j is the draft d_{j+1} (the last position only ever gives
    # the next round's logits).
    return accepted, torch.cat([d[:, 1:], fused.view(n, k)[:, -1:]], 1).reshape(-1), agree


def _tokens(batch: Batch, k: int, first: tuple, later: tuple, accepted: Tensor) -> list[list[tuple]]:
    """Per row, (verdict, trace step) of d_0..d_m. first / later: (logits, choice, tokens) at
    position 0 ([B] rows) and at positions 1..k ([B * k] rows)."""
    v0, vs = batch.verdicts(*first), batch.verdicts(*later)
    t0, ts = batch.trace(*first[:2]), batch.trace(*later[:2])
    return [[(v0[i], t0[i] if t0 else None) if j == 0 else (vs[i * k + j - 1], ts[i * k + j - 1] if ts else None)
             for j in range(m + 1)] for i, m in enumerate(accepted.tolist())]
