"""generate, recipe check / init, serve and version: the commands that load a recipe's models and
decode with them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from ..engine import limits, registry
from .common import UsageError, check_paths, console, fail, progress, say, user_errors, warn


def recipe_from_flags(recipe: Optional[Path], large: Optional[str], small: Optional[str],
                      experts: list[str], dtype: Optional[str] = None, device: Optional[str] = None,
                      device_map: Optional[str] = None, trust_remote_code: bool = False,
                      allow_pickle: bool = False):
    """The recipe of --recipe, or of --large/--small/--expert NAME=PATH, with the load options applied."""
    from ..engine.recipe import Recipe, RecipeError
    if recipe and (large or small or experts):
        raise UsageError("give either --recipe or --large/--small/--expert, not both")
    if recipe:
        r = Recipe.from_file(recipe)
    elif large:
        pairs = []
        for e in experts:
            name, sep, path = e.partition("=")
            if not sep or not name or not path:
                raise RecipeError(f"--expert {e!r}: write NAME=PATH, e.g. --expert math=experts/math")
            pairs.append({"name": name, "path": path})
        data = {"large": {"path": large}, "experts": pairs,
                "solver": {"kind": "dynamic" if pairs else "large"}}
        if small:
            data["small"] = {"path": small}
        r = Recipe.from_dict(data, base_dir=Path.cwd(), source="command line")
    else:
        raise UsageError("no models: give --recipe R.yaml, or --large PATH (with --small and --expert NAME=PATH)")
    # flags only switch permissions on; None (and "") keeps the recipe's value
    return r.with_overrides(load=dict(dtype=dtype or None, device=device or None, device_map=device_map or None,
                                      trust_remote_code=trust_remote_code or None,
                                      allow_pickle=allow_pickle or None))


def solver_from_flags(recipe, solver: Optional[str], alpha: list[float], grid: Optional[str],
                      strategy: Optional[str]):
    from ..engine.registry import SearchConfig
    if alpha:
        if solver and solver != "static":
            raise UsageError(f"--alpha sets static weights; it cannot be combined with --solver {solver}")
        solver = "static:" + ",".join(str(a) for a in alpha)
    search = SearchConfig.parse(grid, strategy)
    if solver is None and search == SearchConfig():
        return recipe.build_solver()
    return recipe.method(solver if solver is not None else recipe.method_spec(), search=search)


def vllm_method(recipe, solver: Optional[str], alpha: list[float], grid: Optional[str], strategy: Optional[str],
                refused: dict[str, bool]) -> Optional[str]:
    """A vLLM recipe's method from the flags, as the method string its requests carry (None: the
    recipe's solver), checked before vLLM starts; `refused`: options the vLLM backend cannot take."""
    from ..vllm.backend import quiet_vllm
    from ..vllm.settings import Methods, SettingsError
    quiet_vllm()  # results go to stdout: vLLM's own log lines to stderr
    given = [name for name, used in refused.items() if used]
    if given:
        raise UsageError(f"{', '.join(given)}: not available with `backend: {{kind: vllm}}` (vLLM always caches, and "
                         "refuses speculation with logits processors); use backend.kind hf")
    if grid or strategy:
        raise UsageError("--grid/--strategy: with `backend: {kind: vllm}` set the dynamic grid and strategy in the "
                         "recipe's solver section (vLLM's workers read the recipe)")
    if alpha:
        if solver and solver != "static":
            raise UsageError(f"--alpha sets static weights; it cannot be combined with --solver {solver}")
        solver = "static:" + ",".join(str(a) for a in alpha)
    if solver is not None:
        try:
            Methods.of(recipe).of_request({"solver": solver})
        except SettingsError as e:
            raise UsageError(str(e).replace("extra_args.solver", "--solver")) from None
    return solver


def check_generation(recipe, params: dict, seed: Optional[int], engine: dict):
    """Every generation option checked before any model loads (bounds: limits.py) -> (SamplingParams,
    EngineConfig)."""
    from ..engine.fuser import sampling_params
    return sampling_params(recipe, seed=seed, **params).check(), recipe.engine_config().replace(**engine)


