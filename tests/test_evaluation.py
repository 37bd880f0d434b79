"""Evaluation through lm-evaluation-harness, on the toy family (real models, real lm-eval).

- fused teacher forcing equals the decoding loop's per-step fused log-probs (and weights);
- with all fusion weights 0 our backend agrees with lm-eval's own `hf` backend;
- lm-eval runs end to end with `--model logitfusion` (Python API and shell);
- `logitfusion eval` resumes after being killed, and rejects bad input clearly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from logitfusion import Fuser  # noqa: E402
from logitfusion.testing import toy  # noqa: E402
from logitfusion.cli import app  # noqa: E402
from logitfusion.engine.decoding import Batch  # noqa: E402
from logitfusion.engine.sampling import SamplingParams  # noqa: E402
from logitfusion.eval.lm import TASKS_DIR, EvalError, FusedLM, fused_logprobs, task_manager  # noqa: E402
from logitfusion.eval.matrix import run_task, summarise  # noqa: E402

from lm_eval.api.instance import Instance  # noqa: E402

# shared/ lies beside the repository (on developers' machines and in CI); tests skip without it.
pytestmark = pytest.mark.slow  # end to end (processes, servers, lm-eval, training): `make test-fast` skips it


BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
FEW_SHOT = "Question: 2 plus 2? Answer: 4\n{prompt}"  # the large model's own template
PROMPTS = ["the cat", "Question: 2 plus 3? Answer:", "a dog sells", "the king has", "one two three",
           "Question: 7 plus 1? Answer:", "river city road"]
runner = CliRunner()


def recipe_dict(family, **extra):
    return {"large": {"path": family["large"]}, "small": {"path": family["small"]},
            "experts": [{"name": "expert1", "path": family["experts"]["expert1"]},
                        {"name": "lora1", "path": family["experts"]["lora1"]}],
            "solver": {"kind": "dynamic", "grid": {"start": 0, "stop": 2, "step": 0.25}}, **extra}


@pytest.fixture(scope="module")
def ceiling_path(family, tmp_path_factory):
    """A 'fine-tuned' large model: the large base plus noise (same vocabulary)."""
    path = tmp_path_factory.mktemp("ceiling") / "ceiling"
    toy.perturbed_copy(family["large"], path, scale=0.3, seed=7)
    return str(path)


@pytest.fixture(scope="module")
def recipe_file(family, ceiling_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_recipe")
    plain, with_ceiling = folder / "fusion.yaml", folder / "ceiling.yaml"
    plain.write_text(yaml.safe_dump(recipe_dict(family)))
    with_ceiling.write_text(yaml.safe_dump(recipe_dict(family, ceiling={"path": ceiling_path})))
    return {"plain": plain, "ceiling": with_ceiling}


@pytest.fixture(scope="module")
def lm(family):
    """Large (few-shot template), small, expert1 (full) and lora1 (LoRA), loaded once."""
    data = recipe_dict(family)
    data["large"]["template"] = FEW_SHOT
    return FusedLM(fuser=Fuser.from_recipe(data), batch_size=8)


@pytest.fixture(scope="module")
def lm_plain(family):
    """Same models, no templates: comparable with lm-eval's hf backend on the large model."""
    return FusedLM(fuser=Fuser.from_recipe(recipe_dict(family)), solver="static:0", batch_size=3)


@pytest.fixture(scope="module")
def own_tasks():
    return task_manager(["toy_sums"])  # only our folder: fast


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def greedy_decode(fuser, solver, prompts, max_new_tokens=6):
    batch = Batch(fuser.models, solver)
    seqs = batch.add(prompts, [SamplingParams(max_new_tokens=max_new_tokens, logprobs=True) for _ in prompts],
                     trace=True)
    while len(batch):
        batch.step()
    return seqs


# ---------------------------------------------------------------- teacher forcing = decoding

