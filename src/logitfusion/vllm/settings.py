"""What the vLLM logits processor is told, without vLLM: where its recipe is and how a request picks
its method.

A vLLM logits processor class is built by vLLM (in every worker, and its `validate_params` is
called in the front-end process) with no arguments of ours, so the recipe travels by name:

- `vllm.LLM(..., additional_config={"logitfusion_recipe": PATH})` (server: `--additional-config`):
  part of the engine's config, so it reaches every worker, on every node;
- or the environment variable LOGITFUSION_RECIPE=PATH, which the front-end process reads too (the
  one place a request's method can be checked before it is queued). `offline.fused_llm` and the
  `serve` launcher set both.

A request picks its method with `SamplingParams(extra_args={"solver": "static:1.0"})` (HTTP:
`"vllm_xargs": {"solver": "dynamic"}`), in the project's method grammar; without it the recipe's
solver runs. "large" decodes from the large model alone.

A request records its weight trace with `extra_args={"trace": KEY}` (KEY: letters, digits, `-`,
`_`): the processor appends each step to KEY.jsonl in the engine's trace folder
(additional_config `logitfusion_traces`, else LOGITFUSION_TRACES; `traces.py`), where VLLMFuser,
which starts the engine with one, reads it back. An engine without a folder records nothing.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from ..engine.errors import SolverError
from ..engine.recipe import Recipe, RecipeError
from ..engine.solvers import Solver

RECIPE_ENV = "LOGITFUSION_RECIPE"
CONFIG_KEY = "logitfusion_recipe"  # in vLLM's additional_config
SOLVER_ARG = "solver"  # in SamplingParams.extra_args / vllm_xargs
TRACE_ARG = "trace"  # in extra_args: the request's trace key (its file's name)
TRACES_KEY = "logitfusion_traces"  # in vLLM's additional_config: the folder traces are written to
TRACES_ENV = "LOGITFUSION_TRACES"  # ... or this environment variable (VLLMFuser sets it)
TRACE_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a file name, never a path
LARGE_ONLY = frozenset({"large"})
PROCESSOR = "logitfusion.vllm.processor:FusionLogitsProcessor"  # vLLM's --logits-processors form


class SettingsError(ValueError):
    """A recipe or a request the vLLM processor cannot run; vLLM answers a request's with HTTP 400."""


def recipe_path(additional_config: Mapping[str, Any] | None = None) -> str:
    """The recipe's path: the engine config's, else the environment's."""
    config = additional_config if isinstance(additional_config, Mapping) else {}
    found = config.get(CONFIG_KEY) or os.environ.get(RECIPE_ENV)
    if not found:
        raise SettingsError(f"the logitfusion logits processor has no recipe: pass additional_config="
                            f"{{'{CONFIG_KEY}': PATH}} to vllm.LLM (server: --additional-config '{{\"{CONFIG_KEY}\": "
                            f"\"PATH\"}}'), or set {RECIPE_ENV}=PATH")
    return str(Path(found).resolve())


def trace_key(extra_args: Mapping[str, Any] | None) -> str | None:
    """The request's trace key (None: no trace), or SettingsError: a key names a file in the
    engine's trace folder, so it is a plain name, never a path."""
    key = (extra_args or {}).get(TRACE_ARG)
    if key is None:
        return None
    if not isinstance(key, str) or not TRACE_KEY.fullmatch(key):
        raise SettingsError(f"extra_args.{TRACE_ARG} must be a key of 1 to 128 letters, digits, '-' or '_' (it "
                            f"names the trace's file), got {key!r}")
    return key


def trace_folder(additional_config: Mapping[str, Any] | None = None) -> Path | None:
    """The engine's trace folder: the engine config's, else the environment's; None: no traces."""
    config = additional_config if isinstance(additional_config, Mapping) else {}
    found = config.get(TRACES_KEY) or os.environ.get(TRACES_ENV)
    return Path(found) if found else None


