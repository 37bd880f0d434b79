"""The `logitfusion` command line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .engine import limits

app = typer.Typer(help="Fuse small fine-tuned experts into a large model's logits at every decoding step.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipe_app = typer.Typer(help="Write and check fusion recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
bench_app = typer.Typer(help="Benchmarks that print ratios measured in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
# emoji off: an expert named "m" in ":m:" would print as an emoji. User text goes through _say,
# which escapes it, so that "[inf]" or "[1, 2]" in a message is printed and not eaten as markup.
console = Console(stderr=True, emoji=False)


@app.callback()
def _quiet() -> None:
    """Library progress bars and deprecation chatter would drown our own progress output."""
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _say(text: str, label: str = "", style: str = "") -> None:
    """Print user text literally (no markup, no emoji, no wrapping inside it), after a styled label."""
    prefix = f"[{style}]{label}[/] " if label else ""
    console.print(prefix + escape(str(text)), soft_wrap=True)


def _fail(message: str) -> None:
    _say(message, "error:", "bold red")
    raise typer.Exit(2)


class UsageError(ValueError):
    """Options that do not go together."""


def _user_errors():
    from .engine.sampling import DecodingError
    from .engine.models import LoadError
    from .engine.recipe import RecipeError
    from .eval.records import RecordsError
    from .engine.solvers import SolverError
    from .train.finetune import TrainingError
    from .engine.vocab import VocabError
    return (UsageError, DecodingError, LoadError, RecipeError, RecordsError, SolverError, TrainingError,
            VocabError)


def _recipe_from_flags(recipe: Optional[Path], large: Optional[str], small: Optional[str],
                       experts: list[str], dtype: Optional[str], device: Optional[str],
                       device_map: Optional[str], trust_remote_code: bool, allow_pickle: bool):
    from .engine.recipe import Recipe, RecipeError
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
    load = r.load.model_dump()
    load.update({k: v for k, v in dict(dtype=dtype, device=device, device_map=device_map).items() if v})
    load["trust_remote_code"] = load["trust_remote_code"] or trust_remote_code
    load["allow_pickle"] = load["allow_pickle"] or allow_pickle
    return Recipe.from_dict(r.model_dump() | {"load": load}, source="recipe")


def _solver_from_flags(recipe, solver: Optional[str], alpha: list[float], grid: Optional[str],
                       strategy: Optional[str]):
    from .engine.solvers import parse_grid
    if alpha:
        if solver and solver != "static":
            raise UsageError(f"--alpha sets static weights; it cannot be combined with --solver {solver}")
        solver = "static:" + ",".join(str(a) for a in alpha)
    if solver is None and grid is None and strategy is None:
        return recipe.build_solver()
    spec = solver if solver is not None else recipe.solver.kind
    if spec == "expert" and recipe.solver.expert:
        spec = f"expert:{recipe.solver.expert}"
    return recipe.method(spec, grid=parse_grid(grid) if grid is not None else None, strategy=strategy)


def _check_generation(recipe, params: dict, seed: Optional[int], batch_size: int, speculate: Optional[int]) -> None:
    """Every generation option checked before any model loads (bounds: limits.py)."""
    from .engine.sampling import check_batch_size
    from .engine.speculation import check_speculate
    from .engine.fuser import sampling_params
    check_batch_size(batch_size)
    check_speculate(recipe.generation.speculate if speculate is None else speculate)
    sampling_params(recipe, seed=seed, **params).check()


def _check_plot(path: Path, solver) -> None:
    """A weights plot needs per-step weights and a writable image path: known before decoding."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from .eval.records import check_writable
    from .engine.solvers import Dynamic, Static
    if not isinstance(solver, (Dynamic, Static)):
        raise UsageError(f"--plot-weights needs a fusion solver (static or dynamic) that has weights, "
                         f"not {type(solver).__name__.lower()}")
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"--plot-weights {str(path)!r}: use an image file name ending in "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    check_writable(path, "--plot-weights")


def _trace_record(gen, tokenizer) -> list[dict]:
    return [{"weights": s.weights, "objective": s.objective,
             "top": {role: [[tokenizer.decode([t]), round(p, 5)] for t, p in top] for role, top in s.top.items()}}
            for s in gen.trace or []]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console)


def _bench_progress(bar: Progress, name: str):
    """A bench's progress(done, total, what) callback drawing on `bar`."""
    job = bar.add_task(name, total=None)
    return lambda done, total, what: bar.update(job, total=total, completed=done, description=what)


def _write_bench_report(name: str, out: Path, report) -> None:
    """Write OUT/NAME.md from report(command), the command being this invocation, and show it."""
    import sys
    text = report(" ".join(["logitfusion", "bench", name, *sys.argv[3:]]))
    (out / f"{name}.md").write_text(text)
    typer.echo(text)
    _say(f"wrote {out / f'{name}.md'}")