@pytest.mark.parametrize("spec", ["static:1.0", "static:0.5,1.5", "dynamic", "dynamic:joint", "expert:lora1"])
def test_teacher_forcing_equals_the_decoding_loop(lm, spec):
    """Per token, the fused log-prob and the solved weights under teacher forcing are those the
    decoding loop recorded (large model with its own few-shot template, LoRA expert included)."""
    solver = lm.set_method(spec)
    seqs = greedy_decode(lm.fuser, solver, PROMPTS)
    scored = fused_logprobs(lm.models, solver, PROMPTS, [s.tokens for s in seqs], batch_size=3)
    for seq, s in zip(seqs, scored):
        assert len(s.logprobs) == len(seq.tokens) == len(seq.logprobs)
        assert s.total == pytest.approx(sum(seq.logprobs), abs=1e-4)
        torch.testing.assert_close(s.logprobs, torch.tensor(seq.logprobs), atol=1e-4, rtol=0)
        assert bool(s.greedy.all())  # the decoded tokens were the fused argmax
        if solver.name in ("static", "dynamic"):
            traced = torch.tensor([step.weights for step in seq.steps])
            torch.testing.assert_close(s.weights, traced, atol=1e-5, rtol=0)
    if spec.startswith("dynamic"):  # the weights really vary per position (not a constant)
        assert len({tuple(w) for s in scored for w in s.weights.tolist()}) > 1


@pytest.mark.parametrize("spec", ["static:1.0", "dynamic"])
def test_loglikelihood_of_a_greedy_generation_is_its_decoding_logprob(lm, spec):
    """Through lm-eval's request API: the generated text, scored as a continuation, gets the sum
    of the per-step log-probs of the decoding loop, and is flagged greedy. (Random toy models
    often emit partial UTF-8 bytes, whose text does not re-tokenise to the same tokens; those
    generations are compared at the token level only.)"""
    solver = lm.set_method(spec)
    prompts = [line[: len(line) // 2].rstrip() for line in toy.corpus(n_lines=24, seed=5)]
    seqs = greedy_decode(lm.fuser, solver, prompts, max_new_tokens=3)
    texts = [lm.tokenizer.decode(s.tokens, skip_special_tokens=True) for s in seqs]
    same = [lm._encode_pair(p, t) == (p, s.tokens) for p, t, s in zip(prompts, texts, seqs)]
    assert sum(same) >= 2, "too few generations survive the text round trip to compare"
    got = lm.loglikelihood(requests("loglikelihood", [(p, t) for p, t, ok in zip(prompts, texts, same) if ok]))
    want = [sum(s.logprobs) for s, ok in zip(seqs, same) if ok]
    for (lp, greedy), expected in zip(got, want):
        assert lp == pytest.approx(expected, abs=1e-4)
        assert greedy
    token_level = lm._loglikelihood(prompts, [s.tokens for s in seqs])  # what loglikelihood runs after tokenising
    assert [lp for lp, _ in token_level] == pytest.approx([sum(s.logprobs) for s in seqs], abs=1e-4)
    assert all(greedy for _, greedy in token_level)


def test_choices_sharing_a_prefix_are_scored_like_separate_requests(lm):
    """Multiple-choice answers that differ only in their last token share one forward; the
    result is the same as scoring each alone."""
    lm.set_method("dynamic")
    args = [("Question: 3 plus 4? Answer:", f" {n}") for n in (5, 6, 7, 8, 12, 13)] + [("the cat", " sells apples")]
    together = lm.loglikelihood(requests("loglikelihood", args))
    alone = [lm.loglikelihood(requests("loglikelihood", [a]))[0] for a in args]
    for (a, ga), (b, gb) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


# ---------------------------------------------------------------- cross-check with lm-eval's hf backend

@pytest.fixture(scope="module")
def hf_lm(lm_plain):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=lm_plain.models.large.model, tokenizer=lm_plain.tokenizer, batch_size=3)


def test_weights_zero_loglikelihood_matches_hf_backend(lm_plain, hf_lm):
    assert lm_plain.solver.name == "static" and list(lm_plain.solver.weights) == [0.0]
    args = [("Question: 2 plus 3? Answer:", " 5"), ("Question: 2 plus 3? Answer:", " 6"), ("the cat", " sells apples"),
            ("", "the dog has"), ("a king ", "takes books"), ("one two three four five six", " seven eight nine ten")]
    ours = lm_plain.loglikelihood(requests("loglikelihood", args))
    theirs = hf_lm.loglikelihood(requests("loglikelihood", args))
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
    texts = ["3 plus 4 makes 7. the cat sells apples and the dog buys pears. " * 12, "hello"]  # > 256 tokens: windows
    rolling = lm_plain.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    reference = hf_lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert rolling == pytest.approx(reference, abs=1e-3)


def test_weights_zero_greedy_generation_matches_hf_backend(lm_plain, hf_lm):
    args = [(p, {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False}) for p in PROMPTS]
    args += [(p, {"until": ["s", "e"], "max_gen_toks": 12}) for p in PROMPTS[:4]]  # stops that do fire
    ours = lm_plain.generate_until(requests("generate_until", args))
    theirs = hf_lm.generate_until(requests("generate_until", args))
    assert ours == theirs
    assert any(len(o) < len(max(ours, key=len)) for o in ours[len(PROMPTS):])  # some stopped early
    # lm-eval allows `until` as one string: it is one stop, not one per character
    full = lm_plain.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in PROMPTS]))
    word = next(o[1:4] for o in full if len(o) > 4)  # three characters that do occur, each of them early
    one = [(p, {"until": word, "max_gen_toks": 12}) for p in PROMPTS]
    assert lm_plain.generate_until(requests("generate_until", one)) == hf_lm.generate_until(requests("generate_until", one))


