"""A recipe's fusion in vLLM's offline engine: `fused_llm(recipe)` is a `vllm.LLM` on the recipe's
large model with the fusion processor registered; `sampling(...)` is a `vllm.SamplingParams` that
picks a method. Scripts that call these need a main guard (vLLM spawns its engine process)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import vllm

from .processor import FusionLogitsProcessor
from .settings import CONFIG_KEY, RECIPE_ENV, SOLVER_ARG, SettingsError, backend_args, methods


def engine_args(recipe: str | Path, **overrides: Any) -> dict[str, Any]:
    """vLLM engine arguments for a recipe: its large model, its `backend` section (dtype, parallel
    sizes...), the processor and the recipe (additional_config, for every worker); `overrides` (any
    vllm.LLM argument) win. Sets
    LOGITFUSION_RECIPE for this process and the ones it starts (requests' methods are checked
    in the front end against it)."""
    path = str(Path(recipe).resolve())
    found = methods(path)  # a bad recipe fails here, before an engine starts
    if overrides.get("speculative_config"):
        raise SettingsError("speculative_config: vLLM refuses custom logits processors with its speculative "
                            "decoding; leave it out")
    os.environ[RECIPE_ENV] = path
    args = dict(model=found.recipe.large.path, tokenizer=found.recipe.large.path,
                logits_processors=[FusionLogitsProcessor]) | backend_args(found.recipe)
    extra = dict(overrides.pop("additional_config", None) or {})
    return args | overrides | {"additional_config": extra | {CONFIG_KEY: path}}


def fused_llm(recipe: str | Path, **overrides: Any) -> "vllm.LLM":
    """vllm.LLM running the recipe's fusion; e.g. fused_llm("fusion.yaml", max_model_len=2048,
    tensor_parallel_size=2)."""
    return vllm.LLM(**engine_args(recipe, **overrides))


def sampling(solver: str | None = None, **params: Any) -> "vllm.SamplingParams":
    """vllm.SamplingParams with the request's method (None: the recipe's), e.g.
    sampling("static:1.0", temperature=0, max_tokens=64)."""
    extra = dict(params.pop("extra_args", None) or {})
    if solver is not None:
        extra[SOLVER_ARG] = solver
    return vllm.SamplingParams(extra_args=extra or None, **params)
