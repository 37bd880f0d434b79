"""The solver registry is the one list of solver kinds: the CLI help, the recipe schema, the method
grammar and the server all accept exactly the registered kinds."""

import re

import pytest
from typer.testing import CliRunner

from logitfusion.cli import app
from logitfusion.engine import registry
from logitfusion.engine.recipe import Recipe, RecipeError
from logitfusion.engine.solvers import Alone, Delta, Dynamic, SolverError, Static

KINDS = {"large", "expert", "static", "dynamic", "delta",
         "plausible", "nudge", "keep", "route"}  # the last four: rules.py (issue 24)
NAMES = ["math", "qa"]


def _recipe(kind: str, **solver) -> Recipe:
    data = {"large": {"path": "L"}, "small": {"path": "S"}, "delta": {"path": "D", "strength": 0.5},
            "experts": [{"name": n, "path": n} for n in NAMES], "solver": {"kind": kind, **solver}}
    if kind == "expert":
        data["solver"].setdefault("expert", "qa")
    return Recipe.from_dict(data)


def test_the_registry_lists_every_kind_once():
    assert set(registry.kinds()) == KINDS and len(registry.kinds()) == len(KINDS)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("large"))
    with pytest.raises(SolverError, match="unknown solver kind 'magic'"):
        registry.get("magic")


def _help_kinds(args: list[str], option: str) -> set[str]:
    """The method kinds an option's help text names (the words before ':' '[' '(' or ',')."""
    text = CliRunner().invoke(app, args + ["--help"], env={"COLUMNS": "400", "TERM": "dumb"}).output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
    start = text.index(option)
    help_text = text[start: text.index(" --", start + len(option))]
    return {w for w in re.findall(r"[\s,]([a-z]+)(?=[:\[(,. ]|$)", help_text) if w in KINDS | {"magic"}}


@pytest.mark.parametrize("args,option", [(["generate"], "--solver"), (["eval"], "--methods"),
                                         (["recipe", "init"], "--solver")])
def test_cli_help_names_exactly_the_registered_kinds(args, option):
    assert _help_kinds(args, option) == set(registry.kinds())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_recipe_schema_and_the_method_grammar_accept_each_kind(kind):
    recipe = _recipe(kind)
    assert recipe.solver.kind == kind
    built = recipe.build_solver()
    again = recipe.method(recipe.method_spec())  # the recipe's solver round-trips through the grammar
    assert type(built) is type(again) and vars(built).keys() == vars(again).keys()
    assert type(registry.parse_method(kind, NAMES, registry.SearchConfig(delta_strength=0.5))) is type(built)


def test_the_recipe_schema_refuses_an_unregistered_kind():
    with pytest.raises(RecipeError, match=r"solver.kind.*unknown solver kind 'magic'; use one of "
                                          + ", ".join(registry.kinds())):
        _recipe("magic")


def test_both_spellings_of_a_method_are_one_method():
    a = registry.parse_method("static:0.5,1.5", NAMES)
    b = registry.parse_method("static:0.5+1.5", NAMES)
    assert isinstance(a, Static) and list(a.weights) == list(b.weights) == [0.5, 1.5]
    assert registry.split_method(" static:0.5+1.5 ") == ("static", "0.5,1.5")
    assert registry.split_method("static:1e+3+2.+.5+-1") == ("static", "1e+3,2.,.5,-1")  # signs stay
    assert list(registry.parse_method("static:1e+2+2", NAMES).weights) == [100.0, 2.0]
    assert isinstance(registry.parse_method("dynamic:joint", NAMES), Dynamic)
    assert registry.parse_method("expert:qa", NAMES).expert == 1
    assert registry.parse_method("delta", NAMES, registry.SearchConfig(delta_strength=0.5)).strength == 0.5
    assert isinstance(registry.parse_method("large", NAMES), Alone)
    assert isinstance(registry.parse_method("delta:2", NAMES), Delta)


def test_recipe_method_spec_spells_out_the_solver_section():
    assert _recipe("static", weights=[0.5, 1.5]).method_spec() == "static:0.5,1.5"
    assert _recipe("expert", expert="math").method_spec() == "expert:math"
    assert _recipe("dynamic").method_spec() == "dynamic"


