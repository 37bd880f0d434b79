"""Reading the zoo's texts: the task scorers (also used by the lm-eval tasks in tasks/) and the
leakage check, which reads a corpus for the derivations of held-out math problems. Both read a
worked solution's steps the same way (`math_steps`)."""

from __future__ import annotations

import re
from typing import Sequence

_NUMBER = re.compile(r"-?\d+")


def math_steps(text: str) -> list[tuple[int, str, int, int]]:
    """The steps of a worked solution's first line, as (x, "plus" or "minus", y, result)."""
    line = text.strip().split("\n")[0]
    return [(int(x), op, int(y), int(z)) for x, op, y, z in re.findall(r"(-?\d+) (plus|minus) (-?\d+) is (-?\d+)", line)]


def final_number(text: str) -> str | None:
    """The answer of a worked solution: the number after 'The answer is', else the last number."""
    m = re.search(r"answer is\s*(-?\d+)", text)
    if m:
        return m.group(1)
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def score_math(generation: str, answer: str) -> float:
    return float(final_number(generation) == answer)


def score_math_genuine(generation: str, completion: str) -> float:
    """1 when every step of the derivation is the gold one's and the final number is right: a lucky
    final number after wrong steps scores under `score_math` only."""
    steps = math_steps(completion)
    return float(bool(steps) and math_steps(generation) == steps and final_number(generation) == final_number(completion))


def score_qa(generation: str, answer: str) -> float:
    return float(generation.strip().split("\n")[0].strip().rstrip(".").strip() == answer)


_ROUGE = None


def score_summ(generation: str, summary: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer
        _ROUGE = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    return _ROUGE.score(summary, generation.strip().split("\n")[0])["rouge2"].fmeasure


def score_choice(chosen: int, gold: int) -> float:
    return float(chosen == gold)


def math_leaks(rows: list[dict], docs: Sequence[str]) -> list[str]:
    """Ids of the math problems in `rows` whose derivation a document of `docs` (a corpus) tells, in
    any layout the world writes: the numbers of the worked solution (a, b, s, s, c, r) or of a story
    (a, b, s, c, r), in order with no other number between them, the first step (a, b, s) and the
    last (c, r) each within one sentence. Conservative: two fact sentences that happen to sit side
    by side in shuffled prose ("6 plus 11 is 17. 17 plus 13 is 30.") count as telling it."""
    def chains(row: dict) -> set[tuple[int, ...]]:
        (a, _, b, s), (_, _, c, r) = math_steps(row["completion"])[:2]
        return {(a, b, s, s, c, r), (a, b, s, c, r)}
    wanted = {chain: row["id"] for row in rows for chain in chains(row)}
    found = set()
    for doc in docs:
        spans = [(m.start(), int(m.group())) for m in _NUMBER.finditer(doc)]
        nums = tuple(n for _, n in spans)
        for k in (5, 6):
            for i in range(len(nums) - k + 1):
                if nums[i:i + k] in wanted and _one_derivation(doc, [p for p, _ in spans[i:i + k]]):
                    found.add(wanted[nums[i:i + k]])
    return sorted(found)


def _one_derivation(doc: str, starts: list[int]) -> bool:
    """Numbers at `starts` (a, b, s, ..., c, r) read as one derivation: a to s in one sentence, c to
    r in one sentence, and at most one sentence end between them."""
    def ends(i: int, j: int) -> int:
        return doc.count(". ", starts[i], starts[j]) + doc.count(".\n", starts[i], starts[j])
    return ends(0, 2) == 0 and ends(-2, -1) == 0 and ends(2, -2) <= 1


