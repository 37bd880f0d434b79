"""Tiny Llama-architecture models built on the fly, offline, in seconds.

They stand in for real checkpoints in tests and in the demo until the bundled zoo exists: a real
BPE tokenizer trained on a small corpus and randomly initialised models saved as ordinary
Hugging Face directories (config.json + model.safetensors), so every loading path is the real one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

_WORDS = ("the a one two three four five six seven eight nine ten cat dog bird fish tree river "
          "city road house king queen child farmer river mountain sells buys has gives takes "
          "apples pears coins books boats how many does have now is are was were and then with "
          "answer question total each more less than after before plus minus equals").split()


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))))
        lines.append(f"Question: {a} plus {b}? Answer: {a + b}.")
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 300, seed: int = 0):
    """Byte-level BPE trained on the toy corpus, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed=seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(out_dir: str | Path, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                seed: int = 0, init_std: float = 0.2, context: int = 256, extra_vocab_rows: int = 0):
    """A randomly initialised Llama. A large init_std gives peaked next-token distributions, so
    greedy decoding has no near-ties and equality tests are meaningful."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer) + extra_vocab_rows, hidden_size=hidden,
                         intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=context,
                         initializer_range=init_std, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out_dir))  # safetensors by default
    tokenizer.save_pretrained(str(out_dir))
    return model


def perturbed_copy(src_dir: str | Path, out_dir: str | Path, scale: float = 0.05, seed: int = 1):
    """A 'fine-tuned' expert: the small base plus seeded noise (same architecture and vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src_dir))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(src_dir)).save_pretrained(str(out_dir))
    return model


def lora_adapter(base_dir: str | Path, out_dir: str | Path, rank: int = 4, seed: int = 2):
    """A LoRA adapter of the small base with random (non-zero) A and B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def vllm_family(root: str | Path) -> Path:
    """A large model, a small base and two full experts (root/large, small, expert1, expert2) that
    vLLM's CPU attention can run: head size 32, where build_family's large model has 24."""
    root = Path(root)
    tok = build_tokenizer(root / "tokenizer")
    build_model(root / "large", tok, hidden=64, layers=2, heads=2, seed=10)
    build_model(root / "small", tok, hidden=48, layers=2, heads=4, seed=20)
    for i in (1, 2):
        perturbed_copy(root / "small", root / f"expert{i}", scale=0.5, seed=30 + i)
    return root


def build_family(root: str | Path, n_experts: int = 2, lora: bool = True, seed: int = 0) -> dict:
    """Tokenizer, large, small, `n_experts` full experts and (optionally) one LoRA expert.

    Returns {"large": path, "small": path, "experts": {name: path}}.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(root / "tokenizer", seed=seed)
    build_model(root / "large", tok, hidden=96, layers=3, heads=4, seed=seed + 10)
    build_model(root / "small", tok, hidden=48, layers=2, heads=4, seed=seed + 20)
    experts = {}
    for i in range(n_experts):
        name = f"expert{i + 1}"
        perturbed_copy(root / "small", root / name, scale=0.5, seed=seed + 30 + i)
        experts[name] = str(root / name)
    if lora:
        lora_adapter(root / "small", root / "lora1", seed=seed + 40)
        experts["lora1"] = str(root / "lora1")
    return {"large": str(root / "large"), "small": str(root / "small"), "experts": experts}


def arithmetic_facts(seed: int = 0, max_n: int = 12) -> tuple[list[str], list[tuple[str, str]]]:
    """Toy 'world knowledge' and a toy task on it.

    Knowledge lines state sums in prose ("3 plus 4 makes 7."); the task asks them in another
    format ("Question: 3 plus 4? Answer: 7"), which base models never saw: only the expert is
    fine-tuned on it, on a training half of the pairs. Returns (knowledge lines, test pairs).
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_n) for b in range(max_n)]
    rng.shuffle(pairs)
    knowledge = [f"{a} plus {b} makes {a + b}." for a, b in pairs]
    test = [(f"Question: {a} plus {b}? Answer:", str(a + b)) for a, b in pairs[: len(pairs) // 4]]
    return knowledge, test


def task_lines(seed: int = 0, max_n: int = 12) -> list[str]:
    """Training data of the toy task (disjoint from the test pairs of `arithmetic_facts`)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_n) for b in range(max_n)]
    rng.shuffle(pairs)
    return [f"Question: {a} plus {b}? Answer: {a + b}\n" for a, b in pairs[len(pairs) // 4:]]


# ---------------------------------------------------------------- toy task data (shipped in tasks/data)

def toy_task_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(toy_sums rows, toy_knowledge rows) from `arithmetic_facts`: the held-out sums with four
    numeric choices (multiple-choice variant), and the prose 'knowledge' lines."""
    knowledge, test = arithmetic_facts(seed=seed)
    rng = random.Random(seed)
    sums = []
    for question, answer in test:
        right = int(answer)
        wrong = [v for v in (right - 2, right - 1, right + 1, right + 2) if v >= 0]
        choices = [right] + rng.sample(wrong, 3)
        rng.shuffle(choices)
        sums.append({"question": question, "answer": answer, "choices": [str(c) for c in choices],
                     "gold": choices.index(right)})
    return sums, [{"text": line} for line in knowledge]


def write_toy_task_data(folder: str | Path | None = None) -> None:
    """Rewrite the toy task files shipped in eval/tasks/data (a test checks they match)."""
    from ..eval.lm import TASKS_DIR
    folder = TASKS_DIR / "data" if folder is None else folder
    sums, knowledge = toy_task_rows()
    for name, rows in (("toy_sums.jsonl", sums), ("toy_knowledge.jsonl", knowledge)):
        (Path(folder) / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
