"""Every place logitfusion reaches into another library's internals (not its public API): the
transformers forward's cache keyword and KV-cache layers, the RMSNorm that stacking specialises,
GGUF architecture tables, PEFT's LoRA layer attributes, and the lm-eval functions patched while it
runs. Each is listed with the version it was checked against (`CHECKED`); when an installed
version breaks one, `CompatError` names the library, both versions and what broke, instead of
an AttributeError from deep inside. Also the "logitfusion" logger (`log`), where fast paths say
that they fall back.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from importlib import metadata
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("logitfusion")

# The versions every use below was checked against (the test environment's). A newer version may
# well work; when one does not, the error says which use broke.
CHECKED = {"transformers": "5.25.0", "peft": "0.22.0", "lm_eval": "0.4.13", "torch": "2.13.0"}


class CompatError(RuntimeError):
    """An installed library no longer has an internal logitfusion relies on."""


def installed(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def broken(lib: str, what: str, cause: BaseException | str) -> CompatError:
    """The error for a `lib` internal (`what`) that the installed version no longer has."""
    return CompatError(f"logitfusion relies on {lib} internals ({what}), checked against {lib} {CHECKED[lib]}; "
                       f"the installed {lib} {installed(lib)} breaks it: {cause}. Install {lib}=={CHECKED[lib]} "
                       "(or a version between) and report the break")


@contextmanager
def internals(lib: str, what: str) -> Iterator[None]:
    """Turns a missing module, class or attribute of `lib` inside the block into `broken`."""
    try:
        yield
    except (ImportError, AttributeError) as e:
        raise broken(lib, what, e) from e


# ---------------------------------------------------------------- transformers: the forward call

# transformers 5.24 renamed the forward's cache argument (and the output's field) to `cache`, and
# keeps `past_key_values` with a FutureWarning until 5.40; older 5.x know only `past_key_values`.
# Every cached forward goes through `forward`, so the keyword is chosen here, once, by what the
# installed transformers' outputs hold: never the deprecated name where the new one exists.
def _cache_keyword() -> str:
    import dataclasses
    with internals("transformers", "transformers.modeling_outputs.CausalLMOutputWithPast"):
        from transformers.modeling_outputs import CausalLMOutputWithPast
        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in fields else "past_key_values"


CACHE_KEYWORD = _cache_keyword()


def forward(model: nn.Module, cache=None, **inputs):
    """model(**inputs) with the KV cache passed as this transformers expects. A cache the model
    did not use (the keyword silently swallowed by **kwargs) raises rather than decoding without
    history."""
    out = model(**inputs, **{CACHE_KEYWORD: cache})
    if cache is not None and inputs.get("use_cache", True) and returned_cache(out) is not cache:
        raise broken("transformers", f"the forward's `{CACHE_KEYWORD}=` argument",
                     f"{type(model).__name__} did not use the cache passed under that name")
    return out


def returned_cache(out):
    """The KV cache a forward returned."""
    with internals("transformers", f"the model output's `{CACHE_KEYWORD}`"):
        return getattr(out, CACHE_KEYWORD)


# ---------------------------------------------------------------- transformers: KV-cache layers

@functools.cache
def _reserved_layer():
    with internals("transformers", "transformers.cache_utils.DynamicLayer"):
        from transformers.cache_utils import DynamicLayer
        DynamicLayer.lazy_initialization  # noqa: B018 - ReservedLayer.update calls it

    class ReservedLayer(DynamicLayer):
        """Keys and values live in a buffer with room for the whole context: a step writes its
        position in place, where DynamicLayer's torch.cat copies the whole cache every step
        (steps 1.2x faster at batch 8 over 400 tokens on the zoo, CPU; `bench speed`). They stay
        views of that buffer; code that replaces them (rows joining or leaving) gets a new
        buffer at the next update."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.buffer = capacity, None

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            # key_states, value_states: [rows, heads, t, head_dim]
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = (self.keys.shape[-2] if self.keys.dim() == 4 else 0), key_states.shape[-2]
            k, v = self.buffer or (None, None)
            if (k is None or self.keys.data_ptr() != k.data_ptr() or self.keys.shape[:-2] != k.shape[:-2]
                    or n + t > k.shape[-2]):
                shape = (*key_states.shape[:-2], max(self.capacity, 2 * (n + t)), key_states.shape[-1])
                k, v = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    k[..., :n, :], v[..., :n, :] = self.keys, self.values
                self.buffer = (k, v)
            k[..., n:n + t, :], v[..., n:n + t, :] = key_states, value_states
            self.keys, self.values = k[..., :n + t, :], v[..., :n + t, :]
            return self.keys, self.values

    return ReservedLayer


