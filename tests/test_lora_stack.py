"""LoRA experts stacked into one forward with the small base (stacking.stack_lora): the stacked
module against PEFT's mixed-adapter batch and each adapter alone, decoding token for token
against separate forwards, and refusals falling back to PEFT's mixed-adapter batch."""

import dataclasses
import logging

import pytest

from logitfusion.engine.config import EngineConfig
import torch

from logitfusion import Fuser
from logitfusion.testing import toy
from logitfusion.engine import stacking
from logitfusion.engine.decoding import Batch, decode
from logitfusion.engine.models import Member
from logitfusion.engine.sampling import SamplingParams
from logitfusion.engine.stacking import StackedLoRALinear, StackError, stack_lora

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river"]


def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).eval()


def adapter(small, out, seed, **config):
    """A LoRA adapter of `small` with random A and B; `config` overrides LoraConfig fields."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                  task_type="CAUSAL_LM") | config
    get_peft_model(load(small), LoraConfig(**config)).save_pretrained(str(out), save_embedding_layers=False)
    return str(out)


@pytest.fixture(scope="module")
def adapters(family, tmp_path_factory):
    """rank8 (rank 8, q/v) and other (rank 3, rslora, k/up/lm_head)."""
    root = tmp_path_factory.mktemp("lora_stack")
    return {"rank8": str(toy.lora_adapter(family["small"], root / "rank8", rank=8, seed=11)),
            "other": adapter(family["small"], root / "other", 12, r=3, use_rslora=True,
                             target_modules=["k_proj", "up_proj", "lm_head"])}


@pytest.fixture(scope="module")
def lora_fuser(family, adapters):
    """Large + small + two LoRA experts of different ranks and targets + one full expert."""
    return Fuser.from_pretrained(family["large"], family["small"],
                                 {**adapters, "expert1": family["experts"]["expert1"]})


def test_stacked_lora_equals_peft_mixed_batch_and_each_adapter_alone(lora_fuser, family, run_steps):
    models = lora_fuser.models
    peft = models.small.model
    members = [models.small, *[m for m in models.experts if m.adapter], models.experts[0]]  # rank8 twice
    groups = [m.adapter for m in members]
    prompts = [[1, 7, 8, 9, 10], [1, 20], [1, 30, 31, 32]]
    stack = stack_lora(peft, groups)
    stacked = run_steps(members, stack, prompts)
    mixed = run_steps(members, None, prompts)  # the PEFT model, adapter_names per row
    alone = [run_steps([m], None, prompts) for m in members]
    plain = run_steps([Member("small", load(family["small"]))], None, prompts)  # no PEFT at all
    for step, z in enumerate(stacked):
        assert torch.allclose(z, mixed[step], atol=1e-5)
        for g in range(len(members)):
            assert torch.allclose(z[g], alone[g][step][0], atol=1e-5)
        assert torch.allclose(z[0], plain[step][0], atol=1e-5)  # the base rows are the base model's
    # The base weights are shared with the PEFT model, not copied; only A and B are stacked.
    q = stack.model.layers[0].self_attn.q_proj
    assert isinstance(q, StackedLoRALinear) and q.a.shape == (len(groups), 8, 48) and q.b.shape == (len(groups), 48, 8)
    assert q.base.weight is peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not any(type(m).__module__.startswith("peft") for m in stack.modules())
    # A layer no group's adapter targets is the plain base Linear.
    assert type(stack_lora(peft, ["__base__", "rank8"]).model.layers[0].self_attn.k_proj) is torch.nn.Linear


def test_grouping_and_cache(lora_fuser):
    models = lora_fuser.models
    batch = Batch(models, lora_fuser.method("dynamic"))
    assert [[m.role for m in g] for g in batch.groups] == \
        [["large"], ["small", "expert:rank8", "expert:other"], ["expert:expert1"]]
    assert isinstance(batch.modules[1].model.layers[0].self_attn.q_proj, StackedLoRALinear)
    # Built once per ModelSet and adapter list: every generate call makes a new Batch.
    assert Batch(models, lora_fuser.method("static:1")).modules[1] is batch.modules[1]
    separate = Batch(models, lora_fuser.method("dynamic"), EngineConfig(share_forwards=False))
    assert all(module is m.model for module, (m,) in zip(separate.modules, separate.groups))


def shared_and_separate(fuser, method):
    solver, params = fuser.method(method), SamplingParams(max_new_tokens=10)
    return (decode(fuser.models, PROMPTS, solver, params, engine=EngineConfig(trace=True)),
            decode(fuser.models, PROMPTS, solver, params, engine=EngineConfig(trace=True, share_forwards=False)))


@pytest.mark.parametrize("method", ["static:0.5,1,1.5", "dynamic", "dynamic:joint", "expert:rank8"])
def test_stacked_lora_decoding_equals_separate_forwards(lora_fuser, method, assert_same_generations):
    assert_same_generations(*shared_and_separate(lora_fuser, method))


@pytest.mark.parametrize("method", ["static:1", "dynamic"])
def test_speculative_on_stacked_lora_equals_plain(lora_fuser, method):
    solver, params = lora_fuser.method(method), SamplingParams(max_new_tokens=16)
    plain = decode(lora_fuser.models, PROMPTS, solver, params, engine=EngineConfig(share_forwards=False))
    fast = decode(lora_fuser.models, PROMPTS, solver, params, engine=EngineConfig(speculate=3))
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in fast] == [g.finish_reason for g in plain]


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("config, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(target_modules=["embed_tokens", "q_proj"]), "Embedding"),
])
def test_refuses_what_it_does_not_compute_exactly(family, tmp_path, config, message):
    from peft import PeftModel
    peft = PeftModel.from_pretrained(load(family["small"]), family["experts"]["lora1"], adapter_name="lora1")
    peft.load_adapter(adapter(family["small"], tmp_path / "odd", 13, **config), adapter_name="odd")
    with pytest.raises(StackError, match=message):
        stack_lora(peft, ["__base__", "lora1", "odd"])
    stack_lora(peft, ["__base__", "lora1"])  # the other adapters still stack
    with pytest.raises(StackError, match="no adapter named nope"):
        stack_lora(peft, ["__base__", "nope"])


def test_refused_stack_falls_back_to_peft_mixed_batch(family, tmp_path, monkeypatch, caplog):
    # lora_bias: PEFT's mixed-adapter batch runs it, the stack does not.
    odd = adapter(family["small"], tmp_path / "bias", 14, lora_bias=True)
    fuser = Fuser.from_pretrained(family["large"], family["small"], {"lora1": family["experts"]["lora1"], "odd": odd})
    solver = fuser.method("dynamic")
    with caplog.at_level(logging.WARNING, logger="logitfusion"):
        batch = Batch(fuser.models, solver)
    said = [r.getMessage() for r in caplog.records if r.name == "logitfusion"]
    assert len(said) == 1 and "LoRA adapters lora1, odd cannot be stacked" in said[0] and "lora_bias" in said[0], said
    assert [[m.role for m in g] for g in batch.groups] == [["large"], ["small", "expert:lora1", "expert:odd"]]
    assert batch.modules[1] is fuser.models.small.model
    params = SamplingParams(max_new_tokens=6)
    assert [g.token_ids for g in decode(fuser.models, PROMPTS, solver, params)] == \
        [g.token_ids for g in decode(fuser.models, PROMPTS, solver, params, engine=EngineConfig(share_forwards=False))]
    # Only a refusal falls back; a bug while stacking is not swallowed.
    monkeypatch.setattr(stacking, "stack_lora", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        Batch(dataclasses.replace(fuser.models, stacks={}), solver)
