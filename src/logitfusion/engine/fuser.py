"""The Python API: `Fuser.from_recipe(path).generate(prompts)`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

from .config import EngineConfig
from .decoding import Encoded, Generation, decode, validate_prompts
from .models import ModelSet, load_model_set
from .recipe import SPECULATION_FIELDS, Recipe
from .registry import SearchConfig
from .sampling import DecodingError, SamplingParams
from .solvers import Solver

SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


class Fuser:
    """A large model, a small base and experts, loaded once, decoded with a weight solver."""

    def __init__(self, models: ModelSet, solver: Solver, recipe: Recipe):
        self.models, self.solver, self.recipe = models, solver, recipe

    @classmethod
    def from_recipe(cls, recipe: str | Path | Recipe | dict, solver: Solver | None = None) -> "Fuser":
        """Load a recipe's models. solver: decode with this one (built from the recipe by default)."""
        if isinstance(recipe, (str, Path)):
            recipe = Recipe.from_file(recipe)
        elif isinstance(recipe, dict):
            recipe = Recipe.from_dict(recipe)
        solver = solver or recipe.build_solver()  # fail on a bad solver before loading any weights
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

    @property
    def engine(self) -> EngineConfig:
        """The recipe's engine settings (its generation section's speculation fields)."""
        return self.recipe.engine_config()

    def generate(self, prompts: str | Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 solver: Solver | str | None = None, engine: EngineConfig | None = None,
                 **options) -> list[Generation]:
        """Generate a continuation of every prompt. Unset settings come from the recipe.

        params: the sampling settings, one for all prompts (an int seed gives prompt i the seed
        seed + i; SamplingParams.per_prompt) or one per prompt. engine: how to decode
        (EngineConfig: speculation, caches, traces, batch size). `options` is the short form: any
        SamplingParams or EngineConfig field by name, e.g. generate(p, max_new_tokens=16,
        trace=True, speculate=4), applied over `params` and `engine`.

        Speculative decoding (`speculate=k`): the large model runs once per up to k tokens;
        greedy output is identical to plain decoding, sampled output has exactly plain sampling's
        distribution, though not the same tokens for a seed.
        """
        return [g for _, gens in self.batches(prompts, params, solver, engine, **options) for g in gens]

    def batches(self, prompts: str | Sequence[str], params=None, solver: Solver | str | None = None,
                engine: EngineConfig | None = None, **options) -> Iterator[tuple[int, list[Generation]]]:
        """`generate` batch by batch: (index of the batch's first prompt, its generations). Everything
        is checked before the first batch decodes."""
        prompts, per_prompt, solver, engine = self.request(prompts, params, solver, engine, **options)
        for start in range(0, len(prompts), engine.batch_size):
            end = start + engine.batch_size
            yield start, decode(self.models, prompts[start:end], solver, per_prompt[start:end], engine)

    def request(self, prompts, params=None, solver: Solver | str | None = None, engine: EngineConfig | None = None,
                **options) -> tuple[list[Encoded], list[SamplingParams], Solver, EngineConfig]:
        """The one check of a request where it enters: (prompts, each prompt's SamplingParams with
        its seed, the solver, the engine settings), or a DecodingError / SolverError."""
        prompts = check_prompts(prompts)
        unknown = sorted(set(options) - SAMPLING_FIELDS - EngineConfig.names())
        if unknown:
            raise DecodingError(f"unknown generation option(s) {unknown}; use SamplingParams fields "
                                f"({', '.join(sorted(SAMPLING_FIELDS))}) or EngineConfig fields "
                                f"({', '.join(sorted(EngineConfig.names()))})", field=unknown[0])
        engine = (engine or self.engine).replace(**{k: v for k, v in options.items() if k in EngineConfig.names()})
        sampling = {k: v for k, v in options.items() if k in SAMPLING_FIELDS and v is not None}  # None: the default
        if isinstance(params, (list, tuple)):
            if sampling:
                raise DecodingError("give sampling settings in the per-prompt params, not also as keywords")
            if len(params) != len(prompts):
                raise DecodingError(f"got {len(params)} SamplingParams for {len(prompts)} prompts", field="params")
            per_prompt = [p.check() for p in params]
        else:
            base = params if params is not None else self.sampling()
            per_prompt = dataclasses.replace(base, **sampling).per_prompt(len(prompts))
        if isinstance(solver, str):
            solver = self.method(solver)
        solver = solver or self.solver
        return validate_prompts(self.models, prompts, solver), per_prompt, solver, engine

    def check_prompts(self, prompts: Sequence[str], solver: Solver | None = None) -> list[Encoded]:
        """Every prompt checked and tokenised for the models `solver` (default: the fuser's) runs;
        generate takes the result as it is."""
        return validate_prompts(self.models, check_prompts(prompts), solver or self.solver)


def check_prompts(prompts) -> list[str | Encoded]:
    """A prompt or a list of them, each a non-empty string (numbered in the whole list)."""
    if isinstance(prompts, (str, Encoded)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise DecodingError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}",
                            field="prompt")
    if not prompts:
        raise DecodingError("no prompts given", field="prompt")
    return list(prompts)  # each checked by validate_prompts


def sampling_params(recipe: Recipe, **overrides) -> SamplingParams:
    """The recipe's generation defaults with the given (not None) overrides; not checked yet."""
    defaults = recipe.generation.model_dump(exclude=SPECULATION_FIELDS)
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**defaults)
