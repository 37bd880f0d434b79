"""The front ends' one choice of engine for a recipe's large model, by its `backend` section.

    from logitfusion.vllm.backend import load
    fuser = load("fusion.yaml")          # Fuser (backend.kind hf, the default) or VLLMFuser (kind vllm)
    gens = fuser.generate(prompts, solver="dynamic", max_new_tokens=32)

Both have the same `generate(prompts, params, solver, engine, **options) -> list[Generation]`.
The engine never chooses (it imports no front end, not even by name): `Fuser` is logitfusion's
own loop whatever the recipe's backend says, and the front ends (this function, `logitfusion
generate / eval / serve`) pick the vLLM one where the recipe asks for it. This module does not
import vLLM; `VLLMFuser` (logitfusion.vllm.fuser) does, when a vLLM recipe is loaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ..engine.fuser import Fuser
from ..engine.models import LoadError
from ..engine.recipe import Recipe
from ..engine.solvers import Solver

INSTALL = "pip install 'logitfusion[vllm]'"


class VLLMMissing(LoadError):
    """The recipe asks for vLLM, which is not installed (or does not import)."""


def as_recipe(recipe: str | Path | Recipe | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return Recipe.from_dict(recipe) if isinstance(recipe, dict) else Recipe.from_file(recipe)


def vllm_fuser_class():
    """logitfusion.vllm.fuser.VLLMFuser, or VLLMMissing with the one line that fixes it."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMMissing(f"this recipe runs its large model in vLLM (backend.kind: vllm), but vLLM is not installed: "
                          f"{INSTALL} (or set backend.kind: hf)")
    try:
        from .fuser import VLLMFuser
    except Exception as e:  # noqa: BLE001 - a broken install fails in many ways (torchvision's missing ops...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VLLMMissing(f"vLLM is installed but does not import ({type(e).__name__}: {first}); reinstall it with "
                          f"{INSTALL}, then pip uninstall -y torchvision torchaudio torchcodec") from None
    return VLLMFuser


def quiet_vllm() -> None:
    """vLLM's log lines to stderr at WARNING and above (its default is stdout at INFO, which would mix
    with the results a command prints), unless the user set VLLM_LOGGING_*. Call before vLLM loads."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def load(recipe: str | Path | Recipe | dict, solver: Solver | str | None = None, **vllm_args: Any):
    """The recipe's fuser on the engine its `backend` section names: `Fuser` (hf) or `VLLMFuser`
    (vllm; `vllm_args` are vllm.LLM arguments over the section's). solver: decode with this one by
    default (a Solver, or a method string such as "static:1.0"; with vLLM, a method string)."""
    path = recipe if isinstance(recipe, (str, Path)) else None
    r = as_recipe(recipe)
    if r.backend.kind == "vllm":
        return vllm_fuser_class().from_recipe(path or r, solver=solver, **vllm_args)
    if vllm_args:
        raise LoadError(f"vLLM arguments {sorted(vllm_args)} given for a recipe whose backend.kind is hf")
    return Fuser.from_recipe(r, solver=r.method(solver) if isinstance(solver, str) else solver)
