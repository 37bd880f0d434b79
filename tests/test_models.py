"""Loading: real Hugging Face directories (toy family and broken variants of it)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from logitfusion.testing import toy
from logitfusion.engine.fuser import Fuser
from logitfusion.engine.models import LoadError, LoadOptions, VocabularyMismatchError, load_causal_lm, load_model_set
from logitfusion.engine.recipe import RecipeError


def spec(path, name=None):
    return {"path": str(path), "template": "{prompt}", **({"name": name} if name else {})}


def load(large, small=None, experts=(), **opts):
    return load_model_set(spec(large), spec(small) if small else None,
                          [spec(p, n) for n, p in experts], LoadOptions(**opts))


@pytest.fixture(scope="module")
def arch64(family, family_tokenizer, tmp_path_factory):
    """A model with the family's tokenizer but hidden_size 64 (the small base has 48)."""
    out = tmp_path_factory.mktemp("arch64") / "model"
    toy.build_model(out, family_tokenizer, hidden=64, layers=2, heads=4, seed=5)
    return str(out)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ paths

def test_missing_path(family, tmp_path):
    with pytest.raises(LoadError, match="does not exist") as e:
        load(tmp_path / "nope", family["small"])
    assert "large" in str(e.value) and "nope" in str(e.value)


def test_missing_expert_path_names_the_expert(family, tmp_path):
    with pytest.raises(LoadError, match="expert:math.*does not exist"):
        load(family["large"], family["small"], [("math", tmp_path / "missing")])


