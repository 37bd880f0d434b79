"""How the engine decodes, as one object: `EngineConfig` is built once where a request enters (a
recipe's generation section, a CLI's flags, a server's recipe) and handed down whole, so no
layer threads speculation, caching or tracing settings one keyword at a time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from . import limits
from .errors import DecodingError, first_problem

DRAFT_COST = 0.5  # one more drafted position, in plain fused steps (`bench speed` measures it)


@dataclass(frozen=True)
class EngineConfig:
    speculate: int = 0  # draft length k of speculative fused decoding (0 or 1 = off)
    speculate_adaptive: bool = True  # each round drafts up to k tokens, as many as the rows' acceptance pays for
    draft_cost: float = DRAFT_COST  # one more drafted position, in plain steps
    use_cache: bool = True  # KV caches (off: recompute every step; for checking)
    share_forwards: bool = True  # members on one module run as one forward (off: each alone; for checking)
    trace: bool = False  # record per step the weights, J and each model's top tokens
    batch_size: int = 8  # prompts decoded together by Fuser.generate

    def check(self) -> "EngineConfig":
        """Raise DecodingError naming the first bad field (bounds: limits.py); returns self."""
        found = first_problem([
            ("speculate", limits.int_problem("speculate", self.speculate, 0, limits.MAX_SPECULATE, " (0 = off)")),
            ("draft_cost", self._draft_cost_problem()),
            ("batch_size", limits.int_problem("batch_size", self.batch_size, 1, limits.MAX_BATCH_SIZE)),
            *[(name, None if isinstance(getattr(self, name), bool) else
               f"{name} must be true or false, got {getattr(self, name)!r}")
              for name in ("speculate_adaptive", "use_cache", "share_forwards", "trace")]])
        if found:
            raise DecodingError(found[1], field=found[0])
        return self

    def _draft_cost_problem(self) -> str | None:
        if not (limits.is_real(self.draft_cost) and 0 < self.draft_cost <= limits.MAX_DRAFT_COST):
            return (f"draft_cost must be a number in (0, {limits.MAX_DRAFT_COST}] (the cost of one more drafted "
                    f"position, in plain fused steps), got {self.draft_cost!r}")
        return None

    def replace(self, **changes) -> "EngineConfig":
        """This config with the given (not None) settings replaced, checked."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None}).check()

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))
