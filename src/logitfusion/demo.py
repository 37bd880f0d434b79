"""`logitfusion demo`: tiny models built and trained on the fly, four methods side by side.

Until the bundled zoo exists, the demo makes its own models in about a minute: a large and a
small base trained on toy "knowledge" (sums written as prose), and an expert: the small base
fine-tuned on a question/answer format the bases never saw. The large model knows more; the
expert knows the format; fusion should get the format from the expert.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import toy

METHODS = [("large base", "large"), ("small expert", "expert"), ("proxy-tuning (a=1)", "static:1.0"),
           ("dynamic fusion", "dynamic")]


def build_demo_models(root: Path, console: Console) -> dict:
    done = root / "DONE"
    paths = {"large": root / "large", "small": root / "small", "expert": root / "expert"}
    if done.exists():
        return paths
    knowledge, _ = toy.arithmetic_facts()
    with console.status("building toy models (once, about a minute)..."):
        t0 = time.time()
        tok = toy.build_tokenizer(root / "tokenizer")
        toy.build_model(root / "large-init", tok, hidden=128, layers=4, heads=4, seed=10, init_std=0.02)
        toy.build_model(root / "small-init", tok, hidden=48, layers=2, heads=4, seed=20, init_std=0.02)
        l_large = toy.train_lm(root / "large-init", paths["large"], knowledge, steps=1500, lr=1e-3, seed=1)
        l_small = toy.train_lm(root / "small-init", paths["small"], knowledge, steps=800, seed=2)
        l_exp = toy.train_lm(paths["small"], paths["expert"], toy.task_lines(), steps=600, seed=3)
    console.print(f"toy models built in {time.time() - t0:.0f}s (final losses: large {l_large:.2f}, "
                  f"small {l_small:.2f}, expert {l_exp:.2f})")
    done.write_text("ok\n")
    return paths


def run_demo(out: Path, n_prompts: int = 12, max_new_tokens: int = 8, console: Console | None = None) -> list[dict]:
    from .fuser import Fuser
    from .plotting import plot_weights

    console = console or Console()
    out = Path(out)
    paths = build_demo_models(out / "models", console)
    fuser = Fuser.from_pretrained(str(paths["large"]), str(paths["small"]), {"arith": str(paths["expert"])})
    _, test = toy.arithmetic_facts()
    test = test[:n_prompts]
    prompts = [q for q, _ in test]
    rows, examples = [], {}
    # What the large model knows, asked in the prose format it was trained on: the knowledge
    # that fusion should carry over into the question format.
    probe = [q.replace("Question: ", "").replace("? Answer:", " makes") for q in prompts]
    gens = fuser.generate(probe, solver="large", max_new_tokens=max_new_tokens, stop=["\n", "."])
    probe_acc = sum(g.text.strip().split(" ")[0] == ans for g, (_, ans) in zip(gens, test)) / len(test)
    for label, method in METHODS:
        t0 = time.perf_counter()
        gens = fuser.generate(prompts, solver=method, max_new_tokens=max_new_tokens, stop=["\n"],
                              trace=method == "dynamic")
        seconds = time.perf_counter() - t0
        n_tokens = sum(len(g.token_ids) for g in gens)
        correct = sum(g.text.strip().split(" ")[0].rstrip(".") == ans for g, (_, ans) in zip(gens, test))
        rows.append({"method": label, "accuracy": correct / len(test), "tokens_per_s": n_tokens / seconds})
        examples[label] = gens
    table = Table(title=f"toy sums, {len(test)} held-out questions, greedy, {max_new_tokens} new tokens max")
    for col in ("method", "accuracy", "tokens/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], f"{r['accuracy']:.0%}", f"{r['tokens_per_s']:.0f}")
    table.add_row("[dim]large base, asked in prose (knowledge probe)[/]", f"[dim]{probe_acc:.0%}[/]", "")
    console.print(table)
    console.print("The probe row is what the large model knows in the format it was trained on; "
                  "fusion aims to bring that into the question format the expert learned. These "
                  "toy models are tiny: treat the numbers as a smoke test, not a result.")
    answers = Table(title="first answers")
    answers.add_column("question")
    for label, _ in METHODS:
        answers.add_column(label)
    for i in range(min(4, len(test))):
        answers.add_row(prompts[i], *[repr(examples[label][i].text) for label, _ in METHODS])
    console.print(answers)
    plot = plot_weights(examples["dynamic fusion"], fuser.expert_names, out / "weights.png",
                        max_panels=4, title="dynamic fusion: expert weight per step")
    console.print(f"weights over steps: {plot}")
    return rows
