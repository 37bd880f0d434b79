"""The models of a fusion as the engine sees them, typed by kind rather than by position.

- `KINDS`: the kinds of member (large, small, expert, delta) and what each is allowed to do,
  declared once; the decoding loop, stacking, speculation, evaluation and the solvers' inputs
  all read this table, so a new kind of member is one entry here (plus its loading).
- `Member`: one model (module, LoRA adapter, template, context, tokenizer of its own).
- `ModelSet`: every model loaded for a fusion (`.large`, `.small`, `.experts`, `.delta`), and
  the same models with some experts only (`subset`).
- `Members`: the models one solver reads, by kind, iterated in the engine's one order (that of
  `KINDS`: rows of a batch, forward groups and traces follow it).
- `Logits`: one step's logits of those models, by kind, as a solver receives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MemberKind:
    name: str  # the role's prefix: "large", "expert" (roles "expert:NAME")
    field: str  # its attribute on ModelSet, Members and Logits
    many: bool = False  # several, each named (their logits reach a solver stacked, [B, T, V])
    # The small base's architecture on the small side's vocabulary (the base, its fine-tunes):
    # full-weight ones may share one stacked forward (stacking.py).
    small_side: bool = False
    missing: str = ""  # what a method reading this kind needs, when the recipe has none


# The engine's order: a batch lays out its rows, a trace its models, in this order.
KINDS: dict[str, MemberKind] = {k.name: k for k in (
    MemberKind("large", "large", missing="a large model"),
    MemberKind("small", "small", small_side=True,
               missing="a small base model: add a `small: {path: ...}` section to the recipe"),
    MemberKind("expert", "experts", many=True, small_side=True, missing="an expert"),
    MemberKind("delta", "delta", missing="a delta model: add a `delta: {path: ...}` section to the recipe"),
)}
FIELDS = {k.field: k for k in KINDS.values()}


def role_of(kind: str, name: str | None = None) -> str:
    """A member's label in traces and messages: "large", "expert:math"."""
    return f"{kind}:{name}" if KINDS[kind].many else kind


@dataclass
class Member:
    """One model as the decoding loop sees it: a module, and which LoRA adapter (if any) to run."""

    role: str  # "large", "small", "delta" or "expert:<name>" (role_of)
    model: nn.Module | None  # None: the large model's weights run elsewhere (models.load_model_set)
    adapter: str | None = None  # adapter name inside a PeftModel; "__base__" = adapters off
    template: str = "{prompt}"
    context: int | None = None  # max positions, when the config says
    # Cross-vocabulary members (another tokenizer than the large model's): their own tokenizer,
    # the PM-MinED map from the large model's vocabulary onto theirs, and their vocabulary size.
    tokenizer: Any = None
    vocab_map: Any = None
    vocab: int | None = None

    def __post_init__(self):
        if self.role.partition(":")[0] not in KINDS:
            raise ValueError(f"member role {self.role!r}: its kind is not one of {', '.join(KINDS)}")

    @property
    def kind(self) -> MemberKind:
        return KINDS[self.role.partition(":")[0]]

    @property
    def name(self) -> str | None:
        """The expert's name ("math" for "expert:math"); None for a kind with one member."""
        return self.role.partition(":")[2] or None

    @property
    def foreign(self) -> bool:
        return self.vocab_map is not None

    @property
    def device(self) -> torch.device:
        if self.model is None:
            raise RuntimeError(f"{self.role} has no weights here (loaded with large_weights=False: another "
                               "backend runs it)")
        return next(self.model.parameters()).device

    def forward_kwargs(self, batch: int) -> dict[str, Any]:
        # PEFT's mixed-adapter batches select the adapter per row without mutating the model,
        # so the small base and all its LoRA experts share one set of weights.
        return {"adapter_names": [self.adapter] * batch} if self.adapter else {}


