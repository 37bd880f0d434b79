"""Every fast path against the plain path: shared LoRA forwards vs one forward per model,
speculative fused decoding vs plain decoding. Token for token, no timing."""

from collections import Counter

import pytest

from logitfusion.engine.config import EngineConfig
import torch

from logitfusion import Fuser
from logitfusion.testing import toy
from logitfusion.engine import decoding
from logitfusion.engine.decoding import Batch, decode
from logitfusion.engine.sampling import SamplingParams

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river"]


@pytest.fixture(scope="module")
def lora_fuser(family, tmp_path_factory):
    """Large + small + two LoRA experts + one full expert: the small base and both adapters share
    one module."""
    extra = tmp_path_factory.mktemp("lora2") / "lora2"
    toy.lora_adapter(family["small"], extra, seed=7)
    return Fuser.from_pretrained(family["large"], family["small"],
                                 {"lora1": family["experts"]["lora1"], "lora2": str(extra),
                                  "expert1": family["experts"]["expert1"]})


def test_small_base_and_lora_experts_share_one_forward(lora_fuser):
    batch = Batch(lora_fuser.models, lora_fuser.method("dynamic"))
    groups = [[m.role for m in g] for g in batch.groups]
    assert groups == [["large"], ["small", "expert:lora1", "expert:lora2"], ["expert:expert1"]]
    assert batch.modules[1] is not lora_fuser.models.small.model  # adapters stacked (stacking.stack_lora)
    separate = Batch(lora_fuser.models, lora_fuser.method("dynamic"), EngineConfig(share_forwards=False))
    assert len(separate.groups) == 5


@pytest.mark.parametrize("method", ["static:0.5,1,1.5", "dynamic", "dynamic:joint", "expert:lora2"])
def test_shared_forwards_equal_separate_forwards(lora_fuser, method, assert_same_generations):
    solver = lora_fuser.method(method)
    params = SamplingParams(max_new_tokens=10)
    shared = decode(lora_fuser.models, PROMPTS, solver, params, engine=EngineConfig(trace=True))
    separate = decode(lora_fuser.models, PROMPTS, solver, params, engine=EngineConfig(trace=True, share_forwards=False))
    assert_same_generations(shared, separate)


@pytest.mark.parametrize("which", ["lora_fuser", "full_fuser"])  # a shared PEFT forward, stacked weights
def test_shared_forwards_when_rows_join_and_leave(request, which):
    fuser = request.getfixturevalue(which)
    solver = fuser.method("dynamic")
    alone = [decode(fuser.models, [p], solver, SamplingParams(max_new_tokens=8), engine=EngineConfig(share_forwards=False))[0].token_ids
             for p in PROMPTS]
    batch = Batch(fuser.models, solver)
    first = batch.add(PROMPTS[:1], [SamplingParams(max_new_tokens=8)])
    batch.step()
    later = batch.add(PROMPTS[1:3], [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=8)])
    batch.step()
    last = batch.add(PROMPTS[3:], [SamplingParams(max_new_tokens=8)])
    while len(batch):
        batch.step()
    assert [s.tokens for s in first + later + last] == [alone[0], alone[1][:3], alone[2], alone[3]]


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("method", ["static:1", "dynamic",
                                    pytest.param("dynamic:joint", marks=pytest.mark.slow)])  # 2-3 s each
def test_speculative_equals_plain_decoding(lora_fuser, method, k):
    solver = lora_fuser.method(method)
    params = SamplingParams(max_new_tokens=16)
    plain = decode(lora_fuser.models, PROMPTS, solver, params, engine=EngineConfig(trace=True))
    fast = decode(lora_fuser.models, PROMPTS, solver, params, engine=EngineConfig(trace=True, speculate=k))
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in fast] == [g.finish_reason for g in plain]
    for a, b in zip(plain, fast):  # the weights of every emitted token come along too
        assert len(a.weights) == len(b.weights)
        assert torch.allclose(torch.tensor(a.weights), torch.tensor(b.weights), atol=1e-3)


def test_speculative_one_expert_equals_plain_and_honours_stops(fuser1):
    solver = fuser1.method("dynamic")
    plain = fuser1.generate(PROMPTS, solver=solver, max_new_tokens=20)
    fast = fuser1.generate(PROMPTS, solver=solver, max_new_tokens=20, speculate=4)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    stop = plain[1].text[4:6]
    cut_plain = fuser1.generate(PROMPTS[1], solver=solver, max_new_tokens=20, stop=[stop])[0]
    cut_fast = fuser1.generate(PROMPTS[1], solver=solver, max_new_tokens=20, stop=[stop], speculate=4)[0]
    assert cut_fast.finish_reason == cut_plain.finish_reason == "stop"
    assert cut_fast.text == cut_plain.text and cut_fast.token_ids == cut_plain.token_ids