# ---------------------------------------------------------------- lm-eval end to end

def test_lm_eval_runs_the_logitfusion_model_end_to_end(recipe_file, own_tasks):
    """simple_evaluate(model="logitfusion", model_args=...) on the toy tasks: generate_until,
    multiple choice (loglikelihood) and perplexity (loglikelihood_rolling)."""
    from lm_eval import simple_evaluate
    out = simple_evaluate(model="logitfusion", task_manager=own_tasks, limit=5, log_samples=True,
                          model_args=f"recipe={recipe_file['plain']},solver=dynamic,batch_size=4",
                          tasks=["toy_sums", "toy_sums_mc", "toy_knowledge_ppl"], bootstrap_iters=0)
    res = out["results"]
    assert 0 <= res["toy_sums"]["exact_match,strip"] <= 1
    assert 0 <= res["toy_sums_mc"]["acc,none"] <= 1
    assert res["toy_knowledge_ppl"]["bits_per_byte,none"] > 0
    assert {k: v["effective"] for k, v in out["n-samples"].items()} == {"toy_sums": 5, "toy_sums_mc": 5,
                                                                         "toy_knowledge_ppl": 5}
    # The generations lm-eval logged are the engine's greedy decodes of the same prompts.
    fuser = Fuser.from_recipe(Path(recipe_file["plain"]))
    samples = out["samples"]["toy_sums"]
    prompts = [s["arguments"][0][0] for s in samples]
    gens = fuser.generate(prompts, solver="dynamic", max_new_tokens=4, stop=["\n", "."])
    assert [s["resps"][0][0] for s in samples] == [g.text for g in gens]