def reserved_cache(config, capacity: int):
    """A DynamicCache whose plain layers reserve room for `capacity` positions up front (see
    ReservedLayer). Other layer kinds (sliding windows...) are left as transformers makes them."""
    with internals("transformers", "DynamicCache(config=...).layers and DynamicLayer"):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
        cache = DynamicCache(config=config)
        kinds = {type(layer).__name__ for layer in cache.layers}
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_reserved_layer()(capacity) for _ in cache.layers]
    else:
        _once(f"KV cache layers {sorted(kinds)} ({getattr(config, 'model_type', '?')}) keep transformers' own "
              "update (a copy of the whole cache per step) instead of writing in place")
    return cache


def _layers(cache, role: str) -> list:
    """The cache's layers, each with keys and values [rows, heads, T, head_dim] that rows joining
    and leaving rewrite directly (none when there is no cache)."""
    if cache is None:
        return []
    with internals("transformers", "Cache.layers"):
        layers = cache.layers
    if any(type(layer).__name__ not in ("DynamicLayer", "ReservedLayer") for layer in layers):
        raise NotImplementedError("joining a running batch needs a plain dynamic KV cache "
                                  f"({role} uses {type(layers[0]).__name__})")
    return layers


def left_pad_cache(cache, n: int, role: str) -> None:
    """n empty positions before every row's cached ones."""
    for layer in _layers(cache, role):
        layer.keys = F.pad(layer.keys, (0, 0, n, 0))
        layer.values = F.pad(layer.values, (0, 0, n, 0))


def merge_caches(mine, theirs, order: Tensor, role: str) -> None:
    """mine's rows, then theirs, reordered by `order` [rows]; both have the same positions."""
    for a, b in zip(_layers(mine, role), _layers(theirs, role)):
        a.keys = torch.cat([a.keys, b.keys])[order]
        a.values = torch.cat([a.values, b.values])[order]


def select_cache(cache, rows: Tensor, start: int, role: str) -> None:
    """Keep these rows, and the positions from `start` on."""
    for layer in _layers(cache, role):
        layer.keys, layer.values = layer.keys[rows, :, start:], layer.values[rows, :, start:]


@functools.cache
def _once(message: str) -> None:
    log.info(message)


@functools.cache
def warn_once(message: str) -> None:
    """A fallback the user asked not to have (said once per process and message)."""
    log.warning(message)


# ---------------------------------------------------------------- transformers: modules and GGUF

def is_llama_rmsnorm(m: nn.Module) -> bool:
    """Modules whose forward is exactly LlamaRMSNorm's (Llama, Mistral, Qwen2/3 copy it verbatim;
    Gemma's 1 + weight variant does not match and is vmapped instead), compared by bytecode."""
    with internals("transformers", "transformers.models.llama.modeling_llama.LlamaRMSNorm"):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    f, ref = type(m).forward, LlamaRMSNorm.forward
    return (f is ref or (f.__code__.co_code == ref.__code__.co_code and f.__code__.co_names == ref.__code__.co_names
                         and f.__code__.co_consts == ref.__code__.co_consts)) \
        and hasattr(m, "variance_epsilon") and [n for n, _ in m.named_parameters()] == ["weight"]


