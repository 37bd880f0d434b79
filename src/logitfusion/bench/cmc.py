"""Cross-model control on the zoo (issue 5): the zoo's delta models and `logitfusion bench cmc`.

Under a zoo ROOT (see zoo.py) this module
- trains `deltas/instruct`: a tiny delta beside the frozen template `models/large`, on the zoo's
  multi-task training data (the four seen tasks; mmlu stays unseen);
- writes `data/unlearn/`: the world's people split into a forget set (QA questions about a fixed
  set of people) and a retain set (QA questions about the others), derived from the world seed
  alone, and trains `deltas/unlearn` from the instruct delta by gradient difference;
- measures the deltas plugged into three models (the template, the smaller same-vocabulary
  `models/small`, the other-vocabulary `models/large-alt` through `mapping: auto`), every cell
  through the one engine (lm-eval via `evaluation.FusedLM`, or `Fuser.generate`), appending each
  cell to `cmc.jsonl` as it finishes so that a rerun only does what is missing.

Every step is resumable: a finished delta is not retrained (delta.train_delta's marker), the
split files are rewritten only when missing, and cells already in the JSONL are skipped.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import world, zoo
from ..eval.records import read_jsonl, reproduce_command

TASKS = list(world.TASKS)
TASK_NAMES = {t: f"zoo_{t}" for t in TASKS}
# The models a delta is plugged into: (label, model dir under ROOT, what it is to the template).
TARGETS = [("large", "models/large", "the template itself"),
           ("large-b", "models/large-b", "another large base, same vocabulary (other shape and seed)"),
           ("small", "models/small", "a smaller model, same vocabulary"),
           ("large-alt", "models/large-alt", "same size, another tokenizer (mapping: auto)")]
INSTRUCT_SPEC = "hidden=48,layers=2"
N_FORGET = 20  # people whose facts the unlearning delta forgets
N_RETAIN = 100  # people whose facts it is trained to keep (everyone else is held out)
UNLEARN_SEED = 5  # picks the forget people; fixed so the split never changes between builds


class CmcBenchError(ValueError):
    pass


# ---------------------------------------------------------------- deltas

def train_instruct(root: str | Path, epochs: float = 8.0, lr: float = 2e-3, log: Callable = print):
    """deltas/instruct: a fresh delta trained on the zoo's multi-task data beside models/large.
    8 epochs at 2e-3: a delta this small learns the worked math solutions slowly (3 epochs at 1e-3
    still left the template near 0 on math)."""
    from ..train.delta import DeltaConfig, train_delta
    from .zoo import multitask_data

    root = Path(root)
    data = multitask_data(root / "data")  # written by the zoo build; made here if missing
    log("cmc: deltas/instruct ...")
    return train_delta(DeltaConfig(template=str(root / "models" / "large"), delta=INSTRUCT_SPEC, data=str(data),
                                   out=str(root / "deltas" / "instruct"), epochs=epochs, lr=lr, max_length=256,
                                   batch_size=8, save_steps=100))


def _fact_records(w: world.World, p: world.Person) -> list[dict]:
    """A person's three facts as prose completions, in the sentence forms of the pretraining text
    (so every zoo base knows them without any instruction format)."""
    return [{"prompt": prompt, "completion": f" {answer}", "answer": answer, "key": p.name}
            for prompt, answer in ((f"{p.name} grew up in the town of", p.city),
                                   (f"{p.name} was born in the year", str(p.year)),
                                   (f"{p.name} worked as a", p.job))]


def unlearn_split(seed: int = 0) -> dict[str, list[dict]]:
    """The unlearning split of the world of `seed`, from the world alone (no files):
      forget   the three facts (birth town, year, job) of N_FORGET people, as prose completions;
      retain   the facts of N_RETAIN other people (what gradient difference descends on);
      heldout  the facts of every remaining person (trained on by no delta, none forgotten).
    The three sets name disjoint people. Prose, not the QA format: the bases learnt these facts in
    pretraining, so forgetting removes knowledge the models really have (as TOFU forgets facts the
    model was fine-tuned on); the QA format is the instruct delta's, scored in the task table."""
    w = world.make_world(seed)
    people = list(w.people)
    random.Random(seed + UNLEARN_SEED).shuffle(people)
    groups = {"forget": people[:N_FORGET], "retain": people[N_FORGET:N_FORGET + N_RETAIN],
              "heldout": people[N_FORGET + N_RETAIN:]}
    split = {name: [r for p in group for r in _fact_records(w, p)] for name, group in groups.items()}
    # Shuffled rows: gradient difference pairs forget row i with retain row i (cycled), and --limit
    # then still covers all three kinds of fact.
    for name, rows in split.items():
        random.Random(seed + UNLEARN_SEED).shuffle(rows)
    return split | {"people": sorted(p.name for p in groups["forget"])}


