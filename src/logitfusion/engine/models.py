"""Loading the models a fusion runs: local Hugging Face directories (full models or LoRA adapters)
or GGUF files (llama.cpp, Ollama, LM Studio), which are dequantised into plain models.

Security defaults: weights come from safetensors or GGUF files unless the caller opts in to
pickled `.bin` weights (`allow_pickle`), and `trust_remote_code` is off unless asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compat import gguf_architectures
from .members import KINDS, Member, ModelSet, role_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the model and the fix."""


class VocabularyMismatchError(LoadError):
    pass


@dataclass
class LoadOptions:
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    device: str = "cpu"  # cpu | cuda | cuda:1 | mps ... (ignored when device_map is set)
    device_map: str | dict | None = None  # accelerate sharding, e.g. "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # allow pickled .bin weights (unsafe: can run code)
    vocab_cache: str | None = None  # folder for PM-MinED maps built by `mapping: auto` (None: not saved)

    def torch_dtype(self):
        if self.dtype == "auto":
            return "auto"
        if self.dtype not in DTYPES:
            raise LoadError(f"unknown dtype {self.dtype!r}; use one of float32, bfloat16, float16, auto")
        return DTYPES[self.dtype]


def model_kind(path: str | Path, role: str) -> str:
    """'model' (a model directory or a GGUF) or 'adapter'; a clear LoadError for anything else."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{role}: path {str(p)!r} does not exist; give a local Hugging Face model directory "
                        "or a .gguf file")
    if gguf_file(p, role) is not None:
        return "model"
    if not p.is_dir():
        raise LoadError(f"{role}: {str(p)!r} is a file, not a model directory "
                        "(expected a folder with config.json and *.safetensors, or a .gguf file)")
    if (p / "adapter_config.json").exists():
        return "adapter"
    if (p / "config.json").exists():
        return "model"
    raise LoadError(f"{role}: {str(p)!r} is not a Hugging Face model directory "
                    "(no config.json, nor adapter_config.json for a PEFT adapter, nor a .gguf file)")


def _check_weight_format(p: Path, role: str, allow_pickle: bool, adapter: bool) -> None:
    # An adapter is judged by the one file PEFT reads: adapter_model.safetensors if present, else
    # adapter_model.bin (torch.load), whatever other *.safetensors lie beside it.
    has_safe = (p / "adapter_model.safetensors").is_file() if adapter else any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt"))
    if has_safe:
        return
    if has_pickle and not allow_pickle:
        what = ("has no adapter_model.safetensors, so PEFT would read its pickled .bin weights" if adapter
                else "has only pickled weights (.bin/.pt)")
        raise LoadError(f"{role}: {str(p)!r} {what}, which can run code "
                        "when loaded. Convert them to safetensors, or opt in with allow_pickle "
                        "(recipe load.allow_pickle: true, CLI --allow-pickle) if you trust the files.")
    if not has_pickle:
        what = "adapter_model.safetensors" if adapter else "*.safetensors weights"
        raise LoadError(f"{role}: {str(p)!r} has no weights ({what} not found)")


def check_device(device: str) -> None:
    """A device torch knows and this machine has; found before any weights load."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise LoadError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:1, mps...") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available()}.get(dev.type, lambda: True)
    if not available():
        raise LoadError(f"device {device!r} is not available on this machine (torch {torch.__version__}); "
                        "use cpu, or install a torch build for it")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LoadError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA devices")


def load_tokenizer(path: str | Path, role: str, opts: LoadOptions):
    from transformers import AutoTokenizer
    if (gguf := gguf_file(path, role)) is not None:
        return _gguf_tokenizer(gguf, role)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=opts.trust_remote_code)
    except Exception as e:  # transformers raises many types here
        raise LoadError(f"{role}: could not load a tokenizer from {str(path)!r}: {e}") from e


