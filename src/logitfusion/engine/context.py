"""One model module's side of a batch: token buffers, attention mask and KV cache, left padded
(`Context`), rows joining and leaving, speculative holes, and members with another tokenizer
following the user's text (`Retokenizer`, one `Row` per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .compat import forward, left_pad_cache, merge_caches, reserved_cache, select_cache
from .members import Member

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
        out = forward(self.model, cache=self.cache, input_ids=self.ids[:, start: self.length], attention_mask=mask,
                      position_ids=positions, use_cache=self.use_cache, logits_to_keep=keep, **adapters)
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
        left_pad_cache(self.cache, n, self.members[0].role)

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
        merge_caches(self.cache, other.cache, order, self.members[0].role)

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
        select_cache(self.cache, rows, start, self.members[0].role)

