"""`logitfusion bench real` (bench/real.py builds what it runs on): large alone, expert alone,
proxy-tuning (a = 1), fixed a = 0.5, the fixed weight chosen on the validation split, and dynamic
fusion on each task's test prompts; format and correctness scored apart; real.jsonl appended per
(task, split, method), real.md written from it; and the side-by-side answers of the demo."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..eval.records import read_jsonl
from .real import TASK_NOTES, score


@dataclass
class BenchConfig:
    methods: tuple[str, ...] = ("large", "expert", "static:1.0", "static:0.5", "dynamic")
    # The weight rules of issue 24 (engine/rules.py): every candidate on validation; on test only the
    # designs frozen on the zoo's validation split (docs/results/validation/rules.md), once: its three
    # single-setting winners and keep at beta 0.1, the setting that kept the most of what the large
    # model knows on the zoo's qa.
    rules: tuple[str, ...] = ("plausible:expert:0.3:static:1.5", "plausible:either:0.1:static:1.0",
                              "nudge:0.5:static:1.0", "nudge:0.3", "keep:0.5:0.3:static:1.5",
                              "keep:0.1:0.1:static:1.0", "keep:0.3:0.1:static:1.0")
    frozen_rules: tuple[str, ...] = ("plausible:expert:0.3:static:1.5", "nudge:0.5:static:1.0",
                                     "keep:0.5:0.3:static:1.5", "keep:0.1:0.1:static:1.0")
    grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # fixed weights tried on the validation split
    max_new_tokens: int = 16
    batch_size: int = 8
    dtype: str = "float32"
    n_test: int | None = None  # None: the whole test split
    n_validation: int | None = None


def _records(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def _run_method(fuser, rows: list[dict], method: str, bc: BenchConfig) -> tuple[dict, list]:
    t0 = time.perf_counter()
    gens = fuser.generate([r["prompt"] for r in rows], solver=method, max_new_tokens=bc.max_new_tokens,
                          stop=["\n"], batch_size=bc.batch_size, trace=method.startswith("dynamic"))
    seconds = time.perf_counter() - t0
    scores = [score(g.text, r["answer"]) for g, r in zip(gens, rows)]
    n = len(rows)
    rec = {k: sum(s[k] for s in scores) / n for k in ("format", "correct", "both")}
    rec.update(n=n, seconds=round(seconds, 2), tokens=sum(len(g.token_ids) for g in gens),
               tokens_per_s=sum(len(g.token_ids) for g in gens) / seconds)
    if method.startswith("dynamic"):
        steps = max((len(g.weights) for g in gens), default=0)
        mean = []
        for t in range(steps):
            w = [g.weights[t][0] for g in gens if len(g.weights) > t]
            mean.append(round(sum(w) / len(w), 3))
        rec["weights_mean_by_step"] = mean
        rec["weights_first"] = [round(w[0], 3) for w in gens[0].weights]
    answers = [{"id": r["id"], "answer": r["answer"], "text": g.text, **s} for g, r, s in zip(gens, rows, scores)]
    return rec, answers


class _TaskRun:
    """One task's runs: the fuser is loaded on the first method not already in real.jsonl."""

    def __init__(self, root: Path, task: str, jsonl: Path, done: set, bc: BenchConfig, log: Callable[[str], None]):
        self.root, self.task, self.jsonl, self.done, self.bc, self.log = root, task, jsonl, done, bc, log
        self.fuser = None
        rows = {s: read_jsonl(root / "data" / task / f"{s}.jsonl") for s in ("validation", "test")}
        self.splits = {"validation": rows["validation"][: bc.n_validation], "test": rows["test"][: bc.n_test]}

    def written(self, split: str, method: str) -> dict:
        return next(r for r in _records(self.jsonl) if (r["task"], r["split"], r["method"]) == (self.task, split, method))

    def append(self, rec: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def run(self, split: str, method: str, label: str | None = None) -> dict:
        label = label or method
        if (self.task, split, label) in self.done:
            return self.written(split, label)
        if self.fuser is None:
            from ..engine.fuser import Fuser
            self.fuser = Fuser.from_pretrained(str(self.root / "models" / "large"), str(self.root / "models" / "small"),
                                               {self.task: str(self.root / "experts" / self.task)},
                                               load={"dtype": self.bc.dtype})
        rec, answers = _run_method(self.fuser, self.splits[split], method, self.bc)
        rec = {"task": self.task, "split": split, "method": label, "solver": method, **rec, "answers": answers[:8],
               "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        self.append(rec)
        self.log(f"bench real: {self.task} {split} {label}: format {rec['format']:.2f} correct "
                 f"{rec['correct']:.2f} both {rec['both']:.2f} ({rec['tokens_per_s']:.1f} tok/s)")
        return rec

    def all(self) -> None:
        """The validation grid, every method on test, then the weight chosen on validation."""
        bc = self.bc
        val = {a: self.run("validation", f"static:{a}") for a in bc.grid}
        best = max(bc.grid, key=lambda a: (val[a]["both"], val[a]["format"], -abs(a - 0.5)))
        for method in bc.methods:
            self.run("test", method)
        same = next((m for m in bc.methods if m.startswith("static:") and float(m.split(":")[1]) == best), None)
        if same is None:
            self.run("test", f"static:{best}", label="static:val-best")
        elif (self.task, "test", "static:val-best") not in self.done:  # already measured: copy it
            self.append({**self.written("test", same), "method": "static:val-best", "copied_from": same})
            self.log(f"bench real: {self.task} test static:val-best is {same} (a = {best} chosen on validation)")
        for method in bc.rules:
            self.run("validation", method)
        for method in bc.frozen_rules:
            self.run("test", method)


def bench_real(root: str | Path, out: str | Path, tasks: tuple[str, ...] | None = None,
               bc: BenchConfig | None = None, log: Callable[[str], None] = print,
               command: str | None = None) -> list[dict]:
    """Every method on every task's test prompts; a fixed weight chosen on validation. Appends to
    OUT/real.jsonl per (task, split, method) and skips those already there; writes OUT/real.md.
    `command` (as typed) is kept with the run's start and duration in OUT/real.runs.json."""
    started, t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    root, out = Path(root), Path(out)
    bc = bc or BenchConfig()
    tasks = tasks or tuple(json.loads((root / "config.json").read_text())["tasks"])
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "real.jsonl"
    done = {(r["task"], r["split"], r["method"]) for r in _records(jsonl)}
    for task in tasks:
        _TaskRun(root, task, jsonl, done, bc, log).all()
    records = _records(jsonl)
    if len(records) == len(done):
        log(f"bench real: nothing measured: {jsonl} already holds every (task, split, method) of this run; "
            "give another --out (or delete it) to measure again")
    runs_file = out / "real.runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    if len(records) > len(done):  # a run that only found its results already written is not one
        runs.append({"command": command or "bench_real(...)", "started": started,
                     "seconds": round(time.perf_counter() - t_start, 1), "records": len(records) - len(done)})
        runs_file.write_text(json.dumps(runs, indent=1))
    write_report(root, out, records)
    return records


RULE_KINDS = ("plausible", "nudge", "keep", "route")  # engine/rules.py (issue 24)


def goals(records: list[dict]) -> list[str]:
    """The issue's three goals, each stated with the figures it was judged on."""
    test = [r for r in records if r["split"] == "test"]
    tasks = sorted({r["task"] for r in test})
    by = {(r["task"], r["method"]): r for r in test}
    fused = [m for m in {r["method"] for r in test} if m.startswith(("static", "dynamic", *RULE_KINDS))]
    if not tasks or not fused:
        return []
    mean = lambda m, k="both": sum(by[(t, m)][k] for t in tasks if (t, m) in by) / len(tasks)
    best = max(fused, key=mean)
    lines = []
    ok = mean(best) > max(mean("large"), mean("expert")) if ("large" in {m for _, m in by}) else False
    lines.append(f"- best fused method on correct-and-in-format ({best}, mean {100 * mean(best):.0f}%) beats both "
                 f"the large model alone ({100 * mean('large'):.0f}%) and the expert alone "
                 f"({100 * mean('expert'):.0f}%): **{'yes' if ok else 'no'}**")
    if "dynamic" in fused and "static:1.0" in fused:
        d, s = mean("dynamic"), mean("static:1.0")
        lines.append(f"- dynamic fusion ({100 * d:.0f}%) not below proxy-tuning a=1 ({100 * s:.0f}%) on the bench "
                     f"average: **{'yes' if d >= s else 'no'}**")
    speed = lambda m: sum(by[(t, m)]["tokens_per_s"] for t in tasks) / len(tasks)
    for m in ("static:1.0", "dynamic"):
        if m in fused:
            slow = speed("large") / speed(m)
            lines.append(f"- {m} tokens/s at batch 8 within 1.5x of the large model alone: {speed(m):.1f} vs "
                         f"{speed('large'):.1f}, {slow:.2f}x slower: **{'yes' if slow <= 1.5 else 'no'}**")
    return lines


def write_report(root: Path, out: Path, records: list[dict]) -> Path:
    measure_file = root / "measure.json"
    m = json.loads(measure_file.read_text()) if measure_file.exists() else None
    timings = json.loads((root / "timings.json").read_text()) if (root / "timings.json").exists() else {}
    lines = ["# Real model bench: SmolLM2-135M-Instruct (GGUF) and a distilled small model",
             "", "Written by `logitfusion bench real` from real.jsonl (see docs/real.md for how it was built).", ""]
    if m:
        lines += ["## The models", "",
                  (f"ms / decoding step: measured once by the build's `measure` step ({m.get('measured', 'date not recorded')}), "
                   "on that machine at that load, not by this bench; measure again with `logitfusion real build "
                   f"--root {root} --only measure`. Tokens/s below are this bench's own."), "",
                  "| model | layers | parameters | ppl held-out task text | ppl unseen English | ms / decoding step (batch 8, at build) |",
                  "|---|---|---|---|---|---|"]
        for name in ("large", "small"):
            r = m[name]
            lines.append(f"| {name} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | {r['ppl_heldout']:.1f} | "
                         f"{r['ppl_general']:.1f} | {r['step_ms']:.1f} |")
        q = m["ratio"]
        lines += ["", (f"small / large: perplexity {q['ppl_heldout']:.2f}x on held-out task text (target <= 2x), "
                       f"{q['ppl_general']:.2f}x on unseen English (target <= 4x); cost per step {q['step_cost']:.2f}x."),
                  (f"Distillation text: {m['tokens']['train']:,} tokens; held-out {m['tokens']['heldout']:,}; "
                   f"unseen English {m['tokens']['general']:,}."), ""]
    if timings:
        lines += ["Build times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    for task in sorted({r["task"] for r in records}):
        lines += [f"## {task}", "", TASK_NOTES.get(task, ""), ""]
        val = [r for r in records if r["task"] == task and r["split"] == "validation"]
        grid = [r for r in val if r["method"].startswith("static:")]
        if grid:
            lines += ["Validation (choosing the fixed weight): " + ", ".join(
                f"a={r['method'].split(':')[1]}: both {100 * r['both']:.0f}%" for r in grid), ""]
        if len(grid) < len(val):
            lines += ["Validation, the weight rules of issue 24: " + ", ".join(
                f"{r['method']}: both {100 * r['both']:.0f}%" for r in val if r not in grid), ""]
        n = next((r["n"] for r in records if r["task"] == task and r["split"] == "test"), 0)
        lines += [f"Test split: {n} prompts (greedy).", "",
                  "| method | in format | correct | correct and in format | tokens/s (batch 8) |", "|---|---|---|---|---|"]
        for r in records:
            if r["task"] == task and r["split"] == "test":
                name = r["method"] + (f" (= {r['solver']})" if r["method"] != r["solver"] else "")
                lines.append(f"| {name} | {100 * r['format']:.0f}% | {100 * r['correct']:.0f}% | "
                             f"{100 * r['both']:.0f}% | {r['tokens_per_s']:.1f} |")
        shown = [r for r in records if r["task"] == task and r["split"] == "test" and r["method"] != "static:val-best"]
        if shown and shown[0].get("answers"):
            lines += ["", "First test questions, answered by each method:", "",
                      "| question | gold | " + " | ".join(r["method"] for r in shown) + " |",
                      "|---|---|" + "---|" * len(shown)]
            rows = read_jsonl(root / "data" / task / "test.jsonl") if (root / "data" / task / "test.jsonl").exists() else []
            question = {r["id"]: r["question"] for r in rows}
            for i, a in enumerate(shown[0]["answers"][:3]):
                cells = [_cell(r["answers"][i]["text"]) if i < len(r["answers"]) else "" for r in shown]
                lines.append(f"| {question.get(a['id'], a['id'])} | {a['answer']} | " + " | ".join(cells) + " |")
        dyn = next((r for r in records if r["task"] == task and r["split"] == "test" and "weights_mean_by_step" in r), None)
        if dyn:
            lines += ["", "Dynamic weight of the expert, mean over prompts, by step: "
                      + " ".join(f"{w:.2f}" for w in dyn["weights_mean_by_step"])]
        lines.append("")
    g = goals(records)
    if g:
        lines += ["## Goals of issue 13", "", *g, ""]
    runs_file = out / "real.runs.json"
    cfg_file = root / "config.json"
    lines += ["## How it was made", ""]
    if cfg_file.exists():
        c = json.loads(cfg_file.read_text())
        lines.append(f"- build: `logitfusion real build --root {root}` (student layers {c['student_layers']}, "
                     f"{c['teacher_prompts']} teacher prompts, "
                     f"{c['distil_max_steps'] or str(c['distil_epochs']) + ' epochs of'} distillation steps at lr {c['distil_lr']}, "
                     f"{sum(timings.values()) / 60:.0f} min in all on this machine)")
    for r in json.loads(runs_file.read_text()) if runs_file.exists() else []:
        lines.append(f"- `{r['command']}`: started {r['started']}, {r['seconds'] / 60:.1f} min")
    lines.append("")
    path = out / "real.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(text: str) -> str:
    return "`" + text.strip().replace("|", "\\|").replace("`", "'").replace("\n", " ") + "`" if text.strip() else "(empty)"


def side_by_side(root: str | Path, n: int = 3, methods=("large", "expert", "static:1.0", "dynamic"),
                 max_new_tokens: int = 16) -> list[dict]:
    """The first n test questions of each task answered by each method (for the demo)."""
    from ..engine.fuser import Fuser
    root = Path(root)
    cfg = json.loads((root / "config.json").read_text())
    rows = []
    for task in cfg["tasks"]:
        test = read_jsonl(root / "data" / task / "test.jsonl")[:n]
        fuser = Fuser.from_pretrained(str(root / "models" / "large"), str(root / "models" / "small"),
                                      {task: str(root / "experts" / task)})
        for method in methods:
            gens = fuser.generate([r["prompt"] for r in test], solver=method, max_new_tokens=max_new_tokens,
                                  stop=["\n"], batch_size=n)
            for r, g in zip(test, gens):
                rows.append({"task": task, "question": r["question"], "gold": r["answer"], "method": method,
                             "text": g.text.strip(), **score(g.text, r["answer"])})
    return rows
