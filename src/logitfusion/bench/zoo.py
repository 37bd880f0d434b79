"""The bundled tiny model family ("the zoo"), trained by the project itself on the synthetic world
(world.py), so that everything runs offline on a laptop CPU.

Members (Llama architecture; one byte-level BPE tokenizer but for `large-alt`):
- `large`, `small`: bases pretrained on the world's prose only (no task formats);
- `large-alt`: a large base with a second, SentencePiece-style tokenizer (cross-vocabulary paths);
- `large-b`: another large base (other shape and seed) on the first tokenizer (CMC transfer);
- `experts/{task}`: `small` fully fine-tuned on one task; `experts/{task}-lora`: LoRA adapters;
  `experts/multitask`: `small` fine-tuned on the four seen tasks together; `experts/merged`:
  task arithmetic over the four seen-task experts;
- `deltas/instruct`, `deltas/unlearn`: cross-model control delta models (cmc_bench.py) trained
  beside `large`;
- ceilings, rebuilt on demand rather than shipped: `ceilings/{task}` (large full fine-tune),
  `ceilings/{task}-lora`, `ceilings/multitask`.

Every model is made with `training.finetune` (the public `logitfusion finetune` path): pretraining
is a fine-tune of a random initialisation on `{"text"}` records. Each step is resumable and a
finished step is not redone, so `logitfusion zoo build` can be interrupted and rerun.

`BUNDLED` is the folder inside the package that holds what ships (models without checkpoints,
the task data, `zoo.json` with the build's figures). `TASKS_DIR` holds the zoo's lm-eval tasks
(zoo_math, zoo_truthful, zoo_qa, zoo_summ, zoo_mmlu) and their scorers: the bench hands it to
eval's task manager as an include path.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..eval.records import read_jsonl
from . import world
from .steps import Step, run_steps

BUNDLED = Path(__file__).parent / "bundled"
TASKS_DIR = Path(__file__).parent / "tasks"  # the zoo's lm-eval tasks (tasks/utils.py: data and scorers)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass
class Size:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass
class ZooConfig:
    seed: int = 0
    vocab_size: int = 1024
    vocab_size_alt: int = 1200  # the second (SentencePiece-style BPE) tokenizer of `models/large-alt`
    large: Size = field(default_factory=lambda: Size(192, 4, 6, 512))
    small: Size = field(default_factory=lambda: Size(48, 2, 4, 128))  # ~14x fewer parameters than large
    large_b: Size = field(default_factory=lambda: Size(160, 5, 5, 448))  # models/large-b, same tokenizer
    context: int = 512
    pretrain_passes: int = 30  # shuffles of the world's statements in pretraining.jsonl
    pretrain_epochs: float = 1.0
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 32
    # Mid-training (zoo v2): the prose-pretrained bases read fresh prose and web-like registers
    # 1:1 (world.midtraining_text), so they share format priors as real base models do.
    midtrain_passes: int = 4
    midtrain_epochs: float = 1.0
    midtrain_lr: float = 1e-3
    finetune_epochs: float = 6.0
    finetune_lr: float = 5e-4
    lora_lr: float = 3e-3
    lora_rank: int = 16
    finetune_batch: int = 16
    merge_lambda: float = 0.5  # task arithmetic over the four seen-task experts


# ---------------------------------------------------------------- building blocks

def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int, style: str = "byte-level"):
    """A BPE tokenizer trained on the world's prose, saved as a transformers fast tokenizer.

    style "byte-level" (GPT-2 style `Ġ` markers, never an unknown character) is the zoo's main
    vocabulary; "metaspace" (SentencePiece / Llama-2 style `▁` markers) is the second one, for
    cross-vocabulary fusion and delta models (method.md §8)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "byte-level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        raise ValueError(f"tokenizer style {style!r}: use byte-level or metaspace")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    # BOS on every encoded text (as Llama tokenizers do), so prompts and training rows agree.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def init_model(out_dir: Path, tokenizer, size: Size, context: int, seed: int) -> None:
    """A random Llama of `size`, saved with the tokenizer (the input of pretraining)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


# ---------------------------------------------------------------- the build

def _step(name: str, fn: Callable[[], object], ships: bool) -> Step:
    """A zoo step: `fn` returns None (or a skipped result) when it finds its output already there."""
    return Step(name, None, lambda progress: fn(), ships)


def _finetune(base: Path, data: Path, out: Path, *, lr: float, epochs: float, batch: int, seed: int,
              lora: bool = False, rank: int = 16, max_length: int = 256):
    from ..train.finetune import FinetuneConfig, finetune
    return finetune(FinetuneConfig(base=str(base), data=str(data), out=str(out), lora=lora, lora_rank=rank,
                                   lora_alpha=2 * rank, lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                   lr=lr, epochs=epochs, batch_size=batch, seed=seed, max_length=max_length,
                                   save_steps=200))


def _merge(base: Path, experts: list[Path], lam: float, out: Path):
    from ..train.finetune import merge
    if (out / "config.json").exists():
        return None
    return merge(str(base), [str(e) for e in experts], lam, str(out))


def multitask_data(data: Path) -> Path:
    """The four seen tasks' training rows, interleaved (mmlu stays unseen)."""
    out = data / "multitask" / "train.jsonl"
    if not out.exists():
        rows = [line for t in world.SEEN_TASKS for line in (data / t / "train.jsonl").read_text().splitlines()]
        import random
        random.Random(0).shuffle(rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(rows) + "\n")
    return out


