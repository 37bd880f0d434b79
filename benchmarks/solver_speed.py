"""The dynamic weight solver alone at real shapes, against a component-floor step (issue 16, item 2).

    .venv/bin/python benchmarks/solver_speed.py                 # batch 1 and 8, vocab 32000 and 49152, 1 and 4 experts
    .venv/bin/python benchmarks/solver_speed.py --repeats 3 --no-floor

Per shape (21-point grid, the fast path for 4 experts), in rounds where the methods take turns
(best of --repeats):
  - full scan, eager: `grid_search` over every grid point, the reference (Dynamic(search="scan"));
  - full scan, compiled: the same with `fusion.objective` through torch.compile, unchanged (not
    bit-exact: its argmin can differ from the reference's at near-ties; the mismatches are counted);
  - exact search, compiled kernel: `search.exact_search` (what Dynamic(search="auto") runs at
    these sizes when a compiler is there), whose answer is the reference's, bit for bit (checked);
  - exact search, eager kernel (no compiler).
Logits: a small base (3 N(0,1)), experts fine-tuned from it (+ 1.5 N(0,1)), a large model that
agrees with the small one in part (small + 2 N(0,1)); a fixed seed, a batch of rows per shape.
The component floor: one cached single-token forward of a model of SmolLM2-135M's shape (30
layers x 576, vocabulary 49,152; random weights: speed does not depend on them), timed in the
same rounds, times the number of models (large + small + experts, all of that shape).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from logitfusion.engine import search
from logitfusion.engine.compat import forward, returned_cache
from logitfusion.engine.fusion import objective
from logitfusion.engine.solvers import grid_search, make_grid, one_expert_candidates


def logits(batch: int, vocab: int, n_experts: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_small = 3 * torch.randn(batch, vocab, generator=g)
    z_experts = z_small[:, None] + 1.5 * torch.randn(batch, n_experts, vocab, generator=g)
    z_large = z_small + 2 * torch.randn(batch, vocab, generator=g)
    return z_large, z_small, z_experts


def floor_forward(batch: int, vocab: int = 49152):
    """A function timing one cached single-token forward of a SmolLM2-135M-shaped model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, vocab, (batch, 32))
    with torch.no_grad():
        cache = returned_cache(model(prompt, use_cache=True))
    token = torch.randint(0, vocab, (batch, 1))

    def step():
        with torch.no_grad():
            forward(model, cache=cache, input_ids=token, use_cache=True)
        cache.crop(-1)  # back to the prompt: every timed step sees the same context
    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152])
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="time a SmolLM2-135M-shaped forward for the solver / floor ratios")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# solver_speed: torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} CPU threads; "
          f"21-point grid; best of {args.repeats} rounds in which the methods take turns\n")
    grid = torch.tensor(make_grid(0.0, 2.0, 0.1))
    compiled_objective = torch.compile(objective, dynamic=False)
    rows = []
    for batch in args.batch:
        floor = None
        if args.floor:
            step = floor_forward(batch)
            step()
        for vocab in args.vocab:
            for n in args.experts:
                z = logits(batch, vocab, n)
                cands = one_expert_candidates(grid, n)

                def scan_compiled():
                    j = compiled_objective(*z, cands)
                    return cands[j.argmin(-1)]

                fns = {"full scan, eager": lambda: grid_search(*z, cands),
                       "full scan, compiled": scan_compiled,
                       "exact search, compiled kernel": lambda: search.exact_search(*z, grid, compiled=True),
                       "exact search, eager kernel": lambda: search.exact_search(*z, grid, compiled=False)}
                first = {}
                for label, fn in fns.items():  # first call: compiles (once per shape here)
                    t0 = time.perf_counter()
                    fn()
                    first[label] = time.perf_counter() - t0
                if args.floor:
                    fns["floor forward"] = step
                best = dict.fromkeys(fns, math.inf)
                for _ in range(args.repeats):
                    for label, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        best[label] = min(best[label], time.perf_counter() - t0)
                if args.floor:
                    forward = best.pop("floor forward")
                    floor = forward * (2 + n)
                reference = grid_search(*z, cands)
                exact = search.exact_search(*z, grid, compiled=True)
                assert torch.equal(exact[0], reference[0]) and torch.equal(exact[1], reference[1])
                differ = int((scan_compiled() != reference[0]).any(-1).sum())
                rows.append((batch, vocab, n, best, first, floor, differ))
                print(f"batch {batch}, vocab {vocab}, {n} expert(s): "
                      + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in best.items())
                      + (f"; floor step {floor * 1e3:.0f} ms" if floor else ""), flush=True)

    print("\n| batch | vocabulary | experts | full scan, eager (reference), ms | full scan, compiled, ms "
          "| exact search, compiled kernel, ms | exact search, eager kernel, ms | scan / search | "
          "component floor step, ms | search / floor | scan / floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, vocab, n, best, first, floor, differ in rows:
        scan, comp = best["full scan, eager"], best["full scan, compiled"]
        exact, eager = best["exact search, compiled kernel"], best["exact search, eager kernel"]
        fl = (f"{floor * 1e3:.0f} | {exact / floor:.1%} | {scan / floor:.1%}" if floor else "| |")
        print(f"| {batch} | {vocab} | {n} | {scan * 1e3:.2f} | {comp * 1e3:.2f} | {exact * 1e3:.2f} | "
              f"{eager * 1e3:.2f} | {scan / exact:.1f}x | {fl} |")
    print("\nfirst calls (compiles included), s: "
          + "; ".join(f"batch {b} vocab {v} experts {n}: compiled scan {f['full scan, compiled']:.1f}, "
                      f"exact search {f['exact search, compiled kernel']:.1f}" for b, v, n, _, f, _, _ in rows))
    print("rows where the compiled full scan's argmin differs from the reference's: "
          + ", ".join(f"{d}/{b}" for b, _, _, _, _, _, d in rows))
    print("the exact search's answers equal the reference's (weights and J, bit for bit): checked for every shape")


if __name__ == "__main__":
    main()