def load_causal_lm(path: str | Path, role: str, opts: LoadOptions) -> nn.Module:
    from transformers import AutoModelForCausalLM
    p = Path(path)
    if (gguf := gguf_file(p, role)) is not None:
        return _gguf_model(gguf, role, opts)
    _check_weight_format(p, role, opts.allow_pickle, adapter=False)
    kwargs: dict[str, Any] = dict(dtype=opts.torch_dtype(), trust_remote_code=opts.trust_remote_code,
                                  use_safetensors=None if opts.allow_pickle else True)
    if opts.device_map is not None:
        kwargs["device_map"] = opts.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    except Exception as e:
        raise LoadError(f"{role}: could not load a causal LM from {str(p)!r}: {e}") from e
    if opts.device_map is None:
        model.to(opts.device)
    return model.eval()


# -- GGUF files (llama.cpp, Ollama, LM Studio). transformers reads them (metadata, tokenizer, weights
# through the `gguf` package) but keeps a GGUF quantizer on the model that refuses to save it; every
# GGUF here is dequantised into a plain model, which saves, stacks and runs like any other.

_GGUF_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_GGUF_FIX = "download or convert it again (llama.cpp's convert_hf_to_gguf.py writes a whole file)"


def gguf_file(path: str | Path, role: str) -> Path | None:
    """The GGUF file `path` names: a .gguf file, or a folder without config.json holding exactly one
    .gguf; None when it is neither."""
    p = Path(path)
    if p.is_file():
        found = [p] if p.suffix.lower() == ".gguf" else []
    elif p.is_dir() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        found = sorted(p.glob("*.gguf"))
    else:
        found = []
    if len(found) > 1:
        raise LoadError(f"{role}: {str(p)!r} holds {len(found)} GGUF files ({', '.join(f.name for f in found[:5])}); "
                        f"name the one to load, e.g. {str(found[0])!r}")
    if found and _GGUF_SPLIT.search(found[0].name):
        raise LoadError(f"{role}: {str(found[0])!r} is one part of a split GGUF, which transformers cannot load; "
                        "merge the parts first (llama.cpp: llama-gguf-split --merge FIRST_PART OUT.gguf)")
    return found[0] if found else None


@lru_cache(maxsize=None)
def _dequantisable(qtype) -> bool:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, dequantize
    try:  # one block of zeros: the gguf package answers for the types it can unpack
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    except Exception:  # any other complaint is about the zeros, not the type
        return True
    return True


@dataclass
class GgufInfo:
    architecture: str
    tokens: int
    dtype: torch.dtype  # the file's float type (dtype "auto"); float32 for quantised files


def inspect_gguf(f: Path, role: str) -> GgufInfo:
    """Read a GGUF's header and refuse what cannot load, naming the file and the fix: not a GGUF,
    truncated, an architecture or quantisation transformers cannot turn into a plain model, no
    tokenizer. The tensors are only mapped, never read, so this is cheap on a 10 GB file."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader
    except ImportError:
        raise LoadError(f"{role}: {str(f)!r} is a GGUF file, which needs the `gguf` package: pip install gguf") from None
    with open(f, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LoadError(f"{role}: {str(f)!r} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                            "give a .gguf from llama.cpp, Ollama or LM Studio, or a Hugging Face model directory")
    size = f.stat().st_size
    try:
        reader = GGUFReader(str(f))
    except Exception as e:  # the reader fails on a short file with whatever numpy says
        raise LoadError(f"{role}: {str(f)!r} is truncated or damaged ({size} bytes; the GGUF reader says: {e}); "
                        f"{_GGUF_FIX}") from None
    ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
    if ends and max(ends) > size:
        raise LoadError(f"{role}: {str(f)!r} is truncated: its tensors need {max(ends)} bytes but the file has "
                        f"{size}; {_GGUF_FIX}")
    arch = _gguf_field(reader, "general.architecture")
    known = gguf_architectures()
    if known is not None and arch not in known:
        raise LoadError(f"{role}: {str(f)!r} is a GGUF of architecture {arch!r}, which transformers cannot load as "
                        f"a causal LM (it reads {', '.join(sorted(known))}); use a model of one of those, or its "
                        "original Hugging Face checkpoint")
    bad = sorted({t.tensor_type.name for t in reader.tensors if not _dequantisable(t.tensor_type)})
    if bad:
        raise LoadError(f"{role}: {str(f)!r} holds tensors quantised as {', '.join(bad)}, which the gguf package "
                        "cannot dequantise; use another quantisation of this model (F16, BF16, Q8_0, Q4_K_M, ...)")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise LoadError(f"{role}: {str(f)!r} has no tokenizer (no tokenizer.ggml.tokens); fusion needs the "
                        "vocabulary: use a GGUF written with its tokenizer, as llama.cpp's converter does")
    floats = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    dtype = {frozenset({GGMLQuantizationType.F16}): torch.float16,
             frozenset({GGMLQuantizationType.BF16}): torch.bfloat16}.get(frozenset(floats), torch.float32)
    return GgufInfo(arch, len(tokens), dtype)


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def _gguf_tokenizer(f: Path, role: str):
    """The tokenizer (and chat template) the GGUF carries. transformers' byte-level builder adds a
    `<|endoftext|>` the file may not have (Llama 3's has not); such extras are dropped, or the
    tokenizer would be one token longer than the model's vocabulary."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    n = inspect_gguf(f, role).tokens
    try:
        tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    except Exception as e:
        raise LoadError(f"{role}: could not build a tokenizer from the GGUF {str(f)!r}: {e}") from e
    if len(tok) <= n:
        return tok
    data = json.loads(tok.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n]
    specials = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if getattr(tok, k) is not None and tok.convert_tokens_to_ids(getattr(tok, k)) < n}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   chat_template=tok.chat_template, **specials)