def write_unlearn_split(root: str | Path, seed: int = 0) -> Path:
    """ROOT/data/unlearn/{forget,retain,heldout}.jsonl and people.json (the forgotten names).
    Files are written once; a finished split is left alone (the unlearn delta's fingerprint
    hashes them)."""
    folder = Path(root) / "data" / "unlearn"
    if (folder / "people.json").exists():
        return folder
    split = unlearn_split(seed)
    folder.mkdir(parents=True, exist_ok=True)
    # Gradient difference pairs forget row i with retain row i, one pass over the forget rows per
    # epoch; forget_train repeats the forget rows so that every retain row gets paired each epoch
    # (with 60 forget rows alone, 240 of the 300 retain rows would never be seen).
    repeat = -(-len(split["retain"]) // len(split["forget"]))
    files = {"forget": split["forget"], "retain": split["retain"], "heldout": split["heldout"],
             "forget_train": split["forget"] * repeat}
    for name, rows in files.items():
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # people.json last: its presence marks a complete split
    (folder / "people.json").write_text(json.dumps({"seed": seed, "forget": split["people"]}, indent=1))
    return folder


def train_unlearn(root: str | Path, epochs: float = 10.0, lr: float = 1e-3, log: Callable = print):
    """deltas/unlearn: a fresh delta (zero output at the start) trained by gradient difference beside
    the template: ascend on the forget facts, descend on the retain facts. Fresh rather than from
    the instruct delta, because the instruct delta alone already lowers the template's prose
    recall (see the report): starting from it would mix two effects."""
    from ..train.delta import DeltaConfig, train_delta

    root = Path(root)
    folder = write_unlearn_split(root)
    log("cmc: deltas/unlearn ...")
    return train_delta(DeltaConfig(template=str(root / "models" / "large"), delta=INSTRUCT_SPEC,
                                   objective="unlearn", forget=str(folder / "forget_train.jsonl"),
                                   retain=str(folder / "retain.jsonl"), out=str(root / "deltas" / "unlearn"),
                                   epochs=epochs, lr=lr, max_length=64, batch_size=8, save_steps=100))


def prepare(root: str | Path, log: Callable = print,
            on_trained: Callable[[str, float], None] | None = None) -> dict[str, float]:
    """Everything the bench needs that the zoo build does not make (each step skips when done).
    Returns the training seconds of the deltas trained by this call; `on_trained(name, seconds)`
    hears of each as it ends, so its time is kept even if the next one fails."""
    seconds = {}
    for name, step in (("instruct", train_instruct), ("unlearn", train_unlearn)):
        t0 = time.perf_counter()
        result = step(root, log=log)
        if not result.skipped:
            seconds[name] = round(time.perf_counter() - t0, 1)
            if on_trained:
                on_trained(name, seconds[name])
    return seconds


# ---------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    kind: str  # "task" (a zoo task through lm-eval) or "unlearn" (QA exact match on a split file)
    target: str  # label of the model the delta is plugged into (TARGETS)
    variant: str  # "alone", or the delta's name (instruct, unlearn)
    data: str  # zoo task (math, qa, ...) or unlearn split (forget, retain, heldout)
    recipe: str  # JSON of the recipe dict: cells with the same recipe share the loaded models
    method: str  # solver spec: "large" (the model alone) or "delta"

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.target}|{self.variant}|{self.data}"


def recipe(model: str | Path, delta: str | Path | None = None, strength: float = 1.0,
           mapping: str | None = None, vocab_cache: str | Path | None = None) -> str:
    """A recipe dict (as JSON) for `model`, with a delta section when `delta` is given."""
    data: dict = {"large": {"path": str(model)}, "solver": {"kind": "large"},
                  "generation": {"max_new_tokens": 64}}
    if delta is not None:
        data["delta"] = {"path": str(delta), "strength": strength} | ({"mapping": mapping} if mapping else {})
        data["solver"] = {"kind": "delta"}
        if vocab_cache:
            data["load"] = {"vocab_cache": str(vocab_cache)}
    return json.dumps(data, sort_keys=True)