def gguf_architectures() -> set[str] | None:
    """The GGUF architectures transformers turns into a causal LM (its own names and llama.cpp's
    spellings of them, qwen2moe, gpt-oss...); None when this transformers does not say."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:
        _once(f"transformers {installed('transformers')} has no GGUF architecture tables "
              f"(checked against {CHECKED['transformers']}); a GGUF's architecture is not checked before loading")
        return None
    names = set(GGUF_CONFIG_MAPPING) | set(GGUF_CONFIG_ARCHS)
    names |= {n.replace("_", "") for n in names} | {n.replace("_", "-") for n in names}
    return names - {"general", "tokenizer", "t5", "umt5", "t5encoder"}  # encoder-decoders: not causal LMs


# ---------------------------------------------------------------- PEFT: LoRA layers

def lora_layer_classes() -> tuple[type, type]:
    """(peft's LoraLayer, its LoRA Linear)."""
    with internals("peft", "peft.tuners.lora.LoraLayer and Linear"):
        from peft.tuners.lora import Linear, LoraLayer
    return LoraLayer, Linear


def lora_adapters(layer: nn.Module) -> set[str]:
    """The adapters with weights on this LoRA layer."""
    with internals("peft", "LoraLayer.lora_A / lora_embedding_A"):
        return set(layer.lora_A) | set(layer.lora_embedding_A)


def plain_lora_problem(path: str, layer: nn.Module, used: list[str]) -> str | None:
    """Why `layer` does not apply the `used` adapters as plain LoRA on an nn.Linear (what a
    stacked bmm computes exactly), or None."""
    _, lora_linear = lora_layer_classes()
    with internals("peft", "LoRA layer attributes (base_layer, merged, use_dora, lora_variant, lora_bias)"):
        if type(layer) is not lora_linear or type(layer.base_layer) is not nn.Linear:
            return (f"{path}: LoRA on a {type(layer.get_base_layer()).__name__} ({type(layer).__name__}); "
                    "only LoRA on plain nn.Linear layers is stacked")
        if layer.merged or layer.disable_adapters:
            return f"{path}: adapters are merged into the base weights or disabled"
        for name in used:
            if layer.use_dora.get(name) or name in layer.lora_variant:
                variant = "DoRA" if layer.use_dora.get(name) else type(layer.lora_variant[name]).__name__
                return f"adapter {name!r} is a LoRA variant ({variant}) on {path}; only plain LoRA is stacked"
            if layer.lora_bias.get(name):
                return f"adapter {name!r} has a LoRA bias (lora_bias) on {path}"
        kinds = {(layer.lora_A[n].weight.dtype, layer.lora_A[n].weight.device) for n in used}
    if len(kinds) > 1:
        return f"{path}: the adapters' weights differ in dtype or device ({sorted(map(str, kinds))})"
    return None


def lora_factors(layer: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """Adapter `name`'s update on a LoRA Linear as (A [r, in], B [out, r]) with its scale folded
    into B: the update is x A^T B^T."""
    with internals("peft", "LoraLayer.lora_A / lora_B / scaling"):
        return layer.lora_A[name].weight, layer.lora_B[name].weight * layer.scaling[name]


# ---------------------------------------------------------------- lm-eval: patched while it runs

@contextmanager
def lean_lm_eval() -> Iterator[None]:
    """simple_evaluate also collects environment details (torch's collect_env runs pip in
    subprocesses: seconds per call), a git hash, and draws a tqdm bar per task. `run_task` records
    none of them, so they are switched off while it runs (and restored after). A function this
    lm-eval no longer has is left alone (said in the log): only speed is at stake."""
    import lm_eval.api.task as lm_task
    import lm_eval.evaluator as lm_evaluator
    from tqdm import tqdm
    wanted = ((lm_evaluator, "add_env_info"), (lm_evaluator, "get_git_commit_hash"), (lm_task, "tqdm"))
    saved = [(mod, name, getattr(mod, name)) for mod, name in wanted if hasattr(mod, name)]
    if len(saved) < len(wanted):
        missing = [f"{mod.__name__}.{name}" for mod, name in wanted if not hasattr(mod, name)]
        _once(f"lm-eval {installed('lm_eval')} has no {', '.join(missing)} (checked against "
              f"{CHECKED['lm_eval']}); left as they are")
    replacement = {"add_env_info": lambda storage: None, "get_git_commit_hash": lambda: None,
                   "tqdm": functools.partial(tqdm, disable=True)}
    for mod, name, _ in saved:
        setattr(mod, name, replacement[name])
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def lm_eval_cli_task_paths(task_paths: Callable) -> None:
    """Make the lm-eval CLI's TaskManager (run, ls, validate) index the folders task_paths(
    include_path) returns, ours first: lm-eval's CLI builds `lm_eval.tasks.TaskManager` itself."""
    with internals("lm_eval", "lm_eval.tasks.TaskManager"):
        import lm_eval.tasks as lm_tasks
        base = lm_tasks.TaskManager
    if getattr(base, "_logitfusion", False):
        return

    class TaskManager(base):  # type: ignore[misc, valid-type]
        _logitfusion = True

        def __init__(self, *args, include_path=None, **kwargs):
            super().__init__(*args, include_path=task_paths(include_path), **kwargs)

    lm_tasks.TaskManager = TaskManager
