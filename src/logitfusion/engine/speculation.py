"""Speculative fused decoding: when a batch may speculate (`can_speculate`), one round
(`speculative_round`) lets the small side draft k tokens and the large model check all k in one
forward; sampled rows keep drafts by speculative sampling's test (`accept`) and redraw a
rejected position from the residual distribution (`residual`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from . import limits
from .fusion import fuse
from .sampling import DecodingError, Rows, sample, warp
from .solvers import Choice

if TYPE_CHECKING:
    from .context import Context
    from .decoding import Batch, Seq


def check_speculate(speculate) -> None:
    problem = limits.int_problem("speculate", speculate, 0, limits.MAX_SPECULATE, " (0 = off)")
    if problem:
        raise DecodingError(problem)


def refusal(batch: Batch) -> str | None:
    """Why this batch's solver and members cannot run speculative rounds, or None."""
    members = batch.members
    if not (members.large and members.small and members.experts):
        return "speculation needs a method that reads the large model, the small one and an expert"
    if not any(len(group) == 1 and group[0] is batch.models.large for group in batch.groups):
        return "the large model does not run a forward of its own"
    if any(m.foreign for m in members):  # drafts are not re-tokenised
        return "a member has a tokenizer of its own"
    return None


def can_speculate(batch: Batch) -> bool:
    return batch.speculate > 1 and batch.speculative


def speculative_round(batch: Batch) -> list[tuple[Seq, int]]:
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
    k, n, large = batch.speculate, len(batch.seqs), batch.members.large
    large_ctx = next(c for c in batch.contexts if c.members == [large])
    for ctx in batch.contexts:
        ctx.ensure_room(k)
    start = large_ctx.length

    choice0 = batch.solve(batch.logits)
    d, draft_logq, side = _draft(batch, choice0, [c for c in batch.contexts if c is not large_ctx])
    z_large = large_ctx.extend(d)[0].to(batch.device)  # [B, k, V]: position j + 1 after d_j

    # The fused distribution at positions 1..k for every row, solved as one [B * k] batch.
    later = {large.role: z_large.reshape(n * k, -1)}
    later.update({r: z.reshape(n * k, -1) for r, z in side.items()})
    choice = batch.solve(later)
    accepted, fused = _verify(batch, d, choice, draft_logq)
    for ctx in batch.contexts:
        ctx.mask_holes(start, accepted)

    emitted = _emit(batch, (batch.logits, choice0, d[:, 0]), (later, choice, fused), accepted)
    # Next round starts from the prediction after the last accepted token.
    rows = torch.arange(n, device=batch.device)
    batch.logits = {large.role: z_large[rows, accepted]}
    batch.logits.update({r: z[rows, accepted] for r, z in side.items()})
    batch.drop_done()
    return emitted


def _draft(batch: Batch, choice0: Choice, draft_ctxs: list[Context]) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """The small side's drafts d [B, k]; for sampled batches the draft distributions log q_j of
    d_1..d_{k-1} ([B, V] each); and the small side's logits at positions 1..k, {role: [B, k, V]}."""
    k, rows, members = batch.speculate, batch.sampling, batch.members
    drafts = [sample(residual(warp(choice0.logits, rows), batch.seqs), rows) if rows.sampled
              else choice0.logits.argmax(-1)]  # [B] each
    draft_logq: list[Tensor] = []
    side: list[dict[str, Tensor]] = []  # per position 1..k: {role: [B, V]}
    for j in range(k):
        z = {m.role: z for ctx in draft_ctxs for m, z in zip(ctx.members, ctx.step(drafts[-1]).to(batch.device))}
        side.append(z)
        if j == k - 1:
            break
        z_s = z[members.small.role]
        z_e = torch.stack([z[m.role] for m in members.experts], 1)  # [B, T, V]
        z_draft = fuse(z_s, z_s, z_e, choice0.weights)
        if rows.sampled:
            draft_logq.append(warp(z_draft, rows))
            drafts.append(sample(draft_logq[-1], rows))
        else:
            drafts.append(z_draft.argmax(-1))
    return torch.stack(drafts, 1), draft_logq, {r: torch.stack([z[r] for z in side], 1) for r in side[0]}


def _verify(batch: Batch, d: Tensor, choice: Choice, draft_logq: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(accepted count m [B], the token each of the B * k positions emits if reached [B * k])."""
    n, k = d.shape
    fused = choice.logits.argmax(-1)  # [B * k]
    if not batch.sampling.sampled:
        f = fused.view(n, k)
        return (f[:, : k - 1] == d[:, 1:]).long().cumprod(-1).sum(-1), fused
    logp = warp(choice.logits, batch.sampling.repeat(k)).view(n, k, -1)
    accepted = accept(d, logp, torch.stack(draft_logq, 1), batch.sampling, batch.seqs)
    # The token emitted at position j is the draft d_{j+1} (the last position only ever gives
    # the next round's logits).
    return accepted, torch.cat([d[:, 1:], fused.view(n, k)[:, -1:]], 1).reshape(-1)


def _emit(batch: Batch, first: tuple, later: tuple, accepted: Tensor) -> list[tuple[Seq, int]]:
    """Append d_0..d_m to each row, stopping early where a sequence finishes. first / later:
    (logits, choice, tokens) at position 0 ([B] rows) and at positions 1..k ([B * k] rows)."""
    k, tokenizer = batch.speculate, batch.models.tokenizer
    v0, vs = batch.verdicts(*first), batch.verdicts(*later)
    t0, ts = batch.trace(*first[:2]), batch.trace(*later[:2])
    emitted = []
    for i, (seq, m) in enumerate(zip(batch.seqs, accepted.tolist())):
        for j in range(m + 1):
            verdict = v0[i] if j == 0 else vs[i * k + j - 1]
            step = (t0[i] if j == 0 else ts[i * k + j - 1]) if t0 else None
            if not seq.emit(verdict, step, tokenizer):
                break
            emitted.append((seq, seq.tokens[-1]))
            if seq.done:
                break
    return emitted


def accept(d: Tensor, logp: Tensor, logq: Tensor, rows: Rows, seqs: Sequence[Seq]) -> Tensor:
    """Speculative sampling's test. d [B, k] drafts; logp [B, k, V] the fused (warped)
    distribution at positions 1..k; logq [B, k - 1, V] the draft distributions of d_1..d_{k-1}.
    Returns the accepted count m [B]; a row that rejected d_{m+1} keeps q_{m+1} for `residual`."""
    k = d.shape[1]
    drafted = d[:, 1:, None]  # [B, k - 1, 1]
    ratio = (logp[:, :-1].gather(-1, drafted) - logq.gather(-1, drafted))[..., 0].exp()  # [B, k - 1]
    # Greedy rows: ratio is 1 (the draft is the fused argmax) or 0, and u = 0 keeps exactly those.
    u = rows.uniform(k - 1, ratio.device, 0.0)
    accepted = (u < ratio).long().cumprod(-1).sum(-1)  # [B]
    for i, (seq, m) in enumerate(zip(seqs, accepted.tolist())):
        seq.rejected_q = logq[i, m].exp() if m < k - 1 and seq.generator is not None else None
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
