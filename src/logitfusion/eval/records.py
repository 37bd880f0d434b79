"""JSONL files that long runs append to one record at a time, so a rerun resumes where it stopped."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

from ..engine import limits


class RecordsError(ValueError):
    pass


def special_file_problem(p: Path, what: str) -> str | None:
    """Why an existing path is not a file a command may read or append to: a directory, or a
    device, pipe or socket (/dev/full, /dev/zero, a FIFO), which can be endless or never end."""
    if p.is_dir():
        return f"{what} {str(p)!r} is a directory; give a .jsonl file"
    if p.exists() and not p.is_file():
        return (f"{what} {str(p)!r} is not a regular file (a device, pipe or socket, which may never end or "
                "never hold what is written); give a .jsonl file")
    return None


def _lines(p: Path, what: str) -> list[tuple[int, bytes]]:
    """(line number, raw bytes with its newline) of a file; a clear error when it cannot be read."""
    problem = special_file_problem(p, what)
    if problem:
        raise RecordsError(problem)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RecordsError(f"{what} {str(p)!r} cannot be read: {e.strerror}") from None
    return list(enumerate(data.splitlines(keepends=True), 1))


def _json_line(p: Path, n: int, raw: bytes) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecordsError(f"{p}:{n}: not UTF-8 text (byte {e.start} of the line); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise RecordsError(f"{p}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise RecordsError(f"{p}:{n}: each line must be a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: str | Path, limit: int | None = None, what: str = "records file") -> list[dict]:
    """The JSON objects of a JSONL file, blank lines skipped, the first `limit` only when given;
    an error naming the file and line for anything else."""
    p = Path(path)
    if not p.exists():
        raise RecordsError(f"{what} {str(p)!r} not found")
    rows = []
    for n, raw in _lines(p, what):
        if limit is not None and len(rows) >= limit:
            break
        if raw.strip():
            rows.append(_json_line(p, n, raw))
    return rows


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts file: one JSON object per line with "prompt" (and optionally "id")."""
    p = Path(path)
    if not p.exists():
        raise RecordsError(f"input file {str(p)!r} not found")
    rows = []
    for n, raw in _lines(p, "input file"):
        if not raw.strip():
            continue
        row = _json_line(p, n, raw)
        if not isinstance(row.get("prompt"), str):
            raise RecordsError(f'{p}:{n}: each line needs a string field "prompt", like {{"id": "q1", "prompt": "..."}}')
        row.setdefault("id", str(len(rows)))
        if not (isinstance(row["id"], str) or limits.is_int(row["id"])):
            raise RecordsError(f'{p}:{n}: "id" must be a string or an integer, got {json.dumps(row["id"])}; '
                               'write it like "q1" or 1')
        row["id"] = str(row["id"])
        rows.append(row)
    ids = [r["id"] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise RecordsError(f"{p}: ids must be unique; repeated: {dup[:5]}")
    return rows


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, before hours of decoding, if `path` cannot be written: a directory, a folder that
    cannot be created, no permission. Creates nothing that stays."""
    p = Path(path)
    if p.is_dir():
        raise RecordsError(f"{what} {str(p)!r} is a directory; give a file name inside it")
    problem = special_file_problem(p, what)
    if problem:
        raise RecordsError(problem.replace("a .jsonl file", "a regular file"))
    if p.exists():
        try:
            p.open("ab").close()
        except OSError as e:
            raise RecordsError(f"{what} {str(p)!r} cannot be written: {e.strerror}") from None
        return
    folder = p.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise RecordsError(f"{what} {str(p)!r} cannot be created: {str(folder)!r} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise RecordsError(f"{what} {str(p)!r} cannot be created in {str(folder)!r}: {e.strerror}") from None


class RecordWriter:
    """Appends one JSON line per record and flushes it. A last line cut short by a crash is
    dropped when the file is reopened, so that record is simply redone; any other line that is
    not a record with the key field is an error naming the file and line (never deleted)."""

    def __init__(self, path: str | Path, key: str = "id"):
        self.path, self.key = Path(path), key
        self.records: list[dict] = []  # what the file held when opened
        self.done: set[str] = set()
        check_writable(self.path, "output file")
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        lines = _lines(self.path, "output file")
        for i, (n, raw) in enumerate(lines):
            if not raw.strip():
                continue  # a blank line holds no record; the ones after it are kept
            if i == len(lines) - 1 and not raw.endswith(b"\n"):
                try:
                    row = _json_line(self.path, n, raw)
                except RecordsError:  # cut short by a crash: drop it, it is redone
                    with self.path.open("r+b") as f:
                        f.truncate(self.path.stat().st_size - len(raw))
                    break
                with self.path.open("ab") as f:  # whole but unterminated: keep it
                    f.write(b"\n")
            else:
                row = _json_line(self.path, n, raw)
            if self.key not in row:
                raise RecordsError(f"{self.path}:{n}: this record has no {self.key!r} field, so the file was not "
                                   "written by this command; give another output file")
            self.records.append(row)
        self.done = {str(r[self.key]) for r in self.records}

    def write(self, records: Iterable[dict]) -> None:
        """Append and flush; a write that fails (disk full, file too large) is an error naming the
        file: the records already in it stay, and the same command resumes after them."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    f.flush()
                    self.done.add(str(r[self.key]))
        except OSError as e:
            raise RecordsError(f"could not write to {str(self.path)!r}: {e.strerror or e}; the "
                               f"{len(self.done)} records written so far are kept there: free space (or "
                               "give another file) and rerun the same command to resume") from None


def reproduce_command(command: str, root) -> list[str]:
    """A bench report's command with its zoo build folder written as ROOT, and where that came from:
    the folder is the reporter's, a reader builds their own."""
    return ["    " + command.replace(str(root), "ROOT"), "",
            f"ROOT is a zoo build folder (`logitfusion zoo build --root ROOT`, about 85 minutes on 2 CPU "
            f"cores; this report's was {root}).", ""]


def read_keyed(path: str | Path, key: str = "key") -> dict[str, dict]:
    """{record[key]: record} of a JSONL results file (empty when it does not exist yet). Open a
    RecordWriter on the file first: it drops a last line cut short by a crash."""
    p = Path(path)
    if not p.exists():
        return {}
    return {rec[key]: rec for rec in read_jsonl(p, what="results file")}
