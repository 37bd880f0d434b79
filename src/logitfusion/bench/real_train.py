"""The training side of the real-model build (bench/real.py): the teacher's top-k targets, the
layer-cut student, its distillation with the HF Trainer, the LoRA experts, and the measurements
(perplexities, cost per decoding step)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from ..engine.compat import forward, returned_cache
from .real_config import RealConfig, _atomic_dir, _autocast, _load, _tokenizer


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


def distil_loss(model, input_ids, topk_ids, topk_logprobs, negatives: int = 0, seed: int = 0):
    """(loss, softmax width): the cross-entropy of the student's log-probabilities against the
    teacher's top-k distribution (renormalised over its k tokens), mean over positions. With
    negatives > 0 the student's softmax runs over the batch's teacher top-k tokens plus `negatives`
    random ones instead of the whole vocabulary: the output layer is most of a small model's cost."""
    import torch
    ids = topk_ids.long()
    p = torch.softmax(topk_logprobs.float(), -1)
    if not negatives:
        logits = model(input_ids=input_ids).logits
    else:
        hidden = model.model(input_ids=input_ids).last_hidden_state
        head = model.get_output_embeddings().weight
        g = torch.Generator().manual_seed(seed)
        cand = torch.unique(torch.cat([ids.flatten(), torch.randint(0, head.shape[0], (negatives,), generator=g)]))
        logits = hidden @ head[cand].T
        ids = torch.searchsorted(cand, ids)
    logq = torch.log_softmax(logits.float(), -1)
    return -(p * logq.gather(-1, ids)).sum(-1).mean(), logits.shape[-1]


def _distil_trainer():
    import torch
    from transformers import Trainer

    class DistilTrainer(Trainer):
        """Cross-entropy of the student's log-probabilities against the teacher's top-k distribution
        (renormalised over its k tokens), at every position."""

        def __init__(self, *args, bf16_autocast: bool = False, negatives: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.bf16_autocast, self.negatives = bf16_autocast, negatives
            self.candidates: list[int] = []  # softmax width per step (logged in distil.json)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_autocast):
                loss, width = distil_loss(model, inputs["input_ids"], inputs["topk_ids"], inputs["topk_logprobs"],
                                          self.negatives, seed=int(self.state.global_step))
            self.candidates.append(width)
            return (loss, {}) if return_outputs else loss

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
                                callbacks=[_progress_callback(progress)], bf16_autocast=cfg.bf16,
                                negatives=cfg.distil_negatives)
    loss, resumed = train_resuming(trainer, ckpt)
    model = trainer.model.eval()
    model.config.use_cache = True
    model.save_pretrained(str(out))
    _tokenizer(root / "init" / "small").save_pretrained(str(out))
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    (out / "distil.json").write_text(json.dumps({"steps": trainer.state.global_step, "train_loss": loss,
                                                 "resumed_from": resumed, "losses": losses,
                                                 "softmax_width_mean": (sum(trainer.candidates) / len(trainer.candidates)
                                                                        if trainer.candidates else None),
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
        out = forward(model, returned_cache(out), input_ids=x[:, cfg.cost_context:cfg.cost_context + 1], use_cache=True)
        t0 = time.perf_counter()
        for i in range(repeats):
            j = cfg.cost_context + 1 + i
            out = forward(model, returned_cache(out), input_ids=x[:, j:j + 1], use_cache=True)
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
    res["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # step times hold for this machine, then
    (root / "measure.json").write_text(json.dumps(res, indent=1))
    return res
