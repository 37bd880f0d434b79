"""A fusion recipe: which models, their prompt templates, the solver and its parameters.

Written as YAML, TOML or JSON, or built in Python; the same recipe drives generate,
evaluation and the server. Relative paths are resolved against the recipe file's folder.

    large: {path: models/large, template: "Few-shot examples...\\n{prompt}"}
    small: {path: models/small}       # + mapping: auto when its tokenizer differs from large's
    delta: {path: deltas/instruct, strength: 1.0}   # cross-model control (+ mapping: auto)
    experts:
      - {name: math, path: experts/math}
      - {name: qa, path: experts/qa-lora}      # a PEFT LoRA adapter of the small base
    solver: {kind: dynamic, grid: {start: 0, stop: 2, step: 0.1}, strategy: fast}
    load: {dtype: float32, device: cpu}
    generation: {max_new_tokens: 64, stop: ["\\n\\n"]}
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from . import limits, registry
from .models import LoadOptions
from .registry import SearchConfig, SolverSpec
from .sampling import SamplingParams
from .solvers import SolverError, Solver
from .config import DRAFT_COST, EngineConfig


class RecipeError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    path: str
    template: str = "{prompt}"

    @field_validator("template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("template must contain the placeholder {prompt}")
        problem = limits.text_problem("template", v)
        if problem:
            raise ValueError(problem)
        return v


class ExpertSpec(ModelSpec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")


class MappedSpec(ModelSpec):
    """A model that may have another tokenizer than the large model's. mapping: none (the
    vocabularies must match), "auto" (build a PM-MinED map, method.md §8) or a map file written by
    `logitfusion vocab map --from LARGE --to THIS`."""

    mapping: str | None = None

    @field_validator("mapping")
    @classmethod
    def _mapping(cls, v: str | None) -> str | None:
        if v is not None and v.strip().lower() in ("", "none", "off", "false"):
            return None
        if v is not None and not (v == "auto" or v.endswith(".safetensors")):
            raise ValueError(f"mapping {v!r}: write auto, or the path of a .safetensors map from "
                             "`logitfusion vocab map`, or leave it out (vocabularies must match)")
        return v


class DeltaSpec(MappedSpec):
    """Cross-model control: a delta model added to the large (user) model's log-probs."""

    strength: float = 1.0

    @field_validator("strength")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not (math.isfinite(v) and abs(v) <= limits.MAX_WEIGHT):
            raise ValueError(f"strength must be a finite number between -{limits.MAX_WEIGHT:g} and "
                             f"{limits.MAX_WEIGHT:g} (1 = as trained)")
        return v


class LoadSpec(_Strict):
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "cpu"
    device_map: str | dict | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    vocab_cache: str | None = None  # folder for maps built by `mapping: auto` (default: not saved)


SPECULATION_FIELDS = {"speculate", "speculate_adaptive", "draft_cost"}  # GenerationSpec's fields for Batch
_SAMPLING = SamplingParams()  # the sampling defaults, declared once (sampling.py)


class GenerationSpec(_Strict):
    # SamplingParams' fields a recipe may set, with its defaults; the bounds are those
    # SamplingParams.check applies to every call (limits.py).
    max_new_tokens: int = Field(_SAMPLING.max_new_tokens, ge=1, le=limits.MAX_NEW_TOKENS)
    temperature: float = Field(_SAMPLING.temperature, ge=0, allow_inf_nan=False)
    top_k: int = Field(_SAMPLING.top_k, ge=0, le=limits.MAX_TOP_K)
    top_p: float = Field(_SAMPLING.top_p, gt=0, le=1)
    seed: int | None = Field(_SAMPLING.seed, ge=limits.SEED_MIN, le=limits.SEED_MAX)
    stop: list[Annotated[str, Field(min_length=1, max_length=limits.MAX_STOP_CHARS)]] = \
        Field(list(_SAMPLING.stop), max_length=limits.MAX_STOP)
    speculate: int = Field(0, ge=0, le=limits.MAX_SPECULATE)  # draft length of speculative fused decoding (0 = off)
    # each round's draft length from the rows' acceptance, up to `speculate` (speculation.plan_round)
    speculate_adaptive: bool = True
    draft_cost: float = Field(DRAFT_COST, gt=0, le=limits.MAX_DRAFT_COST)  # one more drafted position, in plain steps