def plan(root: Path, cfg: ZooConfig, ceilings: bool = True) -> list[Step]:
    """Every step of the build, in order; each is idempotent (a finished step is skipped)."""
    root = Path(root)
    data, init, models = root / "data", root / "init", root / "models"
    steps: list[Step] = []

    def world_files():
        if not (data / "pretraining.jsonl").exists():
            return world.build(data, seed=cfg.seed, passes=cfg.pretrain_passes, mid_passes=cfg.midtrain_passes)

    def pretraining_texts() -> list[str]:
        return [r["text"] for r in read_jsonl(data / "pretraining.jsonl", what="pretraining text")]

    def tokenizer_and_init():
        if (init / "small" / "config.json").exists():
            return
        texts = pretraining_texts()
        tok = build_tokenizer(texts, root / "tokenizer", cfg.vocab_size)
        init_model(init / "large", tok, cfg.large, cfg.context, cfg.seed + 1)
        init_model(init / "small", tok, cfg.small, cfg.context, cfg.seed + 2)
        return True

    def alt_init():
        if (init / "large-alt" / "config.json").exists():
            return
        texts = pretraining_texts()
        tok = build_tokenizer(texts, root / "tokenizer-alt", cfg.vocab_size_alt, style="metaspace")
        init_model(init / "large-alt", tok, cfg.large, cfg.context, cfg.seed + 3)
        return True

    def b_init():  # a second large base on the same tokenizer: where CMC deltas transfer to
        if (init / "large-b" / "config.json").exists():
            return None
        from transformers import AutoTokenizer
        init_model(init / "large-b", AutoTokenizer.from_pretrained(str(root / "tokenizer")), cfg.large_b,
                   cfg.context, cfg.seed + 4)
        return True

    steps += [_step("data", world_files, True), _step("init", tokenizer_and_init, False),
              _step("init-alt", alt_init, False), _step("init-b", b_init, False)]
    for name in ("large", "small", "large-alt", "large-b"):
        steps.append(_step(f"prose/{name}", lambda n=name: _finetune(
            init / n, data / "pretraining.jsonl", root / "prose" / n, lr=cfg.pretrain_lr, epochs=cfg.pretrain_epochs,
            batch=cfg.pretrain_batch, seed=cfg.seed), False))
        steps.append(_step(f"models/{name}", lambda n=name: _finetune(
            root / "prose" / n, data / "midtraining.jsonl", models / n, lr=cfg.midtrain_lr,
            epochs=cfg.midtrain_epochs, batch=cfg.pretrain_batch, seed=cfg.seed), True))

    def tuned(base: str, task: str, out: str, lora: bool, ships: bool):
        src = (lambda: multitask_data(data)) if task == "multitask" else (lambda: data / task / "train.jsonl")
        return _step(out, lambda: _finetune(models / base, src(), root / out, lora=lora, rank=cfg.lora_rank,
                                           lr=cfg.lora_lr if lora else cfg.finetune_lr, epochs=cfg.finetune_epochs,
                                           batch=cfg.finetune_batch, seed=cfg.seed), ships)

    for task in world.TASKS:
        steps.append(tuned("small", task, f"experts/{task}", False, True))
    steps.append(tuned("small", "multitask", "experts/multitask", False, True))
    for task in world.TASKS:
        steps.append(tuned("small", task, f"experts/{task}-lora", True, True))
    steps.append(_step("experts/merged", lambda: _merge(models / "small", [root / "experts" / t for t in world.SEEN_TASKS],
                                                       cfg.merge_lambda, root / "experts" / "merged"), True))
    if ceilings:
        for task in world.TASKS:
            steps.append(tuned("large", task, f"ceilings/{task}", False, False))
        for task in world.TASKS:
            steps.append(tuned("large", task, f"ceilings/{task}-lora", True, False))
        steps.append(tuned("large", "multitask", "ceilings/multitask", False, False))
        for task in world.TASKS:  # a LoRA ceiling decodes as a large model: merge it into the weights
            steps.append(_step(f"ceilings/{task}-lora-merged", lambda t=task: _merge(
                models / "large", [root / "ceilings" / f"{t}-lora"], 1.0, root / "ceilings" / f"{t}-lora-merged"),
                False))
    return steps


