"""Loading the models a fusion runs: local Hugging Face directories, full models or LoRA adapters.

Security defaults: weights come from safetensors files unless the caller opts in to pickled
`.bin` weights (`allow_pickle`), and `trust_remote_code` is off unless asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


@dataclass
class Member:
    """One model as the decoding loop sees it: a module, and which LoRA adapter (if any) to run."""

    role: str  # "large", "small" or "expert:<name>"
    model: nn.Module
    adapter: str | None = None  # adapter name inside a PeftModel; "__base__" = adapters off
    template: str = "{prompt}"
    context: int | None = None  # max positions, when the config says
    # Cross-vocabulary members (another tokenizer than the large model's): their own tokenizer,
    # the PM-MinED map from the large model's vocabulary onto theirs, and their vocabulary size.
    tokenizer: Any = None
    vocab_map: Any = None
    vocab: int | None = None

    @property
    def foreign(self) -> bool:
        return self.vocab_map is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward_kwargs(self, batch: int) -> dict[str, Any]:
        # PEFT's mixed-adapter batches select the adapter per row without mutating the model,
        # so the small base and all its LoRA experts share one set of weights.
        return {"adapter_names": [self.adapter] * batch} if self.adapter else {}


@dataclass
class ModelSet:
    tokenizer: Any
    large: Member
    small: Member | None = None
    experts: list[Member] = field(default_factory=list)
    vocab_size: int = 0  # logits are sliced to this (tokenizer length; padded rows dropped)
    delta: Member | None = None  # cross-model control: a delta model for the large (user) model
    # Stacked modules (stacking.shared_stack for full-weight members, stacking.lora_stack for a PEFT
    # base and its LoRA adapters), built on first use.
    stacks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def expert_names(self) -> list[str]:
        return [m.role.split(":", 1)[1] for m in self.experts]

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.large.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is not None:
            ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        return ids


def model_kind(path: str | Path, role: str) -> str:
    """'model' or 'adapter'; a clear LoadError for anything else."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{role}: path {str(p)!r} does not exist; give a local Hugging Face model directory")
    if not p.is_dir():
        raise LoadError(f"{role}: {str(p)!r} is a file, not a model directory "
                        "(expected a folder with config.json and *.safetensors)")
    if (p / "adapter_config.json").exists():
        return "adapter"
    if (p / "config.json").exists():
        return "model"
    raise LoadError(f"{role}: {str(p)!r} is not a Hugging Face model directory "
                    "(no config.json, nor adapter_config.json for a PEFT adapter)")


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
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=opts.trust_remote_code)
    except Exception as e:  # transformers raises many types here
        raise LoadError(f"{role}: could not load a tokenizer from {str(path)!r}: {e}") from e


def load_causal_lm(path: str | Path, role: str, opts: LoadOptions) -> nn.Module:
    from transformers import AutoModelForCausalLM
    p = Path(path)
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


