"""zoo build / info, bench paper / cmc / speed and demo: the research bench's commands (the library
side is bench/)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..bench.shapes import ShapePair  # no torch: --help stays fast
from .common import (ZOO_ROOT, bench_progress, console, fail, progress, say, timed, user_errors,
                     write_bench_report)


def demo(out: Path = typer.Option(Path("demo_out"), help="Folder for the results (demo.json) and the weights plot."),
         n_prompts: int = typer.Option(12, help="Test prompts per task answered by each method."),
         root: Optional[Path] = typer.Option(None, help="A zoo build folder to use instead of the bundled zoo.")):
    """Large base, small expert, proxy-tuning and dynamic fusion side by side on the bundled zoo."""
    from ..bench.demo import run_demo
    if n_prompts < 1:
        fail(f"--n-prompts must be >= 1, got {n_prompts}")
    try:
        run_demo(out, n_prompts=n_prompts, root=root, console=console)
    except FileNotFoundError as e:
        fail(str(e))


def zoo_build(
    root: Path = typer.Option(ZOO_ROOT, envvar="LOGITFUSION_ZOO_ROOT", help="Build folder: world data, models, experts, ceilings and their checkpoints. A rerun resumes; finished steps are skipped."),
    ceilings: bool = typer.Option(True, "--ceilings/--no-ceilings", help="Also train the large fine-tunes (per task full and LoRA, multi-task) that the paper bench compares with; they are not shipped."),
    only: list[str] = typer.Option([], "--only", help="Run only these steps or groups (data, init, models, experts, ceilings, experts/math...); repeatable."),
    install: bool = typer.Option(False, "--install", help="Copy the shipped part (bases, experts, task data) into the package folder afterwards (for maintainers)."),
    seed: int = typer.Option(0, help="Seed of the world and of every training run."),
):
    """Rebuild the zoo from scratch: world, tokenizer, bases, experts (and ceilings), about an hour on 2 cores."""
    from ..bench import zoo
    timings, seconds = timed(lambda: zoo.build(root, zoo.ZooConfig(seed=seed), ceilings=ceilings,
                                               only=only or None, log=say))
    say(f"zoo built in {root} ({seconds:.0f} s this run; "
        f"{sum(timings.values()):.0f} s of training recorded in timings.json)")
    if install:
        size = zoo.install(root)
        say(f"installed {size / 1e6:.1f} MB into {zoo.BUNDLED}")


def zoo_info(root: Optional[Path] = typer.Option(None, help="A zoo build folder (default: the bundled zoo).")):
    """List the zoo's models with their sizes, and its task data."""
    from ..bench import zoo
    rows = zoo.describe(root or zoo.BUNDLED)
    if not rows:
        fail(f"no zoo in {root or zoo.BUNDLED}: run `logitfusion zoo build`")
    table = Table(title=f"zoo in {root or zoo.BUNDLED}")
    for col in ("model", "kind", "parameters", "MB"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], f"{r['parameters']:,}", f"{r['mb']:.1f}")
    console.print(table)


def _names(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",")] if text else None


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

    from ..bench import paper as bench, world, zoo
    task_list, table_list = _names(tasks) or list(world.TASKS), _names(tables)
    bad = [t for t in task_list if t not in world.TASKS] + [t for t in table_list or [] if t not in bench.TABLES]
    if bad:
        fail(f"unknown task or table {bad}; tasks: {', '.join(world.TASKS)}; tables: {', '.join(bench.TABLES)}")
    if limit is not None and limit < 1:
        fail(f"--limit must be >= 1, got {limit}")
    if split not in ("validation", "test"):
        fail(f"--split must be validation or test, got {split!r}")
    if not (root / "models" / "large" / "config.json").exists():
        fail(f"no zoo build in {root}: run `logitfusion zoo build --root {root}` first")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    zoo.build(root, only=["experts", "ceilings"], log=say)  # no-op when all exist
    with progress() as bar:
        records = bench.run(root, out, task_list, limit=limit, batch_size=batch_size, tables=table_list,
                            progress=bench_progress(bar, "bench"), split=split)
    bench.weights_plots(root, out, split=split)
    chosen_on = bench.validation_records(out) if split == "test" else None
    write_bench_report("paper", out, lambda command: bench.report(records, root, command=command,
                                                                  validation=chosen_on))


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
    from ..bench import cmc as cmc_bench
    if limit < 1:
        fail(f"--limit must be >= 1, got {limit}")
    with progress() as bar:
        try:
            records = cmc_bench.run(root, out, limit=limit, batch_size=batch_size, train=train,
                                    progress=bench_progress(bar, "bench cmc"), log=say)
        except cmc_bench.CmcBenchError as e:
            fail(str(e))
    # with every run's time (kept in cmc.jsonl)
    write_bench_report("cmc", out, lambda command: cmc_bench.report(records, root, command=command))


