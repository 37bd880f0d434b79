"""Fused decoding speed vs the large model alone, measured in ONE run on the same prompts.

    .venv/bin/python benchmarks/decode_speed.py [--tokens 64] [--batch 1 8] [--repeats 3]

Builds the toy models of `logitfusion demo` (or reuses them) and times greedy decoding of N
tokens with: HF generate on the large model, our loop running the large model alone, our loop
with static weights 0 (every model runs), static a=1, dynamic with one expert. Prints tokens/s
and ratios to the large model alone. Best of `--repeats` runs, after one warm-up.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from logitfusion import Fuser
from logitfusion.demo import build_demo_models
from rich.console import Console


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", type=Path, default=Path("demo_out/models"))
    args = ap.parse_args()
    torch.manual_seed(0)
    console = Console()
    paths = build_demo_models(args.models, console)
    fuser = Fuser.from_pretrained(str(paths["large"]), str(paths["small"]), {"arith": str(paths["expert"])})
    tok, large = fuser.models.tokenizer, fuser.models.large.model
    console.print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads; {args.tokens} new tokens, greedy, no EOS stop")
    for batch in args.batch:
        prompts = [f"Question: {i} plus {i + 1}? Answer:" for i in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")

        def hf():  # min_new_tokens: exactly N tokens, like ignore_eos in ours
            large.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)

        rows = {"HF generate, large": best_time(hf, args.repeats)}
        for label, method in [("ours, large alone", "large"), ("ours, static a=0 (all models)", "static:0"),
                              ("ours, static a=1 (proxy-tuning)", "static:1"), ("ours, dynamic, 1 expert", "dynamic")]:
            rows[label] = best_time(lambda: fuser.generate(prompts, solver=method, max_new_tokens=args.tokens,
                                                           ignore_eos=True, batch_size=batch), args.repeats)
        base = rows["ours, large alone"]
        console.print(f"\n[bold]batch {batch}[/]")
        console.print(f"{'method':34s} {'tokens/s':>9s} {'time / large alone':>19s}")
        for label, seconds in rows.items():
            console.print(f"{label:34s} {batch * args.tokens / seconds:9.0f} {seconds / base:19.2f}x")


if __name__ == "__main__":
    main()