def test_the_server_accepts_exactly_the_registered_kinds(fuser):
    from logitfusion.serve.protocol import APIError, FusionOptions
    from logitfusion.serve.serving import build_solver
    for kind in registry.kinds():
        chosen = build_solver(fuser, FusionOptions(solver=kind))
        solver, spec = chosen.solver, chosen.spec
        assert spec == kind and type(solver) is type(registry.parse_method(kind, fuser.expert_names))
        subset = FusionOptions(solver=kind, experts=fuser.expert_names[:1])
        if kind in registry.expert_subset_kinds():
            chosen = build_solver(fuser, subset)
            assert chosen.experts == chosen.models.expert_names == fuser.expert_names[:1]
        else:
            with pytest.raises(APIError, match=r"fusion.experts applies to the solvers that weigh experts "
                                               r"\(static, dynamic, "):
                build_solver(fuser, subset)
    assert set(registry.expert_subset_kinds()) == {k for k in registry.kinds() if registry.get(k).fuses_experts}
    with pytest.raises(APIError, match="unknown method 'magic'"):
        build_solver(fuser, FusionOptions(solver="magic"))
    # both spellings of a method reach the server too
    assert list(build_solver(fuser, FusionOptions(solver="static:0.5+1.5+1")).solver.weights) == [0.5, 1.5, 1.0]


def test_one_search_config_from_every_front_end():
    cfg = registry.SearchConfig.parse("0:1:0.5", "joint", "1.5")
    assert cfg == registry.SearchConfig((0.0, 0.5, 1.0), "joint", 1.5)
    assert registry.SearchConfig.parse([0, 1]).grid == (0.0, 1.0) and registry.SearchConfig.parse(0.5).grid == (0.5,)
    assert registry.SearchConfig.parse(None, "") == registry.SearchConfig()
    merged = registry.SearchConfig(strategy="joint").over(registry.SearchConfig((0.0, 1.0), "fast", None, 0.5))
    assert merged == registry.SearchConfig((0.0, 1.0), "joint", None, 0.5)
    recipe = _recipe("dynamic")
    assert recipe.search() == registry.SearchConfig(tuple(recipe.solver.grid_values()), "fast", None, 0.5)
    solver = recipe.method("dynamic", search=registry.SearchConfig(grid=[0.0, 0.5], strategy="joint"))
    assert solver.grid == [0.0, 0.5] and solver.strategy == "joint"
    assert recipe.method("dynamic").grid == recipe.solver.grid_values()


def test_recipe_generation_defaults_are_sampling_params_defaults():
    from dataclasses import fields

    from logitfusion.engine.recipe import SPECULATION_FIELDS, GenerationSpec
    from logitfusion.engine.sampling import SamplingParams
    declared = {f.name: f.default for f in fields(SamplingParams)}
    spec = GenerationSpec()
    for name in GenerationSpec.model_fields:
        if name not in SPECULATION_FIELDS:  # decoding options, not sampling parameters
            assert name in declared and getattr(spec, name) == (list(declared[name]) if name == "stop"
                                                                else declared[name])


def test_the_server_documents_exactly_the_registered_kinds():
    from logitfusion.serve.protocol import FusionOptions
    described = FusionOptions.model_fields["solver"].description
    assert set(re.findall(r"(?:^|\| )([a-z]+)", described)) == set(registry.kinds())



@pytest.mark.parametrize("method", ["static:", "dynamic:", "expert:", "delta:", "static: "])
def test_an_empty_argument_is_never_a_default(method):
    """`static:` used to run with weight 1: a colon with nothing after it is refused, by name."""
    with pytest.raises(SolverError, match="ends in ':'"):
        registry.parse_method(method, NAMES, registry.SearchConfig(delta_strength=0.5))


def test_a_recipe_solver_section_is_its_kinds_spec():
    """No method string in between: the section validates as the kind's own spec, and a field of
    another kind is refused by name."""
    assert isinstance(_recipe("static", weights=[0.5, 1.5]).solver, registry.StaticSpec)
    with pytest.raises(RecipeError, match="solver.weights"):
        _recipe("dynamic", weights=[1.0])
    assert _recipe("dynamic", strategy="joint").build_solver().strategy == "joint"
