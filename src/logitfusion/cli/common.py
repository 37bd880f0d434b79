"""What every command shares: the console, printing user text, failing with exit code 2, the
errors that are the user's to fix, progress bars, bench reports and training summaries."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# emoji off: an expert named "m" in ":m:" would print as an emoji. User text goes through say,
# which escapes it, so that "[inf]" or "[1, 2]" in a message is printed and not eaten as markup.
console = Console(stderr=True, emoji=False)
ZOO_ROOT = Path.home() / ".cache" / "logitfusion" / "zoo"


class UsageError(ValueError):
    """Options that do not go together."""


def say(text: str, label: str = "", style: str = "") -> None:
    """Print user text literally (no markup, no emoji, no wrapping inside it), after a styled label."""
    prefix = f"[{style}]{label}[/] " if label else ""
    console.print(prefix + escape(str(text)), soft_wrap=True)


def warn(text: str) -> None:
    say(text, "warning:", "yellow")


def fail(message: str) -> None:
    say(message, "error:", "bold red")
    raise typer.Exit(2)


def user_errors() -> tuple[type[Exception], ...]:
    # imported here: `logitfusion --help` should not pay for torch and transformers
    from ..engine.sampling import DecodingError
    from ..engine.models import LoadError
    from ..engine.recipe import RecipeError
    from ..engine.solvers import SolverError
    from ..engine.vocab import VocabError
    from ..eval.records import RecordsError
    from ..train.finetune import TrainingError
    return (UsageError, DecodingError, LoadError, RecipeError, RecordsError, SolverError, TrainingError,
            VocabError)


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console)


def bench_progress(bar: Progress, name: str):
    """A bench's progress(done, total, what) callback drawing on `bar`."""
    job = bar.add_task(name, total=None)
    return lambda done, total, what: bar.update(job, total=total, completed=done, description=what)


def write_bench_report(name: str, out: Path, report) -> None:
    """Write OUT/NAME.md from report(command), the command being this invocation, and show it."""
    text = report(" ".join(["logitfusion", "bench", name, *sys.argv[3:]]))
    (out / f"{name}.md").write_text(text)
    typer.echo(text)
    say(f"wrote {out / f'{name}.md'}")


def timed(run, on_os_error: str | None = None):
    """(run(), seconds), failing cleanly on the user's errors (and on OSError, with that message)."""
    start = time.perf_counter()
    try:
        result = run()
    except user_errors() as e:
        fail(str(e))
    except OSError as e:
        if on_os_error is None:
            raise
        fail(f"{on_os_error}: {e.strerror}")
    return result, time.perf_counter() - start


def train_and_report(run, out: Path, what: str) -> None:
    """Run a resumable training job (finetune, delta train) and say what it did."""
    res, seconds = timed(run)
    if res.skipped:
        say(f"{out} already holds this finished run ({res.global_step} steps); nothing to do "
            "(--overwrite to train again)")
        return
    if res.resumed_from:
        say(f"resumed from {res.resumed_from}")
    loss = f"{res.train_loss:.4f}" if res.train_loss is not None else "n/a"
    say(f"wrote {what} {out} ({res.global_step} steps, mean training loss {loss}, {seconds:.1f} s)")
