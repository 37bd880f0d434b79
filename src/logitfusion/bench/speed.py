"""Fused decoding speed, measured in ONE run on the same prompts and models.

    logitfusion bench speed                       # the bundled zoo, CPU
    logitfusion bench speed --shapes smollm2-cpu  # SmolLM2-135M-shaped large + a small of its vocabulary, CPU
    logitfusion bench speed --large L --small S --expert E1 --expert E2   # any models (or --recipe R.yaml)
    logitfusion bench speed --shapes tinyllama-13b --device cuda --dtype bfloat16
    (also: python benchmarks/decode_speed.py ...)

For each batch size, greedy decoding of exactly N tokens (EOS ignored) with:
  - the large model alone: HF `generate`, and our loop (solver `large`);
  - the component floor: one cached single-token forward of each model, timed alone, summed;
  - our loop: static a=0 (every model runs), proxy-tuning (a=1), dynamic with 1 expert,
    dynamic with 4 experts (fast path and joint);
  - a naive reference loop written the obvious way (one HF forward per model per step without
    reusing buffers, the grid evaluated in a Python loop, per-step concatenation);
and prints tokens/s with ratios: fused / large alone, fused / component floor, naive / ours.
Then the per-step cost of the small base with its experts as one forward (LoRA adapters: stacked
A and B applied by bmm, and PEFT's mixed-adapter batch; full fine-tunes: stacked weights) against
one forward per model.
Speed does not depend on trained weights, so `--shapes` builds random-initialised models of
real shapes: `smollm2-cpu` (SmolLM2-135M's shape, 30 layers x 576, vocabulary 49,152, and a small
model of the same vocabulary about 8x cheaper per step) for CPU measurements, TinyLlama-1.1B small +
Llama-2-7B/13B large for GPU ones.
Best of --repeats timed runs after one warm-up. The options are the `bench speed` command's
(cli/bench.py); `main` takes them as keywords. Progress goes to stderr, the report to stdout.
With given models (--large/--small/--expert, --recipe), the stacked-forward tables time the given
experts (those that are LoRA adapters of the small base, and the full fine-tunes), not random ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ..engine.compat import forward, returned_cache
from ..engine.config import EngineConfig
from ..engine.decoding import decode, render
from ..engine.fuser import Fuser
from ..engine.fusion import fuse, kl
from ..engine.members import Logits
from ..engine.sampling import SamplingParams
from ..engine.solvers import Dynamic
from .shapes import PAIRS, SHAPE_PAIRS, SHAPES, TIED
from .zoo import BUNDLED as BUNDLED_ZOO


def note(text: str) -> None:
    """Progress, on stderr (the report on stdout stays clean): a large model's tables take minutes."""
    print(f"[bench speed] {text}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: str) -> float:
    return best_times({"": fn}, repeats, device)[""]


def best_times(fns: dict, repeats: int, device: str, what: str = "") -> dict:
    """Best time of each function over `repeats` rounds in which the functions take turns, so that
    a slow spell of a shared machine slows every method alike instead of a few. A function that
    returns a float reports its own time (e.g. steps without their prefill). With `what`, each
    warm-up and round is noted as it starts."""
    for i, (label, fn) in enumerate(fns.items()):
        if what:
            note(f"{what}: warm-up {i + 1}/{len(fns)}{f' ({label})' if isinstance(label, str) and label else ''}")
        fn()  # warm-up
    best = dict.fromkeys(fns, math.inf)
    for r in range(repeats):
        if what:
            note(f"{what}: round {r + 1}/{repeats} of {len(fns)} timings")
        for label, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            own = fn()
            sync(device)
            best[label] = min(best[label], own if isinstance(own, float) else time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------- models

def zoo_models(root: Path, n_experts: int) -> dict:
    """The bundled zoo (or a zoo build): its bases and the first n_experts task experts."""
    from . import world
    if not (root / "models" / "large" / "config.json").exists():
        raise SystemExit(f"error: no zoo in {root} (--models): give a zoo folder, e.g. a `logitfusion zoo build` root")
    if n_experts > len(world.TASKS):
        raise SystemExit(f"error: --experts {n_experts}: the zoo has {len(world.TASKS)} task experts")
    experts = {f"e{i + 1}": str(root / "experts" / t) for i, t in enumerate(world.TASKS[:n_experts])}
    return {"large": str(root / "models" / "large"), "small": str(root / "models" / "small"), "experts": experts}


def shaped_models(root: Path, pair: str, n_experts: int, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Random-initialised models of real shapes (no download), saved once as safetensors. They are
    initialised on `device` in `dtype`: a 13B model made on a CPU in float32 first would take
    52 GB and minutes of a GPU session's time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..testing import toy
    small_name, large_name = PAIRS[pair]
    tok = toy.build_tokenizer(root / "tokenizer")
    # Filler tokens up to the models' vocabulary: fused logits are cut to the tokenizer's length,
    # so a 300-token tokenizer would time the solver, sampling and detokenising at 300, not 49k.
    tok.add_tokens([f"<x{i}>" for i in range(max(SHAPES[small_name][-1], SHAPES[large_name][-1]) - len(tok))])

    def build(name: str, out: Path, seed: int):
        if (out / "config.json").exists():
            return
        hidden, layers, heads, kv, inter, vocab = SHAPES[name]
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                          max_position_embeddings=4096, tie_word_embeddings=name in TIED, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        with torch.device("meta"):
            LlamaForCausalLM(cfg)  # validates the config cheaply
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))

    build(large_name, root / large_name, 1)
    build(small_name, root / small_name, 2)
    experts = {}
    for i in range(1, n_experts + 1):
        build(small_name, root / f"{small_name}-expert{i}", 2 + i)
        experts[f"e{i}"] = str(root / f"{small_name}-expert{i}")
    return {"large": str(root / large_name), "small": str(root / small_name), "experts": experts}


# ---------------------------------------------------------------- the naive reference

def naive_dynamic(models, prompts: list[str], n_tokens: int, grid: list[float]) -> list[list[int]]:
    """Dynamic fusion written the obvious way: one HF forward per model per step with a fresh
    cat of the inputs, and the grid searched in a Python loop. Greedy, fast multi-expert rule."""
    tok = models.tokenizer
    members = [models.large, models.small, *models.experts]
    enc = {m.role: tok([render(m.template, p) for p in prompts], return_tensors="pt", padding=True,
                       padding_side="left").to(m.device) for m in members}
    state = {m.role: (enc[m.role]["input_ids"], enc[m.role]["attention_mask"], None) for m in members}
    out = [[] for _ in prompts]
    for _ in range(n_tokens):
        z = {}
        for m in members:
            ids, mask, cache = state[m.role]
            step_ids = ids if cache is None else ids[:, -1:]
            pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]
            res = forward(m.model, cache=cache, input_ids=step_ids, attention_mask=mask, position_ids=pos,
                          use_cache=True, **m.forward_kwargs(len(prompts)))
            z[m.role] = res.logits[:, -1, : models.vocab_size].float()
            state[m.role] = (ids, mask, returned_cache(res))
        zl, zs = z[models.large.role], z[models.small.role]
        ze = torch.stack([z[m.role] for m in models.experts], 1)
        log_p, log_q = zl.log_softmax(-1), zs.log_softmax(-1)
        tokens = []
        for b in range(len(prompts)):
            best = (float("inf"), None)
            for t in range(ze.shape[1]):
                for a in grid:
                    w = torch.zeros(ze.shape[1])
                    w[t] = a
                    log_pa = fuse(zl[b:b + 1], zs[b:b + 1], ze[b:b + 1], w).log_softmax(-1)
                    j = 0.0
                    for u in range(ze.shape[1]):
                        log_qu = ze[b, u].log_softmax(-1)
                        j += float((kl(log_pa[0], log_p[b]) - kl(log_qu, log_q[b])) ** 2
                                   + (kl(log_p[b], log_pa[0]) - kl(log_q[b], log_qu)) ** 2)
                    if j < best[0]:
                        best = (j, log_pa[0])
            tokens.append(int(best[1].argmax()))
        for m in members:
            ids, mask, cache = state[m.role]
            new = torch.tensor(tokens, device=ids.device)[:, None]
            state[m.role] = (torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1), cache)
        for b, t in enumerate(tokens):
            out[b].append(t)
    return out