def check_plot(path: Path, solver) -> None:
    """A weights plot needs per-step weights and a writable image path: known before decoding."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from ..engine.solvers import Dynamic, Static
    from ..eval.records import check_writable
    if not isinstance(solver, (Dynamic, Static)):
        raise UsageError(f"--plot-weights needs a fusion solver (static or dynamic) that has weights, "
                         f"not {type(solver).__name__.lower()}")
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"--plot-weights {str(path)!r}: use an image file name ending in "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    check_writable(path, "--plot-weights")


def _check_prompt_options(prompt: list[str], input: Optional[Path], output: Optional[Path]) -> None:
    if bool(prompt) == bool(input):
        raise UsageError("give --prompt (one or more) or --input FILE.jsonl, not both and not neither")
    if input and not output:
        raise UsageError("--input needs --output FILE.jsonl for the results")
    if input and output and input.exists() and output.exists() and os.path.samefile(input, output):
        raise UsageError(f"--output {str(output)!r} is the --input file; give another file for the results")


def _decode(fuser, rows: list[dict], todo: list[dict], writer, params, engine, encoded) -> list:
    """Every pending prompt decoded in batches under a progress bar, each batch written as it ends."""
    from ..engine.jobs import generate_batches
    gens_all = []
    with progress() as bar:
        task = bar.add_task(f"generating ({type(fuser.solver).__name__.lower()})", total=len(todo))
        for records, gens in generate_batches(fuser, rows, todo, params, engine, encoded):
            if writer:
                writer.write(records)
            gens_all += gens
            bar.advance(task, len(gens))
    return gens_all


def _show(gens: list, writer, output: Optional[Path]) -> None:
    if writer:
        say(f"wrote {len(gens)} results to {output}")
        return
    for g in gens:
        if len(gens) > 1:
            typer.echo(f"--- {g.prompt!r}")
        typer.echo(g.text)
        if g.error:
            warn(g.error)


def _plot(gens: list, expert_names: list[str], path: Path) -> None:
    from ..plotting import plot_weights as plot
    try:
        plot(gens, expert_names, path)
    except ValueError as e:
        fail(str(e))
    except OSError as e:
        fail(f"could not write --plot-weights {str(path)!r}: {e.strerror}")
    say(f"weights plot: {path}")


def generate(
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Fusion recipe (YAML, TOML or JSON) naming the models, experts, templates and solver."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="A prompt to continue; repeat for several. Results print to stdout."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help='JSONL file of prompts, one {"id": ..., "prompt": ...} per line.'),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSONL file to append results to. A rerun skips prompt ids already written (resumes)."),
    large: Optional[str] = typer.Option(None, help="Large model directory or .gguf file (instead of a recipe)."),
    small: Optional[str] = typer.Option(None, help="Small base model directory or .gguf file (instead of a recipe)."),
    expert: list[str] = typer.Option([], help="Expert as NAME=PATH: a full model (directory or .gguf) or a LoRA adapter of the small base. Repeat for several."),
    solver: Optional[str] = typer.Option(None, help=f"Override the recipe's solver with a method: {registry.grammar()}. static:1.0 is proxy-tuning; large and expert:NAME decode one model alone; delta:A runs the recipe's delta model at strength A."),
    alpha: list[float] = typer.Option([], help="Static fusion weight(s): one for all experts or one per expert (repeat). Implies --solver static. Proxy-tuning is --alpha 1."),
    grid: Optional[str] = typer.Option(None, help="Weight grid of the dynamic solver: start:stop:step (e.g. 0:2:0.1, the default) or explicit values 0,0.5,1."),
    strategy: Optional[str] = typer.Option(None, help="Several experts, dynamic solver: 'fast' (one expert per step, as in the paper) or 'joint' (all weights together; never a worse objective)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Maximum tokens to generate per prompt (default: the recipe's generation.max_new_tokens)."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy (default); > 0 samples from the fused distribution."),
    top_k: Optional[int] = typer.Option(None, help="Sample only among the k most likely tokens (0 = off)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling: smallest token set with this total probability (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed; prompt i uses seed + i, so results do not depend on batching."),
    stop: list[str] = typer.Option([], help="Stop string (repeat for several); the text is cut where it first appears."),
    batch_size: int = typer.Option(8, help="Prompts decoded together in one batch."),
    trace: bool = typer.Option(False, help="Record per step and sequence the weights, the objective J and each model's top tokens."),
    plot_weights: Optional[Path] = typer.Option(None, help="Write a PNG of each expert's weight over decoding steps (implies --trace)."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype: float32, bfloat16, float16 or auto."),
    device: Optional[str] = typer.Option(None, help="Device for all models: cpu, cuda, cuda:1, mps..."),
    device_map: Optional[str] = typer.Option(None, help="Shard models over devices with accelerate (e.g. 'auto')."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model directories to run (off by default)."),
    allow_pickle: bool = typer.Option(False, help="Allow pickled .bin weights, which can run code when loaded (safetensors only by default)."),
    no_cache: bool = typer.Option(False, help="Recompute every step without KV caches (slow; for checking)."),
    speculate: Optional[int] = typer.Option(None, help="Speculative fused decoding with drafts of up to K tokens: the small models draft, the large model checks them in one forward; each round drafts as many as the rows' acceptance pays for (recipe: generation.speculate_adaptive, generation.draft_cost). Greedy output is identical to plain decoding; sampled output follows exactly the same distribution (speculative sampling)."),
):
    """Generate with a fused model: from --prompt (printed) or --input/--output JSONL (resumable)."""
    from ..engine.jobs import pending
    from ..vllm.backend import load
    from ..eval.records import RecordWriter, read_prompts

    try:
        _check_prompt_options(prompt, input, output)
        check_paths({"--recipe": recipe, "--input": input, "--large": large, "--small": small,
                     "--expert": [e.partition("=")[2] for e in expert]},
                    {"--output": output, "--plot-weights": plot_weights})
        r = recipe_from_flags(recipe, large, small, expert, dtype, device, device_map, trust_remote_code, allow_pickle)
        if r.backend.kind == "vllm":
            chosen = vllm_method(r, solver, alpha, grid, strategy, {
                "--no-cache": no_cache, "--speculate": (speculate or 0) > 1})
        else:
            chosen = solver_from_flags(r, solver, alpha, grid, strategy)
        params, engine = check_generation(
            r, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    stop=stop or None), seed,
            dict(batch_size=batch_size, speculate=speculate, trace=trace or plot_weights is not None or None,
                 use_cache=False if no_cache else None))
        if plot_weights is not None:  # a vLLM recipe's method is a string: the solver it stands for
            check_plot(plot_weights, r.build_solver() if chosen is None else r.method(chosen) if isinstance(chosen, str)
                       else chosen)
        rows = read_prompts(input) if input else [{"id": str(i), "prompt": p} for i, p in enumerate(prompt)]
        writer = RecordWriter(output) if output else None  # fails now if it cannot be written
        todo = pending(rows, writer.done if writer else set())
        if writer and len(todo) < len(rows):
            say(f"resuming: {len(rows) - len(todo)} of {len(rows)} prompts already in {output}")
        fuser = load(r, solver=chosen)  # Fuser, or VLLMFuser for `backend: {kind: vllm}`
        # every prompt checked and tokenised before anything is written
        encoded = fuser.check_prompts([row["prompt"] for row in todo]) if todo else []
        gens = _decode(fuser, rows, todo, writer, params, engine, encoded)
    except user_errors() as e:
        fail(str(e))
    _show(gens, writer, output)
    if plot_weights is not None:
        _plot(gens, fuser.expert_names, plot_weights)


def recipe_check(path: Path = typer.Argument(..., help="Recipe file to validate."),
                 load: bool = typer.Option(False, help="Also load every model and check vocabularies.")):
    """Validate a recipe (fields, paths, solver) and print it with paths resolved."""
    from ..engine.recipe import Recipe
    loaded = ""
    try:
        r = Recipe.from_file(path)
        r.build_solver()
        if load:
            from ..engine.fuser import Fuser
            models = Fuser.from_recipe(r).models
            mapped = [m.role for m in [models.small, *models.experts, models.delta] if m is not None and m.foreign]
            loaded = (f" (models loaded; {', '.join(mapped)} mapped onto the large model's vocabulary)" if mapped
                      else " (models loaded, vocabularies match)")
    except user_errors() as e:
        fail(str(e))
    typer.echo(json.dumps(r.model_dump(exclude_none=True), indent=2))
    say(loaded.strip() or "", "recipe OK", "green")


def recipe_init(out: Path = typer.Argument(..., help="Where to write the recipe (.yaml)."),
                large: str = typer.Option(..., help="Large model directory or .gguf file."),
                small: Optional[str] = typer.Option(None, help="Small base model directory or .gguf file."),
                expert: list[str] = typer.Option([], help="Expert as NAME=PATH; repeat for several."),
                solver: str = typer.Option("dynamic", help=f"Solver kind: {', '.join(registry.kinds())}.")):
    """Write a recipe file from model paths, with every default spelled out."""
    try:
        check_paths({"--large": large, "--small": small, "--expert": [e.partition("=")[2] for e in expert]},
                    {"out": out})
        recipe_from_flags(None, large, small, expert).with_overrides(solver={"kind": solver}).save(out)
    except user_errors() as e:
        fail(str(e))
    except OSError as e:
        fail(f"could not write {str(out)!r}: {e.strerror}")
    say(f"wrote {out}")


def version():
    """Print the version."""
    from .. import __version__
    typer.echo(__version__)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _named_recipes(recipe: list[str]) -> dict[str, Path]:
    from ..serve import NAME_PATTERN
    named: dict[str, Path] = {}
    for value in recipe:
        name, sep, path = value.partition("=")
        if not sep or Path(value).is_file():
            name, path = Path(value).stem, value
        if not NAME_PATTERN.match(name):
            fail(f"--recipe {value!r}: model name {name!r} must match {NAME_PATTERN.pattern}; write NAME=PATH")
        if name in named:
            fail(f"--recipe: the model name {name!r} is given twice; write NAME=PATH to tell them apart")
        named[name] = Path(path)
    return named


def _shown_address(host: str, port: int, api_key: Optional[str]) -> str:
    import ipaddress
    import re
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        warn(f"listening on {host} without --api-key: anyone who can reach this port can use the models")
    shown = f"[{host}]" if re.fullmatch(r"[0-9a-fA-F:]+", host) and ":" in host else host
    return f"http://{shown}:{port}/v1"


def _serve_vllm_if_asked(named: dict[str, Path], host: str, port: int, api_key: Optional[str],
                         log_level: str) -> None:
    """A recipe with `backend: {kind: vllm}` is served by vLLM's own OpenAI server with the fusion
    processor registered (logitfusion.vllm.serve), under its name; this call then does not return."""
    from ..engine.recipe import Recipe
    from ..vllm.backend import vllm_fuser_class
    try:
        kinds = {name: Recipe.from_file(path).backend.kind for name, path in named.items()}
    except user_errors() as e:
        fail(str(e))
    if "vllm" not in kinds.values():
        return
    if len(named) > 1:
        fail(f"--recipe: {', '.join(n for n, k in kinds.items() if k == 'vllm')} runs in vLLM (backend.kind: vllm), "
             "which serves one recipe per server; serve it alone (another server, another --port, for the others)")
    try:
        vllm_fuser_class()  # vLLM installed and importable, or one line saying how
    except user_errors() as e:
        fail(str(e))
    from ..vllm.serve import main as vllm_serve
    (name, path), = named.items()
    if api_key:
        os.environ["VLLM_API_KEY"] = api_key  # vLLM's server reads it; kept out of the process list
    _shown_address(host, port, api_key)  # the same warning for a public interface without a key
    say(f"serving {name} with vLLM (backend.kind: vllm) on http://{host}:{port}/v1")
    vllm_serve([str(path), "--host", host, "--port", str(port), "--served-model-name", name,
                "--uvicorn-log-level", log_level.lower()])
    raise typer.Exit(0)


def serve(
    recipe: list[str] = typer.Option(..., "--recipe", "-r", help="Recipe to serve: PATH (served under the file's stem, e.g. fusion.yaml -> 'fusion') or NAME=PATH. Repeat to serve several; a request's `model` field picks one."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind. The default accepts local connections only; 0.0.0.0 listens on every interface (then also set --api-key)."),
    port: int = typer.Option(8000, help="TCP port to listen on."),
    api_key: Optional[str] = typer.Option(None, envvar="LOGITFUSION_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health. Also read from $LOGITFUSION_API_KEY, which keeps it out of the process list."),
    max_batch: int = typer.Option(limits.SERVER_MAX_BATCH, help="Sequences decoded together at most (all models and solvers); more requests wait in the queue."),
    max_queue: int = typer.Option(limits.SERVER_MAX_QUEUE, help="Requests that may wait for a decoding slot; beyond that the server answers 429."),
    max_tokens_limit: int = typer.Option(limits.SERVER_MAX_TOKENS, help="Largest max_tokens a request may ask for (400 above it); also caps the default."),
    max_body_bytes: int = typer.Option(limits.SERVER_MAX_BODY_BYTES, help="Largest request body in bytes (413 above it)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads for decoding (default: torch's choice, one per core). On a busy or shared machine fewer threads than cores avoids stalls."),
    log_level: str = typer.Option("info", help="Log level: critical, error, warning, info or debug."),
):
    """Serve recipes behind an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics)."""
    import logging

    import uvicorn

    from ..engine.fuser import Fuser
    from ..serve import create_app

    if not limits.MIN_PORT <= port <= limits.MAX_PORT:
        fail(f"--port must be between {limits.MIN_PORT} and {limits.MAX_PORT}, got {port}")
    if log_level.lower() not in LOG_LEVELS:
        fail(f"--log-level {log_level!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    named = _named_recipes(recipe)
    _serve_vllm_if_asked(named, host, port, api_key, log_level)
    if threads is not None:
        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        import torch
        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fusers = {}
    try:
        for name, path in named.items():
            with console.status(f"loading {name} from {path}..."):
                fusers[name] = Fuser.from_recipe(path)
        app_ = create_app(fusers, api_key=api_key, max_queue=max_queue, max_batch=max_batch,
                          max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes)
    except user_errors() as e:
        fail(str(e))
    except ValueError as e:  # bad limits
        fail(str(e))
    address = _shown_address(host, port, api_key)
    say(f"serving {', '.join(fusers)} on {address}" + (" (API key required)" if api_key else ""))
    uvicorn.run(app_, host=host, port=port, log_level=log_level.lower())
