"""`logitfusion demo`: the bundled zoo, four methods side by side on a slice of the test sets.

For each generation task of the zoo (math, qa, summ), the large base, the small expert for that
task, proxy-tuning (a = 1) and dynamic fusion answer the same test prompts; the demo prints each
method's score and tokens/s, a few answers, and writes the plot of the dynamic weights over
decoding steps. The large base knows more about the world; the expert knows the task format;
fusion should bring the two together.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..eval.records import read_jsonl
from . import scoring, zoo

METHODS = [("large base", "large"), ("small expert", "expert"), ("proxy-tuning (a=1)", "static:1.0"),
           ("dynamic fusion", "dynamic")]
TASKS = {"math": ("exact match", 64), "qa": ("exact match", 12), "summ": ("ROUGE-2", 40)}


def _score(task: str, text: str, row: dict) -> float:
    if task == "math":
        return scoring.score_math(text, row["answer"])
    if task == "qa":
        return scoring.score_qa(text, row["answer"])
    return scoring.score_summ(text, row["summary"])


def run_demo(out: Path, n_prompts: int = 12, root: Path | None = None, console: Console | None = None) -> list[dict]:
    from ..engine.fuser import Fuser
    from ..plotting import plot_weights

    console = console or Console()
    root = Path(root or zoo.BUNDLED)
    out = Path(out)
    if not (root / "models" / "large" / "config.json").exists():
        raise FileNotFoundError(f"no zoo in {root}: reinstall the package, or build one with `logitfusion zoo build`")
    rows, answers = [], []
    for task, (metric, max_new) in TASKS.items():
        test = read_jsonl(root / "data" / task / "test.jsonl", limit=n_prompts, what="task data")
        fuser = Fuser.from_pretrained(str(root / "models" / "large"), str(root / "models" / "small"),
                                      {task: str(root / "experts" / task)})
        prompts = [r["prompt"] for r in test]
        for label, method in METHODS:
            t0 = time.perf_counter()
            gens = fuser.generate(prompts, solver=method, max_new_tokens=max_new, stop=["\n"], batch_size=n_prompts,
                                  trace=method == "dynamic")
            seconds = time.perf_counter() - t0
            score = sum(_score(task, g.text, r) for g, r in zip(gens, test)) / len(test)
            rows.append({"task": task, "metric": metric, "method": label, "score": score,
                         "tokens_per_s": sum(len(g.token_ids) for g in gens) / seconds})
            answers.append((task, label, test[0]["prompt"], gens[0].text))
            if method == "dynamic" and task == "math":
                plot = plot_weights(gens, fuser.expert_names, out / "weights.png", max_panels=4,
                                    title="dynamic fusion: weight of the math expert per decoding step")
    table = Table(title=f"bundled zoo, first {n_prompts} test prompts per task, greedy")
    table.add_column("method")
    for task, (metric, _) in TASKS.items():
        table.add_column(f"{task} ({metric})")
    table.add_column("tokens/s (mean)")
    for label, _ in METHODS:
        mine = [r for r in rows if r["method"] == label]
        table.add_row(label, *[f"{100 * r['score']:.0f}" for r in mine],
                      f"{sum(r['tokens_per_s'] for r in mine) / len(mine):.0f}")
    console.print(table)
    shown = Table(title="first test prompt of each task", show_lines=True)
    for col in ("task", "method", "answer"):
        shown.add_column(col)
    for task, label, prompt, text in answers:
        shown.add_row(task, label, text.strip())
    console.print(shown)
    for task in TASKS:
        console.print(f"[dim]{task} prompt:[/] {next(p for t, _, p, _ in answers if t == task)!r}")
    console.print(f"weights over steps: {plot}")
    console.print("The full comparison (all baselines, multi-task, ICL, task arithmetic) is `logitfusion bench "
                  "paper`; its results are in docs/results/.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(rows, indent=1))
    return rows