def test_file_instead_of_directory(family, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not a model")
    with pytest.raises(LoadError, match="is a file"):
        load(family["large"], f)


def test_directory_without_config(family, tmp_path):
    d = tmp_path / "empty_model"
    d.mkdir()
    (d / "README.md").write_text("nothing here")
    with pytest.raises(LoadError, match="config.json"):
        load(d, family["small"])


def test_large_model_must_not_be_an_adapter(family):
    with pytest.raises(LoadError, match="PEFT adapter"):
        load(family["experts"]["lora1"], family["small"])


def test_experts_need_a_small_base(family):
    with pytest.raises(LoadError, match="small base"):
        load_model_set(spec(family["large"]), None, [spec(family["experts"]["expert1"], "e1")], LoadOptions())
    with pytest.raises(RecipeError, match="small"):
        Fuser.from_pretrained(family["large"], None, {"e1": family["experts"]["expert1"]})


def test_directory_without_weights(family, tmp_path):
    d = copy_model(family["large"], tmp_path / "noweights")
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(LoadError, match="no weights"):
        load(d, family["small"])


# ------------------------------------------------------------------ pickled weights

@pytest.fixture(scope="module")
def pickled_large(family, tmp_path_factory):
    """The large model with only pytorch_model.bin (transformers 5 always saves safetensors, so
    the pickle is written by hand)."""
    from transformers import AutoModelForCausalLM

    d = copy_model(family["large"], tmp_path_factory.mktemp("pickled") / "large")
    sd = AutoModelForCausalLM.from_pretrained(family["large"]).state_dict()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    assert not list(d.glob("*.safetensors"))
    return str(d)


def test_pickled_weights_refused_by_default(family, pickled_large):
    with pytest.raises(LoadError) as e:
        load(pickled_large, family["small"])
    msg = str(e.value)
    assert "safetensors" in msg and "allow_pickle" in msg and "pickle" in msg


def test_pickled_weights_load_with_allow_pickle(family, pickled_large):
    f = Fuser.from_pretrained(pickled_large, family["small"], load={"allow_pickle": True})
    ref = Fuser.from_pretrained(family["large"], family["small"])
    for a, b in zip(f.models.large.model.parameters(), ref.models.large.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (f.generate("the cat", max_new_tokens=5)[0].token_ids
            == ref.generate("the cat", max_new_tokens=5)[0].token_ids)


# ------------------------------------------------------------------ vocabularies

def _first_diff(tok_a, tok_b):
    a = {i: t for t, i in tok_a.get_vocab().items()}
    b = {i: t for t, i in tok_b.get_vocab().items()}
    i = next(i for i in sorted(set(a) | set(b)) if a.get(i) != b.get(i))
    return i, a.get(i), b.get(i)


def test_mismatched_vocabularies(family, family_tokenizer, other_vocab_small):
    from transformers import AutoTokenizer

    with pytest.raises(VocabularyMismatchError) as e:
        load(family["large"], other_vocab_small)
    msg = str(e.value)
    i, tok_large, tok_small = _first_diff(family_tokenizer, AutoTokenizer.from_pretrained(other_vocab_small))
    assert f"id {i}:" in msg and repr(tok_large) in msg and repr(tok_small) in msg
    assert "300" in msg and "280" in msg
    assert "cross-vocabulary" in msg
    assert isinstance(e.value, LoadError)


def test_same_size_different_tokens_is_a_mismatch(family, tmp_path):
    """Same number of tokens is not enough (Llama-2 vs Mistral): the token -> id maps must agree."""
    tok = toy.build_tokenizer(tmp_path / "tok", vocab_size=300, seed=1)
    toy.build_model(tmp_path / "small", tok, hidden=48, layers=2, heads=4, seed=20)
    assert len(tok) == 300
    with pytest.raises(VocabularyMismatchError, match="ids differ"):
        load(family["large"], tmp_path / "small")


def test_expert_with_another_vocabulary(family, other_vocab_small):
    with pytest.raises(VocabularyMismatchError, match="expert:odd"):
        load(family["large"], family["small"], [("odd", other_vocab_small)])


# ------------------------------------------------------------------ architectures

def test_expert_with_another_architecture(family, arch64):
    with pytest.raises(LoadError, match="hidden_size") as e:
        load(family["large"], family["small"], [("wide", arch64)])
    assert "expert:wide" in str(e.value) and "48" in str(e.value) and "64" in str(e.value)


def test_lora_adapter_of_another_base_is_a_clear_error(family, arch64, tmp_path):
    toy.lora_adapter(arch64, tmp_path / "lora64")
    with pytest.raises(LoadError, match="expert:l64.*LoRA adapter"):
        load(family["large"], family["small"], [("l64", tmp_path / "lora64")])


def test_non_lora_adapter_is_refused(family, tmp_path):
    d = copy_model(family["experts"]["lora1"], tmp_path / "ia3")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="IA3"):
        load(family["large"], family["small"], [("ia3", d)])


def test_padded_embedding_rows_are_tolerated(family, family_tokenizer, tmp_path, reference_logits):
    """Checkpoints often pad the vocabulary to a multiple of 8/64: logits are sliced to the tokenizer."""
    from transformers import AutoModelForCausalLM

    padded = tmp_path / "large_padded"
    toy.build_model(padded, family_tokenizer, hidden=96, layers=3, heads=4, seed=10, extra_vocab_rows=8)
    f = Fuser.from_pretrained(str(padded), family["small"], {"expert1": family["experts"]["expert1"]})
    V = len(family_tokenizer)
    assert f.models.vocab_size == V == 300
    assert f.models.large.model.get_output_embeddings().weight.shape[0] == V + 8
    for solver in ("large", "static:0", "static:1", "dynamic"):
        gens = f.generate(["the cat", "Question: 2 plus 3? Answer:"], solver=solver, max_new_tokens=15, trace=True)
        for g in gens:
            assert len(g.token_ids) == 15
            assert all(0 <= t < V for t in g.token_ids)
            assert all(i < V for step in g.trace for top in step.top.values() for i, _ in top)
    # greedy "large" = argmax over the first V logits of the padded model, step by step
    ref = AutoModelForCausalLM.from_pretrained(str(padded)).eval()
    (g,) = f.generate("the cat", solver="large", max_new_tokens=8)
    ids = family_tokenizer("the cat")["input_ids"]
    with torch.no_grad():
        for k, token in enumerate(g.token_ids):
            z = ref(input_ids=torch.tensor([ids + g.token_ids[:k]])).logits[0, -1]
            assert z.shape[0] == V + 8
            assert int(z[:V].argmax()) == token


def test_model_with_fewer_logits_than_tokens_is_refused(family, family_tokenizer, tmp_path):
    short = tmp_path / "short"
    toy.build_model(short, family_tokenizer, hidden=48, layers=2, heads=4, seed=3, extra_vocab_rows=-8)
    with pytest.raises(LoadError, match="292 logits.*300 tokens"):
        load(family["large"], short)


# ------------------------------------------------------------------ the loaded set

def test_model_set_contents(fuser, family):
    ms = fuser.models
    assert ms.expert_names == ["expert1", "expert2", "lora1"]
    assert ms.vocab_size == len(ms.tokenizer) == 300
    assert ms.large.role == "large" and ms.small.role == "small"
    assert [m.role for m in ms.experts] == ["expert:expert1", "expert:expert2", "expert:lora1"]
    assert ms.large.context == ms.small.context == 256
    assert ms.tokenizer.eos_token_id in ms.eos_token_ids
    assert not ms.large.model.training and not ms.small.model.training
    assert all(p.dtype == torch.float32 for p in ms.large.model.parameters())


def test_lora_expert_shares_the_small_base_module(fuser):
    ms = fuser.models
    lora = ms.experts[2]
    assert lora.model is ms.small.model  # one set of base weights, adapter picked per row
    assert lora.adapter == "lora1" and ms.small.adapter == "__base__"
    assert ms.experts[0].model is not ms.small.model and ms.experts[0].model is not ms.experts[1].model
    assert ms.experts[0].adapter is None


@torch.no_grad()
def test_shared_module_gives_base_and_adapter_logits(fuser, hf_models, family_tokenizer):
    ms = fuser.models
    ids = torch.tensor([family_tokenizer("Question: 2 plus 3? Answer: 5")["input_ids"]] * 2)
    small = ms.small.model(input_ids=ids, **ms.small.forward_kwargs(2)).logits
    lora = ms.experts[2].model(input_ids=ids, **ms.experts[2].forward_kwargs(2)).logits
    torch.testing.assert_close(small, hf_models["small"](input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora, hf_models["lora1"](input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert (small - lora).abs().max() > 1e-2  # the adapter really changes the model
    # one batch mixing base rows and adapter rows
    mixed = ms.small.model(input_ids=ids, adapter_names=["__base__", "lora1"]).logits
    torch.testing.assert_close(mixed[0], small[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], lora[1], rtol=1e-5, atol=1e-5)


def test_loading_many_experts_does_not_change_the_base_for_others(fuser, family):
    """Loading lora1 on the shared base must leave 'small' decoding exactly the plain small model."""
    plain = Fuser.from_pretrained(family["small"])  # the small model alone, as a "large"
    (a,) = plain.generate("the cat", solver="large", max_new_tokens=10)
    # the small member (shared PEFT module, adapters off) gives the plain small model's greedy tokens
    ids = fuser.models.tokenizer("the cat")["input_ids"]
    with torch.no_grad():
        for k, token in enumerate(a.token_ids):
            x = torch.tensor([ids + a.token_ids[:k]])
            z = fuser.models.small.model(input_ids=x, **fuser.models.small.forward_kwargs(1)).logits[0, -1]
            assert int(z.argmax()) == token


# ------------------------------------------------------------------ options

def test_load_options_are_safe_by_default():
    opts = LoadOptions()
    assert opts.trust_remote_code is False
    assert opts.allow_pickle is False
    assert opts.dtype == "float32" and opts.device == "cpu" and opts.device_map is None
    assert opts.torch_dtype() is torch.float32
    with pytest.raises(LoadError, match="dtype"):
        LoadOptions(dtype="int3").torch_dtype()


def test_remote_code_is_not_run_by_default(family, tmp_path):
    d = copy_model(family["large"], tmp_path / "remote")
    marker = tmp_path / "EXECUTED"
    (d / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaForCausalLM\n\n\nclass EvilModel(LlamaForCausalLM):\n    pass\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        model = load_causal_lm(d, "large", LoadOptions())
        assert type(model).__name__ != "EvilModel"
    except LoadError:
        pass  # refusing is fine too; running the code is not
    assert not marker.exists()
    model = load_causal_lm(d, "large", LoadOptions(trust_remote_code=True))  # opt-in: the code runs
    assert type(model).__name__ == "EvilModel" and marker.exists()


def test_bfloat16_models_fuse_in_float32(family):
    f = Fuser.from_pretrained(family["large"], family["small"], {"expert1": family["experts"]["expert1"]},
                              load={"dtype": "bfloat16"})
    assert next(f.models.large.model.parameters()).dtype == torch.bfloat16
    (g,) = f.generate("the cat", solver="dynamic", max_new_tokens=6, trace=True)
    assert len(g.token_ids) == 6 and g.finish_reason == "length"
    assert all(0 <= s.objective < float("inf") for s in g.trace)


def test_bad_dtype_in_recipe_is_refused(family):
    with pytest.raises(RecipeError, match="load.dtype"):
        Fuser.from_pretrained(family["large"], load={"dtype": "int3"})


def test_large_alone_needs_no_small(family):
    f = Fuser.from_pretrained(family["large"])
    assert f.models.small is None and f.models.experts == []
    (g,) = f.generate("the cat", max_new_tokens=4)
    assert len(g.token_ids) == 4


def test_error_message_starts_with_the_role(family, tmp_path):
    assert Path(family["large"]).is_dir()
    with pytest.raises(LoadError, match="^small:"):
        load(family["large"], tmp_path / "gone")