def build(root: str | Path, cfg: ZooConfig | None = None, ceilings: bool = True, only: list[str] | None = None,
          log: Callable[[str], None] = print) -> dict[str, float]:
    """Run (or resume) the build under ROOT; returns seconds per step, also kept in ROOT/timings.json
    (the efficiency table of the bench reads training times from there)."""
    cfg = cfg or ZooConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def said(name: str, state: str, seconds: float) -> None:
        log(f"zoo: {name} ..." if state == "start" else f"zoo: {name} done in {seconds:.0f}s")
    return run_steps(root, plan(root, cfg, ceilings), only, on_step=said)


def install(root: str | Path, dest: str | Path = BUNDLED) -> int:
    """Copy what ships (bases incl. large-alt, experts, delta models, task data, timings) from a
    build into `dest`, without checkpoints; returns the bytes written."""
    root, dest = Path(root), Path(dest)
    total = 0
    for sub in ("models", "experts", "deltas"):
        if not (root / sub).is_dir():
            continue
        for model in sorted((root / sub).iterdir()):
            if not ((model / "config.json").exists() or (model / "adapter_config.json").exists()):
                continue  # still training
            target = dest / sub / model.name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for f in model.iterdir():
                if f.is_file() and f.suffix != ".md":  # PEFT's generated model card is not needed
                    shutil.copy2(f, target / f.name)
                    total += f.stat().st_size
    shutil.rmtree(dest / "data", ignore_errors=True)
    for task in world.TASKS:
        for split in world.SPLITS:
            src = root / "data" / task / f"{split}.jsonl"
            (dest / "data" / task).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / "data" / task / f"{split}.jsonl")
            total += src.stat().st_size
    if (root / "timings.json").exists():
        shutil.copy2(root / "timings.json", dest / "timings.json")
    write_golden(dest)
    return total


def write_golden(dest: Path, n_tokens: int = 12) -> None:
    """Token ids of short greedy generations on the shipped models (tests/test_zoo.py checks them),
    so any change that moves the zoo's outputs is seen."""
    from ..engine.fuser import Fuser
    prompts = [r["prompt"] for r in read_jsonl(dest / "data" / "math" / "test.jsonl", limit=2, what="task data")]
    fuser = Fuser.from_pretrained(str(dest / "models" / "large"), str(dest / "models" / "small"),
                                  {"math": str(dest / "experts" / "math")})
    ids = {m: [g.token_ids for g in fuser.generate(prompts, solver=m, max_new_tokens=n_tokens)]
           for m in ("large", "expert", "static:1.0", "dynamic")}
    (dest / "golden.json").write_text(json.dumps({"prompts": prompts, "max_new_tokens": n_tokens, "ids": ids}))


def describe(root: str | Path) -> list[dict]:
    """Name, kind (model / LoRA adapter), parameter count and size of every model under ROOT."""
    from safetensors import safe_open
    rows = []
    for sub in ("models", "experts", "deltas", "ceilings"):
        folder = Path(root) / sub
        if not folder.is_dir():
            continue
        for model in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = list(model.glob("*.safetensors"))
            if not files or not ((model / "config.json").exists() or (model / "adapter_config.json").exists()):
                continue  # not a model (e.g. a cache of vocabulary maps)
            n = 0
            for f in files:
                with safe_open(str(f), "pt") as st:
                    n += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
            rows.append({"name": f"{sub}/{model.name}", "parameters": n,
                         "kind": "LoRA adapter" if (model / "adapter_config.json").exists() else "model",
                         "mb": sum(f.stat().st_size for f in model.iterdir() if f.is_file()) / 1e6})
    return rows


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def knowledge_probe(model_dir: str | Path, seed: int = 0, n: int = 200) -> dict[str, float]:
    """What a base knows, asked in its own prose format (greedy): birth towns of the world's people
    and sums. The bases never see task formats, so this is the knowledge fusion can draw on."""
    from ..engine.fuser import Fuser
    w = world.make_world(seed)
    fuser = Fuser.from_pretrained(str(model_dir))
    people = w.people[:n]
    gens = fuser.generate([f"{p.name} grew up in the town of" for p in people], max_new_tokens=6, stop=[" in", "."],
                          batch_size=32)
    towns = sum(g.text.strip().removesuffix(" in").rstrip(".") == p.city for g, p in zip(gens, people)) / len(people)
    import random
    rng = random.Random(0)
    pairs = [(rng.randint(0, w.max_operand), rng.randint(0, w.max_operand)) for _ in range(n)]
    gens = fuser.generate([f"{a} plus {b} is" for a, b in pairs], max_new_tokens=4, stop=["."], batch_size=32)
    sums = sum(g.text.strip().rstrip(".") == str(a + b) for g, (a, b) in zip(gens, pairs)) / len(pairs)
    return {"birth towns": towns, "sums": sums}
