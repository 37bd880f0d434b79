"""Recipe files (YAML, TOML, JSON): parsing, path resolution, errors that point at the field."""

import json
import os
from pathlib import Path

import pytest
import yaml

from logitfusion.engine.fuser import Fuser
from logitfusion.engine.recipe import Recipe, RecipeError
from logitfusion.engine.solvers import Alone, Dynamic, Static, make_grid


@pytest.fixture()
def recipe_dir(family, tmp_path):
    """A folder with the models reachable by *relative* paths: models/{large,small,e1,lora}."""
    d = tmp_path / "recipes"
    (d / "models").mkdir(parents=True)
    for name, target in [("large", family["large"]), ("small", family["small"]),
                         ("e1", family["experts"]["expert1"]), ("lora", family["experts"]["lora1"])]:
        os.symlink(target, d / "models" / name)
    return d


def base(**extra):
    data = {"large": {"path": "models/large"}, "small": {"path": "models/small"},
            "experts": [{"name": "e1", "path": "models/e1"}, {"name": "lora", "path": "models/lora"}]}
    data.update(extra)
    return data


TOML = """
[large]
path = "models/large"
template = "Answer: {prompt}"

[small]
path = "models/small"

[[experts]]
name = "e1"
path = "models/e1"

[[experts]]
name = "lora"
path = "models/lora"

[solver]
kind = "dynamic"
strategy = "joint"
grid = { start = 0.0, stop = 1.0, step = 0.25 }

[generation]
max_new_tokens = 7
stop = ["\\n\\n"]
"""


def write(d, name, data):
    p = d / name
    if name.endswith((".yaml", ".yml")):
        p.write_text(yaml.safe_dump(data))
    elif name.endswith(".json"):
        p.write_text(json.dumps(data))
    else:
        p.write_text(data)
    return p


# ------------------------------------------------------------------ formats and relative paths

def _check_resolved(r, family):
    assert r.large.path == str(Path(family["large"]).resolve())
    assert r.small.path == str(Path(family["small"]).resolve())
    assert [e.path for e in r.experts] == [str(Path(family["experts"]["expert1"]).resolve()),
                                           str(Path(family["experts"]["lora1"]).resolve())]
    assert [e.name for e in r.experts] == ["e1", "lora"]


