"""Prompt lists decoded in batches, for the command line and scripts: which prompts are still to
do (a rerun resumes past the ids already written), each prompt's seed (from its place in the
whole list, so that results depend neither on batching nor on resuming), and the record kept
for each prompt."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from . import limits
from .config import EngineConfig
from .decoding import Encoded, Generation
from .sampling import SamplingParams


def pending(rows: Sequence[dict], done: set[str]) -> list[dict]:
    """The rows ({"id": ..., "prompt": ...}) whose id is not among those already done."""
    return [row for row in rows if row["id"] not in done]


def trace_record(gen: Generation, tokenizer) -> list[dict]:
    """A generation's per-step trace as JSON: weights, objective and each model's top tokens."""
    return [{"weights": s.weights, "objective": s.objective,
             "top": {role: [[tokenizer.decode([t]), round(p, 5)] for t, p in top] for role, top in s.top.items()}}
            for s in gen.trace or []]


def generation_record(row: dict, gen: Generation, tokenizer, trace: bool) -> dict:
    rec = {**row, "text": gen.text, "token_ids": gen.token_ids, "finish_reason": gen.finish_reason}
    if gen.error:
        rec["error"] = gen.error
    if trace:
        rec["trace"] = trace_record(gen, tokenizer)
    return rec


def generate_batches(fuser, rows: Sequence[dict], todo: Sequence[dict], params: SamplingParams,
                     engine: EngineConfig | None = None,
                     encoded: Sequence[Encoded] | None = None) -> Iterator[tuple[list[dict], list[Generation]]]:
    """Decode `todo` (some of `rows`) batch by batch, yielding (records, generations) per batch;
    `encoded`: todo's prompts already checked and tokenised (Fuser.check_prompts). With an int seed, row i of `rows` samples with seed + i (its place in the whole file, so that a
    resumed run draws what the first would have)."""
    if not todo:
        return
    if limits.is_int(params.seed):
        index = {row["id"]: i for i, row in enumerate(rows)}
        params = dataclasses.replace(params, seed=[params.seed + index[row["id"]] for row in todo])
    engine = engine or fuser.engine
    prompts = list(encoded) if encoded is not None else [row["prompt"] for row in todo]
    for start, gens in fuser.batches(prompts, params, engine=engine):
        chunk = todo[start: start + len(gens)]
        yield [generation_record(row, g, fuser.models.tokenizer, engine.trace) for row, g in zip(chunk, gens)], gens
