"""The model-runner seam: what the decoding loop needs of the models that give it logits.

A `Runner` holds rows (sequences) for some members and answers "advance these rows by these
tokens, give me their next-token logits", with rows added, removed and reordered between steps.
`HFRunner` is the implementation over Hugging Face modules: one left-padded `Context` (token
buffers, mask, KV cache) per forward group, where the small base and its experts run as one
stacked forward (stacking.py) and members with another tokenizer follow the user's text
(context.Retokenizer). The decoding loop (`decoding.Batch`) is then a runner, a solver and a
sampler; another backend for the large model (vLLM) hands its logits to `rows.FusionRows`, which
runs the small side through the same runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch
from torch import Tensor

from .context import Context, Retokenizer
from .members import Member, ModelSet
from .stacking import lora_stack, shared_stack


class Runner(Protocol):
    """Rows of some members, advanced together. Logits are {member role: [B, V]} in the user's
    (large model's) vocabulary, rows in the runner's order."""

    members: list[Member]

    def prefill(self, ids: dict[str, list[list[int]]], room: int) -> "Prefilled": ...
    def join(self, new: "Prefilled") -> dict[str, Tensor]: ...
    def step(self, tokens: Tensor) -> dict[str, Tensor]: ...
    def select(self, rows: Tensor) -> None: ...


@dataclass
class Prefilled:
    """New rows prefilled on their own (a failure there leaves the running rows as they were),
    waiting to `join`. contexts: per forward group, (Context, logits [G, B, V])."""

    contexts: list[tuple[Context, Tensor]]


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
    members = list(members)
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


class HFRunner:
    """Members run as Hugging Face modules, one Context per forward group."""

    def __init__(self, models: ModelSet, members: Iterable[Member], use_cache: bool = True,
                 share_forwards: bool = True):
        self.models, self.use_cache = models, use_cache
        self.members = list(members)
        self.groups, self.modules, self.retoks = plan_forwards(models, self.members, share_forwards)
        self.contexts: list[Context] = []  # one per group, once rows exist
        tok = models.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def __len__(self) -> int:
        return self.contexts[0].seqs if self.contexts else 0

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def prefill(self, ids: dict[str, list[list[int]]], room: int) -> Prefilled:
        """New rows, ids[role][i] the templated prompt of row i for each member, with room for
        `room` more tokens each."""
        contexts = []
        with torch.no_grad():
            for group, module, retok in zip(self.groups, self.modules, self.retoks):
                contexts.append(Context.prefill(group, [ids[m.role] for m in group], room,
                                                group[0].vocab or self.models.vocab_size,
                                                retok.pad_id if retok else self.pad_id, self.use_cache,
                                                retok=retok, module=module))
        return Prefilled(contexts)

    def join(self, new: Prefilled) -> dict[str, Tensor]:
        """Merge prefilled rows after the running ones -> their logits {role: [N, V]}."""
        first = not self.contexts
        out = {}
        with torch.no_grad():
            for g, (group, (ctx, logits)) in enumerate(zip(self.groups, new.contexts)):
                if first:
                    self.contexts.append(ctx)
                else:
                    self.contexts[g].merge(ctx)
                out.update({m.role: z for m, z in zip(group, logits)})
        return out

    def step(self, tokens: Tensor) -> dict[str, Tensor]:
        """Every row reads one token ([B]) -> next-token logits {role: [B, V]}."""
        with torch.no_grad():
            return {m.role: z for ctx in self.contexts for m, z in zip(ctx.members, ctx.step(tokens))}

    def hold(self, idle: Sequence[int]) -> None:
        """The rows `idle` did not really read the token of the last `step` (they had none): mask it
        out of their contexts, so that it is a hole they never attend to (as a rejected draft)."""
        if not idle:
            return
        for ctx in self.contexts:
            if ctx.retok is not None:
                raise NotImplementedError("a cross-vocabulary member cannot skip a step")
            accepted = torch.zeros(ctx.seqs, dtype=torch.long)
            accepted[list(idle)] = -1
            ctx.mask_holes(ctx.length - 1, accepted)

    def select(self, rows: Tensor) -> None:
        """Keep only these rows, in this order (rows leave, or are reordered)."""
        if len(rows) == 0:
            self.contexts = []
            return
        for ctx in self.contexts:
            ctx.select(rows)
