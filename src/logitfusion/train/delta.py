"""Cross-model control (method.md §7): train a tiny delta model D beside a frozen template LLM T.

Training logits are `log_softmax(z_T) + z_D`; the loss is next-token cross-entropy on them and
only D learns. Objectives:
  sft      descend on the data (prompt/completion or text records, as `finetune` reads them);
  unlearn  gradient difference: ascend on a forget set, descend on a retain set. Every batch
           holds forget examples and as many retain examples (the retain set is cycled).

The delta is an existing Hugging Face model directory with the template's tokenizer, or a fresh
Llama from a small spec ("hidden=64,layers=2"), whose lm_head starts at zero so that an
untrained delta changes nothing. The output directory is an ordinary model directory (safetensors
+ the template's tokenizer) that a recipe's `delta:` section loads. Checkpoints, resuming and the
finished-run marker work as in `training.finetune` (shared helpers).

    from logitfusion.train.delta import DeltaConfig, train_delta
    train_delta(DeltaConfig(template="models/large", delta="hidden=64,layers=2",
                            data="instruct.jsonl", out="deltas/instruct"))
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.models import LoadError, LoadOptions, load_causal_lm, load_tokenizer, model_kind
from .finetune import (RUN_FILE, Collator, Schedule, TrainingError, load_dataset, train_resuming,
                       prepare_out, read_jsonl, training_arguments)

MARKER = "delta.json"  # written last: its presence means the run finished
SPEC_KEYS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
             "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size",
             "context": "max_position_embeddings"}


# ---------------------------------------------------------------- the maths

def fused_logits(z_template: Tensor, z_delta: Tensor) -> Tensor:
    """log_softmax(z_T) + z_D, in float32 (the template's log-probs are the delta's base)."""
    return z_template.float().log_softmax(-1) + z_delta.float()


def token_losses(z_template: Tensor, z_delta: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy of every position under the fused logits [B, T, V] -> ([B, T-1]
    losses, [B, T-1] mask of positions that count (label != -100))."""
    logits = fused_logits(z_template, z_delta)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return losses * mask, mask


def delta_loss(z_template: Tensor, z_delta: Tensor, labels: Tensor, sign: Tensor | None = None) -> Tensor:
    """sft (sign None): mean token loss. unlearn: sign [B] is +1 for retain rows, -1 for forget
    rows; the loss is mean(retain tokens) - mean(forget tokens) (gradient difference)."""
    losses, mask = token_losses(z_template, z_delta, labels)
    if sign is None:
        return losses.sum() / mask.sum().clamp_min(1)
    loss = losses.new_zeros(())
    for s in (1, -1):
        rows = sign == s
        if rows.any():
            loss = loss + s * losses[rows].sum() / mask[rows].sum().clamp_min(1)
    return loss


# ---------------------------------------------------------------- settings

@dataclass
class DeltaConfig(Schedule):
    template: str  # the frozen template LLM (model directory)
    delta: str  # a model directory, or a spec for a fresh Llama: "hidden=64,layers=2[,heads=4,...]"
    out: str
    objective: str = "sft"  # sft | unlearn
    data: str | None = None  # sft
    forget: str | None = None  # unlearn
    retain: str | None = None  # unlearn (optional: without it, plain gradient ascent on forget)
    prompt_template: str = "{prompt}"

    @property
    def learning_rate(self) -> float:  # a tiny delta, often trained from scratch
        return self.lr if self.lr is not None else 5e-4

    def check(self) -> None:
        if self.objective not in ("sft", "unlearn"):
            raise TrainingError(f"--objective {self.objective!r}: use sft or unlearn")
        if self.objective == "sft" and not self.data:
            raise TrainingError("--objective sft needs --data train.jsonl")
        if self.objective == "unlearn":
            if not self.forget:
                raise TrainingError("--objective unlearn needs --forget forget.jsonl (and usually --retain)")
            if self.data:
                raise TrainingError("--objective unlearn reads --forget and --retain, not --data")
        elif self.forget or self.retain:
            raise TrainingError("--forget/--retain belong to --objective unlearn")
        self.check_schedule()
        if "{prompt}" not in self.prompt_template:
            raise TrainingError(f"--prompt-template {self.prompt_template!r} has no {{prompt}} placeholder")
        if not is_model_dir(self.delta):
            parse_spec(self.delta)


def is_model_dir(delta: str) -> bool:
    return "=" not in delta or Path(delta).exists()


