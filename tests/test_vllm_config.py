"""The recipe's `backend` section and the front ends' choice of engine, without vLLM (default suite):
the section is validated with errors that name the field, speculation is refused for vLLM, the
section becomes vLLM's engine arguments and server flags, the CLI refuses what vLLM cannot do
before anything loads, and a missing vLLM is one line saying how to install it."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from logitfusion.cli import app
from logitfusion.engine.fuser import Fuser
from logitfusion.engine.recipe import Recipe, RecipeError
from logitfusion.vllm import backend
from logitfusion.vllm.serve import server_argv
from logitfusion.vllm.settings import backend_args, recipe_file

LARGE = {"path": "/models/large"}


def _recipe(**backend_section):
    return Recipe.from_dict({"large": LARGE, "backend": backend_section})


def test_the_default_backend_is_hf_and_a_saved_recipe_loads_again(tmp_path):
    r = Recipe.from_dict({"large": LARGE})
    assert r.backend.kind == "hf"
    r.save(tmp_path / "r.yaml")
    assert Recipe.from_file(tmp_path / "r.yaml").backend == r.backend  # the defaults spelled out are no setting
    v = _recipe(kind="vllm", tensor_parallel_size=2, max_model_len=256, enforce_eager=True)
    v.save(tmp_path / "v.json")
    assert Recipe.from_file(tmp_path / "v.json").backend == v.backend
    assert v.with_overrides(load={"dtype": "bfloat16"}).backend == v.backend


@pytest.mark.parametrize("section, message", [
    ({"kind": "vlm"}, "field `backend.kind`: Input should be 'hf' or 'vllm'"),
    ({"kind": "vllm", "tensor_parallel_size": 0}, "backend.tensor_parallel_size"),
    ({"kind": "vllm", "gpu_memory_utilization": 1.5}, "backend.gpu_memory_utilization"),
    ({"kind": "vllm", "tensor_paralel_size": 2}, "field `backend.tensor_paralel_size`: unknown field"),
    ({"kind": "vllm", "enforce_eager": "maybe"}, "backend.enforce_eager"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size: vLLM engine settings; they apply to `kind: vllm` only"),
    ({"kind": "vllm", "options": {"speculative_config": {"method": "ngram"}}}, "options.speculative_config: vLLM refuses"),
    ({"kind": "vllm", "options": {"max_model_len": 64}}, "options.max_model_len: set by the recipe itself"),
    ({"kind": "vllm", "options": {"model": "other"}}, "options.model: set by the recipe itself"),
])
def test_a_bad_backend_section_is_refused_by_name(section, message):
    with pytest.raises(RecipeError, match="^recipe: .*" + message.replace("(", r"\(").replace("`", ".")):
        _recipe(**section)


def test_speculation_and_a_large_template_are_refused_for_vllm():
    with pytest.raises(RecipeError, match="generation.speculate is 4, but with `backend: {kind: vllm}`"):
        Recipe.from_dict({"large": LARGE, "backend": {"kind": "vllm"}, "generation": {"speculate": 4}})
    with pytest.raises(RecipeError, match="large.template is set"):
        Recipe.from_dict({"large": LARGE | {"template": "Q: {prompt}"}, "backend": {"kind": "vllm"}})
    Recipe.from_dict({"large": LARGE, "generation": {"speculate": 4}})  # the hf engine speculates


def test_the_section_is_vllms_engine_arguments_and_server_flags(tmp_path):
    r = _recipe(kind="vllm", tensor_parallel_size=2, pipeline_parallel_size=2, max_model_len=512, max_num_seqs=8,
                enforce_eager=True, options={"seed": 3, "compilation_config": {"mode": 0}})
    assert backend_args(r) == {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "dtype": "float32",
                               "max_model_len": 512, "max_num_seqs": 8, "enforce_eager": True, "seed": 3,
                               "compilation_config": {"mode": 0}}
    assert backend_args(_recipe(kind="vllm", dtype="bfloat16"))["dtype"] == "bfloat16"  # over load.dtype
    path = tmp_path / "v.yaml"
    r.save(path)
    argv = server_argv(str(path), ["--port", "9000"])
    assert argv[:4] == ["--model", "/models/large", "--logits-processors",
                        "logitfusion.vllm.processor:FusionLogitsProcessor"]
    flags = " ".join(argv)
    for flag in ("--tensor-parallel-size 2", "--pipeline-parallel-size 2", "--max-model-len 512", "--max-num-seqs 8",
                 "--enforce-eager --seed 3", "--dtype float32", '--compilation-config {"mode": 0}', "--port 9000"):
        assert flag in flags
    assert argv[-2:] == ["--port", "9000"]  # the user's options last: they win


def test_the_engine_stays_the_hf_loop_and_load_chooses_by_the_section(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(backend.VLLMMissing, match=r"not installed: pip install 'logitfusion\[vllm\]'"):
        backend.load({"large": LARGE, "backend": {"kind": "vllm"}})
    loaded = {}
    monkeypatch.setattr(Fuser, "from_recipe", classmethod(lambda cls, r, solver=None: loaded.update(r=r, s=solver)))
    backend.load({"large": LARGE})
    assert loaded["r"].backend.kind == "hf"


@pytest.fixture
def vllm_recipe(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text(f"large: {{path: {tmp_path}/large}}\nsmall: {{path: {tmp_path}/small}}\n"
                    f"experts: [{{name: e1, path: {tmp_path}/e1}}]\nbackend: {{kind: vllm}}\n")
    return path


@pytest.mark.parametrize("flags, message", [
    (["--speculate", "4"], "--speculate: not available with `backend: {kind: vllm}`"),
    (["--no-cache"], "--no-cache: not available"),
    (["--grid", "0:1:0.5"], "--grid/--strategy: with `backend: {kind: vllm}` set"),
    (["--solver", "delta:0.3"], "--solver: method 'delta:0.3' reads other models than this engine runs"),
    (["--solver", "bogus"], "--solver"),
])
def test_cli_generate_refuses_what_vllm_cannot_do_before_loading(vllm_recipe, flags, message):
    res = CliRunner().invoke(app, ["generate", "-r", str(vllm_recipe), "-p", "x", *flags])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_cli_without_vllm_says_how_to_install_it(vllm_recipe, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    for args in (["generate", "-r", str(vllm_recipe), "-p", "x"], ["serve", "-r", str(vllm_recipe)],
                 ["eval", "-r", str(vllm_recipe), "--tasks", "toy_sums", "--methods", "static:1.0"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        out = " ".join(res.output.split())
        assert "vLLM is not installed: pip install 'logitfusion[vllm]'" in out and "Traceback" not in out


def test_cli_serve_runs_one_vllm_recipe_per_server(vllm_recipe, tmp_path):
    other = tmp_path / "hf.yaml"
    other.write_text(f"large: {{path: {tmp_path}/large}}\n")
    res = CliRunner().invoke(app, ["serve", "-r", f"a={vllm_recipe}", "-r", f"b={other}"])
    assert res.exit_code == 2 and "serves one recipe per server" in " ".join(res.output.split())


def test_cli_eval_checks_vllm_methods_before_loading(vllm_recipe):
    res = CliRunner().invoke(app, ["eval", "-r", str(vllm_recipe), "--tasks", "toy_sums", "--methods", "delta:0.3"])
    assert res.exit_code == 2
    assert "--methods delta:0.3: method 'delta:0.3' reads other models" in " ".join(res.output.split())


def test_a_recipe_object_is_written_out_for_vllms_workers(tmp_path, monkeypatch):
    """vLLM's workers read the recipe by path: a Recipe (a CLI's, with overrides) is saved with its
    paths resolved against the working directory; a file is used as it is."""
    monkeypatch.chdir(tmp_path)
    path, keep = recipe_file(Recipe.from_dict({"large": {"path": "models/large"},
                                                       "backend": {"kind": "vllm", "max_model_len": 64}}))
    saved = json.loads(open(path).read())
    assert saved["large"]["path"] == str(tmp_path / "models" / "large")
    assert saved["backend"]["max_model_len"] == 64 and saved["backend"]["kind"] == "vllm"
    keep.cleanup()
    assert recipe_file("r.yaml") == (str(tmp_path / "r.yaml"), None)