def solver_cost(batch: int, vocab: int, n_experts: int, device: str, repeats: int) -> float:
    """Seconds per step of the dynamic solver alone (fast path, 21-point grid) on random logits."""
    gen = torch.Generator().manual_seed(0)
    z = [(3 * torch.randn(batch, vocab, generator=gen)).to(device) for _ in range(2 + n_experts)]
    solver = Dynamic()
    logits = Logits.ordered(solver.reads, z)  # [large, small, expert 1, ...]
    return best_time(lambda: solver(logits), repeats, device)


def cache_cost(fuser, batch: int, n_tokens: int, device: str, repeats: int) -> dict[str, tuple[float, float]]:
    """Seconds per step of large alone and dynamic fusion over n_tokens, with the KV cache the
    loop uses (room reserved, written in place) and with transformers' DynamicCache (torch.cat
    every step). {solver: (reserved, cat)}"""
    from ..engine import context
    from transformers import DynamicCache
    prompts = [f"Question: {i % 12} plus {(3 * i) % 12}? Answer:" for i in range(batch)]
    reserved = context.reserved_cache
    caches = {"reserved": reserved, "cat": lambda config, capacity: DynamicCache(config=config)}

    def run(solver: str, cache):
        def go():
            context.reserved_cache = cache
            try:
                fuser.generate(prompts, solver=solver, max_new_tokens=n_tokens, ignore_eos=True, batch_size=batch)
            finally:
                context.reserved_cache = reserved
        return go

    best = best_times({(solver, name): run(solver, cache) for solver in ("large", "dynamic")
                       for name, cache in caches.items()}, repeats, device)
    return {solver: (best[(solver, "reserved")] / n_tokens, best[(solver, "cat")] / n_tokens)
            for solver in ("large", "dynamic")}


