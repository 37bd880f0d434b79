"""The `eval` matrix: methods x tasks through lm-eval. Which methods run (each checked before any
model loads, the recipe's ceiling last), which cells a rerun still owes, one record per cell
(`run_task`), cells run grouped so that one model set is loaded at a time, and the markdown
summary with method.md §6's gap closed."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..engine.compat import lean_lm_eval
from ..engine.recipe import Recipe
from ..engine.registry import SearchConfig
from .lm import EvalError, FusedLM


def plan_methods(recipe: Recipe, methods: Sequence[str], source, search: SearchConfig | None = None) -> list[str]:
    """The methods to run, each checked now: "ceiling" (added when the recipe names a ceiling)
    comes last, so that the fused methods share one loaded model set."""
    methods = list(methods)
    for m in methods:
        if m == "ceiling":
            if recipe.ceiling is None:
                raise EvalError(f"method 'ceiling' needs `ceiling: {{path: ...}}` in {source}")
            continue
        recipe.method(m, search=search)
    if recipe.ceiling is not None and "ceiling" not in methods:
        methods.append("ceiling")
    return [m for m in methods if m != "ceiling"] + (["ceiling"] if "ceiling" in methods else [])


def pending_cells(methods: Sequence[str], tasks: Sequence[str], done: set[str]) -> list[tuple[str, str]]:
    """The (method, task) cells whose record key is not among those done."""
    return [(m, t) for m in methods for t in tasks if f"{m}|{t}" not in done]


def load_tasks(manager, tasks: Sequence[str]) -> None:
    """Load each task's data now, so that data problems surface before any model loads."""
    for t in dict.fromkeys(tasks):
        try:
            manager.load([t])
        except Exception as e:  # lm-eval and datasets raise many types here
            raise EvalError(f"task {t!r} could not be loaded: {type(e).__name__}: {e}") from None


def run_cells(recipe: Recipe, methods: Sequence[str], cells: Sequence[tuple[str, str]], manager, *,
              limit: float | None = None, num_fewshot: int | None = None, max_gen_toks: int | None = None,
              status: Callable[[str], None] = lambda what: None, **lm_options) -> Iterator[dict]:
    """Run the cells method by method, yielding each record. The fused methods share one loaded
    model set, which is freed before the ceiling loads. lm_options go to FusedLM."""
    lm, lm_kind = None, None
    for method in methods:
        pending = [t for m, t in cells if m == method]
        if not pending:
            continue
        kind = "ceiling" if method == "ceiling" else "fused"
        if lm_kind != kind:
            lm = None  # free one model set before loading the other
            gc.collect()
            status(f"loading {'the ceiling' if kind == 'ceiling' else 'the models'}")
            lm, lm_kind = FusedLM(recipe=recipe, ceiling=kind == "ceiling", **lm_options), kind
        if kind == "fused":
            lm.set_method(method)
        for task in pending:
            status(f"{method} on {task}")
            yield run_task(lm, method, task, manager, limit=limit, num_fewshot=num_fewshot,
                           max_gen_toks=max_gen_toks)


def primary_metric(task: str, results: dict) -> tuple[str, float | None, bool]:
    """(name, value, higher is better) of a task's headline metric: the first metric of its
    metric_list under its first filter (lm-eval's own tables list them in that order)."""
    row = results["results"].get(task, {})
    config = results.get("configs", {}).get(task, {})
    names = [m["metric"] for m in config.get("metric_list", []) if isinstance(m.get("metric"), str)]
    filters = [f["name"] for f in config.get("filter_list") or []] or ["none"]
    candidates = [f"{m},{f}" for m in names for f in filters] + \
                 [k for k in row if "," in k and "_stderr" not in k]
    for key in candidates:
        if isinstance(row.get(key), (int, float)):
            metric = key.split(",")[0]
            better = results.get("higher_is_better", {}).get(task, {}).get(metric, True)
            return key, float(row[key]), bool(better)
    return "none", None, True


def run_task(lm: FusedLM, method: str, task: str, manager, limit: float | None = None,
             num_fewshot: int | None = None, max_gen_toks: int | None = None, per_doc: bool = False) -> dict:
    """One (method, task) cell through lm_eval.simple_evaluate; returns its JSONL record, with
    `scores` (the headline metric of each document, in document order) when `per_doc` is set,
    for paired comparisons between methods."""
    import time

    from lm_eval import simple_evaluate
    t0 = time.perf_counter()
    if limit is not None and limit >= 1:
        limit = int(limit)
    with lean_lm_eval():
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                              log_samples=per_doc, bootstrap_iters=0)
    name = Path(task).stem if task.endswith(".yaml") else task
    if name not in out["results"]:  # a YAML file: its task name is inside
        name = next(iter(out["results"]))
    metric, value, better = primary_metric(name, out)
    metrics = {k: v for k, v in out["results"][name].items()
               if "," in k and isinstance(v, (int, float)) and "_stderr" not in k and math.isfinite(v)}
    n = out.get("n-samples", {}).get(name, {}).get("effective")
    record = {"key": f"{method}|{task}", "method": method, "task": task, "metric": metric, "value": value,
              "higher_is_better": better, "metrics": metrics, "n": n, "limit": limit,
              "seconds": round(time.perf_counter() - t0, 2)}
    if per_doc:
        docs = sorted(out["samples"][name], key=lambda d: d["doc_id"])
        record["scores"] = [float(d[metric.split(",")[0]]) for d in docs]
    return record


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def summarise(records: Sequence[dict], methods: Sequence[str], tasks: Sequence[str]) -> str:
    """Markdown: one table per task, then averages over the tasks whose headline metric is
    higher-is-better, with method.md §6's gap closed when a `ceiling` row is present:
    fused / FFT and (fused - base) / (FFT - base), ratios of averages, base = `large`."""
    by_key = {r["key"]: r for r in records}
    lines = []
    for task in tasks:
        rows = [by_key.get(f"{m}|{task}") for m in methods]
        metric = next((r["metric"] for r in rows if r), "-")
        lines += [f"### {task} ({metric})", "", "| method | score |", "|---|---|"]
        lines += [f"| {m} | {_fmt(r['value'] if r else None)} |" for m, r in zip(methods, rows)]
        lines.append("")
    scored = [t for t in tasks if all(by_key.get(f"{m}|{t}", {}).get("higher_is_better", True) for m in methods)]
    skipped = [t for t in tasks if t not in scored]

    def average(method: str) -> float | None:
        values = [by_key[f"{method}|{t}"]["value"] for t in scored if f"{method}|{t}" in by_key]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values and len(values) == len(scored) else None

    avg = {m: average(m) for m in methods}
    ceiling, base = avg.get("ceiling"), avg.get("large")
    gap = ceiling is not None
    lines += [f"### average over {len(scored)} task(s)" + (f" (not averaged, lower is better: {', '.join(skipped)})"
                                                            if skipped else ""), ""]
    head = "| method | average |" + (" gap closed (fused/FFT) | (fused-base)/(FFT-base) |" if gap else "")
    lines += [head, "|---|---|" + ("---|---|" if gap else "")]
    for m in methods:
        row = f"| {m} | {_fmt(avg[m])} |"
        if gap:
            ratio = avg[m] / ceiling if avg[m] is not None and ceiling else None
            strict = ((avg[m] - base) / (ceiling - base) if avg[m] is not None and base is not None
                      and ceiling != base else None)
            row += f" {_pct(ratio)} | {_pct(strict)} |"
        lines.append(row)
    if gap and base is None:
        lines += ["", "(add the `large` method for the (fused-base)/(FFT-base) figure)"]
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