def _same_tokenizer(a: Path, b: Path) -> bool:
    from ..engine.models import LoadOptions, load_tokenizer
    opts = LoadOptions()
    return load_tokenizer(str(a), "a", opts).get_vocab() == load_tokenizer(str(b), "b", opts).get_vocab()


def cells(root: str | Path, tasks: list[str] | None = None, targets: list[str] | None = None) -> list[Cell]:
    """Every cell of the bench. A target whose tokenizer differs from the template's gets
    `mapping: auto` (checked on the files, not assumed from the name)."""
    root = Path(root)
    tasks = tasks or TASKS
    template, deltas = root / "models" / "large", root / "deltas"
    cache = deltas / "vocab-cache"
    out: list[Cell] = []
    for label, path, _ in TARGETS:
        if targets and label not in targets:
            continue
        model = root / path
        if not (model / "config.json").exists():
            init = {"large-alt": "--only init-alt ", "large-b": "--only init-b "}.get(label, "")
            prose = path.replace("models/", "prose/", 1)  # its prose stage comes first (docs/zoo.md)
            raise CmcBenchError(f"{model} is missing: build it with `logitfusion zoo build --root {root} "
                                f"{init}--only {prose} --only {path}`")
        mapping = None if _same_tokenizer(model, template) else "auto"
        instruct = recipe(model, deltas / "instruct", mapping=mapping, vocab_cache=cache)
        unlearn = recipe(model, deltas / "unlearn", mapping=mapping, vocab_cache=cache)
        for t in tasks:  # the model alone shares the recipe (and the loaded models) with its delta
            out += [Cell("task", label, "alone", t, instruct, "large"),
                    Cell("task", label, "instruct", t, instruct, "delta")]
        for s in ("forget", "retain", "heldout"):
            out += [Cell("unlearn", label, "alone", s, instruct, "large"),
                    Cell("unlearn", label, "instruct", s, instruct, "delta"),
                    Cell("unlearn", label, "unlearn", s, unlearn, "delta")]
    return out


def first_word(text: str) -> str:
    """The fact a prose completion states: its first word, without trailing punctuation
    (" Drouklu in Drearous." -> "Drouklu")."""
    words = text.split()
    return words[0].rstrip(".,;:") if words else ""


def fact_accuracy(fuser, method: str, rows: list[dict], batch_size: int = 16) -> tuple[float, list[str]]:
    """Greedy completions through the engine (8 tokens, stop at a full stop or newline), scored by
    exact match of their first word with the fact. Returns (accuracy, generations)."""
    gens = fuser.generate([r["prompt"] for r in rows], solver=method, max_new_tokens=8, stop=[".", "\n"],
                          temperature=0.0, batch_size=batch_size)
    texts = [g.text for g in gens]
    return sum(first_word(t) == r["answer"] for t, r in zip(texts, rows)) / len(rows), texts


def run_cells(todo: list[Cell], writer, root: Path, limit: int | None = None, batch_size: int = 16,
              progress: Callable | None = None) -> list[dict]:
    """Evaluate `todo` (models loaded once per recipe), writing each record as it finishes."""
    import gc
    import logging

    from ..eval import lm as ev
    from ..eval.matrix import run_task

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    task_cells = [c for c in todo if c.kind == "task"]
    manager = ev.task_manager(sorted({TASK_NAMES[c.data] for c in task_cells}), [zoo.TASKS_DIR],
                              metadata={"data_dir": str(root / "data")}) if task_cells else None
    by_recipe: dict[str, list[Cell]] = {}
    for c in todo:
        by_recipe.setdefault(c.recipe, []).append(c)
    out, done = [], 0
    for rec_json, group in by_recipe.items():
        lm = ev.FusedLM(recipe=ev.Recipe.from_dict(json.loads(rec_json)), batch_size=batch_size)
        for c in group:
            if progress:
                progress(done, len(todo), f"{c.target} {c.variant} on {c.data}")
            common = {"key": c.key, "kind": c.kind, "target": c.target, "variant": c.variant, "data": c.data}
            if c.kind == "task":
                lm.set_method(c.method)
                rec = run_task(lm, c.method, TASK_NAMES[c.data], manager, limit=limit) | common
            else:
                rows = read_jsonl(root / "data" / "unlearn" / f"{c.data}.jsonl", limit=limit or None)
                t0 = time.perf_counter()
                acc, texts = fact_accuracy(lm.fuser, c.method, rows, batch_size)
                rec = common | {"method": c.method, "metric": "exact_match", "value": acc, "n": len(rows),
                                "limit": limit, "seconds": round(time.perf_counter() - t0, 2),
                                "examples": [[r["prompt"], r["answer"], t] for r, t in zip(rows[:3], texts)]}
            writer.write([rec])
            out.append(rec)
            done += 1
        del lm
        gc.collect()
    if progress:
        progress(done, len(todo), "done")
    return out