def tokens_per_forward(fuser, run, tokens: int) -> float:
    """Tokens each sequence gained per forward of the large model (its prefill included) in one run
    where every sequence decodes `tokens` tokens."""
    calls = []
    handle = fuser.models.large.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return tokens / len(calls)


def step_times(models, batch: int, variants: list[list[tuple[list, object]]], n_tokens: int, device: str,
               repeats: int, what: str = "") -> tuple[float, ...]:
    """Seconds per cached step of each variant: groups (members, module to run or None) run side
    by side, timed in turns."""
    prompts = [f"Question: {i % 12} plus {(5 * i) % 12}? Answer:" for i in range(batch)]
    fns = {str(i): steps(models, prompts, groups, n_tokens, device) for i, groups in enumerate(variants)}
    best = best_times(fns, repeats, device, what)
    return tuple(best[str(i)] / n_tokens for i in range(len(variants)))


def steps(models, prompts: list[str], groups: list[tuple[list, object]], n_tokens: int, device: str):
    """A function that prefills `groups` and runs n_tokens cached steps; it returns the seconds of
    the steps alone."""
    from ..engine.context import Context
    tok = models.tokenizer

    @torch.no_grad()
    def run() -> float:
        ctxs = [Context.prefill(g, [[tok(render(m.template, p))["input_ids"] for p in prompts] for m in g],
                                n_tokens, models.vocab_size, tok.pad_token_id or 0, True, module=module)
                for g, module in groups]
        nxt = ctxs[0][1][0].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            for ctx, _ in ctxs:
                ctx.step(nxt)
        sync(device)
        return time.perf_counter() - t0

    return run


def lora_folder(small: str) -> Path:
    """Where the random bench adapters of this small model live (never in the zoo): one folder per
    small model and config, so adapters of another model's shape are never picked up."""
    small_path = Path(small).resolve()
    config = small_path / "config.json"
    key = str(small_path) + (config.read_text() if config.is_file() else "")
    return Path(tempfile.gettempdir()) / f"logitfusion-bench-lora-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def random_lora_models(small: str, root: Path, n_experts: int, load: dict):
    """The small model with n random rank-8 LoRA adapters (made once under `root`), as a ModelSet
    in which the small model also stands in as "large": only the small side is timed (on a GPU a
    second 13B copy would not fit beside the bench's own)."""
    from ..testing import toy
    adapters = {}
    for i in range(1, n_experts + 1):
        out = root / f"bench-lora{i}"
        if not (out / "adapter_config.json").exists():
            toy.lora_adapter(small, out, rank=8, seed=200 + i)
        adapters[f"lora{i}"] = str(out)
    return Fuser.from_pretrained(small, small, adapters, load=load).models