def _gguf_model(f: Path, role: str, opts: LoadOptions) -> nn.Module:
    """Dequantise a GGUF into a plain model of the requested dtype ("auto": the file's float type)."""
    from transformers import AutoModelForCausalLM, GgufConfig
    if opts.device_map is not None:
        raise LoadError(f"{role}: device_map cannot shard a GGUF while it is dequantised; convert it first "
                        f"(logitfusion convert {str(f)!r} OUT_DIR) and give OUT_DIR instead")
    info = inspect_gguf(f, role)
    dtype = opts.torch_dtype()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(f.parent), gguf_file=f.name, dtype=info.dtype if dtype == "auto" else dtype,
            trust_remote_code=False, quantization_config=GgufConfig(dequantize=True))
    except Exception as e:
        raise LoadError(f"{role}: could not load the GGUF {str(f)!r} as a causal LM: {e}") from e
    # Dequantised, the weights are ordinary tensors; without the quantizer the model saves and runs
    # like one read from safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(opts.device)
    return model.eval()


def load_gguf(path: str | Path, role: str, opts: LoadOptions):
    """(plain model, tokenizer) from a GGUF file or a folder holding one."""
    f = gguf_file(path, role)
    if f is None:
        raise LoadError(f"{role}: {str(path)!r} is not a .gguf file nor a folder holding one")
    return _gguf_model(f, role, opts), _gguf_tokenizer(f, role)


def check_same_vocabulary(tokenizers: dict[str, Any], show: int = 5) -> None:
    """Token string -> id maps must be equal (same size is not enough)."""
    names = list(tokenizers)
    ref_name, ref = names[0], tokenizers[names[0]].get_vocab()
    ref_by_id = {i: t for t, i in ref.items()}
    for name in names[1:]:
        other = tokenizers[name].get_vocab()
        if other == ref:
            continue
        other_by_id = {i: t for t, i in other.items()}
        diffs = []
        for i in sorted(set(ref_by_id) | set(other_by_id)):
            a, b = ref_by_id.get(i), other_by_id.get(i)
            if a != b:
                diffs.append(f"id {i}: {a!r} in {ref_name} vs {b!r} in {name}")
        raise VocabularyMismatchError(
            f"{ref_name} and {name} have different vocabularies ({len(ref)} vs {len(other)} tokens, "
            f"{len(diffs)} ids differ; first: {'; '.join(diffs[:show])}). Dynamic fusion needs the "
            "same token -> id map in every model: use a small model from the large model's family, "
            "or, when the small base and its experts share a tokenizer that differs from the large "
            "model's, enable cross-vocabulary fusion with `mapping: auto` on the recipe's `small` "
            "(a PM-MinED map) or `mapping: FILE` from `logitfusion vocab map`.")


def added_special_tokens(tok) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The token ids a tokenizer adds before and after a prompt's own (BOS, EOS, a prefix...)."""
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return tuple(full[:i]), tuple(full[i + len(plain):])
    return tuple(full), ()