@pytest.mark.parametrize("fmt", ["yaml", "yml", "json", "toml"])
def test_recipe_formats_resolve_relative_paths_against_the_recipe_folder(recipe_dir, family, fmt, tmp_path,
                                                                         monkeypatch):
    data = base(solver={"kind": "dynamic", "strategy": "joint", "grid": {"start": 0.0, "stop": 1.0, "step": 0.25}},
                generation={"max_new_tokens": 7, "stop": ["\n\n"]})
    data["large"]["template"] = "Answer: {prompt}"
    path = write(recipe_dir, f"fusion.{fmt}", TOML if fmt == "toml" else data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the working directory
    r = Recipe.from_file(path)
    _check_resolved(r, family)
    assert r.large.template == "Answer: {prompt}" and r.small.template == "{prompt}"
    assert r.solver.kind == "dynamic" and r.solver.strategy == "joint"
    assert r.solver.grid_values() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r.generation.max_new_tokens == 7 and r.generation.stop == ["\n\n"]
    solver = r.build_solver()
    assert isinstance(solver, Dynamic) and solver.strategy == "joint" and solver.grid == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_absolute_paths_are_kept(family, tmp_path):
    data = {"large": {"path": family["large"]}, "solver": {"kind": "large"}}
    r = Recipe.from_file(write(tmp_path, "r.yaml", data))
    assert r.large.path == family["large"] and r.small is None and r.experts == []
    # Nothing to fuse: without experts the default solver is the large model alone...
    r2 = Recipe.from_file(write(tmp_path, "r2.yaml", {"large": {"path": family["large"]}}))
    assert r2.solver.kind == "large"
    # ...but asking for fusion without experts is still an error.
    with pytest.raises(RecipeError, match="needs at least one expert"):
        Recipe.from_file(write(tmp_path, "r3.yaml", {"large": {"path": family["large"]},
                                                    "solver": {"kind": "dynamic"}}))


def test_empty_stop_string_is_a_recipe_error(tmp_path, family):
    with pytest.raises(RecipeError, match="generation.stop"):
        Recipe.from_file(write(tmp_path, "r.yaml", {"large": {"path": family["large"]},
                                                   "generation": {"stop": [""]}}))


def test_from_dict_without_base_dir_keeps_paths(recipe_dir):
    r = Recipe.from_dict(base(solver={"kind": "static"}))
    assert r.large.path == "models/large"
    r2 = Recipe.from_dict(base(solver={"kind": "static"}), base_dir=recipe_dir)
    assert r2.large.path == str((recipe_dir / "models/large").resolve())


def test_solver_kinds_build_the_right_solver(recipe_dir):
    r = Recipe.from_dict(base(solver={"kind": "static", "weights": [0.5, 1.5]}))
    s = r.build_solver()
    assert isinstance(s, Static) and list(s.weights) == [0.5, 1.5]
    s = Recipe.from_dict(base(solver={"kind": "large"})).build_solver()
    assert isinstance(s, Alone) and s.member == "large"
    s = Recipe.from_dict(base(solver={"kind": "expert", "expert": "lora"})).build_solver()
    assert isinstance(s, Alone) and s.member == "expert" and s.expert == 1
    s = Recipe.from_dict(base(solver={"grid": [0, 0.5, 1.0], "a_max": 1.5})).build_solver()
    assert isinstance(s, Dynamic) and s.grid == [0.0, 0.5, 1.0] and s.a_max == 1.5 and s.strategy == "fast"
    s = Recipe.from_dict(base()).build_solver()  # defaults: dynamic, the paper's grid
    assert isinstance(s, Dynamic) and s.grid == make_grid(0, 2, 0.1)


# ------------------------------------------------------------------ errors point at the field

@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(solver={"gird": [0, 1]}), "solver.gird"),
    (lambda d: d.update(solvr={"kind": "static"}), "solvr"),
    (lambda d: d["experts"][0].update(pth="x"), "experts.0.pth"),
    (lambda d: d.pop("large"), "`large`"),
    (lambda d: d["large"].pop("path"), "large.path"),
    (lambda d: d["large"].update(template="no slot here"), "large.template"),
    (lambda d: d["experts"][1].update(template="{prompts}"), "experts.1.template"),
    (lambda d: d.update(solver={"grid": [-0.5, 0.0, 1.0]}), "-0.5"),
    (lambda d: d.update(solver={"grid": {"start": 0, "stop": 2, "step": 0}}), "solver.grid"),
    (lambda d: d.update(solver={"grid": {"start": 0, "stop": 2, "step": -0.1}}), "step"),
    (lambda d: d.update(solver={"grid": {"start": -1, "stop": 1, "step": 0.5}}), "-1.0"),
    (lambda d: d.update(solver={"grid": []}), "empty"),
    (lambda d: d.update(solver={"grid": [0, 1, 3], "a_max": 2}), "a_max"),
    (lambda d: d.update(solver={"kind": "static", "weights": [1.0, 0.5, 0.2]}), "solver.weights"),
    (lambda d: d.update(solver={"kind": "magic"}), "solver.kind"),
    (lambda d: d.update(solver={"strategy": "slow"}), "solver.strategy"),
    (lambda d: d.update(solver={"kind": "expert", "expert": "nobody"}), "nobody"),
    (lambda d: d.pop("small"), "small"),
    (lambda d: d["experts"].append({"name": "e1", "path": "models/e1"}), "unique"),
    (lambda d: d["experts"][0].update(name="bad name!"), "experts.0.name"),
    (lambda d: d.update(generation={"max_new_tokens": 0}), "generation.max_new_tokens"),
    (lambda d: d.update(generation={"top_p": 0}), "generation.top_p"),
    (lambda d: d.update(load={"dtype": "int4"}), "load.dtype"),
    (lambda d: (d.pop("experts"), d.update(solver={"kind": "dynamic"})), "at least one expert"),
])
def test_malformed_recipe_errors_point_at_the_field(recipe_dir, mutate, needle):
    data = base()
    mutate(data)
    path = write(recipe_dir, "bad.yaml", data)
    with pytest.raises(RecipeError) as e:
        Recipe.from_file(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)  # and at the file


def test_expert_weights_count_mismatch_explains_the_fix(recipe_dir):
    with pytest.raises(RecipeError, match="3 values for 2 experts"):
        Recipe.from_dict(base(solver={"kind": "static", "weights": [1, 1, 1]}))
    Recipe.from_dict(base(solver={"kind": "static", "weights": [1.0]}))  # one for all is fine


