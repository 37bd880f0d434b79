"""The Python API: `Fuser.from_recipe(path).generate(prompts)`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import limits
from .decoding import Generation, decode
from .models import ModelSet, load_model_set
from .recipe import SPECULATION_FIELDS, Recipe
from .registry import SearchConfig
from .sampling import DecodingError, SamplingParams, check_batch_size, seeds_for
from .solvers import Solver
from .speculation import check_draft_cost, check_speculate


class Fuser:
    """A large model, a small base and experts, loaded once, decoded with a weight solver."""

    def __init__(self, models: ModelSet, solver: Solver, recipe: Recipe):
        self.models, self.solver, self.recipe = models, solver, recipe

    @classmethod
    def from_recipe(cls, recipe: str | Path | Recipe | dict) -> "Fuser":
        if isinstance(recipe, (str, Path)):
            recipe = Recipe.from_file(recipe)
        elif isinstance(recipe, dict):
            recipe = Recipe.from_dict(recipe)
        solver = recipe.build_solver()  # fail on a bad solver before loading any weights
        dump = lambda spec: spec.model_dump() if spec else None  # noqa: E731
        models = load_model_set(dump(recipe.large), dump(recipe.small),
                                [e.model_dump() for e in recipe.experts], recipe.load_options(),
                                delta=dump(recipe.delta))
        return cls(models, solver, recipe)

    @classmethod
    def from_pretrained(cls, large: str, small: str | None = None, experts: dict[str, str] | None = None,
                        solver: dict | None = None, load: dict | None = None, delta: str | dict | None = None,
                        mapping: str | None = None, **generation) -> "Fuser":
        """Without a recipe file: Fuser.from_pretrained("L", "S", {"math": "E"}, solver={"kind": "static"}).
        delta: a delta model path (or a recipe `delta` section as a dict); mapping: the small side's
        `mapping` (auto or a map file) for cross-vocabulary fusion."""
        default = {"kind": "dynamic"} if experts else {"kind": "delta" if delta else "large"}
        data = {"large": {"path": large}, "experts": [{"name": n, "path": p} for n, p in (experts or {}).items()],
                "solver": solver or default, "load": load or {}, "generation": generation}
        if small:
            data["small"] = {"path": small} | ({"mapping": mapping} if mapping else {})
        if delta:
            data["delta"] = {"path": delta} if isinstance(delta, str) else dict(delta)
        return cls.from_recipe(data)

    @property
    def expert_names(self) -> list[str]:
        return self.models.expert_names

    def method(self, spec: str, search: SearchConfig | None = None) -> Solver:
        """A solver from a short spec ("large", "expert:NAME", "static:1.0", "dynamic:joint"), with
        `search` (else the recipe's) for the grid, strategy... it leaves out."""
        return self.recipe.method(spec, self.expert_names, search)

    def sampling(self, **overrides) -> SamplingParams:
        return sampling_params(self.recipe, **overrides)

    def generate(self, prompts: str | Sequence[str], *, solver: Solver | str | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int] | None = None, stop: Sequence[str] | None = None,
                 ignore_eos: bool = False, trace: bool = False, use_cache: bool = True,
                 speculate: int | None = None, speculate_adaptive: bool | None = None,
                 draft_cost: float | None = None, batch_size: int = 8) -> list[Generation]:
        """Generate a continuation of every prompt. Unset options come from the recipe.

        `seed`: an int gives prompt i the seed `seed + i`; a list gives one seed per prompt.
        `speculate`: draft length k of speculative fused decoding (the large model runs once per
        up to k tokens). Greedy output is identical to plain decoding; sampled output has exactly
        plain sampling's distribution, though not the same tokens for a seed. `speculate_adaptive`
        (default on): each round drafts up to k tokens, as many as the rows' acceptance pays for,
        one more drafted position costing `draft_cost` plain steps (`bench speed` measures it).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise DecodingError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise DecodingError("no prompts given")
        for i, p in enumerate(prompts):  # numbered in the whole list, not in its batch
            problem = limits.text_problem(f"prompt {i}", p) or (None if p else f"prompt {i} is empty; give some text")
            if problem:
                raise DecodingError(problem)
        check_batch_size(batch_size)
        if isinstance(solver, str):
            solver = self.method(solver)
        params = self.sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, stop=stop)
        params.ignore_eos = ignore_eos
        spec = self.recipe.generation
        speculate = spec.speculate if speculate is None else speculate
        adaptive = spec.speculate_adaptive if speculate_adaptive is None else speculate_adaptive
        draft_cost = spec.draft_cost if draft_cost is None else draft_cost
        check_speculate(speculate)
        check_draft_cost(draft_cost)
        params.check()
        # Greedy decoding needs no seeds: draw none from the global RNG (but still check a given list).
        draw = params.temperature > 0 or params.seed is not None
        seeds = seeds_for(params.seed, len(prompts)) if draw else [None] * len(prompts)
        out: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start: start + batch_size])
            params.seed = seeds[start: start + len(chunk)]
            out += decode(self.models, chunk, solver or self.solver, params, trace=trace, use_cache=use_cache,
                          speculate=speculate, adaptive=adaptive, draft_cost=draft_cost)
        return out


def sampling_params(recipe: Recipe, **overrides) -> SamplingParams:
    """The recipe's generation defaults with the given (not None) overrides; not checked yet."""
    defaults = recipe.generation.model_dump(exclude=SPECULATION_FIELDS)
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**defaults)

