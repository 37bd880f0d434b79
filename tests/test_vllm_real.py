"""`logitfusion bench real --engine vllm` without vLLM: the option is checked before anything loads
(an unknown engine, vLLM missing, named in one line), and the two engines' records share real.jsonl
without colliding (each report reads its own engine's; a method vLLM refused is listed, not scored).
The run itself needs vLLM and the real build (docs/real.md)."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from logitfusion.bench import real_bench
from logitfusion.cli import app


def test_engine_option_is_checked_before_anything_loads(tmp_path, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "real", "--root", str(tmp_path), "--engine", "tgi"])
    assert res.exit_code == 2 and "--engine must be one of hf, vllm" in res.output and "Traceback" not in res.output
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find(name, *a))
    res = runner.invoke(app, ["bench", "real", "--root", str(tmp_path), "--engine", "vllm"])
    assert res.exit_code == 2 and "vLLM is not installed" in res.output and "pip install" in res.output, res.output
    res = runner.invoke(app, ["bench", "real", "--root", str(tmp_path), "--max-model-len", "0"])
    assert res.exit_code == 2 and "real build" in res.output  # not a build: said first
    with pytest.raises(ValueError, match="engine must be one of"):
        real_bench.bench_real(tmp_path, tmp_path / "out", bc=real_bench.BenchConfig(engine="tgi"))


def _rec(engine, method, both, **extra):
    r = {"task": "capitals", "split": "test", "method": method, "solver": method, "format": both, "correct": both,
         "both": both, "n": 2, "seconds": 1.0, "tokens": 4, "tokens_per_s": 4.0,
         "answers": [{"id": "capitals-test-0", "answer": "Paris", "text": f"Answer: {engine}", "format": True,
                      "correct": True, "both": True}], **extra}
    if engine is not None:
        r["engine"] = engine
    return r


def test_engines_share_real_jsonl_without_colliding(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    recs = [_rec(None, "large", 0.5), _rec(None, "expert", 0.0), _rec(None, "static:1.0", 0.25),  # no field: hf
            _rec("vllm", "large", 0.75), _rec("vllm", "static:1.0", 1.0)]
    skipped = {"task": "capitals", "split": "test", "method": "expert", "solver": "expert", "engine": "vllm",
               "skipped": "method 'expert' reads other models than this engine runs"}
    (out / "real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*recs, skipped]))
    records = real_bench._records(out / "real.jsonl")
    hf = real_bench.write_report(tmp_path, out, records).read_text()
    vl = real_bench.write_report(tmp_path, out, records, engine="vllm").read_text()
    assert (out / "real.md").exists() and (out / "real-vllm.md").exists()
    assert "| static:1.0 | 25% |" in hf and "| static:1.0 | 100% |" in vl and "Answer: vllm" not in hf
    assert "| expert |" not in vl and "Not run on vllm: test expert (method 'expert' reads other models than this engine runs)" in vl
    assert "(the expert alone not run on this engine)" in vl and "the expert alone (" in hf
    assert "in vllm" in vl.splitlines()[0] and "--engine vllm" in vl
