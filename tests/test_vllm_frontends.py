"""Every front end on a recipe with `backend: {kind: vllm}`: the Python API (backend.load ->
VLLMFuser, Fuser.generate's shape), `logitfusion generate` and `logitfusion eval` give the HF
engine's greedy tokens and text for the same recipe.

Skipped without vLLM (pip install 'logitfusion[vllm]'; LOGITFUSION_REQUIRE_VLLM makes that a failure).
ONE vLLM engine for the module (a start costs 40-70 s of CPU): the CLI commands run in this
process and, instead of starting an engine of their own, get a VLLMFuser on the module's engine
for the recipe they built (the one step they skip is `vllm.LLM(...)`; the slow test at the end
runs `logitfusion generate` as a process, with its own engine)."""

import json
import os
import subprocess
import sys

import pytest

from logitfusion.testing.serving import require_vllm, server_process

require_vllm()  # skips the module without vLLM (a failure under `make test-vllm`)

from typer.testing import CliRunner  # noqa: E402

from logitfusion.cli import app  # noqa: E402
from logitfusion.engine.errors import DecodingError, SolverError  # noqa: E402
from logitfusion.engine.fuser import Fuser  # noqa: E402
from logitfusion.engine.sampling import SamplingParams  # noqa: E402
from logitfusion.testing import toy  # noqa: E402
from logitfusion.vllm import backend  # noqa: E402
from logitfusion.vllm.fuser import VLLMFuser  # noqa: E402
from logitfusion.vllm.settings import recipe_file  # noqa: E402

PROMPTS = ["Question: 3 plus 4? Answer:", "the cat sells", "a", "two dogs and three birds go to the river",
           "one bird", "Question: 5 plus 1? Answer:", "the king has ten coins and"]