class BackendSpec(_Strict):
    """Which engine runs the large model: `hf` (logitfusion's own loop; the default) or `vllm`
    (vLLM runs the large model, the fusion runs as its logits processor: logitfusion.vllm). The
    other fields are vLLM engine arguments and apply to kind vllm only; `options` passes any other
    vllm.LLM argument by its name (vLLM checks it when the engine starts). The engine itself never
    reads this section: the front ends (logitfusion.vllm.backend.load, the CLI) choose by it."""

    kind: Literal["hf", "vllm"] = "hf"
    tensor_parallel_size: int = Field(1, ge=1, le=1024)
    pipeline_parallel_size: int = Field(1, ge=1, le=1024)
    max_model_len: int | None = Field(None, ge=1)  # default: the large model's context
    max_num_seqs: int | None = Field(None, ge=1)  # vLLM's batch slots (its default: 256, 128 on CPU)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None  # default: load.dtype
    enforce_eager: bool = False
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _vllm_only(self):
        if self.kind == "hf":
            fields = type(self).model_fields
            given = sorted(f for f in self.model_fields_set - {"kind"} if getattr(self, f) != fields[f].default)
            if given:  # a saved recipe spells the defaults out: those are no setting
                raise ValueError(f"{', '.join(given)}: vLLM engine settings; they apply to `kind: vllm` only "
                                 "(the hf engine takes its settings from `load` and `generation`)")
        for name in ("speculative_config", "speculative_model", "num_speculative_tokens"):
            if name in self.options:
                raise ValueError(f"options.{name}: vLLM refuses custom logits processors (the fusion) with its "
                                 "speculative decoding; leave it out")
        own = sorted(set(self.options) & (set(type(self).model_fields) | {"model", "tokenizer", "logits_processors"}))
        if own:
            raise ValueError(f"options.{own[0]}: set by the recipe itself (backend.{own[0]} or the large model); "
                             "not in options")
        return self

    def vllm_problem(self, recipe: "Recipe") -> str | None:
        """What a recipe asks that the vLLM backend cannot do, or None."""
        g = recipe.generation
        if g.speculate > 1:
            return (f"generation.speculate is {g.speculate}, but with `backend: {{kind: vllm}}` speculative fused "
                    "decoding is not available (it runs in logitfusion's own engine; vLLM refuses custom logits "
                    "processors with its speculative decoding): set generation.speculate to 0, or backend.kind hf")
        if recipe.large.template != "{prompt}":
            return ("large.template is set, but with `backend: {kind: vllm}` vLLM reads the prompt as it is sent: "
                    "put the large model's template into the prompt itself and remove large.template")
        return None


