"""Full-weight experts stacked into one forward: the stacked module against separate forwards,
the originals after stacking, the grouping in Batch, refusals, and decoding token for token."""

import dataclasses
import logging

import pytest

from logitfusion.engine.config import EngineConfig
import torch

from logitfusion.engine import stacking
from logitfusion.engine.decoding import Batch, decode
from logitfusion.engine.models import Member
from logitfusion.engine.sampling import SamplingParams
from logitfusion.engine.stacking import StackError, stack_models

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river"]


def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).eval()


def tiny_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2) | overrides
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@torch.no_grad()
def test_stacked_forward_equals_separate_forwards(family, run_steps):
    models = [load(family["small"]), load(family["experts"]["expert1"]), load(family["experts"]["expert2"])]
    members = [Member(f"expert:m{i}", m) for i, m in enumerate(models)]
    prompts = [[1, 7, 8, 9, 10], [1, 20], [1, 30, 31, 32]]
    before = [run_steps([m], None, prompts) for m in members]
    stack = stack_models(models)
    stacked = run_steps(members, stack, prompts)
    after = [run_steps([m], None, prompts) for m in members]
    for step, z in enumerate(stacked):
        for g in range(len(models)):
            assert torch.allclose(z[g], before[g][step][0], atol=1e-5)
            assert torch.equal(after[g][step][0], before[g][step][0])  # the originals are unchanged
    # Weights are stored once: each original reads its slice of the stack.
    w = stack.model.layers[0].mlp.up_proj.weight
    for g, m in enumerate(models):
        assert m.model.layers[0].mlp.up_proj.weight.data_ptr() == w[g].data_ptr()


@torch.no_grad()
def test_tied_embeddings_stay_tied():
    models = [tiny_llama(seed, tie_word_embeddings=True) for seed in (1, 2)]
    ids = torch.tensor([[1, 5, 9, 3], [2, 4, 6, 8]])
    before = [m(input_ids=ids).logits for m in models]
    stack = stack_models(models)
    assert stack.lm_head.weight is stack.model.embed_tokens.weight
    out = stack(input_ids=ids.repeat(2, 1)).logits.view(2, 2, 4, -1)
    for g, m in enumerate(models):
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert m.lm_head.weight.data_ptr() == stack.lm_head.weight[g].data_ptr()
        assert torch.allclose(out[g], before[g], atol=1e-5)
        assert torch.equal(m(input_ids=ids).logits, before[g])


@torch.no_grad()
def test_vmapped_leaves_equal_the_specialised_ones(monkeypatch):
    """Modules with parameters and no specialised stacked version (here RMSNorm, forced) are
    vmapped over the groups."""
    models = [tiny_llama(seed) for seed in (1, 2, 3)]
    ids = torch.tensor([[1, 5, 9, 3], [2, 4, 6, 8]])
    fast = stack_models(models)(input_ids=ids.repeat(3, 1)).logits
    monkeypatch.setattr(stacking, "is_llama_rmsnorm", lambda m: False)
    vmapped = stack_models(models)
    assert isinstance(vmapped.model.norm, stacking.StackedModule)
    assert torch.allclose(vmapped(input_ids=ids.repeat(3, 1)).logits, fast, atol=1e-6)


def test_rows_must_split_into_groups():
    stack = stack_models([tiny_llama(1), tiny_llama(2)])
    with pytest.raises(ValueError, match="does not split into 2 groups"):
        stack(input_ids=torch.tensor([[1, 2], [3, 4], [5, 6]]))


def test_refuses_models_that_differ():
    with pytest.raises(StackError, match="rms_norm_eps: 1e-06 vs 0.001"):
        stack_models([tiny_llama(1), tiny_llama(2, rms_norm_eps=1e-3)], ["small", "expert:odd"])
    with pytest.raises(StackError, match="small and expert:odd have different configs.*intermediate_size"):
        stack_models([tiny_llama(1), tiny_llama(2, intermediate_size=48)], ["small", "expert:odd"])
    with pytest.raises(StackError, match=r"torch.float32 on cpu in model 0 vs .*torch.bfloat16 on cpu in model 1"):
        stack_models([tiny_llama(1), tiny_llama(2).to(torch.bfloat16)])
    one = tiny_llama(1)
    with pytest.raises(StackError, match="twice"):
        stack_models([one, one])


def test_refuses_peft_models(family):
    from peft import PeftModel
    lora = PeftModel.from_pretrained(load(family["small"]), family["experts"]["lora1"])
    with pytest.raises(StackError, match="PEFT"):
        stack_models([load(family["small"]), lora])


# ---------------------------------------------------------------- decoding

