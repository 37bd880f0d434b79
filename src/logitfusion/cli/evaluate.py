"""eval: methods x tasks through lm-evaluation-harness (the library side is eval/matrix.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..engine import limits, registry
from .common import UsageError, check_paths, fail, progress, say, user_errors, warn


def _check_options(tasks: list[str], methods: list[str], batch_size: int, num_fewshot: Optional[int],
                   max_gen_toks: Optional[int]) -> None:
    from ..engine.sampling import check_batch_size
    if not tasks or not methods:
        raise UsageError("give at least one task (--tasks) and one method (--methods)")
    if len(set(tasks)) < len(tasks) or len(set(methods)) < len(methods):
        raise UsageError("--tasks and --methods must not repeat a name")
    check_batch_size(batch_size)
    for name, value, lo, hi in (("--num-fewshot", num_fewshot, 0, None),
                                ("--max-gen-toks", max_gen_toks, 1, limits.MAX_NEW_TOKENS)):
        problem = value is not None and limits.int_problem(name, value, lo, hi)
        if problem:
            raise UsageError(problem)


def _check_vllm(recipe, methods: list[str], search) -> None:
    """A vLLM recipe's methods, checked before vLLM starts: each one the workers can run, the grid
    and strategy the recipe's (the workers read it)."""
    from ..engine.registry import SearchConfig
    from ..vllm.backend import quiet_vllm, vllm_fuser_class
    from ..vllm.settings import Methods, SettingsError
    quiet_vllm()  # the tables go to stdout: vLLM's own log lines to stderr
    if search != SearchConfig():
        raise UsageError("--grid/--strategy: with `backend: {kind: vllm}` set them in the recipe's solver section")
    known = Methods.of(recipe)
    for m in methods:
        try:
            if m != "ceiling":
                known.of_request({"solver": m})
        except SettingsError as e:
            raise UsageError(str(e).replace("extra_args.solver", f"--methods {m}")) from None
    vllm_fuser_class()  # installed and importable, or one line saying how


def _done(writer, output: Optional[Path], tasks: list[str], limit: Optional[float]) -> dict[str, dict]:
    """The records already in --output, by key; a warning for those run with another --limit."""
    records = {}
    for rec in writer.records if writer else []:
        records[rec["key"]] = rec
        if rec.get("limit") != limit and rec.get("task") in tasks:
            warn(f"{output} holds {rec['key']} run with --limit {rec.get('limit')}, not {limit}; it is kept "
                 "(use another --output to redo)")
    return records


def eval_(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Fusion recipe (YAML, TOML or JSON). Its `ceiling` (a fine-tuned large model), if any, is evaluated too, as method 'ceiling'."),
    tasks: str = typer.Option(..., "--tasks", "-t", help="Comma-separated lm-eval tasks: any lm-eval task name, ours (toy_sums, toy_sums_mc, toy_knowledge_ppl, gsm8k_local, truthfulqa_mc1_local, truthfulqa_mc2_local, triviaqa_local, mmlu_local, cnn_dailymail_local, cnn_dailymail_rouge), or a task YAML file."),
    methods: str = typer.Option("large,expert,static:1.0,dynamic", "--methods", "-m", help=f"Comma-separated methods: {registry.grammar()} (several static weights: static:0.5+1.5; delta needs a recipe with a `delta` section)."),
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
    import logging

    try:
        from ..eval import lm as ev
        from ..eval import matrix
    except ImportError as e:
        fail(f"{e}. `logitfusion eval` runs lm-evaluation-harness: pip install lm-eval")
    from ..bench.zoo import TASKS_DIR as ZOO_TASKS  # the zoo's tasks are the bench's, found here too
    from ..engine.recipe import Recipe
    from ..engine.registry import SearchConfig
    from ..eval.records import RecordWriter

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        _check_options(task_list, method_list, batch_size, num_fewshot, max_gen_toks)
        check_paths({"--recipe": recipe, "--data-dir": data_dir, "--include-path": include_path,
                     "--tasks": [t for t in task_list if t.endswith((".yaml", ".yml"))]}, {"--output": output})
        r = Recipe.from_file(recipe)
        if gap_closed and r.ceiling is None:
            raise UsageError(f"--gap-closed needs a fine-tuned large model to compare with: add `ceiling: {{path: ...}}` "
                             f"to {recipe}")
        search = SearchConfig.parse(grid, strategy)
        method_list = matrix.plan_methods(r, method_list, recipe, search)
        if r.backend.kind == "vllm":
            _check_vllm(r, method_list, search)
        if data_dir is not None and not data_dir.is_dir():
            raise UsageError(f"local dataset path {str(data_dir)!r} does not exist (--data-dir)")
        if limit is not None and limit <= 0:
            raise UsageError(f"--limit must be > 0, got {limit}")
        manager = ev.task_manager(task_list, [str(ZOO_TASKS), *(str(p) for p in include_path)],
                                  metadata={"data_dir": str(data_dir)} if data_dir else None)
        ev.check_tasks(manager, task_list)
        writer = RecordWriter(output, key="key") if output else None
        records = _done(writer, output, task_list, limit)
        todo = matrix.pending_cells(method_list, task_list, set(records))
        n_cells = len(method_list) * len(task_list)
        if writer and len(todo) < n_cells:
            say(f"resuming: {n_cells - len(todo)} of {n_cells} (method, task) pairs already in {output}")
        matrix.load_tasks(manager, [t for _, t in todo])
    except user_errors() + (ev.EvalError,) as e:
        fail(str(e))

    try:
        with progress() as bar:
            job = bar.add_task("evaluating", total=n_cells, completed=n_cells - len(todo))
            for rec in matrix.run_cells(r, method_list, todo, manager, limit=limit, num_fewshot=num_fewshot,
                                        max_gen_toks=max_gen_toks,
                                        status=lambda what: bar.update(job, description=what),
                                        batch_size=batch_size, search=search, device=device, dtype=dtype):
                rec["recipe"] = str(recipe)
                if writer:
                    writer.write([rec])
                records[rec["key"]] = rec
                bar.advance(job)
    except user_errors() + (ev.EvalError,) as e:
        fail(str(e))
    typer.echo(matrix.summarise(list(records.values()), method_list, task_list))
    if writer:
        say(f"results: {output}")