def _describe_added(tok, added: tuple[tuple[int, ...], tuple[int, ...]]) -> str:
    parts = [f"{tok.convert_ids_to_tokens(list(ids))} (ids {list(ids)}) {where}"
             for ids, where in zip(added, ("before", "after")) if ids]
    return " and ".join(parts) if parts else "nothing"


def check_same_special_tokens(tokenizers: dict[str, Any]) -> None:
    """Members that share a vocabulary read a prompt as one tokenizer writes it, so each must add the
    same special tokens around a prompt (a BOS, an EOS); a model used to another start decodes garbage."""
    names = list(tokenizers)
    ref_name, ref = names[0], added_special_tokens(tokenizers[names[0]])
    for name in names[1:]:
        other = added_special_tokens(tokenizers[name])
        if other != ref:
            raise LoadError(
                f"{ref_name} and {name} share a vocabulary but not the special tokens around a prompt: {ref_name}'s "
                f"tokenizer adds {_describe_added(tokenizers[ref_name], ref)}, {name}'s adds "
                f"{_describe_added(tokenizers[name], other)}. Give every member a tokenizer that adds the same "
                "(e.g. the same add_bos_token / add_eos_token in tokenizer_config.json; for a GGUF, `logitfusion "
                "convert` it and copy the other members' tokenizer files into the folder)")


def same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def resolve_map(user_tok, member_tok, mapping: str, role: str, opts: LoadOptions):
    """The PM-MinED map from the user (large) model's vocabulary onto a member's: built (and cached
    in opts.vocab_cache when set) for "auto", else read from a file made by `logitfusion vocab map`,
    which must belong to these two tokenizers."""
    from .vocab import VocabError, VocabMap, build_or_load, from_hf
    try:
        user, member = from_hf(user_tok, "large"), from_hf(member_tok, role)
        if mapping == "auto":
            return build_or_load(user, member, opts.vocab_cache)
        vmap = VocabMap.load(mapping)
    except VocabError as e:
        raise LoadError(f"{role}.mapping: {e}") from None
    if not vmap.matches(user, member):
        raise LoadError(f"{role}.mapping: {mapping!r} was built for other tokenizers (or another version of the "
                        f"rules); rebuild it with `logitfusion vocab map --from LARGE --to {role.upper()} --out "
                        f"{mapping}`, or write `mapping: auto`")
    return vmap


ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def check_expert_architecture(small: nn.Module, expert: nn.Module, role: str) -> None:
    diffs = [f"{f}: {getattr(small.config, f, None)} in small vs {getattr(expert.config, f, None)} in {role}"
             for f in ARCH_FIELDS if getattr(small.config, f, None) != getattr(expert.config, f, None)]
    if diffs:
        raise LoadError(f"{role} is not derived from the small base model's architecture "
                        f"({'; '.join(diffs)}). Experts must be fine-tuned from the small base.")


