"""Full-weight copies of one architecture (the small base and its fully fine-tuned experts) run as
ONE batched forward on stacked weights.

`stack_models(models)` returns a module with the Hugging Face model's own forward whose batch is
member-major, G groups of b rows (as `context.Context` lays rows out), and where the rows of
group g use model g's weights: every Linear is one bmm over the groups, every Embedding one
lookup in a [G * V, H] table, any other module with parameters (RMSNorm...) its own forward
vmapped over the groups. Everything between (attention, rotary buffers, cache) is the original
code on a batch of G * b rows. One forward instead of G means G times fewer kernel launches on a
GPU and far less per-call overhead on a CPU.

The originals' parameters become views into the stacked tensors, so weights are stored once and
each original still runs alone. (Moving or casting an original afterwards, `.to(...)`, gives it
new tensors of its own: the stack keeps the old ones.)

`stack_lora(peft_model, groups)` does the same for LoRA adapters of one base: the base weights are
shared by every row, and each LoRA-targeted Linear adds group g's low-rank update with two bmm
over the groups (adapters stacked, ranks zero-padded), instead of PEFT's loop over adapters.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compat import is_llama_rmsnorm, log, lora_adapters, lora_factors, lora_layer_classes, plain_lora_problem
from .members import Member, ModelSet


class StackError(ValueError):
    """These models cannot share one stacked forward; the message says why."""


# Config keys that do not change what the forward computes from explicit inputs.
IGNORED_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "architectures", "_commit_hash",
                       "dtype", "torch_dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id"}


def _rows_per_group(x: Tensor, groups: int) -> int:
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} rows does not split into {groups} groups of stacked weights "
                         "(rows must be member-major: G groups of equally many rows)")
    return x.shape[0] // groups


class StackedLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias  # [G, out, in], [G, out]

    def extra_repr(self) -> str:
        g, out, inp = self.weight.shape
        return f"groups={g}, in_features={inp}, out_features={out}, bias={self.bias is not None}"

    def forward(self, x: Tensor) -> Tensor:  # [G * b, ..., in] -> [G * b, ..., out]
        g = self.weight.shape[0]
        _rows_per_group(x, g)
        xs, w = x.reshape(g, -1, x.shape[-1]), self.weight.transpose(1, 2)  # [G, b * ..., in], [G, in, out]
        y = torch.bmm(xs, w) if self.bias is None else torch.baddbmm(self.bias[:, None], xs, w)
        return y.view(*x.shape[:-1], -1)


class StackedEmbedding(nn.Module):
    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # [G, V, H]

    def extra_repr(self) -> str:
        return "groups={}, num_embeddings={}, embedding_dim={}".format(*self.weight.shape)

    def forward(self, ids: Tensor) -> Tensor:  # [G * b, T] -> [G * b, T, H]
        g, v = self.weight.shape[:2]
        b = _rows_per_group(ids, g)
        offset = torch.arange(g, device=ids.device).repeat_interleave(b) * v  # group g reads rows g*V..
        return F.embedding(ids + offset.view(-1, *[1] * (ids.dim() - 1)), self.weight.flatten(0, 1))


class StackedModule(nn.Module):
    """Any other module with parameters: its own forward, vmapped over the groups. Tensor
    arguments with the batch's leading dim are split per group; others are shared."""

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]):
        super().__init__()
        self.names = list(params)
        self.stacked = nn.ParameterList(params.values())  # each [G, ...]
        for name in self.names:  # the inner module only lends its code; its weights come from the stack
            owner, _, leaf = name.rpartition(".")
            delattr(module.get_submodule(owner), leaf)
        self._inner = (module,)  # not registered: without its weights it neither prints nor moves

    def extra_repr(self) -> str:
        return f"{type(self._inner[0]).__name__}, groups={self.stacked[0].shape[0]}"

    def forward(self, *args):
        g = self.stacked[0].shape[0]
        x = next(a for a in args if isinstance(a, Tensor))
        b, n = _rows_per_group(x, g), x.shape[0]
        split = [isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n for a in args]
        args = [a.reshape(g, b, *a.shape[1:]) if s else a for a, s in zip(args, split)]

        def one(params, *xs):
            return torch.func.functional_call(self._inner[0], dict(zip(self.names, params)), xs)

        out = torch.func.vmap(one, in_dims=(0, *[0 if s else None for s in split]))(list(self.stacked), *args)
        return out.flatten(0, 1) if isinstance(out, Tensor) else type(out)(t.flatten(0, 1) for t in out)