def mapping_record(root: Path) -> dict:
    """PM-MinED between the zoo's two tokenizers, both directions (vocab.build_map's counts)."""
    from ..engine.vocab import build_map
    large, alt = root / "models" / "large", root / "models" / "large-alt"
    out = {"key": "mapping", "kind": "mapping"}
    for name, user, delta in (("large-alt -> large", alt, large), ("large -> large-alt", large, alt)):
        vmap = build_map(str(user), str(delta))
        out[name] = {"counts": vmap.counts, "size": len(vmap), "seconds": vmap.meta["seconds"],
                     "examples": {k: v[:3] for k, v in vmap.examples.items()}}
    return out


def run(root: str | Path, out_dir: str | Path, limit: int | None = 100, batch_size: int = 16,
        tasks: list[str] | None = None, targets: list[str] | None = None, train: bool = True,
        progress: Callable | None = None, log: Callable = print) -> list[dict]:
    """Train what is missing (unless train=False), then evaluate every cell not yet in cmc.jsonl."""
    from ..eval.records import RecordWriter, read_keyed

    start = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    if not (root / "models" / "large" / "config.json").exists():
        raise CmcBenchError(f"{root} holds no zoo (models/large is missing): run `logitfusion zoo build --root {root}`")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cmc.jsonl"
    writer = RecordWriter(path, key="key")  # drops a line cut short by a crash
    def kept(name: str, seconds: float) -> None:
        writer.write([{"key": f"training|{name}", "kind": "training", "delta": name, "seconds_train": seconds}])

    trained = prepare(root, log=log, on_trained=kept) if train else {}
    for d in ("instruct", "unlearn"):
        if not (root / "deltas" / d / "delta.json").exists():
            raise CmcBenchError(f"{root / 'deltas' / d} is missing; run without --no-train to train it")
    records = read_keyed(path)
    if "mapping" not in records and (not targets or "large-alt" in targets):
        rec = mapping_record(root)
        writer.write([rec])
        records["mapping"] = rec
    todo = [c for c in cells(root, tasks, targets) if c.key not in records]
    for rec in run_cells(todo, writer, root, limit, batch_size, progress):
        records[rec["key"]] = rec
    # One record per invocation that did work: a resumed bench took the sum of its runs.
    if todo or trained:
        runs = sum(r.get("kind") == "run" for r in records.values())
        rec = {"key": f"run|{runs + 1}", "kind": "run", "cells": len(todo), "trained": sorted(trained),
               "seconds": round(time.perf_counter() - start, 1)}
        writer.write([rec])
        records[rec["key"]] = rec
    return list(records.values())


# ---------------------------------------------------------------- report

def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def _value(records: dict[str, dict], kind: str, target: str, variant: str, data: str) -> float | None:
    return records.get(f"{kind}|{target}|{variant}|{data}", {}).get("value")


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and None not in values else None


def report(records_list: list[dict], root: Path, command: str = "") -> str:
    records = {r["key"]: r for r in records_list}
    targets = [t for t, _, _ in TARGETS if any(r.get("target") == t for r in records_list)]
    lines = _intro(records_list, root, targets)
    lines += _task_section(records, records_list, targets)
    if any(r.get("kind") == "unlearn" for r in records_list):
        lines += _unlearn_section(records, records_list, root, targets)
    if "mapping" in records:
        lines += _mapping_section(records["mapping"])
    lines += _reproduce_section(records_list, root, command)
    return "\n".join(lines) + "\n"


