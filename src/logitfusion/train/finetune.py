"""Making experts: fine-tune the small base (full or LoRA) with the Hugging Face Trainer, and merge
full-weight experts by task arithmetic (method.md §5).

`finetune` writes OUT as a model directory (safetensors + tokenizer) or, with LoRA, a PEFT adapter
directory of the base; either loads as an expert (`Fuser.from_pretrained(L, S, {"name": OUT})`).
Checkpoints go to OUT/checkpoints every `save_steps`; rerunning the same job resumes from the last
one, and a finished job (OUT/finetune.json with the same settings) is not redone.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.models import LoadError, LoadOptions, check_expert_architecture, load_causal_lm, load_tokenizer, model_kind

MARKER = "finetune.json"  # written last: its presence means the run finished
RUN_FILE = "run.json"  # in OUT/checkpoints: the settings the checkpoints belong to


class TrainingError(ValueError):
    """Bad training data or settings; the message names the file/line and the fix."""


@dataclass(kw_only=True)
class Schedule:
    """The optimisation settings every training command shares (finetune, delta train)."""

    epochs: float = 3.0
    max_steps: int | None = None
    lr: float | None = None  # None: the command's default (its `learning_rate`)
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    save_steps: int = 100
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    overwrite: bool = False

    def check_schedule(self) -> None:  # subclasses give `learning_rate`: lr or their own default
        for name in ("batch_size", "grad_accum", "max_length", "save_steps"):
            if getattr(self, name) <= 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise TrainingError(f"--max-steps must be > 0, got {self.max_steps}")
        if self.epochs <= 0:
            raise TrainingError(f"--epochs must be > 0, got {self.epochs}")
        if self.learning_rate <= 0:
            raise TrainingError(f"--lr must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class FinetuneConfig(Schedule):
    base: str
    data: str
    out: str
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: str = "q_proj,v_proj"
    lora_dropout: float = 0.0
    template: str = "{prompt}"
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:  # method.md §6
        return self.lr if self.lr is not None else (1e-4 if self.lora else 2e-5)

    def check(self) -> None:
        for name in ("lora_rank", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        self.check_schedule()
        if "{prompt}" not in self.template:
            raise TrainingError(f"--template {self.template!r} has no {{prompt}} placeholder")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise TrainingError(f"--dtype {self.dtype!r}: use float32, bfloat16 or float16")
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise TrainingError("--lora-targets is empty; give module names, e.g. q_proj,v_proj")


# ---------------------------------------------------------------- data

def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; errors name the line."""
    p = Path(path)
    if not p.exists():
        raise TrainingError(f"data file {str(p)!r} does not exist")
    if not p.is_file():
        raise TrainingError(f"data {str(p)!r} is not a file (expected JSONL)")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise TrainingError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
        has_pc = isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)
        if not has_pc and not isinstance(rec.get("text"), str):
            raise TrainingError(f"{p}:{n}: needs string fields \"prompt\" and \"completion\", or \"text\" "
                                f"(got keys {sorted(rec)})")
        rows.append((n, rec))
    if not rows:
        raise TrainingError(f"data file {str(p)!r} is empty (no JSONL records)")
    return rows


