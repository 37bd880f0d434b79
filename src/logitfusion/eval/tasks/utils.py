"""Helpers for the lm-eval task YAMLs in this folder (lm-eval imports this file by its path).

Datasets:
- `packaged_dataset`: the toy data shipped in `data/` (no network, no cache folder).
- `local_dataset`: a benchmark from a local JSONL copy, `{data_dir}/{file}`. `data_dir` comes from
  lm-eval's task metadata (`--metadata data_dir=/path`, or `logitfusion eval --data-dir /path`),
  else from the LOGITFUSION_DATA_DIR environment variable.
Metrics: ROUGE-1/2/L with rouge-score (summarisation), TruthfulQA MC2 from the generation-format
fields (correct_answers / incorrect_answers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
DATA_ENV = "LOGITFUSION_DATA_DIR"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def _dataset(rows: list[dict], split: str):
    from datasets import Dataset, DatasetDict
    return DatasetDict({split: Dataset.from_list(rows)})


def packaged_dataset(file: str, split: str = "test", **_metadata):
    return _dataset(_read_jsonl(HERE / "data" / file), split)


def local_dataset(file: str, split: str = "test", data_dir: str | None = None, **_metadata):
    directory = data_dir or os.environ.get(DATA_ENV)
    if not directory:
        raise FileNotFoundError(
            f"this task reads a local copy of its dataset ({file}) but no data folder was given: pass "
            f"--data-dir DIR (logitfusion eval), --metadata data_dir=DIR (lm-eval), or set {DATA_ENV}")
    path = Path(str(directory)).expanduser() / file
    if not path.is_file():
        raise FileNotFoundError(f"local dataset path {str(path)!r} does not exist (expected {file} in the data "
                                f"folder {str(directory)!r}; see docs/evaluation.md for the file formats)")
    return _dataset(_read_jsonl(path), split)


# ---------------------------------------------------------------- TruthfulQA from generation-format rows

def truthfulqa_mc1_choices(doc: dict) -> list[str]:
    """The best answer first (the gold choice), then the incorrect answers."""
    return [doc["best_answer"]] + list(doc["incorrect_answers"])


def truthfulqa_mc2_choices(doc: dict) -> list[str]:
    return list(doc["correct_answers"]) + list(doc["incorrect_answers"])


def truthfulqa_mc2_results(doc: dict, results) -> dict:
    """Normalised probability mass on the true answers (lm-eval's MC2)."""
    ll = np.array([r[0] for r in results])
    probs = np.exp(ll - ll.max())
    return {"acc": float(probs[: len(doc["correct_answers"])].sum() / probs.sum())}


# ---------------------------------------------------------------- summarisation

_SCORER = None


def rouge_results(doc: dict, results) -> dict:
    """ROUGE F-measures of the generated summary against the reference (`highlights`)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = _SCORER.score(" ".join(doc["highlights"].split()), " ".join(results[0].split()))
    return {name: scores[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}