METHODS = ["static:1.0", "dynamic", "large"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A toy family vLLM's CPU attention can run (head size 32) and two recipes of it that differ only
    in their backend section: (hf recipe, vllm recipe)."""
    root = tmp_path_factory.mktemp("vllm_frontends")
    toy.vllm_family(root)
    body = ("large: {path: large}\nsmall: {path: small}\nexperts: [{name: e1, path: expert1}, {name: e2, path: expert2}]\n"
            "solver: {kind: dynamic}\n")
    (root / "hf.yaml").write_text(body)
    (root / "vllm.yaml").write_text(body + "backend: {kind: vllm, enforce_eager: true, max_model_len: 128, "
                                           "max_num_seqs: 4, options: {seed: 0}}\n")
    return root / "hf.yaml", root / "vllm.yaml"


@pytest.fixture(scope="module")
def hf(family):
    return Fuser.from_recipe(family[0])


@pytest.fixture(scope="module")
def vf(family):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    fuser = backend.load(family[1])
    yield fuser
    fuser.close()


@pytest.fixture
def on_module_engine(vf, monkeypatch):
    """The CLI's VLLMFuser.from_recipe, on the module's engine: what it was asked for is recorded."""
    asked = []

    def from_recipe(cls, recipe, solver=None, **vllm_args):
        asked.append((recipe, solver, vllm_args))
        path, keep = recipe_file(recipe)
        return cls(vf.llm, path, solver, keep)

    monkeypatch.setattr(VLLMFuser, "from_recipe", classmethod(from_recipe))
    return asked


# ---------------------------------------------------------------- the Python API


def test_load_chooses_vllm_and_greedy_output_is_the_hf_engines(vf, hf):
    assert isinstance(vf, VLLMFuser) and vf.expert_names == ["e1", "e2"]
    for method in METHODS:
        got = vf.generate(PROMPTS, solver=method, max_new_tokens=7, ignore_eos=True)
        want = hf.generate(PROMPTS, solver=method, max_new_tokens=7, ignore_eos=True)
        assert [(g.prompt, g.token_ids, g.text, g.finish_reason) for g in got] == \
               [(g.prompt, g.token_ids, g.text, g.finish_reason) for g in want], method
    # the recipe's solver (dynamic) by default; the long form; a solver the fuser built
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    want = [g.token_ids for g in hf.generate(PROMPTS[:3], params, solver="dynamic")]
    assert [g.token_ids for g in vf.generate(PROMPTS[:3], params)] == want
    assert [g.token_ids for g in vf.generate(PROMPTS[:3], [params] * 3, solver=vf.method("dynamic"))] == want


def test_batches_and_sampled_seeds(vf):
    chunks = list(vf.batches(PROMPTS, solver="static:1.0", max_new_tokens=3, batch_size=2))
    assert [start for start, _ in chunks] == [0, 4] and sum(len(g) for _, g in chunks) == len(PROMPTS)  # 4 slots
    a = vf.generate(PROMPTS[:3], temperature=1.0, seed=5, max_new_tokens=6, ignore_eos=True)
    b = vf.generate(PROMPTS[:3], temperature=1.0, seed=5, max_new_tokens=6, ignore_eos=True)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]  # prompt i: seed 5 + i


def _close(a, b, tol=1e-5):
    return len(a) == len(b) and all(len(x) == len(y) and all(abs(u - v) <= tol for u, v in zip(x, y))
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["dynamic", "static:1.0", "expert:e1", "large"])
def test_traced_generations_have_the_hf_engines_weights(vf, hf, method):
    """generate(trace=True): 7 prompts through 4 slots (rows join and leave mid-run), each
    Generation's trace from the processor's file, its weights the HF engine's, its files gone."""
    got = vf.generate(PROMPTS, solver=method, max_new_tokens=7, ignore_eos=True, trace=True)
    want = hf.generate(PROMPTS, solver=method, max_new_tokens=7, ignore_eos=True, trace=True)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    for g, w in zip(got, want):
        assert _close(g.weights, w.weights), method
    if method in ("dynamic", "static:1.0"):
        assert all(len(g.weights) == 7 and len(g.weights[0]) == 2 for g in got)
        for g, w in zip(got, want):  # the trace's other fields: the chosen token on top, J, each model's top
            assert [s.top["fused"][0][0] for s in g.trace] == g.token_ids and set(g.trace[0].top) == set(w.trace[0].top)
            assert _close([[s.objective or 0.0] for s in g.trace], [[s.objective or 0.0] for s in w.trace], 1e-4)
    assert not list(vf.traces.iterdir())  # read and removed
    chunks = list(vf.batches(PROMPTS, solver=method, max_new_tokens=3, ignore_eos=True, trace=True))
    assert [len(g.trace) for _, gens in chunks for g in gens] == [0 if method == "large" else 3] * len(PROMPTS)


def test_a_trace_without_its_file_or_folder_is_a_clear_error(vf, tmp_path, monkeypatch):
    elsewhere = VLLMFuser(vf.llm, vf.path, traces=str(tmp_path))  # reads where the engine does not write
    with pytest.raises(DecodingError, match="trace: the vLLM logits processor wrote no trace"):
        elsewhere.generate(PROMPTS[:2], max_new_tokens=2, trace=True)
    monkeypatch.delenv("LOGITFUSION_TRACES", raising=False)
    blind = VLLMFuser(vf.llm, vf.path)  # an engine started without a folder, as far as it knows
    with pytest.raises(DecodingError, match="trace: this vLLM engine was started without a trace folder"):
        blind.generate(PROMPTS[:1], max_new_tokens=2, trace=True)
    assert len(blind.generate(PROMPTS[:1], max_new_tokens=2)[0].token_ids) == 2


@pytest.mark.parametrize("kwargs, error, message", [
    ({"speculate": 4}, DecodingError, "speculate: speculative fused decoding runs in logitfusion's own engine"),
    ({"use_cache": False}, DecodingError, "use_cache"),
    ({"solver": "delta:0.3"}, SolverError, "solver: method 'delta:0.3' reads other models"),
    ({"solver": "static:x"}, SolverError, "solver"),
    ({"bogus": 1}, DecodingError, "unknown generation option"),
])
def test_what_vllm_cannot_do_is_refused_by_name(vf, hf, kwargs, error, message):
    with pytest.raises(error, match=message):
        vf.generate(PROMPTS[:1], max_new_tokens=2, **kwargs)
    with pytest.raises(SolverError, match="method string"):
        vf.generate(PROMPTS[:1], solver=hf.method("static:1.0"))  # a Solver vLLM's workers cannot rebuild
    assert len(vf.generate(PROMPTS[:1], max_new_tokens=2)[0].token_ids) == 2  # the engine lives on


def test_a_foreign_solver_is_refused_even_where_a_freed_one_had_its_id(vf, hf):
    import gc
    for _ in range(50):  # CPython hands a freed object's address to the next one of its size
        ours = vf.method("static:1.0")
        del ours
        gc.collect()
        with pytest.raises(SolverError, match="method string"):
            vf.generate(PROMPTS[:1], solver=hf.method("static:1.0"), max_new_tokens=1)


# ---------------------------------------------------------------- the command line


def _cli(*args):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


def test_cli_generate_on_a_vllm_recipe_prints_the_hf_recipes_text(family, on_module_engine, tmp_path):
    hf_recipe, vllm_recipe = family
    flags = ["--solver", "static:1.0", "--max-new-tokens", "6"] + [a for p in PROMPTS[:3] for a in ("-p", p)]
    want = _cli("generate", "-r", str(hf_recipe), *flags).stdout
    got = _cli("generate", "-r", str(vllm_recipe), *flags).stdout
    assert got == want and got.count("---") == 3
    assert on_module_engine[-1][1] == "static:1.0"
    # --input/--output JSONL, resumable: the records of the HF engine's run
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    for recipe, out in ((hf_recipe, "hf.jsonl"), (vllm_recipe, "vllm.jsonl")):
        _cli("generate", "-r", str(recipe), "-i", str(prompts), "-o", str(tmp_path / out), "--alpha", "0.5",
             "--max-new-tokens", "5")
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    assert read("vllm.jsonl") == read("hf.jsonl")
    # --trace and --plot-weights: the weights vLLM's processor traced, the HF engine's
    for recipe, out in ((hf_recipe, "hf-trace.jsonl"), (vllm_recipe, "vllm-trace.jsonl")):
        _cli("generate", "-r", str(recipe), "-i", str(prompts), "-o", str(tmp_path / out), "--solver", "dynamic",
             "--max-new-tokens", "4", "--trace", "--plot-weights", str(tmp_path / f"{out}.png"))
        assert (tmp_path / f"{out}.png").stat().st_size > 0
    for got, want in zip(read("vllm-trace.jsonl"), read("hf-trace.jsonl"), strict=True):
        assert got["token_ids"] == want["token_ids"] and len(got["trace"]) == len(want["trace"]) == 4
        for g, w in zip(got["trace"], want["trace"]):
            assert g["weights"] == pytest.approx(w["weights"], abs=1e-5)


def test_cli_eval_on_a_vllm_recipe_scores_as_the_hf_recipe(family, on_module_engine, tmp_path):
    pytest.importorskip("lm_eval")
    hf_recipe, vllm_recipe = family
    scores = {}
    for name, recipe in (("hf", hf_recipe), ("vllm", vllm_recipe)):
        out = tmp_path / f"{name}.jsonl"
        _cli("eval", "-r", str(recipe), "--tasks", "toy_sums", "--methods", "large,static:1.0,dynamic",
             "--limit", "6", "--max-gen-toks", "6", "-o", str(out))
        scores[name] = {(r["method"], r["metric"], r["value"], r["n"]) for r in map(json.loads, out.open())}
    assert scores["vllm"] == scores["hf"] and len(scores["hf"]) == 3


def test_eval_refuses_loglikelihood_tasks_with_vllm(vf):
    from logitfusion.eval.lm import EvalError, FusedLM

    lm = FusedLM(fuser=vf)
    with pytest.raises(EvalError, match="loglikelihood tasks"):
        lm._loglikelihood(["Question: 3 plus 4? Answer:"], [[5, 6]])


@pytest.mark.slow
def test_cli_generate_as_a_process_starts_vllm_from_the_recipe(family, hf):
    """The whole path, vllm.LLM included: `logitfusion generate -r vllm.yaml` in its own process."""
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    res = subprocess.run([sys.executable, "-m", "logitfusion.cli", "generate", "-r", str(family[1]), "-p", PROMPTS[0],
                          "-p", PROMPTS[1], "--max-new-tokens", "6"], capture_output=True, text=True, env=env,
                         timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    want = "".join(f"--- {p!r}\n{g.text}\n" for p, g in zip(PROMPTS[:2], hf.generate(PROMPTS[:2], max_new_tokens=6)))
    assert res.stdout == want  # results only: vLLM's log lines went to stderr


@pytest.mark.slow
def test_cli_serve_on_a_vllm_recipe_is_vllms_server_with_the_fusion(family, hf, tmp_path):
    """`logitfusion serve -r fusion=vllm.yaml`: vLLM's OpenAI server, the model named as the recipe,
    the API key required, fused completions the HF engine's tokens, a bad method a 400."""
    import httpx

    argv = lambda port: [sys.executable, "-m", "logitfusion.cli", "serve", "-r", f"fusion={family[1]}",  # noqa: E731
                         "--port", str(port)]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "LOGITFUSION_API_KEY": "sesame"}
    key = {"Authorization": "Bearer sesame"}
    with server_process(argv, tmp_path / "serve.log", env, timeout=180) as url:
        body = {"model": "fusion", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "vllm_xargs": {"solver": "static:1.0"}}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers=key, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == hf.generate(PROMPTS[0], solver="static:1.0", max_new_tokens=6,
                                                                  ignore_eos=True)[0].token_ids
        bad = body | {"vllm_xargs": {"solver": "static:x"}}
        r = httpx.post(f"{url}/v1/completions", json=bad, headers=key, timeout=60)
        assert r.status_code == 400 and "extra_args.solver" in r.text


@pytest.mark.slow
def test_a_delta_recipe_cross_model_control_runs_through_vllm(family, tmp_path):
    """Cross-model control (solver delta): the processor's FusionRows runs the delta model beside the
    large one in vLLM; `logitfusion generate` in its own process (its own engine) gives the HF
    engine's text for the recipe's strength and for a request's own (delta:0.3)."""
    root = family[0].parent
    body = f"large: {{path: {root / 'large'}}}\ndelta: {{path: {root / 'expert1'}, strength: 0.7}}\nsolver: {{kind: delta}}\n"
    (tmp_path / "hf.yaml").write_text(body)
    (tmp_path / "vllm.yaml").write_text(body + "backend: {kind: vllm, enforce_eager: true, max_model_len: 128, "
                                               "max_num_seqs: 4, options: {seed: 0}}\n")
    hf = Fuser.from_recipe(tmp_path / "hf.yaml")
    want = "".join(f"--- {p!r}\n{g.text}\n" for p, g in zip(PROMPTS[:3], hf.generate(
        PROMPTS[:3], solver="delta:0.3", max_new_tokens=8)))
    assert want != "".join(f"--- {p!r}\n{g.text}\n" for p, g in zip(PROMPTS[:3], hf.generate(
        PROMPTS[:3], solver="large", max_new_tokens=8)))  # the delta changes the answers
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    res = subprocess.run([sys.executable, "-m", "logitfusion.cli", "generate", "-r", str(tmp_path / "vllm.yaml"),
                          *[a for p in PROMPTS[:3] for a in ("-p", p)], "--solver", "delta:0.3", "--max-new-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == want