def test_speculative_logprobs_equal_plain(fuser1):
    solver = fuser1.method("static:1")
    outs = []
    for k in (0, 4):
        batch = Batch(fuser1.models, solver, EngineConfig(speculate=k))
        seqs = batch.add(PROMPTS, [SamplingParams(max_new_tokens=12, logprobs=True)] * len(PROMPTS))
        while len(batch):
            batch.step()
        outs.append(seqs)
    for a, b in zip(*outs):
        assert a.tokens == b.tokens
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_speculation_runs_the_large_model_less_often(fuser1):
    """A large-model forward checks up to k tokens: count its forwards (fixed k: adaptive rounds
    on these random toy models mostly decode plainly, as their drafts are rarely kept)."""
    calls = []
    large = fuser1.models.large.model
    handle = large.register_forward_hook(lambda *a: calls.append(1))
    try:
        fuser1.generate(PROMPTS[0], solver="static:1", max_new_tokens=24, ignore_eos=True, speculate=4,
                        speculate_adaptive=False)
    finally:
        handle.remove()
    assert len(calls) < 24  # plain decoding: 1 prefill + 23 steps


# ---------------------------------------------------------------- speculative sampling

def chi_square_p_value(counts: dict, probs: dict) -> tuple[float, int]:
    """Pearson's test of observed counts against exact probabilities (cells expected fewer than 5
    times pooled) -> (p-value, degrees of freedom)."""
    n = sum(counts.values())
    small = [key for key, p in probs.items() if n * p < 5]
    cells = [(counts.get(key, 0), p) for key, p in probs.items() if key not in small]
    cells.append((sum(counts.get(key, 0) for key in small) + sum(c for key, c in counts.items() if key not in probs),
                  sum(probs[key] for key in small)))
    cells = [(o, p) for o, p in cells if p > 0]
    chi2 = sum((o - n * p) ** 2 / (n * p) for o, p in cells)
    dof = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2))), dof


@pytest.mark.slow
@pytest.mark.parametrize("speculation", [dict(speculate=3, speculate_adaptive=False),
                                         # adaptive, from the prior acceptance 0.7: a round of 2,
                                         # then after a rejection a plain step, which must draw
                                         # from the residual too
                                         dict(speculate=2, speculate_adaptive=True, draft_cost=0.6)])
def test_speculative_sampling_is_exact_in_distribution(fuser1, monkeypatch, speculation):
    """Token 2 of speculative sampling comes from an accepted draft or from the residual of a
    rejected one; either way it must follow the fused distribution exactly. Plain greedy decoding
    traces the whole fused distribution at step 1 and, after the most likely first token a, at
    step 2; 4000 speculative samples are compared to both by chi-square tests. (A draft kept
    without the ratio test, or a rejection redrawn from p instead of the residual, fails them.)"""
    monkeypatch.setattr(decoding, "TOP_TOKENS", 10_000)  # trace every token's probability
    kw = dict(solver="dynamic", max_new_tokens=2, ignore_eos=True)
    exact = fuser1.generate(PROMPTS[1], trace=True, **kw)[0]
    first = dict(exact.trace[0].top["fused"])
    a = exact.token_ids[0]
    second = dict(exact.trace[1].top["fused"])

    n = 4000
    fast = fuser1.generate([PROMPTS[1]] * n, seed=1000, batch_size=n, temperature=1.0, **speculation, **kw)
    t1 = Counter(g.token_ids[0] for g in fast)
    t2 = Counter(g.token_ids[1] for g in fast if g.token_ids[0] == a)
    assert sum(t2.values()) > 500
    for counts, probs in ((t1, first), (t2, second)):
        p_value, dof = chi_square_p_value(counts, probs)
        assert dof >= 10, "the test needs a spread-out fused distribution"
        assert p_value > 1e-4, f"p = {p_value:.2g} on {dof} dof: speculative samples do not follow the fused distribution"


def test_speculative_sampling_is_reproducible_and_batch_independent(fuser1):
    kw = dict(solver="dynamic", max_new_tokens=12, temperature=0.9, speculate=3)
    batched = fuser1.generate(PROMPTS[:2], seed=5, **kw)
    again = fuser1.generate(PROMPTS[:2], seed=5, **kw)
    alone = [fuser1.generate(p, seed=5 + i, **kw)[0] for i, p in enumerate(PROMPTS[:2])]
    assert [g.token_ids for g in batched] == [g.token_ids for g in again] == [g.token_ids for g in alone]
    other = fuser1.generate(PROMPTS[:2], seed=6, **kw)
    assert [g.token_ids for g in other] != [g.token_ids for g in batched]


def test_greedy_rows_beside_sampled_rows_stay_exact(fuser1):
    """A greedy request batched with sampled ones goes through the sampling test, and must still
    emit exactly plain greedy decoding's tokens."""
    solver = fuser1.method("dynamic")
    greedy = decode(fuser1.models, PROMPTS[:1], solver, SamplingParams(max_new_tokens=16))[0].token_ids
    batch = Batch(fuser1.models, solver, EngineConfig(speculate=4))
    seqs = batch.add(PROMPTS[:1] * 3, [SamplingParams(max_new_tokens=16),
                                       SamplingParams(max_new_tokens=16, temperature=1.0, seed=1),
                                       SamplingParams(max_new_tokens=16, temperature=1.0, seed=2)])
    while len(batch):
        batch.step()
    assert seqs[0].tokens == greedy
    assert seqs[1].tokens != seqs[2].tokens
