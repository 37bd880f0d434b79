"""Prompt lists decoded in batches, for the command line and scripts: which prompts are still to
do (a rerun resumes past the ids already written), each prompt's seed (from its place in the
whole list, so that results depend neither on batching nor on resuming), and the record kept
for each prompt."""

from __future__ import annotations

from typing import Iterator, Sequence

from .decoding import Generation


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


def generate_batches(fuser, rows: Sequence[dict], todo: Sequence[dict], *, batch_size: int,
                     seed: int | None = None, trace: bool = False,
                     **options) -> Iterator[tuple[list[dict], list[Generation]]]:
    """Decode `todo` (some of `rows`) batch by batch, yielding (records, generations) per batch.
    Row i of `rows` samples with seed + i. `options` go to Fuser.generate."""
    index = {row["id"]: i for i, row in enumerate(rows)}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start: start + batch_size]
        seeds = None if seed is None else [seed + index[row["id"]] for row in chunk]
        gens = fuser.generate([row["prompt"] for row in chunk], trace=trace, seed=seeds, batch_size=batch_size,
                              **options)
        yield [generation_record(row, g, fuser.models.tokenizer, trace) for row, g in zip(chunk, gens)], gens