def recipe_file(recipe: str | Path | Recipe | dict) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A recipe file vLLM's workers can read (they get the recipe by path): the given file, or the
    given recipe written out, paths resolved against the working directory, in a temporary folder
    (returned, to be kept as long as the engine runs)."""
    if isinstance(recipe, (str, Path)):
        return str(Path(recipe).resolve()), None
    folder = tempfile.TemporaryDirectory(prefix="logitfusion-vllm-recipe-")
    path = Path(folder.name) / "recipe.json"
    (recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)).resolve_paths(Path.cwd()).save(path)
    return str(path), folder


@lru_cache(maxsize=8)
def methods(path: str) -> "Methods":
    """The recipe at `path`, checked for this engine, and its methods (cached: read once per process)."""
    try:
        recipe = Recipe.from_file(path)
    except RecipeError as e:
        raise SettingsError(str(e)) from None
    return Methods.of(recipe)


def engine_problem(recipe: Recipe) -> str | None:
    """What a recipe asks that the vLLM engine does not do, or None (whatever its backend.kind says:
    the launcher and fused_llm run any recipe's large model in vLLM)."""
    return recipe.backend.vllm_problem(recipe)


def backend_args(recipe: Recipe) -> dict[str, Any]:
    """The vllm.LLM arguments of the recipe's `backend` section (its dtype: backend.dtype, else
    load.dtype), its `options` last."""
    b = recipe.backend
    args: dict[str, Any] = {"tensor_parallel_size": b.tensor_parallel_size,
                            "pipeline_parallel_size": b.pipeline_parallel_size, "dtype": b.dtype or recipe.load.dtype}
    for name in ("max_model_len", "max_num_seqs", "gpu_memory_utilization", "distributed_executor_backend"):
        if getattr(b, name) is not None:
            args[name] = getattr(b, name)
    if b.enforce_eager:
        args["enforce_eager"] = True
    return args | b.options


@dataclass
class Methods:
    """A recipe's default solver and the solvers requests ask for, by method string (one object per
    method, so that rows with the same method are solved together)."""

    recipe: Recipe
    runner: Solver | None  # the solver whose members the small side runs (None: nothing to fuse)
    default: Solver | None  # the recipe's solver (None: the large model alone)
    cache: dict[str, Solver | None] = field(default_factory=dict)

    @classmethod
    def of(cls, recipe: Recipe) -> "Methods":
        problem = engine_problem(recipe)
        if problem:
            raise SettingsError(f"recipe: {problem}")
        try:
            default = recipe.build_solver()
            # A recipe that decodes the large model alone by default still runs its experts for
            # requests that ask for fusion.
            runner = default if default.reads != LARGE_ONLY else (recipe.method("static") if recipe.experts else None)
        except (RecipeError, SolverError) as e:
            raise SettingsError(f"recipe: {e}") from None
        return cls(recipe, runner, None if default.reads == LARGE_ONLY else default)

    def of_request(self, extra_args: Mapping[str, Any] | None) -> Solver | None:
        """The solver a request asks for (None: the large model alone), or SettingsError."""
        spec = (extra_args or {}).get(SOLVER_ARG)
        if spec is None:
            return self.default
        if not isinstance(spec, str) or not spec:
            raise SettingsError(f"extra_args.{SOLVER_ARG} must be a method string such as 'dynamic' or "
                                f"'static:1.0', got {spec!r}")
        if spec not in self.cache:
            self.cache[spec] = self._build(spec)
        return self.cache[spec]

    def _build(self, spec: str) -> Solver | None:
        try:
            solver = self.recipe.method(spec)
        except SolverError as e:
            raise SettingsError(f"extra_args.{SOLVER_ARG}: {e}") from None
        if solver.reads == LARGE_ONLY:
            return None
        runner = self.runner
        if runner is None or not reads_within(solver, runner):
            runs = "the large model alone" if runner is None else f"method {self.recipe.method_spec()!r}'s models"
            raise SettingsError(f"extra_args.{SOLVER_ARG}: method {spec!r} reads other models than this engine runs "
                                f"({runs}); with the vLLM engine a request may ask for 'large' or any method that "
                                "reads those models or some of them (static and dynamic over all the experts, "
                                "expert:NAME)")
        return solver


def reads_within(solver: Solver, runner: Solver) -> bool:
    """Whether `solver` reads only models `runner` runs (kinds, and experts by index; None: all):
    its rows then need nothing the processor's FusionRows does not compute anyway."""
    if not solver.reads <= runner.reads:
        return False
    if runner.experts is None or "expert" not in solver.reads:
        return True
    return solver.experts is not None and set(solver.experts) <= set(runner.experts)