def adapter_experts(models) -> list:
    """The experts that are LoRA adapters on the small base's module (they run with it as one forward)."""
    return [m for m in models.experts if m.adapter and m.model is models.small.model]


def lora_cost(models, batch: int, n_tokens: int, device: str, repeats: int) -> tuple[float, float, float, float]:
    """Per-step time of: the small base alone (the plain model, no PEFT); small + its LoRA experts
    (adapter_experts) as ONE forward with the adapters stacked (stacking.stack_lora, what decoding
    runs); the same as ONE forward through PEFT's mixed-adapter batch (the fallback); the same as
    n + 1 separate forwards. Returns the four times."""
    from ..engine.stacking import lora_stack
    group = [models.small, *adapter_experts(models)]  # one PEFT module
    alone = lora_stack(models, [models.small])  # no adapter: the plain base model
    return step_times(models, batch, [[([models.small], alone)], [(group, lora_stack(models, group))],
                                      [(group, None)], [([m], None) for m in group]], n_tokens, device, repeats,
                      f"LoRA experts, batch {batch}")


def full_cost(models, batch: int, n_tokens: int, device: str, repeats: int) -> tuple[float, float, float] | None:
    """Per-step time of: the small base alone; small + its full-weight experts as ONE forward on
    stacked weights; the same as separate forwards. Returns the three times (None: not stackable)."""
    from ..engine.stacking import shared_stack
    group = [models.small, *models.experts]
    stack, stacked = shared_stack(models, group)
    if not stacked:
        return None
    return step_times(models, batch, [[([models.small], None)], [(group, stack)], [([m], None) for m in group]],
                      n_tokens, device, repeats, f"full experts, batch {batch}")


# ---------------------------------------------------------------- main

def given_models(large: str, small: str, experts: Sequence[str]) -> dict:
    """--large/--small/--expert: experts as NAME=PATH or PATH (then named e1, e2, ...)."""
    named = [e.split("=", 1) if "=" in e else (f"e{i + 1}", e) for i, e in enumerate(experts)]
    if not named:
        raise SystemExit("error: --large and --small need at least one --expert PATH (or NAME=PATH) to fuse")
    return {"large": large, "small": small, "experts": dict(named)}


def recipe_models(recipe: Path) -> dict:
    """The members of a recipe (its templates, mapping and solver settings do not change speed here)."""
    from ..engine.recipe import Recipe
    r = Recipe.from_file(recipe)
    if r.small is None or not r.experts:
        raise SystemExit(f"error: {recipe} has no small model or no experts: nothing to fuse")
    return {"large": r.large.path, "small": r.small.path, "experts": {e.name: e.path for e in r.experts}}


def _paths(models: Path, shapes: str | None, given: dict | None, n_experts: int, device: str, dtype: str) -> dict:
    if given:
        return given
    if shapes:
        root = Path(tempfile.gettempdir()) / f"logitfusion-shapes-{shapes}-{dtype}"
        return shaped_models(root, shapes, n_experts, getattr(torch, dtype), device)
    return zoo_models(models, n_experts)


def _load(models: Path, shapes: str | None, n_experts: int, device: str, dtype: str, given: dict | None = None):
    """(model paths, a Fuser with every expert, the same models with the first expert only)."""
    paths = _paths(models, shapes, given, n_experts, device, dtype)
    many = Fuser.from_pretrained(paths["large"], paths["small"], paths["experts"],
                                 load={"dtype": dtype, "device": device})
    # The same loaded models with the first expert only (one copy of the large model in memory).
    one = Fuser(dataclasses.replace(many.models, experts=many.models.experts[:1], stacks={}), many.solver,
                many.recipe)
    return paths, many, one