def bench_speed(
    tokens: int = typer.Option(32, help="new tokens per sequence"),
    batch: list[int] = typer.Option([1, 8], help="batch sizes (repeat for several: --batch 1 --batch 8)"),
    repeats: int = typer.Option(3, help="timed rounds; the best counts"),
    experts: int = typer.Option(4, help="experts for the multi-expert rows"),
    models: Optional[Path] = typer.Option(None, help="zoo folder (default: the bundled zoo)"),
    shapes: Optional[ShapePair] = typer.Option(None, help="random models of real shapes: smollm2-cpu (SmolLM2-135M's shape and a small model of its vocabulary, for CPU), tinyllama-7b/13b (for GPU)"),
    large: Optional[str] = typer.Option(None, help="any large model (a folder or .gguf), with --small and --expert"),
    small: Optional[str] = typer.Option(None, help="the small base the experts were fine-tuned from"),
    expert: list[str] = typer.Option([], help="an expert, PATH or NAME=PATH (repeat; their number replaces --experts)"),
    recipe: Optional[Path] = typer.Option(None, help="take the large, small and expert models from a recipe instead"),
    speculate: list[int] = typer.Option([2, 4], help="draft lengths to time (repeat for several; 0: none)"),
    long_tokens: int = typer.Option(400, help="new tokens for the KV-cache table (reserved room vs torch.cat)"),
    device: str = typer.Option("cpu", help="device for all models"),
    dtype: str = typer.Option("float32", help="weights dtype"),
    naive: bool = typer.Option(True, "--naive/--no-naive", help="also time the naive reference loop (slow)"),
    engine: str = typer.Option("hf", help="hf: our engine's tables; vllm: the large model in vLLM (alone, fused static and dynamic) against our HF engine fused, the first expert, at each --batch (needs vLLM: pip install 'logitfusion[vllm]')"),
):
    """Fused decoding speed vs the large model alone, component floor, naive loop, fast paths."""
    from ..bench.speed import given_models, main, recipe_models
    sources = [name for name, used in (("--models", models), ("--shapes", shapes), ("--recipe", recipe),
                                       ("--large/--small/--expert", large or small or expert)) if used]
    if len(sources) > 1:
        fail(f"choose one source of models, got {' and '.join(sources)}")
    if (large or small or expert) and not (large and small):
        fail("--large, --small and --expert go together: give all three (--expert repeats)")
    try:  # a bad path, name or recipe is the user's to fix: say so without a traceback
        given = given_models(large, small, expert) if large else recipe_models(recipe) if recipe else None
        if engine != "hf":
            _bench_vllm(engine, given, models, shapes.value if shapes else None, tokens, batch, repeats, device, dtype)
            return
        main(tokens=tokens, batch=batch, repeats=repeats, experts=experts, models=models,
             shapes=shapes.value if shapes else None, speculate=speculate, long_tokens=long_tokens, device=device,
             dtype=dtype, naive=naive, given=given)
    except user_errors() as e:
        fail(str(e))


def _bench_vllm(engine: str, given, models, shapes, tokens: int, batch: list[int], repeats: int, device: str,
                dtype: str) -> None:
    """bench speed --engine vllm (bench/speed_vllm.py)."""
    from ..bench.speed import BUNDLED_ZOO, _paths
    from ..vllm.backend import vllm_fuser_class
    if engine != "vllm":
        fail(f"--engine must be hf or vllm, got {engine!r}")
    vllm_fuser_class()  # installed and importable, or one line saying how
    from ..bench import speed_vllm
    paths = _paths(models or BUNDLED_ZOO, shapes, given, 1, device, dtype)
    source = "given models" if given else shapes or f"the zoo ({models or 'bundled'})"
    speed_vllm.main(paths, tokens=tokens, batch=batch, repeats=repeats, dtype=dtype, device=device, source=source)