def load_model_set(large: dict, small: dict | None, experts: list[dict], opts: LoadOptions,
                   delta: dict | None = None) -> ModelSet:
    """Load every model of a fusion. Each spec: {"path", "template"} (+ "name" for experts).

    LoRA adapters among the experts are attached to the one loaded small base (PEFT
    multi-adapter), not loaded as separate copies. `small` may carry "mapping" ("auto" or a map
    file): then the small base and experts (one shared tokenizer) may differ from the large
    model's vocabulary, and their logits are mapped into it. `delta` ({"path", "template",
    "mapping"}) is a cross-model-control delta model for the large (user) model.
    """
    roles = {"large": large} | ({"small": small} if small else {})
    if opts.device_map is None:
        check_device(opts.device)
    if experts and not small:
        raise LoadError("experts need a small base model (the model they were fine-tuned from); "
                        "set `small` in the recipe or pass --small")
    kinds = {role: model_kind(spec["path"], role) for role, spec in roles.items()}
    for role, kind in kinds.items():
        if kind == "adapter":
            raise LoadError(f"{role}: {spec_path(roles[role])!r} is a PEFT adapter; the {role} model must be "
                            "a full model directory (only experts may be adapters)")
    expert_kinds = [model_kind(e["path"], f"expert:{e['name']}") for e in experts]

    tokenizers = {role: load_tokenizer(spec["path"], role, opts) for role, spec in roles.items()}
    for e, kind in zip(experts, expert_kinds):
        has_tok = any((Path(e["path"]) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
        if has_tok:  # an adapter or expert without tokenizer files inherits the small base's
            tokenizers[f"expert:{e['name']}"] = load_tokenizer(e["path"], f"expert:{e['name']}", opts)
    tokenizer = tokenizers["large"]
    side = {r: t for r, t in tokenizers.items() if r != "large"}
    small_map = None
    if small and small.get("mapping") and not same_vocabulary(tokenizer, tokenizers["small"]):
        check_same_vocabulary(side)  # the small base and its experts still share one vocabulary
        small_map = resolve_map(tokenizer, tokenizers["small"], small["mapping"], "small", opts)
    else:
        check_same_vocabulary(tokenizers)
    foreign = dict(tokenizer=tokenizers["small"], vocab_map=small_map,
                   vocab=len(tokenizers["small"])) if small_map is not None else {}

    large_model = load_causal_lm(large["path"], "large", opts)
    members = {"large": Member("large", large_model, None, large.get("template", "{prompt}"),
                               _context_of(large_model))}
    small_model = load_causal_lm(small["path"], "small", opts) if small else None
    adapters = [(e, k) for e, k in zip(experts, expert_kinds) if k == "adapter"]
    peft_small = _attach_adapters(small_model, adapters, opts) if adapters else None
    if small:
        members["small"] = Member("small", peft_small or small_model, "__base__" if peft_small else None,
                                  small.get("template", "{prompt}"), _context_of(small_model), **foreign)
    expert_members = []
    for e, kind in zip(experts, expert_kinds):
        role = f"expert:{e['name']}"
        if kind == "adapter":
            expert_members.append(Member(role, peft_small, e["name"], e.get("template", "{prompt}"),
                                         _context_of(small_model), **foreign))
        else:
            m = load_causal_lm(e["path"], role, opts)
            check_expert_architecture(small_model, m, role)
            expert_members.append(Member(role, m, None, e.get("template", "{prompt}"), _context_of(m), **foreign))
    delta_member = _load_delta(delta, tokenizer, opts) if delta else None

    vocab_size = len(tokenizer)
    for member in [members["large"], members.get("small"), *expert_members, delta_member]:
        need = (member.vocab or vocab_size) if member is not None else 0
        if member is not None and _logit_rows(member.model) < need:
            raise LoadError(f"{member.role}: the model outputs {_logit_rows(member.model)} logits but the "
                            f"tokenizer has {need} tokens; tokenizer and weights do not belong together")
    return ModelSet(tokenizer, members["large"], members.get("small"), expert_members, vocab_size, delta_member)


def _load_delta(spec: dict, user_tok, opts: LoadOptions) -> Member:
    """The delta model of cross-model control. Its own tokenizer decides: the user's vocabulary
    (used as is), or another one, which needs `mapping` (auto or a map file)."""
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
    model = load_causal_lm(spec["path"], "delta", opts)
    extra = dict(tokenizer=tok, vocab_map=vmap, vocab=len(tok)) if vmap is not None else {}
    return Member("delta", model, None, spec.get("template", "{prompt}"), _context_of(model), **extra)


def spec_path(spec: dict) -> str:
    return str(spec["path"])


def _attach_adapters(small_model: nn.Module, adapters: list[tuple[dict, str]], opts: LoadOptions):
    from peft import PeftModel
    peft_model = None
    for spec, _ in adapters:
        role, path = f"expert:{spec['name']}", Path(spec["path"])
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
