"""Adaptive draft length (speculation.plan_round): which k a round takes from the rows'
acceptance, and that adapting never changes what is emitted (greedy: the same tokens as plain
decoding; sampled: the same tokens for a seed whatever rows share the batch)."""

from types import SimpleNamespace

import pytest

from logitfusion.engine.config import EngineConfig
import torch

from logitfusion.engine.decoding import Batch, decode
from logitfusion.engine.recipe import Recipe
from logitfusion.engine.sampling import DecodingError, SamplingParams
from logitfusion.engine.speculation import expected_tokens, plan_round

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river"]


def batch_of(acceptance, sampled=(), k=4, cost=0.5, adaptive=True):
    seqs = [SimpleNamespace(acceptance=a, generator=object() if i in sampled else None)
            for i, a in enumerate(acceptance)]
    return SimpleNamespace(seqs=seqs, engine=EngineConfig(speculate=k, speculate_adaptive=adaptive, draft_cost=cost))


def test_expected_tokens_per_round():
    tokens = expected_tokens(torch.tensor([0.0, 0.5, 1.0]), 3)
    assert tokens.tolist() == [[1, 1, 1], [1, 1.5, 1.75], [1, 2, 3]]


def test_fixed_draft_length_is_kept():
    assert plan_round(batch_of([0.0, 0.0], adaptive=False, k=3)) == (3, [3, 3])


def test_no_accepting_row_means_plain_steps_and_all_accepting_the_longest_draft():
    assert plan_round(batch_of([0.0, 0.0, 0.0])) == (1, [1, 1, 1])
    assert plan_round(batch_of([1.0, 1.0], cost=0.5)) == (4, [4, 4])


def test_cost_of_a_drafted_position_sets_where_speculation_stops_paying():
    # one more position pays while a ** (k - 1) > cost per position, roughly
    assert plan_round(batch_of([0.6], cost=0.2))[0] > 1
    assert plan_round(batch_of([0.6], cost=0.9))[0] == 1


def test_a_poorly_accepting_row_does_not_stop_the_others_speculating():
    good = plan_round(batch_of([0.9, 0.9, 0.9], cost=0.3))[0]
    assert good > 1
    assert plan_round(batch_of([0.9, 0.9, 0.9, 0.0], cost=0.3))[0] > 1
    # the batch-level rule counts the poor row's one token a round, not its acceptance
    mean = sum([0.9, 0.9, 0.9, 0.0]) / 4
    assert plan_round(batch_of([mean] * 4, cost=0.3))[0] <= good


def test_a_sampled_row_drafts_what_pays_for_it_alone_whatever_the_batch():
    alone = plan_round(batch_of([0.95], sampled={0}, cost=0.5))
    beside_poor = plan_round(batch_of([0.95] + [0.0] * 7, sampled={0}, cost=0.5))
    beside_good = plan_round(batch_of([0.95, 1.0, 1.0], sampled={0}, cost=0.1, k=8))
    own = alone[1][0]
    assert own > 1 and alone[0] == own
    assert beside_poor[0] >= own and beside_poor[1][0] == own  # the greedy rows cannot pull it down
    assert beside_good[1][0] == plan_round(batch_of([0.95], sampled={0}, cost=0.1, k=8))[1][0]


def test_draft_cost_is_checked():
    for bad in (0, -1, float("nan"), 1e9, "1"):
        with pytest.raises(DecodingError, match="draft_cost"):
            EngineConfig(draft_cost=bad).check()
    with pytest.raises(ValueError, match="draft_cost"):
        Recipe.model_validate({"large": {"path": "x"}, "generation": {"draft_cost": 0}})


@pytest.mark.parametrize("k", [2, 4])
def test_adaptive_greedy_equals_plain_decoding(fuser1, k):
    solver = fuser1.method("dynamic")
    params = SamplingParams(max_new_tokens=20)
    plain = decode(fuser1.models, PROMPTS, solver, params)
    for cost in (0.05, 0.5, 5.0):  # from always drafting to never
        fast = decode(fuser1.models, PROMPTS, solver, params, engine=EngineConfig(speculate=k, speculate_adaptive=True, draft_cost=cost))
        assert [g.token_ids for g in fast] == [g.token_ids for g in plain]


def test_adaptive_batch_goes_plain_when_drafts_are_never_kept(fuser1):
    """Rows expected to keep no draft take a plain step, and emit what plain decoding emits."""
    batch = Batch(fuser1.models, fuser1.method("static:1"), EngineConfig(speculate=4, draft_cost=0.5))
    seqs = batch.add(PROMPTS[:2], [SamplingParams(max_new_tokens=24, ignore_eos=True)] * 2)
    for seq in seqs:
        seq.acceptance = 0.0
    plans = []
    while len(batch):
        plans.append(plan_round(batch)[0])
        batch.step()
    assert plans[0] == 1  # no row is expected to keep a draft: a plain step
    assert [s.tokens for s in seqs] == [g.token_ids for g in decode(
        fuser1.models, PROMPTS[:2], fuser1.method("static:1"), SamplingParams(max_new_tokens=24, ignore_eos=True))]


def test_adaptive_sampling_is_reproducible_and_batch_independent(fuser1):
    kw = dict(solver="dynamic", max_new_tokens=16, temperature=1.0, speculate=4, speculate_adaptive=True)
    for cost in (0.05, 0.6):
        batched = fuser1.generate(PROMPTS, seed=11, draft_cost=cost, **kw)
        alone = [fuser1.generate(p, seed=11 + i, draft_cost=cost, **kw)[0] for i, p in enumerate(PROMPTS)]
        assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
