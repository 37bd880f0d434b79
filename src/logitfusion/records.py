"""JSONL files that long runs append to one record at a time, so a rerun resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


class RecordsError(ValueError):
    pass


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts file: one JSON object per line with "prompt" (and optionally "id")."""
    p = Path(path)
    if not p.is_file():
        raise RecordsError(f"input file {str(p)!r} not found")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordsError(f"{p}:{n}: not valid JSON ({e.msg}); each line must be an object "
                               'like {"id": "q1", "prompt": "..."}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise RecordsError(f'{p}:{n}: each line needs a string field "prompt"')
        row.setdefault("id", str(len(rows)))
        row["id"] = str(row["id"])
        rows.append(row)
    ids = [r["id"] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise RecordsError(f"{p}: ids must be unique; repeated: {dup[:5]}")
    return rows


class RecordWriter:
    """Appends one JSON line per record and flushes it. A line cut short by a crash is dropped
    when the file is reopened, so the record is simply redone."""

    def __init__(self, path: str | Path, key: str = "id"):
        self.path, self.key = Path(path), key
        self.done: set[str] = set()
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        good, keep = [], 0
        with self.path.open("rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    break
                if not raw.endswith(b"\n"):
                    break
                good.append(row)
                keep += len(raw)
        if keep != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(keep)
        self.done = {str(r.get(self.key)) for r in good}

    def write(self, records: Iterable[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                self.done.add(str(r[self.key]))
            f.flush()


def reproduce_command(command: str, root) -> list[str]:
    """A bench report's command with its zoo build folder written as ROOT, and where that came from:
    the folder is the reporter's, a reader builds their own."""
    return ["    " + command.replace(str(root), "ROOT"), "",
            f"ROOT is a zoo build folder (`logitfusion zoo build --root ROOT`, about 50 minutes on 2 CPU "
            f"cores; this report's was {root}).", ""]


def read_keyed(path: str | Path, key: str = "key") -> dict[str, dict]:
    """{record[key]: record} of a JSONL results file (empty when it does not exist yet). Open a
    RecordWriter on the file first: it drops a last line cut short by a crash."""
    p = Path(path)
    if not p.exists():
        return {}
    return {rec[key]: rec for rec in (json.loads(line) for line in p.read_text().splitlines() if line.strip())}
