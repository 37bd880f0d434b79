"""`logitfusion bench real` (bench/real.py builds what it runs on): large alone, expert alone,
proxy-tuning (a = 1), fixed a = 0.5, the fixed weight chosen on the validation split, and dynamic
fusion on each task's test prompts; format and correctness scored apart; real.jsonl appended per
(task, split, method, engine), real.md written from it; and the side-by-side answers of the demo.

`engine="vllm"` runs the same bench with the large model in vLLM (logitfusion.vllm, VLLMFuser; one
vLLM engine per task, its expert's): its records go to the same real.jsonl with `"engine": "vllm"`
(records without the field are the HF engine's), its report to real-vllm.md. A method the vLLM
engine refuses (one reading models the recipe's solver does not run) is recorded as skipped with
its reason; `expert` and `nudge:0.3` read some of them and run, and dynamic's weight trace comes
back through the processor's trace files as with the HF engine."""

from __future__ import annotations

import json
import os
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
    engine: str = "hf"  # or "vllm": the large model in vLLM (VLLMFuser)
    # vLLM's settings as in its CPU tests: float32 (dtype), eager, a small context, seed 0
    max_model_len: int = 512


ENGINES = ("hf", "vllm")


def engine_of(rec: dict) -> str:
    """The engine a record was measured on (records written before the field existed: hf)."""
    return rec.get("engine", "hf")


def report_name(engine: str) -> str:
    return "real.md" if engine == "hf" else f"real-{engine}.md"