class StackedRMSNorm(nn.Module):
    """Llama-style RMSNorm (weight * x / rms(x)), without vmap's per-call overhead."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps  # [G, H]

    def extra_repr(self) -> str:
        return f"groups={self.weight.shape[0]}, {tuple(self.weight.shape[1:])}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:  # [G * b, ..., H]
        g = self.weight.shape[0]
        b = _rows_per_group(x, g)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h.to(x.dtype).reshape(g, b, *x.shape[1:])
        w = self.weight.view(g, 1, *[1] * (x.dim() - 2), -1)
        return (w * h).flatten(0, 1)


# ---------------------------------------------------------------- checks

def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name -> the first name of the same tensor (tied weights share one)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def _config_diff(a: nn.Module, b: nn.Module) -> list[str]:
    ca = {k: v for k, v in a.config.to_dict().items() if k not in IGNORED_CONFIG_KEYS}
    cb = {k: v for k, v in b.config.to_dict().items() if k not in IGNORED_CONFIG_KEYS}
    return [f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in sorted(ca.keys() | cb.keys()) if ca.get(k) != cb.get(k)]


def check_stackable(models: list[nn.Module], names: list[str] | None = None) -> None:
    """Raise StackError unless the models are plain (non-PEFT) modules of one class, config,
    parameter layout, dtype and device."""
    names = names or [f"model {i}" for i in range(len(models))]
    if not models:
        raise StackError("no models to stack")
    if len({id(m) for m in models}) < len(models):
        raise StackError("the same module appears twice; stack distinct models")
    ref, ref_params = models[0], _canonical_names(models[0])
    for name, m in zip(names, models):
        if any(type(x).__module__.startswith("peft") for x in m.modules()):
            raise StackError(f"{name} is a PEFT model; its adapters already share one forward with the base")
        if getattr(m, "hf_device_map", None) and len(set(m.hf_device_map.values())) > 1:
            raise StackError(f"{name} is sharded over several devices (device_map)")
        if len({(p.device, p.dtype) for p in m.parameters()}) > 1:
            raise StackError(f"{name} has parameters on several devices or of several dtypes")
    for name, m in zip(names[1:], models[1:]):
        if type(m) is not type(ref):
            raise StackError(f"{name} is a {type(m).__name__}, {names[0]} a {type(ref).__name__}")
        if diffs := _config_diff(ref, m):
            raise StackError(f"{names[0]} and {name} have different configs ({'; '.join(diffs[:5])})")
        params = _canonical_names(m)
        if params != ref_params:
            diff = sorted(set(params.items()) ^ set(ref_params.items()))
            raise StackError(f"{names[0]} and {name} have different parameters (first: {diff[0]})")
        theirs = dict(m.named_parameters())
        for pname, p in ref.named_parameters():
            q = theirs[pname]
            if (p.shape, p.dtype, p.device) != (q.shape, q.dtype, q.device):
                raise StackError(f"{pname}: {tuple(p.shape)} {p.dtype} on {p.device} in {names[0]} vs "
                                 f"{tuple(q.shape)} {q.dtype} on {q.device} in {name}")


# ---------------------------------------------------------------- building

@torch.no_grad()
def stack_models(models: list[nn.Module], names: list[str] | None = None) -> nn.Module:
    """One module running all `models` in one forward: rows [model 0: b rows, model 1: b rows, ...].

    Raises StackError (naming the difference) unless they share class, config and parameter
    layout. Afterwards each original's parameters are views into the stacked weights.
    """
    check_stackable(models, names)
    ref = models[0]
    per_model = [dict(m.named_parameters()) for m in models]
    stacked: dict[str, nn.Parameter] = {}  # canonical name -> [G, ...]; tied weights share one

    def stack(name: str) -> nn.Parameter:
        if name not in stacked:
            stacked[name] = nn.Parameter(torch.stack([p[name] for p in per_model]), requires_grad=False)
            # Weights stored once: each original now reads its slice of the stack (re-pointed at
            # once, so the peak is one extra tensor, not a second copy of every model).
            for g, params in enumerate(per_model):
                params[name].data = stacked[name][g]
        return stacked[name]

    # A structural copy of the first model that shares (not copies) its tensors; every module
    # with parameters of its own is then swapped for a stacked one.
    shared = {id(t): t for t in [*ref.parameters(), *ref.buffers()]}
    out = copy.deepcopy(ref, memo=dict(shared))
    canonical = _canonical_names(ref)
    done: list[str] = []
    for path, module in list(out.named_modules()):
        if not any(True for _ in module.parameters(recurse=False)) or any(path.startswith(d + ".") for d in done):
            continue
        prefix = f"{path}." if path else ""
        params = {n: stack(canonical[prefix + n]) for n, _ in module.named_parameters(remove_duplicate=False)}
        if type(module) is nn.Linear:
            new = StackedLinear(params["weight"], params.get("bias"))
        elif type(module) is nn.Embedding and module.max_norm is None:
            new = StackedEmbedding(params["weight"])
        elif is_llama_rmsnorm(module):
            new = StackedRMSNorm(params["weight"], module.variance_epsilon)
        else:
            if not path:
                raise StackError(f"{type(module).__name__} has parameters of its own at the top level")
            new = StackedModule(module, params)
        parent, _, child = path.rpartition(".")
        setattr(out.get_submodule(parent), child, new)
        done.append(path)
    vmapped = sorted({type(m._inner[0]).__name__ for m in out.modules() if isinstance(m, StackedModule)})
    if vmapped:
        log.info("stacked forward: %s run vmapped (slower than a specialised stacked module)", ", ".join(vmapped))
    return out


# ---------------------------------------------------------------- LoRA adapters of one base

class StackedLoRALinear(nn.Module):
    """The shared base Linear for every row, plus group g's LoRA update on its rows:
    y = base(x) + scale_g * (x_g A_g^T) B_g^T. Groups without this adapter (the base, or an
    adapter that does not target this layer) have A_g = B_g = 0, so their rows are the base's."""

    def __init__(self, base: nn.Linear, a: Tensor, b: Tensor):
        super().__init__()
        self.base = base  # the PEFT model's own base layer: its weights are shared, not copied
        self.a = nn.Parameter(a, requires_grad=False)  # [G, r, in]; ranks zero-padded to the largest
        self.b = nn.Parameter(b, requires_grad=False)  # [G, out, r]; scale_g folded in

    def extra_repr(self) -> str:
        g, r, inp = self.a.shape
        return f"groups={g}, rank={r}, in_features={inp}, out_features={self.b.shape[1]}"

    def forward(self, x: Tensor) -> Tensor:  # [G * b, ..., in] -> [G * b, ..., out]
        g = self.a.shape[0]
        _rows_per_group(x, g)
        y = self.base(x)
        # As PEFT does: the update is computed in the adapters' dtype, then added in the result's.
        h = torch.bmm(x.reshape(g, -1, x.shape[-1]).to(self.a.dtype), self.a.transpose(1, 2))  # [G, b * ..., r]
        if h.dtype == y.dtype:  # the add fused into the second matmul
            return torch.baddbmm(y.reshape(g, -1, y.shape[-1]), h, self.b.transpose(1, 2)).view(y.shape)
        return y + torch.bmm(h, self.b.transpose(1, 2)).to(y.dtype).view(y.shape)


