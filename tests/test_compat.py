"""engine.compat: other libraries' internals behind one door. A version that breaks one says which
library, which version and what broke; fast paths that fall back say so in the log."""

import logging
import re
import types
from pathlib import Path

import pytest

from logitfusion.engine.config import EngineConfig
import torch
from torch import nn

from logitfusion.engine import compat
from logitfusion.engine.compat import CHECKED, CompatError
from logitfusion.engine.decoding import Batch

SRC = Path(compat.__file__).parents[1]
BENCHMARKS = SRC.parents[1] / "benchmarks"


@pytest.fixture
def newer(monkeypatch):
    """Pretend every library is at version 99.0.0."""
    monkeypatch.setattr(compat, "installed", lambda lib: "99.0.0")


def test_a_broken_internal_names_the_library_both_versions_and_what_broke(newer):
    with pytest.raises(CompatError) as err:
        with compat.internals("peft", "LoraLayer.scaling"):
            raise AttributeError("'Linear' object has no attribute 'scaling'")
    message = str(err.value)
    assert "peft internals (LoraLayer.scaling)" in message
    assert f"checked against peft {CHECKED['peft']}" in message and "installed peft 99.0.0" in message
    assert "no attribute 'scaling'" in message and f"peft=={CHECKED['peft']}" in message


def test_errors_that_are_not_missing_internals_pass_through():
    with pytest.raises(ValueError, match="a real bug"):
        with compat.internals("transformers", "anything"):
            raise ValueError("a real bug")


def test_the_checked_versions_are_the_ones_installed():
    """A skip (not a failure: a fresh install may pull a newer release, and the rest of this suite is
    what tells whether it still works) that says which library moved; once the suite passes on it,
    update compat.CHECKED."""
    moved = {lib: compat.installed(lib) for lib, version in CHECKED.items()
             if compat.installed(lib).split("+")[0] != version}
    if moved:
        pytest.skip(f"installed {moved} differ from compat.CHECKED {CHECKED}: if the suite passes, update CHECKED")


def test_a_transformers_without_dynamic_layer_fails_clearly(newer, monkeypatch):
    import transformers.cache_utils as cache_utils
    monkeypatch.delattr(cache_utils, "DynamicLayer")
    compat._reserved_layer.cache_clear()
    try:
        with pytest.raises(CompatError, match=r"transformers internals .*DynamicLayer.*installed transformers 99\.0\.0"):
            compat._reserved_layer()
    finally:
        compat._reserved_layer.cache_clear()


def test_a_transformers_without_llama_rmsnorm_fails_clearly(newer, monkeypatch):
    import transformers.models.llama.modeling_llama as llama
    monkeypatch.delattr(llama, "LlamaRMSNorm")
    with pytest.raises(CompatError, match=r"LlamaRMSNorm.*checked against transformers"):
        compat.is_llama_rmsnorm(nn.LayerNorm(4))


def test_a_peft_without_lora_layers_fails_clearly(newer, monkeypatch):
    import peft.tuners.lora as lora
    monkeypatch.delattr(lora, "LoraLayer")
    with pytest.raises(CompatError, match=rf"peft internals .*checked against peft {re.escape(CHECKED['peft'])}"):
        compat.lora_layer_classes()


class Model(nn.Module):
    """Reads the cache under `keyword`, or swallows it in **kwargs as a model that renamed it would."""

    def __init__(self, keyword: str | None):
        super().__init__()
        self.keyword = keyword

    def forward(self, input_ids, use_cache=True, **kwargs):
        cache = kwargs.get(self.keyword) if self.keyword else None
        return types.SimpleNamespace(logits=torch.zeros(1), past_key_values=cache, cache=cache)


def test_a_model_that_ignores_the_cache_keyword_fails_clearly(newer):
    cache = object()
    assert compat.returned_cache(compat.forward(Model(compat.CACHE_KEYWORD), cache=cache, input_ids=None)) is cache
    with pytest.raises(CompatError, match=rf"forward's `{compat.CACHE_KEYWORD}=` argument.*installed transformers 99\.0\.0"):
        compat.forward(Model(None), cache=cache, input_ids=None)
    compat.forward(Model(None), cache=None, input_ids=None)  # nothing to use: nothing to check


def test_switching_the_cache_keyword_is_one_line(monkeypatch):
    monkeypatch.setattr(compat, "CACHE_KEYWORD", "cache")
    cache = object()
    out = compat.forward(Model("cache"), cache=cache, input_ids=None)
    assert compat.returned_cache(out) is cache


def test_the_cache_keyword_is_the_current_one_and_forwards_are_quiet(fuser1, caplog):
    """transformers 5.24+ names the cache `cache`; `past_key_values=` warns (FutureWarning) and its
    output field logs a deprecation: a generate shows neither."""
    import warnings

    import transformers
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24):
        assert compat.CACHE_KEYWORD == "cache"
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        fuser1.generate("the cat", max_new_tokens=3)
    noise = [str(w.message) for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    noise += [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert not noise, noise


def test_only_compat_passes_the_cache_keyword():
    """Every model forward with a cache goes through compat.forward."""
    users = [p for p in [*SRC.rglob("*.py"), *BENCHMARKS.glob("*.py")]
             if "past_key_values" in p.read_text() and p.name != "compat.py"]
    assert not users, users


def test_lean_lm_eval_restores_what_it_patched_and_says_what_it_missed(monkeypatch, caplog):
    import lm_eval.evaluator as lm_evaluator
    before = lm_evaluator.add_env_info
    with compat.lean_lm_eval():
        assert lm_evaluator.add_env_info is not before
    assert lm_evaluator.add_env_info is before
    monkeypatch.delattr(lm_evaluator, "get_git_commit_hash")
    compat._once.cache_clear()
    with caplog.at_level(logging.INFO, logger="logitfusion"), compat.lean_lm_eval():
        pass
    assert any("lm_eval.evaluator.get_git_commit_hash" in r.getMessage() and CHECKED["lm_eval"] in r.getMessage()
               for r in caplog.records if r.name == "logitfusion")
    assert lm_evaluator.add_env_info is before


def test_speculation_that_cannot_run_says_so(fuser, caplog):
    compat.warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="logitfusion"):
        batch = Batch(fuser.models, fuser.method("large"), EngineConfig(speculate=4))
        Batch(fuser.models, fuser.method("large"), EngineConfig(speculate=4))
    said = [r.getMessage() for r in caplog.records if r.name == "logitfusion"]
    assert said == ["speculate=4 ignored, decoding one token per step: the large model alone is not a fusion: "
                    "the small side has nothing to draft for it"]
    assert not batch.speculative
    caplog.clear()
    assert Batch(fuser.models, fuser.method("dynamic"), EngineConfig(speculate=4)).speculative
    assert not caplog.records