@dataclass
class ModelSet:
    tokenizer: Any
    large: Member
    small: Member | None = None
    experts: list[Member] = field(default_factory=list)
    vocab_size: int = 0  # logits are sliced to this (tokenizer length; padded rows dropped)
    delta: Member | None = None  # cross-model control: a delta model for the large (user) model
    # Stacked modules (stacking.shared_stack for full-weight members, stacking.lora_stack for a PEFT
    # base and its LoRA adapters), built on first use.
    stacks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def expert_names(self) -> list[str]:
        return [m.name for m in self.experts]

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.large.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is not None:
            ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return ids

    def subset(self, names: Iterable[str]) -> "ModelSet":
        """The same loaded models with only the named experts, in this set's order (a solver built
        for those names then weighs just them). Stacked modules stay shared."""
        wanted = set(names)
        unknown = sorted(wanted - set(self.expert_names))
        if unknown:
            raise ValueError(f"no experts named {unknown}; experts: {self.expert_names}")
        return replace(self, experts=[m for m in self.experts if m.name in wanted])

    def select(self, reads: Iterable[str], experts: Sequence[int] | None = None) -> "Members":
        """The members of the kinds in `reads` (kind names), of the many-member kinds those at
        indices `experts` (None: all). A kind read but not loaded is left out (see Members.lacking)."""
        reads = set(reads)
        unknown = reads - set(KINDS)
        if unknown:
            raise ValueError(f"unknown member kinds {sorted(unknown)}; kinds: {', '.join(KINDS)}")
        chosen: dict[str, tuple[Member, ...]] = {}
        for kind in KINDS.values():
            present = getattr(self, kind.field) if kind.name in reads else None
            if kind.many:
                present = list(present or [])
                chosen[kind.name] = tuple(present if experts is None else [present[i] for i in experts])
            else:
                chosen[kind.name] = (present,) if present is not None else ()
        return Members(chosen, frozenset(reads))


class Members:
    """The models one solver reads: `.large`, `.small`, `.delta` (a Member or None) and `.experts`
    (a tuple), by kind; iterating gives them in the order of KINDS."""

    def __init__(self, by_kind: dict[str, tuple[Member, ...]], reads: frozenset[str] = frozenset()):
        self._by_kind, self.reads = by_kind, reads

    def __getattr__(self, attr: str):
        kind = FIELDS.get(attr)
        if kind is None:
            raise AttributeError(attr)
        found = self.__dict__["_by_kind"].get(kind.name, ())
        return found if kind.many else (found[0] if found else None)

    def __iter__(self) -> Iterator[Member]:
        for kind in KINDS:
            yield from self._by_kind.get(kind, ())

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_kind.values())

    @property
    def first(self) -> Member:
        return next(iter(self))

    def lacking(self) -> MemberKind | None:
        """A kind read of which no model is loaded (other than many-member kinds, which may be empty)."""
        return next((KINDS[k] for k in KINDS if k in self.reads and not KINDS[k].many and not self._by_kind[k]),
                    None)

    def logits(self, by_role: dict[str, Tensor]) -> "Logits":
        """These members' logits (`by_role`: [N, V] per member role) as a solver receives them."""
        z = {}
        for kind in KINDS.values():  # a role missing from by_role reads as None (drafts have no large logits)
            found = [by_role[m.role] for m in self._by_kind.get(kind.name, ()) if m.role in by_role]
            if kind.many:
                z[kind.field] = torch.stack(found, 1) if found else None
            else:
                z[kind.field] = found[0] if found else None
        return Logits(z)


class Logits:
    """One step's logits by kind: `.large`, `.small`, `.delta` [B, V] and `.experts` [B, T, V]
    (the experts stacked in the order of the solver's members); None for a kind not read."""

    def __init__(self, by_field: dict[str, Tensor | None]):
        self._z = by_field

    @classmethod
    def of(cls, **by_field: Tensor | None) -> "Logits":
        """Logits.of(large=z_l, small=z_s, experts=z_e): by field name (large, small, experts, delta)."""
        unknown = set(by_field) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown logits fields {sorted(unknown)}; use {', '.join(FIELDS)}")
        return cls(dict(by_field))

    @classmethod
    def ordered(cls, reads: Iterable[str], z: Sequence[Tensor]) -> "Logits":
        """From a list of [B, V] logits of the kinds read, listed in the order of KINDS (all the
        many-member kinds' logits in a row), e.g. [large, small, expert 1, expert 2]."""
        z, out = list(z), {k.field: None for k in KINDS.values()}
        kinds = [k for k in KINDS.values() if k.name in set(reads)]
        for i, kind in enumerate(kinds):
            if kind.many:  # all that the single kinds after it leave
                n = len(z) - sum(not k.many for k in kinds[i + 1:])
                out[kind.field], z = (torch.stack(z[:n], 1) if n else None), z[n:]
            else:
                out[kind.field] = z.pop(0)
        return cls(out)

    def __getattr__(self, attr: str):
        if attr not in FIELDS:
            raise AttributeError(attr)
        return self.__dict__["_z"].get(attr)

    def rows(self, index) -> "Logits":
        """The same logits for some rows only (a slice or index tensor along the batch)."""
        return Logits({f: (z[index] if z is not None else None) for f, z in self._z.items()})

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, vocabulary) of every tensor here."""
        z = next(z for z in self._z.values() if z is not None)
        return z.shape[0], z.shape[-1]