def encode_example(rec: dict, tokenizer, template: str, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (-100 = no loss). The prompt is rendered with the template and
    tokenised as the decoding engine does (`tokenizer(text)`); the completion follows, then EOS."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "prompt" in rec and "completion" in rec:
        prompt_ids = tokenizer(template.replace("{prompt}", rec["prompt"]))["input_ids"]
        completion_ids = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + eos
        ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    else:
        ids = (tokenizer(rec["text"])["input_ids"] + eos)[:max_length]
        labels = list(ids)
    return {"input_ids": ids, "labels": labels}


def load_dataset(path: str | Path, tokenizer, template: str = "{prompt}", max_length: int = 512) -> list[dict]:
    examples = []
    for n, rec in read_jsonl(path):
        ex = encode_example(rec, tokenizer, template, max_length)
        if all(label == -100 for label in ex["labels"][1:]):
            raise TrainingError(f"{path}:{n}: nothing to learn within --max-length {max_length} "
                                "(the prompt fills it, or the text is shorter than two tokens)")
        examples.append(ex)
    return examples


class Collator:
    """Right-pads a batch; padded positions get attention 0 and label -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids, mask, labels = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_id] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
            labels.append(list(f["labels"]) + [-100] * pad)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor(labels)}


# ---------------------------------------------------------------- fine-tuning

def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(cfg: FinetuneConfig) -> dict[str, Any]:
    d = asdict(cfg)
    for k in ("out", "overwrite", "extra"):
        d.pop(k)
    d["base"] = str(Path(cfg.base).resolve())
    d["data"] = str(Path(cfg.data).resolve())
    d["data_sha256"] = _sha256(cfg.data)
    d["lr"] = cfg.learning_rate
    return d


def _holds_model(out: Path) -> bool:
    return (out / "config.json").exists() or (out / "adapter_config.json").exists()


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that was written to the end (the Trainer writes trainer_state.json
    last). Checkpoints cut short by a kill are removed, so the run resumes from the one before."""
    steps = []
    for d in ckpt_dir.glob("checkpoint-*"):
        if d.is_dir() and d.name.split("-", 1)[1].isdigit():
            steps.append((int(d.name.split("-", 1)[1]), d))
    for _, d in sorted(steps, reverse=True):
        try:
            json.loads((d / "trainer_state.json").read_text())
            return str(d)
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
    return None


def train_resuming(trainer, ckpt_dir: Path) -> tuple[float | None, str | None]:
    """trainer.train, resuming from the last complete checkpoint in ckpt_dir. A checkpoint of the
    final step is restored as it is instead: the Trainer would resume it by training one step
    more, so a run killed between its last checkpoint and writing the model would come back
    different. Returns (mean training loss, the checkpoint resumed from or None)."""
    from transformers import TrainerState
    last = last_complete_checkpoint(ckpt_dir)
    if last is not None:
        state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
        if state.max_steps and state.global_step >= state.max_steps:
            trainer._load_from_checkpoint(last)  # its weights (a full model or the adapter)
            trainer.state = state
            return _logged_mean_loss(state.log_history), last
    return trainer.train(resume_from_checkpoint=last).training_loss, last


def _logged_mean_loss(log_history: list[dict]) -> float | None:
    """The run's mean loss from its logged losses, each the mean since the previous log."""
    total = previous = 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else None


def prepare_out(out: Path, fp: dict, overwrite: bool, marker_name: str = MARKER,
                outputs: tuple[str, ...] = ()) -> dict | None:
    """Decide what a training run into OUT does. Returns the finished run's record when OUT
    already holds this very run (nothing to do); else checks that OUT holds nothing else (or,
    with overwrite, removes what a model or this tool wrote) and returns None. A run whose
    settings match OUT/checkpoints/run.json resumes from its last checkpoint."""
    ckpt_dir, marker = out / "checkpoints", out / marker_name
    if marker.exists() and json.loads(marker.read_text()).get("settings") == fp and not overwrite:
        return json.loads(marker.read_text())
    run_file = ckpt_dir / RUN_FILE
    same_run = run_file.exists() and json.loads(run_file.read_text()) == fp
    if out.exists() and not overwrite and not same_run:
        if _holds_model(out) or marker.exists():
            raise TrainingError(f"--out {str(out)!r} already holds a different model; choose another folder "
                                "or pass --overwrite to replace it")
        if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
            raise TrainingError(f"--out {str(out)!r} holds checkpoints of a run with other settings; "
                                "rerun with those settings to resume, or pass --overwrite to start again")
    if overwrite:  # only what a model or this tool writes; other files in OUT are left alone
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for pattern in (marker_name, "config.json", "generation_config.json", "model*.safetensors",
                        "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors",
                        *outputs):
            for f in out.glob(pattern):
                f.unlink()
    return None


def training_arguments(ckpt_dir: Path, cfg: Schedule, total: int):
    """The Trainer settings every run here uses: deterministic seeds, checkpoints every save_steps
    (two kept), a progress bar."""
    from transformers import TrainingArguments
    return TrainingArguments(
        output_dir=str(ckpt_dir), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, warmup_steps=int(cfg.warmup_ratio * total),
        weight_decay=cfg.weight_decay, lr_scheduler_type="linear", seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        logging_strategy="steps", logging_steps=max(1, min(50, total // 10)), report_to="none",
        disable_tqdm=False, remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), bf16=False, fp16=False)


@dataclass
class FinetuneResult:
    out: str
    global_step: int
    train_loss: float | None
    resumed_from: str | None = None
    skipped: bool = False  # True: OUT already held this finished run


def finetune(cfg: FinetuneConfig, callbacks: list | None = None) -> FinetuneResult:
    from transformers import Trainer, set_seed

    cfg.check()
    if model_kind(cfg.base, "base") != "model":
        raise LoadError(f"base: {cfg.base!r} is a PEFT adapter; fine-tune from a full model directory "
                        "(merge the adapter first, e.g. `logitfusion merge --base S --expert ADAPTER --lam 1`)")
    read_jsonl(cfg.data)  # data errors before any model loads
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    fp = _fingerprint(cfg)

    done = prepare_out(out, fp, cfg.overwrite)
    if done is not None:
        return FinetuneResult(str(out), done.get("global_step", 0), done.get("train_loss"), skipped=True)
    marker, run_file = out / MARKER, ckpt_dir / RUN_FILE

    set_seed(cfg.seed)
    opts = LoadOptions(dtype=cfg.dtype)
    tokenizer = load_tokenizer(cfg.base, "base", opts)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = load_dataset(cfg.data, tokenizer, cfg.template, cfg.max_length)
    model = load_causal_lm(cfg.base, "base", opts).train()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise TrainingError(f"--lora-targets {missing} are not modules of the base model; "
                                f"e.g. {sorted(n for n in names if n.endswith('proj'))[:8]}")
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))

    per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or math.ceil(per_epoch * cfg.epochs)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(fp, indent=1))
    args = training_arguments(ckpt_dir, cfg, total)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(tokenizer.pad_token_id),
                      processing_class=tokenizer, callbacks=callbacks)
    train_loss, last = train_resuming(trainer, ckpt_dir)

    out.mkdir(parents=True, exist_ok=True)
    trainer.model.eval()
    trainer.model.config.use_cache = True  # the Trainer turns it off; plain `generate` needs it back
    trainer.model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    marker.write_text(json.dumps({"settings": fp, "global_step": trainer.state.global_step,
                                  "train_loss": train_loss}, indent=1))
    return FinetuneResult(str(out), trainer.state.global_step, train_loss, resumed_from=last)