def _intro(records_list: list[dict], root: Path, targets: list[str]) -> list[str]:
    """What was measured on which models, and the deltas' sizes and training."""
    about = {label: what for label, _, what in TARGETS}
    lines = ["# Cross-model control on the zoo", "",
             "Every figure below was measured by the command at the end (greedy decoding through the engine; "
             "scores x100). The deltas were trained beside the frozen template `models/large` and are plugged, "
             "unchanged, into each model below:", ""]
    lines += [f"- **{t}** (`{dict((a, b) for a, b, _ in TARGETS)[t]}`): {about[t]}" for t in targets]
    lines += ["", f"Shapes: template {_shape(root / 'models' / 'large')}"
              + "".join(f", {t} {_shape(root / dict((a, b) for a, b, _ in TARGETS)[t])}" for t in targets
                        if t != "large") + ".", ""]
    sizes = []
    for d in ("instruct", "unlearn"):
        f = root / "deltas" / d / "model.safetensors"
        marker = root / "deltas" / d / "delta.json"
        if f.exists() and marker.exists():
            m = json.loads(marker.read_text())
            sizes.append(f"`deltas/{d}`: {f.stat().st_size / 1e6:.2f} MB, {m.get('global_step')} steps, "
                         f"final train loss {m.get('train_loss'):.3f}")
    trained = {r["delta"]: r["seconds_train"] for r in records_list if r.get("kind") == "training"}
    if trained:
        sizes.append("training time (CPU): " + ", ".join(f"{k} {v:.0f} s" for k, v in trained.items()))
    if sizes:
        lines += ["Deltas (both of spec `" + INSTRUCT_SPEC + "`, each trained from a fresh start): " +
                  "; ".join(sizes) + ".", ""]
    return lines