@app.command()
def generate(
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Fusion recipe (YAML, TOML or JSON) naming the models, experts, templates and solver."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="A prompt to continue; repeat for several. Results print to stdout."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help='JSONL file of prompts, one {"id": ..., "prompt": ...} per line.'),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSONL file to append results to. A rerun skips prompt ids already written (resumes)."),
    large: Optional[str] = typer.Option(None, help="Large model directory or .gguf file (instead of a recipe)."),
    small: Optional[str] = typer.Option(None, help="Small base model directory or .gguf file (instead of a recipe)."),
    expert: list[str] = typer.Option([], help="Expert as NAME=PATH: a full model (directory or .gguf) or a LoRA adapter of the small base. Repeat for several."),
    solver: Optional[str] = typer.Option(None, help="Override the recipe's solver: dynamic, dynamic:joint, static, static:A[,A...], large (large model alone), expert[:NAME] (an expert alone), delta[:A] (the recipe's delta model at strength A)."),
    alpha: list[float] = typer.Option([], help="Static fusion weight(s): one for all experts or one per expert (repeat). Implies --solver static. Proxy-tuning is --alpha 1."),
    grid: Optional[str] = typer.Option(None, help="Weight grid of the dynamic solver: start:stop:step (e.g. 0:2:0.1, the default) or explicit values 0,0.5,1."),
    strategy: Optional[str] = typer.Option(None, help="Several experts, dynamic solver: 'fast' (one expert per step, as in the paper) or 'joint' (all weights together; never a worse objective)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Maximum tokens to generate per prompt (recipe default: 64)."),
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
    speculate: Optional[int] = typer.Option(None, help="Speculative fused decoding with drafts of K tokens: the small models draft, the large model checks K tokens per forward. Greedy output is identical to plain decoding; sampled output follows exactly the same distribution (speculative sampling)."),
):
    """Generate with a fused model: from --prompt (printed) or --input/--output JSONL (resumable)."""
    from .engine.fuser import Fuser
    from .eval.records import RecordWriter, read_prompts

    try:
        if bool(prompt) == bool(input):
            raise UsageError("give --prompt (one or more) or --input FILE.jsonl, not both and not neither")
        if input and not output:
            raise UsageError("--input needs --output FILE.jsonl for the results")
        if input and output and input.exists() and output.exists() and os.path.samefile(input, output):
            raise UsageError(f"--output {str(output)!r} is the --input file; give another file for the results")
        r = _recipe_from_flags(recipe, large, small, expert, dtype, device, device_map, trust_remote_code, allow_pickle)
        chosen = _solver_from_flags(r, solver, alpha, grid, strategy)
        params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      stop=stop or None)
        _check_generation(r, params, seed, batch_size, speculate)
        if plot_weights is not None:
            _check_plot(plot_weights, chosen)
        rows = read_prompts(input) if input else [{"id": str(i), "prompt": p} for i, p in enumerate(prompt)]
        writer = RecordWriter(output) if output else None  # fails now if it cannot be written
        todo = [row for row in rows if not writer or row["id"] not in writer.done]
        if writer and len(todo) < len(rows):
            _say(f"resuming: {len(rows) - len(todo)} of {len(rows)} prompts already in {output}")
        fuser = Fuser.from_recipe(r)
        fuser.solver = chosen
        from .engine.decoding import validate_prompts
        validate_prompts(fuser.models, [row["prompt"] for row in todo], chosen)  # before writing anything
        want_trace = trace or plot_weights is not None
        gens_all, index = [], {row["id"]: i for i, row in enumerate(rows)}
        with _progress() as bar:
            task = bar.add_task(f"generating ({type(chosen).__name__.lower()})", total=len(todo))
            for start in range(0, len(todo), batch_size):
                chunk = todo[start: start + batch_size]
                seeds = None if seed is None else [seed + index[row["id"]] for row in chunk]
                gens = fuser.generate([row["prompt"] for row in chunk], trace=want_trace, seed=seeds,
                                      use_cache=not no_cache, batch_size=batch_size, speculate=speculate,
                                      **params)
                records = []
                for row, g in zip(chunk, gens):
                    rec = {**row, "text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason}
                    if g.error:
                        rec["error"] = g.error
                    if want_trace:
                        rec["trace"] = _trace_record(g, fuser.models.tokenizer)
                    records.append(rec)
                if writer:
                    writer.write(records)
                gens_all += gens
                bar.advance(task, len(chunk))
    except _user_errors() as e:
        _fail(str(e))
    if not writer:
        for g in gens_all:
            if len(gens_all) > 1:
                typer.echo(f"--- {g.prompt!r}")
            typer.echo(g.text)
            if g.error:
                _say(g.error, "warning:", "yellow")
    else:
        _say(f"wrote {len(gens_all)} results to {output}")
    if plot_weights is not None:
        try:
            from .plotting import plot_weights as plot
            plot(gens_all, fuser.expert_names, plot_weights)
            _say(f"weights plot: {plot_weights}")
        except ValueError as e:
            _fail(str(e))
        except OSError as e:
            _fail(f"could not write --plot-weights {str(plot_weights)!r}: {e.strerror}")


@recipe_app.command("check")
def recipe_check(path: Path = typer.Argument(..., help="Recipe file to validate."),
                 load: bool = typer.Option(False, help="Also load every model and check vocabularies.")):
    """Validate a recipe (fields, paths, solver) and print it with paths resolved."""
    from .engine.recipe import Recipe
    loaded = ""
    try:
        r = Recipe.from_file(path)
        r.build_solver()
        if load:
            from .engine.fuser import Fuser
            models = Fuser.from_recipe(r).models
            mapped = [m.role for m in [models.small, *models.experts, models.delta] if m is not None and m.foreign]
            loaded = (f" (models loaded; {', '.join(mapped)} mapped onto the large model's vocabulary)" if mapped
                      else " (models loaded, vocabularies match)")
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(json.dumps(r.model_dump(exclude_none=True), indent=2))
    _say(loaded.strip() or "", "recipe OK", "green")


@recipe_app.command("init")
def recipe_init(out: Path = typer.Argument(..., help="Where to write the recipe (.yaml)."),
                large: str = typer.Option(..., help="Large model directory or .gguf file."),
                small: Optional[str] = typer.Option(None, help="Small base model directory or .gguf file."),
                expert: list[str] = typer.Option([], help="Expert as NAME=PATH; repeat for several."),
                solver: str = typer.Option("dynamic", help="Solver kind: dynamic, static, large or expert.")):
    """Write a recipe file from model paths, with every default spelled out."""
    try:
        r = _recipe_from_flags(None, large, small, expert, None, None, None, False, False)
        from .engine.recipe import Recipe
        r = Recipe.from_dict(r.model_dump() | {"solver": r.solver.model_dump() | {"kind": solver}})
        r.save(out)
    except _user_errors() as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"could not write {str(out)!r}: {e.strerror}")
    _say(f"wrote {out}")


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), help="Folder for the results (demo.json) and the weights plot."),
         n_prompts: int = typer.Option(12, help="Test prompts per task answered by each method."),
         root: Optional[Path] = typer.Option(None, help="A zoo build folder to use instead of the bundled zoo.")):
    """Large base, small expert, proxy-tuning and dynamic fusion side by side on the bundled zoo."""
    from .bench.demo import run_demo
    if n_prompts < 1:
        _fail(f"--n-prompts must be >= 1, got {n_prompts}")
    try:
        run_demo(out, n_prompts=n_prompts, root=root, console=console)
    except FileNotFoundError as e:
        _fail(str(e))