def _methods(one, many, prompts: list[str], batch: int, tokens: int, speculate, n_experts: int):
    """{row label: a function decoding the prompts once}, tokens per large forward of the
    speculative rows, and the draft length of the fixed-k greedy rows."""
    models = many.models
    tok, large = models.tokenizer, models.large.model
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(models.large.device)

    def ours(fuser, method, k=0, temperature=0.0, adaptive=False):
        return lambda: fuser.generate(prompts, solver=method, max_new_tokens=tokens, ignore_eos=True,
                                      batch_size=batch, speculate=k, temperature=temperature, seed=0,
                                      speculate_adaptive=adaptive)

    def unshared(fuser, method):  # every model its own forward: no stacking, no shared LoRA batch
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        return lambda: decode(fuser.models, prompts, fuser.method(method), params, EngineConfig(share_forwards=False))

    def hf_generate():
        with torch.no_grad():
            large.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)

    fns = {"HF generate, large alone": hf_generate, "ours, large alone": ours(one, "large"),
           "ours, static a=0, 1 expert": ours(one, "static:0"), "ours, proxy-tuning a=1": ours(one, "static:1"),
           "ours, dynamic, 1 expert": ours(one, "dynamic")}
    per_forward = {}  # speculative rows: tokens emitted per large-model forward
    fixed_greedy = {}  # their fixed-k greedy rows: k
    k_max = max(speculate, default=0)
    variants = [(k, 0.0, False) for k in speculate] + [(k_max, 0.0, True), (k_max, 1.0, False), (k_max, 1.0, True)]
    for k, temperature, adaptive in variants:
        if k < 2:
            continue
        label = (f"ours, dynamic, 1 expert, speculative {'sampling (T=1) ' if temperature else ''}"
                 f"{'adaptive k<=' if adaptive else 'k='}{k}")
        fns[label] = ours(one, "dynamic", k, temperature, adaptive)
        per_forward[label] = tokens_per_forward(one, fns[label], tokens)
        if not temperature and not adaptive:
            fixed_greedy[label] = k
    fns[f"ours, dynamic fast, {n_experts} experts"] = ours(many, "dynamic:fast")
    fns[f"ours, dynamic fast, {n_experts} experts, separate forwards"] = unshared(many, "dynamic:fast")
    fns[f"ours, dynamic joint, {n_experts} experts"] = ours(many, "dynamic:joint")
    return fns, per_forward, fixed_greedy


def _decoding_table(one, many, batch: int, tokens: int, repeats: int, speculate, n_experts: int, device: str,
                    naive: bool) -> None:
    """One batch size: every method's tokens/s against the large model alone and the component floor."""
    models = many.models
    prompts = [f"Question: {i % 12} plus {(3 * i) % 12}? Answer:" for i in range(batch)]
    fns, per_forward, fixed_greedy = _methods(one, many, prompts, batch, tokens, speculate, n_experts)
    # The component floor: every model's cached steps timed alone, in the same rounds.
    floor_members = [models.large, models.small, *models.experts]
    fns.update({f"floor {m.role}": steps(models, prompts, [([m], None)], tokens, device) for m in floor_members})
    t = best_times(fns, repeats, device, f"batch {batch}")
    floors = [t.pop(f"floor {m.role}") for m in floor_members]
    floor1, floor_many = sum(floors[:3]), sum(floors)
    naive_s = None
    if naive:  # slow: timed once
        note(f"batch {batch}: the naive reference loop")
        grid = [round(0.1 * i, 1) for i in range(21)]
        with torch.no_grad():
            naive_s = best_time(lambda: naive_dynamic(models, prompts, tokens, grid), 1, device)
    base, n = t["ours, large alone"], batch * tokens
    print(f"## batch {batch}\n")
    print("| method | tokens/s | time / large alone | time / component floor |")
    print("|---|---:|---:|---:|")
    for label, seconds in t.items():
        floor = floor_many if f"{n_experts} experts" in label else floor1
        fl = f"{seconds / floor:.2f}x" if "static" in label or "proxy" in label or "dynamic" in label else ""
        print(f"| {label} | {n / seconds:.0f} | {seconds / base:.2f}x | {fl} |")
    print(f"| component floor, large + small + 1 expert | {n / floor1:.0f} | {floor1 / base:.2f}x | 1.00x |")
    print(f"| component floor, large + small + {n_experts} experts | {n / floor_many:.0f} | "
          f"{floor_many / base:.2f}x | 1.00x |")
    if naive_s is not None:
        ours_fast = t[f"ours, dynamic fast, {n_experts} experts"]
        print(f"| naive reference loop, dynamic, {n_experts} experts | {n / naive_s:.0f} | "
              f"{naive_s / base:.2f}x | {naive_s / floor_many:.2f}x |")
        print(f"\nnaive / ours (dynamic fast, {n_experts} experts, batch {batch}): {naive_s / ours_fast:.1f}x")
    for label, k in per_forward.items():
        print(f"\n{label}: {k:.2f} tokens per sequence per large-model forward (prefill included)", end="")
    print("\n")
    _draft_costs(t, per_forward, fixed_greedy, tokens)
    sys.stdout.flush()