def roles(batch):
    return [[m.role for m in g] for g in batch.groups]


def test_grouping(full_fuser, fuser, fuser1):
    batch = Batch(full_fuser.models, full_fuser.method("dynamic"))
    assert roles(batch) == [["large"], ["small", "expert:expert1", "expert:expert2"]]
    assert isinstance(batch.modules[1].lm_head, stacking.StackedLinear)
    assert batch.modules[0] is full_fuser.models.large.model
    # Built once per ModelSet: every generate call makes a new Batch.
    assert Batch(full_fuser.models, full_fuser.method("static:1")).modules[1] is batch.modules[1]
    assert len(full_fuser.models.stacks) == 1
    assert roles(Batch(fuser1.models, fuser1.method("dynamic"))) == [["large"], ["small", "expert:expert1"]]
    # LoRA and full experts mixed: the small base stays in its PEFT group with the adapters (one
    # forward, adapters stacked), and the full experts are stacked apart.
    mixed = Batch(fuser.models, fuser.method("dynamic"))
    assert roles(mixed) == [["large"], ["small", "expert:lora1"], ["expert:expert1", "expert:expert2"]]
    assert isinstance(mixed.modules[1].model.layers[0].self_attn.q_proj, stacking.StackedLoRALinear)
    # One full expert alone has nothing to stack with.
    assert roles(Batch(full_fuser.models, full_fuser.method("expert:expert2"))) == [["expert:expert2"]]
    assert len(Batch(full_fuser.models, full_fuser.method("dynamic"), EngineConfig(share_forwards=False)).groups) == 4


def test_refused_stack_falls_back_to_separate_forwards(full_fuser, family, monkeypatch, caplog):
    odd = load(family["experts"]["expert1"])
    odd.config.rms_norm_eps = 1e-3  # the config differs (the module does not: decoding stays equal)
    models = dataclasses.replace(full_fuser.models, experts=[Member("expert:odd", odd)], stacks={})
    solver = full_fuser.method("dynamic")
    with caplog.at_level(logging.WARNING, logger="logitfusion"):
        assert roles(Batch(models, solver)) == [["large"], ["small"], ["expert:odd"]]
    # The fallback is said, with the reason, once (the refusal is remembered).
    said = [r.getMessage() for r in caplog.records if r.name == "logitfusion"]
    assert len(said) == 1 and "small, expert:odd cannot share one stacked forward" in said[0] \
        and "rms_norm_eps" in said[0], said
    caplog.clear()
    Batch(models, solver)
    assert not [r for r in caplog.records if r.name == "logitfusion"]
    params = SamplingParams(max_new_tokens=6)
    assert [g.token_ids for g in decode(models, PROMPTS, solver, params)] == \
        [g.token_ids for g in decode(models, PROMPTS, solver, params, engine=EngineConfig(share_forwards=False))]
    # Only a refusal falls back; a bug while stacking is not swallowed.
    monkeypatch.setattr(stacking, "stack_models", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        Batch(dataclasses.replace(full_fuser.models, stacks={}), solver)


def stacked_and_separate(fuser, method):
    solver, params = fuser.method(method), SamplingParams(max_new_tokens=10)
    return (decode(fuser.models, PROMPTS, solver, params, engine=EngineConfig(trace=True)),
            decode(fuser.models, PROMPTS, solver, params, engine=EngineConfig(trace=True, share_forwards=False)))


@pytest.mark.parametrize("method", ["static:0.5,1.5", "dynamic", "dynamic:joint"])
def test_stacked_forwards_equal_separate_forwards(full_fuser, method, assert_same_generations):
    assert_same_generations(*stacked_and_separate(full_fuser, method))


@pytest.mark.parametrize("method", ["static:0.5,1,1.5", "dynamic"])
def test_mixed_lora_and_stacked_experts_equal_separate_forwards(fuser, method, assert_same_generations):
    assert_same_generations(*stacked_and_separate(fuser, method))


@pytest.mark.parametrize("method", ["static:1", "dynamic"])
def test_speculative_on_stacked_drafts_equals_plain(full_fuser, method):
    solver = full_fuser.method(method)
    params = SamplingParams(max_new_tokens=16)
    plain = decode(full_fuser.models, PROMPTS, solver, params, engine=EngineConfig(share_forwards=False))
    fast = decode(full_fuser.models, PROMPTS, solver, params, engine=EngineConfig(speculate=3))
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in fast] == [g.finish_reason for g in plain]


def test_speed_table_row(full_fuser):
    from logitfusion.bench.speed import full_cost
    alone, stacked, separate = full_cost(full_fuser.models, 2, 2, "cpu", 1)
    assert alone > 0 and stacked > 0 and separate > 0
