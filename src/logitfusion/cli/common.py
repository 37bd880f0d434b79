"""What every command shares: the console, printing user text, failing with exit code 2, the
errors that are the user's to fix, progress bars, bench reports and training summaries."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterable, Union

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


PathArg = Union[str, Path, None]


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """The path with links and `..` resolved, and (device, inode) when it exists (hard links)."""
    resolved = path.expanduser().resolve()
    try:
        st = resolved.stat()
    except OSError:
        return resolved, None
    return resolved, (st.st_dev, st.st_ino)


def _named(options: dict[str, Union[PathArg, Iterable[PathArg]]]) -> list[tuple[str, Path]]:
    out = []
    for option, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        out += [(option, Path(v)) for v in values if v is not None and str(v) != ""]
    return out


def _overlap(write: Path, wid, other: Path, oid, folder: bool) -> bool:
    if write == other or (wid is not None and wid == oid):
        return True
    return folder and (write in other.parents or other in write.parents)


def _special_file(option: str, path: Path, written_file: bool) -> None:
    """A file written must not be a directory; no path may be a device, pipe or socket (/dev/full,
    /dev/zero, a FIFO), which can be endless or never keep what is written."""
    if path.is_dir():
        if written_file:
            raise UsageError(f"{option} {str(path)!r} is a directory; give a file name inside it")
    elif path.exists() and not path.is_file():
        raise UsageError(f"{option} {str(path)!r} is not a regular file (a device, pipe or socket, which may never "
                         "end or never keep what is written); give a regular file")


def check_paths(reads: dict[str, Union[PathArg, Iterable[PathArg]]],
                writes: dict[str, Union[PathArg, Iterable[PathArg]]], folders: tuple[str, ...] = ()) -> None:
    """Every path a command writes differs from every path it reads and every other one it writes,
    links resolved (symbolic and hard), before any work. `folders` names write options that are
    folders: nothing read may lie inside them, and they may not lie inside a folder read."""
    for option, path in _named(reads) + _named(writes):
        _special_file(option, path, written_file=(option, path) in _named(writes) and option not in folders)
    written = [("writes", o, p, *_identity(p)) for o, p in _named(writes)]
    others = [("reads", o, p, *_identity(p)) for o, p in _named(reads)] + written
    for _, option, path, resolved, ident in written:
        for verb, other, opath, oresolved, oident in others:
            if (other, opath) == (option, path):
                continue
            if _overlap(resolved, ident, oresolved, oident, option in folders):
                same = "is" if resolved == oresolved or (ident is not None and ident == oident) else "overlaps"
                links = " (after resolving links)" if str(path) != str(opath) else ""
                raise UsageError(f"{option} {str(path)!r} {same} the {other} path {str(opath)!r}{links}: the "
                                 f"command would overwrite what it {verb}; give another path for {option}")


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
    try:
        (out / f"{name}.md").write_text(text)
    except OSError as e:
        fail(f"could not write {str(out / f'{name}.md')!r}: {e.strerror}; free space or give "
             "another --out, and rerun")
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