@torch.no_grad()
def stack_lora(peft_model: nn.Module, groups: list[str]) -> nn.Module:
    """The base model of a PEFT LoRA model running rows [group 0: b rows, group 1: b rows, ...] in
    one forward, group g with adapter groups[g] ("__base__": none), each LoRA update as two bmm
    over the groups instead of PEFT's loop over adapters (select rows, two matmuls, scatter).

    A structural copy of the base model sharing its weights; only A and B are stacked (copied,
    from the adapters as they are now). Raises StackError for what it does not compute exactly
    as PEFT does (DoRA and other LoRA variants, lora_bias, LoRA on embeddings or other layer
    types, modules_to_save, merged or disabled adapters)."""
    lora_layer, _ = lora_layer_classes()
    model = peft_model.get_base_model()  # the HF model, LoRA layers injected in place
    unknown = set(groups) - {"__base__"} - set(getattr(peft_model, "peft_config", {}))
    if unknown:
        raise StackError(f"no adapter named {', '.join(sorted(unknown))} in this PEFT model")
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        raise StackError("the PEFT model is sharded over several devices (device_map)")
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo=dict(shared))
    for path, layer in list(out.named_modules()):
        if not isinstance(layer, lora_layer):
            continue
        on_layer = lora_adapters(layer)
        used = [n for n in dict.fromkeys(groups) if n in on_layer]
        if not used:  # no group's adapter targets this layer: the plain base layer
            new = layer.get_base_layer()
        else:
            if problem := plain_lora_problem(path, layer, used):
                raise StackError(problem)
            factors = {n: lora_factors(layer, n) for n in used}  # (A [r, in], B [out, r])
            ref, rank = factors[used[0]][0], max(f[0].shape[0] for f in factors.values())
            base = layer.get_base_layer()
            a = ref.new_zeros(len(groups), rank, base.in_features)  # [G, r, in]
            b = ref.new_zeros(len(groups), base.out_features, rank)  # [G, out, r]
            for g, name in enumerate(groups):
                if name in used:
                    r = factors[name][0].shape[0]
                    a[g, :r], b[g, :, :r] = factors[name]
            new = StackedLoRALinear(base, a, b)
        parent, _, child = path.rpartition(".")
        setattr(out.get_submodule(parent), child, new)
    # Anything else PEFT put in (modules_to_save, trainable tokens...) changes rows per adapter too.
    left = [f"{p} ({type(m).__name__})" for p, m in out.named_modules() if type(m).__module__.startswith("peft")]
    if left:
        raise StackError(f"PEFT modules other than LoRA on Linear layers: {', '.join(left[:3])}")
    return out