def _task_section(records: dict[str, dict], records_list: list[dict], targets: list[str]) -> list[str]:
    """The instruct delta's gain per (model, task); empty without task records."""
    tasks = [t for t in TASKS if any(r.get("kind") == "task" and r.get("data") == t for r in records_list)]
    if not tasks:
        return []
    metric = {t: next((r["metric"].split(",")[0] for r in records_list
                       if r.get("kind") == "task" and r.get("data") == t), "-") for t in tasks}
    limit = next((r.get("limit") for r in records_list if r.get("kind") == "task"), None)
    lines = ["## Instruction / task gain", "",
              "The instruct delta (trained on the multi-task data: math, qa, summ, truthful; mmlu unseen) at "
              "strength 1 vs the model alone, zoo test splits through lm-eval (`evaluation.FusedLM`), "
              + (f"first {limit} examples per task." if limit else "whole test splits."), ""]
    head = ["model", "method"] + [f"{t} ({metric[t]})" for t in tasks] + ["average"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    worse = []
    for t in targets:
        alone = [_value(records, "task", t, "alone", x) for x in tasks]
        fused = [_value(records, "task", t, "instruct", x) for x in tasks]
        gain = [None if a is None or f is None else f - a for a, f in zip(alone, fused)]
        for label, vals, fmt in (("alone", alone, _fmt), ("+ instruct delta", fused, _fmt),
                                 ("gain", gain, _signed)):
            lines.append("| " + " | ".join([t, label] + [fmt(v) for v in vals] + [fmt(_mean(vals))]) + " |")
        worse += [f"{t}/{x} ({_signed(g)})" for x, g in zip(tasks, gain) if g is not None and g < 0]
    lines += ["", ("The delta lowers the score on: " + ", ".join(worse) + ".") if worse
              else "The delta does not lower the score on any (model, task) cell.", ""]

    return lines


def _unlearn_section(records: dict[str, dict], records_list: list[dict], root: Path,
                     targets: list[str]) -> list[str]:
    """Forget / retain / heldout recall before and after the unlearn delta."""
    people = root / "data" / "unlearn" / "people.json"
    n_people = len(json.loads(people.read_text())["forget"]) if people.exists() else "?"
    lines = ["## Unlearning", "",
              f"`data/unlearn/` (from the world seed alone): the three facts (birth town, birth year, job) of "
              f"{n_people} people to **forget**, of {N_RETAIN} others to **retain** (the set gradient difference "
              "descends on), and of every remaining person **heldout** (no delta was trained on them), as "
              "prose completions such as `NAME grew up in the town of` -> ` TOWN`: the bases learnt these "
              "facts in pretraining, so this is knowledge the models really have. Greedy completion through "
              "`Fuser.generate`, exact match of the first word. *before* = the model alone, *after* = the "
              "model + the unlearn delta (a fresh delta trained by gradient difference beside the template). "
              "The instruct delta's row shows what a delta trained on task formats does to this recall.", ""]
    lines += ["| model | variant | forget | retain | heldout |", "|---|---|---|---|---|"]
    for t in targets:
        for v, label in (("alone", "before (model alone)"), ("unlearn", "after (+ unlearn delta)"),
                         ("instruct", "+ instruct delta")):
            vals = [_value(records, "unlearn", t, v, s) for s in ("forget", "retain", "heldout")]
            lines.append("| " + " | ".join([t, label] + [_fmt(x) for x in vals]) + " |")
    n = {s: next((r.get("n") for r in records_list if r.get("kind") == "unlearn" and r.get("data") == s), None)
         for s in ("forget", "retain", "heldout")}
    lines += ["", f"Questions per set: forget {n['forget']}, retain {n['retain']}, heldout {n['heldout']}.", ""]
    lines += _unlearn_verdicts(records, targets)
    # What "forgotten" looks like: gradient ascent leaves no plausible wrong answer, it derails.
    shown = [(t, records.get(f"unlearn|{t}|unlearn|forget", {}).get("examples", [])[:1]) for t in targets]
    lines += [f"- after, on a forget prompt ({t}): `{ex[0][0]}` -> `{ex[0][2].strip()}` (fact: {ex[0][1]})"
              for t, ex in shown if ex] + [""]
    return lines


def _mapping_section(m: dict) -> list[str]:
    """Counts and examples of the mapping between the zoo's two tokenizers."""
    lines = ["## Vocabulary mapping (PM-MinED)", "",
              "Between the zoo's two tokenizers (`vocab.build_map`): byte-level BPE of 1024 tokens "
              "(`models/large`, `models/small`) and SentencePiece-style BPE of 1200 tokens "
              "(`models/large-alt`). The bench uses the first direction (the user model is large-alt, the "
              "delta reads the template's tokens). For two real tokenizers (the Mistral files of "
              "`mistral-common`) see [vocab.md, Measured](../vocab.md#measured).", "",
              "| user -> delta | tokens | exact | approx | special | byte | unmapped | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for name in ("large-alt -> large", "large -> large-alt"):
        c = m[name]["counts"]
        lines.append(f"| {name} | {m[name]['size']} | " + " | ".join(str(c[k]) for k in
                     ("exact", "approx", "special", "byte", "unmapped")) + f" | {m[name]['seconds']} |")
    ex = m["large-alt -> large"]["examples"].get("approx", [])
    if ex:
        lines += ["", "Approximate examples (large-alt token -> template token): " +
                  ", ".join(f"`{u}` -> `{d}`" for _, u, _, d in ex) + "."]
    lines.append("")
    return lines


def _reproduce_section(records_list: list[dict], root: Path, command: str) -> list[str]:
    """The command, and the time of every run (kept in cmc.jsonl)."""
    total = sum(r.get("seconds", 0) for r in records_list if r.get("kind") in ("task", "unlearn"))
    lines = ["## Reproduce", "", *reproduce_command(command or f"logitfusion bench cmc --root {root} --out docs/results",
                                                    root),
             f"Evaluation time summed over all cells: {total / 60:.1f} minutes (one process, CPU)."]
    runs = sorted((r for r in records_list if r.get("kind") == "run"), key=lambda r: int(r["key"].split("|")[1]))
    for r in runs:
        trained = f", trained {', '.join(r['trained'])}" if r["trained"] else ""
        lines.append(f"- run {r['key'].split('|')[1]}: {r['seconds'] / 60:.1f} minutes ({r['cells']} cells{trained}; "
                     "cells already in cmc.jsonl are not re-run)")
    return lines


def _shape(model: Path) -> str:
    """"hidden x layers" from a model's config.json ("?" when it is not there)."""
    f = model / "config.json"
    if not f.exists():
        return "?"
    c = json.loads(f.read_text())
    return f"hidden {c['hidden_size']} x {c['num_hidden_layers']} layers"


def _unlearn_verdicts(records: dict[str, dict], targets: list[str]) -> list[str]:
    """Say plainly how forgetting and keeping moved, per model."""
    out = []
    for t in targets:
        f0, f1, r0, r1, h0, h1 = (_value(records, "unlearn", t, v, s) for s in ("forget", "retain", "heldout")
                                  for v in ("alone", "unlearn"))
        if None in (f0, f1, r0, r1, h0, h1):
            continue
        out.append(f"- {t}: forget {_fmt(f0)} -> {_fmt(f1)} ({_signed(f1 - f0)}), retain {_fmt(r0)} -> {_fmt(r1)} "
                   f"({_signed(r1 - r0)}), heldout {_fmt(h0)} -> {_fmt(h1)} ({_signed(h1 - h0)}).")
    return out + [""] if out else []