def _draft_costs(t: dict, per_forward: dict, fixed_greedy: dict, tokens: int) -> None:
    """What one more drafted position cost, in plain dynamic steps, from the fixed-k greedy rows:
    a run of R rounds of k took t_k against t_1 for `tokens` plain steps, so
    c = (t_k / R / (t_1 / tokens) - 1) / (k - 1). The recipe's generation.draft_cost takes it."""
    plain = t["ours, dynamic, 1 expert"] / tokens
    costs = []
    for label, k in fixed_greedy.items():
        rounds = max(tokens / per_forward[label] - 1, 1)  # large forwards less the prefill
        costs.append(f"k={k}: {(t[label] / rounds / plain - 1) / (k - 1):.2f}")
    if costs:
        print(f"draft cost (one more drafted position, in plain dynamic steps; generation.draft_cost): "
              f"{', '.join(costs)}\n")


def _lora_models(paths: dict, models, n_experts: int, load: dict, given: bool):
    """What the LoRA table times: the given experts that are adapters of the small base (None if
    none is), else n random rank-8 adapters of the small model. (title, models) or None."""
    if given:
        adapters = adapter_experts(models)
        names = ", ".join(m.name for m in adapters)
        return (f"the given experts that are LoRA adapters of the small base ({names})", models) if adapters else None
    lora = random_lora_models(paths["small"], lora_folder(paths["small"]), n_experts, load)
    return f"experts that are LoRA adapters of the small base ({n_experts} random adapters, rank 8)", lora