def _records(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def _run_method(fuser, rows: list[dict], method: str, bc: BenchConfig) -> tuple[dict, list]:
    t0 = time.perf_counter()
    trace = method.startswith("dynamic")
    gens = fuser.generate([r["prompt"] for r in rows], solver=method, max_new_tokens=bc.max_new_tokens,
                          stop=["\n"], batch_size=bc.batch_size, trace=trace)
    seconds = time.perf_counter() - t0
    scores = [score(g.text, r["answer"]) for g, r in zip(gens, rows)]
    n = len(rows)
    rec = {k: sum(s[k] for s in scores) / n for k in ("format", "correct", "both")}
    rec.update(n=n, seconds=round(seconds, 2), tokens=sum(len(g.token_ids) for g in gens),
               tokens_per_s=sum(len(g.token_ids) for g in gens) / seconds)
    if trace:
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
        return next(r for r in _records(self.jsonl) if (r["task"], r["split"], r["method"]) == (self.task, split, method)
                    and engine_of(r) == self.bc.engine)

    def load(self):
        root, bc = self.root, self.bc
        large, small, expert = (str(root / "models" / "large"), str(root / "models" / "small"),
                                str(root / "experts" / self.task))
        if bc.engine == "hf":
            from ..engine.fuser import Fuser
            return Fuser.from_pretrained(large, small, {self.task: expert}, load={"dtype": bc.dtype})
        from ..vllm.backend import load, quiet_vllm
        quiet_vllm()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (vLLM's CPU default is larger)
        return load({"large": {"path": large}, "small": {"path": small}, "experts": [{"name": self.task, "path": expert}],
                     "load": {"dtype": bc.dtype},
                     "backend": {"kind": "vllm", "enforce_eager": True, "max_model_len": bc.max_model_len,
                                 "max_num_seqs": bc.batch_size, "dtype": bc.dtype, "options": {"seed": 0}}})

    def refused(self, method: str) -> str | None:
        """Why this engine does not run the method (None: it does)."""
        if self.bc.engine == "hf":
            return None
        from ..engine.solvers import SolverError
        try:
            self.fuser.method(method)
        except SolverError as e:
            return str(e)
        return None

    def close(self) -> None:
        if self.fuser is not None and hasattr(self.fuser, "close"):
            self.fuser.close()
        self.fuser = None

    def append(self, rec: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def run(self, split: str, method: str, label: str | None = None) -> dict:
        label = label or method
        if (self.task, split, label) in self.done:
            return self.written(split, label)
        if self.fuser is None:
            self.fuser = self.load()
        head = {"task": self.task, "split": split, "method": label, "solver": method, "engine": self.bc.engine}
        why = self.refused(method)
        if why is not None:
            rec = {**head, "skipped": why, "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
            self.append(rec)
            self.log(f"bench real: {self.task} {split} {label}: skipped on {self.bc.engine}: {why}")
            return rec
        rec, answers = _run_method(self.fuser, self.splits[split], method, self.bc)
        rec = {**head, **rec, "answers": answers[:8], "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        self.append(rec)
        self.log(f"bench real: {self.task} {split} {label}{'' if self.bc.engine == 'hf' else ' (' + self.bc.engine + ')'}: format {rec['format']:.2f} correct "
                 f"{rec['correct']:.2f} both {rec['both']:.2f} ({rec['tokens_per_s']:.1f} tok/s)")
        return rec

    def all(self) -> None:
        """The validation grid, every method on test, then the weight chosen on validation."""
        try:
            self._all()
        finally:
            self.close()

    def _all(self) -> None:
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
    if bc.engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {bc.engine!r}")
    tasks = tasks or tuple(json.loads((root / "config.json").read_text())["tasks"])
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "real.jsonl"
    mine = lambda: [r for r in _records(jsonl) if engine_of(r) == bc.engine]  # noqa: E731
    done = {(r["task"], r["split"], r["method"]) for r in mine()}
    for task in tasks:
        _TaskRun(root, task, jsonl, done, bc, log).all()
    records = mine()
    if len(records) == len(done):
        log(f"bench real: nothing measured: {jsonl} already holds every (task, split, method) of this run; "
            "give another --out (or delete it) to measure again")
    runs_file = out / "real.runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    if len(records) > len(done):  # a run that only found its results already written is not one
        runs.append({"command": command or "bench_real(...)", "started": started, "engine": bc.engine,
                     "seconds": round(time.perf_counter() - t_start, 1), "records": len(records) - len(done)})
        runs_file.write_text(json.dumps(runs, indent=1))
    write_report(root, out, records, engine=bc.engine)
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
    ran = {m for _, m in by}
    alone = [m for m in ("large", "expert") if m in ran]  # an engine may not run one (vLLM: expert)
    ok = mean(best) > max(mean(m) for m in alone) if "large" in alone else False
    said = {"large": "the large model alone", "expert": "the expert alone"}
    lines.append(f"- best fused method on correct-and-in-format ({best}, mean {100 * mean(best):.0f}%) beats "
                 + ("both " if len(alone) == 2 else "")
                 + " and ".join(f"{said[m]} ({100 * mean(m):.0f}%)" for m in alone)
                 + ("" if "expert" in alone else " (the expert alone not run on this engine)")
                 + f": **{'yes' if ok else 'no'}**")
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


def write_report(root: Path, out: Path, records: list[dict], engine: str = "hf") -> Path:
    """OUT/real.md (real-ENGINE.md for another engine) from one engine's records."""
    records = [r for r in records if engine_of(r) == engine]
    skipped = [r for r in records if "skipped" in r]
    records = [r for r in records if "skipped" not in r]
    timings = json.loads((root / "timings.json").read_text()) if (root / "timings.json").exists() else {}
    lines = ["# Real model bench: SmolLM2-135M-Instruct (GGUF) and a distilled small model"
             + ("" if engine == "hf" else f", the large model in {engine}"),
             "", f"Written by `logitfusion bench real{'' if engine == 'hf' else ' --engine ' + engine}` from real.jsonl "
             f"(its records with engine {engine}; see docs/real.md for how it was built).", ""]
    lines += _models_section(root)
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
        gone = [r for r in skipped if r["task"] == task]
        if gone:
            lines += ["", f"Not run on {engine}: " + "; ".join(f"{r['split']} {r['method']} ({r['skipped'].split('; ')[0]})"
                                                               for r in gone)]
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
        if r.get("engine", "hf") != engine:
            continue
        lines.append(f"- `{r['command']}`: started {r['started']}, {r['seconds'] / 60:.1f} min")
    lines.append("")
    path = out / report_name(engine)
    path.write_text("\n".join(lines) + "\n")
    return path


def _models_section(root: Path) -> list[str]:
    """The report's table of the build's two models (none before the build measured them)."""
    measure_file = root / "measure.json"
    m = json.loads(measure_file.read_text()) if measure_file.exists() else None
    lines: list[str] = []
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
    return lines


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