def _context_of(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _logit_rows(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


@dataclass
class Loading:
    """What the members of one fusion share while they load: the options, the large model's
    tokenizer, what a small-side member needs when its vocabulary is mapped (`foreign`), and the
    small base (its experts are fine-tunes or LoRA adapters of it)."""

    opts: LoadOptions
    tokenizer: Any
    foreign: dict
    large_weights: bool = True
    expert_kinds: list[str] = field(default_factory=list)  # "model" or "adapter", per expert
    small: Member | None = None


def load_model_set(large: dict, small: dict | None, experts: list[dict], opts: LoadOptions,
                   delta: dict | None = None, large_weights: bool = True) -> ModelSet:
    """Load every model of a fusion. Each spec: {"path", "template"} (+ "name" for experts).

    LoRA adapters among the experts are attached to the one loaded small base (PEFT
    multi-adapter), not loaded as separate copies. `small` may carry "mapping" ("auto" or a map
    file): then the small base and experts (one shared tokenizer) may differ from the large
    model's vocabulary, and their logits are mapped into it. `delta` ({"path", "template",
    "mapping"}) is a cross-model-control delta model for the large (user) model.
    large_weights=False loads the large model's tokenizer only (another backend, e.g. vLLM, runs
    it; the small side fuses its logits through rows.FusionRows).

    The vocabularies and special tokens are agreed first (`_tokenizers`); then each member kind
    loads by its entry in LOADERS, in the engine's order of kinds (members.KINDS).
    """
    if opts.device_map is None:
        check_device(opts.device)
    if experts and not small:
        raise LoadError("experts need a small base model (the model they were fine-tuned from); "
                        "set `small` in the recipe or pass --small")
    specs = {"large": large, "small": small, "expert": experts, "delta": delta}
    ctx = _tokenizers(large, small, experts, opts)
    ctx.large_weights = large_weights
    loaded = {kind: LOADERS[kind](specs[kind], ctx) if specs[kind] else None for kind in KINDS}
    vocab_size = len(ctx.tokenizer)
    for member in [loaded["large"], loaded["small"], *(loaded["expert"] or []), loaded["delta"]]:
        need = (member.vocab or vocab_size) if member is not None else 0
        if member is not None and member.model is not None and _logit_rows(member.model) < need:
            raise LoadError(f"{member.role}: the model outputs {_logit_rows(member.model)} logits but the "
                            f"tokenizer has {need} tokens; tokenizer and weights do not belong together")
    return ModelSet(ctx.tokenizer, loaded["large"], loaded["small"], loaded["expert"] or [], vocab_size,
                    loaded["delta"])


def _tokenizers(large: dict, small: dict | None, experts: list[dict], opts: LoadOptions) -> Loading:
    """Every member's tokenizer, and their agreement: one vocabulary and the same special tokens
    around a prompt, or the small side mapped onto the large model's vocabulary (small.mapping)."""
    roles = {"large": large} | ({"small": small} if small else {})
    for role, spec in roles.items():
        if model_kind(spec["path"], role) == "adapter":
            raise LoadError(f"{role}: {spec_path(spec)!r} is a PEFT adapter; the {role} model must be "
                            "a full model directory (only experts may be adapters)")
    expert_kinds = [model_kind(e["path"], role_of("expert", e["name"])) for e in experts]  # before any load
    tokenizers = {role: load_tokenizer(spec["path"], role, opts) for role, spec in roles.items()}
    for e in experts:
        role = role_of("expert", e["name"])
        has_tok = any((Path(e["path"]) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
        # A GGUF always carries a tokenizer; an adapter or expert without tokenizer files inherits the small base's.
        if has_tok or gguf_file(e["path"], role) is not None:
            tokenizers[role] = load_tokenizer(e["path"], role, opts)
    tokenizer = tokenizers["large"]
    side = {r: t for r, t in tokenizers.items() if r != "large"}
    small_map = None
    if small and small.get("mapping") and not same_vocabulary(tokenizer, tokenizers["small"]):
        check_same_vocabulary(side)  # the small base and its experts still share one vocabulary
        check_same_special_tokens(side)
        small_map = resolve_map(tokenizer, tokenizers["small"], small["mapping"], "small", opts)
    else:
        check_same_vocabulary(tokenizers)
        check_same_special_tokens(tokenizers)
    foreign = dict(tokenizer=tokenizers["small"], vocab_map=small_map,
                   vocab=len(tokenizers["small"])) if small_map is not None else {}
    return Loading(opts, tokenizer, foreign, expert_kinds=expert_kinds)


def _load_large(spec: dict, ctx: Loading) -> Member:
    model = load_causal_lm(spec["path"], "large", ctx.opts) if ctx.large_weights else None
    return Member("large", model, None, spec.get("template", "{prompt}"),
                  _context_of(model) if model is not None else None)


def _load_small(spec: dict, ctx: Loading) -> Member:
    model = load_causal_lm(spec["path"], "small", ctx.opts)
    ctx.small = Member("small", model, None, spec.get("template", "{prompt}"), _context_of(model), **ctx.foreign)
    return ctx.small


def _load_experts(specs: list[dict], ctx: Loading) -> list[Member]:
    """Full experts load as models of the small base's architecture; LoRA adapters attach to the
    small base's module (then the small member runs it with adapters off, "__base__")."""
    kinds = ctx.expert_kinds
    small_model = ctx.small.model
    adapters = [(e, k) for e, k in zip(specs, kinds) if k == "adapter"]
    if adapters:
        ctx.small.model, ctx.small.adapter = _attach_adapters(small_model, adapters, ctx.opts), "__base__"
    out = []
    for e, kind in zip(specs, kinds):
        role, template = role_of("expert", e["name"]), e.get("template", "{prompt}")
        if kind == "adapter":
            out.append(Member(role, ctx.small.model, e["name"], template, _context_of(small_model), **ctx.foreign))
        else:
            m = load_causal_lm(e["path"], role, ctx.opts)
            check_expert_architecture(small_model, m, role)
            out.append(Member(role, m, None, template, _context_of(m), **ctx.foreign))
    return out


def _load_delta(spec: dict, ctx: Loading) -> Member:
    """The delta model of cross-model control. Its own tokenizer decides: the user's vocabulary
    (used as is), or another one, which needs `mapping` (auto or a map file)."""
    user_tok, opts = ctx.tokenizer, ctx.opts
    if model_kind(spec["path"], "delta") == "adapter":
        raise LoadError(f"delta: {spec_path(spec)!r} is a PEFT adapter; a delta model must be a full model "
                        "directory (as `logitfusion delta train` writes)")
    tok = load_tokenizer(spec["path"], "delta", opts)
    vmap = None
    if not same_vocabulary(tok, user_tok):
        if not spec.get("mapping"):
            raise VocabularyMismatchError(
                f"delta: its vocabulary ({len(tok)} tokens) is not the large (user) model's ({len(user_tok)} "
                "tokens), and no mapping is given. Set `mapping: auto` in the recipe's `delta` section to map "
                "the vocabularies (PM-MinED, cached with load.vocab_cache), or `mapping: FILE` from "
                "`logitfusion vocab map --from LARGE --to DELTA --out FILE`.")
        vmap = resolve_map(user_tok, tok, spec["mapping"], "delta", opts)
    else:
        check_same_special_tokens({"large": user_tok, "delta": tok})
    model = load_causal_lm(spec["path"], "delta", opts)
    extra = dict(tokenizer=tok, vocab_map=vmap, vocab=len(tok)) if vmap is not None else {}
    return Member("delta", model, None, spec.get("template", "{prompt}"), _context_of(model), **extra)


# How each member kind loads (members.KINDS declares the kinds): load_model_set is a loop over this.
LOADERS = {"large": _load_large, "small": _load_small, "expert": _load_experts, "delta": _load_delta}


def spec_path(spec: dict) -> str:
    return str(spec["path"])


def _attach_adapters(small_model: nn.Module, adapters: list[tuple[dict, str]], opts: LoadOptions):
    from peft import PeftModel
    peft_model = None
    for spec, _ in adapters:
        role, path = role_of("expert", spec["name"]), Path(spec["path"])
        _check_weight_format(path, role, opts.allow_pickle, adapter=True)
        cfg = json.loads((path / "adapter_config.json").read_text())
        if cfg.get("peft_type", "LORA").upper() != "LORA":
            raise LoadError(f"{role}: adapter type {cfg.get('peft_type')!r} is not supported; "
                            "experts may be LoRA adapters or full models")
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(small_model, str(path), adapter_name=spec["name"])
            else:
                peft_model.load_adapter(str(path), adapter_name=spec["name"])
        except Exception as e:
            raise LoadError(f"{role}: could not attach LoRA adapter {str(path)!r} to the small base "
                            f"(is it an adapter of that model?): {e}") from e
    return peft_model.eval()


def convert_gguf(src: str | Path, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write a GGUF as a plain Hugging Face model directory (config.json, model.safetensors, tokenizer
    files), which loads without the `gguf` package and can be sharded with device_map."""
    out = Path(out)
    opts = LoadOptions(dtype=dtype)
    opts.torch_dtype()  # an unknown dtype is refused before anything is read
    if gguf_file(src, "convert") is None:
        raise LoadError(f"convert: {str(src)!r} is not a .gguf file nor a folder holding one")
    if out.exists() and not out.is_dir():
        raise LoadError(f"convert: {str(out)!r} is a file; give a folder to write the model into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LoadError(f"convert: {str(out)!r} is not empty; give an empty or new folder, or --overwrite to "
                        "write into it")
    model, tokenizer = load_gguf(src, "convert", opts)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        stale.unlink()  # shards of an earlier model would be read together with the new weights
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