# ---------------------------------------------------------------- decoding

def stackable(member: Member) -> bool:
    """Full-weight small-side members (the small base, full experts: members.KINDS) on the user's
    vocabulary (not PEFT adapter members, not cross-vocabulary members, which follow their own tokens)."""
    return member.kind.small_side and member.adapter is None and not member.foreign


def shared_stack(models: ModelSet, members: Iterable[Member]) -> tuple[nn.Module | None, list[Member]]:
    """(stacked module, the members it runs, in order) for the stackable ones among `members`, or
    (None, []) when fewer than two or when they cannot be stacked. Built once per ModelSet and
    member set (every `generate` call makes a new Batch); a refusal is remembered too."""
    group = [m for m in members if stackable(m)]
    if len(group) < 2:
        return None, []
    key = tuple((m.role, id(m.model)) for m in group)
    if key not in models.stacks:
        try:
            models.stacks[key] = stack_models([m.model for m in group], [m.role for m in group])
        except StackError as refusal:
            log.warning("%s cannot share one stacked forward, so each runs its own (slower, same tokens): %s",
                        ", ".join(m.role for m in group), refusal)
            models.stacks[key] = None  # an optimisation only: these members run separately
    stack = models.stacks[key]
    return (stack, group) if stack is not None else (None, [])


def lora_stack(models: ModelSet, members: list[Member]) -> nn.Module:
    """The module to run `members` (all on one PEFT model: the small base "__base__" and its LoRA
    experts) as one forward: their stacked-LoRA module (stack_lora), or the PEFT model itself
    when that is refused (then PEFT's mixed-adapter batch picks each row's adapter). Built once
    per ModelSet and adapter list; a refusal is remembered too."""
    peft_model, adapters = members[0].model, [m.adapter for m in members]
    key = ("lora", id(peft_model), tuple(adapters))
    if key not in models.stacks:
        try:
            models.stacks[key] = stack_lora(peft_model, adapters)
        except StackError as refusal:
            log.warning("LoRA adapters %s cannot be stacked, so they run through PEFT's per-adapter loop (slower, "
                        "same tokens): %s", ", ".join(a for a in adapters if a != "__base__"), refusal)
            models.stacks[key] = None  # an optimisation only
    return models.stacks[key] if models.stacks[key] is not None else peft_model
