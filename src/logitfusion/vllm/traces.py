"""Weight traces out of vLLM's engine: a logits processor has no channel back to the caller, and
runs in vLLM's engine process (and, tensor parallel, in every worker), so a traced request's
steps go to a file, KEY.jsonl in the engine's trace folder (settings.trace_folder), written by
tensor-parallel rank 0 only, read back and removed by VLLMFuser once vLLM returns the request.

One JSON object a line: first {"fused": bool} when the row is added (false: it decodes from the
large model alone, and has no steps), then one per step, {"at": output position, "weights",
"objective", "top"}. A row added again (preempted, rebuilt) writes its header again and goes on at
its position; a step run twice for one position (its token discarded by vLLM) is written twice:
the last line for a position wins. Appended and closed line by line, so that every step is on disk
before vLLM hands out the token it chose. vLLM-free (the reader runs in the front end)."""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.decoding import StepTrace
from ..engine.errors import DecodingError


def trace_file(folder: Path, key: str) -> Path:
    return folder / f"{key}.jsonl"


def write_header(path: Path, fused: bool) -> None:
    _append(path, [{"fused": fused}])


def write_steps(path: Path, steps: dict[int, StepTrace]) -> None:
    _append(path, [{"at": at, "weights": s.weights, "objective": s.objective, "top": s.top}
                   for at, s in sorted(steps.items())])


def _append(path: Path, lines: list[dict]) -> None:
    with path.open("a") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))


def read_trace(path: Path, n_tokens: int) -> list[StepTrace]:
    """The request's StepTrace for each of its n_tokens output tokens ([] for a row that decoded
    from the large model alone), or DecodingError(field="trace") naming what is missing."""
    if not path.exists():
        raise DecodingError(f"trace: the vLLM logits processor wrote no trace to {path} (an engine started without "
                            "a trace folder? use VLLMFuser.from_recipe, or set LOGITFUSION_TRACES before vLLM "
                            "starts)", field="trace")
    fused, steps = False, {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "fused" in rec:
            fused = rec["fused"]
        else:  # JSON made the (token, prob) pairs lists
            top = {role: [tuple(pair) for pair in pairs] for role, pairs in rec["top"].items()}
            steps[rec["at"]] = StepTrace(rec["weights"], rec["objective"], top)
    if not fused and not steps:
        return []
    missing = [i for i in range(n_tokens) if i not in steps]
    if missing:
        raise DecodingError(f"trace: {path} lacks steps {missing[:10]} of {n_tokens} (the row decoded part of its "
                            "output unfused: see vLLM's log)", field="trace")
    return [steps[i] for i in range(n_tokens)]
