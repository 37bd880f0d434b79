"""Bad input to the library, the CLI and the recipe (issue 14): every user error is a clear
message naming the problem (never a traceback), no input hangs, resuming never loses a record.
Real models (the toy family), real files, the real CLI; hypothesis for the validators."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logitfusion.engine.config import EngineConfig
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from logitfusion.engine import limits
from logitfusion.cli import app
from logitfusion.engine.decoding import Batch
from logitfusion.engine.sampling import DecodingError, SamplingParams
from logitfusion.engine.fuser import Fuser
from logitfusion.engine.models import LoadError
from logitfusion.engine.recipe import Recipe, RecipeError
from logitfusion.eval.records import RecordWriter
from logitfusion.engine.registry import parse_method
from logitfusion.engine.solvers import SolverError, Static, make_grid, parse_grid

runner = CliRunner()
SETTINGS = dict(derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def recipe_file(family, tmp_path_factory):
    path = tmp_path_factory.mktemp("reliable") / "fusion.yaml"
    path.write_text(yaml.safe_dump({
        "large": {"path": family["large"]}, "small": {"path": family["small"]},
        "experts": [{"name": "expert1", "path": family["experts"]["expert1"]}],
        "solver": {"kind": "dynamic", "grid": {"start": 0, "stop": 2, "step": 0.25}},
        "generation": {"max_new_tokens": 4}}))
    return path


def cli(*args):
    """The CLI in-process: a user error exits 2 with a message; an escaped exception would be the
    traceback a user sees, so it is an assertion failure here."""
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"uncaught {type(r.exception).__name__}: {r.exception}"
    assert "Traceback" not in r.output
    return r


def prompts_file(path: Path, prompts) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


# ---------------------------------------------------------------- 2. unbounded sizes

@pytest.mark.parametrize("grid", ["0:2:1e-12", "0:1e300:1e-300", "0:2:5e-5"])
def test_huge_grids_are_refused_at_once(grid):
    t0 = time.perf_counter()
    with pytest.raises(SolverError, match=f"more than {limits.MAX_GRID_POINTS}"):
        parse_grid(grid)
    assert time.perf_counter() - t0 < 1
    with pytest.raises(RecipeError, match="more than"):
        Recipe.from_dict({"large": {"path": "L"}, "small": {"path": "S"}, "experts": [{"name": "e", "path": "E"}],
                          "solver": {"grid": dict(zip(("start", "stop", "step"), map(float, grid.split(":"))))}})


def test_speculate_is_bounded_in_the_library(fuser1):
    for k in (limits.MAX_SPECULATE + 1, 100_000, -1, 2.5):
        with pytest.raises(DecodingError, match="speculate"):
            fuser1.generate("the cat", max_new_tokens=2, speculate=k)
        with pytest.raises(DecodingError, match="speculate"):
            Batch(fuser1.models, fuser1.solver, EngineConfig(speculate=k))
    assert fuser1.generate("the cat", max_new_tokens=2, speculate=limits.MAX_SPECULATE)[0].token_ids


# ---------------------------------------------------------------- 3. resuming never loses data

def test_resume_keeps_every_record_after_a_blank_line(recipe_file, tmp_path):
    src = prompts_file(tmp_path / "in.jsonl", ["one", "two", "three", "four"])
    out = tmp_path / "out.jsonl"
    assert cli("generate", "-r", recipe_file, "-i", src, "-o", out).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "\n" + "".join(lines[1:]))  # a blank line after the first record
    r = cli("generate", "-r", recipe_file, "-i", src, "-o", out)
    assert r.exit_code == 0, r.output
    assert "4 of 4" in r.output
    assert [json.loads(x)["id"] for x in out.read_text().splitlines() if x.strip()] == ["q0", "q1", "q2", "q3"]


def test_resume_refuses_a_corrupt_line_and_changes_nothing(recipe_file, tmp_path):
    src = prompts_file(tmp_path / "in.jsonl", ["one", "two", "three"])
    out = tmp_path / "out.jsonl"
    assert cli("generate", "-r", recipe_file, "-i", src, "-o", out).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    before = out.read_bytes()
    r = cli("generate", "-r", recipe_file, "-i", src, "-o", out)
    assert r.exit_code == 2 and f"{out}:2" in r.output
    assert out.read_bytes() == before


def test_resume_keeps_a_whole_last_record_without_newline_and_drops_a_cut_one(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}')
    assert RecordWriter(out).done == {"a", "b"} and out.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    out.write_text('{"id": "a"}\n{"id": "b", "te')
    assert RecordWriter(out).done == {"a"} and out.read_text() == '{"id": "a"}\n'


def test_output_equal_to_input_is_refused(recipe_file, tmp_path):
    src = prompts_file(tmp_path / "in.jsonl", ["one"])
    before = src.read_bytes()
    r = cli("generate", "-r", recipe_file, "-i", src, "-o", src)
    assert r.exit_code == 2 and "is the --input file" in r.output
    assert src.read_bytes() == before


# ---------------------------------------------------------------- 4. numerically degenerate settings

@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
def test_tiny_temperature_is_greedy(fuser1, temperature):
    want = fuser1.generate(["the cat", "a"], max_new_tokens=8)
    got = fuser1.generate(["the cat", "a"], max_new_tokens=8, temperature=temperature, seed=3)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert all(g.finish_reason != "error" for g in got)


@pytest.mark.parametrize("weights", [[1e38], [-1.0], [float("inf")], [limits.MAX_WEIGHT * 2]])
def test_degenerate_static_weights_are_refused_everywhere(family, weights):
    with pytest.raises(SolverError, match="outside"):
        Static(weights).check(1)
    with pytest.raises(SolverError, match="outside"):
        parse_method("static:" + ",".join(map(str, weights)), ["e"])
    with pytest.raises(RecipeError, match="outside"):
        Recipe.from_dict({"large": {"path": "L"}, "small": {"path": "S"}, "experts": [{"name": "e", "path": "E"}],
                          "solver": {"kind": "static", "weights": weights}})


def test_delta_strength_is_bounded():
    with pytest.raises(SolverError, match="delta strength"):
        parse_method("delta:1e38", [])
    with pytest.raises(RecipeError, match="strength"):
        Recipe.from_dict({"large": {"path": "L"}, "delta": {"path": "D", "strength": -1e38}})
    assert parse_method("delta:-2", []).strength == -2.0  # a negative strength steers away: allowed


# ---------------------------------------------------------------- 5. inputs that used to be accepted

@pytest.mark.parametrize("kwargs, message", [
    (dict(stop="is"), "stop must be a list"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number"),
    (dict(max_new_tokens=True), "max_new_tokens must be a whole number"),
    (dict(max_new_tokens=limits.MAX_NEW_TOKENS + 1), "max_new_tokens must be between"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k=1.5), "top_k"),
    (dict(seed=2**70, temperature=1.0), "seed must be between"),
    (dict(stop=["\ud800"]), "surrogate"),
    (dict(batch_size=0), "batch_size"),
])
def test_generate_refuses_bad_options(fuser1, kwargs, message):
    with pytest.raises(DecodingError, match=message):
        fuser1.generate("the cat", **kwargs)


@pytest.mark.parametrize("prompts, message", [
    (None, "prompts must be a string or a list"),
    (b"the cat", "prompts must be a string or a list"),
    ([None], "prompt 0 must be a string, got NoneType"),
    (["ok", b"x"], "prompt 1 must be a string, got bytes"),
    (["bad \ud800"], "prompt 0 is not valid Unicode"),
])
def test_generate_names_a_prompt_of_the_wrong_type(fuser1, prompts, message):
    with pytest.raises(DecodingError, match=message):
        fuser1.generate(prompts, max_new_tokens=2)


def test_empty_grid_is_refused():
    with pytest.raises(SolverError, match="no values"):
        parse_grid("")
    with pytest.raises(SolverError, match="no values"):
        parse_grid(" , ")


# ---------------------------------------------------------------- 6. the pickle gate

def test_adapter_with_pickled_weights_beside_a_decoy_safetensors_is_refused(family, tmp_path):
    from safetensors.torch import load_file, save_file
    adapter = tmp_path / "lora"
    shutil.copytree(family["experts"]["lora1"], adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter / "adapter_model.bin")  # what PEFT would torch.load
    save_file({"x": torch.zeros(1)}, str(adapter / "decoy.safetensors"))
    with pytest.raises(LoadError, match="adapter_model.safetensors.*pickled"):
        Fuser.from_pretrained(family["large"], family["small"], {"lora": str(adapter)})
    f = Fuser.from_pretrained(family["large"], family["small"], {"lora": str(adapter)}, load={"allow_pickle": True})
    assert f.generate("the cat", max_new_tokens=2)[0].token_ids


# ---------------------------------------------------------------- 7 and 8. the CLI: clear messages, no traceback

def _gen_output(recipe_file, tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text(json.dumps({"id": "q0", "prompt": "x", "text": "y"}) + "\n")
    return out


def _bad_inputs(recipe_file, tmp_path):
    """(arguments, text the message must hold) for the CLI; each must exit 2 without a traceback."""
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    src = prompts_file(tmp_path / "in.jsonl", ["one"])
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("large: {path: [unclosed\n")
    r = ["generate", "-r", recipe_file]
    return [
        (r + ["-p", "x", "--grid", "0:2:1e-12"], "more than"),
        (r + ["-p", "x", "--grid", "0:inf:0.1"], "finite"),
        (r + ["-p", "x", "--grid", ""], "no values"),
        (r + ["-p", "x", "--speculate", "100000"], "speculate must be between 0 and 16"),
        (r + ["-p", "x", "--speculate", "-1"], "speculate must be between"),
        (r + ["-p", "x", "--seed", str(2**70), "--temperature", "1"], "seed must be between"),
        (r + ["-p", "x", "--batch-size", "0"], "batch_size must be between 1"),
        (r + ["-p", "x", "--max-new-tokens", "0"], "max_new_tokens"),
        (r + ["-p", "x", "--alpha", "inf"], "static weights [inf] are outside"),
        (r + ["-p", "x", "--alpha", "-1"], "static weights [-1.0] are outside"),
        (r + ["-p", "x", "--alpha", "1e38"], "outside"),
        (r + ["-p", "x", "--solver", ""], "unknown method ''"),
        (r + ["-i", bad_utf8, "-o", tmp_path / "o1.jsonl"], f"{bad_utf8}:2: not UTF-8"),
        (r + ["-i", src, "-o", tmp_path], "is a directory"),
        (r + ["-i", src, "-o", a_file / "out.jsonl"], "is a file, not a folder"),
        (r + ["-i", src, "-o", "/proc/lf-no-such-dir/out.jsonl"], "cannot be created"),
        (r + ["-p", "x", "--plot-weights", a_file / "w.png"], "is a file, not a folder"),
        (r + ["-p", "x", "--plot-weights", tmp_path / "w.nope"], "use an image file name"),
        (r + ["-p", "x", "--plot-weights", tmp_path / "w.png", "--solver", "large"], "needs a fusion solver"),
        (["generate", "--large", "/nonexistent/L", "--small", "/nonexistent/S", "--expert", "m=/nonexistent/E",
          "-p", "x"], "does not exist"),
        (["generate", "-r", broken_yaml, "-p", "x"], "[unclosed"),
        (["recipe", "check", broken_yaml], "[unclosed"),
        (["eval", "-r", recipe_file, "-t", "toy_sums", "-m", "large", "-o", _gen_output(recipe_file, tmp_path)],
         "has no 'key' field"),
        (["eval", "-r", recipe_file, "-t", "toy_sums", "-m", "large", "--batch-size", "0"], "batch_size"),
        (["eval", "-r", recipe_file, "-t", "toy_sums", "-m", "large", "--max-gen-toks", "0"], "--max-gen-toks"),
        (["eval", "-r", recipe_file, "-t", "toy_sums", "-m", "large", "--num-fewshot", "-1"], "--num-fewshot"),
        (["serve", "-r", recipe_file, "--port", "99999"], "--port must be between 0 and 65535"),
        (r + ["-p", "x", "--device", "foo"], "device 'foo' is not a torch device"),
        (r + ["-p", "x", "--device", "cuda:99"], "device 'cuda:99'"),
        (["recipe", "init", tmp_path / "r.txt", "--large", "L", "--solver", "large"], "cannot save a recipe as '.txt'"),
        (["recipe", "init", "/proc/lf-no-such-dir/r.yaml", "--large", "L", "--solver", "large"], "could not write"),
    ]


def test_cli_bad_inputs_are_clear_errors_without_traceback(recipe_file, tmp_path):
    for args, message in _bad_inputs(recipe_file, tmp_path):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, message, r.output)


def test_cli_prints_user_text_literally(family, tmp_path):
    """Rich markup and emoji codes in a message are shown as written."""
    r = cli("generate", "--large", family["large"], "--small", family["small"], "--expert", "m=/nonexistent/[x]",
            "-p", "x")
    assert r.exit_code == 2 and "expert:m: path '/nonexistent/[x]' does not exist" in r.output


@pytest.mark.slow
def test_cli_user_error_in_a_real_process_has_no_traceback(recipe_file):
    exe = os.path.join(os.path.dirname(sys.executable), "logitfusion")
    p = subprocess.run([exe, "generate", "-r", str(recipe_file), "-p", "x", "--grid", "0:2:1e-12"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "more than" in p.stderr


def test_bad_output_is_found_before_any_model_loads(tmp_path):
    """The models do not exist: had they been loaded (and the prompts decoded) first, that would be
    the error. Writability of --output and --plot-weights is known before."""
    src = prompts_file(tmp_path / "in.jsonl", ["one"])
    models = ["--large", "/nonexistent/L", "--small", "/nonexistent/S", "--expert", "e=/nonexistent/E"]
    r = cli("generate", *models, "-i", src, "-o", tmp_path)
    assert r.exit_code == 2 and "is a directory" in r.output
    r = cli("generate", *models, "-p", "x", "--plot-weights", src / "w.png")
    assert r.exit_code == 2 and "is a file, not a folder" in r.output


# ---------------------------------------------------------------- property tests: the validators

sizes = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                  st.sampled_from([0, 1, -1, 1e-300, 1e-12, 1e38, 2**63, True, None, "1", [1]]))


@settings(max_examples=200, **SETTINGS)
@given(st.fixed_dictionaries({}, optional={
    "max_new_tokens": sizes, "temperature": sizes, "top_k": sizes, "top_p": sizes, "seed": sizes,
    "stop": st.one_of(sizes, st.text(max_size=3), st.lists(st.text(max_size=3), max_size=20))}))
def test_property_sampling_params_either_pass_or_say_why(fields):
    params = SamplingParams(**fields)
    try:
        params.check()
    except DecodingError as e:
        assert str(e)
        return
    assert 1 <= params.max_new_tokens <= limits.MAX_NEW_TOKENS and isinstance(params.max_new_tokens, int)
    assert math.isfinite(params.temperature) and params.temperature >= 0
    assert not isinstance(params.stop, str) and len(params.stop) <= limits.MAX_STOP


grid_specs = st.one_of(st.fixed_dictionaries({"start": sizes, "stop": sizes, "step": sizes}),
                       st.lists(sizes, max_size=30), sizes)


@settings(max_examples=200, **SETTINGS)
@given(st.fixed_dictionaries({"large": st.just({"path": "L"}), "small": st.just({"path": "S"}),
                              "experts": st.just([{"name": "e", "path": "E"}])},
                             optional={"solver": st.fixed_dictionaries({}, optional={
                                 "kind": st.sampled_from(["dynamic", "static", "large", "nope"]),
                                 "grid": grid_specs, "weights": st.lists(sizes, max_size=3), "a_max": sizes}),
                                 "generation": st.fixed_dictionaries({}, optional={
                                     "max_new_tokens": sizes, "temperature": sizes, "speculate": sizes,
                                     "seed": sizes, "top_k": sizes})}))
def test_property_recipes_either_load_or_say_why_and_stay_bounded(data):
    t0 = time.perf_counter()
    try:
        recipe = Recipe.from_dict(data)
    except RecipeError as e:
        assert str(e).startswith("recipe: field")
        return
    finally:
        assert time.perf_counter() - t0 < 2
    grid = recipe.solver.grid_values() if recipe.solver.kind == "dynamic" else [0.0]
    assert 1 <= len(grid) <= limits.MAX_GRID_POINTS and all(0 <= a <= limits.MAX_WEIGHT for a in grid)
    assert all(0 <= w <= limits.MAX_WEIGHT for w in getattr(recipe.solver, "weights", []))
    assert 0 <= recipe.generation.speculate <= limits.MAX_SPECULATE
    recipe.build_solver()


@settings(max_examples=200, **SETTINGS)
@given(st.one_of(st.text(max_size=20), st.builds(lambda a, b, c: f"{a}:{b}:{c}", sizes, sizes, sizes)))
def test_property_grid_text_either_parses_bounded_or_says_why(text):
    try:
        grid = parse_grid(text)
    except SolverError as e:
        assert str(e)
        return
    assert 1 <= len(grid) <= limits.MAX_GRID_POINTS and all(math.isfinite(a) for a in grid)


@settings(max_examples=100, **SETTINGS)
@given(st.builds(lambda kind, arg: f"{kind}:{arg}" if arg is not None else kind,
                 st.sampled_from(["static", "dynamic", "expert", "delta", "large", "x"]),
                 st.one_of(st.none(), st.text(max_size=8), st.lists(sizes, max_size=3).map(
                     lambda v: ",".join(map(str, v))))))
def test_property_method_specs_either_parse_or_say_why(spec):
    try:
        solver = parse_method(spec, ["e1", "e2"])
    except SolverError as e:
        assert str(e)
        return
    if isinstance(solver, Static):
        assert all(0 <= w <= limits.MAX_WEIGHT for w in solver.weights)


def test_make_grid_still_rounds():
    assert make_grid(0, 0.3, 0.1) == [0.0, 0.1, 0.2, 0.3]