@pytest.mark.parametrize("name,text,needle", [
    ("bad.yaml", "large: {path: [unclosed\n", "not valid YAML"),
    ("bad.yml", "large:\n  path: a\n bad indent: 1\n", "not valid YML"),
    ("bad.toml", "[large\npath = 1\n", "not valid TOML"),
    ("bad.json", '{"large": {"path": "x"},}', "not valid JSON"),
    ("list.yaml", "- large\n- small\n", "mapping"),
    ("empty.yaml", "", "mapping"),
    ("recipe.txt", "large: {path: x}\n", "unknown extension"),
])
def test_unparsable_recipe_files(tmp_path, name, text, needle):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(RecipeError, match=needle) as e:
        Recipe.from_file(p)
    assert str(p) in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        Recipe.from_file(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not found"):
        Fuser.from_recipe(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ save

def test_save_round_trips(recipe_dir, tmp_path):
    data = base(solver={"kind": "dynamic", "strategy": "joint", "grid": {"start": 0, "stop": 1.5, "step": 0.5},
                        "a_max": 2.0},
                generation={"max_new_tokens": 9, "stop": ["\n"], "seed": 4, "temperature": 0.7},
                load={"dtype": "bfloat16"})
    data["experts"][0]["template"] = "Q: {prompt}\nA:"
    r = Recipe.from_file(write(recipe_dir, "orig.yaml", data))
    out = tmp_path / "saved" / "copy.yaml"
    out.parent.mkdir()
    r.save(out)
    r2 = Recipe.from_file(out)
    assert r2 == r
    assert r2.experts[0].template == "Q: {prompt}\nA:"
    assert r2.solver.a_max == 2.0 and r2.generation.seed == 4 and r2.load.dtype == "bfloat16"
    # a list grid round-trips as a list
    r3 = Recipe.from_dict(base(solver={"grid": [0.0, 0.7, 1.3]}), base_dir=recipe_dir)
    r3.save(tmp_path / "r3.yaml")
    assert Recipe.from_file(tmp_path / "r3.yaml") == r3


def test_save_round_trips_as_json(recipe_dir, tmp_path):
    r = Recipe.from_dict(base(solver={"kind": "static"}), base_dir=recipe_dir)
    out = tmp_path / "copy.json"
    r.save(out)
    assert Recipe.from_file(out) == r


# ------------------------------------------------------------------ Fuser.from_recipe

def test_fuser_from_recipe_file_generates(recipe_dir, fuser1):
    data = {"large": {"path": "models/large"}, "small": {"path": "models/small"},
            "experts": [{"name": "e1", "path": "models/e1"}],
            "solver": {"kind": "static", "weights": [1.0]}, "generation": {"max_new_tokens": 7}}
    f = Fuser.from_recipe(write(recipe_dir, "proxy.yaml", data))
    assert f.expert_names == ["e1"]
    gens = f.generate(["the cat", "a"])  # solver and max_new_tokens from the recipe
    want = fuser1.generate(["the cat", "a"], solver="static:1", max_new_tokens=7)
    assert [g.token_ids for g in gens] == [g.token_ids for g in want]
    assert all(len(g.token_ids) == 7 for g in gens)


def test_fuser_from_recipe_templates_apply_per_model(recipe_dir, fuser1):
    data = {"large": {"path": "models/large", "template": "Question: {prompt}? Answer:"},
            "small": {"path": "models/small"}, "experts": [{"name": "e1", "path": "models/e1"}],
            "solver": {"kind": "static", "weights": [0.0]}}
    f = Fuser.from_recipe(write(recipe_dir, "tmpl.json", data))
    (g,) = f.generate("2 plus 3", max_new_tokens=8)
    (want,) = fuser1.generate("Question: 2 plus 3? Answer:", solver="large", max_new_tokens=8)
    (plain,) = fuser1.generate("2 plus 3", solver="large", max_new_tokens=8)
    assert g.token_ids == want.token_ids != plain.token_ids


def test_fuser_from_recipe_object_and_dict(recipe_dir):
    r = Recipe.from_dict(base(solver={"kind": "dynamic", "grid": [0, 1, 2]},
                              generation={"max_new_tokens": 3}), base_dir=recipe_dir)
    f1 = Fuser.from_recipe(r)
    f2 = Fuser.from_recipe(r.model_dump())
    assert isinstance(f1.solver, Dynamic) and f1.solver.grid == [0.0, 1.0, 2.0]
    g1, g2 = f1.generate("the cat", trace=True)[0], f2.generate("the cat", trace=True)[0]
    assert g1.token_ids == g2.token_ids and len(g1.token_ids) == 3
    assert all(w in (0.0, 1.0, 2.0) for step in g1.weights for w in step)


def test_fuser_method_uses_recipe_grid(recipe_dir):
    r = Recipe.from_dict(base(solver={"grid": [0, 0.5], "strategy": "joint"}), base_dir=recipe_dir)
    f = Fuser.from_recipe(r)
    s = f.method("dynamic")
    assert s.grid == [0.0, 0.5] and s.strategy == "joint"
    assert f.method("dynamic:fast").strategy == "fast"
    assert f.method("expert:lora").expert == 1


def test_with_overrides_updates_sections_and_validates_again():
    r = Recipe.from_dict(base(solver={"kind": "static", "weights": [0.5, 1.5]}, load={"dtype": "bfloat16"}))
    same = r.with_overrides(load={"dtype": None, "device": None}, solver={})  # None keeps the recipe's
    assert same == r
    o = r.with_overrides(load={"device": "meta", "trust_remote_code": True}, solver={"kind": "dynamic"})
    assert (o.load.dtype, o.load.device, o.load.trust_remote_code) == ("bfloat16", "meta", True)
    # another kind starts from its own defaults: the static weights do not carry over
    assert o.solver.kind == "dynamic" and not hasattr(o.solver, "weights") and r.solver.kind == "static"
    one = [{"name": "e1", "path": "models/e1"}]
    assert r.with_overrides(experts=one, solver={"weights": [2.0]}).experts[0].name == "e1"
    with pytest.raises(RecipeError, match="solver.weights has 2 values for 1 experts"):
        r.with_overrides(experts=[{"name": "e1", "path": "models/e1"}])  # static weights: one per expert
    with pytest.raises(RecipeError, match="load.dtype"):
        r.with_overrides(load={"dtype": "float8"})