# ---------------------------------------------------------------- task arithmetic

def merge(base: str, experts: list[str], lam: float, out: str, overwrite: bool = False,
          dtype: str = "float32") -> Path:
    """theta = theta_S + lam * sum_t (theta_t - theta_S) (method.md §5), saved as safetensors.

    Full-weight experts are used as they are; LoRA adapters are first merged into a copy of the
    base (peft merge_and_unload), so they contribute their low-rank delta."""
    if not experts:
        raise TrainingError("merge needs at least one --expert")
    out_p = Path(out)
    if out_p.exists() and _holds_model(out_p) and not overwrite:
        raise TrainingError(f"--out {out!r} already holds a model; choose another folder or pass --overwrite")
    if model_kind(base, "base") != "model":
        raise LoadError(f"base: {base!r} is a PEFT adapter; give the full small base model directory")
    kinds = [model_kind(e, f"expert {e}") for e in experts]
    opts = LoadOptions(dtype=dtype)
    tokenizer = load_tokenizer(base, "base", opts)
    base_model = load_causal_lm(base, "base", opts)
    theta_s = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    delta = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in theta_s.items()}
    for path, kind in zip(experts, kinds):
        role = f"expert {path}"
        if kind == "adapter":
            from peft import PeftModel
            copy = load_causal_lm(base, "base", opts)
            try:
                expert = PeftModel.from_pretrained(copy, path).merge_and_unload()
            except Exception as e:
                raise LoadError(f"{role}: could not merge LoRA adapter into the base "
                                f"(is it an adapter of that model?): {e}") from e
        else:
            expert = load_causal_lm(path, role, opts)
        check_expert_architecture(base_model, expert, role)
        sd = expert.state_dict()
        for k, v in theta_s.items():
            if k not in sd or sd[k].shape != v.shape:
                raise LoadError(f"{role}: weight {k} is missing or has another shape "
                                f"({tuple(sd[k].shape) if k in sd else None} vs {tuple(v.shape)})")
            delta[k] += sd[k].float() - v.float()
        del expert, sd
    merged = {k: (v.float() + lam * delta[k]).to(v.dtype) for k, v in theta_s.items()}
    base_model.load_state_dict(merged)
    out_p.mkdir(parents=True, exist_ok=True)
    base_model.config.use_cache = True  # experts trained by the Trainer carry False
    base_model.save_pretrained(str(out_p), safe_serialization=True)
    tokenizer.save_pretrained(str(out_p))
    (out_p / "merge.json").write_text(json.dumps({"base": str(Path(base).resolve()), "lam": lam,
                                                  "experts": [str(Path(e).resolve()) for e in experts]},
                                                 indent=1))
    return out_p