def parse_spec(spec: str) -> dict[str, int]:
    """"hidden=64,layers=2" -> LlamaConfig fields. Unknown keys and non-integers are errors."""
    fields = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in SPEC_KEYS:
            raise TrainingError(f"--delta {spec!r}: {part!r} is not KEY=VALUE with KEY one of "
                                f"{sorted(SPEC_KEYS)} (or give an existing model directory)")
        try:
            fields[SPEC_KEYS[key.strip()]] = int(value)
        except ValueError:
            raise TrainingError(f"--delta {spec!r}: {key} must be an integer, got {value!r}") from None
        if fields[SPEC_KEYS[key.strip()]] <= 0:
            raise TrainingError(f"--delta {spec!r}: {key} must be > 0")
    if "hidden_size" not in fields:
        raise TrainingError(f"--delta {spec!r}: give at least hidden=N (e.g. hidden=64,layers=2)")
    return fields


def new_delta(spec: str, tokenizer, template_config, seed: int = 0):
    """A fresh Llama on the template's tokenizer whose output is exactly 0: lm_head is zero (the
    rest keeps its random init, so gradients reach it after the first step, as with LoRA's B)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    f = parse_spec(spec)
    hidden = f["hidden_size"]
    heads = f.get("num_attention_heads", max(1, hidden // 16))
    if hidden % heads:
        raise TrainingError(f"--delta {spec!r}: hidden ({hidden}) must be a multiple of heads ({heads})")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=f.get("num_key_value_heads", heads),
                         intermediate_size=f.get("intermediate_size", 2 * hidden),
                         num_hidden_layers=f.get("num_hidden_layers", 2),
                         max_position_embeddings=f.get("max_position_embeddings",
                                                       getattr(template_config, "max_position_embeddings", 2048)),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(cfg: DeltaConfig) -> dict:
    d = asdict(cfg)
    for k in ("out", "overwrite"):
        d.pop(k)
    d["template"] = str(Path(cfg.template).resolve())
    if is_model_dir(cfg.delta):
        d["delta"] = str(Path(cfg.delta).resolve())
    for k in ("data", "forget", "retain"):
        if d[k]:
            d[k + "_sha256"] = _sha256(d[k])
            d[k] = str(Path(d[k]).resolve())
    d["lr"] = cfg.learning_rate
    return d


# ---------------------------------------------------------------- data

class PairCollator(Collator):
    """Unlearning batches: each item is {"forget": ex, "retain": ex or None}; rows are the forget
    examples then the retain ones, with `sign` -1 / +1."""

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        forget = [f["forget"] for f in features]
        retain = [f["retain"] for f in features if f["retain"] is not None]
        batch = super().__call__(forget + retain)
        batch["sign"] = torch.tensor([-1] * len(forget) + [1] * len(retain))
        return batch


def _examples(cfg: DeltaConfig, tokenizer) -> tuple[list[dict], Collator]:
    pad = tokenizer.pad_token_id
    if cfg.objective == "sft":
        return load_dataset(cfg.data, tokenizer, cfg.prompt_template, cfg.max_length), Collator(pad)
    forget = _load_nonempty(cfg.forget, "--forget", tokenizer, cfg)
    retain = _load_nonempty(cfg.retain, "--retain", tokenizer, cfg) if cfg.retain else []
    pairs = [{"forget": f, "retain": retain[i % len(retain)] if retain else None} for i, f in enumerate(forget)]
    return pairs, PairCollator(pad)


def _load_nonempty(path: str, flag: str, tokenizer, cfg: DeltaConfig) -> list[dict]:
    _read(path, flag)
    return load_dataset(path, tokenizer, cfg.prompt_template, cfg.max_length)


def _read(path: str, flag: str) -> None:
    """Data errors before any model loads; an empty forget set says what unlearning needs."""
    try:
        read_jsonl(path)
    except TrainingError as e:
        if "is empty" not in str(e) or flag == "--data":
            raise
        if flag == "--forget":
            raise TrainingError(f"--forget {path!r} is empty: unlearning needs at least one example to forget "
                                '(JSONL, one {"text": ...} or {"prompt": ..., "completion": ...} per line)') from None
        raise TrainingError(f"--retain {path!r} is empty; give examples to keep, or leave --retain out "
                            "(plain gradient ascent on the forget set)") from None


# ---------------------------------------------------------------- training

def _trainer_class():
    from transformers import Trainer

    class DeltaTrainer(Trainer):
        """The Trainer's `model` is the delta alone (so checkpoints and resuming cover exactly
        what learns); the frozen template runs inside the loss."""

        def __init__(self, *args, template=None, vocab: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.template, self.vocab = template.to(self.args.device), vocab

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels, sign = inputs.pop("labels"), inputs.pop("sign", None)
            with torch.no_grad():
                z_t = self.template(**inputs).logits[..., : self.vocab]
            out = model(**inputs)
            loss = delta_loss(z_t, out.logits[..., : self.vocab], labels, sign)
            return (loss, out) if return_outputs else loss

    return DeltaTrainer


@dataclass
class DeltaResult:
    out: str
    global_step: int
    train_loss: float | None
    resumed_from: str | None = None
    skipped: bool = False


def _same_vocab(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def train_delta(cfg: DeltaConfig, callbacks: list | None = None) -> DeltaResult:
    """Train (or resume, or skip when OUT already holds this finished run) a delta model."""
    from transformers import set_seed

    cfg.check()
    if model_kind(cfg.template, "template") != "model":
        raise LoadError(f"template: {cfg.template!r} is a PEFT adapter; give a full model directory")
    for flag, path in (("--data", cfg.data), ("--forget", cfg.forget), ("--retain", cfg.retain)):
        if path:
            _read(path, flag)
    out, fp = Path(cfg.out), _fingerprint(cfg)
    ckpt_dir = out / "checkpoints"
    done = prepare_out(out, fp, cfg.overwrite, MARKER)
    if done is not None:
        return DeltaResult(str(out), done.get("global_step", 0), done.get("train_loss"), skipped=True)

    set_seed(cfg.seed)
    opts = LoadOptions()
    tokenizer = load_tokenizer(cfg.template, "template", opts)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, collator = _examples(cfg, tokenizer)
    template = load_causal_lm(cfg.template, "template", opts).requires_grad_(False)
    if is_model_dir(cfg.delta):
        if model_kind(cfg.delta, "delta") != "model":
            raise LoadError(f"delta: {cfg.delta!r} is a PEFT adapter; give a full model directory or a spec "
                            "such as hidden=64,layers=2")
        delta_tok = load_tokenizer(cfg.delta, "delta", opts)
        if not _same_vocab(delta_tok, tokenizer):
            raise TrainingError(f"delta {cfg.delta!r} has another tokenizer than the template ({len(delta_tok)} vs "
                                f"{len(tokenizer)} tokens): a delta is trained on the template's tokens. Start "
                                "from a model of the template's family, or from a spec (--delta hidden=64,layers=2); "
                                "plugging the trained delta into a model with another tokenizer is what the "
                                "recipe's delta.mapping is for")
        delta = load_causal_lm(cfg.delta, "delta", opts)
    else:
        delta = new_delta(cfg.delta, tokenizer, template.config, cfg.seed)
    vocab = len(tokenizer)
    for name, m in (("template", template), ("delta", delta)):
        if m.get_output_embeddings().weight.shape[0] < vocab:
            raise LoadError(f"{name}: outputs fewer logits than its tokenizer has tokens ({vocab})")
    delta.train()

    per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or math.ceil(per_epoch * cfg.epochs)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / RUN_FILE).write_text(json.dumps(fp, indent=1))
    trainer = _trainer_class()(model=delta, args=training_arguments(ckpt_dir, cfg, total), train_dataset=examples,
                               data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
                               template=template, vocab=vocab)
    train_loss, last = train_resuming(trainer, ckpt_dir)

    out.mkdir(parents=True, exist_ok=True)
    trainer.model.config.use_cache = True  # the Trainer turns it off; plain `generate` needs it back
    trainer.model.eval().save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / MARKER).write_text(json.dumps({"settings": fp, "global_step": trainer.state.global_step,
                                          "train_loss": train_loss}, indent=1))
    return DeltaResult(str(out), trainer.state.global_step, train_loss, resumed_from=last)


@torch.no_grad()
def mean_loss(template, delta, tokenizer, data: str, prompt_template: str = "{prompt}", max_length: int = 512,
              strength: float = 1.0, batch_size: int = 16) -> float:
    """Mean next-token loss per counted token of a JSONL file under log_softmax(z_T) + a z_D (a = 0:
    the template alone). template/delta: loaded models. For tests and reports (forget/retain NLL)."""
    examples = load_dataset(data, tokenizer, prompt_template, max_length)
    collate, vocab = Collator(tokenizer.pad_token_id), len(tokenizer)
    total = count = 0.0
    for start in range(0, len(examples), batch_size):
        b = collate(examples[start: start + batch_size])
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        z_t = template(**inputs).logits[..., :vocab]
        z_d = delta(**inputs).logits[..., :vocab] * strength
        losses, mask = token_losses(z_t, z_d, b["labels"])
        total, count = total + float(losses.sum()), count + float(mask.sum())
    return total / max(count, 1.0)
