"""Helpers for the zoo's lm-eval task YAMLs in this folder (lm-eval imports this file by its path,
so imports here are absolute). The tasks read the bundled zoo's data, or a zoo build's
(`--metadata data_dir=ROOT/data`), and score with the world's own scorers (world.py).

The folder is not one of eval's: the bench hands it to eval's task manager (`zoo.TASKS_DIR`;
`logitfusion eval` adds it too), so that eval stays a front end that knows no bench.
"""

from __future__ import annotations

from pathlib import Path

from logitfusion.bench.scoring import score_math, score_math_genuine, score_qa, score_summ
from logitfusion.bench.zoo import BUNDLED
from logitfusion.eval.records import read_jsonl


def zoo_dataset(task: str, data_dir: str | None = None, split: str = "test", **_metadata):
    """All three splits of a zoo task, from a zoo build's data folder or the bundled copy.

    `split` (metadata) is what lm-eval scores as the test split: `validation` evaluates design
    choices on the validation rows without touching the test ones."""
    from datasets import Dataset, DatasetDict
    folder = Path(str(data_dir)).expanduser() if data_dir else BUNDLED / "data"
    if not (folder / task / "test.jsonl").is_file():
        raise FileNotFoundError(f"zoo task data {str(folder / task)!r} not found: build the zoo "
                                "(`logitfusion zoo build`) or pass data_dir=ROOT/data of a build")
    if split not in ("validation", "test"):
        raise ValueError(f"zoo task split {split!r}: use validation or test")
    rows = {s: read_jsonl(folder / task / f"{s}.jsonl", what="zoo task data") for s in ("train", "validation", "test")}
    rows["test"] = rows[split]
    return DatasetDict({s: Dataset.from_list(r) for s, r in rows.items()})


def zoo_math_results(doc: dict, results) -> dict:
    return {"exact_match": score_math(results[0], doc["answer"]),
            "genuine": score_math_genuine(results[0], doc["completion"])}


def zoo_qa_results(doc: dict, results) -> dict:
    return {"exact_match": score_qa(results[0], doc["answer"])}


def zoo_summ_results(doc: dict, results) -> dict:
    return {"rouge2": score_summ(results[0], doc["summary"])}
