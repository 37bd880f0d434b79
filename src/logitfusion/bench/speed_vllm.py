"""`logitfusion bench speed --engine vllm`: the large model in vLLM against our HF engine, in ONE run.

    logitfusion bench speed --engine vllm --batch 1 --batch 8 --batch 32             # the bundled zoo
    logitfusion bench speed --engine vllm --shapes smollm2-cpu --batch 1 --batch 8 --batch 32

For each batch size, greedy decoding of exactly N tokens (EOS ignored) of the same prompts with the
same models (the large model, the small base and the first expert):
  - vLLM, large alone: requests of method `large` on the fused engine (the processor is registered
    and passes their logits through: what a fused server's unfused requests cost);
  - vLLM fused, static a=1 (proxy-tuning) and dynamic: the processor runs the small side;
  - our HF engine: large alone, static a=1, dynamic;
and prints tokens/s, the fused / large-alone time ratios and vLLM fused / HF fused throughput, and
whether the fused greedy tokens of the two engines are identical. vLLM starts once (its start is
timed apart); the HF engine loads after vLLM has stopped. Best of --repeats rounds in which the
methods take turns, after one warm-up. vLLM's CPU attention needs a head size of 32, 64, 80 or
more: the zoo (32) and the smollm2-cpu shapes (64) run.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
import yaml

from .speed import best_times, note

METHODS = ("large", "static:1.0", "dynamic")


def recipe_for(paths: dict, folder: Path, tokens: int, slots: int, dtype: str, device: str, kind: str) -> Path:
    """A recipe of the bench's models (the first expert) for one engine."""
    name, path = next(iter(paths["experts"].items()))
    data = {"large": {"path": paths["large"]}, "small": {"path": paths["small"]},
            "experts": [{"name": name, "path": path}], "solver": {"kind": "dynamic"},
            "load": {"dtype": dtype, "device": device}}
    if kind == "vllm":
        data["backend"] = {"kind": "vllm", "enforce_eager": True, "max_model_len": 64 + tokens, "max_num_seqs": slots,
                           "options": {"seed": 0}}
    out = folder / f"{kind}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def timed_methods(fuser, prompts: list[str], batches: Sequence[int], tokens: int, repeats: int, what: str):
    """{(batch, method): seconds} and {(batch, method): token ids} of one engine."""
    outs = {}

    def run(b: int, method: str):
        def go():
            outs[(b, method)] = [g.token_ids for g in fuser.generate(prompts[:b], solver=method, max_new_tokens=tokens,
                                                                     ignore_eos=True, batch_size=b)]
        return go

    times = {}
    for b in batches:
        times |= best_times({(b, m): run(b, m) for m in METHODS}, repeats, "cpu", f"{what}, batch {b}")
    return times, outs


def main(paths: dict, tokens: int = 32, batch: Sequence[int] = (1, 8, 32), repeats: int = 3, dtype: str = "float32",
         device: str = "cpu", source: str = "") -> None:
    from ..engine.fuser import Fuser
    from ..vllm.backend import load, quiet_vllm
    quiet_vllm()  # the report goes to stdout
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    batches = sorted(set(batch))
    prompts = [f"Question: {i % 12} plus {(3 * i) % 12}? Answer:" for i in range(max(batches))]
    folder = Path(tempfile.mkdtemp(prefix="logitfusion-bench-vllm-"))
    note("starting vLLM (the large model) with the fusion processor")
    t0 = time.perf_counter()
    vf = load(recipe_for(paths, folder, tokens, max(batches), dtype, device, "vllm"))
    start = time.perf_counter() - t0
    try:
        runs = {"vLLM": timed_methods(vf, prompts, batches, tokens, repeats, "vLLM")}
    finally:
        vf.close()
    note("loading our HF engine")
    hf = Fuser.from_recipe(recipe_for(paths, folder, tokens, max(batches), dtype, device, "hf"))
    # torch's own thread count, and one thread (vLLM's CPU worker binds one core per rank and keeps
    # the other for its front end): on a shared machine the two can differ a lot
    for threads in dict.fromkeys([torch.get_num_threads(), 1] if device == "cpu" else [torch.get_num_threads()]):
        torch.set_num_threads(threads)
        label = f"HF engine, {threads} thread{'s' if threads > 1 else ''}"
        runs[label] = timed_methods(hf, prompts, batches, tokens, repeats, label)
    report(runs, batches, tokens, repeats, start, source, dtype)


def report(runs: dict, batches, tokens: int, repeats: int, start: float, source: str, dtype: str) -> None:
    """Tokens/s per engine, then the issue's ratios: vLLM fused / vLLM large alone (time), vLLM fused /
    the best HF engine fused (throughput)."""
    import vllm
    print(f"# bench speed --engine vllm: vLLM {vllm.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, dtype {dtype}")
    print(f"# models: {source}, first expert; {tokens} new tokens, greedy, EOS ignored; best of {repeats} rounds "
          f"in which the methods take turns; vLLM engine start {start:.0f} s\n")
    print("tokens/s (time / large alone on the same engine)\n")
    print("| batch | engine | large alone | static:1.0 | dynamic | greedy tokens = vLLM's |")
    print("|---:|---|---:|---:|---:|---|")
    vt, vo = runs["vLLM"]
    for b in batches:
        n = b * tokens
        for name, (t, outs) in runs.items():
            base = t[(b, "large")]
            cells = [f"{n / base:.0f}"] + [f"{n / t[(b, m)]:.0f} ({t[(b, m)] / base:.2f}x)" for m in METHODS[1:]]
            same = "" if name == "vLLM" else "yes" if all(outs[(b, m)] == vo[(b, m)] for m in METHODS) else "NO"
            print(f"| {b} | {name} | {' | '.join(cells)} | {same} |")
    print("\nvLLM fused against vLLM large alone (time; targets <= 1.5x static, <= 1.6x dynamic) and against "
          "the faster HF engine row (throughput; target >= 2x at batch 8)\n")
    print("| batch | vLLM static / large | vLLM dynamic / large | vLLM / HF, static | vLLM / HF, dynamic |")
    print("|---:|---:|---:|---:|---:|")
    for b in batches:
        best = {m: min(t[(b, m)] for name, (t, _) in runs.items() if name != "vLLM") for m in METHODS}
        print(f"| {b} | {vt[(b, 'static:1.0')] / vt[(b, 'large')]:.2f}x | {vt[(b, 'dynamic')] / vt[(b, 'large')]:.2f}x | "
              f"{best['static:1.0'] / vt[(b, 'static:1.0')]:.2f}x | {best['dynamic'] / vt[(b, 'dynamic')]:.2f}x |")
    print(flush=True)
    sys.stdout.flush()
