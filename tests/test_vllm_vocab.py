"""A small side on another tokenizer than the large model's (PM-MinED map, `mapping: auto`) through
vLLM's logits processor: greedy tokens and dynamic weights equal the HF engine's for the same
recipe, with more prompts than vLLM's slots (rows added and removed mid-run).

Skipped without vLLM (pip install 'logitfusion[vllm]'; LOGITFUSION_REQUIRE_VLLM makes that a failure).
One vLLM engine for the module (a start costs 40-70 s of CPU)."""

import os

import pytest

from logitfusion.testing.serving import require_vllm

require_vllm()  # skips the module without vLLM (a failure under `make test-vllm`)

from logitfusion.engine.fuser import Fuser  # noqa: E402
from logitfusion.testing import toy  # noqa: E402
from logitfusion.vllm import backend  # noqa: E402

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river",
           "one bird", "Question: 5 plus 1? Answer:", "the king has ten coins and"]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """The vLLM toy family's large model with a small base, an expert and a delta model on a second
    tokenizer (280 tokens against 300); the recipes of the small side: (hf recipe, vllm recipe),
    differing only in their backend."""
    root = tmp_path_factory.mktemp("vllm_vocab")
    toy.vllm_family(root)
    tok = toy.build_tokenizer(root / "other-tokenizer", vocab_size=280)
    toy.build_model(root / "other-small", tok, hidden=48, layers=2, heads=4, seed=21)
    toy.perturbed_copy(root / "other-small", root / "other-expert", scale=0.5, seed=22)
    toy.build_model(root / "other-delta", tok, hidden=32, layers=1, heads=2, seed=23, init_std=0.05)
    # small.mapping covers the experts (one shared tokenizer)
    body = ("large: {path: large}\nsmall: {path: other-small, mapping: auto}\n"
            "experts: [{name: e1, path: other-expert}]\nsolver: {kind: dynamic}\n")
    (root / "hf.yaml").write_text(body)
    (root / "vllm.yaml").write_text(body + "backend: {kind: vllm, enforce_eager: true, max_model_len: 128, "
                                           "max_num_seqs: 3, options: {seed: 0}}\n")
    return root / "hf.yaml", root / "vllm.yaml"


@pytest.fixture(scope="module")
def hf(recipes):
    fuser = Fuser.from_recipe(recipes[0])
    assert fuser.models.small.foreign and fuser.models.experts[0].foreign  # the map is in use
    return fuser


@pytest.fixture(scope="module")
def vf(recipes):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    fuser = backend.load(recipes[1])
    yield fuser
    fuser.close()


@pytest.mark.parametrize("method", ["static:1.0", "dynamic", "expert:e1", "static:0"])
def test_cross_vocabulary_small_side_gives_the_hf_engines_tokens(vf, hf, method):
    got = vf.generate(PROMPTS, solver=method, max_new_tokens=8, ignore_eos=True)
    want = hf.generate(PROMPTS, solver=method, max_new_tokens=8, ignore_eos=True)
    assert [g.token_ids for g in got] == [g.token_ids for g in want], method
    if method == "static:0":  # the map changes nothing where the small side weighs nothing
        large = hf.generate(PROMPTS, solver="large", max_new_tokens=8, ignore_eos=True)
        assert [g.token_ids for g in got] == [g.token_ids for g in large]


def test_cross_vocabulary_dynamic_weights_are_the_hf_engines(vf, hf):
    got = vf.generate(PROMPTS, solver="dynamic", max_new_tokens=6, ignore_eos=True, trace=True)
    want = hf.generate(PROMPTS, solver="dynamic", max_new_tokens=6, ignore_eos=True, trace=True)
    assert any(w[0] > 0 for g in want for w in g.weights)  # the weights move
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert len(g.weights) == len(w.weights)
        for a, b in zip(g.weights, w.weights):
            assert a == pytest.approx(b, abs=1e-5)


@pytest.fixture(scope="module")
def delta_recipes(recipes):
    """Cross-model control across vocabularies: the large model and the delta model on the second
    tokenizer (random, so its logits matter): (hf recipe, vllm recipe)."""
    root = recipes[0].parent
    body = "large: {path: large}\ndelta: {path: other-delta, mapping: auto, strength: 1.0}\nsolver: {kind: delta}\n"
    (root / "delta-hf.yaml").write_text(body)
    (root / "delta-vllm.yaml").write_text(body + "backend: {kind: vllm, enforce_eager: true, max_model_len: 128, "
                                                 "max_num_seqs: 3, options: {seed: 0}}\n")
    return root / "delta-hf.yaml", root / "delta-vllm.yaml"


def test_a_cross_vocabulary_delta_gives_the_hf_engines_tokens(delta_recipes):
    hf = Fuser.from_recipe(delta_recipes[0])
    assert hf.models.delta.foreign
    want = hf.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert [g.token_ids for g in want] != [g.token_ids for g in hf.generate(PROMPTS, solver="large", max_new_tokens=8,
                                                                           ignore_eos=True)]  # the delta matters
    with backend.load(delta_recipes[1]) as vf:
        for spec in (None, "delta:0.5"):
            got = vf.generate(PROMPTS, solver=spec, max_new_tokens=8, ignore_eos=True)
            assert [g.token_ids for g in got] == [g.token_ids for g in hf.generate(
                PROMPTS, solver=spec, max_new_tokens=8, ignore_eos=True)], spec
