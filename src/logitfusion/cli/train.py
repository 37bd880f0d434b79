"""finetune, merge and delta train: the commands that train or merge models (the library side is
train/finetune.py and train/delta.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import check_paths, fail, say, train_and_report, user_errors

# Options that mean the same for finetune and delta train, declared once.
EPOCHS = typer.Option(3.0, help="Passes over the data (ignored when --max-steps is given).")
MAX_STEPS = typer.Option(None, help="Stop after this many optimizer steps (overrides --epochs).")
MAX_LENGTH = typer.Option(512, help="Truncate each example to this many tokens.")
WARMUP_RATIO = typer.Option(0.0, help="Fraction of the steps spent warming the learning rate up from 0.")
WEIGHT_DECAY = typer.Option(0.0, help="AdamW weight decay.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace a different model or stale checkpoints already in --out.")


def finetune(
    base: str = typer.Option(..., "--base", help="The small base model directory to fine-tune (the fusion's `small`)."),
    data: Path = typer.Option(..., "--data", help='Training JSONL: {"prompt": ..., "completion": ...} per line (loss on the completion only) or {"text": ...} (loss on every token).'),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: a full model (safetensors + tokenizer) or, with --lora, a PEFT LoRA adapter. Checkpoints go to OUT/checkpoints."),
    lora: bool = typer.Option(False, "--lora", help="Train a LoRA adapter of the base instead of all weights."),
    lora_rank: int = typer.Option(16, help="LoRA rank r (the paper's LoRA baseline uses 64 on 7B-13B models)."),
    lora_alpha: int = typer.Option(32, help="LoRA scaling alpha (the update is scaled by alpha / rank)."),
    lora_targets: str = typer.Option("q_proj,v_proj", help="Comma-separated module names that get LoRA adapters, e.g. q_proj,k_proj,v_proj,o_proj."),
    template: str = typer.Option("{prompt}", help="Prompt template, as in the recipe's expert `template`: {prompt} is replaced by each line's prompt. Use the same one at decoding time."),
    epochs: float = EPOCHS,
    max_steps: Optional[int] = MAX_STEPS,
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (linear decay). Default 2e-5 for a full fine-tune, 1e-4 with --lora (method.md §6)."),
    batch_size: int = typer.Option(8, help="Examples per device per step."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps (effective batch = batch-size x grad-accum)."),
    max_length: int = MAX_LENGTH,
    seed: int = typer.Option(0, help="Seed for initialisation and data order; the same seed and data give the same weights."),
    save_steps: int = typer.Option(100, help="Save a resumable checkpoint to OUT/checkpoints every N steps (the last two are kept)."),
    warmup_ratio: float = WARMUP_RATIO,
    weight_decay: float = WEIGHT_DECAY,
    dtype: str = typer.Option("float32", help="Weights dtype while training: float32, bfloat16 or float16."),
    overwrite: bool = OVERWRITE,
):
    """Fine-tune the small base into an expert with the Hugging Face Trainer. Rerunning the same
    command resumes from the last checkpoint; a finished run is not redone."""
    from ..train.finetune import FinetuneConfig
    from ..train.finetune import finetune as run_finetune
    cfg = FinetuneConfig(base=base, data=str(data), out=str(out), lora=lora, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, lora_targets=lora_targets, template=template, epochs=epochs,
                         max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                         max_length=max_length, seed=seed, save_steps=save_steps, warmup_ratio=warmup_ratio,
                         weight_decay=weight_decay, dtype=dtype, overwrite=overwrite)
    train_and_report(lambda: (check_paths({"--base": base, "--data": data}, {"--out": out}, ("--out",)),
                              run_finetune(cfg))[1], out, "LoRA adapter" if lora else "model")


def merge(
    base: str = typer.Option(..., "--base", help="The small base model directory the experts were fine-tuned from."),
    expert: list[str] = typer.Option(..., "--expert", help="An expert directory (full model, or a LoRA adapter of the base, which is merged into its weights first). Repeat for several."),
    lam: float = typer.Option(0.5, "--lam", help="Task-arithmetic scale lambda: theta = theta_base + lam * sum(theta_expert - theta_base)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the merged model (safetensors + tokenizer)."),
    dtype: str = typer.Option("float32", help="dtype to load and save in: float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model already in --out."),
):
    """Merge experts by task arithmetic (method.md §5) into one model that loads as an expert."""
    from ..train.finetune import merge as run_merge
    try:
        check_paths({"--base": base, "--expert": expert}, {"--out": out}, folders=("--out",))
        run_merge(base, expert, lam, str(out), overwrite=overwrite, dtype=dtype)
    except user_errors() as e:
        fail(str(e))
    say(f"wrote {out} (base + {lam} x sum of {len(expert)} expert delta(s))")


def delta_train(
    template: str = typer.Option(..., "--template", help="The frozen template LLM (model directory). Its tokenizer becomes the delta's."),
    delta: str = typer.Option(..., "--delta", help="Where the delta starts: a model directory with the template's tokenizer, or a spec for a fresh Llama, e.g. hidden=64,layers=2 (keys: hidden, layers, heads, kv_heads, intermediate, context). A fresh delta's lm_head is zero, so before training it changes nothing."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the delta model (safetensors + tokenizer); load it with a recipe's `delta:` section. Checkpoints go to OUT/checkpoints."),
    objective: str = typer.Option("sft", help="sft: learn --data. unlearn: gradient difference, ascend on --forget and descend on --retain."),
    data: Optional[Path] = typer.Option(None, "--data", help='sft training JSONL: {"prompt": ..., "completion": ...} (loss on the completion) or {"text": ...} per line.'),
    forget: Optional[Path] = typer.Option(None, "--forget", help="unlearn: JSONL of what to forget (same record forms as --data)."),
    retain: Optional[Path] = typer.Option(None, "--retain", help="unlearn: JSONL of what to keep; each batch pairs forget examples with as many retain ones. Without it: gradient ascent on --forget alone."),
    prompt_template: str = typer.Option("{prompt}", help="Prompt template for prompt/completion records: {prompt} is replaced by each prompt. Use the same one as the delta's `template` in the recipe."),
    epochs: float = EPOCHS,
    max_steps: Optional[int] = MAX_STEPS,
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (linear decay); default 5e-4."),
    batch_size: int = typer.Option(8, help="Examples per device per step (unlearn: forget examples, plus as many retain ones)."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps."),
    max_length: int = MAX_LENGTH,
    seed: int = typer.Option(0, help="Seed for the fresh delta's initialisation and the data order."),
    save_steps: int = typer.Option(100, help="Save a resumable checkpoint every N steps (the last two are kept)."),
    warmup_ratio: float = WARMUP_RATIO,
    weight_decay: float = WEIGHT_DECAY,
    overwrite: bool = OVERWRITE,
):
    """Train a delta model: loss = cross-entropy of log_softmax(z_template) + z_delta, only the delta
    learns. Rerunning the same command resumes from the last checkpoint; a finished run is not redone."""
    from ..train.delta import DeltaConfig, train_delta
    cfg = DeltaConfig(template=template, delta=delta, out=str(out), objective=objective,
                      data=str(data) if data else None, forget=str(forget) if forget else None,
                      retain=str(retain) if retain else None, prompt_template=prompt_template, epochs=epochs,
                      max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                      max_length=max_length, seed=seed, save_steps=save_steps, warmup_ratio=warmup_ratio,
                      weight_decay=weight_decay, overwrite=overwrite)
    reads = {"--template": template, "--delta": delta if Path(delta).exists() else None, "--data": data,
             "--forget": forget, "--retain": retain}
    train_and_report(lambda: (check_paths(reads, {"--out": out}, ("--out",)), train_delta(cfg))[1], out,
                     f"delta model ({objective})")