class Recipe(_Strict):
    large: ModelSpec
    small: MappedSpec | None = None  # small.mapping also covers the experts (one shared tokenizer)
    experts: list[ExpertSpec] = []
    delta: DeltaSpec | None = None
    ceiling: ModelSpec | None = None  # a fine-tuned large model, for gap-closed figures
    # One of the registered kinds' specs, chosen by its `kind` (registry.py; dynamic when left out).
    solver: SerializeAsAny[SolverSpec] = Field(default_factory=lambda: registry.spec_of({}))
    load: LoadSpec = LoadSpec()
    generation: GenerationSpec = GenerationSpec()
    backend: BackendSpec = BackendSpec()  # which engine runs the large model (hf, vllm)

    @field_validator("solver", mode="before")
    @classmethod
    def _solver_kind(cls, v: Any) -> SolverSpec:
        return registry.spec_of(v)

    @model_validator(mode="after")
    def _check(self):
        if "solver" not in self.model_fields_set and not self.experts:
            # nothing to fuse: the delta model on the large one, else the large model alone
            self.solver = registry.spec_of({"kind": "delta" if self.delta else "large"})
        if self.experts and self.small is None:
            raise ValueError("experts need the small base model they were fine-tuned from: add `small`")
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"expert names must be unique; repeated: {dup}")
        problem = self.solver.recipe_problem(names, self.delta is not None)
        if problem:
            raise ValueError(problem)
        problem = self.backend.vllm_problem(self) if self.backend.kind == "vllm" else None
        if problem:
            raise ValueError(problem)
        return self

    # -- files

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {str(p)!r} not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe {str(p)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise RecipeError(f"recipe {str(p)!r} cannot be read: {e.strerror}") from None
        try:
            if p.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            elif p.suffix == ".toml":
                data = tomllib.loads(text)
            elif p.suffix == ".json":
                data = json.loads(text)
            else:
                raise RecipeError(f"recipe {str(p)!r}: unknown extension {p.suffix!r}; use .yaml, .toml or .json")
        except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise RecipeError(f"recipe {str(p)!r} is not valid {p.suffix[1:].upper()}: {e}") from e
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {str(p)!r} must be a mapping with at least a `large` model")
        return cls.from_dict(data, base_dir=p.parent, source=str(p))

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | Path | None = None, source: str = "recipe") -> "Recipe":
        try:
            recipe = cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(f"{source}: " + _explain(e)) from None
        if base_dir is not None:
            recipe = recipe.resolve_paths(Path(base_dir))
        return recipe

    def resolve_paths(self, base: Path) -> "Recipe":
        r = self.model_copy(deep=True)
        for spec in [r.large, r.small, r.ceiling, r.delta, *r.experts]:
            if spec is not None and not Path(spec.path).is_absolute():
                spec.path = str((base / spec.path).resolve())
        for spec in [r.small, r.delta]:
            if spec is not None and spec.mapping not in (None, "auto") and not Path(spec.mapping).is_absolute():
                spec.mapping = str((base / spec.mapping).resolve())
        if r.load.vocab_cache and not Path(r.load.vocab_cache).is_absolute():
            r.load.vocab_cache = str((base / r.load.vocab_cache).resolve())
        return r

    def save(self, path: str | Path) -> None:
        """Write as YAML (.yaml/.yml) or JSON (.json)."""
        p, data = Path(path), self.model_dump(exclude_none=True)
        if p.suffix in (".yaml", ".yml"):
            p.write_text(yaml.safe_dump(data, sort_keys=False))
        elif p.suffix == ".json":
            p.write_text(json.dumps(data, indent=2) + "\n")
        else:
            raise RecipeError(f"cannot save a recipe as {p.suffix!r}; use .yaml or .json")

    # -- what the recipe builds

    def with_overrides(self, *, load: dict[str, Any] | None = None, solver: dict[str, Any] | None = None,
                       **fields: Any) -> "Recipe":
        """This recipe with some settings replaced, validated again. `load` and `solver` update
        those sections key by key, where a value of None keeps the recipe's (so that unset command
        line options change nothing); other keywords replace whole top-level fields."""
        data = self.model_dump() | fields
        for section, changes in (("load", load), ("solver", solver)):
            changes = {k: v for k, v in (changes or {}).items() if v is not None}
            if section == "solver" and changes.get("kind", data["solver"]["kind"]) != data["solver"]["kind"]:
                data[section] = changes  # another kind: its own settings, not the old kind's
            else:
                data[section] = data[section] | changes
        return Recipe.from_dict(data, source="recipe")

    def build_solver(self) -> Solver:
        """The recipe's solver, built from its spec (no method string in between)."""
        try:
            return registry.build(self.solver, [e.name for e in self.experts], self.search())
        except SolverError as e:
            raise RecipeError(f"solver: {e}") from None

    def method_spec(self) -> str:
        """The solver section's short form ("static:0.5,1.5", "expert:math", "dynamic")."""
        return self.solver.method()

    @property
    def delta_strength(self) -> float | None:
        """The delta's strength for method specs ("delta" without a value), None without a delta."""
        return self.delta.strength if self.delta else None

    def search(self) -> SearchConfig:
        """The solver section's search settings (a dynamic section's grid, strategy, a_max) and the
        delta's strength, as defaults for method strings."""
        own = self.solver.search() if hasattr(self.solver, "search") else SearchConfig()
        return SearchConfig(own.grid, own.strategy, own.a_max, self.delta_strength)

    def method(self, spec: str, expert_names: Sequence[str] | None = None,
               search: SearchConfig | None = None) -> Solver:
        """A solver from a short method spec (registry.parse_method), with `search`'s settings, else
        this recipe's (`search()`), for what it leaves out. expert_names: the experts the spec may
        name (default: the recipe's; a server request may fuse a subset)."""
        return registry.parse_method(spec, [e.name for e in self.experts] if expert_names is None else expert_names,
                                     (search or SearchConfig()).over(self.search()))

    def engine_config(self) -> EngineConfig:
        """The generation section's engine settings (speculation) as an EngineConfig."""
        g = self.generation
        return EngineConfig(speculate=g.speculate, speculate_adaptive=g.speculate_adaptive, draft_cost=g.draft_cost)

    def load_options(self) -> LoadOptions:
        return LoadOptions(**self.load.model_dump())


def _explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"field `{loc}`: {msg}")
    return "; ".join(parts)
