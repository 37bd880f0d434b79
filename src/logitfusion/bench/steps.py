"""The one resumable step runner of the bench's builds (the zoo, the real-model family): steps run
in order, a finished one is not redone, each one's seconds go to ROOT/timings.json as it ends,
so a build can be interrupted and rerun."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

Progress = Callable[[int, int], None]  # (done, total) while a step runs


@dataclass
class Step:
    name: str  # e.g. "experts/math"; `only` selects by name or folder prefix ("experts")
    # Whether it is done already; None: `run` tells, returning None (or a result with `skipped`)
    # when there was nothing to do.
    done: Callable[[], bool] | None
    run: Callable[[Progress], object]
    ships: bool = False  # the zoo's: copied into the package by `install`


def selected(name: str, only: Sequence[str] | None) -> bool:
    return not only or name in only or any(name.startswith(o.rstrip("/") + "/") for o in only)


def _timings(root: Path) -> dict[str, float]:
    path = root / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_steps(root: str | Path, steps: Sequence[Step], only: Sequence[str] | None = None,
              redo: Sequence[str] = (), on_step: Callable[[str, str, float], None] | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
    """Run the selected steps not done yet. on_step(name, "start" | "done" | "skipped", seconds);
    progress(name, done, total) while a step runs; `redo`: steps that run again when `only` names
    them, done or not. Returns seconds per step (ROOT/timings.json)."""
    root = Path(root)
    on_step = on_step or (lambda name, state, s: print(f"{name} {state}" + (f" ({s:.0f}s)" if s else "")))
    for step in steps:
        if not selected(step.name, only):
            continue
        if step.done is not None and step.done() and not (only and step.name in only and step.name in redo):
            on_step(step.name, "skipped", 0.0)
            continue
        on_step(step.name, "start", 0.0)
        t0 = time.perf_counter()
        result = step.run(lambda d, t, n=step.name: progress and progress(n, d, t))
        seconds = time.perf_counter() - t0
        if step.done is None and (result is None or getattr(result, "skipped", False)):
            on_step(step.name, "skipped", seconds)
            continue
        timings = _timings(root)  # read again: two builds of disjoint steps (--only) may share the folder
        timings[step.name] = round(seconds + timings.pop(step.name + ":partial", 0.0), 1)
        (root / "timings.json").write_text(json.dumps(timings, indent=1))
        on_step(step.name, "done", seconds)
    return _timings(root)