def _stacked_tables(paths: dict, models, batches, tokens: int, repeats: int, n_experts: int, load: dict,
                    device: str, given: bool = False) -> None:
    """The small base with its experts as one forward: LoRA adapters, then full fine-tunes. Given
    models: their own experts (random adapters would not time them)."""
    lora = _lora_models(paths, models, n_experts, load, given)
    if lora is None:
        print("## experts that are LoRA adapters of the small base\n\nnone of the given experts is a LoRA "
              "adapter of the small base: nothing to time\n")
    else:
        _lora_table(lora[0], lora[1], batches, tokens, repeats, device)
    print(f"## experts that are full fine-tunes of the small base ({n_experts} experts, weights stacked)\n")
    print("| batch | small alone, ms/step | small + full experts, stacked forward | same, separate forwards | "
          "stacked / small alone | separate / stacked |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        times = full_cost(models, batch, tokens, device, repeats)
        if times is None:
            print(f"| {batch} | the small base and its experts cannot be stacked (not full models of one config) |")
            continue
        alone, shared, separate = times
        print(f"| {batch} | {alone * 1e3:.2f} | {shared * 1e3:.2f} | {separate * 1e3:.2f} | "
              f"{shared / alone:.2f}x | {separate / shared:.2f}x |")
    print(flush=True)


def _lora_table(title: str, models, batches, tokens: int, repeats: int, device: str) -> None:
    print(f"## {title}\n")
    print("small alone: the plain base model. Stacked: small + adapters as one forward, every adapter's A and B "
          "stacked and applied by bmm (what decoding runs). PEFT mixed: one forward through PEFT's per-row "
          "`adapter_names` (a loop over adapters in every LoRA layer; the fallback). Separate: one PEFT forward "
          "per model.\n")
    print("| batch | small alone, ms/step | small + LoRA experts, stacked forward | same, PEFT mixed-adapter forward | "
          "same, separate forwards | stacked / small alone | PEFT mixed / small alone | separate / stacked |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        alone, stacked, mixed, separate = lora_cost(models, batch, tokens, device, repeats)
        print(f"| {batch} | {alone * 1e3:.2f} | {stacked * 1e3:.2f} | {mixed * 1e3:.2f} | {separate * 1e3:.2f} | "
              f"{stacked / alone:.2f}x | {mixed / alone:.2f}x | {separate / stacked:.2f}x |")
    print(flush=True)


def _cache_and_solver_tables(one, models, batches, long_tokens: int, repeats: int, n_experts: int,
                             device: str) -> None:
    long = min(long_tokens, (models.large.context or 512) - 64)
    print(f"## the KV cache: room reserved up front vs torch.cat every step (1 expert, {long} tokens)\n")
    print("| batch | large alone, reserved, ms/step | same, cat | dynamic, reserved | same, cat | cat / reserved |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        note(f"KV cache, batch {batch}: {long} tokens, 4 runs x {repeats + 1}")
        c = cache_cost(one, batch, long, device, repeats)
        print(f"| {batch} | {c['large'][0] * 1e3:.2f} | {c['large'][1] * 1e3:.2f} | {c['dynamic'][0] * 1e3:.2f} | "
              f"{c['dynamic'][1] * 1e3:.2f} | {c['large'][1] / c['large'][0]:.2f}x, {c['dynamic'][1] / c['dynamic'][0]:.2f}x |")
    print(flush=True)
    note("the weight solver alone")
    print("## the weight solver alone (dynamic, fast path, 21-point grid, random logits)\n")
    print(f"| batch | vocabulary | 1 expert, ms/step | {n_experts} experts, ms/step |")
    print("|---:|---:|---:|---:|")
    for batch in batches:
        for vocab in sorted({models.vocab_size, 32000}):
            one_ms, many_ms = (solver_cost(batch, vocab, n, device, 10 * repeats) * 1e3 for n in (1, n_experts))
            print(f"| {batch} | {vocab} | {one_ms:.2f} | {many_ms:.2f} |")
    print(flush=True)


def main(tokens: int = 32, batch: Sequence[int] = (1, 8), repeats: int = 3, experts: int = 4,
         models: Path | None = None, shapes: str | None = None, speculate: Sequence[int] = (2, 4),
         long_tokens: int = 400, device: str = "cpu", dtype: str = "float32", naive: bool = True,
         given: dict | None = None) -> None:
    """Run every table and print it (markdown). models: a zoo folder (default: the bundled zoo);
    shapes: random models of real shapes instead (SHAPE_PAIRS); given: {"large", "small",
    "experts": {name: path}} (given_models, recipe_models), which sets the number of experts."""
    if shapes is not None and shapes not in SHAPE_PAIRS:
        raise ValueError(f"shapes must be one of {', '.join(SHAPE_PAIRS)}, got {shapes!r}")
    if given:
        experts = len(given["experts"])
    torch.manual_seed(0)
    note(f"loading the models ({'given' if given else shapes or 'the zoo'}, {experts} experts) on {device}")
    paths, many, one = _load(models or BUNDLED_ZOO, shapes, experts, device, dtype, given)
    m = many.models
    print(f"# decode_speed: torch {torch.__version__}, {platform.machine()}, device {device}, "
          f"dtype {dtype}, {torch.get_num_threads()} CPU threads, "
          f"{torch.cuda.get_device_name() if device.startswith('cuda') else platform.processor()}")
    source = f"{paths['large']} + {paths['small']} + {len(paths['experts'])} experts" if given else shapes or "the zoo"
    print(f"# models: {source}; {tokens} new tokens, greedy, EOS ignored; "
          f"vocab {m.vocab_size}; best of {repeats} rounds in which the methods take turns\n", flush=True)
    for b in batch:
        _decoding_table(one, many, b, tokens, repeats, list(speculate), experts, device, naive)
    _stacked_tables(paths, m, batch, tokens, repeats, experts, {"dtype": dtype, "device": device}, device,
                    given=bool(given))
    _cache_and_solver_tables(one, m, batch, long_tokens, repeats, experts, device)
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"peak process memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