@bench_app.command("speed", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                             "help_option_names": []})
def bench_speed(ctx: typer.Context):
    """Fused decoding speed vs the large model alone, component floor, naive loop, fast paths.
    Options: see `logitfusion bench speed --help` (--tokens, --batch, --shapes, --device...)."""
    from .bench.speed import main
    main(list(ctx.args))


@app.command()
def version():
    """Print the version."""
    from . import __version__
    typer.echo(__version__)


@app.command()
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
    import ipaddress
    import logging
    import re

    import uvicorn

    from .engine.fuser import Fuser
    from .serve import NAME_PATTERN, create_app

    if not limits.MIN_PORT <= port <= limits.MAX_PORT:
        _fail(f"--port must be between {limits.MIN_PORT} and {limits.MAX_PORT}, got {port}")
    named: dict[str, Path] = {}
    for value in recipe:
        name, sep, path = value.partition("=")
        if not sep or Path(value).is_file():
            name, path = Path(value).stem, value
        if not NAME_PATTERN.match(name):
            _fail(f"--recipe {value!r}: model name {name!r} must match {NAME_PATTERN.pattern}; write NAME=PATH")
        if name in named:
            _fail(f"--recipe: the model name {name!r} is given twice; write NAME=PATH to tell them apart")
        named[name] = Path(path)
    if threads is not None:
        if threads < 1:
            _fail(f"--threads must be >= 1, got {threads}")
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
    except _user_errors() as e:
        _fail(str(e))
    except ValueError as e:  # bad limits
        _fail(str(e))
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        _say(f"listening on {host} without --api-key: anyone who can reach this port can use the models",
             "warning:", "yellow")
    shown = f"[{host}]" if re.fullmatch(r"[0-9a-fA-F:]+", host) and ":" in host else host
    _say(f"serving {', '.join(fusers)} on http://{shown}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.run(app_, host=host, port=port, log_level=log_level.lower())


@app.command("eval")
def eval_(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Fusion recipe (YAML, TOML or JSON). Its `ceiling` (a fine-tuned large model), if any, is evaluated too, as method 'ceiling'."),
    tasks: str = typer.Option(..., "--tasks", "-t", help="Comma-separated lm-eval tasks: any lm-eval task name, ours (toy_sums, toy_sums_mc, toy_knowledge_ppl, gsm8k_local, truthfulqa_mc1_local, truthfulqa_mc2_local, triviaqa_local, mmlu_local, cnn_dailymail_local, cnn_dailymail_rouge), or a task YAML file."),
    methods: str = typer.Option("large,expert,static:1.0,dynamic", "--methods", "-m", help="Comma-separated methods: large, expert[:NAME], static[:A] (several weights: static:0.5+1.5), dynamic, dynamic:joint, delta[:A] (a recipe with a `delta` section)."),
    limit: Optional[float] = typer.Option(None, help="Examples per task: a count, or a fraction below 1 (for quick checks)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSONL file: one line per (method, task), written as each finishes. A rerun skips the pairs already there."),
    data_dir: Optional[Path] = typer.Option(None, envvar="LOGITFUSION_DATA_DIR", help="Folder with local dataset copies for the *_local tasks (gsm8k_test.jsonl, truthfulqa.jsonl, ...; see docs/evaluation.md). Also read from $LOGITFUSION_DATA_DIR."),
    include_path: list[Path] = typer.Option([], help="Extra folder of lm-eval task YAMLs; repeat for several."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples per prompt (default: each task's own setting)."),
    max_gen_toks: Optional[int] = typer.Option(None, help="Cap on generated tokens for every generation task (overrides the tasks' own setting)."),
    batch_size: int = typer.Option(8, help="Requests scored or decoded together in one batch."),
    grid: Optional[str] = typer.Option(None, help="Weight grid of the dynamic methods: start:stop:step (e.g. 0:2:0.1) or values 0,0.5,1 (default: the recipe's)."),
    strategy: Optional[str] = typer.Option(None, help="Several experts, dynamic methods: 'fast' or 'joint' (default: the recipe's)."),
    gap_closed: bool = typer.Option(False, "--gap-closed", help="Insist on gap-closed figures (method.md §6): fail unless the recipe names a `ceiling`. They are shown anyway whenever it does."),
    device: Optional[str] = typer.Option(None, help="Device for all models: cpu, cuda, cuda:1, mps... (default: the recipe's)."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype: float32, bfloat16, float16 or auto (default: the recipe's)."),
):
    """Evaluate methods x tasks through lm-evaluation-harness: one JSONL line per pair (resumable),
    a markdown table per task and averages, with gap closed when the recipe has a ceiling."""
    import gc
    import logging

    try:
        from .eval import lm as ev
    except ImportError as e:
        _fail(f"{e}. `logitfusion eval` runs lm-evaluation-harness: pip install lm-eval")
    from .engine.sampling import check_batch_size
    from .engine.recipe import Recipe
    from .eval.records import RecordWriter
    from .engine.solvers import parse_grid

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        if not task_list or not method_list:
            raise UsageError("give at least one task (--tasks) and one method (--methods)")
        if len(set(task_list)) < len(task_list) or len(set(method_list)) < len(method_list):
            raise UsageError("--tasks and --methods must not repeat a name")
        check_batch_size(batch_size)
        for name, value, lo, hi in (("--num-fewshot", num_fewshot, 0, None),
                                    ("--max-gen-toks", max_gen_toks, 1, limits.MAX_NEW_TOKENS)):
            problem = value is not None and limits.int_problem(name, value, lo, hi)
            if problem:
                raise UsageError(problem)
        r = Recipe.from_file(recipe)
        if gap_closed and r.ceiling is None:
            raise UsageError(f"--gap-closed needs a fine-tuned large model to compare with: add `ceiling: {{path: ...}}` "
                             f"to {recipe}")
        grid_values = parse_grid(grid) if grid is not None else None
        for m in method_list:  # fail on a bad method before loading anything
            if m == "ceiling":
                if r.ceiling is None:
                    raise UsageError(f"method 'ceiling' needs `ceiling: {{path: ...}}` in {recipe}")
                continue
            r.method(m.replace("+", ","), grid=grid_values, strategy=strategy)
        if r.ceiling is not None and "ceiling" not in method_list:
            method_list.append("ceiling")
        method_list = [m for m in method_list if m != "ceiling"] + (["ceiling"] if "ceiling" in method_list else [])
        if data_dir is not None and not data_dir.is_dir():
            raise UsageError(f"local dataset path {str(data_dir)!r} does not exist (--data-dir)")
        if limit is not None and limit <= 0:
            raise UsageError(f"--limit must be > 0, got {limit}")
        manager = ev.task_manager(task_list, [str(p) for p in include_path],
                                  metadata={"data_dir": str(data_dir)} if data_dir else None)
        ev.check_tasks(manager, task_list)
        writer = RecordWriter(output, key="key") if output else None
        records = {}
        for rec in writer.records if writer else []:
            records[rec["key"]] = rec
            if rec.get("limit") != limit and rec.get("task") in task_list:
                _say(f"{output} holds {rec['key']} run with --limit {rec.get('limit')}, not {limit}; it is kept "
                     "(use another --output to redo)", "warning:", "yellow")
        cells = [(m, t) for m in method_list for t in task_list]
        todo = [(m, t) for m, t in cells if f"{m}|{t}" not in records]
        if writer and len(todo) < len(cells):
            _say(f"resuming: {len(cells) - len(todo)} of {len(cells)} (method, task) pairs already in {output}")
        for t in dict.fromkeys(t for _, t in todo):  # data problems surface before any model loads
            try:
                manager.load([t])
            except Exception as e:  # lm-eval and datasets raise many types here
                raise ev.EvalError(f"task {t!r} could not be loaded: {type(e).__name__}: {e}") from None
    except _user_errors() + (ev.EvalError,) as e:
        _fail(str(e))

    opts = dict(batch_size=batch_size, grid=grid, strategy=strategy, device=device, dtype=dtype)
    lm, lm_kind = None, None
    try:
        with _progress() as bar:
            job = bar.add_task("evaluating", total=len(cells), completed=len(cells) - len(todo))
            for method in method_list:
                pending = [t for m, t in todo if m == method]
                if not pending:
                    continue
                kind = "ceiling" if method == "ceiling" else "fused"
                if lm_kind != kind:
                    lm = None  # free one model set before loading the other
                    gc.collect()
                    bar.update(job, description=f"loading {'the ceiling' if kind == 'ceiling' else 'the models'}")
                    lm, lm_kind = ev.FusedLM(recipe=r, ceiling=kind == "ceiling", **opts), kind
                if kind == "fused":
                    lm.set_method(method)
                for task in pending:
                    bar.update(job, description=f"{method} on {task}")
                    rec = ev.run_task(lm, method, task, manager, limit=limit, num_fewshot=num_fewshot,
                                      max_gen_toks=max_gen_toks)
                    rec["recipe"] = str(recipe)
                    if writer:
                        writer.write([rec])
                    records[rec["key"]] = rec
                    bar.advance(job)
    except _user_errors() + (ev.EvalError,) as e:
        _fail(str(e))
    typer.echo(ev.summarise(list(records.values()), method_list, task_list))
    if writer:
        _say(f"results: {output}")


vocab_app = typer.Typer(help="Map one tokenizer's vocabulary onto another's (PM-MinED, method.md §8).",
                        no_args_is_help=True)
app.add_typer(vocab_app, name="vocab")


@vocab_app.command("map")
def vocab_map(
    from_: str = typer.Option(..., "--from", help="The user model's tokenizer: a Hugging Face model or tokenizer folder, a tokenizer.json, a SentencePiece .model or a Mistral tekken .json."),
    to: str = typer.Option(..., "--to", help="The delta (or expert) model's tokenizer, in any of the same forms."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the mapping (.safetensors: index, kinds and a JSON header with both tokenizers' fingerprints)."),
    examples: int = typer.Option(5, help="Examples to print for each kind of match."),
):
    """Map every token of --from onto one token of --to (special/byte, exact, nearest prefix, or unmapped);
    write the mapping and print counts, examples and the time taken."""
    from .engine.vocab import build_map, load_vocab
    try:
        user, delta = load_vocab(from_), load_vocab(to)
        start = time.perf_counter()
        vmap = build_map(user, delta, n_examples=examples)
        vmap.save(out)
        seconds = time.perf_counter() - start
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(vmap.report())
    for kind in ("exact", "approx", "special", "byte", "unmapped"):
        for u, u_tok, d, d_tok in vmap.examples.get(kind, [])[:examples]:
            shown = f"{d_tok!r} ({d})" if d >= 0 else "-"
            typer.echo(f"  {kind:9s} {u_tok!r} ({u}) -> {shown}")
    _say(f"wrote {out} (mapping and saving took {seconds:.2f} s)")


def _train(run, out: Path, what: str) -> None:
    """Run a resumable training job (finetune, delta train) and say what it did."""
    start = time.perf_counter()
    try:
        res = run()
    except _user_errors() as e:
        _fail(str(e))
    if res.skipped:
        _say(f"{out} already holds this finished run ({res.global_step} steps); nothing to do "
                      "(--overwrite to train again)")
        return
    if res.resumed_from:
        _say(f"resumed from {res.resumed_from}")
    loss = f"{res.train_loss:.4f}" if res.train_loss is not None else "n/a"
    _say(f"wrote {what} {out} ({res.global_step} steps, mean training loss {loss}, "
                  f"{time.perf_counter() - start:.1f} s)")


@app.command()
def finetune(
    base: str = typer.Option(..., "--base", help="The small base model directory to fine-tune (the fusion's `small`)."),
    data: Path = typer.Option(..., "--data", help='Training JSONL: {"prompt": ..., "completion": ...} per line (loss on the completion only) or {"text": ...} (loss on every token).'),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: a full model (safetensors + tokenizer) or, with --lora, a PEFT LoRA adapter. Checkpoints go to OUT/checkpoints."),
    lora: bool = typer.Option(False, "--lora", help="Train a LoRA adapter of the base instead of all weights."),
    lora_rank: int = typer.Option(16, help="LoRA rank r (the paper's LoRA baseline uses 64 on 7B-13B models)."),
    lora_alpha: int = typer.Option(32, help="LoRA scaling alpha (the update is scaled by alpha / rank)."),
    lora_targets: str = typer.Option("q_proj,v_proj", help="Comma-separated module names that get LoRA adapters, e.g. q_proj,k_proj,v_proj,o_proj."),
    template: str = typer.Option("{prompt}", help="Prompt template, as in the recipe's expert `template`: {prompt} is replaced by each line's prompt. Use the same one at decoding time."),
    epochs: float = typer.Option(3.0, help="Passes over the data (ignored when --max-steps is given)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (linear decay). Default 2e-5 for a full fine-tune, 1e-4 with --lora (method.md §6)."),
    batch_size: int = typer.Option(8, help="Examples per device per step."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps (effective batch = batch-size x grad-accum)."),
    max_length: int = typer.Option(512, help="Truncate each example to this many tokens."),
    seed: int = typer.Option(0, help="Seed for initialisation and data order; the same seed and data give the same weights."),
    save_steps: int = typer.Option(100, help="Save a resumable checkpoint to OUT/checkpoints every N steps (the last two are kept)."),
    warmup_ratio: float = typer.Option(0.0, help="Fraction of the steps spent warming the learning rate up from 0."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    dtype: str = typer.Option("float32", help="Weights dtype while training: float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different model or stale checkpoints already in --out."),
):
    """Fine-tune the small base into an expert with the Hugging Face Trainer. Rerunning the same
    command resumes from the last checkpoint; a finished run is not redone."""
    from .train.finetune import FinetuneConfig
    from .train.finetune import finetune as run_finetune
    cfg = FinetuneConfig(base=base, data=str(data), out=str(out), lora=lora, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, lora_targets=lora_targets, template=template, epochs=epochs,
                         max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                         max_length=max_length, seed=seed, save_steps=save_steps, warmup_ratio=warmup_ratio,
                         weight_decay=weight_decay, dtype=dtype, overwrite=overwrite)
    _train(lambda: run_finetune(cfg), out, "LoRA adapter" if lora else "model")


@app.command()
def merge(
    base: str = typer.Option(..., "--base", help="The small base model directory the experts were fine-tuned from."),
    expert: list[str] = typer.Option(..., "--expert", help="An expert directory (full model, or a LoRA adapter of the base, which is merged into its weights first). Repeat for several."),
    lam: float = typer.Option(0.5, "--lam", help="Task-arithmetic scale lambda: theta = theta_base + lam * sum(theta_expert - theta_base)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the merged model (safetensors + tokenizer)."),
    dtype: str = typer.Option("float32", help="dtype to load and save in: float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model already in --out."),
):
    """Merge experts by task arithmetic (method.md §5) into one model that loads as an expert."""
    from .train.finetune import merge as run_merge
    try:
        run_merge(base, expert, lam, str(out), overwrite=overwrite, dtype=dtype)
    except _user_errors() as e:
        _fail(str(e))
    _say(f"wrote {out} (base + {lam} x sum of {len(expert)} expert delta(s))")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="A .gguf file (or a folder holding one) from llama.cpp, Ollama or LM Studio."),
    out: Path = typer.Argument(..., help="Output folder: config.json, model.safetensors and the tokenizer files (chat template included)."),
    dtype: str = typer.Option("auto", help="dtype of the written weights: auto (the file's float type; float32 for quantised files), float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that is not empty (its old weights are replaced)."),
):
    """Write a GGUF as a plain safetensors model directory. A .gguf also loads directly as
    --large/--small/--expert or in a recipe (dequantised at every load); converting once loads faster,
    needs no `gguf` package, and allows --device-map sharding."""
    from .engine.models import convert_gguf
    start = time.perf_counter()
    try:
        convert_gguf(src, out, dtype=dtype, overwrite=overwrite)
    except _user_errors() as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"could not write {str(out)!r}: {e.strerror}")
    _say(f"wrote {out} from {src} ({time.perf_counter() - start:.1f} s)")


delta_app = typer.Typer(help="Cross-model control: train a tiny delta model beside a frozen template LLM (method.md §7).",
                        no_args_is_help=True)
app.add_typer(delta_app, name="delta")


@delta_app.command("train")
def delta_train(
    template: str = typer.Option(..., "--template", help="The frozen template LLM (model directory). Its tokenizer becomes the delta's."),
    delta: str = typer.Option(..., "--delta", help="Where the delta starts: a model directory with the template's tokenizer, or a spec for a fresh Llama, e.g. hidden=64,layers=2 (keys: hidden, layers, heads, kv_heads, intermediate, context). A fresh delta's lm_head is zero, so before training it changes nothing."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the delta model (safetensors + tokenizer); load it with a recipe's `delta:` section. Checkpoints go to OUT/checkpoints."),
    objective: str = typer.Option("sft", help="sft: learn --data. unlearn: gradient difference, ascend on --forget and descend on --retain."),
    data: Optional[Path] = typer.Option(None, "--data", help='sft training JSONL: {"prompt": ..., "completion": ...} (loss on the completion) or {"text": ...} per line.'),
    forget: Optional[Path] = typer.Option(None, "--forget", help="unlearn: JSONL of what to forget (same record forms as --data)."),
    retain: Optional[Path] = typer.Option(None, "--retain", help="unlearn: JSONL of what to keep; each batch pairs forget examples with as many retain ones. Without it: gradient ascent on --forget alone."),
    prompt_template: str = typer.Option("{prompt}", help="Prompt template for prompt/completion records: {prompt} is replaced by each prompt. Use the same one as the delta's `template` in the recipe."),
    epochs: float = typer.Option(3.0, help="Passes over the data (ignored when --max-steps is given)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (linear decay); default 5e-4."),
    batch_size: int = typer.Option(8, help="Examples per device per step (unlearn: forget examples, plus as many retain ones)."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    max_length: int = typer.Option(512, help="Truncate each example to this many tokens."),
    seed: int = typer.Option(0, help="Seed for the fresh delta's initialisation and the data order."),
    save_steps: int = typer.Option(100, help="Save a resumable checkpoint every N steps (the last two are kept)."),
    warmup_ratio: float = typer.Option(0.0, help="Fraction of the steps spent warming the learning rate up from 0."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different model or stale checkpoints already in --out."),
):
    """Train a delta model: loss = cross-entropy of log_softmax(z_template) + z_delta, only the delta
    learns. Rerunning the same command resumes from the last checkpoint; a finished run is not redone."""
    from .train.delta import DeltaConfig, train_delta
    cfg = DeltaConfig(template=template, delta=delta, out=str(out), objective=objective,
                      data=str(data) if data else None, forget=str(forget) if forget else None,
                      retain=str(retain) if retain else None, prompt_template=prompt_template, epochs=epochs,
                      max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                      max_length=max_length, seed=seed, save_steps=save_steps, warmup_ratio=warmup_ratio,
                      weight_decay=weight_decay, overwrite=overwrite)
    _train(lambda: train_delta(cfg), out, f"delta model ({objective})")

zoo_app = typer.Typer(help="The bundled tiny model family, trained by the project on a synthetic world.",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
ZOO_ROOT = Path.home() / ".cache" / "logitfusion" / "zoo"


@zoo_app.command("build")
def zoo_build(
    root: Path = typer.Option(ZOO_ROOT, envvar="LOGITFUSION_ZOO_ROOT", help="Build folder: world data, models, experts, ceilings and their checkpoints. A rerun resumes; finished steps are skipped."),
    ceilings: bool = typer.Option(True, "--ceilings/--no-ceilings", help="Also train the large fine-tunes (per task full and LoRA, multi-task) that the paper bench compares with; they are not shipped."),
    only: list[str] = typer.Option([], "--only", help="Run only these steps or groups (data, init, models, experts, ceilings, experts/math...); repeatable."),
    install: bool = typer.Option(False, "--install", help="Copy the shipped part (bases, experts, task data) into the package folder afterwards (for maintainers)."),
    seed: int = typer.Option(0, help="Seed of the world and of every training run."),
):
    """Rebuild the zoo from scratch: world, tokenizer, bases, experts (and ceilings), about an hour on 2 cores."""
    from .bench import zoo
    start = time.perf_counter()
    try:
        timings = zoo.build(root, zoo.ZooConfig(seed=seed), ceilings=ceilings, only=only or None,
                            log=_say)
    except _user_errors() as e:
        _fail(str(e))
    _say(f"zoo built in {root} ({time.perf_counter() - start:.0f} s this run; "
                  f"{sum(timings.values()):.0f} s of training recorded in timings.json)")
    if install:
        size = zoo.install(root)
        _say(f"installed {size / 1e6:.1f} MB into {zoo.BUNDLED}")


@zoo_app.command("info")
def zoo_info(root: Optional[Path] = typer.Option(None, help="A zoo build folder (default: the bundled zoo).")):
    """List the zoo's models with their sizes, and its task data."""
    from .bench import zoo
    rows = zoo.describe(root or zoo.BUNDLED)
    if not rows:
        _fail(f"no zoo in {root or zoo.BUNDLED}: run `logitfusion zoo build`")
    table = Table(title=f"zoo in {root or zoo.BUNDLED}")
    for col in ("model", "kind", "parameters", "MB"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], f"{r['parameters']:,}", f"{r['mb']:.1f}")
    console.print(table)


@bench_app.command("paper")
def bench_paper(
    root: Path = typer.Option(ZOO_ROOT, envvar="LOGITFUSION_ZOO_ROOT", help="A zoo build folder (`logitfusion zoo build`); missing ceilings are trained first."),
    out: Path = typer.Option(Path("docs/results"), "--out", "-o", help="Folder for paper.jsonl (one line per cell, resumable), paper.md and the plots."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated zoo tasks (math, truthful, qa, summ, mmlu); default all."),
    tables: Optional[str] = typer.Option(None, help="Comma-separated tables to run (single, multi, icl, range, arithmetic); default all."),
    limit: Optional[int] = typer.Option(None, help="Examples per task (default: the whole split)."),
    batch_size: int = typer.Option(16, help="Requests decoded or scored together."),
    split: str = typer.Option("test", help="validation (choose designs and settings there) or test (once they are frozen). Keep validation results in OUT/validation: the test report chooses each expert's search range from them."),
):
    """Reproduce the paper's tables on the zoo: single-task, multi-task, ICL, task arithmetic,
    efficiency, weights over steps, gap closed. Results are appended as they come; rerun to resume."""
    import logging

    from .bench import paper as bench, world, zoo
    from .eval.records import read_keyed
    task_list = [t.strip() for t in tasks.split(",")] if tasks else list(world.TASKS)
    table_list = [t.strip() for t in tables.split(",")] if tables else None
    bad = [t for t in task_list if t not in world.TASKS] + \
          [t for t in table_list or [] if t not in bench.TABLES]
    if bad:
        _fail(f"unknown task or table {bad}; tasks: {', '.join(world.TASKS)}; tables: {', '.join(bench.TABLES)}")
    if limit is not None and limit < 1:
        _fail(f"--limit must be >= 1, got {limit}")
    if split not in ("validation", "test"):
        _fail(f"--split must be validation or test, got {split!r}")
    if not (root / "models" / "large" / "config.json").exists():
        _fail(f"no zoo build in {root}: run `logitfusion zoo build --root {root}` first")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    zoo.build(root, only=["experts", "ceilings"], log=_say)  # no-op when all exist
    with _progress() as bar:
        records = bench.run(root, out, task_list, limit=limit, batch_size=batch_size, tables=table_list,
                            progress=_bench_progress(bar, "bench"), split=split)
    bench.weights_plots(root, out, split=split)
    validation = out / "validation" / "paper.jsonl"  # where the search range per expert is chosen
    chosen_on = list(read_keyed(validation).values()) if split == "test" and validation.exists() else None
    _write_bench_report("paper", out, lambda command: bench.report(records, root, command=command,
                                                                   validation=chosen_on))


@bench_app.command("cmc")
def bench_cmc(
    root: Path = typer.Option(ZOO_ROOT, envvar="LOGITFUSION_ZOO_ROOT", help="A zoo build folder with models/large, models/small and models/large-alt; missing deltas are trained first."),
    out: Path = typer.Option(Path("docs/results"), "--out", "-o", help="Folder for cmc.jsonl (one line per cell, resumable) and cmc.md."),
    limit: int = typer.Option(100, help="Test examples per zoo task and per forget/retain/heldout set."),
    batch_size: int = typer.Option(16, help="Requests decoded or scored together."),
    train: bool = typer.Option(True, help="Train deltas/instruct and deltas/unlearn when missing (--no-train: fail instead)."),
):
    """Cross-model control on the zoo: the instruct delta's task gain and the unlearn delta's
    forget/retain accuracy, plugged into the template, models/small and models/large-alt (another
    tokenizer, mapping: auto), plus the mapping between the zoo's tokenizers. Rerun to resume."""
    from .bench import cmc as cmc_bench
    if limit < 1:
        _fail(f"--limit must be >= 1, got {limit}")
    with _progress() as bar:
        try:
            records = cmc_bench.run(root, out, limit=limit, batch_size=batch_size, train=train,
                                    progress=_bench_progress(bar, "bench cmc"), log=_say)
        except cmc_bench.CmcBenchError as e:
            _fail(str(e))
    # with every run's time (kept in cmc.jsonl)
    _write_bench_report("cmc", out, lambda command: cmc_bench.report(records, root, command=command))


if __name__ == "__main__":
    app()