def test_lm_eval_cli_from_the_shell(recipe_file, tmp_path):
    """`python -m logitfusion.eval.lm` is lm-eval's own CLI with our model and tasks registered."""
    cmd = [sys.executable, "-m", "logitfusion.eval.lm", "--model", "logitfusion",
           "--model_args", f"recipe={recipe_file['plain']},solver=static:1.0", "--tasks", "toy_sums_mc",
           "--limit", "3", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "toy_sums_mc" in done.stdout and "acc" in done.stdout
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert result["results"]["toy_sums_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_model_args_reach_the_solver(recipe_file):
    from lm_eval.api.registry import get_model
    cls = get_model("logitfusion")
    assert cls is FusedLM
    lm = cls.create_from_arg_string(f"recipe={recipe_file['plain']},solver=static,weights=0.5+1.5,"
                                    "batch_size=auto", {"device": "cuda:0"})  # lm-eval's CLI default device
    assert list(lm.solver.weights) == [0.5, 1.5] and lm.batch_size == 8
    lm = cls.create_from_arg_string(f"recipe={recipe_file['plain']},solver=dynamic:joint,grid=0:1:0.5,experts=lora1")
    assert lm.fuser.expert_names == ["lora1"] and lm.solver.grid == [0.0, 0.5, 1.0] and lm.solver.strategy == "joint"
    with pytest.raises(EvalError, match="unknown model_args.*pretrained"):
        cls.create_from_arg_string(f"recipe={recipe_file['plain']},pretrained=gpt2")
    with pytest.raises(EvalError, match="not in the recipe"):
        cls.create_from_arg_string(f"recipe={recipe_file['plain']},experts=nope")


# ---------------------------------------------------------------- shipped tasks

def test_shipped_toy_data_is_the_toy_task():
    sums, knowledge = toy.toy_task_rows()
    assert [json.loads(line) for line in (TASKS_DIR / "data" / "toy_sums.jsonl").read_text().splitlines()] == sums
    assert [json.loads(line) for line in (TASKS_DIR / "data" / "toy_knowledge.jsonl").read_text().splitlines()] == knowledge
    assert all(row["choices"][row["gold"]] == row["answer"] and len(set(row["choices"])) == 4 for row in sums)


def test_every_shipped_task_is_indexed(own_tasks):
    names = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    assert names <= set(own_tasks.all_tasks)
    assert {"gsm8k_local", "truthfulqa_mc1_local", "truthfulqa_mc2_local", "triviaqa_local", "mmlu_local",
            "cnn_dailymail_local", "cnn_dailymail_rouge"} <= names


def test_summarisation_task_scores_rouge2(lm, family, tmp_path):
    """cnn_dailymail_local end to end on a two-article local file: ROUGE-2 from rouge-score."""
    from rouge_score import rouge_scorer
    rows = [{"article": "the cat sells apples to the dog. the dog buys pears. " * 3, "highlights": "the cat sells apples"},
            {"article": "one two three four five six seven eight nine ten.", "highlights": "counting to ten"}]
    (tmp_path / "cnn_dailymail_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm.set_method("static:1.0")
    manager = task_manager(["cnn_dailymail_local"], metadata={"data_dir": str(tmp_path)})
    rec = run_task(lm, "static:1.0", "cnn_dailymail_local", manager, max_gen_toks=6)
    assert rec["metric"] == "rouge2,none" and rec["n"] == 2
    summaries = lm.generate_until(requests("generate_until", [
        (f"Summarize the following article:\n\n{r['article']}\n\nSummary:", {"until": ["\n\n"], "max_gen_toks": 6})
        for r in rows]))
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    want = sum(scorer.score(r["highlights"], " ".join(s.split()))["rouge2"].fmeasure for r, s in zip(rows, summaries)) / 2
    assert rec["value"] == pytest.approx(want)


@pytest.mark.skipif(not (BENCHMARKS / "gsm8k_test.jsonl").is_file(), reason="no local benchmark copies here")
def test_real_benchmarks_from_local_copies(lm):
    """gsm8k and TruthfulQA MC1/MC2 from the local files: prompts longer than the toy models'
    256 positions are cut from the left. Tiny models score near zero; the pipeline is the point."""
    manager = task_manager(["gsm8k_local"], metadata={"data_dir": str(BENCHMARKS)})
    lm.set_method("dynamic")
    gsm = run_task(lm, "dynamic", "gsm8k_local", manager, limit=2, max_gen_toks=4)
    assert gsm["metric"] == "exact_match,flexible-extract" and gsm["n"] == 2
    for task in ("truthfulqa_mc1_local", "truthfulqa_mc2_local"):
        rec = run_task(lm, "dynamic", task, manager, limit=2)
        assert rec["n"] == 2 and 0 <= rec["value"] <= 1


# ---------------------------------------------------------------- `logitfusion eval`

def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def flat(text: str) -> str:
    """Rich wraps long messages at the terminal width: compare with whitespace collapsed."""
    return " ".join(text.split())


def test_eval_cli_resumes_after_a_kill(recipe_file, tmp_path):
    """Kill `logitfusion eval` once its first result is written; the rerun does only what is
    missing, and the file ends with every (method, task) exactly once."""
    out = tmp_path / "results.jsonl"
    args = ["eval", "--recipe", str(recipe_file["ceiling"]), "--tasks", "toy_sums,toy_sums_mc",
            "--methods", "large,expert,static:1.0,dynamic", "--limit", "3", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "logitfusion.cli", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.read_text().count("\n")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = read_jsonl(out)
    expected = {f"{m}|{t}" for m in ("large", "expert", "static:1.0", "dynamic", "ceiling")
                for t in ("toy_sums", "toy_sums_mc")}
    assert 1 <= len(first) < len(expected), "the run was not interrupted midway"
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"resuming: {len(first)} of {len(expected)}" in r.output
    final = read_jsonl(out)
    assert sorted(rec["key"] for rec in final) == sorted(expected)  # each exactly once
    assert final[: len(first)] == first  # kept, not redone
    assert "gap closed (fused/FFT)" in r.output and "(fused-base)/(FFT-base)" in r.output
    assert "| ceiling | " in r.output  # evaluated as the large model alone (its figures: test_summarise_...)
    assert all(rec["n"] == 3 for rec in final)
    again = runner.invoke(app, args)  # nothing left to do: no model is even loaded
    assert again.exit_code == 0 and read_jsonl(out) == final


def test_eval_cli_runs_a_task_yaml_reading_local_json(recipe_file, tmp_path):
    """docs/evaluation.md's recipe for any lm-eval task offline: include its YAML, point
    `dataset_path: json` at local files, pass the YAML path as the task."""
    import lm_eval
    rows = [{"question": f"Tom has {a} apples and buys {b}. How many now?", "answer": f"He has {a + b}. #### {a + b}"}
            for a, b in [(2, 3), (4, 1), (5, 5), (1, 7)]]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "my_gsm8k.yaml"
    task.write_text(yaml.safe_dump({
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"), "task": "my_gsm8k",
        "dataset_path": "json", "dataset_name": None, "num_fewshot": 2,
        "dataset_kwargs": {"data_files": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}}}))
    out = tmp_path / "r.jsonl"
    r = runner.invoke(app, ["eval", "-r", str(recipe_file["plain"]), "--tasks", str(task), "--methods", "static:1.0",
                            "--limit", "2", "--max-gen-toks", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    (rec,) = read_jsonl(out)
    assert rec["key"] == f"static:1.0|{task}" and rec["n"] == 2 and rec["metric"] == "exact_match,strict-match"


def test_summarise_gap_closed_figures():
    recs = [{"key": f"{m}|{t}", "value": v, "metric": "acc,none", "higher_is_better": True}
            for m, vals in {"large": (0.2, 0.4), "dynamic": (0.5, 0.5), "ceiling": (0.6, 0.8)}.items()
            for t, v in zip(("a", "b"), vals)]
    text = summarise(recs, ["large", "dynamic", "ceiling"], ["a", "b"])
    # averages: large 0.3, dynamic 0.5, ceiling 0.7 -> fused/FFT 71.4%, (0.5-0.3)/(0.7-0.3) = 50.0%
    assert "| dynamic | 0.5000 | 71.4% | 50.0% |" in text
    assert "| large | 0.3000 | 42.9% | 0.0% |" in text


def test_eval_cli_bad_input(recipe_file, tmp_path, monkeypatch):
    monkeypatch.delenv("LOGITFUSION_DATA_DIR", raising=False)
    base = ["eval", "--recipe", str(recipe_file["plain"]), "--methods", "large", "--limit", "2"]
    r = runner.invoke(app, base + ["--tasks", "toy_sumz"])
    assert r.exit_code == 2 and "unknown task 'toy_sumz'; did you mean toy_sums" in flat(r.output)
    r = runner.invoke(app, base + ["--tasks", "toy_sums", "--gap-closed"])
    assert r.exit_code == 2 and "--gap-closed needs a fine-tuned large model" in flat(r.output)
    assert "ceiling" in r.output
    r = runner.invoke(app, base + ["--tasks", "gsm8k_local", "--data-dir", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "local dataset path" in flat(r.output) and "does not exist" in flat(r.output)
    r = runner.invoke(app, base + ["--tasks", "gsm8k_local", "--data-dir", str(tmp_path)])  # folder without the file
    assert r.exit_code == 2 and "gsm8k_test.jsonl' does not exist" in flat(r.output)
    r = runner.invoke(app, base + ["--tasks", "gsm8k_local"])  # no data folder given at all
    assert r.exit_code == 2 and "no data folder was given" in flat(r.output)
    r = runner.invoke(app, base + ["--tasks", "toy_sums", "--methods", "expert:nope"])
    assert r.exit_code == 2 and "unknown expert 'nope'" in flat(r.output)


def test_eval_cli_without_lm_eval(recipe_file, tmp_path):
    """lm-eval missing (hidden from the import system): a clear message, exit code 2."""
    code = ("import sys; sys.modules['lm_eval'] = None; from logitfusion.cli import app; "
            f"sys.argv = ['logitfusion', 'eval', '--recipe', {str(recipe_file['plain'])!r}, '--tasks', 'toy_sums']; app()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert "pip install lm-eval" in flat(done.stderr)
