"""The weight rules of issue 24 (engine/rules.py): their maths against hand computations, and each
kind through the library, a recipe, the method grammar (CLI --solver, eval --methods, server
fusion.solver)."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from logitfusion.cli import app
from logitfusion.engine import registry, rules
from logitfusion.engine.fusion import fuse, kl
from logitfusion.engine.members import Logits
from logitfusion.engine.recipe import Recipe, RecipeError
from logitfusion.engine.solvers import Dynamic, SolverError, Static

B, T, V = 5, 3, 40


@pytest.fixture
def z():
    g = torch.Generator().manual_seed(0)
    return Logits.of(large=3 * torch.randn(B, V, generator=g), small=2 * torch.randn(B, V, generator=g),
                     experts=2 * torch.randn(B, T, V, generator=g))


def test_plausible_is_alpha_times_the_top_probability():
    z = torch.randn(4, V, dtype=torch.float64)
    p = z.softmax(-1)
    for alpha in (0.5, 0.1, 1e-3):
        assert torch.equal(rules.plausible(z, alpha), p >= alpha * p.amax(-1, keepdim=True))
    assert rules.plausible(z, 1.0).sum(-1).tolist() == [1] * 4  # alpha 1: the top token alone


@pytest.mark.parametrize("by", rules.BY)
def test_plausible_restricts_its_base_and_keeps_its_weights(z, by):
    base = Static([0.7])
    got, want = rules.Plausible(base, by, 0.2)(z), base(z)
    keep = {"large": rules.plausible(z.large, 0.2), "small": rules.plausible(z.small, 0.2),
            "expert": rules.plausible(z.experts, 0.2).any(1)}
    keep["either"] = keep["large"] | keep["expert"]
    assert torch.equal(got.logits.isfinite(), keep[by])
    assert torch.equal(got.logits[keep[by]], want.logits[keep[by]]) and torch.equal(got.weights, want.weights)
    assert (got.logits == -math.inf).sum() > 0


def test_nudge_takes_the_large_model_where_it_is_sure(z):
    gamma = float(z.large.softmax(-1).amax(-1).median())  # rows of both kinds
    for base in (None, Static([1.0])):
        c = rules.Nudge(gamma, base)(Logits.of(large=z.large, small=z.small, experts=z.experts[:, :1]))
        sure = z.large.softmax(-1).amax(-1) >= gamma
        other = z.experts[:, 0] if base is None else fuse(z.large, z.small, z.experts[:, :1], torch.ones(1))
        want = torch.where(sure[:, None], z.large.log_softmax(-1), other.log_softmax(-1))
        assert torch.allclose(c.logits, want, atol=1e-5)
        assert c.weights[:, 0].tolist() == [0.0 if s else 1.0 for s in sure.tolist()]
    assert 0 < int(sure.sum()) < B  # the fixture has rows of both kinds


def test_keep_lets_the_large_model_decode_unless_the_experts_object(z):
    c = rules.Keep(Static([1.0]), beta=0.3, alpha=0.2)(z)
    top = z.large.argmax(-1)
    p_t = z.experts.softmax(-1)
    ok = (p_t.gather(-1, top[:, None, None].expand(-1, T, 1))[..., 0] >= 0.3 * p_t.amax(-1)).any(-1)
    fused = fuse(z.large, z.small, z.experts, torch.ones(T))
    for b in range(B):
        if ok[b]:
            assert torch.allclose(c.logits[b], z.large[b].log_softmax(-1)) and c.weights[b].abs().sum() == 0
        else:
            keep = rules.plausible(z.experts[b], 0.2).any(0)
            assert torch.allclose(c.logits[b][keep], fused[b][keep]) and (c.logits[b][~keep] == -math.inf).all()


def test_toward_is_the_change_in_kl_from_the_large_model(z):
    lp, lq, lqt = z.large.log_softmax(-1), z.small.log_softmax(-1), z.experts.log_softmax(-1)
    want = kl(lp, lq)[:, None] - kl(lp[:, None], lqt)
    assert torch.allclose(rules.toward(z.large, z.small, z.experts), want, atol=1e-5)


def test_route_weights():
    score = torch.tensor([[0.5, 2.0, -1.0], [-0.1, -0.2, -3.0], [1.0, 1.0, 0.0]])
    assert rules.route_weights(score, 0.0).tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 0]]
    soft = rules.route_weights(score, 1.0)
    assert soft[1].tolist() == [0, 0, 0] and soft[0, 2] == 0 and soft[2, 2] == 0
    assert torch.allclose(soft[0, :2], torch.tensor([0.5, 2.0]).softmax(-1))
    assert torch.allclose(soft[2, :2], torch.tensor([0.5, 0.5]))


def test_route_weighs_the_routed_experts_with_its_base(z):
    for base, temperature in ((Static([1.5]), 0.0), (Static([1.0]), 0.5), (Dynamic(), 0.0)):
        c = rules.Route(base, temperature)(z)
        w = rules.route_weights(rules.toward(z.large, z.small, z.experts), temperature)
        assert torch.allclose(c.logits, fuse(z.large, z.small, z.experts, c.weights), atol=1e-4)
        a = c.weights.sum(-1, keepdim=True)  # the base's weight on the virtual expert
        assert torch.allclose(c.weights, a * w, atol=1e-6)
    with pytest.raises(SolverError, match="2 weights for 1 experts"):
        rules.Route(Static([0.5, 1.5])).check(T)
    with pytest.raises(SolverError, match="linear rule"):
        rules.Route(rules.Nudge())


# ---------------------------------------------------------------- front ends

NAMES = ["math", "qa"]
METHODS = {  # method string -> what its spec writes back
    "plausible": "plausible:expert:0.1:dynamic",
    "plausible:large:0.5:static:1": "plausible:large:0.5:static:1.0",
    "plausible:either:0.2:dynamic:joint": "plausible:either:0.2:dynamic:joint",
    "plausible:small:0.1:static:0.5+1.5": "plausible:small:0.1:static:0.5,1.5",
    "nudge": "nudge:0.3", "nudge:0.5:static:1": "nudge:0.5:static:1.0",
    "keep": "keep:0.1:0.1:dynamic", "keep:0.05:0.2:static:1": "keep:0.05:0.2:static:1.0",
    "route": "route:0:static:1.0", "route:0.5:dynamic": "route:0.5:dynamic",
}


@pytest.mark.parametrize("method", METHODS)
def test_the_method_grammar_round_trips(method):
    spec = registry.method_spec(method, NAMES)
    assert spec.method() == METHODS[method]
    again = registry.method_spec(spec.method(), NAMES)
    assert again == spec
    registry.build(spec, NAMES)


@pytest.mark.parametrize("method,message", [
    ("plausible:nobody", "by"), ("plausible:large:2", "alpha"), ("plausible:large:0.1:large", "bad settings"),
    ("plausible:large:x", "bad number"), ("nudge:0", "gamma"), ("keep:0.1:0.1:0.1", "bad settings"),
    ("route:-1", "temperature"), ("route:0:static:0.5+1", "2 weights for 1 experts"),
])
def test_bad_methods_are_refused_naming_the_setting(method, message):
    with pytest.raises(SolverError, match=message):
        registry.parse_method(method, NAMES)


def _recipe(solver: dict) -> Recipe:
    return Recipe.from_dict({"large": {"path": "L"}, "small": {"path": "S"},
                             "experts": [{"name": n, "path": n} for n in NAMES], "solver": solver})


def test_recipe_sections():
    r = _recipe({"kind": "plausible", "by": "large", "alpha": 0.2,
                 "base": {"kind": "dynamic", "grid": [0.0, 0.5, 1.0], "strategy": "joint"}})
    s = r.build_solver()
    assert isinstance(s, rules.Plausible) and s.by == "large" and s.base.grid == [0.0, 0.5, 1.0]
    assert s.base.strategy == "joint" and r.method_spec() == "plausible:large:0.2:dynamic:joint"
    assert r.method(r.method_spec()).base.grid == [0.0, 0.5, 1.0]  # the grid travels as search settings
    assert isinstance(_recipe({"kind": "nudge", "gamma": 0.4}).build_solver(), rules.Nudge)
    assert isinstance(_recipe({"kind": "keep", "base": {"kind": "static", "weights": [1.0]}}).build_solver(), rules.Keep)
    assert isinstance(_recipe({"kind": "route", "temperature": 0.5}).build_solver(), rules.Route)
    with pytest.raises(RecipeError, match="base"):
        _recipe({"kind": "plausible", "base": {"kind": "large"}})
    with pytest.raises(RecipeError, match="one static weight"):
        _recipe({"kind": "route", "base": {"kind": "static", "weights": [1.0, 2.0]}})
    with pytest.raises(RecipeError, match="alpha"):
        _recipe({"kind": "keep", "alpha": 0})


METHODS_RUN = ["plausible:large:0.3:static:1", "plausible:expert:0.1:dynamic", "nudge:0.4", "keep:0.1:0.1:static:1",
               "route:0:dynamic", "route:0.5:static:1"]


@pytest.mark.parametrize("method", METHODS_RUN)
def test_each_rule_decodes_from_the_library_greedy_and_sampled(fuser, method):
    for kw in (dict(), dict(temperature=1.0, seed=1, top_k=20)):
        gens = fuser.generate(["the cat", "a b"], solver=method, max_new_tokens=8, trace=True, **kw)
        assert all(g.finish_reason in ("length", "eos") for g in gens), [g.error for g in gens]
        assert all(len(g.weights) == len(g.token_ids) for g in gens)


def test_the_cli_generates_with_a_new_rule(family, tmp_path):
    out = tmp_path / "out.jsonl"
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": 0, "prompt": "the cat"}) + "\n")
    r = CliRunner().invoke(app, ["generate", "--large", family["large"], "--small", family["small"],
                                 "--expert", f"e1={family['experts']['expert1']}", "--solver",
                                 "keep:0.1:0.1:static:1.0", "-i", str(prompts), "-o", str(out),
                                 "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text().splitlines()[0])["finish_reason"] in ("length", "eos")


def test_eval_reads_the_new_methods(family):
    from logitfusion.eval.lm import FusedLM
    lm = FusedLM(recipe=Recipe.from_dict({"large": {"path": family["large"]}, "small": {"path": family["small"]},
                                          "experts": [{"name": "e1", "path": family["experts"]["expert1"]}]}))
    for method in METHODS_RUN:
        lm.set_method(method)
        assert lm.generate_until([_Request("the cat", {"until": ["\n"], "max_gen_toks": 4})])


class _Request:
    def __init__(self, context, gen_kwargs):
        self.args = (context, gen_kwargs)


def test_the_per_expert_designs_are_what_validation_chose():
    """bench.paper.PER_TASK (frozen before the test run) is per_task_choice over the validation cells."""
    from pathlib import Path

    from logitfusion.bench import paper
    from logitfusion.eval.records import read_keyed
    validation = read_keyed(Path(__file__).parents[1] / "docs" / "results" / "validation" / "paper.jsonl")
    tasks = ["math", "truthful", "qa", "summ", "mmlu"]
    for label, family in paper.PER_TASK_FAMILIES.items():
        assert paper.per_task_choice(validation, tasks, family) == paper.PER_TASK[label]
    assert all(m in paper.RULES_SINGLE for m in paper.FROZEN if not m.startswith(paper.MULTI_PREFIX))


def test_the_per_expert_test_cells_ran_the_chosen_rules():
    """A record is keyed by its design's label, so a rerun skips it: after a new choice its cell must
    be run again. Every per-expert test cell in docs/results ran the rule PER_TASK chooses now."""
    from pathlib import Path

    from logitfusion.bench import paper
    from logitfusion.eval.records import read_keyed
    test = read_keyed(Path(__file__).parents[1] / "docs" / "results" / "paper.jsonl")
    cells = [r for r in test.values() if r["table"] == "rules" and r["label"] in paper.PER_TASK]
    assert len(cells) == 5 * len(paper.PER_TASK)
    for r in cells:
        chosen = paper.PER_TASK[r["label"]][r["world_task"]]
        assert r["method"] == paper.PAPER_FUSED.get(chosen, chosen), (r["label"], r["world_task"])


@pytest.mark.parametrize("method", ["plausible:expert:0.2:dynamic", "keep:0.3:0.3:static:1.5", "route:0:dynamic"])
def test_the_linear_rules_speculate_and_greedy_tokens_do_not_change(fuser, method):
    plain = fuser.generate(["the cat", "a b"], solver=method, max_new_tokens=12)
    spec = fuser.generate(["the cat", "a b"], solver=method, max_new_tokens=12, speculate=3, speculate_adaptive=False)
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    assert registry.parse_method(method, ["a", "b", "c"]).speculation_refusal() is None
