"""-inf is a mask in fused logits (issue 24): only NaN, +inf or a row with no finite logit is an
error. A rule that masks tokens with -inf decodes exactly as the same rule masking with a huge
finite penalty did before: greedy, sampled (top-k, top-p), with log-probs and traces, plainly and
speculatively; a solver that cannot draft refuses speculation by name."""

import math

import pytest
import torch

from logitfusion.engine.config import EngineConfig
from logitfusion.engine.decoding import Batch, usable
from logitfusion.engine.rules import Nudge, Plausible
from logitfusion.engine.sampling import SamplingParams
from logitfusion.engine.solvers import Choice, Linear, Solver, Static

PROMPTS = ["the cat", "a b c", "hello there, how", "x"]


class Masked(Linear):
    """Static fusion with every token outside `allowed` set to `fill` (-inf: a mask; -1e30: the
    finite stand-in a masking rule had to use before)."""

    name = "masked"

    def __init__(self, allowed, fill=-math.inf, weight=1.0):
        self.allowed, self.fill, self.base = sorted(allowed), fill, Static([weight])

    def __call__(self, z):
        c = self.base(z)
        keep = torch.zeros_like(c.logits, dtype=torch.bool)
        keep[:, self.allowed] = True
        return Choice(c.logits.masked_fill(~keep, self.fill), c.weights, c.objective)


def _allowed(fuser, n=60):
    """A fixed subset of the vocabulary (with EOS, so sequences can end)."""
    vocab = len(fuser.models.tokenizer)
    return set(range(0, vocab, max(1, vocab // n))) | set(fuser.models.eos_token_ids)


SETTINGS = [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=5, seed=5),
            dict(temperature=1.2, top_p=0.7, seed=7)]


@pytest.mark.parametrize("speculate", [0, 4])
@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "sampled", "top_k", "top_p"])
def test_minus_inf_masks_decode_as_a_huge_finite_penalty(fuser1, settings, speculate):
    allowed = _allowed(fuser1)
    kw = dict(max_new_tokens=12, logprobs=True, trace=True, speculate=speculate, **settings)
    masked = fuser1.generate(PROMPTS, solver=Masked(allowed), **kw)
    finite = fuser1.generate(PROMPTS, solver=Masked(allowed, fill=-1e30), **kw)
    for g, ref in zip(masked, finite):
        assert g.finish_reason != "error", g.error
        assert g.token_ids == ref.token_ids and set(g.token_ids) <= allowed
        for step in g.trace:  # traces: finite probabilities, a masked token only ever at 0
            assert all(math.isfinite(p) and (p == 0.0 or token in allowed) for token, p in step.top["fused"])


def test_minus_inf_masks_keep_log_probs_finite_for_chosen_tokens(fuser1):
    allowed = _allowed(fuser1)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11, logprobs=True)
    batch = Batch(fuser1.models, Masked(allowed))
    seqs = batch.add(PROMPTS, params.per_prompt(len(PROMPTS)))
    while len(batch):
        batch.step()
    ref = Batch(fuser1.models, Masked(allowed, fill=-1e30))
    refs = ref.add(PROMPTS, params.per_prompt(len(PROMPTS)))
    while len(ref):
        ref.step()
    for s, r in zip(seqs, refs):
        assert s.tokens == r.tokens and all(math.isfinite(x) for x in s.logprobs)
        assert s.logprobs == pytest.approx(r.logprobs, abs=1e-5)


def test_a_masking_linear_rule_speculates_and_greedy_tokens_do_not_change(fuser1):
    solver = Plausible(Static([1.0]), "large", 0.3)
    batch = Batch(fuser1.models, solver, EngineConfig(speculate=4, speculate_adaptive=False))
    assert batch.speculative
    plain = fuser1.generate(PROMPTS, solver=solver, max_new_tokens=16)
    spec = fuser1.generate(PROMPTS, solver=solver, max_new_tokens=16, speculate=4, speculate_adaptive=False)
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    assert all(g.finish_reason != "error" for g in spec)


def test_a_solver_that_cannot_draft_refuses_speculation_by_name(fuser1, recwarn):
    batch = Batch(fuser1.models, Nudge(0.5), EngineConfig(speculate=4))
    assert not batch.speculative
    assert "nudge" in Nudge(0.5).speculation_refusal()
    # and it still decodes, one token a step, with its -inf-free but switching distribution
    (g,) = fuser1.generate(PROMPTS[0], solver=Nudge(0.5), max_new_tokens=6, speculate=4)
    assert g.finish_reason != "error" and len(g.token_ids) > 0


class Broken(Solver):
    """Fused logits with one bad row pattern for every row."""

    reads = frozenset({"large"})
    name = "broken"

    def __init__(self, fill):
        self.fill = fill

    def __call__(self, z):
        logits = z.large.float().clone()
        if self.fill == "all -inf":
            logits[:] = -math.inf
        else:
            logits[:, 0] = self.fill
        return Choice(logits)


@pytest.mark.parametrize("fill", [float("nan"), math.inf, "all -inf"])
def test_nan_plus_inf_and_a_row_with_no_finite_logit_are_errors(fuser1, fill):
    (g,) = fuser1.generate(PROMPTS[0], solver=Broken(fill), max_new_tokens=4)
    assert g.finish_reason == "error" and g.token_ids == []
    assert "fused" in g.error and "no finite logit" in g.error


def test_a_single_minus_inf_is_not_an_error(fuser1):
    (g,) = fuser1.generate(PROMPTS[0], solver=Broken(-math.inf), max_new_tokens=4)
    assert g.finish_reason == "length" and 0 not in g.token_ids


def test_usable_rows():
    z = torch.tensor([[0.0, -math.inf], [math.nan, 0.0], [math.inf, 0.0], [-math.inf, -math.inf], [1.0, 2.0]])
    assert usable(z).tolist() == [True, False, False, False, True]


class HidesNaN(Solver):
    """Masks exactly where the large model's logits are NaN: the fused row looks fine."""

    reads = frozenset({"large"})
    name = "hides"

    def __call__(self, z):
        return Choice(torch.nan_to_num(z.large.float(), nan=-math.inf))


def test_a_model_nan_hidden_by_a_mask_is_still_an_error(family, nan_copy_large):
    from logitfusion.engine.fuser import Fuser
    f = Fuser.from_pretrained(nan_copy_large, family["small"], {"expert1": family["experts"]["expert1"]})
    (g,) = f.generate(PROMPTS[0], solver=HidesNaN(), max_new_tokens=4)
    assert g.finish_reason == "error" and "large" in g.error


@pytest.fixture(scope="module")
def nan_copy_large(family, tmp_path_factory):
    """The large model with NaN in one row of its output layer (one token's logit is NaN)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path_factory.mktemp("nan_row")
    model = AutoModelForCausalLM.from_pretrained(family["large"])
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(family["large"]).save_pretrained(str(out))
    return str(out)


def test_the_server_answers_masked_logprobs_as_json_numbers(fuser1):
    from fastapi.testclient import TestClient

    from logitfusion.serve import create_app
    with TestClient(create_app({"fusion": fuser1})) as client:
        r = client.post("/v1/completions", json={
            "model": "fusion", "prompt": "the cat", "max_tokens": 6, "logprobs": 5,
            "fusion": {"solver": "plausible:large:0.5:static:1.0"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] != "error"
    lp = choice["logprobs"]
    assert all(math.isfinite(x) for x in lp["token_logprobs"])
    assert all(math.isfinite(v) for top in lp["top_logprobs"] for v in top.values())
